#!/usr/bin/env bash
# Ensure a DWARF vmlinux for the installed Debian 6.12 kernel exists for drgn
# (BTF alone is not enough for drgn; docs/kernels.md "Ground truth: drgn").
# Usage: scripts/fetch-dbg-vmlinux.sh [RELEASE]   (default: newest /boot/vmlinuz-6.12.*)
set -euo pipefail

cache_dir=/var/cache/anontrace

if [[ $# -ge 1 ]]; then
    release=$1
else
    # sort -V so 6.12.117 beats 6.12.99
    newest=$(ls -1 /boot/vmlinuz-6.12.* 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z $newest ]]; then
        echo "no /boot/vmlinuz-6.12.* found: apt-get install linux-image-6.12-amd64" >&2
        exit 1
    fi
    release=${newest#/boot/vmlinuz-}
fi

target=$cache_dir/vmlinux-$release
if [[ -s $target ]]; then
    echo "$target"
    exit 0
fi

mkdir -p "$cache_dir"
# Work next to the target (not /tmp, often a small tmpfs): the .deb is about 1 GB.
tmp=$(mktemp -d "$cache_dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pkg=linux-image-$release-dbg
# apt-get download writes into the cwd; _apt must be able to write there.
chmod 0777 "$tmp"
(cd "$tmp" && apt-get download "$pkg" >&2)
deb=$(ls -1 "$tmp"/*.deb)

member=./usr/lib/debug/boot/vmlinux-$release
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" "$member"
rm -f "$deb"
# Rename within one filesystem so a concurrent reader never sees a partial file.
mv "$tmp/$member" "$target.part"
mv "$target.part" "$target"

echo "$target"
