# The Airflow image of this project: the official image of the pinned Airflow version on Python 3.12,
# plus the pinned providers and pandas from requirements.txt, installed with the lock of that Python
# (constraints-3.12.txt). docker-compose.yaml builds it.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.12
FROM ${AIRFLOW_IMAGE}
COPY requirements.txt constraints-3.12.txt /
# constraints-3.12.txt only holds for Python 3.12: an AIRFLOW_IMAGE of another Python stops the build.
RUN python -c 'import sys; assert sys.version_info[:2] == (3, 12), "the image has Python " + sys.version + ", the lock is constraints-3.12.txt"'
RUN pip install --no-cache-dir -r /requirements.txt -c /constraints-3.12.txt
