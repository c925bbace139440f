"""The `anontrace serve` config file: defaults, the shipped example, errors."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from exporters.config import (
    BACKENDS,
    DEFAULT_PORT,
    ConfigError,
    GrowthConfig,
    SelectionConfig,
    ServeConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_runbook_base_url,
)
from tracer.errors import AnontraceError
from tracer.kernel.bpf_source import MapSizes

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "anontrace.yaml"


def write(tmp_path: Path, text: str, name: str = "anontrace.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --- defaults and the shipped example ------------------------------------------

def test_defaults_when_no_path() -> None:
    cfg = load_config(None)
    assert cfg == ServeConfig()
    assert cfg.source == "<defaults>"
    assert cfg.listen_address() == ("127.0.0.1", DEFAULT_PORT)
    assert cfg.backend == "auto" and cfg.backend in BACKENDS
    assert cfg.selection == SelectionConfig(comm=None, pids=(), cgroup=None)
    assert cfg.selection.comm_re() is None


def test_example_config_is_the_defaults() -> None:
    # If this fails after DEFAULT_PORT changed, update listen in the example.
    cfg = load_config(EXAMPLE)
    assert cfg.source == str(EXAMPLE)
    assert dataclasses.replace(cfg, source="<defaults>") == ServeConfig()


def test_example_config_sets_every_key_but_selection() -> None:
    text = EXAMPLE.read_text()
    top = {ln.split(":")[0] for ln in text.splitlines() if ln and ln[0].isalpha()}
    assert top == {"listen", "backend", "top_k", "exited_expiry", "growth", "maps",
                   "runbook_base_url", "rmap_interval"}
    for key in ("window", "for", "min_depth_increase", "min_family_anon_vmas_increase",
                "min_orphaned_increase", "min_host_anon_vmas_increase",
                "vmas", "anon_vmas", "mms", "processes", "families"):
        assert f"\n  {key}: " in text, key
    # the example spells out the defaults
    assert parse_config(text, "example").maps == MapSizes()


def test_map_sizes_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^cfg:3: maps.anon_vmas: expected at least 1024"):
        parse_config("maps:\n  vmas: 4096\n  anon_vmas: 10\n", "cfg")
    with pytest.raises(ConfigError, match=r"^cfg:2: maps.vma: unknown key"):
        parse_config("maps:\n  vma: 4096\n", "cfg")
    assert parse_config("maps:\n  mms: 2048\n", "cfg").maps.mms == 2048
    assert not parse_config("maps:\n  mms: 2048\n", "cfg").maps.preallocate
    assert parse_config("maps:\n  preallocate: true\n", "cfg").maps.preallocate
    with pytest.raises(ConfigError, match=r"^cfg:2: maps.preallocate: expected true or false, "
                                          r"got 'yes please'"):
        parse_config("maps:\n  preallocate: yes please\n", "cfg")
    # A key an earlier release took says what became of it.
    with pytest.raises(ConfigError, match=r"^cfg:3: maps.mm_anon_vmas: no longer used: .*remove"):
        parse_config("maps:\n  vmas: 4096\n  mm_anon_vmas: 10\n", "cfg")


def test_example_selection_works_when_uncommented() -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# selection:")
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.startswith("#   "):
            break
        block.append(ln)
    uncommented = "\n".join(ln[2:] for ln in block) + "\n"
    sel = parse_config(uncommented, "example").selection
    assert sel == SelectionConfig(comm="^(java|python3?)$", pids=(1234, 5678),
                                  cgroup="/system.slice/myapp.service")
    pattern = sel.comm_re()
    assert pattern is not None
    assert pattern.search("python3") and pattern.search("java")
    assert not pattern.search("javac")


@pytest.mark.parametrize("text", [
    "", "\n\n", "# only a comment\n", "---\n", "selection:\ngrowth:\n",
    "selection:\n  comm:\n  pids:\n  cgroup:\n",
])
def test_empty_file_and_empty_sections_are_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert load_config(path) == ServeConfig(source=str(path))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbftop_k: 7\n")
    assert load_config(path).top_k == 7


# --- a full config ---------------------------------------------------------------

FULL = """\
listen: "[::1]:9100"
backend: kprobe
selection:
  comm: "^(java|python3?)$"
  pids: [1234, 5678]
  cgroup: /system.slice/myapp.service
