#!/usr/bin/env bash
# Build the anontrace container image from Debian packages alone, as root on
# Debian 12, with podman:
#   1. apt-installs podman, runc and mmdebstrap if missing;
#   2. pins podman's storage (/etc/containers/storage.conf: overlay), only
#      where podman has no storage yet; podman itself runs with the project's
#      deploy/container/containers.conf (CONTAINERS_CONF: runc, ulimits);
#   3. builds the base image localhost/anontrace-base:bookworm with
#      mmdebstrap --variant=minbase (from Debian's archive, no registry), if
#      absent or with --rebuild-base;
#   4. builds the anontrace wheel from the checkout (its files, not build/);
#   5. builds deploy/container/Containerfile as localhost/anontrace:<version>
#      and localhost/anontrace:latest (<version>: the wheel's, i.e. setup.cfg's).
# Idempotent: a second run reuses the base and podman's layer cache.
# Usage: scripts/build-image.sh [--rebuild-base] [--no-cache]
# Prints the image reference on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

BASE=localhost/anontrace-base:bookworm
IMAGE=localhost/anontrace
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

rebuild_base=0 no_cache=()
for arg in "$@"; do
    case $arg in
        --rebuild-base) rebuild_base=1 ;;
        --no-cache) no_cache=(--no-cache) ;;
        *) echo "usage: scripts/build-image.sh [--rebuild-base] [--no-cache]" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" -ne 0 ]; then
    echo "build-image.sh: run as root (apt-get, mmdebstrap and podman's storage need it)" >&2
    exit 1
fi
log() { echo "build-image.sh: $*"; }

# 1. Tools (no catatonit: podman's --init is refused with --pid=host, and
# not needed since anontrace is then not PID 1).
export DEBIAN_FRONTEND=noninteractive
pkgs=(podman runc mmdebstrap python3 python3-pip python3-setuptools python3-wheel git)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. Configuration, before the first podman call. podman records its storage
# driver at first use and refuses a different one later: the storage config
# is written once, where podman has no storage yet, and never changed.
export CONTAINERS_CONF=$repo/deploy/container/containers.conf
if [ ! -e /etc/containers/storage.conf ] && [ ! -e /var/lib/containers/storage ]; then
    log "writing /etc/containers/storage.conf (overlay)"
    mkdir -p /etc/containers
    cat > /etc/containers/storage.conf <<'EOF'
# Written by anontrace's scripts/build-image.sh before podman's first use;
# podman refuses a changed driver once it has storage.
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
fi

work=$(mktemp -d /tmp/anontrace-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 3. The base: Debian 12 minbase with security and point-release updates.
# Documentation and translations are left out (dpkg path-exclude, kept in the
# image for the packages the Containerfile installs), copyright files kept;
# dpkg skips its fsyncs (force-unsafe-io, as Docker's Debian images do: a
# failed build is rebuilt, not repaired). /usr is merged by mmdebstrap's hook,
# as debootstrap does it, not by the usrmerge package (which brings perl).
if [ "$rebuild_base" = 1 ] || ! podman image exists "$BASE"; then
    log "mmdebstrap bookworm minbase -> $BASE"
    start=$SECONDS
    mmdebstrap --variant=minbase --mode=root --quiet \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='force-unsafe-io' \
        bookworm "$work/base.tar" \
        "deb $MIRROR bookworm main" \
        "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY bookworm-security main"
    podman import --quiet \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$work/base.tar" "$BASE" >/dev/null
    rm -f "$work/base.tar"
    log "base built in $((SECONDS - start)) s"
else
    log "base $BASE present (--rebuild-base to rebuild)"
fi

# 4. The wheel, built from the checkout's files (tracked and untracked, not
# ignored: no stale build/ or .venv) in a copy, with the last commit's time
# for every timestamp so an unchanged tree gives the same wheel and podman's
# layer cache holds.
mkdir -p "$work/src" "$work/context"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | tar -C "$repo" --null --ignore-failed-read -T - -cf - 2>/dev/null \
        | tar -C "$work/src" -xf -
else
    tar -C "$repo" --exclude=./.venv --exclude=./build --exclude=./results \
        --exclude='*.egg-info' -cf - . | tar -C "$work/src" -xf -
fi
/usr/bin/python3 -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    -w "$work/context" "$work/src"
wheels=("$work"/context/anontrace-*.whl)
wheel=$(basename "${wheels[0]}")
version=${wheel#anontrace-}
version=${version%%-*}
log "wheel $wheel"

# 5. The image.
start=$SECONDS
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE:$version" 2>/dev/null || true)
podman build --network=host --layers "${no_cache[@]}" \
    --build-arg "BASE=$BASE" --build-arg "VERSION=$version" \
    -f "$repo/deploy/container/Containerfile" \
    -t "$IMAGE:$version" -t "$IMAGE:latest" "$work/context"
# The image this tag named before, if now untagged, goes (its layers that the
# new one shares stay).
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE:$version")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] && \
        [ "$(podman image inspect --format '{{len .RepoTags}}' "$old_id" 2>/dev/null)" = 0 ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE:$version")
log "built $IMAGE:$version (and :latest), $((size / 1000000)) MB, in $((SECONDS - start)) s"
echo "$IMAGE:$version"
