"""tracer.kernel.probes.plan_backend on the facts of each recorded kernel."""
from __future__ import annotations

import copy

import pytest

from tests.unit import kfix
from tracer.kernel.btf import Btf, BtfError
from tracer.kernel.compat import RMAP_CANDIDATES
from tracer.kernel.kernel_env import Kallsyms
from tracer.kernel.probes import (
    BACKENDS,
    KMEM_SITES,
    LOGICAL_PROBES,
    Plan,
    RmapArgs,
    kmem_sites,
    plan_backend,
    rmap_args,
)

CORE = LOGICAL_PROBES[:3]
EXPECTED_METHODS = {
    "fentry": {"anon_vma_fork": "fexit", "anon_vma_clone": "fexit",
               "unlink_anon_vmas": "fentry", "page_set_anon_rmap": "fentry"},
    "kprobe": {"anon_vma_fork": "kretprobe", "anon_vma_clone": "kretprobe",
               "unlink_anon_vmas": "kprobe", "page_set_anon_rmap": "kprobe"},
}
# docs/kernels.md "Attach points": which page_set_anon_rmap candidate each kernel has.
RMAP_FUNCTION = {
    "6.1": RmapArgs("__page_set_anon_rmap", nargs=4, vma=1, page=0, addr=2),
    "6.12": RmapArgs("folio_add_new_anon_rmap", nargs=4, vma=1, page=0, addr=2),
    "6.18": RmapArgs("folio_add_new_anon_rmap", nargs=4, vma=1, page=0, addr=2),
}


def plan(series: str, backend: str, kprobes: bool | None = None) -> Plan:
    if kprobes is None:
        kprobes = kfix.facts(series)["kprobe_events"]
    return plan_backend(backend, kfix.kallsyms(series), kfix.btf(series), kprobes)


@pytest.mark.parametrize("series", ["6.1", "6.12"])
@pytest.mark.parametrize("backend", ["fentry", "kprobe"])
def test_function_backends_on_debian_kernels(series: str, backend: str) -> None:
    p = plan(series, backend)
    assert p.usable and p.errors == []
    for probe, method in EXPECTED_METHODS[backend].items():
        c = p.probes[probe]
        assert c.ok and c.method == method and c.reason is None, (probe, c)
    for probe in CORE:
        assert p.probes[probe].function == probe
    assert p.rmap == RMAP_FUNCTION[series]
    assert p.probes["page_set_anon_rmap"].function == RMAP_FUNCTION[series].function
    assert p.clone_nargs == 2


def test_61_picks_static_page_set_anon_rmap() -> None:
    c = plan("6.1", "kprobe").probes["page_set_anon_rmap"]
    assert c.function == "__page_set_anon_rmap"
    assert c.note is None  # sees every page, not only new private ones


@pytest.mark.parametrize("series", ["6.12", "6.18"])
def test_folio_kernels_fall_back_to_new_anon_rmap(series: str) -> None:
    """__page_set_anon_rmap is gone and __folio_set_anon is inlined (not in kallsyms)."""
    c = plan(series, "fentry").probes["page_set_anon_rmap"]
    assert c.function == "folio_add_new_anon_rmap"
    assert c.note and "new private pages only" in c.note
    assert "__folio_set_anon" not in kfix.kallsyms(series)


@pytest.mark.parametrize("series", kfix.SERIES)
def test_tracepoint_backend(series: str) -> None:
    p = plan(series, "tracepoint")
    assert p.usable and p.errors == []
    for probe in CORE:
        c = p.probes[probe]
        assert (c.function, c.method) == ("kmem:kmem_cache_alloc/free", "tracepoint")
        assert probe in c.note
    rmap = p.probes["page_set_anon_rmap"]
    assert not rmap.ok and rmap.function is None and p.rmap is None
    assert "no tracepoint marks a page joining an anon_vma" in rmap.reason
    assert all(fn in rmap.reason for fn in RMAP_CANDIDATES)
    assert set(p.sites) == set(KMEM_SITES)
    for key, fn in KMEM_SITES.items():
        assert p.sites[key] == kfix.kallsyms(series).get(fn)


def test_618_kprobe_unavailable_gives_reasons() -> None:
    assert kfix.facts("6.18")["kprobe_events"] is False
    p = plan("6.18", "kprobe")
    assert not p.usable
    for probe in LOGICAL_PROBES:
        c = p.probes[probe]
        assert not c.ok and c.function is None
        assert "kprobes unavailable" in c.reason


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_kprobe_unavailable_on_debian_kernel(series: str) -> None:
    p = plan(series, "kprobe", kprobes=False)
    assert not p.usable
    assert all("kprobes unavailable" in c.reason for c in p.probes.values())
    # fentry does not need kprobes
    assert plan(series, "fentry", kprobes=False).usable


def test_618_fentry_plans_from_features() -> None:
    """The plan is feature-based: 6.18 has BTF and the functions, so fentry
    is planned; the refusal (EPERM) only shows at load time."""
    p = plan("6.18", "fentry")
    assert p.usable
    assert p.rmap == RMAP_FUNCTION["6.18"]


