"""`anontrace serve --web.config.file` for real: Debian's Prometheus scrapes
it over TLS with basic auth; requests without or with wrong credentials get
401; plain HTTP to the TLS port gets no answer; a slow client delays no other
scrape; after SIGHUP with RequireAndVerifyClientCert a client without a
certificate is refused and one with a verified certificate served."""
from __future__ import annotations

import os
import signal
import ssl
import time
import urllib.error
from pathlib import Path

import bcrypt
import pytest

from tests.kernel.stack import Prometheus, Serve, http_get
from tests.pki import make_pki
from tests.slow_clients import SlowClients

USER, PASSWORD = "prometheus", "correct horse"


def _status(url: str, ctx: ssl.SSLContext, auth: tuple[str, str] | None) -> int:
    try:
        http_get(url, 10, ctx, auth)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.method_agnostic
def test_tls_basic_auth_and_client_certificates(tmp_path: Path, backend: str) -> None:
    if os.environ.get("ANONTRACE_GUEST"):
        pytest.skip("web security is user-space logic, the same on every kernel: "
                    "runs on the host (with Debian's Prometheus)")
    if backend != "auto":
        pytest.skip(f"runs once, in the host's auto pass, not {backend}")
    pki = make_pki(tmp_path, "scraper@example.org")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    web = tmp_path / "web-config.yaml"
    tls = f"tls_server_config:\n  cert_file: {pki['crt']}\n  key_file: {pki['key']}\n"
    rest = (f"basic_auth_users:\n  {USER}: {hashed}\n"
            "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    web.write_text(tls + rest)
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    srv = Serve(tmp_path, 'selection:\n  comm: "^nothing-selected$"\n',
                ("--web.config.file", str(web)), context=ctx, auth=(USER, PASSWORD))
    prom = None
    try:
        metrics = srv.url + "/metrics"
        assert srv.url.startswith("https://")
        assert "anontrace_anon_vmas" in srv.metrics()
        assert "(basic auth)" in srv.output() and "listening on https://" in srv.output()
        assert _status(metrics, ctx, None) == 401
        assert _status(metrics, ctx, (USER, "wrong")) == 401
        assert _status(srv.url + "/", ctx, None) == 401   # the landing page too
        with pytest.raises(OSError):   # plain HTTP to the TLS port: no HTTP answer
            http_get(f"http://127.0.0.1:{srv.port}/metrics", timeout=10)

        # Debian's Prometheus scrapes it over TLS with basic auth.
        prom = Prometheus(
            tmp_path, f"127.0.0.1:{srv.port}", None,
            "    scheme: https\n"
            f"    tls_config:\n      ca_file: {pki['ca']}\n"
            f"    basic_auth:\n      username: {USER}\n      password: '{PASSWORD}'\n")
        deadline = time.monotonic() + 30
        health: list[str] = []
        while time.monotonic() < deadline:
            health = [t["health"] for t in prom.api("targets")["activeTargets"]]
            if health == ["up"]:
                break
            time.sleep(0.5)
        assert health == ["up"], prom.api("targets")
        assert prom.query('anontrace_build_info{job="anontrace"}'), prom.output()

        # A slow client (handshake done, reading a byte a second) and one
        # that never says hello delay no other client's scrape beyond 1 s.
        with SlowClients(srv.port, ctx, USER, PASSWORD):
            worst = 0.0
            for _ in range(3):
                started = time.monotonic()
                srv.metrics()
                worst = max(worst, time.monotonic() - started)
                time.sleep(1)
            assert worst < 1.0, f"a scrape beside a slow client took {worst:.2f} s"

        # SIGHUP: client certificates are now required and verified.
        web.write_text(tls + "  client_auth_type: RequireAndVerifyClientCert\n"
                       f"  client_ca_file: {pki['client_ca']}\n" + rest)
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reloaded web config" not in srv.output() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "reloaded web config" in srv.output(), srv.output()
        with pytest.raises((ssl.SSLError, OSError)):
            http_get(metrics, 10, ctx, (USER, PASSWORD))
        with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
        with_cert.load_cert_chain(str(pki["client"]))
        assert "anontrace_anon_vmas" in http_get(metrics, 10, with_cert,
                                                (USER, PASSWORD)).decode()
    finally:
        if prom is not None:
            prom.stop()
        status = srv.stop()
    assert status == 0, srv.output()
