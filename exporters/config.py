"""The YAML configuration of `anontrace serve`, as typed, validated data.

The dataclasses are plain data with their defaults; `parse_config` is the one
validation step. It walks the composed YAML nodes rather than loaded Python
objects because only nodes still know their line, so every error can read
``{source}:{line}: {key}: {problem}``, e.g.
``anontrace.yaml:7: selection.pids[1]: expected a positive integer, got 'abc'``.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tracer.errors import AnontraceError
from tracer.kernel.bpf_source import MapSizes

# Placeholder: another engineer will set the final value. Defaults and error
# messages derive from it; deploy/anontrace.yaml repeats it, and
# tests/unit/test_config.py checks that the two agree.
DEFAULT_PORT = 29100  # outside the 9100-9999 exporter range, which is fully allocated (README)
BACKENDS = ("auto", "fentry", "kprobe", "tracepoint")

TOP_K_MAX = 1000
# Where the runbook_url annotation of every alert points (`anontrace rules`):
# the runbooks' file in the repository, as a relative link. Operators set
# runbook_base_url (or --runbook-base-url) to where they publish
# docs/runbooks.md; each alert appends "#" and its anchor there.
DEFAULT_RUNBOOK_BASE_URL = "docs/runbooks.md"
# The kernel's PID_MAX_LIMIT on 64-bit; anything above it cannot be a PID,
# and BPF maps key PIDs as u32, so a huge number must not get that far.
PID_MAX = 4 * 1024 * 1024


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@dataclass(frozen=True)
class SelectionConfig:
    """Which processes to trace; the defaults trace every process."""

    # Python regex, matched with re.search against the process comm.
    comm: str | None = None
    # Traced in the kernel: these PIDs and their descendants only.
    pids: tuple[int, ...] = ()
    # cgroup v2 path from the cgroup2 root, e.g. "/system.slice/foo.service";
    # matches that cgroup and the ones below it.
    cgroup: str | None = None

    def comm_re(self) -> re.Pattern[str] | None:
        """The compiled `comm` regex, or None when no comm filter is set."""
        # Called per process seen; the cache keeps that a dict lookup.
        return None if self.comm is None else _compile(self.comm)


@dataclass(frozen=True)
class GrowthConfig:
    """The thresholds the shipped Prometheus growth alert rules are rendered with."""

    window_seconds: float = 900.0    # YAML key "window"
    for_seconds: float = 600.0       # YAML key "for"
    min_depth_increase: int = 5
    min_family_anon_vmas_increase: int = 1000
    min_orphaned_increase: int = 1000
    min_host_anon_vmas_increase: int = 20000


@dataclass(frozen=True)
class ServeConfig:
    """Everything `anontrace serve` reads from its config file."""

    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    backend: str = "auto"
    selection: SelectionConfig = SelectionConfig()
    top_k: int = 20                        # per-process and per-family series
    # YAML key "exited_expiry": how long an exited process stays eligible for top-K.
    exited_expiry_seconds: float = 300.0
    growth: GrowthConfig = GrowthConfig()
    maps: MapSizes = MapSizes()            # entries of the BPF state maps
    # YAML key "rmap_interval": seconds between rmap censuses (a walk of every
    # VMA's chain on the host, for the rmap width metrics); None: never.
    rmap_interval_seconds: float | None = 15.0
    # Base of the alerts' runbook_url annotations (`anontrace rules` only).
    runbook_base_url: str = DEFAULT_RUNBOOK_BASE_URL
    source: str = "<defaults>"             # the file it came from

    def listen_address(self) -> tuple[str, int]:
        """The (host, port) to bind; host "" means all interfaces."""
        return parse_listen(self.listen)


class ConfigError(AnontraceError):
    """The config file cannot be read or is invalid; the message locates the problem."""


# --- values shared by the config file and any command-line option ----------
# These raise ValueError with the problem only; callers add where it was.

_LISTEN_EXAMPLES = f"'127.0.0.1:{DEFAULT_PORT}', '[::1]:{DEFAULT_PORT}' or ':{DEFAULT_PORT}'"
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_listen(value: str) -> tuple[str, int]:
    """Split a listen address into (host, port).

    Accepts "HOST:PORT" with an IPv4 address or host name, "[IPV6]:PORT",
    and ":PORT" for all interfaces (host ""). Raises ValueError otherwise.
    """
    bad = f"expected host:port such as {_LISTEN_EXAMPLES}, got {value!r}"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(bad)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(bad)
        if ":" in host:
            # Without brackets the port cannot be told apart from the address.
            raise ValueError(f"put an IPv6 address in brackets, e.g. '[::1]:{DEFAULT_PORT}', "
                             f"got {value!r}")
        if host and not _valid_host(host):
            raise ValueError(f"{host!r} in {value!r} is not an IP address or host name")
    # int() alone would also take " 80", "+80" and non-ASCII digits.
    if not re.fullmatch(r"[0-9]+", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port!r} in {value!r}")
    return host, int(port)


def _valid_host(host: str) -> bool:
    if re.fullmatch(r"[0-9.]+", host):
        # All digits and dots is meant as IPv4, never a name to resolve.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _HOSTNAME.fullmatch(host) is not None


_RUNBOOK_EXAMPLES = (f"{DEFAULT_RUNBOOK_BASE_URL!r} or "
                     "'https://docs.example.org/anontrace/runbooks.html'")


def parse_runbook_base_url(value: str) -> str:
    """Check the base of the alerts' runbook_url annotations and return it.

    An http(s) URL with a host, or a relative reference such as
    "docs/runbooks.md"; the alert's anchor is appended after a "#", so the
    base has no fragment of its own. Whitespace, control characters and
    braces (annotations are Go templates) are refused. Raises ValueError.
    """
    if not value:
        raise ValueError(f"expected a URL such as {_RUNBOOK_EXAMPLES}, got ''")
    bad = [c for c in value if c.isspace() or not c.isprintable() or c in "{}"]
    if bad:
        raise ValueError(f"expected a URL without spaces, control characters or braces "
                         f"(percent-encode them), got {value!r}")
    if "#" in value:
        raise ValueError(f"expected a URL without a '#' fragment (each alert adds "
                         f"'#<anchor>'), got {value!r}")
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError as e:
        raise ValueError(f"invalid URL {value!r}: {e}") from None
    if parts.scheme and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ValueError(f"expected an http(s) URL with a host, or a relative link such as "
                         f"{DEFAULT_RUNBOOK_BASE_URL!r}, got {value!r}")
    return value


_DURATION_HINT = "a duration like '30s', '15m', '1h30m' or '500ms', or a number of seconds"
# Prometheus' duration syntax: integer amounts, units largest first, each at most once.
_DURATION = re.compile(r"(?:([0-9]+)y)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?"
                       r"(?:([0-9]+)m)?(?:([0-9]+)s)?(?:([0-9]+)ms)?")
# In milliseconds, so the sum stays exact and only the final division rounds.
_DURATION_UNITS_MS = (365 * 86400_000, 7 * 86400_000, 86400_000, 3600_000, 60_000, 1000, 1)


def parse_duration(value: Any) -> float:
    """Seconds in a positive duration.

    Ints and floats are seconds; strings use Prometheus' syntax ("30s",
    "15m", "1h30m", "500ms"; units y w d h m s ms). Raises ValueError for
    anything else, and for zero, negative or infinite durations, which no
    setting here can use.
    """
    if isinstance(value, bool):  # bool is an int subclass; `true` is no duration
        raise ValueError(f"expected {_DURATION_HINT}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value and (m := _DURATION.fullmatch(value)):
        amounts = zip(m.groups(), _DURATION_UNITS_MS, strict=True)
        ms = sum(int(n) * unit for n, unit in amounts if n)
        seconds = ms / 1000
    else:
        raise ValueError(f"expected {_DURATION_HINT}, got {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"expected a positive duration, got {value!r}")
    return seconds


# --- the validation step -------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"


class _Invalid(Exception):
    """A problem at a node; parse_config adds the source and line."""

    def __init__(self, node: Node, path: str, problem: str) -> None:
        super().__init__(problem)
        self.line = node.start_mark.line + 1
        self.path = path
        self.problem = problem


def _describe(node: Node) -> str:
    """The value as the user wrote it, for "got ..." (quotes mark a string)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _STR:
        return repr(node.value)
    if node.tag == _NULL:
        return "null"
    return str(node.value)


