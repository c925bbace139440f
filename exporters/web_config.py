"""`serve --web.config.file`: TLS, basic auth and response headers for
/metrics, in the format of the Prometheus exporter-toolkit, so that one
web-config file serves node_exporter and anontrace alike.

Like the main config, the file is validated in one step whose errors read
``{file}:{line}: {key}: {problem}``; certificates and keys are loaded at
validation time, so a key that does not match its certificate is reported by
``--check-config`` and not by the first scrape.

Python's ssl module cannot accept a client certificate without verifying
it, so of the toolkit's client_auth_type values RequestClientCert and
RequireAnyClientCert are refused with a pointer to the verifying ones.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from exporters.config import (
    ConfigError,
    _describe,
    _fields,
    _Invalid,
    _is_null,
    _Parser,
    _string,
    compose_yaml,
    read_text,
)

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The response headers the exporter-toolkit lets a web config set.
ALLOWED_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options",
                   "X-Frame-Options", "X-XSS-Protection", "Content-Security-Policy")
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


@dataclass(frozen=True)
class TlsConfig:
    """tls_server_config: file paths are resolved against the web config's
    directory, as the exporter-toolkit does."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        """A server-side SSLContext with these settings (ssl.SSLError or
        OSError when a file cannot be used)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        ctx.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        return ctx


@dataclass(frozen=True)
class WebConfig:
    """The whole web config; the defaults serve plain HTTP without auth."""

    tls: TlsConfig | None = None
    # user -> bcrypt hash
    basic_auth_users: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    source: str = "<none>"

    @property
    def auth_required(self) -> bool:
        return bool(self.basic_auth_users)


def _path(base: Path) -> _Parser:
    def parse(node: Node, path: str) -> str:
        value = _string(node, path, "a file path")
        p = Path(value) if os.path.isabs(value) else base / value
        if not p.is_file():
            raise _Invalid(node, path, f"no such file: {p}")
        if not os.access(p, os.R_OK):
            raise _Invalid(node, path, f"cannot read {p}")
        return str(p)
    return parse


def _choice(choices: tuple[str, ...] | list[str], refused: dict[str, str] | None = None
            ) -> _Parser:
    def parse(node: Node, path: str) -> str:
        value = _string(node, path, "one of " + ", ".join(choices))
        if refused and value in refused:
            raise _Invalid(node, path, refused[value])
        if value not in choices:
            raise _Invalid(node, path, f"expected one of {', '.join(choices)}, "
                           f"got {_describe(node)}")
        return value
    return parse


_UNVERIFIED_PROBLEM = (
    "not supported: Python's ssl module cannot accept a client certificate without "
    "verifying it; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with "
    "client_ca_file")


def _tls(base: Path) -> _Parser:
    keys: dict[str, tuple[str, _Parser]] = {
        "cert_file": ("cert_file", _path(base)),
        "key_file": ("key_file", _path(base)),
        "client_auth_type": ("client_auth_type", _choice(
            list(CLIENT_AUTH_TYPES), {t: _UNVERIFIED_PROBLEM for t in _UNVERIFIED_CLIENT_AUTH})),
        "client_ca_file": ("client_ca_file", _path(base)),
        "min_version": ("min_version", _choice(list(TLS_VERSIONS))),
        "max_version": ("max_version", _choice(list(TLS_VERSIONS))),
    }

    def parse(node: Node, path: str) -> TlsConfig | None:
        if _is_null(node):
            return None
        values = _fields(node, path, keys)
        for required in ("cert_file", "key_file"):
            if required not in values:
                raise _Invalid(node, f"{path}.{required}", "required when TLS is configured")
        auth = values.get("client_auth_type", "NoClientCert")
        if auth != "NoClientCert" and "client_ca_file" not in values:
            raise _Invalid(node, f"{path}.client_ca_file",
                           f"required with client_auth_type {auth}")
        tls = TlsConfig(**values)
        if tls.max_version is not None and (
                TLS_VERSIONS[tls.max_version] < TLS_VERSIONS[tls.min_version]):
            raise _Invalid(node, f"{path}.max_version",
                           f"{tls.max_version} is below min_version {tls.min_version}")
        try:
            tls.context()
        except (ssl.SSLError, OSError) as exc:
            raise _Invalid(node, path, f"cannot use the certificate and key: "
                           f"{getattr(exc, 'reason', None) or exc}") from None
        return tls
    return parse


def _string_map(node: Node, path: str, what: str) -> dict[str, tuple[Node, Node]]:
    if _is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        raise _Invalid(node, path, f"expected a mapping of {what}, got {_describe(node)}")
    out: dict[str, tuple[Node, Node]] = {}
    for k, v in node.value:
        if not isinstance(k, ScalarNode):
            raise _Invalid(k, path, f"expected a name, got {_describe(k)}")
        if k.value in out:
            first = out[k.value][0].start_mark.line + 1
            raise _Invalid(k, f"{path}.{k.value}",
                           f"duplicate key (first given on line {first})")
        out[k.value] = (k, v)
    return out


def _users(node: Node, path: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for name, (_, v) in _string_map(node, path, "user names to bcrypt hashes").items():
        where = f"{path}.{name}"
        value = _string(v, where, "a bcrypt hash")
        if not (value.startswith(_BCRYPT_PREFIXES) and len(value) == 60):
            raise _Invalid(v, where, "expected a bcrypt hash ($2b$..., 60 characters); "
                           "plain-text passwords are refused (make one with "
                           "htpasswd -nBC 10 USER, or python3 -c 'import bcrypt; "
                           "print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())')")
        users[name] = value
    return users


def _headers(node: Node, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    allowed = {h.lower(): h for h in ALLOWED_HEADERS}
    for name, (k, v) in _string_map(node, path, "header names to values").items():
        where = f"{path}.{name}"
        if name.lower() not in allowed:
            raise _Invalid(k, where, "header not allowed (allowed: "
                           + ", ".join(ALLOWED_HEADERS) + ")")
        value = _string(v, where)
        if any(c in value for c in "\r\n"):
            raise _Invalid(v, where, "a header value cannot hold a line break")
        out[allowed[name.lower()]] = value
    return out


_HTTP_SERVER: dict[str, tuple[str, _Parser]] = {"headers": ("headers", _headers)}


def parse_web_config(text: str, source: str) -> WebConfig:
    """Validate web-config YAML text; `source` names the file in errors and
    its directory anchors relative paths."""
    root = compose_yaml(text, source)
    if root is None:
        return WebConfig(source=source)
    base = Path(source).resolve().parent
    keys: dict[str, tuple[str, _Parser]] = {
        "tls_server_config": ("tls", _tls(base)),
        "basic_auth_users": ("basic_auth_users", _users),
        "http_server_config": ("http", lambda n, p: _fields(n, p, _HTTP_SERVER)),
    }
    try:
        values: dict[str, Any] = _fields(root, "", keys)
    except _Invalid as e:
        raise ConfigError(f"{source}:{e.line}: {e.path}: {e.problem}") from None
    http = values.pop("http", {})
    return WebConfig(**values, headers=http.get("headers", {}), source=source)


def load_web_config(path: str | os.PathLike[str] | None) -> WebConfig:
    """Read and validate the web config at `path`; None: plain HTTP, no auth."""
    if path is None:
        return WebConfig()
    source = os.fspath(path)
    return parse_web_config(read_text(source, "web config"), source)
