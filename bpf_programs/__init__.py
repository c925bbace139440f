"""The BPF C programs (anontrace.bpf.c, census.bpf.c, anontrace_common.h),
installed as the package data of ``tracer.bpf``; BCC compiles them by path."""
