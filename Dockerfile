# The Airflow image of this project: the official image of the pinned Airflow version plus the
# pinned providers and pandas from requirements.txt. docker-compose.yaml builds it.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2
FROM ${AIRFLOW_IMAGE}
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt
