"""tracer.kernel.bpf_source.cflags: the -D flags each backend compiles with."""
from __future__ import annotations

import pytest

from tests.unit import kfix
from tests.unit.test_probes import _three_arg_clone
from tracer.kernel.bpf_source import (
    BPF_DIR,
    MAIN_PROGRAM,
    RECYCLE_MAX,
    BuildOptions,
    MapSizes,
    cflags,
    recycle_slots,
)
from tracer.kernel.layout import read_layout
from tracer.kernel.probes import plan_backend


def defines(series: str, backend: str, opts: BuildOptions | None = None,
            kprobes: bool = True, btf=None) -> dict[str, str | None]:
    b = btf or kfix.btf(series)
    plan = plan_backend(backend, kfix.kallsyms(series), b, kprobes)
    flags = cflags(plan, read_layout(b), opts or BuildOptions())
    out: dict[str, str | None] = {}
    assert flags[0] == f"-I{BPF_DIR}"  # anontrace_common.h
    for f in flags[1:]:
        assert f.startswith("-D"), f
        k, sep, v = f[2:].partition("=")
        assert k not in out, f"{k} defined twice"
        out[k] = v if sep else None
    return out


@pytest.mark.parametrize("series", kfix.SERIES)
def test_tracepoint_defines(series: str) -> None:
    d = defines(series, "tracepoint")
    assert "DERIVE_FROM_KMEM" in d and d["DERIVE_FROM_KMEM"] is None
    assert (d["FORK_METHOD"], d["CLONE_METHOD"], d["UNLINK_METHOD"]) == ("3", "3", "3")
    assert d["RMAP_METHOD"] == "0"
    assert not any(k.startswith("RMAP_") and k != "RMAP_METHOD" for k in d)


@pytest.mark.parametrize("series", ["6.1", "6.12"])
@pytest.mark.parametrize("backend,code", [("fentry", "1"), ("kprobe", "2")])
def test_function_backend_defines(series: str, backend: str, code: str) -> None:
    d = defines(series, backend)
    assert "DERIVE_FROM_KMEM" not in d
    for m in ("FORK_METHOD", "CLONE_METHOD", "UNLINK_METHOD", "RMAP_METHOD"):
        assert d[m] == code, m
    assert d["CLONE_NARGS"] == "2"


@pytest.mark.parametrize("series,func", [("6.1", "__page_set_anon_rmap"),
                                         ("6.12", "folio_add_new_anon_rmap")])
def test_rmap_fentry_args_shape(series: str, func: str) -> None:
    d = defines(series, "fentry")
    assert d["RMAP_FUNC"] == func
    # four u64 arguments: (page|folio, vma, address, exclusive|flags)
    assert d["RMAP_FENTRY_ARGS"] == "u64 a0, u64 a1, u64 a2, u64 a3"
    assert (d["RMAP_PAGE"], d["RMAP_VMA"], d["RMAP_ADDR"]) == ("a0", "a1", "a2")
    assert (d["RMAP_PAGE_IDX"], d["RMAP_VMA_IDX"], d["RMAP_ADDR_IDX"]) == ("0", "1", "2")


def test_kprobe_unavailable_zero_methods() -> None:
    d = defines("6.18", "kprobe", kprobes=False)
    for m in ("FORK_METHOD", "CLONE_METHOD", "UNLINK_METHOD", "RMAP_METHOD"):
        assert d[m] == "0"
    assert "RMAP_FUNC" not in d


def test_offsets_and_sites_from_the_kernel() -> None:
    d = defines("6.18", "tracepoint")
    assert d["OFF_AV_PARENT"] == "72"
    assert d["OFF_AV_NUM_CHILDREN"] == "56" and d["OFF_AV_NUM_ACTIVE_VMAS"] == "64"
    ks = kfix.kallsyms("6.18")
    fork = ks.get("anon_vma_fork")
    assert d["SITE_FORK_START"] == f"{fork.start:#x}ULL"
    assert d["SITE_FORK_END"] == f"{fork.end:#x}ULL"
    for key in ("FORK", "CLONE", "PREPARE", "UNLINK", "PUT"):
        assert int(d[f"SITE_{key}_START"][:-3], 16) < int(d[f"SITE_{key}_END"][:-3], 16)
    # no out-of-line anon_vma_alloc & co. on these kernels
    assert "SITE_OTHER_START" not in d


