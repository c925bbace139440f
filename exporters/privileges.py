"""Least privilege for `anontrace serve`, and systemd readiness.

Loading and attaching BPF programs needs root's capabilities; reading the
maps afterwards needs far less. Once every program is attached and the
census iterator is built, :func:`drop_privileges` keeps only the
capabilities in :data:`KEPT` (in the effective, permitted and bounding sets;
ambient and inheritable emptied) and can switch to an unprivileged user,
keeping those capabilities across the switch. Done with capget/capset and
prctl through ctypes: Python's standard library has no binding for them.

:func:`sd_notify` tells systemd (Type=notify) that the daemon is ready or
stopping, when it was started with $NOTIFY_SOCKET. The socket must stay
writable for the user the daemon becomes (systemd's own is).
"""
from __future__ import annotations

import ctypes
import os
import pwd
import socket
from dataclasses import dataclass

from tracer.errors import AnontraceError

# linux/capability.h
CAP_SETPCAP = 8
CAP_PERFMON = 38
CAP_BPF = 39
CAP_LAST = 40   # highest capability this module knows (CAP_CHECKPOINT_RESTORE)
_VERSION_3 = 0x20080522
# linux/prctl.h
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_DUMPABLE = 4
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

# What the running daemon still needs, and why.
KEPT = {
    CAP_BPF: "bpf() on the programs' maps (the snapshot, forgetting exited processes, "
             "the census after a full map): kernels that keep unprivileged BPF disabled "
             "refuse every bpf() command without it on older releases",
}
CAP_NAMES = {CAP_SETPCAP: "CAP_SETPCAP", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise AnontraceError(f"cannot drop privileges: {what}: {os.strerror(err)}")


@dataclass(frozen=True)
class CapSets:
    """Capability masks (bit n = capability n)."""

    effective: int
    permitted: int
    inheritable: int


def capget() -> CapSets:
    """This thread's capability sets."""
    hdr = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    _check(_libc().capget(ctypes.byref(hdr), data), "capget")
    def join(f: str) -> int:
        return int(getattr(data[0], f)) | int(getattr(data[1], f)) << 32
    return CapSets(join("effective"), join("permitted"), join("inheritable"))


def _capset(sets: CapSets) -> None:
    hdr = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    for i in (0, 1):
        data[i].effective = (sets.effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (sets.permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (sets.inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc().capset(ctypes.byref(hdr), data), "capset")


def _mask(caps: set[int] | dict[int, str]) -> int:
    out = 0
    for c in caps:
        out |= 1 << c
    return out


@dataclass(frozen=True)
class Dropped:
    """What :func:`drop_privileges` left: the user and the capabilities."""

    user: str
    uid: int
    kept: tuple[str, ...]


def drop_privileges(user: str | None = None) -> Dropped:
    """Keep only :data:`KEPT`; with ``user``, also become that user (its
    primary group, no supplementary groups). Every process thread must call
    nothing privileged afterwards; threads started later inherit the sets.
    Raises AnontraceError naming the step that failed."""
    libc = _libc()
    keep = _mask(KEPT)
    # Capability sets are per thread: a thread started earlier would keep
    # everything.
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise AnontraceError(f"cannot drop privileges: {threads} threads already running")
    pw = None
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise AnontraceError(f"cannot drop privileges: no user {user!r}") from None
    # The bounding set first: dropping from it needs CAP_SETPCAP, still held.
    for cap in range(CAP_LAST + 1):
        if not keep >> cap & 1 and libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
            _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"bounding set cap {cap}")
    # Ambient capabilities are cleared on kernels that have them (EINVAL before).
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if pw is not None:
        # setuid() keeps the permitted set (then trimmed below) and clears
        # the effective one.
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep capabilities across setuid")
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        except OSError as exc:
            raise AnontraceError(f"cannot drop privileges: becoming {user}: "
                                 f"{exc.strerror}") from None
        # A change of user makes the process undumpable, and its /proc/self
        # files root's: the daemon could no longer count its own open fds
        # (process_open_fds). Another process of that user still cannot
        # ptrace it, since it holds capabilities that one lacks.
        libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    _capset(CapSets(keep, keep, 0))
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    now = capget()
    if now.permitted & ~keep or now.effective != keep:
        raise AnontraceError(f"cannot drop privileges: capabilities still "
                             f"{now.permitted:#x} after the drop")
    uid = os.getuid()
    name = pw.pw_name if pw is not None else pwd.getpwuid(uid).pw_name
    return Dropped(name, uid, tuple(CAP_NAMES.get(c, str(c)) for c in sorted(KEPT)))


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's $NOTIFY_SOCKET; False
    when there is none (not started by systemd with Type=notify)."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):   # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(state.encode())
    return True


def notify_systemd(state: str) -> None:
    """:func:`sd_notify`, logging instead of failing: a socket the daemon
    cannot reach must not stop it serving."""
    import logging

    from exporters.logs import log

    try:
        sd_notify(state)
    except OSError as exc:
        log(logging.WARNING, "cannot notify systemd", state=state,
            socket=os.environ.get("NOTIFY_SOCKET", ""), error=exc.strerror or str(exc))
