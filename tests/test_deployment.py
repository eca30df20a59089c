"""docker-compose.yaml: valid per the Compose Specification, same Airflow as requirements.txt, an image
installed with the lock of its own Python, no secret shipped with a default, and an airflow-init that
refuses to start without them."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import jsonschema
import pytest
import yaml

from sandbox.celery_stack import CeleryAirflowStack
from sandbox.deployment import COMPOSE_PLACES, HOSTNAME_VARIABLE, airflow_environment, process_hostname

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (ROOT / "docker-compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


def pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


def test_compose_file_is_valid_per_the_compose_specification(compose):
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.validate(compose, schema)


def supported_pythons() -> list[str]:
    """The Python versions the Makefile supports (``SUPPORTED``), e.g. ``["3.13", ..., "3.10"]``."""
    match = re.search(r"^SUPPORTED := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile names its supported Pythons in SUPPORTED"
    return match.group(1).split()


def dockerfile_image() -> tuple[str, str, str]:
    """The Dockerfile's base image as (image, Airflow version, Python version)."""
    match = re.search(
        r"^ARG AIRFLOW_IMAGE=(apache/airflow:([\w.]+)-python(3\.\d+))$",
        (ROOT / "Dockerfile").read_text(),
        re.M,
    )
    assert match, "the Dockerfile's AIRFLOW_IMAGE names its Python: apache/airflow:<version>-python3.X"
    image, airflow, python = match.groups()
    return image, airflow, python


def lock_pins(python: str) -> dict[str, str]:
    path = ROOT / f"constraints-{python}.txt"
    assert path.exists(), f"no lock for Python {python}: run make lock"
    pins = {}
    for line in path.read_text().splitlines():
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[^\s;]+", line), f"{path.name}: {line!r} is no full pin"
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_image_is_the_pinned_airflow_version(compose):
    version = pinned("apache-airflow")
    image, airflow, _ = dockerfile_image()
    assert airflow == version
    assert compose["x-airflow-common"]["build"]["args"]["AIRFLOW_IMAGE"] == image, (
        "compose builds the Dockerfile's own base image"
    )
    assert compose["x-airflow-common"]["image"].endswith(f":{version}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{AIRFLOW_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*-r /requirements\.txt", dockerfile, re.M)


def test_image_installs_with_the_lock_of_its_python():
    _, _, python = dockerfile_image()
    assert python in supported_pythons()
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = re.search(r"^RUN pip install .*$", dockerfile, re.M)
    assert install, dockerfile
    locks = re.findall(r"-c /(constraints-[\w.]+\.txt)", install.group())
    assert locks == [f"constraints-{python}.txt"], f"the image's Python is {python}: {install.group()}"
    assert re.search(rf"^COPY .*\bconstraints-{re.escape(python)}\.txt\b.* /$", dockerfile, re.M)
    # The build stops when AIRFLOW_IMAGE (a build argument) brings another Python than the lock's.
    major, minor = python.split(".")
    assert f"assert sys.version_info[:2] == ({major}, {minor})" in dockerfile
    assert lock_pins(python)["apache-airflow"] == pinned("apache-airflow")


def test_every_supported_python_has_a_lock_of_the_same_airflow():
    pythons = supported_pythons()
    assert sorted(path.name for path in ROOT.glob("constraints*.txt")) == sorted(
        f"constraints-{python}.txt" for python in pythons
    )
    minors = sorted(int(python.split(".")[1]) for python in pythons)
    assert minors == list(range(minors[0], minors[-1] + 1)), "the supported Pythons are a range"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'requires-python = ">=3.{minors[0]},<3.{minors[-1] + 1}"' in pyproject
    for python in pythons:
        pins = lock_pins(python)
        assert pins["apache-airflow"] == pinned("apache-airflow"), python
        for package in ("apache-airflow-core", "pytest", "mypy", "ruff", "mysqlclient", "sqlglot"):
            assert package in pins, f"constraints-{python}.txt lacks {package}"


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


def test_init_creates_the_state_database_and_the_connections_and_no_pool(compose):
    script = compose["services"]["airflow-init"]["command"][-1]
    assert "airflow db migrate" in script
    assert "airflow pools" not in script, "the DAG needs no pool"
    assert "CREATE DATABASE blueshift_state" in script
    assert "blueshift_default" in script and "warehouse_default" in script
    assert '"blueshift_state": {"conn_type": "postgres"' in script
    assert "BLUESHIFT_API_KEY" not in json.dumps(compose["services"]["airflow-init"]["command"][:1])


