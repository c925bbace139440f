"""serve --web.config.file: validation with file:line errors, and the HTTP
server's TLS, basic auth and headers on a real loopback socket (no BPF)."""
from __future__ import annotations

import base64
import http.client
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from exporters.config import ConfigError
from exporters.http import HttpServer, WebGuard
from exporters.web_config import WebConfig, load_web_config, parse_web_config
from tests.pki import make_pki
from tests.slow_clients import SlowClients

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server CA and certificate for 127.0.0.1, and a client CA with one
    client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"), "prometheus@example.org")

def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "web.yaml"
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_web_config(_write(tmp_path, text))
    return str(exc.value)


def test_no_file_means_plain_http_without_auth() -> None:
    web = load_web_config(None)
    assert web.tls is None and not web.auth_required and web.headers == {}


def test_shipped_example_loads_with_real_files(tmp_path: Path, pki: dict[str, Path]) -> None:
    text = (ROOT / "deploy/web-config.yaml").read_text()
    text = text.replace("/etc/anontrace/tls/anontrace.crt", str(pki["crt"]))
    text = text.replace("/etc/anontrace/tls/anontrace.key", str(pki["key"]))
    web = load_web_config(_write(tmp_path, text))
    assert web.tls is not None and web.tls.client_auth_type == "NoClientCert"
    assert web.tls.min_version == "TLS12"
    assert list(web.basic_auth_users) == ["prometheus"]
    assert bcrypt.checkpw(b"change-me", web.basic_auth_users["prometheus"].encode())
    assert web.headers == {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny"}


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, pki: dict[str, Path]) -> None:
    for name in ("crt", "key"):
        (tmp_path / f"s.{name}").write_bytes(pki[name].read_bytes())
    web = load_web_config(_write(tmp_path, "tls_server_config:\n  cert_file: s.crt\n"
                                           "  key_file: s.key\n"))
    assert web.tls is not None and web.tls.cert_file == str(tmp_path / "s.crt")


@pytest.mark.parametrize("text, expected", [
    ("basic_auth_users:\n  bob: hunter2\n",
     ":2: basic_auth_users.bob: expected a bcrypt hash"),
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n",
     ":2: tls_server_config.cert_file: no such file: /nonexistent.crt"),
    ("tls_server_confg: {}\n",
     ":1: tls_server_confg: unknown key (known: basic_auth_users, http_server_config, "
     "tls_server_config)"),
    ("http_server_config:\n  headers:\n    Server: anontrace\n",
     ":3: http_server_config.headers.Server: header not allowed"),
    ("basic_auth_users: [bob]\n",
     ":1: basic_auth_users: expected a mapping of user names to bcrypt hashes, got a list"),
    ("tls_server_config: {\n", ": malformed YAML"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    msg = _error(tmp_path, text)
    assert msg.startswith(str(tmp_path / "web.yaml")), msg
    assert expected in msg, msg


def test_tls_errors(tmp_path: Path, pki: dict[str, Path]) -> None:
    crt, key, other = pki["crt"], pki["key"], pki["client"]
    msg = _error(tmp_path, f"tls_server_config:\n  cert_file: {crt}\n")
    assert ":2: tls_server_config.key_file: required when TLS is configured" in msg
    msg = _error(tmp_path, f"tls_server_config:\n  cert_file: {crt}\n  key_file: {other}\n")
    assert ":2: tls_server_config: cannot use the certificate and key" in msg
    msg = _error(tmp_path, f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
                           "  client_auth_type: RequireAnyClientCert\n")
    assert ":4: tls_server_config.client_auth_type: not supported" in msg
    msg = _error(tmp_path, f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
                           "  client_auth_type: RequireAndVerifyClientCert\n")
    assert "tls_server_config.client_ca_file: required with client_auth_type" in msg
    msg = _error(tmp_path, f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
                           "  min_version: TLS13\n  max_version: TLS12\n")
    assert ":2: tls_server_config.max_version: TLS12 is below min_version TLS13" in msg


# ------------------------------------------------------------- the server
def _app(environ: dict[str, object], start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"metric 1\n"]


@pytest.fixture()
def server(pki: dict[str, Path], tmp_path: Path) -> Iterator[tuple[HttpServer, WebGuard, Path]]:
    web_file = _write(tmp_path, f"tls_server_config:\n  cert_file: {pki['crt']}\n"
                                f"  key_file: {pki['key']}\n"
                                f"basic_auth_users:\n  prom: {HASH}\n"
                                "http_server_config:\n  headers:\n"
                                "    X-Frame-Options: deny\n")
    web = load_web_config(web_file)
    srv = HttpServer("127.0.0.1", 0)
    guard = WebGuard(web)
    assert web.tls is not None
    srv.set_tls(web.tls.context())
    srv.serve(guard.wrap(_app))
    yield srv, guard, web_file
    srv.close()


def _client_ctx(pki: dict[str, Path], cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki["client"]))
    return ctx


def _get(port: int, ctx: ssl.SSLContext, user: str | None = None,
         password: str = PASSWORD) -> http.client.HTTPResponse:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()
    conn.request("GET", "/metrics", headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_tls_with_basic_auth(server: tuple[HttpServer, WebGuard, Path],
                             pki: dict[str, Path]) -> None:
    srv, _, _ = server
    ctx = _client_ctx(pki)
    ok = _get(srv.port, ctx, "prom")
    assert ok.status == 200 and ok.getheader("X-Frame-Options") == "deny"
    assert _get(srv.port, ctx).status == 401
    denied = _get(srv.port, ctx, "prom", "wrong")
    assert denied.status == 401
    assert denied.getheader("WWW-Authenticate") == 'Basic realm="anontrace"'
    assert _get(srv.port, ctx, "nobody").status == 401
    # Plain HTTP to the TLS port gets no HTTP answer.
    plain = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/metrics")
        plain.getresponse()


def test_reload_requires_verified_client_certificates(
        server: tuple[HttpServer, WebGuard, Path], pki: dict[str, Path]) -> None:
    srv, guard, web_file = server
    web_file.write_text(web_file.read_text().replace(
        "tls_server_config:\n",
        "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki['client_ca']}\n"))
    web = load_web_config(web_file)
    assert web.tls is not None
    srv.set_tls(web.tls.context())
    guard.set(web)
    with pytest.raises((ssl.SSLError, OSError)):
        _get(srv.port, _client_ctx(pki), "prom")
    assert _get(srv.port, _client_ctx(pki, cert=True), "prom").status == 200


def test_a_slow_client_delays_no_other(server: tuple[HttpServer, WebGuard, Path],
                                       pki: dict[str, Path]) -> None:
    """One client stalls in the TLS handshake, another sends its request and
    reads a byte a second: a third client's scrape still answers at once."""
    srv, _, _ = server
    with SlowClients(srv.port, _client_ctx(pki), "prom", PASSWORD):
        time.sleep(0.5)
        started = time.monotonic()
        assert _get(srv.port, _client_ctx(pki), "prom").status == 200
        assert time.monotonic() - started < 1.0


def test_guard_without_users_lets_everyone_in() -> None:
    guard = WebGuard(WebConfig())
    seen: list[str] = []
    body = guard.wrap(_app)({}, lambda status, headers, *exc: seen.append(status))
    assert body == [b"metric 1\n"] and seen == ["200 OK"]


def test_parse_web_config_empty_text() -> None:
    assert parse_web_config("", "x.yaml") == WebConfig(source="x.yaml")
