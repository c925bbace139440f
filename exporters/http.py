"""The HTTP side of `anontrace serve`: /metrics and a landing page.

prometheus-client's WSGI app serves the registry (content negotiation,
gzip, OpenMetrics); around it a tiny WSGI app adds the landing page with
the probe status, and :class:`WebGuard` the basic auth and headers of the
web config (exporters/web_config.py). Served by a threading wsgiref server,
like prometheus_client.start_http_server, so a slow scraper blocks nobody;
with TLS each connection's handshake also runs in its own thread.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from exporters.prometheus import ExportState
from exporters.web_config import WebConfig
from tracer.errors import AnontraceError

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Swapped on reload; each connection takes the one current when it came.
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout = 10.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.handshake_timeout)
        try:
            conn = ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            # Plain HTTP to the TLS port, no or an unverified client
            # certificate, a client that never finished: refused.
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-response is not the daemon's error.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # An idle connection is dropped after this long (seconds per read or write).
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass   # a scrape every few seconds is not news


def landing_page(state: ExportState, config_source: str,
                 telemetry_path: str = "/metrics") -> str:
    """The HTML landing page: version, backend and every probe's status."""
    rows = "".join(
        f"<tr><td>{html.escape(p.probe)}</td><td>{html.escape(p.function or '-')}</td>"
        f"<td>{html.escape(p.method)}</td><td>{'attached' if p.attached else 'NOT attached'}"
        "</td></tr>" for p in state.probes)
    b = {k: html.escape(v) for k, v in state.build.items()}
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>anontrace</title></head>"
        "<body><h1>anontrace</h1>"
        f"<p>version {b.get('version', '')}, kernel {b.get('kernel', '')}, backend "
        f"{b.get('backend', '')} via {b.get('transport', '')}; config "
        f"{html.escape(config_source)}</p>"
        f"<p><a href='{html.escape(telemetry_path)}'>{html.escape(telemetry_path)}</a></p>"
        "<table border='1'><tr><th>probe</th><th>function</th><th>method</th><th>status</th>"
        f"</tr>{rows}</table>"
        f"<p>{state.snapshot.anon_vmas} anon_vmas, {state.snapshot.tracked_processes} "
        f"processes tracked; {state.lost_events} events lost.</p></body></html>\n")


def make_app(registry: CollectorRegistry, page: Callable[[], str],
             telemetry_path: str = "/metrics") -> Callable[..., Iterable[bytes]]:
    """WSGI app: the metrics from the registry at ``telemetry_path``, / the
    landing page, else 404."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == telemetry_path:
            return metrics(environ, start_response)
        if path == "/":
            body = page().encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [f"not found: try {telemetry_path}\n".encode()]

    return app


def _not_ready(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    # The app the socket is bound with; no request reaches it (nothing is
    # served until :meth:`HttpServer.serve` sets the real one).
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"anontrace serve is starting\n"]


class HttpServer:
    """The listening socket, bound at once (so that a port in use or a bad
    address fails before anything is compiled); :meth:`serve` starts
    answering, :meth:`close` stops."""

    def __init__(self, host: str, port: int) -> None:
        cls: type[_Server] = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(host, port, _not_ready, server_class=cls,
                                      handler_class=_QuietHandler)
        except OSError as exc:   # in use, not ours to bind, or no such address
            shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
            raise AnontraceError(f"cannot listen on {shown}:{port}: "
                                 f"{exc.strerror or exc}") from exc
        self.port = self._httpd.server_port
        self._thread: threading.Thread | None = None

    def set_tls(self, ctx: ssl.SSLContext | None) -> None:
        """Serve TLS with ``ctx`` (None: plain HTTP) from the next connection on."""
        self._httpd.ssl_context = ctx

    @property
    def scheme(self) -> str:
        return "http" if self._httpd.ssl_context is None else "https"

    def serve(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._httpd.set_app(app)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


_CACHE_MAX = 64


@functools.cache
def _dummy_hash() -> bytes:
    """A bcrypt hash of a random password: unknown users are checked against
    it so that a wrong user name costs as long as a wrong password."""
    import bcrypt

    return bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(10))


class WebGuard:
    """Basic auth and response headers from the web config, as WSGI
    middleware. :meth:`set` swaps the config on reload. Successful checks are
    cached (by a hash of the credentials): bcrypt costs tens of milliseconds
    by design, and Prometheus sends the same credentials every scrape."""

    def __init__(self, web: WebConfig) -> None:
        self.set(web)

    def set(self, web: WebConfig) -> None:
        self._web = web
        self._good: set[bytes] = set()

    def _authorized(self, environ: dict[str, Any]) -> bool:
        import bcrypt

        web = self._web
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if key in self._good:
            return True
        hashed = web.basic_auth_users.get(user)
        ok = bcrypt.checkpw(password.encode(),
                            hashed.encode() if hashed is not None else _dummy_hash())
        ok = ok and hashed is not None
        if ok and len(self._good) < _CACHE_MAX:
            self._good.add(key)
        return ok

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            extra = list(self._web.headers.items())

            def respond(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                return start_response(status, headers + extra, *exc)

            if self._web.auth_required and not self._authorized(environ):
                body = b"Unauthorized\n"
                respond("401 Unauthorized", [("Content-Type", "text/plain"),
                                             ("WWW-Authenticate", 'Basic realm="anontrace"'),
                                             ("Content-Length", str(len(body)))])
                return [body]
            return app(environ, respond)

        return guarded
