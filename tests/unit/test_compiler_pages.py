"""Which mappings serve may drop after compiling: clean read-only file pages
of the compiler libraries only (never the relocated RELRO data)."""
from __future__ import annotations

from pathlib import Path

from tracer.kernel.bcc_glue import COMPILER_LIB, clean_mappings

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 100 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  0 kB
7f0000100000-7f0000900000 r-xp 00100000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                8000 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  0 kB
7f0000900000-7f0000a00000 r--p 00900000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Anonymous:          1024 kB
Private_Dirty:      1024 kB
Swap:                  0 kB
7f0000a00000-7f0000a10000 rw-p 00a00000 fe:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  64 kB
Anonymous:            64 kB
Private_Dirty:        64 kB
Swap:                  0 kB
7f0001000000-7f0001100000 r-xp 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1000 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  0 kB
7f0002000000-7f0002400000 r-xp 00000000 fe:01 789 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Rss:                4096 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  0 kB
"""


def test_only_clean_read_only_compiler_mappings(tmp_path: Path) -> None:
    f = tmp_path / "smaps"
    f.write_text(SMAPS)
    got = clean_mappings(COMPILER_LIB, str(f))
    assert got == [(0x7f0000000000, 0x7f0000100000), (0x7f0000100000, 0x7f0000900000),
                   (0x7f0002000000, 0x7f0002400000)]


def test_unreadable_smaps_drops_nothing(tmp_path: Path) -> None:
    assert clean_mappings(COMPILER_LIB, str(tmp_path / "missing")) == []
