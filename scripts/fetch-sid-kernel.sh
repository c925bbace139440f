#!/usr/bin/env bash
# Unpack a Linux kernel from Debian sid for the guest tests, without
# installing it: its packages depend on sid's base system, so they never
# enter dpkg's database. apt reads a configuration of its own (sid only,
# under /var/cache/anontrace/sid-apt), not the system's sources. Puts:
#   the image        /boot/vmlinuz-RELEASE (where tests/guest/boot.py looks)
#   the modules      /lib/modules/RELEASE, then depmod (virtme-ng loads the
#                    guest's 9p/virtio modules from there)
#   the headers      /usr/src/linux-headers-RELEASE{,-common}, with the
#                    /lib/modules/RELEASE/build link BCC compiles against
#   the debug image  /var/cache/anontrace/vmlinux-RELEASE (drgn)
# Usage: scripts/fetch-sid-kernel.sh [RELEASE]   (default 7.2.13+deb14-amd64)
set -euo pipefail

release=${1:-7.2.13+deb14-amd64}
version=${release%-amd64}                      # 7.2.13+deb14
cache=/var/cache/anontrace
vmlinux=$cache/vmlinux-$release
modules=/lib/modules/$release

if [[ -s /boot/vmlinuz-$release && -s $modules/modules.dep && -d /usr/src/linux-headers-$release \
      && -f $vmlinux && ! -L $vmlinux ]]; then
    echo "fetch-sid-kernel: $release ready"
    exit 0
fi

aptdir=$cache/sid-apt
mkdir -p "$aptdir"/etc/apt/{apt.conf.d,preferences.d,sources.list.d} \
         "$aptdir"/state/lists/partial "$aptdir"/cache/archives/partial
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
    > "$aptdir/etc/apt/sources.list"
apt_opts=(-o "Dir::Etc=$aptdir/etc/apt" -o "Dir::State=$aptdir/state"
          -o "Dir::Cache=$aptdir/cache" -o "Debug::NoLocking=1")
apt-get "${apt_opts[@]}" -q update

# Work next to the cache (not /tmp, often a small tmpfs): the debug package is
# about 1 GB.
tmp=$(mktemp -d "$cache/.sid.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
chmod 0777 "$tmp"      # apt-get download writes as _apt into the cwd
pkgs=(linux-binary-$release linux-base-$release linux-modules-$release
      linux-headers-$release linux-headers-$version-common linux-image-$release-dbg)
(cd "$tmp" && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}")

# Unpack each package beside, then move in only the kernel's own trees: a
# package's ./ and ./usr entries must not touch the system's directories.
root=$tmp/root
mkdir -p "$root"
for p in "${pkgs[@]}"; do
    [[ $p == *-dbg ]] && continue
    dpkg-deb -x "$tmp/${p}"_*.deb "$root"
done
rm -rf "$modules" "/usr/src/linux-headers-$release" "/usr/src/linux-headers-$version-common"
cp -a "$root/usr/lib/modules/$release" "$modules"
cp -a "$root/usr/src/linux-headers-$release" "$root/usr/src/linux-headers-$version-common" /usr/src/
cp "$modules/vmlinuz" "/boot/vmlinuz-$release.part"
mv "/boot/vmlinuz-$release.part" "/boot/vmlinuz-$release"
depmod -a "$release"

dbg=$(ls -1 "$tmp"/linux-image-"$release"-dbg_*.deb)
# boot/vmlinux-RELEASE may be a link to lib/modules/RELEASE/vmlinux (as in
# 7.2's packages): take both in the one pass over the archive.
dpkg-deb --fsys-tarfile "$dbg" | tar -x -C "$tmp" --wildcards './usr/lib/debug/*vmlinux*'
file=$(readlink -f "$tmp/usr/lib/debug/boot/vmlinux-$release")
[[ -f $file ]] || { echo "fetch-sid-kernel: no vmlinux in $dbg" >&2; exit 1; }
mv "$file" "$vmlinux.part"
mv "$vmlinux.part" "$vmlinux"
echo "fetch-sid-kernel: $release ready: /boot/vmlinuz-$release, $modules, $vmlinux"
