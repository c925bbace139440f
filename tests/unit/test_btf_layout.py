"""tracer.kernel.btf and tracer.kernel.layout on BTF recorded from real kernels."""
from __future__ import annotations

import json

import pytest

from tests.unit import kfix
from tracer.kernel.btf import Btf, BtfError, Member
from tracer.kernel.layout import read_layout

# Offsets read from each kernel's BTF (docs/kernels.md "Struct members used").
# anon_vma has had the same layout since 2555283eb40d (v6.0).
EXPECTED = {
    "6.18": {"AV_ROOT": 0, "AV_NUM_CHILDREN": 56, "AV_NUM_ACTIVE_VMAS": 64, "AV_PARENT": 72},
    "6.12": {"AV_ROOT": 0, "AV_NUM_CHILDREN": 56, "AV_NUM_ACTIVE_VMAS": 64, "AV_PARENT": 72},
    "6.1": {"AV_ROOT": 0, "AV_NUM_CHILDREN": 56, "AV_NUM_ACTIVE_VMAS": 64, "AV_PARENT": 72},
}
ANON_VMA_SIZE = 96
# struct vm_area_struct members that moved between releases.
VMA_EXPECTED = {
    "6.1": {"VMA_START": 0, "VMA_END": 8, "VMA_MM": 16, "VMA_AVC": 72, "VMA_ANON_VMA": 88},
    "6.12": {"VMA_START": 0, "VMA_END": 8, "VMA_MM": 16, "VMA_AVC": 88, "VMA_ANON_VMA": 104},
    "6.18": {"VMA_START": 0, "VMA_END": 8, "VMA_MM": 16, "VMA_AVC": 48, "VMA_ANON_VMA": 64},
}


@pytest.mark.parametrize("series", kfix.SERIES)
def test_anon_vma_offsets(series: str) -> None:
    lay = read_layout(kfix.btf(series))
    assert lay.counters == "num_children"
    for key, off in EXPECTED[series].items():
        assert lay.offsets[key] == off, (series, key, lay.offsets)
    assert lay.sizes == {"AV_NUM_CHILDREN": 8, "AV_NUM_ACTIVE_VMAS": 8}
    assert kfix.btf(series).struct_size("anon_vma") == ANON_VMA_SIZE


@pytest.mark.parametrize("series", kfix.SERIES)
def test_vma_and_chain_offsets(series: str) -> None:
    lay = read_layout(kfix.btf(series))
    for key, off in VMA_EXPECTED[series].items():
        assert lay.offsets[key] == off, (series, key, lay.offsets)
    # anon_vma_chain has been { vma, anon_vma, same_vma, rb, rb_subtree_last } for years.
    assert (lay.offsets["AVC_VMA"], lay.offsets["AVC_ANON_VMA"],
            lay.offsets["AVC_SAME_VMA"]) == (0, 8, 16)


@pytest.mark.parametrize("series", kfix.SERIES)
def test_defines_carry_offsets(series: str) -> None:
    d = read_layout(kfix.btf(series)).defines()
    assert d["OFF_AV_PARENT"] == 72
    assert d["SZ_AV_NUM_CHILDREN"] == 8
    assert "AV_HAS_DEGREE" not in d
    assert all(k.startswith(("OFF_", "SZ_", "SPAN_")) for k in d)


@pytest.mark.parametrize("series", kfix.SERIES)
def test_spans_cover_every_member_read(series: str) -> None:
    """One read per struct: the span must contain each member the programs
    read from it, whole, and nothing past the last of them."""
    lay = read_layout(kfix.btf(series))
    d = lay.defines()
    for prefix, keys in (("VMA", ("VMA_START", "VMA_END", "VMA_MM", "VMA_AVC", "VMA_ANON_VMA")),
                         ("AV", ("AV_ROOT", "AV_PARENT", "AV_NUM_CHILDREN",
                                 "AV_NUM_ACTIVE_VMAS")),
                         ("AVC", ("AVC_VMA", "AVC_ANON_VMA"))):
        lo, length = d[f"SPAN_{prefix}_LO"], d[f"SPAN_{prefix}_LEN"]
        ends = []
        for k in keys:
            off, size = lay.offsets[k], lay.sizes.get(k, 8)
            assert lo <= off and off + size <= lo + length, (series, k, off, lo, length)
            ends.append(off + size)
        assert lo + length == max(ends)
    # The recorded kernels: anon_vma's members span root (0) to parent (72).
    assert (d["SPAN_AV_LO"], d["SPAN_AV_LEN"]) == (0, 80)


