"""Kernel headers for BCC's compiler.

BCC refuses to compile without a kernel header tree. The programs take every
struct offset from BTF, so headers only need to exist; on kernels without a
matching package (hardened or custom builds) the newest installed Debian
headers are merged into one tree and handed to BCC via BCC_KERNEL_SOURCE.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tracer.kernel.kernel_env import KernelEnv

CACHE_DIR = Path("/var/cache/anontrace/headers")


class HeadersError(Exception):
    """No kernel headers that BCC could compile against."""


@dataclass(frozen=True)
class Headers:
    """The header tree BCC will use and whether it matches the kernel."""

    path: Path
    matching: bool
    source: str  # human-readable description

    def apply(self) -> None:
        """Point BCC at this tree (must run before bcc is imported)."""
        if not self.matching:
            os.environ["BCC_KERNEL_SOURCE"] = str(self.path)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name)[:4])


def find_headers(env: KernelEnv, cache_dir: Path = CACHE_DIR) -> Headers:
    """Matching headers if installed, else a merged tree of the newest ones."""
    build = env.modules / env.release / "build"
    if build.exists():
        return Headers(build, True, f"{build} (matches {env.release})")
    if os.environ.get("BCC_KERNEL_SOURCE"):
        p = Path(os.environ["BCC_KERNEL_SOURCE"])
        return Headers(p, False, f"{p} (from BCC_KERNEL_SOURCE)")
    arch = sorted((p for p in env.usr_src.glob("linux-headers-*") if not
                   p.name.endswith("-common") and (p / "Makefile").exists()),
                  key=lambda p: _version_key(p.name))
    for tree in reversed(arch):
        common = _common_half(tree)
        if common is None:
            continue
        merged = cache_dir / tree.name.removeprefix("linux-headers-")
        if not (merged / ".complete").exists():
            _merge(common, tree, merged)
        return Headers(merged, False,
                       f"{tree.name} merged with {common.name} (not {env.release}; "
                       "struct offsets come from BTF)")
    raise HeadersError(
        f"no kernel headers for {env.release} and none installed to fall back on: "
        "apt-get install linux-headers-amd64")


def _common_half(tree: Path) -> Path | None:
    # Debian splits headers into -<flavour> (generated) and -common (source);
    # the flavour's Makefile names the common tree.
    try:
        text = (tree / "Makefile").read_text()
    except OSError:
        return None
    m = re.search(r"/usr/src/(linux-headers-[^\s/]+-common)", text)
    if m and (tree.parent / m.group(1)).is_dir():
        return tree.parent / m.group(1)
    return None


def _merge(common: Path, flavour: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in (common, flavour):
        subprocess.run(["cp", "-rsf", f"{src}/.", f"{tmp}/"], check=True)
    (tmp / ".complete").write_text(f"{common}\n{flavour}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
