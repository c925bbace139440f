"""SIGHUP reloads serve's config (exporters.daemon.Reloader): what can
change without re-attaching is applied, the rest is reported as needing a
restart, and a broken file keeps the running config."""
from __future__ import annotations

from pathlib import Path

from exporters.config import load_config
from exporters.daemon import Reloader, Selection, StateServe
from tracer.kernel.kstate import ProcRow
from tracer.model.types import ProcessFigures


def _row(pid: int, comm: str) -> ProcRow:
    figures = ProcessFigures(1, 1, 1, 0, 1, {})
    return ProcRow(pid, 1, comm, True, 1, 0x1000, 0, figures)


def _setup(tmp_path: Path, text: str):
    path = tmp_path / "anontrace.yaml"
    path.write_text(text)
    cfg = load_config(path)
    selection = Selection(cfg, proc=tmp_path)
    kstate = StateServe(cfg, {}, [], selection)
    said: list[str] = []
    return (path, Reloader(cfg, kstate, selection, lambda msg, *level: said.append(msg)),
            kstate, selection, said)


def test_top_k_expiry_and_selection_change_without_restart(tmp_path: Path) -> None:
    path, reloader, kstate, selection, said = _setup(
        tmp_path, "top_k: 20\nexited_expiry: 5m\nselection:\n  comm: '^web'\n")
    assert selection(_row(1, "web-1")) and not selection(_row(2, "db-1"))
    path.write_text("top_k: 3\nexited_expiry: 30s\nselection:\n  comm: '^db'\n")
    reloader.reload()
    assert kstate.view.top_k == 3 and kstate.view.expiry_s == 30.0
    assert selection(_row(2, "db-1")) and not selection(_row(1, "web-1"))
    assert any("reloaded" in s for s in said), said
    assert not any("restart" in s for s in said), said


def test_what_needs_a_restart_is_said_and_not_applied(tmp_path: Path) -> None:
    path, reloader, kstate, _, said = _setup(tmp_path, "listen: '127.0.0.1:29100'\ntop_k: 20\n")
    path.write_text("listen: '127.0.0.1:29200'\nbackend: kprobe\ntop_k: 5\n")
    cfg = reloader.reload()
    assert kstate.view.top_k == 5
    assert cfg.listen == "127.0.0.1:29100" and cfg.backend == "auto"
    assert [s for s in said if "after a restart" in s] == [
        f"SIGHUP: listen changed in {path}: takes effect after a restart",
        f"SIGHUP: backend changed in {path}: takes effect after a restart",
    ]
    # A second reload of the same file reports the same pending restart, once each.
    said.clear()
    reloader.reload()
    assert len([s for s in said if "after a restart" in s]) == 2


def test_a_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    path, reloader, kstate, _, said = _setup(tmp_path, "top_k: 7\n")
    path.write_text("top_k: 7\nexited_expiry: soon\n")
    cfg = reloader.reload()
    assert cfg.top_k == 7 and kstate.view.top_k == 7
    [line] = said
    assert "config not reloaded, keeping the running one" in line
    assert f"{path}:2" in line and "exited_expiry" in line, line
