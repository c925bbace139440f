"""The HTTP side of `anontrace serve`: /metrics and a landing page.

prometheus-client's WSGI app serves the registry (content negotiation,
gzip, OpenMetrics); around it a tiny WSGI app adds the landing page with
the probe status. Served by a threading wsgiref server, like
prometheus_client.start_http_server, so a slow scraper blocks nobody.
"""
from __future__ import annotations

import html
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from exporters.prometheus import ExportState
from tracer.errors import AnontraceError

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass   # a scrape every few seconds is not news


def landing_page(state: ExportState, config_source: str) -> str:
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
        "<p><a href='/metrics'>/metrics</a></p>"
        "<table border='1'><tr><th>probe</th><th>function</th><th>method</th><th>status</th>"
        f"</tr>{rows}</table>"
        f"<p>{state.snapshot.anon_vmas} anon_vmas, {state.snapshot.tracked_processes} "
        f"processes tracked; {state.lost_events} events lost.</p></body></html>\n")


def make_app(registry: CollectorRegistry,
             page: Callable[[], str]) -> Callable[..., Iterable[bytes]]:
    """WSGI app: /metrics from the registry, / the landing page, else 404."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/":
            body = page().encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics\n"]

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
        cls = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(host, port, _not_ready, server_class=cls,
                                      handler_class=_QuietHandler)
        except OSError as exc:   # in use, not ours to bind, or no such address
            shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
            raise AnontraceError(f"cannot listen on {shown}:{port}: "
                                 f"{exc.strerror or exc}") from exc
        self.port = self._httpd.server_port
        self._thread: threading.Thread | None = None

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