def test_other_site_when_out_of_line_helper_exists() -> None:
    text = kfix.kallsyms_text("6.18") + ("ffffffff81700000 t anon_vma_chain_alloc\n"
                                         "ffffffff81700080 t next_one\n")
    from tracer.kernel.kernel_env import Kallsyms
    plan = plan_backend("tracepoint", Kallsyms(text), kfix.btf("6.18"), False)
    flags = cflags(plan, read_layout(kfix.btf("6.18")), BuildOptions())
    assert "-DSITE_OTHER_START=0xffffffff81700000ULL" in flags
    assert "-DSITE_OTHER_END=0xffffffff81700080ULL" in flags


def test_missing_site_gets_empty_range() -> None:
    from tracer.kernel.kernel_env import Kallsyms
    text = "\n".join(ln for ln in kfix.kallsyms_text("6.18").splitlines()
                     if not ln.endswith(" __put_anon_vma"))
    plan = plan_backend("tracepoint", Kallsyms(text), kfix.btf("6.18"), False)
    flags = cflags(plan, read_layout(kfix.btf("6.18")), BuildOptions())
    assert "-DSITE_PUT_START=1ULL" in flags and "-DSITE_PUT_END=0ULL" in flags


@pytest.mark.parametrize("pids,follow,want_filter,want_follow", [
    (False, True, False, False),
    (True, True, True, True),
    (True, False, True, False),
    (False, False, False, False),
])
def test_filter_defines(pids: bool, follow: bool, want_filter: bool, want_follow: bool) -> None:
    d = defines("6.1", "kprobe", BuildOptions(filter_pids=pids, follow_children=follow))
    assert ("FILTER_ENABLED" in d) is want_filter
    assert ("FOLLOW_CHILDREN" in d) is want_follow
    assert d["FILTER_MAX"] == "65536"


def test_transport_and_sizes() -> None:
    d = defines("6.18", "tracepoint", BuildOptions(ringbuf=True, ringbuf_pages=64,
                                                   av_slab_size=104, avc_slab_size=64,
                                                   kmem_free_has_name=True, max_depth=7,
                                                   max_chain=9))
    assert "USE_RINGBUF" in d and d["RINGBUF_PAGES"] == "64"
    assert (d["AV_SLAB_SIZE"], d["AVC_SLAB_SIZE"]) == ("104", "64")
    assert "KMEM_FREE_HAS_NAME" in d
    assert (d["MAX_DEPTH"], d["MAX_CHAIN"]) == ("7", "9")
    perf = defines("6.18", "tracepoint", BuildOptions(ringbuf=False))
    assert "USE_RINGBUF" not in perf and "RINGBUF_PAGES" not in perf
    assert "KMEM_FREE_HAS_NAME" not in perf


def test_degree_layout_adds_define() -> None:
    from tests.unit.test_btf_layout import _degree_era
    from tracer.kernel.btf import Btf
    b = Btf(_degree_era("6.18"))
    d = defines("6.18", "tracepoint", btf=b)
    assert "AV_HAS_DEGREE" in d and d["OFF_AV_DEGREE"] == "56"


def test_three_arg_clone_define() -> None:
    d = defines("6.18", "fentry", btf=_three_arg_clone("6.18"))
    assert d["CLONE_NARGS"] == "3"


def test_flags_are_sorted_and_program_exists() -> None:
    flags = cflags(plan_backend("tracepoint", kfix.kallsyms("6.18"), kfix.btf("6.18"), False),
                   read_layout(kfix.btf("6.18")), BuildOptions())
    names = [f[2:].split("=")[0] for f in flags if f.startswith("-D")]
    assert names == sorted(names)
    assert MAIN_PROGRAM.is_file()
    src = MAIN_PROGRAM.read_text()
    # every OFF_/SZ_/SITE_ macro the program uses is defined, except the
    # optional ones it guards with #ifdef
    import re
    used = set(re.findall(r"\b(?:OFF|SITE|SZ)_[A-Z_]+\b", src))
    optional = {"OFF_AV_DEGREE", "SZ_AV_DEGREE", "SITE_OTHER_START", "SITE_OTHER_END"}
    assert "OFF_AV_PARENT" in used
    assert used - optional <= set(names), sorted(used - optional - set(names))


