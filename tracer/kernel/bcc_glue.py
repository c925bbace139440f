"""The glue between anontrace and BCC: the only module that imports bcc.

Importing it with a clear error, catching what libbcc prints while it
compiles, reading hash maps in batches and BPF iterators through libbcc's
ctypes bindings, and the memory housekeeping after a compile.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import gc
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

from tracer.errors import AnontraceError


def import_bcc() -> Any:
    """Import BCC with an actionable error where it is missing."""
    try:
        import bcc  # type: ignore[import-untyped]  # only this module imports bcc
    except ImportError as exc:
        raise AnontraceError(
            "BCC's Python module is not importable: apt-get install python3-bpfcc, and run "
            "anontrace with /usr/bin/python3 or a venv made with --system-site-packages"
        ) from exc
    return bcc


def new_bpf(bcc: Any, **kwargs: Any) -> Any:
    """``bcc.BPF(**kwargs)``, but when the constructor fails (a program the
    kernel refuses to load, e.g. fentry under lockdown) the half-built
    object's maps are freed at once. BCC registers the object's cleanup with
    atexit before compiling, so otherwise the failed attempt's maps (tens of
    MB for the state maps) stay allocated until the process exits."""
    made: list[Any] = []

    class _Tracked(bcc.BPF):
        def __init__(self, **kw: Any) -> None:
            made.append(self)
            super().__init__(**kw)

    try:
        return _Tracked(**kwargs)
    except BaseException:
        for obj in made:
            atexit.unregister(obj.cleanup)
            with contextlib.suppress(Exception):
                if getattr(obj, "module", None):
                    obj.cleanup()
        raise


def attach_raw_tracepoint_copy(bpf: Any, tp: str, fn_name: str) -> bool:
    """Attach ``fn_name`` to raw tracepoint ``tp`` beside the program BCC
    attached there already (BPF.attach_raw_tracepoint takes one program per
    tracepoint), if the compiled object has that function; whether it had.
    Detached by the object's cleanup like BCC's own."""
    bcc = import_bcc()
    if not bcc.libbcc.lib.bpf_function_start(bpf.module, fn_name.encode()):
        return False
    fn = bpf.load_func(fn_name.encode(), bcc.BPF.RAW_TRACEPOINT)
    fd = bcc.libbcc.lib.bpf_attach_raw_tracepoint(fn.fd, tp.encode())
    if fd < 0:
        raise AnontraceError(f"attaching {fn_name} to raw tracepoint {tp} failed ({fd})")
    # cleanup() detaches (closes) every fd in this dict, whatever its key.
    bpf.raw_tracepoint_fds[f"{tp}#{fn_name}".encode()] = fd
    return True


COMPILER_LIB = re.compile(r"/lib(LLVM|clang)[^/]*\.so")


MADV_DONTNEED = 4


def clean_mappings(path_re: re.Pattern[str], smaps: str = "/proc/self/smaps"
                    ) -> list[tuple[int, int]]:
    """[lo, hi) of this process's read-only file mappings whose path matches
    and that hold no anonymous or dirty page."""
    out: list[tuple[int, int]] = []
    try:
        with open(smaps) as f:
            text = f.read()
    except OSError:
        return out
    cur: list[int] | None = None
    clean = True
    for line in text.splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            if cur is not None and clean:
                out.append((cur[0], cur[1]))
            parts = line.split()
            cur = None
            if len(parts) >= 6 and "w" not in parts[1] and path_re.search(parts[5]):
                cur = [int(x, 16) for x in parts[0].split("-")]
                clean = True
        elif cur is not None and head in ("Anonymous:", "Private_Dirty:", "Swap:"):
            if line.split()[1] != "0":
                clean = False
    if cur is not None and clean:
        out.append((cur[0], cur[1]))
    return out


def settle_heap() -> None:
    """Move everything allocated so far (BCC, the parsed BTF and kallsyms:
    millions of objects) out of the cyclic collector's sight. Every poll
    allocates thousands of short-lived events, which triggers full
    collections; each one walked all of those objects and cost the consumer a
    third of its time in a fork storm (py-spy; bench/fork_overhead.py). Objects
    released later are still freed by reference counting."""
    gc.collect()
    gc.freeze()


class AttachFailed(Exception):
    pass


def read_iterator(bcc: Any, prog_fd: int) -> bytes:
    """Attach a BPF iterator program, read its output to the end."""
    lib = bcc.libbcc.lib
    lib.bcc_iter_attach.restype = ctypes.c_int
    lib.bcc_iter_attach.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    lib.bcc_iter_create.restype = ctypes.c_int
    lib.bcc_iter_create.argtypes = [ctypes.c_int]
    link = lib.bcc_iter_attach(prog_fd, None, 0)
    if link < 0:
        raise OSError(-link, f"cannot attach the iterator: {os.strerror(-link)}")
    try:
        fd = lib.bcc_iter_create(link)
        if fd < 0:
            raise OSError(-fd, f"cannot create the iterator: {os.strerror(-fd)}")
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)
    finally:
        os.close(link)


_DUMP_CHUNK = 1024
_KEY_FORMATS = {4: "<I", 8: "<Q"}   # the maps' keys: pids, pointers


_ENOTSUPP = 524   # the kernel's own ENOTSUPP (not in errno): no batch ops for this map


def dump_hash(table: Any, key_size: int) -> dict[int, bytes]:
    """Every entry of a hash map, key (an unsigned int of ``key_size``
    bytes) -> raw value, with BPF_MAP_LOOKUP_BATCH (compat: lookup_batch) in chunks of a
    few thousand entries; entry by entry where the kernel has no batch ops."""
    return dict(iter_hash(table, key_size))


def iter_hash(table: Any, key_size: int) -> Iterator[tuple[int, bytes]]:
    """A hash map's entries as :func:`dump_hash` reads them, one at a time:
    a reader that keeps few of them never holds them all."""
    key_format = _KEY_FORMATS[key_size]
    for keys, values, vsize in hash_chunks(table, key_size):
        for i, (key,) in enumerate(struct.iter_unpack(key_format, keys)):
            yield key, bytes(values[i * vsize:(i + 1) * vsize])


def hash_chunks(table: Any, key_size: int
                ) -> Iterator[tuple[memoryview, memoryview, int]]:
    """A hash map's entries as chunks (keys packed, values packed, value
    size), as BPF_MAP_LOOKUP_BATCH returns them: a reader that sums them
    needs no object per entry. The views are of buffers the next chunk
    reuses: copy what is kept. One chunk of everything where the kernel has
    no batch ops."""
    from bcc import libbcc

    lib = libbcc.lib
    vsize = ctypes.sizeof(table.Leaf)
    count = _DUMP_CHUNK
    token = ctypes.c_uint32(0)
    first = True
    keys = ctypes.create_string_buffer(count * key_size)
    values = ctypes.create_string_buffer(count * vsize)
    while True:
        n = ctypes.c_uint32(count)
        out_token = ctypes.c_uint32(0)
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ctypes.byref(token),
                                   ctypes.byref(out_token), keys, values, ctypes.byref(n))
        err = ctypes.get_errno()
        if res != 0 and err == errno.ENOSPC and count < 1 << 20:
            count *= 4      # one bucket holds more entries than the chunk
            keys = ctypes.create_string_buffer(count * key_size)
            values = ctypes.create_string_buffer(count * vsize)
            continue
        if res != 0 and err not in (errno.ENOENT, 0):
            if first and err in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                slow = _dump_slow(table, key_size)
                yield (memoryview(b"".join(k.to_bytes(key_size, "little") for k in slow)),
                       memoryview(b"".join(slow.values())), vsize)
                return
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        yield (memoryview(keys).cast("B")[:n.value * key_size],
               memoryview(values).cast("B")[:n.value * vsize], vsize)
        if res != 0:
            return          # ENOENT: that was the last chunk
        token = out_token
        first = False


def delete_keys(table: Any, keys: list[int]) -> None:
    """Delete these keys (unsigned ints) from a hash map: BPF_MAP_DELETE_BATCH
    (compat: lookup_batch, same series) in chunks, one by one where the
    kernel has no batch ops or a key went meanwhile."""
    for i in range(0, len(keys), _DUMP_CHUNK):
        chunk = keys[i:i + _DUMP_CHUNK]
        try:
            table.items_delete_batch((table.Key * len(chunk))(*chunk))
            continue
        except Exception:  # BCC raises bare Exception; ENOENT stops a batch midway
            pass
        for key in chunk:
            with contextlib.suppress(KeyError):
                del table[table.Key(key)]


def lookup_raw(table: Any, key: Any) -> bytes | None:
    """One entry's raw value, or None if it is gone."""
    try:
        leaf = table[key]
    except KeyError:
        return None
    return ctypes.string_at(ctypes.addressof(leaf), ctypes.sizeof(leaf))


