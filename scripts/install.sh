#!/usr/bin/env bash
# Install what anontrace needs on Debian 12, as root, into ./.venv.
#   scripts/install.sh          runtime: BCC, bpftool, headers, the venv
#   scripts/install.sh --test   also: the 6.1 and 6.12 kernels, Linux 7.2
#                               unpacked from Debian sid, QEMU and virtme-ng
#                               for the guest tests, gcc, drgn, the 6.12 and
#                               7.2 debug vmlinux for ground truth and
#                               bpftrace (the peer bench/fork_overhead.py
#                               compares against), podman and mmdebstrap
#                               (tests/kernel/test_image.py builds the image
#                               with scripts/build-image.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (apt-get and BPF need it)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_pkgs=(python3 python3-venv python3-pip python3-bpfcc bpftool linux-headers-amd64 kmod)
if [ "$want_test" = 1 ]; then
    apt_pkgs+=(gcc libc6-dev make linux-image-amd64 linux-image-6.12-amd64
               linux-headers-6.12-amd64 qemu-system-x86 busybox-static prometheus
               bpftrace man-db groff-base tmux
               podman runc mmdebstrap python3-setuptools python3-wheel)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian's prometheus package (promtool, and the server the end-to-end test
# starts on a free loopback port) enables a daemon on :9090: the tests need
# none of it running.
if [ "$want_test" = 1 ] && command -v systemctl >/dev/null && \
        systemctl is-enabled prometheus >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# BCC's Python module lives in Debian's python3: the venv must see it.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ "$want_test" = 1 ]; then
    .venv/bin/pip install -q -e '.[test]'
    scripts/fetch-dbg-vmlinux.sh
    scripts/fetch-sid-kernel.sh
else
    .venv/bin/pip install -q -e .
fi
echo "install.sh: ready: $(pwd)/.venv/bin/anontrace"
