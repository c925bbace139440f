"""The click commands, without loading BPF (help, errors before any probe)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracer.commands.cli import main
from tracer.errors import AnontraceError
from tracer.kernel.procs import require_pids


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # click's clean exit, not a crash
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert "Traceback" not in result.output


def examples(help_text: str) -> list[str]:
    """The example command lines under an "Example(s):" heading."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() in ("Example:", "Examples:"))
    out = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        out.append(ln.strip())
    return out


@pytest.mark.parametrize("args,subcommand", [
    (["--help"], None),
    (["-h"], None),
    (["check", "--help"], "check"),
    (["events", "--help"], "events"),
    (["serve", "--help"], "serve"),
    (["rules", "--help"], "rules"),
    (["tree", "--help"], "tree"),
])
def test_help_has_examples(args: list[str], subcommand: str | None) -> None:
    result = CliRunner().invoke(main, args, prog_name="anontrace")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: anontrace")
    ex = examples(result.output)
    assert ex, result.output
    assert all(re.match(r"^(sudo )?anontrace\b", e) for e in ex), ex
    if subcommand is not None:
        assert any(re.match(rf"^(sudo )?anontrace {subcommand}\b", e) for e in ex), ex
    else:
        assert any("anontrace check" in e for e in ex), ex


def test_events_help_lists_options() -> None:
    out = run(["events", "--help"]).output
    for opt in ("--pid", "--no-children", "--backend", "--transport", "--duration", "--json",
                "--raw"):
        assert opt in out
    assert "[default: auto]" in out


def test_version() -> None:
    result = run(["--version"])
    assert result.exit_code == 0 and result.output.startswith("anontrace, version ")


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


@pytest.mark.usefixtures("not_root")
def test_check_as_non_root() -> None:
    assert_one_line_error(run(["check"]), "anontrace needs root")


@pytest.mark.usefixtures("not_root")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_check_json_as_non_root(extra: list[str]) -> None:
    assert_one_line_error(run(["check", *extra]), "run it with sudo")


@pytest.mark.usefixtures("not_root")
@pytest.mark.parametrize("args", [["events"], ["events", "-p", str(os.getpid())],
                                  ["events", "--backend", "kprobe", "-d", "1"]])
def test_events_as_non_root(args: list[str]) -> None:
    assert_one_line_error(run(args), "anontrace needs root")


def _dead_pid() -> int:
    # above the largest pid_max (2^22): cannot exist
    return 2**22 + 12345


def test_events_no_such_process() -> None:
    pid = _dead_pid()
    assert not Path(f"/proc/{pid}").exists()
    assert_one_line_error(run(["events", "-p", str(pid)]), f"no such process: {pid}")


def test_events_lists_every_missing_pid() -> None:
    a, b = _dead_pid(), _dead_pid() + 1
    result = run(["events", "-p", str(a), "-p", str(os.getpid()), "-p", str(b)])
    assert_one_line_error(result, f"no such process: {a}, {b}")


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_events_nonpositive_pid(bad: str) -> None:
    assert_one_line_error(run(["events", f"--pid={bad}"]), f"no such process: {int(bad)}")


def test_events_bad_backend_is_a_usage_error() -> None:
    result = run(["events", "--backend", "ebpf"])
    assert result.exit_code == 2
    assert "Invalid value for '--backend'" in result.output


def test_require_pids_with_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "43").write_text("")  # not a directory
    require_pids((42,), proc=tmp_path)
    with pytest.raises(AnontraceError, match=r"^no such process: 43, 44$"):
        require_pids((42, 43, 44), proc=tmp_path)


REPO = Path(__file__).resolve().parents[2]


def test_serve_help_lists_options() -> None:
    out = run(["serve", "--help"]).output
    for opt in ("--config", "--listen", "--check-config"):
        assert opt in out, out