def _dump_slow(table: Any, key_size: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for k, v in table.items():
        out[int(k.value) if hasattr(k, "value") else int.from_bytes(bytes(k), "little")] = \
            ctypes.string_at(ctypes.addressof(v), ctypes.sizeof(v))
    return out


@contextlib.contextmanager
def captured_stderr(sink: list[str]) -> Iterator[None]:
    """Collect what libbcc and libbpf print on fd 2 (compiler warnings,
    verifier logs) so the user sees one clear line instead."""
    # A memfd, not a temp file: /tmp may be a 9p share (QEMU guests) where
    # unlinked files cannot be read back.
    saved = os.dup(2)
    fd = os.memfd_create("anontrace-stderr")
    with open(fd, "rb") as tmp:
        os.dup2(fd, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


def verifier_hint(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("libbpf:", "bpf:")) or "error:" in line:
            return line
    return ""


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def load_error(exc: Exception, captured: list[str]) -> str:
    """One line saying why BCC could not compile or load a program: its
    last line, the first verifier or compiler line of ``captured`` (from
    :func:`captured_stderr`), and what EPERM means for root."""
    detail = last_line(str(exc)) or type(exc).__name__
    hint = verifier_hint(captured[0] if captured else "")
    if "Operation not permitted" in detail + hint and os.geteuid() == 0:
        # BCC words EPERM as "Need super-user privileges" even for root.
        detail = ("the kernel refused to load the program (EPERM) although we are root: "
                  "lockdown or an LSM forbids this program type")
    return detail + (f" ({hint})" if hint else "")


def iterator_error(exc: Exception, captured: list[str]) -> str:
    """One line saying why a task_vma iterator could not be loaded or run."""
    msg = last_line(str(exc)) or type(exc).__name__
    if "Operation not permitted" in msg + (captured[0] if captured else ""):
        msg = "the kernel refused the task_vma iterator (EPERM: lockdown or LSM)"
    return msg
