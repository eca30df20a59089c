"""The stand-in honours Blueshift's documented contract (auth, bodies, limits, faults, records)."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from tests.conftest import API_KEY

URL = "/api/v1/customers/unforget"


def auth(key: str = API_KEY, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}


def test_ok_and_recorded(standin):
    response = requests.post(
        standin.url + URL, json={"email": "a@b.co", "customer_id": "C-1"}, headers=auth()
    )
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert standin.state.snapshot()["applied"] == [{"email": "a@b.co", "customer_id": "C-1"}]


@pytest.mark.parametrize(
    "headers",
    [{}, auth(password="None"), auth(key="wrong"), {"Authorization": "Bearer " + API_KEY}],
    ids=["none", "key-colon-None", "wrong-key", "bearer"],
)
def test_anything_but_the_exact_basic_header_is_401(standin, headers):
    response = requests.post(standin.url + URL, json={"email": "a@b.co"}, headers=headers)
    assert response.status_code == 401
    assert standin.state.snapshot()["applied"] == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b"{}", 400),
        (b'{"email": 5}', 400),
        (b'{"email": ""}', 400),
        (b'{"email": "no-at"}', 422),
        (b'{"customer_id": "' + b"C" * 129 + b'"}', 422),
    ],
)
def test_invalid_bodies(standin, body, status):
    response = requests.post(standin.url + URL, data=body, headers=auth())
    assert response.status_code == status


def test_rate_limit_answers_429_without_headers(standin):
    standin.state.config.rate_limit = 20
    standin.state.reset()
    codes = [requests.post(standin.url + URL, json={"customer_id": "C"}, headers=auth()) for _ in range(40)]
    throttled = [response for response in codes if response.status_code == 429]
    assert throttled
    assert throttled[0].json() == {"message": "Rate limit exceeded"}
    assert "Retry-After" not in throttled[0].headers
    time.sleep(1.0)
    assert requests.post(standin.url + URL, json={"customer_id": "C"}, headers=auth()).status_code == 200


def test_faults_are_seeded_and_reproducible(standin):
    def draw() -> list[int]:
        standin.state.reset()
        return [
            requests.post(standin.url + URL, json={"customer_id": "C"}, headers=auth()).status_code
            for _ in range(40)
        ]

    standin.state.config.fault_rate = 0.5
    standin.state.config.faults = ["500", "503", "409"]
    standin.state.config.seed = 11
    first = draw()
    assert first == draw()
    assert {500, 503, 409} & set(first)
    assert 200 in first


def test_dropped_connection(standin):
    standin.state.config.fault_rate = 1.0
    standin.state.config.faults = ["drop"]
    with pytest.raises(requests.ConnectionError):
        requests.post(standin.url + URL, json={"customer_id": "C"}, headers=auth())


def test_revoke_after(standin):
    standin.state.config.revoke_after = 2
    codes = [
        requests.post(standin.url + URL, json={"customer_id": "C"}, headers=auth()).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 401, 401]