def test_standin_is_an_optional_profile(compose):
    assert compose["services"]["blueshift-standin"]["profiles"] == ["standin"]


def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_env_example_holds_no_secret():
    values = env_example()
    assert values["BLUESHIFT_API_KEY"] == ""
    assert values["WAREHOUSE_CONN_URI"] == ""
    assert set(values) >= {
        "BLUESHIFT_HOST",
        "BLUESHIFT_RATE_LIMIT",
        "BLUESHIFT_MAX_ACTIVE_CHUNKS",
        "AIRFLOW_UID",
    }
    for env_name in SECRETS.values():
        assert values[env_name] == "", f"{env_name} in .env.example must be an empty placeholder"


def test_env_example_says_how_to_generate_each_secret():
    comments = "\n".join(
        line for line in (ROOT / ".env.example").read_text().splitlines() if line.startswith("#")
    )
    for hint in set(GENERATE.values()):
        assert hint in comments


# The deployment's secrets: the Airflow variable, and the .env variable compose fills it from.
SECRETS = {
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY": "AIRFLOW_API_SECRET_KEY",
}
FERNET_HINT = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
GENERATE = {
    "AIRFLOW_FERNET_KEY": FERNET_HINT,
    "AIRFLOW_JWT_SECRET": "openssl rand -hex 32",
    "AIRFLOW_API_SECRET_KEY": "openssl rand -hex 32",
}
AIRFLOW_SERVICES = [
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
]


class ComposeInterpolationError(Exception):
    """What docker compose would refuse the file with."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR[:]-default}``, ``${VAR[:]?error}``,
    ``${VAR[:]+alternative}``, braces nested."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise ComposeInterpolationError(f"invalid interpolation format: {text[i:]!r}")
            out.append(_substitute(text[i + 2 : j - 1], variables))
            i = j
        elif match := re.match(r"[_A-Za-z][_A-Za-z0-9]*", text[i + 1 :]):
            out.append(variables.get(match.group(), ""))
            i += 1 + match.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _substitute(expression: str, variables: Mapping[str, str]) -> str:
    match = re.fullmatch(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?)([-?+])(.*))?", expression, re.S)
    if not match:
        raise ComposeInterpolationError(f"invalid interpolation format: ${{{expression}}}")
    name, colon, operator, argument = match.groups()
    value = variables.get(name)
    present = value is not None and (value != "" or not colon)
    if operator is None:
        return value or ""
    if operator == "-":
        return value if present else interpolate(argument, variables)
    if operator == "+":
        return interpolate(argument, variables) if present else ""
    if present:
        return value
    raise ComposeInterpolationError(
        f"required variable {name} is missing a value: {interpolate(argument, variables)}"
    )


def environments(node: object, path: str = "") -> Iterator[tuple[str, str, object]]:
    """Every environment entry anywhere in the file (services, x- anchors): (where, name, value)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "environment" and isinstance(value, dict):
                for name, item in value.items():
                    yield where, str(name), item
            elif key == "environment" and isinstance(value, list):
                for entry in value:
                    name, sep, item = str(entry).partition("=")
                    yield where, name, item if sep else None
            else:
                yield from environments(value, where)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from environments(item, f"{path}[{index}]")


def secret_violations(text: str) -> list[str]:
    """Each place docker-compose.yaml (as text) gives a secret a default, a literal or no error when empty."""
    violations = []
    for where, name, value in environments(yaml.safe_load(text)):
        if name not in SECRETS:
            continue
        env_name = SECRETS[name]
        required = rf"\$\{{{env_name}:\?[^}}]*\b{env_name}\b[^}}]*\}}"
        if not (isinstance(value, str) and re.fullmatch(required, value)):
            violations.append(f"{where}.{name} = {value!r}: must be ${{{env_name}:?<how to set it>}}")
    # Anywhere else in the file (a command, a label, another variable) the .env variable is required too.
    for env_name in SECRETS.values():
        for match in re.finditer(rf"(?<!\$)\$\{{{env_name}(?![_A-Za-z0-9])(?!:\?)[^}}]*\}}?", text):
            violations.append(f"{match.group()!r}: {env_name} must be ${{{env_name}:?...}}, never defaulted")
    return violations


def test_no_secret_has_a_default_anywhere_in_the_compose_file(compose_text):
    assert secret_violations(compose_text) == []