def test_serve_check_config_on_the_example() -> None:
    result = run(["serve", "--config", str(REPO / "deploy/anontrace.yaml"), "--check-config"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{REPO / 'deploy/anontrace.yaml'}: ok")
    assert '"top_k": 20' in result.output


def test_serve_check_config_names_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("top_k: 5\nselection:\n  pids: [1, x]\n")
    assert_one_line_error(run(["serve", "--config", str(bad), "--check-config"]),
                          f"{bad}:3: selection.pids[1]")


def test_serve_bad_listen_is_a_clean_error() -> None:
    result = run(["serve", "--listen", "localhost:99999", "--check-config"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Invalid value for --listen: port must be a number" in result.output


@pytest.mark.usefixtures("not_root")
def test_serve_as_non_root() -> None:
    assert_one_line_error(run(["serve"]), "anontrace needs root")


def test_rules_prints_the_shipped_rules_by_default() -> None:
    result = run(["rules"])
    assert result.exit_code == 0, result.output
    assert result.output == (REPO / "deploy/prometheus/anontrace.rules.yml").read_text()


def test_rules_follow_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("growth:\n  window: 20s\n  for: 5s\n  min_depth_increase: 7\n")
    out = run(["rules", "--config", str(cfg)]).output
    assert "[20s]" in out and "for: 5s" in out and ">= 7" in out, out


def test_rules_runbook_base_url_option_and_config(tmp_path: Path) -> None:
    base = "https://docs.example.org/anontrace/runbooks.html"
    out = run(["rules", "--runbook-base-url", base]).output
    assert f"runbook_url: {base}#anontracefamilydeepening\n" in out, out
    assert "docs/runbooks.md#" not in out.split("groups:", 1)[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runbook_base_url: https://wiki.example.net/anontrace\n")
    out = run(["rules", "--format", "prometheusrule", "--config", str(cfg)]).output
    assert "runbook_url: https://wiki.example.net/anontrace#anontraceexporterdown\n" in out
    # the option wins over the config
    out = run(["rules", "--config", str(cfg), "--runbook-base-url", base]).output
    assert f"{base}#anontraceexporterdown" in out and "wiki.example.net" not in out


def test_rules_bad_runbook_base_url_is_a_clean_error(tmp_path: Path) -> None:
    result = run(["rules", "--runbook-base-url", "runbooks.md#top"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Invalid value for --runbook-base-url: expected a URL without a '#'" in result.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("top_k: 5\nrunbook_base_url: ftp://x/r.md\n")
    assert_one_line_error(run(["rules", "--config", str(cfg)]),
                          f"{cfg}:2: runbook_base_url: expected an http(s) URL")


def test_usage_line_shows_the_command_form() -> None:
    result = CliRunner().invoke(main, ["--help"], prog_name="anontrace")
    first = result.output.splitlines()[0]
    assert first == ("Usage: anontrace [OPTIONS] [SUBCOMMAND [ARGS]...] "
                     "[-- COMMAND [ARGS...]]"), first


@pytest.mark.parametrize("args,hint", [
    (["make", "-j8"], "put it after --: anontrace -- make -j8"),
    (["chek"], "Did you mean 'check'?"),
])
def test_unknown_subcommand_says_how_to_trace_a_program(args: list[str], hint: str) -> None:
    result = CliRunner().invoke(main, args, prog_name="anontrace")
    assert result.exit_code == 2
    assert f"no such subcommand {args[0]!r}" in result.output and hint in result.output, \
        result.output


@pytest.mark.parametrize("args,hint", [
    (["--backend", "kprobe", "serve", "--check-config"],
     "--backend: an option of the trace report, which 'serve' would ignore; serve takes its "
     "backend from its config file ('backend:')"),
    (["-p", "1", "-i", "2", "top", "-n", "1"],
     "--pid, --interval: an option of the trace report, which 'top' would ignore; top's own "
     "options go after its name (anontrace top --help)"),
    (["--json", "check"], "--json: an option of the trace report, which 'check' would ignore"),
])
def test_report_options_before_a_subcommand_are_refused(args: list[str], hint: str) -> None:
    result = CliRunner().invoke(main, args, prog_name="anontrace")
    assert result.exit_code == 2, result.output
    assert hint in " ".join(result.output.split()), result.output
