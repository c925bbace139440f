"""Kernel differences live in one place per language, each with its commit."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracer.kernel.compat import (
    CHANGES,
    anon_vma_clone_nargs,
    change,
    kmem_free_has_name,
    no_prealloc_allowed,
    programs_preemptible,
    ringbuf_available,
    task_storage_available,
    tracepoint_programs_preemptible,
)
from tracer.kernel.kernel_env import Kallsyms

ROOT = Path(__file__).resolve().parents[2]
COMPAT_H = ROOT / "bpf_programs" / "anontrace_compat.h"
KERNELS_MD = ROOT / "docs" / "kernels.md"

# A kernel release named in prose: "v6.16", "v5.12+", "7.0 rework".
_RELEASE = re.compile(r"\bv[3-9]\.\d+\b|\b7\.0\b")


def test_every_change_is_cited_in_full() -> None:
    keys = [c.key for c in CHANGES]
    assert len(keys) == len(set(keys))
    for c in CHANGES:
        assert c.commit is None or re.fullmatch(r"[0-9a-f]{12}", c.commit), c
        assert c.title and c.detected_by and c.effect, c
        assert re.fullmatch(r"v\d+\.\d+", c.release), c
        assert change(c.key) is c
    with pytest.raises(KeyError):
        change("no such change")


def test_the_bpf_header_lists_the_same_changes() -> None:
    text = COMPAT_H.read_text()
    listed = dict(re.findall(r"^// (\w+): (commit .*)$", text, re.M))
    assert listed == {c.key: c.cite() for c in CHANGES}


def test_the_kernel_notes_cite_every_change() -> None:
    text = KERNELS_MD.read_text()
    for c in CHANGES:
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{c.key}` |")), None)
        assert row is not None, f"docs/kernels.md has no row for {c.key}"
        assert (c.commit or "not established") in row and c.title in row and c.release in row


def _offenders(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if _RELEASE.search(line):
                out.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    return out


def test_no_other_python_module_names_a_kernel_release() -> None:
    """Kernel differences are decided and cited in tracer/kernel/compat.py
    only; other modules name the change by its key."""
    paths = [p for d in ("tracer", "exporters") for p in sorted((ROOT / d).rglob("*.py"))
             if p.name != "compat.py"]
    assert _offenders(paths) == []


def test_no_other_bpf_source_names_a_kernel_release() -> None:
    paths = [p for p in sorted((ROOT / "bpf_programs").iterdir())
             if p.suffix in (".c", ".h") and p != COMPAT_H]
    assert len(paths) >= 3
    assert _offenders(paths) == []


def test_the_release_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "x.c"
    bad.write_text("// since v6.16 the exit event comes first\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _offenders([bad]) == ["x.c:1: // since v6.16 the exit event comes first"]
    finally:
        ROOT = saved


class _Btf:
    def __init__(self, params: dict[str, list[str]]) -> None:
        self.params = params

    def has_func(self, name: str) -> bool:
        return name in self.params

    def func_params(self, name: str) -> list[str]:
        return self.params[name]


def test_feature_tests() -> None:
    assert anon_vma_clone_nargs(None) == 2
    assert anon_vma_clone_nargs(_Btf({"anon_vma_clone": ["dst", "src"]})) == 2  # type: ignore[arg-type]
    assert anon_vma_clone_nargs(_Btf({"anon_vma_clone": ["dst", "src", "op"]})) == 3  # type: ignore[arg-type]
    assert anon_vma_clone_nargs(_Btf({})) == 2  # type: ignore[arg-type]
    assert kmem_free_has_name({"call_site", "ptr", "name"})
    assert not kmem_free_has_name({"call_site", "ptr"})
    both = Kallsyms("0 T bpf_task_storage_get\n0 T bpf_get_current_task_btf\n"
                    "0 T bpf_ringbuf_output\n0 T bpf_mem_alloc\n")
    assert task_storage_available(both) and ringbuf_available(both) and no_prealloc_allowed(both)
    none = Kallsyms("0 T bpf_task_storage_get\n")
    assert not task_storage_available(none)
    assert not task_storage_available(Kallsyms("0 T bpf_get_current_task_btf\n"))
    assert not ringbuf_available(none) and not no_prealloc_allowed(none)


def test_tracepoint_programs_preemptible() -> None:
    srcu_fast_text = "0 T init_srcu_struct_fast\n"
    srcu_fast = Kallsyms(srcu_fast_text)
    # Before the change tracepoints disable preemption, whatever the model.
    assert not tracepoint_programs_preemptible(Kallsyms("0 T bpf_mem_alloc\n"),
                                               "none voluntary (full) lazy\n")
    # After it, the current model (in parentheses) decides.
    assert tracepoint_programs_preemptible(srcu_fast, "none voluntary full (lazy)\n")
    assert tracepoint_programs_preemptible(srcu_fast, "none voluntary (full) lazy\n")
    assert not tracepoint_programs_preemptible(srcu_fast, "none (voluntary) full lazy\n")
    assert not tracepoint_programs_preemptible(srcu_fast, "(none) voluntary full lazy\n")
    # Unreadable model: the kernel preempts if it built preempt_schedule.
    assert not tracepoint_programs_preemptible(srcu_fast, None)
    preempts = Kallsyms(srcu_fast_text + "0 T preempt_schedule\n")
    assert tracepoint_programs_preemptible(preempts, None)
    assert tracepoint_programs_preemptible(preempts, "")
    assert not tracepoint_programs_preemptible(preempts, "none (voluntary) full lazy\n")


def test_programs_preemptible() -> None:
    none = Kallsyms("0 T bpf_mem_alloc\n")
    assert programs_preemptible(none, "none voluntary full (lazy)\n")
    assert programs_preemptible(none, "none voluntary (full) lazy\n")
    assert not programs_preemptible(none, "none (voluntary) full lazy\n")
    assert not programs_preemptible(none, None)
    assert programs_preemptible(Kallsyms("0 T preempt_schedule\n"), None)