def test_spans_degree_era() -> None:
    d = read_layout(Btf(_degree_era("6.18"))).defines()
    assert (d["SPAN_AV_LO"], d["SPAN_AV_LEN"]) == (0, 80)


@pytest.mark.parametrize("series", kfix.SERIES)
def test_task_struct_members(series: str) -> None:
    b = kfix.btf(series)
    assert b.member("task_struct", "comm").size == 16
    assert b.member("task_struct", "pid").size == 4
    assert b.member("task_struct", "tgid").size == 4
    assert b.member("task_struct", "mm").size == 8
    assert b.member("task_struct", "tgid").offset == b.member("task_struct", "pid").offset + 4


@pytest.mark.parametrize("series", ["6.12", "6.18"])
def test_vm_start_found_inside_anonymous_union(series: str) -> None:
    """Since v6.x vm_start/vm_end sit in an anonymous struct inside an
    anonymous union of vm_area_struct: member() must look inside."""
    b = kfix.btf(series)
    vma = next(t for t in kfix.btf_types(series)
               if t.get("name") == "vm_area_struct" and t.get("vlen"))
    direct = {m.get("name") for m in vma["members"]}
    assert "vm_start" not in direct
    assert direct & {"", "(anon)"}
    assert b.member("vm_area_struct", "vm_start") == Member("vm_start", 0, 8)
    assert b.member("vm_area_struct", "vm_end") == Member("vm_end", 8, 8)


def _synthetic(types: list[dict]) -> Btf:
    return Btf.from_json(json.dumps({"types": types}))


INT = {"id": 1, "kind": "INT", "name": "int", "size": 4}
LONG = {"id": 2, "kind": "INT", "name": "long unsigned int", "size": 8}


def test_nested_anonymous_offsets_accumulate() -> None:
    inner = {"id": 10, "kind": "STRUCT", "name": "(anon)", "size": 16, "vlen": 2,
             "members": [{"name": "a", "type_id": 2, "bits_offset": 0},
                         {"name": "b", "type_id": 2, "bits_offset": 64}]}
    union = {"id": 11, "kind": "UNION", "name": "(anon)", "size": 16, "vlen": 2,
             "members": [{"name": "(anon)", "type_id": 10, "bits_offset": 0},
                         {"name": "c", "type_id": 1, "bits_offset": 0}]}
    outer = {"id": 12, "kind": "STRUCT", "name": "outer", "size": 40, "vlen": 2,
             "members": [{"name": "x", "type_id": 2, "bits_offset": 0},
                         {"name": "", "type_id": 11, "bits_offset": 128}]}
    b = _synthetic([INT, LONG, inner, union, outer])
    assert b.member("outer", "b") == Member("b", 24, 8)
    assert b.member("outer", "c") == Member("c", 16, 4)
    assert b.has_member("outer", "a") and not b.has_member("outer", "zzz")


def test_bitfield_member_is_an_error() -> None:
    s = {"id": 3, "kind": "STRUCT", "name": "bits", "size": 8, "vlen": 1,
         "members": [{"name": "flag", "type_id": 1, "bits_offset": 3}]}
    with pytest.raises(BtfError, match="bitfield"):
        _synthetic([INT, s]).member("bits", "flag")


def test_forward_declaration_does_not_hide_definition() -> None:
    fwd = {"id": 3, "kind": "STRUCT", "name": "s", "size": 0, "vlen": 0, "members": []}
    full = {"id": 4, "kind": "STRUCT", "name": "s", "size": 4, "vlen": 1,
            "members": [{"name": "v", "type_id": 1, "bits_offset": 0}]}
    for order in ([fwd, full], [full, fwd]):
        assert _synthetic([INT, *order]).member("s", "v") == Member("v", 0, 4)


def test_missing_struct_error() -> None:
    b = kfix.btf("6.18")
    with pytest.raises(BtfError, match=r"struct no_such_struct is not in this kernel's BTF"):
        b.member("no_such_struct", "x")
    assert not b.has_struct("no_such_struct")


