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


class HttpServer:
    """A running server; :meth:`close` stops it."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        cls = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
