"""`anontrace serve` start-up errors: a port in use or an address it cannot
bind is one line and exit 1, before anything is compiled or attached."""
from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from tracer.commands.cli import main


@pytest.fixture
def nothing_attaches(monkeypatch):
    import tracer.kernel.bpf_session as bpf_session

    def refuse(*args, **kwargs):
        raise AssertionError("a TraceSession was created before the listen address was bound")

    monkeypatch.setattr(bpf_session.TraceSession, "__init__", refuse)


def _serve(listen: str):
    return CliRunner().invoke(main, ["serve", "--listen", listen], prog_name="anontrace")


def test_port_in_use(nothing_attaches) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve(f"127.0.0.1:{port}")
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("listen,why", [
    ("nosuchhost.invalid:29100", "cannot listen on nosuchhost.invalid:29100: "),
    ("192.0.2.1:29100", "cannot listen on 192.0.2.1:29100: Cannot assign requested address"),
])
def test_address_it_cannot_bind(nothing_attaches, listen: str, why: str) -> None:
    result = _serve(listen)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: " + why), result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("text,why", [
    (None, "cannot read web config: Permission denied"),
    ("basic_auth_users:\n  prometheus: hunter2\n",
     ":2: basic_auth_users.prometheus: expected a bcrypt hash"),
])
def test_bad_web_config(nothing_attaches, tmp_path, monkeypatch, text: str | None,
                        why: str) -> None:
    """An unreadable web config or a password that is not a bcrypt hash: one
    line, exit 1, before anything is bound or compiled."""
    web = tmp_path / "web.yaml"
    web.write_text(text or "basic_auth_users: {}\n")
    if text is None:
        # Unreadable: root reads anything, so open() is made to fail as it
        # does for a user without permission.
        import builtins

        real_open = builtins.open

        def deny(path, *a, **kw):
            if str(path) == str(web):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(builtins, "open", deny)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(main, ["serve", "--listen", f"127.0.0.1:{port}",
                                       "--web.config.file", str(web)], prog_name="anontrace")
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {web}") and why in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