def test_every_airflow_service_gets_every_secret(compose):
    seen = {where for where, name, _ in environments(compose) if name in SECRETS}
    assert "x-airflow-common.environment" in seen, "the walk must cover the x- anchors"
    for service in AIRFLOW_SERVICES:
        environment = compose["services"][service]["environment"]
        assert set(SECRETS) <= set(environment), f"{service} lacks {set(SECRETS) - set(environment)}"
        assert f"services.{service}.environment" in seen


SECRET_LINE = {airflow_name: re.compile(rf"^(    {airflow_name}: ).*$", re.M) for airflow_name in SECRETS}


@pytest.mark.parametrize(
    ("airflow_name", "value"),
    [
        pytest.param("AIRFLOW__CORE__FERNET_KEY", '""', id="empty-fernet-key"),
        pytest.param("AIRFLOW__CORE__FERNET_KEY", "${AIRFLOW_FERNET_KEY:-}", id="fernet-key-defaulted-empty"),
        pytest.param("AIRFLOW__CORE__FERNET_KEY", "${AIRFLOW_FERNET_KEY}", id="fernet-key-optional"),
        pytest.param(
            "AIRFLOW__API_AUTH__JWT_SECRET",
            "${AIRFLOW_JWT_SECRET:-change-this-shared-secret}",
            id="jwt-secret-defaulted",
        ),
        pytest.param(
            "AIRFLOW__API_AUTH__JWT_SECRET", "${AIRFLOW_JWT_SECRET?set it}", id="jwt-secret-may-be-empty"
        ),
        pytest.param("AIRFLOW__API__SECRET_KEY", "a-literal-secret-key", id="literal-api-secret-key"),
        pytest.param(
            "AIRFLOW__API__SECRET_KEY", "${AIRFLOW_API_SECRET_KEY:?}", id="api-secret-key-no-message"
        ),
    ],
)
def test_the_default_check_catches_a_default(compose_text, airflow_name, value):
    mutated, count = SECRET_LINE[airflow_name].subn(lambda m: m.group(1) + value, compose_text)
    assert count == 1
    assert secret_violations(mutated)


@pytest.mark.parametrize(
    ("anchor", "added"),
    [
        pytest.param(
            '      DUMB_INIT_SETSID: "0"\n',
            "      AIRFLOW__API__SECRET_KEY: worker-key\n",
            id="service-override",
        ),
        pytest.param(
            '      DUMB_INIT_SETSID: "0"\n', "      AIRFLOW__CORE__FERNET_KEY: ''\n", id="service-empty-key"
        ),
        pytest.param(
            "      AIRFLOW_ADMIN_PASSWORD: ",
            "      JWT: ${AIRFLOW_JWT_SECRET:-elsewhere}\n",
            id="defaulted-elsewhere",
        ),
    ],
)
def test_the_default_check_walks_every_service(compose_text, anchor, added):
    assert compose_text.count(anchor) == 1
    assert secret_violations(compose_text.replace(anchor, added + anchor))