def _number(node: Node) -> Any:
    # safe_load's own conversion, so 0x10, 1_000 and .5 mean what they do there.
    return SafeConstructor().construct_object(node)


def _string(node: Node, path: str, what: str = "a string") -> str:
    if not (isinstance(node, ScalarNode) and node.tag == _STR):
        raise _Invalid(node, path, f"expected {what}, got {_describe(node)}")
    return node.value


def _int(node: Node, path: str, high: int | None = None) -> int:
    expected = "a positive integer" if high is None else f"an integer from 1 to {high}"
    # Only int-tagged scalars: "20" (quoted), 20.0 and true are mistakes here.
    if isinstance(node, ScalarNode) and node.tag == _INT:
        value = _number(node)
        if value >= 1 and (high is None or value <= high):
            return value
    raise _Invalid(node, path, f"expected {expected}, got {_describe(node)}")


def _positive_int(node: Node, path: str) -> int:
    return _int(node, path)


MAP_ENTRIES_MAX = 1 << 26


def _map_entries(node: Node, path: str) -> int:
    value = _int(node, path, MAP_ENTRIES_MAX)
    if value < 1024:
        raise _Invalid(node, path, f"expected at least 1024 entries, got {value}")
    return value


def _bool(node: Node, path: str) -> bool:
    if not (isinstance(node, ScalarNode) and node.tag == _BOOL):
        raise _Invalid(node, path, f"expected true or false, got {_describe(node)}")
    return bool(_number(node))


