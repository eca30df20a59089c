"""
A local stand-in for Blueshift's ``POST /api/v1/customers/unforget``, honouring the documented contract.

- Auth: exactly ``Authorization: Basic base64("<key>:")``, else 401.
- Body: a JSON object with ``email`` and/or ``customer_id`` (strings); malformed JSON or no
  identifier is 400; an identifier over Blueshift's length limits or an email without exactly one
  ``@`` is 422. Success is ``200 {"status": "ok"}``.
- Rate limit: a token bucket of ``rate_limit`` requests/s (burst of one second), answered with
  ``429 {"message": "Rate limit exceeded"}``; no rate headers, like Blueshift.
- Latency, and transient faults injected by rate and seed: 404, 409, 429, 500, 502, 503, 504,
  ``drop`` (connection closed without an answer), ``slow`` (answer after ``slow_seconds``), and
  ``applied_500`` (the customer is applied, then 500 is answered).
- ``revoke_after``: after that many requests the key is refused (401).
- It records every applied customer and per-second request counts; ``GET /_sandbox/state`` returns
  them, ``POST /_sandbox/config`` changes settings at run time, ``POST /_sandbox/reset`` clears them.

Run: ``python sandbox/blueshift_standin.py --port 8099 --api-key demo-key``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ENDPOINT = "/api/v1/customers/unforget"
TRANSIENT_FAULTS = ("404", "409", "429", "500", "502", "503", "504", "drop", "slow")


@dataclass
class StandInConfig:
    """Behaviour of the stand-in; every field can be changed at run time."""

    api_key: str = "demo-key"
    rate_limit: float = 0.0
    latency_ms: float = 0.0
    fault_rate: float = 0.0
    faults: list[str] = field(default_factory=lambda: list(TRANSIENT_FAULTS))
    seed: int = 0
    slow_seconds: float = 3.0
    revoke_after: int = 0
    storm_seconds: float = 0.0
    """Answer every request with 429 for this many seconds after the first one (a 429 storm)."""
    fixed: dict[str, int] = field(default_factory=dict)
    """Identifier (email or customer_id) -> status always answered for it, e.g. ``{"x@y.com": 422}``."""


class StandInState:
    """What the stand-in received and answered, shared by the handler threads."""

    def __init__(self, config: StandInConfig) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.rng = random.Random(config.seed)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.rng = random.Random(self.config.seed)
            self.applied: list[dict[str, str]] = []
            self.answered_ok: list[dict[str, str]] = []
            self.first_request: float | None = None
            self.requests = 0
            self.statuses: Counter[str] = Counter()
            self.per_second: Counter[int] = Counter()
            self.tokens = self.config.rate_limit
            self.refilled = time.monotonic()

    def admit(self) -> tuple[int, str | None]:
        """Count one request; return its number and the fault drawn for it, if any."""
        with self.lock:
            self.requests += 1
            self.per_second[int(time.time())] += 1
            if self.first_request is None:
                self.first_request = time.monotonic()
            fault = None
            if self.config.fault_rate > 0 and self.rng.random() < self.config.fault_rate:
                fault = self.rng.choice(self.config.faults)
            return self.requests, fault

    def in_storm(self) -> bool:
        """Return True while the configured 429 storm lasts."""
        start = self.first_request
        return bool(
            self.config.storm_seconds and start and time.monotonic() - start < self.config.storm_seconds
        )

    def take_token(self) -> bool:
        """Return False when the rate limit refuses this request."""
        limit = self.config.rate_limit
        if limit <= 0:
            return True
        with self.lock:
            now = time.monotonic()
            self.tokens = min(limit, self.tokens + (now - self.refilled) * limit)
            self.refilled = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False

    def record(self, status: int | str, body: dict[str, Any] | None = None) -> None:
        with self.lock:
            self.statuses[str(status)] += 1
            if body is not None:
                user: dict[str, str] = {key: body[key] for key in ("email", "customer_id") if key in body}
                self.applied.append(user)
                if status == 200:
                    self.answered_ok.append(user)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "statuses": dict(self.statuses),
                "applied": list(self.applied),
                "answered_ok": list(self.answered_ok),
                "busiest_second": max(self.per_second.values(), default=0),
                "per_second": {str(second): count for second, count in sorted(self.per_second.items())},
                "config": asdict(self.config),
            }


def _validation_error(body: Any) -> tuple[int, str] | None:
    if not isinstance(body, dict):
        return 400, "request body must be a JSON object"
    identifiers = [key for key in ("email", "customer_id") if key in body]
    if not identifiers:
        return 400, "email or customer_id is required"
    for key in identifiers:
        if not isinstance(body[key], str) or not body[key].strip():
            return 400, f"{key} must be a non-empty string"
    email = body.get("email")
    if email is not None and (email.count("@") != 1 or len(email) > 64):
        return 422, "email is not valid"
    customer_id = body.get("customer_id")
    if customer_id is not None and len(customer_id) > 128:
        return 422, "customer_id is too long"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive answer, which no real API does.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        if self.path == "/_sandbox/state":
            self._answer(200, self.server.state.snapshot())
        else:
            self._answer(404, {"message": "Not found"})

    def do_POST(self) -> None:
        state = self.server.state
        raw = self._body()
        if self.path == "/_sandbox/reset":
            state.reset()
            self._answer(200, {"status": "ok"})
            return
        if self.path == "/_sandbox/config":
            changes = json.loads(raw or b"{}")
            with state.lock:
                for key, value in changes.items():
                    if not hasattr(state.config, key):
                        self._answer(400, {"message": f"unknown setting {key}"})
                        return
                    setattr(state.config, key, value)
                state.rng = random.Random(state.config.seed)
                state.tokens = state.config.rate_limit
            self._answer(200, {"status": "ok"})
            return
        if self.path != ENDPOINT:
            self._answer(404, {"message": "Not found"})
            return
        self._unforget(state, raw)

    def _unforget(self, state: StandInState, raw: bytes) -> None:
        config = state.config
        number, fault = state.admit()
        if config.latency_ms > 0:
            time.sleep(config.latency_ms / 1000)
        expected = "Basic " + base64.b64encode(f"{config.api_key}:".encode()).decode()
        if self.headers.get("Authorization") != expected or (
            config.revoke_after and number > config.revoke_after
        ):
            state.record(401)
            self._answer(401, {"message": "Unauthorized"})
            return
        if state.in_storm() or not state.take_token():
            state.record(429)
            self._answer(429, {"message": "Rate limit exceeded"})
            return
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            state.record(400)
            self._answer(400, {"message": "request body is not valid JSON"})
            return
        invalid = _validation_error(body)
        if invalid:
            state.record(invalid[0])
            self._answer(invalid[0], {"message": invalid[1]})
            return
        for key in ("email", "customer_id"):
            fixed = config.fixed.get(body.get(key) or "")
            if fixed:
                state.record(fixed, body if fixed == 200 else None)
                # Like many APIs, the error echoes the identifier: the client must redact it.
                message = {"message": f"fixed answer for {body.get(key)}"}
                self._answer(fixed, {"status": "ok"} if fixed == 200 else message)
                return
        if fault == "drop":
            state.record("drop")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "slow":
            time.sleep(config.slow_seconds)
            state.record("slow", body)
            self._answer(200, {"status": "ok"})
            return
        if fault == "applied_500":
            state.record("applied_500", body)
            self._answer(500, {"message": "Internal server error"})
            return
        if fault is not None:
            state.record(int(fault))
            self._answer(int(fault), {"message": "injected fault"})
            return
        state.record(200, body)
        self._answer(200, {"status": "ok"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    state: StandInState

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away (a killed task, a timeout) is normal here, not an error to print.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class StandIn:
    """The stand-in server on a background thread: ``with StandIn(config) as server: server.url``."""

    def __init__(
        self, config: StandInConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or StandInConfig()
        self._server = _Server((host, port), _Handler)
        self._server.state = StandInState(self.config)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="blueshift-standin", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def state(self) -> StandInState:
        return self._server.state

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StandInProcess:
    """The stand-in in a process of its own (so that its CPU is not the caller's), driven over HTTP.

    ``args`` are command-line options of this module, e.g. ``"--rate-limit", "50"``.
    """

    def __init__(self, api_key: str, *args: str) -> None:
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            str(self.port),
            "--api-key",
            api_key,
        ]
        self.process = subprocess.Popen(
            [*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/_sandbox/state", timeout=2).ok:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the stand-in did not start")

    def state(self) -> dict[str, Any]:
        import requests

        return dict(requests.get(self.url + "/_sandbox/state", timeout=120).json())

    def reset(self) -> None:
        import requests

        requests.post(self.url + "/_sandbox/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--api-key", default="demo-key")
    parser.add_argument("--rate-limit", type=float, default=0.0, help="requests/s, 0 = unlimited")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests given a fault")
    parser.add_argument("--faults", default=",".join(TRANSIENT_FAULTS), help="comma-separated fault kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    parser.add_argument("--revoke-after", type=int, default=0)
    parser.add_argument("--fixed", action="append", default=[], help="IDENTIFIER=STATUS, answered always")
    args = parser.parse_args(argv)
    config = StandInConfig(
        api_key=args.api_key,
        rate_limit=args.rate_limit,
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        faults=[fault.strip() for fault in args.faults.split(",") if fault.strip()],
        seed=args.seed,
        slow_seconds=args.slow_seconds,
        revoke_after=args.revoke_after,
        fixed={item.rsplit("=", 1)[0]: int(item.rsplit("=", 1)[1]) for item in args.fixed},
    )
    server = StandIn(config, host=args.host, port=args.port)
    print(f"Blueshift stand-in listening on {server.url}", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
