"""Struct layouts and function prototypes of the running kernel, from BTF.

BCC compiles against whatever kernel headers it finds, and on hardened or
header-less hosts those headers describe another kernel. Every member offset
the BPF programs use therefore comes from here, never from headers.

BTF is decoded by ``bpftool btf dump -j`` (Debian's ``bpftool``): the reference
decoder, so this module only walks its JSON.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BTF_PATH = Path("/sys/kernel/btf/vmlinux")

# Kinds that only qualify or rename another type.
_TRANSPARENT = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG", "DECL_TAG"}


class BtfError(Exception):
    """BTF is missing, unreadable, or lacks a type the caller needs."""


@dataclass(frozen=True)
class Member:
    """A struct member resolved to its byte offset and size."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel function prototype."""

    name: str
    type_name: str  # e.g. "struct vm_area_struct *", "int"


class Btf:
    """Types of one kernel, indexed by name.

    Build it with :func:`load_btf` (the live kernel, via bpftool) or
    :meth:`from_json` (a fixture recorded from a real kernel).
    """

    def __init__(self, types: list[dict[str, Any]]) -> None:
        self._by_id: dict[int, dict[str, Any]] = {t["id"]: t for t in types}
        self._structs: dict[str, dict[str, Any]] = {}
        self._funcs: dict[str, dict[str, Any]] = {}
        self._typedefs: dict[str, dict[str, Any]] = {}
        self._enums: dict[str, dict[str, Any]] = {}
        for t in types:
            name, kind = t.get("name"), t.get("kind")
            if not name or name == "(anon)":
                continue
            if kind in ("ENUM", "ENUM64") and t.get("vlen", 0):
                self._enums[name] = t
            # Forward declarations have no members; keep the full definition.
            if kind in ("STRUCT", "UNION") and (name not in self._structs or t.get("vlen", 0)):
                self._structs[name] = t
            elif kind == "FUNC":
                self._funcs[name] = t
            elif kind == "TYPEDEF":
                self._typedefs[name] = t

    @classmethod
    def from_json(cls, text: str) -> Btf:
        """Parse ``bpftool -j btf dump`` output (or a fixture subset of it)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BtfError(f"BTF JSON is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("types"), list):
            raise BtfError("BTF JSON has no 'types' list")
        return cls(data["types"])

    def subset(self, struct_names: Iterable[str], func_names: Iterable[str] = (),
               typedef_names: Iterable[str] = (),
               enum_names: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The types needed to answer questions about the given names.

        Used to record small fixtures from real kernels.
        """
        keep: dict[int, dict[str, Any]] = {}
        # Shallowest depth each type was reached at: a type first met deep in
        # the graph must still be explored when met again closer to a root.
        seen: dict[int, int] = {}

        def visit(tid: int, depth: int) -> None:
            t = self._by_id.get(tid)
            if t is None or seen.get(tid, 1 << 30) <= depth:
                return
            seen[tid] = depth
            keep[tid] = t
            if depth > 3:
                return
            for key in ("type_id", "ret_type_id"):
                if key in t:
                    visit(t[key], depth + 1)
            for m in t.get("members", []) + t.get("params", []):
                if t["kind"] in ("STRUCT", "UNION") and m.get("name") not in ("", "(anon)"):
                    # Named members: keep the referenced type shallowly only.
                    visit(m["type_id"], depth + 2)
                else:
                    visit(m["type_id"], depth + 1)

        for n in struct_names:
            if n in self._structs:
                visit(self._structs[n]["id"], 0)
        for n in func_names:
            if n in self._funcs:
                visit(self._funcs[n]["id"], 0)
        for n in typedef_names:
            if n in self._typedefs:
                visit(self._typedefs[n]["id"], 0)
        for n in enum_names:
            if n in self._enums:
                visit(self._enums[n]["id"], 0)
        return sorted(keep.values(), key=lambda t: t["id"])

    # -- structs -------------------------------------------------------
    def has_struct(self, name: str) -> bool:
        return name in self._structs

    def struct_size(self, name: str) -> int:
        return int(self._struct(name)["size"])

    def has_member(self, struct: str, member: str) -> bool:
        try:
            self.member(struct, member)
        except BtfError:
            return False
        return True

    def member(self, struct: str, member: str) -> Member:
        """Offset and size of ``struct.member``, looking inside anonymous
        structs and unions (``vm_start`` sits in one since v6.x)."""
        found = self._find_member(self._struct(struct), member, 0)
        if found is None:
            raise BtfError(f"struct {struct} has no member {member!r} in this kernel's BTF")
        return found

    def members(self, struct: str) -> list[Member]:
        """The direct members of ``struct``, in order."""
        out = []
        for m in self._struct(struct).get("members", []):
            bits = int(m.get("bits_offset", 0))
            out.append(Member(m.get("name", ""), bits // 8, self.type_size(m["type_id"])))
        return out

    def _struct(self, name: str) -> dict[str, Any]:
        t = self._structs.get(name)
        if t is None:
            raise BtfError(f"struct {name} is not in this kernel's BTF")
        return t

    def _find_member(self, t: dict[str, Any], name: str, base_bits: int) -> Member | None:
        for m in t.get("members", []):
            bits = base_bits + int(m.get("bits_offset", 0))
            mname = m.get("name", "")
            if mname == name:
                if bits % 8:
                    raise BtfError(f"member {name!r} is a bitfield")
                return Member(name, bits // 8, self.type_size(m["type_id"]))
            if mname in ("", "(anon)"):
                inner = self._resolve(m["type_id"])
                if inner.get("kind") in ("STRUCT", "UNION"):
                    hit = self._find_member(inner, name, bits)
                    if hit is not None:
                        return hit
        return None

    # -- types ---------------------------------------------------------
    def _resolve(self, tid: int) -> dict[str, Any]:
        t = self._by_id.get(tid, {"kind": "VOID"})
        while t.get("kind") in _TRANSPARENT:
            t = self._by_id.get(t["type_id"], {"kind": "VOID"})
        return t

    def type_size(self, tid: int) -> int:
        t = self._resolve(tid)
        kind = t.get("kind")
        if kind == "PTR":
            return 8
        if kind == "ARRAY":
            return self.type_size(t["type_id"]) * int(t["nr_elems"])
        return int(t.get("size", 0))

    def type_name(self, tid: int) -> str:
        t = self._by_id.get(tid)
        if t is None or tid == 0:
            return "void"
        kind = t["kind"]
        if kind == "PTR":
            return self.type_name(t["type_id"]) + " *"
        if kind in ("CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            return self.type_name(t["type_id"])
        if kind in ("STRUCT", "UNION", "ENUM", "ENUM64"):
            word = {"STRUCT": "struct", "UNION": "union"}.get(kind, "enum")
            return f"{word} {t.get('name', '(anon)')}"
        return str(t.get("name", kind))

    # -- enums ---------------------------------------------------------
    def enum_value(self, enum: str, name: str) -> int:
        """The value of enumerator ``name`` of ``enum`` (e.g. ``PG_head`` of
        ``enum pageflags``, whose numbering depends on the kernel's config)."""
        t = self._enums.get(enum)
        if t is None:
            raise BtfError(f"enum {enum} is not in this kernel's BTF")
        for v in t.get("values", []):
            if v.get("name") == name:
                return int(v["val"])
        raise BtfError(f"enum {enum} has no {name!r} in this kernel's BTF")

    # -- functions -----------------------------------------------------
    def has_func(self, name: str) -> bool:
        return name in self._funcs

    def func_params(self, name: str) -> list[Param]:
        """Parameters of a kernel function (fentry needs the exact count)."""
        f = self._funcs.get(name)
        if f is None:
            raise BtfError(f"function {name} has no BTF prototype")
        return self._proto_params(self._by_id[f["type_id"]])

    def typedef_proto_params(self, typedef: str) -> list[Param]:
        """Parameters of a function-pointer typedef such as
        ``btf_trace_sched_process_fork`` (a raw tracepoint's arguments)."""
        t = self._typedefs.get(typedef)
        if t is None:
            raise BtfError(f"typedef {typedef} is not in this kernel's BTF")
        proto = self._resolve(t["type_id"])
        if proto.get("kind") == "PTR":
            proto = self._resolve(proto["type_id"])
        if proto.get("kind") != "FUNC_PROTO":
            raise BtfError(f"typedef {typedef} is not a function prototype")
        return self._proto_params(proto)

    def _proto_params(self, proto: dict[str, Any]) -> list[Param]:
        return [Param(p.get("name", ""), self.type_name(p["type_id"]))
                for p in proto.get("params", [])]


def _bpftool(bpftool: str | None) -> str:
    tool = bpftool or shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None)
    if tool is None:
        raise BtfError("bpftool not found: install Debian's 'bpftool' package")
    return tool


def _dump(args: list[str], what: str, bpftool: str | None) -> Btf:
    proc = subprocess.run([_bpftool(bpftool), "-j", "btf", "dump", *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BtfError(f"bpftool could not read {what}: {proc.stderr.strip()}")
    return Btf.from_json(proc.stdout)


def load_btf(path: Path = DEFAULT_BTF_PATH, bpftool: str | None = None) -> Btf:
    """Decode a kernel's BTF with bpftool."""
    if not path.exists():
        raise BtfError(f"{path} does not exist: the kernel was built without "
                       "CONFIG_DEBUG_INFO_BTF, which anontrace needs for struct offsets")
    return _dump(["file", str(path)], str(path), bpftool)


def load_btf_id(btf_id: int, bpftool: str | None = None) -> Btf:
    """Decode a BTF object loaded in the kernel (a BPF program's own types)."""
    return _dump(["id", str(btf_id)], f"BTF id {btf_id}", bpftool)