top_k: 50
exited_expiry: 90s
growth:
  window: 1h
  for: 30m
  min_depth_increase: 3
  min_family_anon_vmas_increase: 0x100
  min_orphaned_increase: 2_000
  min_host_anon_vmas_increase: 50000
"""


def test_full_config_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load_config(path)
    assert cfg == ServeConfig(
        listen="[::1]:9100",
        backend="kprobe",
        selection=SelectionConfig(comm="^(java|python3?)$", pids=(1234, 5678),
                                  cgroup="/system.slice/myapp.service"),
        top_k=50,
        exited_expiry_seconds=90.0,
        growth=GrowthConfig(window_seconds=3600.0, for_seconds=1800.0, min_depth_increase=3,
                            min_family_anon_vmas_increase=256, min_orphaned_increase=2000,
                            min_host_anon_vmas_increase=50000),
        source=str(path),
    )
    assert cfg.listen_address() == ("::1", 9100)
    assert isinstance(cfg.selection.pids, tuple)
    assert type(cfg.growth.min_orphaned_increase) is int


@pytest.mark.parametrize("value", [
    "docs/runbooks.md", "../docs/runbooks.md", "/anontrace/runbooks.html",
    "https://docs.example.org/anontrace/runbooks.html", "http://wiki:8080/x?page=runbooks"])
def test_runbook_base_url_accepted(value: str) -> None:
    assert parse_config(f"runbook_base_url: '{value}'\n", "c").runbook_base_url == value
    assert parse_runbook_base_url(value) == value


def test_parse_config_matches_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert parse_config(FULL, str(path)) == load_config(path)


def test_comm_re_is_searched_and_cached() -> None:
    sel = SelectionConfig(comm="ava")
    pattern = sel.comm_re()
    assert pattern is not None and pattern.search("java")  # search, not fullmatch
    assert sel.comm_re() is pattern
    assert SelectionConfig(comm="ava").comm_re() is pattern


def test_config_error_is_an_anontrace_error() -> None:
    # The CLI turns AnontraceError into a one-line message.
    assert issubclass(ConfigError, AnontraceError)


# --- durations -------------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    (30, 30.0),
    (1.5, 1.5),
    ("500ms", 0.5),
    ("30s", 30.0),
    ("15m", 900.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("2m30s500ms", 150.5),
    ("1h1ms", 3600.001),
    ("1d", 86400.0),
    ("1w", 604800.0),
    ("1y", 365 * 86400.0),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", [
    0, -1, -0.5, "0s", "0", "", "30", "5 min", "1.5h", "30m1h", "1h1h", "30S", " 30s", "-5m",
    True, False, None, [30], math.inf, math.nan,
])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("text,seconds", [
    ("exited_expiry: 5m", 300.0),
    ("exited_expiry: 45", 45.0),
    ("exited_expiry: 0.25", 0.25),
    ("exited_expiry: 1h30m", 5400.0),
])
def test_durations_in_yaml(text: str, seconds: float) -> None:
    assert parse_config(text, "c.yaml").exited_expiry_seconds == seconds


# --- listen ----------------------------------------------------------------------

@pytest.mark.parametrize("value,address", [
    ("127.0.0.1:9966", ("127.0.0.1", 9966)),
    ("0.0.0.0:9966", ("0.0.0.0", 9966)),
    (":9966", ("", 9966)),
    ("[::1]:9966", ("::1", 9966)),
    ("[::]:1", ("::", 1)),
    ("[fe80::1%eth0]:9966", ("fe80::1%eth0", 9966)),
    ("localhost:65535", ("localhost", 65535)),
    ("metrics.example.com:80", ("metrics.example.com", 80)),
])
def test_parse_listen(value: str, address: tuple[str, int]) -> None:
    assert parse_listen(value) == address


@pytest.mark.parametrize("value,fragment", [
    ("9966", "expected host:port"),
    ("localhost", "expected host:port"),
    ("", "expected host:port"),
    ("127.0.0.1:", "port must be"),
    ("127.0.0.1:0", "port must be"),
    ("127.0.0.1:65536", "port must be"),
    ("127.0.0.1: 80", "port must be"),
    ("127.0.0.1:+80", "port must be"),
    ("127.0.0.1:http", "port must be"),
    ("::1:9966", "brackets"),
    ("::1", "brackets"),
    ("[::1]9966", "expected host:port"),
    ("[::1]:", "port must be"),
    ("[127.0.0.1]:80", "not an IPv6 address"),
    ("256.1.1.1:80", "not an IP address or host name"),
    ("bad host:80", "not an IP address or host name"),
    ("*:80", "not an IP address or host name"),
])
def test_parse_listen_rejects(value: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(value)
    assert fragment in str(info.value)
    assert repr(value) in str(info.value)


# --- errors name the file, the line and the key ---------------------------------

KNOWN_TOP = ("backend, exited_expiry, growth, listen, maps, rmap_interval, runbook_base_url, "
             "selection, top_k")

ERRORS = [
    # (YAML, line, key path, part of the problem)
    ("listen: 9966\n", 1, "listen", "got 9966"),
    ('listen: "127.0.0.1:0"\n', 1, "listen", "port must be a number from 1 to 65535"),
    ('listen: "::1:9966"\n', 1, "listen", "put an IPv6 address in brackets"),
    ("listen: [a]\n", 1, "listen", "got a list"),
    ("backend: kprobes\n", 1, "backend",
     "expected one of auto, fentry, kprobe, tracepoint, got 'kprobes'"),
    ("backend: [kprobe]\n", 1, "backend", "got a list"),
    ("top_k: 0\n", 1, "top_k", "expected an integer from 1 to 1000, got 0"),
    ("top_k: 1001\n", 1, "top_k", "got 1001"),
    ("top_k: true\n", 1, "top_k", "got true"),
    ('top_k: "20"\n', 1, "top_k", "got '20'"),
    ("top_k: 2.5\n", 1, "top_k", "got 2.5"),
    ("top_k:\n", 1, "top_k", "got null"),
    ("exited_expiry: 0\n", 1, "exited_expiry", "expected a positive duration"),
    ("exited_expiry: -5\n", 1, "exited_expiry", "expected a positive duration"),
    ("exited_expiry: -5m\n", 1, "exited_expiry", "got '-5m'"),
    ("exited_expiry: 5 minutes\n", 1, "exited_expiry", "expected a duration like"),
    ("exited_expiry: true\n", 1, "exited_expiry", "got true"),
    ("exited_expiry: {m: 5}\n", 1, "exited_expiry", "got a mapping"),
    ("selection: [comm]\n", 1, "selection", "expected a mapping, got a list"),
    ('top_k: 5\nselection:\n  comm: "(java"\n', 3, "selection.comm",
     "invalid regular expression '(java': missing ), unterminated subpattern"),
    ('selection:\n  comm: ""\n', 2, "selection.comm", "non-empty"),
    ("selection:\n  comm: 42\n", 2, "selection.comm", "got 42"),
    ("selection:\n  pids: [1234, abc]\n", 2, "selection.pids[1]",
     "expected a positive integer, got 'abc'"),
    ("selection:\n  pids:\n    - 1234\n    - 0\n", 4, "selection.pids[1]",
     "expected a positive integer, got 0"),
    ("selection:\n  pids: [-3]\n", 2, "selection.pids[0]", "got -3"),
    ("selection:\n  pids: [true]\n", 2, "selection.pids[0]", "got true"),
    ("selection:\n  pids: [4194305]\n", 2, "selection.pids[0]", "the kernel's limit"),
    ("selection:\n  pids: 1234\n", 2, "selection.pids", "expected a list of PIDs"),
    ("selection:\n  cgroup: system.slice/x.service\n", 2, "selection.cgroup",
     "starting with '/'"),
    ("selection:\n  cgroup: /sys/fs/cgroup/system.slice\n", 2, "selection.cgroup",
     "e.g. '/system.slice'"),
    ("selection:\n  cgroup: /a/../b\n", 2, "selection.cgroup", "without '.' or '..'"),
    ("selection:\n  cgroup: [/a]\n", 2, "selection.cgroup", "got a list"),
    ("growth: 5\n", 1, "growth", "expected a mapping, got 5"),
    ("growth:\n  window: 15 m\n", 2, "growth.window", "got '15 m'"),
    ("growth:\n  window: 15m\n  for: 0s\n", 3, "growth.for", "expected a positive duration"),
    ("growth:\n  min_depth_increase: 0\n", 2, "growth.min_depth_increase",
     "expected a positive integer, got 0"),
    ("growth:\n  min_orphaned_increase: 1000.0\n", 2, "growth.min_orphaned_increase",
     "got 1000.0"),
    ("growth:\n  min_host_anon_vmas_increase: yes\n", 2,
     "growth.min_host_anon_vmas_increase", "got yes"),
    ("growth:\n  min_family_anon_vmas_increase: '1000'\n", 2,
     "growth.min_family_anon_vmas_increase", "got '1000'"),
    ("runbook_base_url: docs/runbooks.md#top\n", 1, "runbook_base_url",
     "expected a URL without a '#' fragment"),
    ("runbook_base_url: ftp://host/runbooks.md\n", 1, "runbook_base_url",
     "expected an http(s) URL with a host"),
    ("runbook_base_url: 'https:///runbooks.md'\n", 1, "runbook_base_url",
     "expected an http(s) URL with a host"),
    ("runbook_base_url: ''\n", 1, "runbook_base_url", "got ''"),
    ("runbook_base_url: 'docs/run books.md'\n", 1, "runbook_base_url",
     "without spaces, control characters or braces"),
    ("runbook_base_url: [a]\n", 1, "runbook_base_url", "got a list"),
    ("runbook_base_url: 42\n", 1, "runbook_base_url", "got 42"),
    ("# comment\n\nselction:\n  comm: x\n", 3, "selction",
     f"unknown key (known: {KNOWN_TOP})"),
    ("growth:\n  window: 15m\n  windw: 5m\n", 3, "growth.windw",
     "unknown key (known: for, min_depth_increase, min_family_anon_vmas_increase, "
     "min_host_anon_vmas_increase, min_orphaned_increase, window)"),
    ("selection:\n  pid: [1]\n", 2, "selection.pid", "unknown key (known: cgroup, comm, pids)"),
    ("<<: {top_k: 5}\n", 1, "<<", "unknown key"),
    ("top_k: 5\nbackend: auto\ntop_k: 6\n", 3, "top_k", "duplicate key (first given on line 1)"),
    ("selection:\n  comm: a\n  comm: b\n", 3, "selection.comm",
     "duplicate key (first given on line 2)"),
    ("- listen\n", 1, "(top level)", "expected a mapping, got a list"),
    ("\n\njust text\n", 3, "(top level)", "expected a mapping, got 'just text'"),
    ("? [a]\n: 1\n", 1, "(top level)", "expected a key name, got a list"),
]


@pytest.mark.parametrize("text,line,key,problem", ERRORS,
                         ids=[f"{k}-{i}" for i, (_, _, k, _) in enumerate(ERRORS)])
def test_error_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str,
                                       problem: str) -> None:
    path = write(tmp_path, text, "bad.yaml")
    message = config_error(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert problem in message, message
    assert "\n" not in message


def test_error_uses_the_given_source_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("top_k: 5\nselection:\n  pids: [1234, abc]\n", "config.yaml")
    assert str(info.value) == (
        "config.yaml:3: selection.pids[1]: expected a positive integer, got 'abc'")


def test_error_has_no_chained_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "top_k: x\n"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- malformed YAML --------------------------------------------------------------

@pytest.mark.parametrize("text,line,problem", [
    ("top_k: 5\nbackend: auto\n  listen: x\n", 3, "mapping values are not allowed here"),
    ("top_k: 5\nselection:\n  comm: \"abc\n\n", 5, "while scanning a quoted scalar"),
    ("top_k: 5\nselection: [1, 2\nbackend: auto\n", 3, "expected ',' or ']'"),
    ("top_k: 5\n---\ntop_k: 6\n", 2, "expected a single document"),
    ("top_k: 5\nbackend: au\x07to\n", 2, "special characters are not allowed"),
])
def test_malformed_yaml_names_the_line(tmp_path: Path, text: str, line: int,
                                       problem: str) -> None:
    path = write(tmp_path, text, "broken.yaml")
    message = config_error(path)
    assert message.startswith(f"{path}:{line}: malformed YAML: "), message
    assert problem in message, message


# --- unreadable files ------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert message == f"{path}: cannot read config: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = config_error(tmp_path)
    assert message.startswith(f"{tmp_path}: cannot read config: ")
    assert "directory" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"selection:\n  comm: caf\xe9\n")
    message = config_error(path)
    assert message.startswith(f"{path}: cannot read config: not UTF-8 text")