def _top_k(node: Node, path: str) -> int:
    return _int(node, path, TOP_K_MAX)


def _duration(node: Node, path: str) -> float:
    if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
        value: Any = _number(node)
    elif isinstance(node, ScalarNode) and node.tag == _STR:
        value = node.value
    else:
        raise _Invalid(node, path, f"expected {_DURATION_HINT}, got {_describe(node)}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Invalid(node, path, str(e)) from None


def _optional_duration(node: Node, path: str) -> float | None:
    return None if _is_null(node) else _duration(node, path)


def _listen(node: Node, path: str) -> str:
    # A bare [::1]:9966 is a YAML list, hence the hint to quote.
    value = _string(node, path, f"a quoted host:port such as {_LISTEN_EXAMPLES}")
    try:
        parse_listen(value)
    except ValueError as e:
        raise _Invalid(node, path, str(e)) from None
    return value


def _runbook_base_url(node: Node, path: str) -> str:
    value = _string(node, path, f"a URL such as {_RUNBOOK_EXAMPLES}")
    try:
        return parse_runbook_base_url(value)
    except ValueError as e:
        raise _Invalid(node, path, str(e)) from None


def _backend(node: Node, path: str) -> str:
    expected = "one of " + ", ".join(BACKENDS)
    value = _string(node, path, expected)
    if value not in BACKENDS:
        raise _Invalid(node, path, f"expected {expected}, got {value!r}")
    return value


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _comm(node: Node, path: str) -> str | None:
    if _is_null(node):
        return None
    value = _string(node, path, "a regular expression")
    if not value:
        # re.search("") matches every comm: surely not what was meant.
        raise _Invalid(node, path, "expected a non-empty regular expression, got ''")
    try:
        _compile(value)
    except re.error as e:
        raise _Invalid(node, path, f"invalid regular expression {value!r}: {e}") from None
    return value


def _pids(node: Node, path: str) -> tuple[int, ...]:
    if _is_null(node):  # "pids:" with every entry commented out
        return ()
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, path, f"expected a list of PIDs such as [1234, 5678], "
                                   f"got {_describe(node)}")
    return tuple(_pid(item, f"{path}[{i}]") for i, item in enumerate(node.value))


def _pid(node: Node, path: str) -> int:
    pid = _int(node, path)
    if pid > PID_MAX:
        raise _Invalid(node, path, f"expected a PID (at most {PID_MAX}, the kernel's limit), "
                                   f"got {_describe(node)}")
    return pid


def _cgroup(node: Node, path: str) -> str | None:
    if _is_null(node):
        return None
    value = _string(node, path, "a cgroup path such as '/system.slice/myapp.service'")
    if not value.startswith("/"):
        raise _Invalid(node, path, f"expected a path starting with '/' (from the cgroup2 "
                                   f"root), got {value!r}")
    if value.startswith("/sys/fs/cgroup"):
        # The path is below the cgroup2 mount; the mount path itself would match nothing.
        raise _Invalid(node, path, f"give the path below the cgroup2 mount, e.g. "
                                   f"{value[len('/sys/fs/cgroup'):] or '/'!r}, got {value!r}")
    if any(part in (".", "..") for part in value.split("/")):
        raise _Invalid(node, path, f"expected a path without '.' or '..', got {value!r}")
    return value


# YAML key -> (dataclass field, parser). The dataclasses hold the defaults,
# so keys left out simply are not passed.
_Parser = Callable[[Node, str], Any]
_SELECTION: dict[str, tuple[str, _Parser]] = {
    "comm": ("comm", _comm),
    "pids": ("pids", _pids),
    "cgroup": ("cgroup", _cgroup),
}
_GROWTH: dict[str, tuple[str, _Parser]] = {
    "window": ("window_seconds", _duration),
    "for": ("for_seconds", _duration),
    "min_depth_increase": ("min_depth_increase", _positive_int),
    "min_family_anon_vmas_increase": ("min_family_anon_vmas_increase", _positive_int),
    "min_orphaned_increase": ("min_orphaned_increase", _positive_int),
    "min_host_anon_vmas_increase": ("min_host_anon_vmas_increase", _positive_int),
}