def test_missing_member_error() -> None:
    b = kfix.btf("6.18")
    with pytest.raises(BtfError, match=r"struct anon_vma has no member 'degree'"):
        b.member("anon_vma", "degree")
    assert not b.has_member("anon_vma", "degree")


def test_missing_function_and_typedef_errors() -> None:
    b = kfix.btf("6.18")
    with pytest.raises(BtfError, match="no BTF prototype"):
        b.func_params("__page_set_anon_rmap")
    with pytest.raises(BtfError, match="typedef nope is not"):
        b.typedef_proto_params("nope")


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[]", "no 'types' list"),
    ('{"types": 3}', "no 'types' list"),
])
def test_invalid_json(text: str, match: str) -> None:
    with pytest.raises(BtfError, match=match):
        Btf.from_json(text)


@pytest.mark.parametrize("series", kfix.SERIES)
def test_raw_tracepoint_prototype(series: str) -> None:
    params = kfix.btf(series).typedef_proto_params("btf_trace_sched_process_fork")
    # void *__data, struct task_struct *parent, struct task_struct *child
    assert [p.type_name for p in params] == ["void *", "struct task_struct *",
                                             "struct task_struct *"]


@pytest.mark.parametrize("series", kfix.SERIES)
def test_function_prototypes(series: str) -> None:
    b = kfix.btf(series)
    assert [p.type_name for p in b.func_params("anon_vma_fork")] == [
        "struct vm_area_struct *", "struct vm_area_struct *"]
    assert [p.type_name for p in b.func_params("unlink_anon_vmas")] == [
        "struct vm_area_struct *"]
    assert len(b.func_params("anon_vma_clone")) == 2


def _degree_era(series: str) -> list[dict]:
    """The recorded BTF with anon_vma turned into its pre-v6.0 shape."""
    types = kfix.btf_types(series)
    av = next(t for t in types if t.get("name") == "anon_vma" and t.get("vlen"))
    members = []
    for m in av["members"]:
        if m["name"] == "num_children":
            members.append(dict(m, name="degree"))
        elif m["name"] != "num_active_vmas":
            members.append(m)
    av["members"], av["vlen"] = members, len(members)
    return types


def test_layout_degree_era() -> None:
    lay = read_layout(Btf(_degree_era("6.18")))
    assert lay.counters == "degree"
    assert lay.offsets["AV_DEGREE"] == 56
    assert "AV_NUM_CHILDREN" not in lay.offsets
    d = lay.defines()
    assert "AV_HAS_DEGREE" in d and d["AV_HAS_DEGREE"] is None
    assert d["OFF_AV_DEGREE"] == 56


def test_layout_unknown_anon_vma_design() -> None:
    types = _degree_era("6.18")
    av = next(t for t in types if t.get("name") == "anon_vma" and t.get("vlen"))
    av["members"] = [m for m in av["members"] if m["name"] != "degree"]
    with pytest.raises(BtfError, match="neither num_children nor degree"):
        read_layout(Btf(types))


def test_layout_names_first_missing_member() -> None:
    types = kfix.btf_types("6.18")
    avc = next(t for t in types if t.get("name") == "anon_vma_chain" and t.get("vlen"))
    avc["members"] = [m for m in avc["members"] if m["name"] != "same_vma"]
    with pytest.raises(BtfError, match="anon_vma_chain has no member 'same_vma'"):
        read_layout(Btf(types))


def test_subset_is_order_independent() -> None:
    b = kfix.btf("6.18")
    sub = Btf(b.subset(["anon_vma_chain", "vm_area_struct"]))
    assert sub.member("vm_area_struct", "vm_start") == Member("vm_start", 0, 8)


def test_subset_of_fixture_is_closed() -> None:
    """Btf.subset() of a fixture keeps everything read_layout() needs."""
    b = kfix.btf("6.12")
    sub = Btf(b.subset(["vm_area_struct", "anon_vma", "anon_vma_chain", "task_struct",
                        "list_head", "kmem_cache"]))
    # Each struct subset alone is complete ...
    for name in ("vm_area_struct", "anon_vma", "anon_vma_chain", "task_struct", "list_head"):
        alone = Btf(b.subset([name]))
        assert alone.has_struct(name)
    assert read_layout(sub).offsets == read_layout(b).offsets
