"""setup.cfg lists every package (tracer.bpf is mapped, so nothing is found
automatically) and ships the BPF sources and the man page."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _options() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["options"]


def _listed(value: str) -> list[str]:
    return [v.strip() for v in value.strip().splitlines() if v.strip()]


def test_every_package_directory_is_listed() -> None:
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for top in ("tracer", "exporters") for p in (ROOT / top).rglob("__init__.py")}
    listed = set(_listed(_options()["packages"]))
    assert on_disk | {"tracer.bpf"} == listed


def test_bpf_sources_and_man_page_are_shipped() -> None:
    opts = _options()
    assert _listed(opts["package_dir"]) == ["tracer.bpf = bpf_programs"]
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options.package_data"]["tracer.bpf"].strip() == "*.c, *.h"
    assert cfg["options.data_files"]["share/man/man8"].strip() == "docs/anontrace.8"
    assert {p.name for p in (ROOT / "bpf_programs").glob("*.[ch]")} == {
        "anontrace.bpf.c", "anontrace_common.h", "anontrace_compat.h", "census.bpf.c",
        "rmap.bpf.c", "rmapwalk.bpf.c"}


def test_shipped_shell_completion_is_what_click_generates() -> None:
    """deploy/completion holds click's completion scripts for the current
    CLI (regenerate: _ANONTRACE_COMPLETE=bash_source anontrace >
    deploy/completion/anontrace.bash, zsh_source > deploy/completion/_anontrace)."""
    import click.shell_completion as sc

    from tracer.commands.cli import main

    for shell, path in (("bash", "anontrace.bash"), ("zsh", "_anontrace")):
        cls = sc.get_completion_class(shell)
        assert cls is not None
        script = cls(main, {}, "anontrace", "_ANONTRACE_COMPLETE").source()
        assert (ROOT / "deploy" / "completion" / path).read_text() == script, path
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    files = cfg["options.data_files"]
    assert files["share/bash-completion/completions"].strip() == "deploy/completion/anontrace.bash"
    assert files["share/zsh/site-functions"].strip() == "deploy/completion/_anontrace"


def test_man_page_renders_and_lists_every_option() -> None:
    """`man -l docs/anontrace.8` renders without warnings and names every
    subcommand and every long option `--help` shows."""
    import subprocess

    import click

    from tracer.commands.cli import main

    out = subprocess.run(["man", "-l", "--warnings", str(ROOT / "docs" / "anontrace.8")],
                         capture_output=True, text=True, check=False,
                         env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin", "LANG": "C"})
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    page = out.stdout
    ctx = click.Context(main)
    commands = [("anontrace", main)] + [(n, main.get_command(ctx, n))
                                        for n in main.list_commands(ctx)]
    missing = []
    for name, cmd in commands:
        assert cmd is not None
        if name not in page:
            missing.append(name)
        for p in cmd.params:
            if isinstance(p, click.Option):
                missing += [f"{name} {o}" for o in p.opts if o.startswith("--") and o not in page]
    assert not missing, missing
