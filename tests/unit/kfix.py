"""Access to the kernel fixtures recorded by tests/fixtures/record_*.py.

A fixture that is missing fails the test (pytest.fail), never skips it:
re-record with the commands at the top of those scripts.
"""
from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

from tracer.format.events import Event, event_from_dict
from tracer.kernel.btf import Btf
from tracer.kernel.kernel_env import Kallsyms

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

#: kernel series -> what it is (docs/kernels.md "Kernels we test on")
SERIES = ("6.1", "6.12", "6.18")


def kernel_dir(series: str) -> Path:
    """tests/fixtures/<release> of the one recorded release of a series."""
    pat = re.compile(rf"^{re.escape(series)}[.+-]")
    dirs = sorted(d for d in FIXTURES.iterdir() if d.is_dir() and pat.match(d.name))
    if len(dirs) != 1:
        pytest.fail(f"expected exactly one fixture directory for kernel {series} under "
                    f"{FIXTURES}, found {[d.name for d in dirs]}; re-record with "
                    "tests/fixtures/record_kernel_facts.py")
    return dirs[0]


def _file(series: str, name: str) -> Path:
    p = kernel_dir(series) / name
    if not p.is_file():
        pytest.fail(f"fixture {p} is missing; re-record it (tests/fixtures/record_*.py)")
    return p


@cache
def btf_text(series: str) -> str:
    return _file(series, "btf.json").read_text()


def btf(series: str) -> Btf:
    return Btf.from_json(btf_text(series))


def btf_types(series: str) -> list[dict]:
    """A fresh, mutable copy of the recorded BTF types."""
    return json.loads(btf_text(series))["types"]


@cache
def kallsyms_text(series: str) -> str:
    return _file(series, "kallsyms.txt").read_text()


def kallsyms(series: str) -> Kallsyms:
    return Kallsyms(kallsyms_text(series))


def facts(series: str) -> dict:
    return json.loads(_file(series, "facts.json").read_text())


def text(series: str, name: str) -> str:
    return _file(series, name).read_text()


def events(series: str, backend: str) -> list[Event]:
    lines = _file(series, f"events-{backend}.jsonl").read_text().splitlines()
    return [event_from_dict(json.loads(ln)) for ln in lines if ln.strip()]


def event_dicts(series: str, backend: str) -> list[dict]:
    lines = _file(series, f"events-{backend}.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def events_meta(series: str, backend: str) -> dict:
    return json.loads(_file(series, f"events-{backend}.meta.json").read_text())