def dotenv(**overrides: str | None) -> dict[str, str]:
    """A filled-in .env: generated secrets and made-up Blueshift and warehouse settings."""
    values = {
        "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW_JWT_SECRET": os.urandom(32).hex(),
        "AIRFLOW_API_SECRET_KEY": os.urandom(32).hex(),
        "BLUESHIFT_API_KEY": "test-blueshift-key-" + os.urandom(8).hex(),
        "BLUESHIFT_HOST": "https://api.getblueshift.com",
        "WAREHOUSE_CONN_URI": "postgresql://analyst:warehouse-password@warehouse:5432/analytics",
        "AIRFLOW_ADMIN_PASSWORD": "admin-password",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def container_env(compose: dict, service: str, variables: Mapping[str, str]) -> dict[str, str]:
    """The environment docker compose would give the service's container."""
    return {
        name: interpolate(str(value), variables)
        for name, value in compose["services"][service]["environment"].items()
    }


def test_compose_fills_the_secrets_from_env(compose):
    variables = dotenv()
    environment = container_env(compose, "airflow-worker", variables)
    for airflow_name, env_name in SECRETS.items():
        assert environment[airflow_name] == variables[env_name]


@pytest.mark.parametrize("env_name", sorted(SECRETS.values()))
@pytest.mark.parametrize("missing", ["unset", "empty"])
def test_compose_refuses_to_start_without_a_secret_and_says_how_to_make_one(compose, env_name, missing):
    variables = dotenv(**{env_name: None if missing == "unset" else ""})
    with pytest.raises(ComposeInterpolationError) as refused:
        container_env(compose, "airflow-apiserver", variables)
    message = str(refused.value)
    assert f"set {env_name} in .env" in message
    assert GENERATE[env_name] in message


STUBBED = ["airflow", "python", "mkdir", "chown", "rm"]


class InitRun(NamedTuple):
    process: subprocess.CompletedProcess
    calls: list[str]
    environment: dict[str, str]


def run_init(compose: dict, tmp_path: Path, **container: str | None) -> InitRun:
    """Run airflow-init's script as compose would pass it to bash, with ``airflow`` (and the other commands
    it runs) replaced by stubs that record their calls: the PATH holds nothing else, so nothing real runs.
    ``container`` sets (or, with None, unsets) variables of the container's environment."""
    init = compose["services"]["airflow-init"]
    assert init["entrypoint"] == "/bin/bash" and init["command"][:-1] == ["-c"]
    variables = dotenv()
    script = interpolate(init["command"][-1], variables)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    bash = shutil.which("bash")
    assert bash
    for command in STUBBED:
        stub = stubs / command
        stub.write_text(f'#!{bash}\nprintf \'%s %s\\n\' "${{0##*/}}" "$*" >> "$STUB_LOG"\n')
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    environment = container_env(compose, "airflow-init", variables)
    environment.update({name: value for name, value in container.items() if value is not None})
    for name in [name for name, value in container.items() if value is None]:
        environment.pop(name, None)
    environment.update({"PATH": str(stubs), "STUB_LOG": str(log), "HOME": str(tmp_path)})
    process = subprocess.run(
        [bash, "-c", script], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    return InitRun(process, log.read_text().splitlines(), environment)


@pytest.mark.parametrize("airflow_name", sorted(SECRETS))
@pytest.mark.parametrize("missing", ["unset", "empty"])
def test_init_refuses_to_start_without_a_secret(compose, tmp_path, airflow_name, missing):
    process, calls, _ = run_init(compose, tmp_path, **{airflow_name: None if missing == "unset" else ""})
    assert process.returncode != 0
    env_name = SECRETS[airflow_name]
    assert f"{airflow_name} is missing or empty" in process.stderr
    assert f"set {env_name} in .env" in process.stderr
    assert GENERATE[env_name] in process.stderr
    assert calls == [], "no command may run before the secrets are checked"


def test_init_names_every_missing_secret_at_once(compose, tmp_path):
    process, calls, _ = run_init(compose, tmp_path, **dict.fromkeys(SECRETS))
    assert process.returncode != 0
    for airflow_name, env_name in SECRETS.items():
        assert f"{airflow_name} is missing or empty: set {env_name} in .env" in process.stderr
    assert calls == []


@pytest.mark.parametrize("key", ["change-me", base64.urlsafe_b64encode(os.urandom(16)).decode()])
def test_init_refuses_a_fernet_key_that_is_not_one(compose, tmp_path, key):
    process, calls, _ = run_init(compose, tmp_path, AIRFLOW__CORE__FERNET_KEY=key)
    assert process.returncode != 0
    assert "AIRFLOW__CORE__FERNET_KEY is not a Fernet key" in process.stderr
    assert "AIRFLOW_FERNET_KEY" in process.stderr and "Fernet.generate_key()" in process.stderr
    assert calls == []


def test_init_with_every_secret_set_gets_past_the_check(compose, tmp_path):
    process, calls, _ = run_init(compose, tmp_path)
    assert process.returncode == 0, process.stderr
    assert "missing or empty" not in process.stderr
    airflow_calls = [call for call in calls if call.startswith("airflow ")]
    assert airflow_calls[0] == "airflow db migrate"
    assert "airflow connections import /tmp/connections.json --overwrite" in airflow_calls
    assert not any(call.startswith("airflow pools") for call in airflow_calls)


def test_init_accepts_a_rotated_fernet_key_list(compose, tmp_path):
    keys = ",".join(base64.urlsafe_b64encode(os.urandom(32)).decode() for _ in range(2))
    process, calls, _ = run_init(compose, tmp_path, AIRFLOW__CORE__FERNET_KEY=keys)
    assert process.returncode == 0, process.stderr
    assert "airflow db migrate" in calls


def test_init_keeps_secrets_off_command_lines(compose, tmp_path):
    process, calls, environment = run_init(compose, tmp_path)
    assert process.returncode == 0, process.stderr
    assert calls
    secrets = [environment["BLUESHIFT_API_KEY"], environment["WAREHOUSE_CONN_URI"], "warehouse-password"]
    secrets += [environment[airflow_name] for airflow_name in SECRETS]
    for call in calls:
        assert not any(secret in call for secret in secrets), call


def test_init_stores_the_blueshift_key_where_the_fernet_key_encrypts_it(compose):
    # Airflow encrypts a connection's password and extra with the Fernet key, not its login.
    script = compose["services"]["airflow-init"]["command"][-1]
    assert '"password": os.environ["BLUESHIFT_API_KEY"]' in script
    assert '"login": os.environ["BLUESHIFT_API_KEY"]' not in script


# The Celery deployment's settings: one source (sandbox/deployment.py) for the compose file and the
# Celery stack of tests/e2e/test_celery_e2e.py.


def compose_settings(compose: dict, service: str | None = None) -> dict[str, str]:
    """The ``AIRFLOW__*`` settings of ``x-airflow-common`` (or of ``service``), secrets aside."""
    environment = compose["services"][service] if service else compose["x-airflow-common"]
    return {
        str(name): str(value)
        for name, value in environment["environment"].items()
        if str(name).startswith("AIRFLOW__") and name not in SECRETS
    }


def settings_drift(actual: Mapping[str, str], expected: Mapping[str, str]) -> dict[str, tuple]:
    """Each setting that differs: (what is there, what sandbox/deployment.py says)."""
    return {
        name: (actual.get(name), expected.get(name))
        for name in sorted(set(actual) | set(expected))
        if actual.get(name) != expected.get(name)
    }


def test_compose_holds_exactly_the_deployment_settings(compose):
    assert settings_drift(compose_settings(compose), airflow_environment(COMPOSE_PLACES)) == {}


@pytest.mark.parametrize("service", AIRFLOW_SERVICES)
def test_every_airflow_service_runs_the_deployment_settings(compose, service):
    assert settings_drift(compose_settings(compose, service), airflow_environment(COMPOSE_PLACES)) == {}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(
            "AIRFLOW__CORE__EXECUTOR: CeleryExecutor", "AIRFLOW__CORE__EXECUTOR: LocalExecutor", id="changed"
        ),
        pytest.param("    AIRFLOW__CELERY__BROKER_URL: redis://:@redis:6379/0\n", "", id="removed"),
        pytest.param(
            "    AIRFLOW__CORE__LOAD_EXAMPLES:",
            "    AIRFLOW__CORE__PARALLELISM: '64'\n    AIRFLOW__CORE__LOAD_EXAMPLES:",
            id="added",
        ),
    ],
)
def test_the_drift_check_catches_a_compose_change(compose_text, old, new):
    assert compose_text.count(old) == 1
    mutated = yaml.safe_load(compose_text.replace(old, new))
    assert settings_drift(compose_settings(mutated), airflow_environment(COMPOSE_PLACES))


