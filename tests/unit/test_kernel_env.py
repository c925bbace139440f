"""tracer.kernel.kernel_env: kallsyms ranges, lockdown, tracefs formats, slab sizes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.unit import kfix
from tracer.kernel.kernel_env import (
    Kallsyms,
    KernelEnv,
    KernelEnvError,
    preempt_model,
    preempt_model_from_config,
    read_lockdown,
    slab_object_size,
    tracepoint_fields,
    tracepoint_format,
)
from tracer.kernel.probes import KMEM_SITES

SAMPLE = """\
ffffffff81000000 T _stext
ffffffff81001000 t static_helper
ffffffff81001100 T anon_vma_fork
ffffffff81001200 D some_data
ffffffff81001300 T next_function
ffffffff81001400 t static_helper
ffffffffc0000000 t module_fn\t[some_module]
ffffffff81001500 W weak_fn
garbage line
zzzzzzzzzzzzzzzz T not_hex
"""


def test_ranges_end_at_next_text_symbol() -> None:
    ks = Kallsyms(SAMPLE)
    sym = ks.get("anon_vma_fork")
    assert sym is not None
    # the data symbol in between is not text: the range runs to next_function
    assert (sym.start, sym.end) == (0xffffffff81001100, 0xffffffff81001300)
    assert ks.get("weak_fn") is not None  # W counts as text
    assert ks.get("weak_fn").end == ks.get("weak_fn").start + 1  # last symbol


def test_non_text_module_and_garbage_lines_ignored() -> None:
    ks = Kallsyms(SAMPLE)
    assert "some_data" not in ks
    assert "module_fn" not in ks
    assert "not_hex" not in ks
    assert not ks.hidden


def test_static_duplicates_keep_lowest_address() -> None:
    ks = Kallsyms(SAMPLE)
    assert ks.get("static_helper").start == 0xffffffff81001000


@pytest.mark.parametrize("addr,name", [
    (0xffffffff81001100, "anon_vma_fork"),
    (0xffffffff810012ff, "anon_vma_fork"),
    (0xffffffff81001300, "next_function"),
    (0xffffffff81000fff, "_stext"),
    (0xffffffff80000000, None),
])
def test_lookup(addr: int, name: str | None) -> None:
    assert Kallsyms(SAMPLE).lookup(addr) == name


def test_hidden_addresses_detected() -> None:
    ks = Kallsyms("0000000000000000 T anon_vma_fork\n0000000000000000 T unlink_anon_vmas\n")
    assert ks.hidden
    assert not Kallsyms("").hidden


@pytest.mark.parametrize("series", kfix.SERIES)
def test_recorded_call_sites_resolve(series: str) -> None:
    """Every kmem call site is in each recorded kernel, and an address inside
    it (a call_site) resolves back to it, the end being exclusive."""
    ks = kfix.kallsyms(series)
    assert not ks.hidden
    for fn in KMEM_SITES.values():
        sym = ks.get(fn)
        assert sym is not None, (series, fn)
        assert sym.end > sym.start
        assert ks.lookup(sym.start) == fn
        assert ks.lookup(sym.start + (sym.end - sym.start) // 2) == fn
        assert ks.lookup(sym.end - 1) == fn
        assert ks.lookup(sym.end) != fn
    assert "bpf_ringbuf_output" in ks


def test_recorded_618_ranges_end_at_pfx_padding() -> None:
    """6.18 has __pfx_ padding symbols: anon_vma_clone ends where
    __pfx_anon_vma_fork starts (docs/kernels.md: the call-site ranges)."""
    ks = kfix.kallsyms("6.18")
    assert ks.get("anon_vma_clone").end == ks.get("__pfx_anon_vma_fork").start
    assert ks.get("anon_vma_fork").end - ks.get("anon_vma_fork").start < 0x1000


def test_kallsyms_read_error(tmp_path: Path) -> None:
    env = KernelEnv(kallsyms=tmp_path / "missing")
    with pytest.raises(KernelEnvError, match="cannot read"):
        Kallsyms.read(env)
    (tmp_path / "ks").write_text(kfix.kallsyms_text("6.1"))
    assert "anon_vma_fork" in Kallsyms.read(KernelEnv(kallsyms=tmp_path / "ks"))


@pytest.mark.parametrize("text,mode", [
    ("none [integrity] confidentiality\n", "integrity"),
    ("[none] integrity confidentiality\n", "none"),
    ("none integrity [confidentiality]", "confidentiality"),
    ("garbage\n", "unknown"),
])
def test_read_lockdown(tmp_path: Path, text: str, mode: str) -> None:
    (tmp_path / "lockdown").write_text(text)
    assert read_lockdown(KernelEnv(lockdown=tmp_path / "lockdown")) == mode


def test_read_lockdown_absent(tmp_path: Path) -> None:
    assert read_lockdown(KernelEnv(lockdown=tmp_path / "nope")) == "unknown"


def test_tracepoint_format_from_tracefs(tmp_path: Path) -> None:
    d = tmp_path / "events" / "kmem" / "kmem_cache_free"
    d.mkdir(parents=True)
    (d / "format").write_text(kfix.text("6.18", "kmem_free_format.txt"))
    env = KernelEnv(tracefs=tmp_path)
    fmt = tracepoint_format(env, "kmem", "kmem_cache_free")
    assert fmt is not None and "call_site" in fmt
    assert tracepoint_format(env, "kmem", "kmem_cache_alloc") is None


@pytest.mark.parametrize("series", kfix.SERIES)
def test_kmem_free_fields(series: str) -> None:
    fields = tracepoint_fields(kfix.text(series, "kmem_free_format.txt"))
    # the cache name is in kmem_cache_free since v5.12
    assert {"call_site", "ptr", "name", "common_pid"} <= fields
    assert "format" not in fields and "ID" not in fields


@pytest.mark.parametrize("series,has_name", [("6.1", False), ("6.12", False), ("6.18", True)])
def test_kmem_alloc_fields(series: str, has_name: bool) -> None:
    fields = tracepoint_fields(kfix.text(series, "kmem_alloc_format.txt"))
    assert {"call_site", "ptr", "bytes_alloc", "gfp_flags"} <= fields
    assert ("name" in fields) is has_name
    assert fields == set(kfix.facts(series)["kmem_fields"]["kmem_cache_alloc"])


def test_tracepoint_fields_shapes() -> None:
    fmt = ("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n"
           "\tfield:const void * ptr;\toffset:24;\tsize:8;\tsigned:0;\n"
           "\tfield:__data_loc char[] name;\toffset:32;\tsize:4;\tsigned:0;\n"
           "\tfield:unsigned long call_site;\toffset:40;\tsize:8;\tsigned:0;\n"
           "print fmt: \"x=%d\", REC->bogus\n")
    assert tracepoint_fields(fmt) == {"comm", "ptr", "name", "call_site"}
    assert tracepoint_fields("") == set()


def test_slab_object_size_sysfs(tmp_path: Path) -> None:
    (tmp_path / "slab" / "anon_vma").mkdir(parents=True)
    (tmp_path / "slab" / "anon_vma" / "slab_size").write_text("104\n")
    env = KernelEnv(slab_sysfs=tmp_path / "slab", slabinfo=tmp_path / "nope")
    assert slab_object_size(env, "anon_vma") == 104
    assert slab_object_size(env, "anon_vma_chain") is None


def test_slab_object_size_slabinfo_fallback(tmp_path: Path) -> None:
    (tmp_path / "slabinfo").write_text(
        "slabinfo - version: 2.1\n"
        "# name            <active_objs> <num_objs> <objsize> <objperslab> ...\n"
        "anon_vma_chain      1408   1408     64   64    1 : tunables 0 0 0\n"
        "anon_vma             897    897    104   39    1 : tunables 0 0 0\n")
    env = KernelEnv(slab_sysfs=tmp_path / "noslab", slabinfo=tmp_path / "slabinfo")
    assert slab_object_size(env, "anon_vma") == 104
    assert slab_object_size(env, "anon_vma_chain") == 64
    assert slab_object_size(env, "anon") is None


def test_slab_object_size_garbage(tmp_path: Path) -> None:
    (tmp_path / "slab" / "anon_vma").mkdir(parents=True)
    (tmp_path / "slab" / "anon_vma" / "slab_size").write_text("lots\n")
    (tmp_path / "slabinfo").write_text("anon_vma 1 2 x 4\n")
    env = KernelEnv(slab_sysfs=tmp_path / "slab", slabinfo=tmp_path / "slabinfo")
    assert slab_object_size(env, "anon_vma") is None


@pytest.mark.parametrize("series", kfix.SERIES)
def test_recorded_slab_sizes(series: str) -> None:
    f = kfix.facts(series)
    assert f["release"] == kfix.kernel_dir(series).name
    assert f["slab_sizes"] == {"anon_vma": 104, "anon_vma_chain": 64}
    assert f["kprobe_events"] is (series != "6.18")


def test_preempt_model_from_the_build_where_debugfs_is_closed(tmp_path: Path) -> None:
    import gzip

    # The host's configuration (6.18, lockdown closes debugfs): dynamic
    # preemption built with none as the default.
    host = ("CONFIG_PREEMPT_BUILD=y\nCONFIG_PREEMPT_NONE=y\n# CONFIG_PREEMPT is not set\n"
            "CONFIG_PREEMPTION=y\nCONFIG_PREEMPT_DYNAMIC=y\n")
    assert preempt_model_from_config(host, "console=ttyS0 quiet") == "(none)"
    assert preempt_model_from_config(host, "quiet preempt=full") == "(full)"
    assert preempt_model_from_config(host, "preempt=lazy") == "(lazy)"
    # Without dynamic preemption the build decides.
    fixed = "CONFIG_PREEMPT_VOLUNTARY=y\n"
    assert preempt_model_from_config(fixed, "preempt=full") == "(voluntary)"
    assert preempt_model_from_config("CONFIG_PREEMPT_LAZY=y\nCONFIG_PREEMPT_DYNAMIC=y\n",
                                     "") == "(lazy)"
    assert preempt_model_from_config("CONFIG_PREEMPT_RT=y\nCONFIG_PREEMPT_DYNAMIC=y\n",
                                     "preempt=none") == "(full)"
    assert preempt_model_from_config("CONFIG_SMP=y\n", "") is None
    # The file first, then /proc/config.gz, then /boot, then nothing.
    env = KernelEnv(release="9.9", sched_preempt=tmp_path / "none",
                    proc_config=tmp_path / "config.gz", boot=tmp_path,
                    cmdline=tmp_path / "cmdline")
    assert preempt_model(env) is None
    (tmp_path / "config-9.9").write_text(fixed)
    assert preempt_model(env) == "(voluntary)"
    (tmp_path / "config.gz").write_bytes(gzip.compress(host.encode()))
    (tmp_path / "cmdline").write_text("root=/dev/vda preempt=full\n")
    assert preempt_model(env) == "(full)"
    (tmp_path / "preempt").write_text("none voluntary full (lazy)\n")
    assert preempt_model(dataclasses.replace(env, sched_preempt=tmp_path / "preempt")) == \
        "none voluntary full (lazy)\n"
