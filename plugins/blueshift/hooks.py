"""Transport to Blueshift: one pooled keep-alive session, the exact Basic auth, timeouts, the one call."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.log import mask_secret
from requests.auth import HTTPBasicAuth
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter

from blueshift.exceptions import BlueshiftConfigError
from blueshift.settings import DEFAULTS

START_TRACKING_ENDPOINT = "/api/v1/customers/unforget"
REGION_HOSTS = {"us": "https://api.getblueshift.com", "eu": "https://api.eu.getblueshift.com"}


def _is_loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class BlueshiftHook(HttpHook):
    """
    Call Blueshift's customer API with the User API key.

    The key may sit in the connection's login (Blueshift's convention: key as username) or in its
    password (masked in the UI). Either way it is sent as ``Basic base64("<key>:")`` with an empty
    password: ``HttpHook`` alone would send ``<key>:None`` when the password is unset.

    :param blueshift_conn_id: an HTTP connection whose host is the region's API host.
    :param connect_timeout: seconds to open a connection.
    :param read_timeout: seconds to wait for an answer.
    :param pool_maxsize: keep-alive connections kept open; match the requests in flight.
    :param allow_http_hosts: hosts the key may reach over plain http besides loopback (test
        stand-ins; the setting ``BLUESHIFT_ALLOW_HTTP_HOSTS``).
    """

    conn_name_attr = "blueshift_conn_id"
    default_conn_name = DEFAULTS.blueshift_conn_id
    conn_type = "http"
    hook_name = "Blueshift"

    def __init__(
        self,
        blueshift_conn_id: str = default_conn_name,
        *,
        connect_timeout: float = DEFAULTS.connect_timeout,
        read_timeout: float = DEFAULTS.read_timeout,
        pool_maxsize: int = DEFAULTS.max_in_flight,
        allow_http_hosts: Iterable[str] = DEFAULTS.allow_http_hosts,
    ) -> None:
        adapter = TCPKeepAliveAdapter(
            idle=120, count=20, interval=30, pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0
        )
        super().__init__(method="POST", http_conn_id=blueshift_conn_id, adapter=adapter)
        self.blueshift_conn_id = blueshift_conn_id
        self.timeout = (connect_timeout, read_timeout)
        self.allow_http_hosts = frozenset(allow_http_hosts)
        self._session: Any = None
        self._template: Any = None
        self._send_kwargs: dict[str, Any] = {}

    def _extract_auth(self, connection: Any) -> HTTPBasicAuth:
        key = (connection.login or connection.password or "").strip()
        if not key:
            raise BlueshiftConfigError(
                f"Connection {self.blueshift_conn_id!r} has no API key: put the Blueshift User API key "
                "in its login (or password) field"
            )
        mask_secret(key)
        auth = HTTPBasicAuth(key, "")
        # The encoded header is a secret of its own: mask it too.
        mask_secret(auth(_HeaderProbe()).headers["Authorization"])
        return auth

    def _set_base_url(self, connection: Any) -> None:
        host = connection.host or ""
        if host and "://" not in host and not connection.schema:
            raise BlueshiftConfigError(
                f"Connection {self.blueshift_conn_id!r} has the host {host!r} without a scheme: set it to "
                f"https://{host} (US: {REGION_HOSTS['us']}, EU: {REGION_HOSTS['eu']})"
            )
        super()._set_base_url(connection)
        parsed = urlparse(self.base_url)
        if not parsed.hostname:
            raise BlueshiftConfigError(
                f"Connection {self.blueshift_conn_id!r} has no host: set it to {REGION_HOSTS['us']} (US) "
                f"or {REGION_HOSTS['eu']} (EU)"
            )
        plain_http_allowed = _is_loopback(parsed.hostname) or parsed.hostname in self.allow_http_hosts
        if parsed.scheme != "https" and not plain_http_allowed:
            raise BlueshiftConfigError(
                f"Connection {self.blueshift_conn_id!r} uses {parsed.scheme}:// for {parsed.hostname}: "
                "the API key is only sent over https (plain http only to loopback, or to test hosts "
                "listed in BLUESHIFT_ALLOW_HTTP_HOSTS); "
                f"set the host to {REGION_HOSTS['us']} or {REGION_HOSTS['eu']}"
            )

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection (host, scheme, TLS, key) without sending anything to Blueshift.

        :return: ``(True, message)`` if the hook can send with it, else ``(False, the fix)``, as
            ``HttpHook.test_connection`` answers (that one sends a request; this one does not).
        """
        try:
            self.get_conn()
        except Exception as err:
            return False, str(err)
        finally:
            self.close()
        return True, f"Connection {self.blueshift_conn_id!r} is usable: host {self.base_url}, API key set"

    def get_conn(
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> Any:
        """Return this hook's one keep-alive session, creating it on first use."""
        if self._session is None:
            session = super().get_conn(headers, extra_options)
            if session.verify is False and not _is_loopback(urlparse(self.base_url).hostname):
                raise BlueshiftConfigError(
                    f"Connection {self.blueshift_conn_id!r} turns TLS certificate checks off "
                    "(extra verify=false): remove that extra; the API key must only reach the real host"
                )
            session.headers.update({"Content-Type": "application/json", "Accept": "application/json"})
            url = self.url_from_endpoint(START_TRACKING_ENDPOINT)
            # What HttpHook.run_and_check works out per request (proxies, verify and cert from the
            # environment, then the send options), worked out once per session: the environment does
            # not change during a task, and reading it per request would take about a quarter of
            # the client's CPU.
            self._send_kwargs = {
                **session.merge_environment_settings(
                    url, session.proxies, session.stream, session.verify, session.cert
                ),
                "timeout": self.timeout,
                "allow_redirects": self.merged_extra.get("allow_redirects", True),
            }
            self._template = session.prepare_request(_request(self.method, url, {}))
            self._session = session
        return self._session

    def start_tracking(self, payload: dict[str, str]) -> Any:
        """Send one customer to ``POST /api/v1/customers/unforget`` and return the response, any status.

        :param payload: ``{"email": ...}``, ``{"customer_id": ...}`` or both.
        """
        session = self.get_conn()
        # The prepared template already carries the URL, the auth header and the session headers;
        # only the body changes per customer, so only the body is prepared (preparing the whole
        # request per call would take about a fifth of the client's CPU).
        request = self._template.copy()
        request.prepare_body(data=None, files=None, json=payload)
        return session.send(request, **self._send_kwargs)

    def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            self._session.close()
            self._session = None
            self._template = None


class _HeaderProbe:
    """A stand-in request that only collects headers, to compute the Basic header once for masking."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}


def _request(method: str, url: str, payload: dict[str, str]) -> Any:
    from requests import Request

    return Request(method, url, json=payload)