def test_the_celery_stack_runs_the_deployment_settings_in_places_of_its_own():
    stack = CeleryAirflowStack({})
    try:
        expected = airflow_environment(stack.places)
        assert (
            settings_drift({name: stack.env[name] for name in expected if name in stack.env}, expected) == {}
        )
        # Its own metadata DB, a Redis database other than 0, its own key prefix and queue.
        assert stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("/" + stack.db_name)
        assert stack.env["AIRFLOW__CELERY__BROKER_URL"].endswith(f":6379/{stack.redis_db}")
        assert stack.redis_db != 0
        assert stack.env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"] == stack.key_prefix
        assert stack.env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == stack.queue
        assert len(stack.worker_names) == 3 and len(set(stack.worker_names)) == 3
    finally:
        shutil.rmtree(stack.home)


def test_two_celery_stacks_never_share_a_queue_or_keys():
    stacks = [CeleryAirflowStack({}) for _ in range(2)]
    try:
        assert stacks[0].queue != stacks[1].queue
        assert stacks[0].key_prefix != stacks[1].key_prefix
        assert stacks[0].db_name != stacks[1].db_name
    finally:
        for stack in stacks:
            shutil.rmtree(stack.home)


def test_a_worker_gets_its_hostname_from_the_environment(monkeypatch):
    monkeypatch.setenv(HOSTNAME_VARIABLE, "worker-7")
    assert process_hostname() == "worker-7"
    monkeypatch.delenv(HOSTNAME_VARIABLE)
    assert process_hostname() == socket.getfqdn()


def test_stopping_a_worker_lets_its_chunk_tasks_finish(compose):
    worker = compose["services"]["airflow-worker"]
    # dumb-init sends docker stop's SIGTERM to the Celery worker alone (a warm shutdown), which then
    # has stop_grace_period, not Docker's 10 s, to finish its running chunks.
    assert worker["environment"]["DUMB_INIT_SETSID"] == "0"
    assert worker["stop_grace_period"] == "10m"
