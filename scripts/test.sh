#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. installs everything (scripts/install.sh --test),
#   2. lint (ruff), type checks (mypy) and the import layers (lint-imports),
#      then unit tests (pure logic, recorded fixtures),
#   3. kernel tests on the host kernel, per backend,
#   4. kernel tests inside Debian's 6.1 and 6.12 kernels and sid's 7.2
#      booted under QEMU (two guests per kernel, one per test shard, each
#      on one host thread), with fentry forced (kprobe too on 6.1 and 7.2) and the
#      automatic choice,
# then prints one `kernel <release> <method>: N passed, M failed` line per
# kernel and method (`, X xfailed, Y xpassed` added when a pass had any),
# and a total.
# Usage: scripts/test.sh [--no-install] [--no-guests] [--guests-only=6.1,6.12,7.2]
#   --guests-only runs only the named guest kernels (no lint, unit or host
#   tests): for developers re-checking one kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage="usage: scripts/test.sh [--no-install] [--no-guests] [--guests-only=SERIES,...]"
install=1 guests=1 host=1 series_list="6.1 6.12 7.2"
for arg in "$@"; do
    case $arg in
        --no-install) install=0 ;;
        --no-guests) guests=0 ;;
        --guests-only=*) host=0 series_list=${arg#--guests-only=} series_list=${series_list//,/ } ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
if [ "$install" = 1 ]; then
    scripts/install.sh --test || { echo "test.sh: install failed" >&2; exit 1; }
fi

py=$repo/.venv/bin/python
results=$repo/results
rm -rf "$results"
mkdir -p "$results"
status=0

run_pytest() {  # label, then pytest arguments
    local label=$1
    shift
    "$py" -m pytest -q -rsx --durations=8 -p no:cacheprovider "$@" 2>&1 | tee "$results/$label.log"
    local rc=${PIPESTATUS[0]}
    echo "$rc" > "$results/$label.rc"
    [ "$rc" = 0 ] || status=1
}

run_shards() {  # label, then pytest arguments: two concurrent shards (see below)
    local label=$1 s rc pids=()
    shift
    for s in 1 2; do
        ANONTRACE_SHARD=$s/2 "$py" -m pytest -q -rsx --durations=8 -p no:cacheprovider \
            --basetemp="/tmp/pytest-$label-$s" "$@" > "$results/$label-$s.log" 2>&1 &
        pids+=($!)
    done
    for s in 1 2; do
        wait "${pids[$((s - 1))]}"
        rc=$?
        echo "$rc" > "$results/$label-$s.rc"
        [ "$rc" = 0 ] || status=1
        cat "$results/$label-$s.log"
    done
}

boot_passes() {  # series, methods, shard: one guest runs those passes of that shard
    "$py" tests/guest/boot.py --kernel "$1" --cpus 2 --single-thread --timeout 2400 -- \
        "scripts/guest-passes.sh $1 '$2' $results $py $3"
}

run_guest() {  # series, methods, shard: that shard of each method's tests in one guest
    local series=$1 methods=$2 shard=$3 rc m left=
    boot_passes "$series" "$methods" "$shard"
    rc=$?
    # 255 is vng's "unexpected exit": the guest kernel died (its oops is in
    # the console above). The passes it cut short run again once in a new
    # guest, and the summary says so.
    [ "$rc" = 255 ] || return 0
    for m in $methods; do
        [ -e "$results/$series-$m-$shard.rc" ] || left="$left $m"
    done
    left=${left# }
    [ -n "$left" ] || return 0
    echo "$series shard $shard ($left)" > "$results/$series-$shard.crash"
    echo "test.sh: the $series guest kernel crashed (console above); running '$left'" \
        "of shard $shard again in a new guest, once" >&2
    for m in $left; do
        [ -e "$results/$series-$m-$shard.log" ] && \
            mv "$results/$series-$m-$shard.log" "$results/$series-$m-$shard.crashed"
    done
    boot_passes "$series" "$left" "$shard"
}

if [ "$host" = 1 ]; then
    echo "== lint (ruff), types (mypy), layers (lint-imports)"
    "$repo/.venv/bin/ruff" check . 2>&1 | tee "$results/lint.log"
    lint_rc=${PIPESTATUS[0]}
    "$repo/.venv/bin/mypy" 2>&1 | tee -a "$results/lint.log"
    types_rc=${PIPESTATUS[0]}
    "$repo/.venv/bin/lint-imports" 2>&1 | tee -a "$results/lint.log"
    layers_rc=${PIPESTATUS[0]}
    echo "lint: ruff status $lint_rc, mypy status $types_rc, lint-imports status $layers_rc" \
        | tee -a "$results/lint.log"
    [ "$lint_rc" = 0 ] && [ "$types_rc" = 0 ] && [ "$layers_rc" = 0 ] || status=1

    echo "== unit tests"
    run_pytest unit tests/unit

    for method in tracepoint auto; do
        echo "== kernel tests: host $(uname -r), $method"
        # Two concurrent shards, as in the guests below.
        ANONTRACE_TEST_BACKEND=$method run_shards "host-$method" tests/kernel
    done
fi

if [ "$guests" = 1 ]; then
    for series in $series_list; do
        # kprobe is forced on the oldest and the newest kernel (CI time
        # budget); 6.12 runs fentry and the automatic choice.
        methods="auto fentry kprobe"
        [ "$series" = 6.12 ] && methods="auto fentry"
        # 7.2 preempts tracepoint programs: its tracepoint pass runs the
        # family tests through the kmem programs' second copies.
        [ "$series" = 7.2 ] && methods="auto fentry kprobe tracepoint"
        echo "== kernel tests: Debian $series under QEMU ($methods), two guests"
        # Each method's tests are split in two shards (whole modules,
        # balanced by measured guest time: tests/kernel/conftest.py), each
        # shard in its own guest, the two guests side by side. A guest has
        # two vCPUs on one host thread (single-threaded TCG): the two host
        # threads one two-vCPU guest used before, without the stale
        # translations of patched kernel text that multi-threaded TCG ran
        # (boot.py).
        gpids=()
        for s in 1 2; do
            run_guest "$series" "$methods" "$s" > "$results/$series-$s-console.log" 2>&1 &
            gpids+=($!)
        done
        wait "${gpids[@]}"
        for s in 1 2; do
            echo "-- guest $series, shard $s: console"
            cat "$results/$series-$s-console.log"
        done
        for m in $methods; do
            for s in 1 2; do
                cat "$results/$series-$m-$s.log" 2>/dev/null
                rc=$(cat "$results/$series-$m-$s.rc" 2>/dev/null || echo missing)
                if [ "$rc" != 0 ]; then
                    echo "test.sh: guest $series $m shard $s: pytest status $rc" >&2
                    status=1
                fi
            done
        done
    done
fi

echo
echo "== summary"
# One line per kernel and method: the shards' lines added up (expected
# failures and unexpected passes too, when a pass had any).
passed=0 failed=0 xfailed=0 xpassed=0
declare -A kpass=() kfail=() kxf=() kxp=()
keys=()
line_re='^kernel .+: [0-9]+ passed, [0-9]+ failed(, [0-9]+ xfailed, [0-9]+ xpassed)?$'
while read -r line; do
    key=$(sed -E 's/ \[shard [0-9]+\/[0-9]+\]//; s/: [0-9]+ passed, [0-9]+ failed.*$//' <<<"$line")
    p=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*$/\1/' <<<"$line")
    f=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*$/\2/' <<<"$line")
    xf=0 xp=0
    if [[ $line =~ ([0-9]+)\ xfailed,\ ([0-9]+)\ xpassed$ ]]; then
        xf=${BASH_REMATCH[1]} xp=${BASH_REMATCH[2]}
    fi
    [ -n "${kpass[$key]+set}" ] || { keys+=("$key"); kpass[$key]=0; kfail[$key]=0; kxf[$key]=0; kxp[$key]=0; }
    kpass[$key]=$((kpass[$key] + p)) kfail[$key]=$((kfail[$key] + f))
    kxf[$key]=$((kxf[$key] + xf)) kxp[$key]=$((kxp[$key] + xp))
    passed=$((passed + p)) failed=$((failed + f)) xfailed=$((xfailed + xf)) xpassed=$((xpassed + xp))
done < <(grep -h -E "$line_re" "$results"/*.log)
for key in "${keys[@]}"; do
    extra=""
    if [ "${kxf[$key]}" -gt 0 ] || [ "${kxp[$key]}" -gt 0 ]; then
        extra=", ${kxf[$key]} xfailed, ${kxp[$key]} xpassed"
    fi
    echo "$key: ${kpass[$key]} passed, ${kfail[$key]} failed$extra"
done
unit=$(grep -h -E '^[0-9]+ passed' "$results/unit.log" | tail -n 1)
echo "unit tests: ${unit:-none}"
echo "kernel: $passed passed, $failed failed, $xfailed xfailed, $xpassed xpassed"
if compgen -G "$results/*.crash" > /dev/null; then
    echo "guest kernel crashes, passes run again: $(cat "$results"/*.crash | paste -sd ';')"
fi
exit $status
