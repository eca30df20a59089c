"""docker-compose.yaml: valid per the Compose Specification, same Airflow as requirements.txt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


def test_compose_file_is_valid_per_the_compose_specification(compose):
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.validate(compose, schema)


def test_image_is_the_pinned_airflow_version(compose):
    version = pinned("apache-airflow")
    base = compose["x-airflow-common"]["build"]["args"]["AIRFLOW_IMAGE"]
    assert base == f"apache/airflow:{version}"
    assert compose["x-airflow-common"]["image"].endswith(f":{version}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_IMAGE=apache/airflow:{version}" in dockerfile
    assert "requirements.txt" in dockerfile


def test_services_of_a_celery_deployment(compose):
    services = compose["services"]
    expected = {"postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"}
    assert expected | {"airflow-worker", "airflow-triggerer", "airflow-init"} <= set(services)
    common = compose["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker, (
        "--scale airflow-worker=N needs both absent"
    )
    volumes = compose["x-airflow-common"]["volumes"]
    assert "./dags:/opt/airflow/dags" in volumes and "./plugins:/opt/airflow/plugins" in volumes


def test_init_creates_the_pool_and_both_connections(compose):
    script = compose["services"]["airflow-init"]["command"][-1]
    assert "airflow db migrate" in script
    assert "airflow pools set blueshift_api" in script
    assert "blueshift_default" in script and "warehouse_default" in script
    assert "BLUESHIFT_API_KEY" not in json.dumps(compose["services"]["airflow-init"]["command"][:1])


def test_standin_is_an_optional_profile(compose):
    assert compose["services"]["blueshift-standin"]["profiles"] == ["standin"]


def test_env_example_holds_no_secret():
    values = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["BLUESHIFT_API_KEY"] == ""
    assert values["WAREHOUSE_CONN_URI"] == ""
    assert set(values) >= {"BLUESHIFT_HOST", "BLUESHIFT_RATE_LIMIT", "BLUESHIFT_POOL_SLOTS", "AIRFLOW_UID"}
