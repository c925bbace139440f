"""Facts about the running kernel, read from injectable paths.

Every path is a field of :class:`KernelEnv` so that tests can point the
probe-resolution logic at files recorded from real machines.
"""
from __future__ import annotations

import bisect
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class KernelEnvError(Exception):
    """A kernel fact could not be read."""


@dataclass(frozen=True)
class KernelEnv:
    """Where the kernel's facts live. Defaults describe the live system."""

    release: str = field(default_factory=lambda: os.uname().release)
    kallsyms: Path = Path("/proc/kallsyms")
    btf: Path = Path("/sys/kernel/btf/vmlinux")
    tracefs: Path = Path("/sys/kernel/tracing")
    lockdown: Path = Path("/sys/kernel/security/lockdown")
    slab_sysfs: Path = Path("/sys/kernel/slab")
    slabinfo: Path = Path("/proc/slabinfo")
    modules: Path = Path("/lib/modules")
    usr_src: Path = Path("/usr/src")
    sched_preempt: Path = Path("/sys/kernel/debug/sched/preempt")
    proc_config: Path = Path("/proc/config.gz")
    boot: Path = Path("/boot")
    cmdline: Path = Path("/proc/cmdline")


@dataclass(frozen=True)
class Symbol:
    """A text symbol and the address range up to the next symbol."""

    name: str
    start: int
    end: int


class Kallsyms:
    """Text symbols of the running kernel, with their address ranges.

    The end of a function is taken as the start of the next text symbol,
    which is what call_site range checks need.
    """

    # vmlinux text symbols: module symbols carry a 4th column ([module]).
    _TEXT = re.compile(r"^([0-9a-fA-F]+) [tTwW] (\S+)$", re.M)

    def __init__(self, text: str) -> None:
        # One regex pass and lazy Symbol objects: /proc/kallsyms has some
        # 200,000 lines and every start-up reads it (a Python loop over the
        # lines took 5 s of a start in a QEMU TCG guest).
        starts = sorted((int(a, 16), n) for a, n in self._TEXT.findall(text))
        self._addrs = [a for a, _ in starts]
        self._names = [n for _, n in starts]
        self._first: dict[str, int] = {}
        for i, name in enumerate(self._names):
            # Keep the first definition: static duplicates share a name.
            self._first.setdefault(name, i)
        self.hidden = bool(starts) and not any(self._addrs)

    @classmethod
    def read(cls, env: KernelEnv) -> Kallsyms:
        try:
            return cls(env.kallsyms.read_text())
        except OSError as exc:
            raise KernelEnvError(f"cannot read {env.kallsyms}: {exc.strerror}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self._first

    def get(self, name: str) -> Symbol | None:
        i = self._first.get(name)
        if i is None:
            return None
        addr = self._addrs[i]
        end = self._addrs[i + 1] if i + 1 < len(self._addrs) else addr + 1
        return Symbol(name, addr, end)

    def lookup(self, addr: int) -> str | None:
        """Name of the text symbol that contains ``addr``."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        return self._names[i] if i >= 0 else None


def read_lockdown(env: KernelEnv) -> str:
    """The active lockdown mode ('none', 'integrity', 'confidentiality'),
    or 'unknown' where securityfs does not expose it. Mounts securityfs
    where it is missing (systemd mounts it; minimal images do not)."""
    if not env.lockdown.exists() and env.lockdown == Path("/sys/kernel/security/lockdown"):
        os.system("mount -t securityfs securityfs /sys/kernel/security 2>/dev/null")
    try:
        text = env.lockdown.read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def tracepoint_format(env: KernelEnv, category: str, event: str) -> str | None:
    """The tracefs format text of a tracepoint, None if it does not exist."""
    path = env.tracefs / "events" / category / event / "format"
    try:
        return path.read_text()
    except OSError:
        return None


def tracepoint_fields(fmt: str) -> set[str]:
    """Field names declared in a tracefs format text."""
    return set(re.findall(r"field:[^;]*?[\s*](\w+)(?:\[\d*\])?;", fmt))


def slab_object_size(env: KernelEnv, cache: str) -> int | None:
    """Bytes per object of a slab cache as kmem tracepoints report them
    (``bytes_alloc`` is the cache's ``size``: object plus alignment)."""
    try:
        return int((env.slab_sysfs / cache / "slab_size").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in env.slabinfo.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == cache and len(parts) > 3:
                return int(parts[3])
    except (OSError, ValueError):
        return None
    return None


def ensure_tracefs(env: KernelEnv) -> None:
    """Mount tracefs (and debugfs, where BCC looks by default) if absent.

    Debian mounts them at boot; minimal and hardened images often do not.
    """
    if (env.tracefs / "events").is_dir():
        return
    if env.tracefs != Path("/sys/kernel/tracing"):
        raise KernelEnvError(f"tracefs not found at {env.tracefs}")
    rc = os.system("mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null")
    if rc != 0 or not (env.tracefs / "events").is_dir():
        raise KernelEnvError("tracefs is not mounted and could not be mounted at "
                             "/sys/kernel/tracing")
    if not Path("/sys/kernel/debug/tracing").exists():
        os.system("mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null")


def preempt_model(env: KernelEnv) -> str | None:
    """The scheduler's preemption models with the current one in parentheses
    (/sys/kernel/debug/sched/preempt). Where debugfs is closed (lockdown, or
    not mounted) or the kernel has no dynamic preemption, the model is
    worked out from the kernel's build configuration and command line
    (preempt_model_from_config); None where neither can be read."""
    try:
        return env.sched_preempt.read_text()
    except OSError:
        pass
    config = kernel_config(env)
    if config is None:
        return None
    try:
        cmdline = env.cmdline.read_text()
    except OSError:
        cmdline = ""
    return preempt_model_from_config(config, cmdline)


def kernel_config(env: KernelEnv) -> str | None:
    """The running kernel's build configuration (/proc/config.gz, or
    /boot/config-RELEASE), or None."""
    try:
        return gzip.decompress(env.proc_config.read_bytes()).decode(errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    try:
        return (env.boot / f"config-{env.release}").read_text(errors="replace")
    except OSError:
        return None


_BUILT_MODELS = (("PREEMPT_RT", "full"), ("PREEMPT_LAZY", "lazy"), ("PREEMPT", "full"),
                 ("PREEMPT_VOLUNTARY", "voluntary"), ("PREEMPT_NONE", "none"))


def preempt_model_from_config(config: str, cmdline: str) -> str | None:
    """The current preemption model, in the form of the debugfs file
    ("(voluntary)"), from a kernel configuration and command line: the model
    it was built with, which ``preempt=`` on the command line replaces where
    the kernel has dynamic preemption (CONFIG_PREEMPT_DYNAMIC). RT counts as
    full. None where the configuration names no model."""
    opts = set(re.findall(r"^CONFIG_(\w+)=y$", config, re.M))
    current = next((m for key, m in _BUILT_MODELS if key in opts), None)
    if current is None:
        return None
    chosen = re.search(r"(?:^|\s)preempt=(none|voluntary|full|lazy)(?:\s|$)", cmdline)
    if chosen and "PREEMPT_DYNAMIC" in opts and "PREEMPT_RT" not in opts:
        current = chosen.group(1)
    return f"({current})"