_MAPS: dict[str, tuple[str, _Parser]] = {
    **{key: (key, _map_entries) for key in ("vmas", "anon_vmas", "mms", "processes", "families")},
    "preallocate": ("preallocate", _bool),
}

# Keys an earlier release took, with what to do now (an upgraded config then
# says why it fails, not just "unknown key").
_RETIRED = {
    "maps.mm_anon_vmas": ("no longer used: the per-process anon_vma figures are kept "
                          "in the anon_vmas map now; remove this key"),
}


def _section(cls: type, keys: dict[str, tuple[str, _Parser]]) -> _Parser:
    def parse(node: Node, path: str) -> Any:
        return cls(**_fields(node, path, keys))
    return parse


_SERVE: dict[str, tuple[str, _Parser]] = {
    "listen": ("listen", _listen),
    "backend": ("backend", _backend),
    "selection": ("selection", _section(SelectionConfig, _SELECTION)),
    "top_k": ("top_k", _top_k),
    "exited_expiry": ("exited_expiry_seconds", _duration),
    "growth": ("growth", _section(GrowthConfig, _GROWTH)),
    "maps": ("maps", _section(MapSizes, _MAPS)),
    "rmap_interval": ("rmap_interval_seconds", _optional_duration),
    "runbook_base_url": ("runbook_base_url", _runbook_base_url),
}


def _fields(node: Node, path: str, keys: dict[str, tuple[str, _Parser]]) -> dict[str, Any]:
    """Validate a mapping node against `keys`; returns dataclass field -> value."""
    if _is_null(node):  # "selection:" with every key commented out
        return {}
    where = path or "(top level)"
    if not isinstance(node, MappingNode):
        raise _Invalid(node, where, f"expected a mapping, got {_describe(node)}")
    out: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            raise _Invalid(key_node, where, f"expected a key name, got {_describe(key_node)}")
        name = key_node.value
        key_path = f"{path}.{name}" if path else name
        if key_path in _RETIRED:
            raise _Invalid(key_node, key_path, _RETIRED[key_path])
        if name not in keys:
            known = ", ".join(sorted(keys))
            raise _Invalid(key_node, key_path, f"unknown key (known: {known})")
        if name in first_line:
            # safe_load would silently keep the last one.
            raise _Invalid(key_node, key_path,
                           f"duplicate key (first given on line {first_line[name]})")
        first_line[name] = key_node.start_mark.line + 1
        attr, parse = keys[name]
        out[attr] = parse(value_node, key_path)
    return out


def compose_yaml(text: str, source: str) -> Node | None:
    """The YAML node tree of `text` (None when it holds no document); a
    syntax error is a ConfigError "{source}:{line}: malformed YAML: ..."."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = f"{e.context}, {e.problem}" if e.context else str(e.problem)
        raise ConfigError(f"{source}:{line}: malformed YAML: {problem}") from None
    except yaml.reader.ReaderError as e:
        # Reader errors carry a character offset instead of a mark.
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{source}:{line}: malformed YAML: {e.reason} "
                          f"(character #x{e.character:04x})") from None


def parse_config(text: str, source: str) -> ServeConfig:
    """Validate YAML text into a ServeConfig; `source` names it in errors.

    Every key is optional; empty text (or only comments) gives the defaults.
    Raises ConfigError "{source}:{line}: {key}: {problem}" at the first
    problem, or "{source}:{line}: malformed YAML: {problem}".
    """
    root = compose_yaml(text, source)
    if root is None:
        return ServeConfig(source=source)
    try:
        fields = _fields(root, "", _SERVE)
    except _Invalid as e:
        raise ConfigError(f"{source}:{e.line}: {e.path}: {e.problem}") from None
    return ServeConfig(**fields, source=source)


def load_config(path: str | os.PathLike[str] | None) -> ServeConfig:
    """Read and validate the config file at `path`; None gives the defaults.

    Raises ConfigError naming the file when it cannot be read or is invalid.
    """
    if path is None:
        return ServeConfig()
    source = os.fspath(path)
    return parse_config(read_text(source, "config"), source)


def read_text(source: str, what: str) -> str:
    """The text of a config file; ConfigError "{source}: cannot read {what}:
    ..." when it cannot be read or is not UTF-8."""
    try:
        # utf-8-sig: editors on some systems save a BOM.
        with open(source, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: cannot read {what}: not UTF-8 text "
                          f"({e.reason} at byte {e.start})") from None