def test_task_storage_define_follows_the_feature() -> None:
    assert "HAVE_TASK_STORAGE" in defines("6.18", "tracepoint", BuildOptions(task_storage=True))
    assert "HAVE_TASK_STORAGE" not in defines("6.18", "tracepoint", BuildOptions())


def test_state_maps_preallocated_when_the_kernel_needs_it_or_the_config_asks() -> None:
    from tracer.kernel.bpf_source import MapSizes

    def flags(prealloc: bool, preallocate: bool) -> str | None:
        return defines("6.18", "tracepoint", BuildOptions(
            state=True, prealloc=prealloc, map_sizes=MapSizes(preallocate=preallocate)))[
                "ST_MAP_FLAGS"]
    assert flags(prealloc=False, preallocate=False) == "1"   # BPF_F_NO_PREALLOC
    assert flags(prealloc=True, preallocate=False) == "0"    # the kernel needs it
    assert flags(prealloc=False, preallocate=True) == "0"    # the config asks


def test_tracepoint_copies_where_asked_with_task_storage() -> None:
    from tracer.kernel.bpf_source import tracepoint_copies

    on = BuildOptions(kmem_raw=(2, 2), tp_again=True, task_storage=True)
    assert tracepoint_copies(on) and "TP_AGAIN" in defines("6.18", "tracepoint", on)
    for off in (BuildOptions(tp_again=True), BuildOptions(task_storage=True)):
        assert not tracepoint_copies(off) and "TP_AGAIN" not in defines("6.18", "tracepoint", off)


def test_every_copied_tracepoint_has_its_copy_in_the_program() -> None:
    # The loader attaches tp_again__<tracepoint> where the object has it.
    from tracer.kernel.bpf_source import COPIED_TRACEPOINTS

    text = MAIN_PROGRAM.read_text()
    for tp in COPIED_TRACEPOINTS:
        assert f"TP_PROGRAMS({tp}, " in text, tp
    assert "int tp_again__##tp(" in text
    from tracer.kernel.bpf_source import COPY_SLOTS
    assert f"#define TPI_NR {COPY_SLOTS}\n" in text


def test_recycle_rings_are_a_power_of_two_bounded_by_the_smaller_map() -> None:
    # The default map: the cap, whatever the host's CPUs (up to where a
    # sixteenth of the map is less than the cap on every CPU).
    assert recycle_slots(MapSizes(), cpus=2) == RECYCLE_MAX
    assert recycle_slots(MapSizes(), cpus=64) == 1024
    # A small map (the map-full tests): tombstones stay a sixteenth of it.
    small = MapSizes(vmas=4096)
    assert recycle_slots(small, cpus=2) == 128
    assert 2 * recycle_slots(small, cpus=2) <= 4096 // 16
    # The rings of st_vma and st_av have one size, from the smaller map.
    assert recycle_slots(MapSizes(anon_vmas=4096), cpus=2) == 128
    assert recycle_slots(MapSizes(vmas=8192, anon_vmas=65536), cpus=2) == 256
    # A map too small for that still gets the minimum ring.
    assert recycle_slots(MapSizes(vmas=64), cpus=4) == 16
    for cpus in (1, 3, 6, 96):
        n = recycle_slots(MapSizes(vmas=1_000_000), cpus=cpus)
        assert n & (n - 1) == 0 and 16 <= n <= RECYCLE_MAX
    d = defines("6.12", "tracepoint", BuildOptions(state=True, map_sizes=small))
    assert d["ST_RECYCLE"] == str(recycle_slots(small))
    assert "ST_RECYCLE" not in defines("6.12", "tracepoint")
