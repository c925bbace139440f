#!/usr/bin/env bash
# Run inside a QEMU guest by scripts/test.sh (kept out of the guest command
# itself: vng passes that on the kernel command line, which holds 2048 bytes).
# Each method's kernel tests run as two concurrent pytest shards; the guest's
# kernel log and memory go to RESULTS as they come (a guest that dies leaves
# no console output).
# Usage: scripts/guest-passes.sh SERIES "METHODS" RESULTS PYTHON
set -u
series=$1 methods=$2 results=$3 py=$4
dmesg -w > "$results/$series-dmesg.log" 2>&1 &
watch=$!
(while sleep 15; do echo "$(date +%T) $(free -m | sed -n 2p)"; done) \
    > "$results/$series-memory.log" 2>&1 &
watch="$watch $!"
for m in $methods; do
    echo "== guest $(uname -r) $m"
    shards=
    for s in 1 2; do
        (ANONTRACE_SHARD=$s/2 ANONTRACE_GUEST=1 ANONTRACE_TEST_BACKEND=$m "$py" -m pytest -q -rs \
            --durations=8 -p no:cacheprovider --basetemp="/tmp/pytest-$m-$s" tests/kernel \
            > "$results/$series-$m-$s.log" 2>&1
         echo $? > "$results/$series-$m-$s.rc") &
        shards="$shards $!"
    done
    # shellcheck disable=SC2086
    wait $shards
    cat "$results/$series-$m-1.log" "$results/$series-$m-2.log"
done
# shellcheck disable=SC2086
kill $watch
