"""BlueshiftHook: the exact Basic header, region hosts, timeouts, https only, masking."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from blueshift.exceptions import BlueshiftConfigError
from blueshift.hooks import REGION_HOSTS, START_TRACKING_ENDPOINT, BlueshiftHook
from blueshift.settings import DEFAULTS, Settings

KEY = "sk-live-9f8e7d6c5b4a3210"
EXPECTED_HEADER = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()


def _set_conn(monkeypatch: pytest.MonkeyPatch, **fields: object) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BLUESHIFT_DEFAULT", json.dumps({"conn_type": "http", **fields}))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"login": KEY}, id="key-in-login-password-none"),
        pytest.param({"login": KEY, "password": ""}, id="key-in-login-password-empty"),
        pytest.param({"password": KEY}, id="key-in-password"),
        pytest.param({"login": f"  {KEY} "}, id="key-with-stray-spaces"),
    ],
)
def test_authorization_header_is_key_and_empty_password(monkeypatch, requests_mock, fields):
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], **fields)
    requests_mock.post(REGION_HOSTS["us"] + START_TRACKING_ENDPOINT, json={"status": "ok"})

    response = BlueshiftHook().start_tracking({"email": "jane@example.com"})

    assert response.status_code == 200
    sent = requests_mock.last_request
    assert sent.headers["Authorization"] == EXPECTED_HEADER
    assert sent.json() == {"email": "jane@example.com"}
    assert sent.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("region", ["us", "eu"])
def test_region_host_and_timeouts(monkeypatch, requests_mock, region):
    _set_conn(monkeypatch, host=REGION_HOSTS[region], login=KEY)
    requests_mock.post(REGION_HOSTS[region] + START_TRACKING_ENDPOINT, json={"status": "ok"})

    BlueshiftHook(connect_timeout=3.0, read_timeout=12.0).start_tracking({"customer_id": "C-1"})

    sent = requests_mock.last_request
    assert sent.url == REGION_HOSTS[region] + START_TRACKING_ENDPOINT
    assert sent.timeout == (3.0, 12.0)
    assert sent.verify is not False  # True, or the CA bundle requests found


def test_one_session_is_reused(monkeypatch, requests_mock):
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], login=KEY)
    requests_mock.post(REGION_HOSTS["us"] + START_TRACKING_ENDPOINT, json={"status": "ok"})
    hook = BlueshiftHook()
    first = hook.get_conn()
    hook.start_tracking({"customer_id": "C-1"})
    hook.start_tracking({"customer_id": "C-2"})
    assert hook.get_conn() is first
    assert requests_mock.call_count == 2


def test_non_2xx_is_returned_not_raised(monkeypatch, requests_mock):
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], login=KEY)
    requests_mock.post(REGION_HOSTS["us"] + START_TRACKING_ENDPOINT, status_code=503, json={})
    assert BlueshiftHook().start_tracking({"customer_id": "C-1"}).status_code == 503


def test_connection_errors_propagate_as_requests_errors(monkeypatch, requests_mock):
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], login=KEY)
    requests_mock.post(REGION_HOSTS["us"] + START_TRACKING_ENDPOINT, exc=requests.exceptions.ConnectTimeout)
    with pytest.raises(requests.Timeout):
        BlueshiftHook().start_tracking({"customer_id": "C-1"})


@pytest.mark.parametrize(
    ("fields", "fix"),
    [
        ({"host": REGION_HOSTS["us"]}, "put the Blueshift User API key"),
        ({"host": "http://api.getblueshift.com", "login": KEY}, "only sent over https"),
        ({"host": "", "login": KEY}, "has no host"),
    ],
)
def test_bad_connection_names_the_fix(monkeypatch, fields, fix):
    _set_conn(monkeypatch, **fields)
    with pytest.raises(BlueshiftConfigError, match=fix) as raised:
        BlueshiftHook().get_conn()
    assert KEY not in str(raised.value)


def test_plain_http_allowed_for_loopback_only(monkeypatch):
    _set_conn(monkeypatch, host="http://127.0.0.1:8099", login=KEY)
    assert BlueshiftHook().get_conn() is not None


def test_key_and_header_are_registered_with_the_secrets_masker(monkeypatch):
    from airflow.sdk._shared.secrets_masker import redact

    _set_conn(monkeypatch, host=REGION_HOSTS["eu"], login=KEY)
    BlueshiftHook().get_conn()
    line = f"sending with {KEY} and header {EXPECTED_HEADER}"
    cleaned = str(redact(line))
    assert KEY not in cleaned
    assert EXPECTED_HEADER.split()[1] not in cleaned


def test_unknown_extras_are_headers_so_settings_stay_out_of_extras(monkeypatch, requests_mock):
    """HttpHook turns unknown extras into headers; timeouts are hook arguments, not extras."""
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], login=KEY, extra={"X-Team": "data"})
    requests_mock.post(REGION_HOSTS["us"] + START_TRACKING_ENDPOINT, json={"status": "ok"})
    BlueshiftHook().start_tracking({"customer_id": "C-1"})
    assert requests_mock.last_request.headers["X-Team"] == "data"


def test_tls_verification_cannot_be_turned_off_for_real_hosts(monkeypatch):
    _set_conn(monkeypatch, host=REGION_HOSTS["us"], login=KEY, extra={"verify": False})
    with pytest.raises(BlueshiftConfigError, match="TLS certificate checks"):
        BlueshiftHook().get_conn()


def test_plain_http_to_a_listed_test_host(monkeypatch):
    _set_conn(monkeypatch, host="http://blueshift-standin:8099", login=KEY)
    with pytest.raises(BlueshiftConfigError, match="BLUESHIFT_ALLOW_HTTP_HOSTS"):
        BlueshiftHook().get_conn()
    settings = Settings.from_env({"BLUESHIFT_ALLOW_HTTP_HOSTS": " blueshift-standin, other-host "})
    assert settings.allow_http_hosts == ("blueshift-standin", "other-host")
    assert BlueshiftHook(allow_http_hosts=settings.allow_http_hosts).get_conn() is not None


def test_test_connection_checks_without_sending(monkeypatch, requests_mock):
    _set_conn(monkeypatch, host=REGION_HOSTS["eu"], login=KEY)
    usable, message = BlueshiftHook().test_connection()
    assert usable, message
    assert REGION_HOSTS["eu"] in message
    assert KEY not in message
    assert requests_mock.call_count == 0, "nothing is sent to Blueshift"


@pytest.mark.parametrize(
    ("fields", "fix"),
    [
        ({"host": REGION_HOSTS["us"]}, "put the Blueshift User API key"),
        ({"host": "http://api.getblueshift.com", "login": KEY}, "only sent over https"),
        ({"host": "api.getblueshift.com", "login": KEY}, "without a scheme"),
        ({"host": REGION_HOSTS["us"], "login": KEY, "extra": {"verify": False}}, "TLS certificate checks"),
    ],
)
def test_test_connection_names_the_fix(monkeypatch, requests_mock, fields, fix):
    _set_conn(monkeypatch, **fields)
    usable, message = BlueshiftHook().test_connection()
    assert not usable
    assert fix in message
    assert KEY not in message
    assert requests_mock.call_count == 0


def test_test_connection_of_a_missing_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_BLUESHIFT_DEFAULT", raising=False)
    usable, message = BlueshiftHook().test_connection()
    assert not usable
    assert "blueshift_default" in message


def test_defaults_come_from_the_settings():
    hook = BlueshiftHook()
    assert hook.blueshift_conn_id == DEFAULTS.blueshift_conn_id == BlueshiftHook.default_conn_name
    assert hook.timeout == (DEFAULTS.connect_timeout, DEFAULTS.read_timeout)
    assert hook.allow_http_hosts == frozenset()
