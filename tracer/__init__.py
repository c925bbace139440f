"""anontrace: trace the Linux kernel's anon_vma lifecycle with eBPF."""

__version__ = "0.1.0"