def test_fentry_needs_btf_prototype() -> None:
    p = plan_backend("fentry", kfix.kallsyms("6.12"), None, True)
    assert not p.usable
    for probe in CORE:
        assert "no BTF prototype" in p.probes[probe].reason
    assert "no BTF to locate its arguments" in p.probes["page_set_anon_rmap"].reason
    assert p.clone_nargs == 2


def test_kprobe_without_btf_core_ok_rmap_not() -> None:
    p = plan_backend("kprobe", kfix.kallsyms("6.1"), None, True)
    assert p.usable
    assert not p.probes["page_set_anon_rmap"].ok


def test_function_not_in_kallsyms() -> None:
    lines = [ln for ln in kfix.kallsyms_text("6.12").splitlines()
             if not ln.endswith(" anon_vma_clone")]
    p = plan_backend("kprobe", Kallsyms("\n".join(lines)), kfix.btf("6.12"), True)
    assert not p.usable
    assert p.probes["anon_vma_clone"].reason == "anon_vma_clone is not in kallsyms"
    assert any("anon_vma_clone" in e for e in p.errors)  # also a kmem site
    tp = plan_backend("tracepoint", Kallsyms("\n".join(lines)), kfix.btf("6.12"), True)
    assert not tp.usable
    assert "kmem call sites missing: anon_vma_clone" == tp.probes["anon_vma_fork"].reason


def test_no_rmap_candidate_lists_every_attempt() -> None:
    lines = [ln for ln in kfix.kallsyms_text("6.12").splitlines()
             if ln.split()[2] not in RMAP_CANDIDATES]
    c = plan_backend("fentry", Kallsyms("\n".join(lines)), kfix.btf("6.12"),
                     True).probes["page_set_anon_rmap"]
    assert not c.ok
    for fn in RMAP_CANDIDATES:
        assert f"{fn}: not in kallsyms" in c.reason


def test_hidden_kallsyms_reported() -> None:
    text = "".join(f"0000000000000000 T {fn}\n" for fn in KMEM_SITES.values())
    p = plan_backend("tracepoint", Kallsyms(text), kfix.btf("6.12"), False)
    assert any("hidden" in e for e in p.errors)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend 'ebpf'"):
        plan_backend("ebpf", kfix.kallsyms("6.1"), kfix.btf("6.1"), True)
    assert BACKENDS == ("fentry", "kprobe", "tracepoint")


def test_kmem_sites_missing() -> None:
    sites, missing = kmem_sites(Kallsyms("ffffffff81000000 T anon_vma_fork\n"
                                         "ffffffff81000100 T x\n"))
    assert set(sites) == {"FORK"} and sites["FORK"].end == 0xffffffff81000100
    assert missing == ["anon_vma_clone", "__anon_vma_prepare", "unlink_anon_vmas",
                       "__put_anon_vma"]


def _three_arg_clone(series: str) -> Btf:
    """7.0's anon_vma_clone(dst, src, enum vma_operation), grafted onto a real BTF."""
    types = kfix.btf_types(series)
    by_id = {t["id"]: t for t in types}
    func = next(t for t in types if t["kind"] == "FUNC" and t["name"] == "anon_vma_clone")
    proto = copy.deepcopy(by_id[func["type_id"]])
    new_id = max(by_id) + 1
    enum = {"id": new_id, "kind": "ENUM", "name": "vma_operation", "size": 4, "vlen": 0,
            "values": []}
    proto["id"] = new_id + 1
    proto["params"] = proto["params"] + [{"name": "operation", "type_id": new_id}]
    proto["vlen"] = len(proto["params"])
    func["type_id"] = proto["id"]
    return Btf(types + [enum, proto])


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_arg_anon_vma_clone(backend: str) -> None:
    b = _three_arg_clone("6.18")
    assert [p.type_name for p in b.func_params("anon_vma_clone")][-1] == "enum vma_operation"
    p = plan_backend(backend, kfix.kallsyms("6.18"), b, True)
    assert p.clone_nargs == 3
    assert plan_backend(backend, kfix.kallsyms("6.18"), kfix.btf("6.18"), True).clone_nargs == 2


@pytest.mark.parametrize("series,function", [
    ("6.1", "__page_set_anon_rmap"), ("6.1", "page_add_new_anon_rmap"),
    ("6.12", "folio_add_new_anon_rmap"), ("6.18", "folio_add_new_anon_rmap")])
def test_rmap_args_by_type(series: str, function: str) -> None:
    r = rmap_args(kfix.btf(series), function)
    names = [p.name for p in kfix.btf(series).func_params(function)]
    assert names[r.vma] == "vma" and names[r.addr] == "address"
    assert names[r.page] in ("page", "folio")
    assert r.nargs == len(names)


def test_rmap_args_rejects_functions_without_vma() -> None:
    with pytest.raises(BtfError, match="unlink_anon_vmas has no vma or page/folio parameter"):
        rmap_args(kfix.btf("6.12"), "unlink_anon_vmas")


def test_page_add_new_anon_rmap_on_61() -> None:
    r = rmap_args(kfix.btf("6.1"), "page_add_new_anon_rmap")
    assert (r.nargs, r.page, r.vma, r.addr) == (3, 0, 1, 2)
