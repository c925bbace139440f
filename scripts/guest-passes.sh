#!/usr/bin/env bash
# Run inside a QEMU guest by scripts/test.sh (kept out of the guest
# command itself: vng passes that on the kernel command line, which holds
# 2048 bytes). Runs one shard of the kernel tests for each method in turn;
# test.sh boots one guest per shard, side by side. The guest's kernel log and
# memory go to RESULTS as they come.
# Usage: scripts/guest-passes.sh SERIES "METHODS" RESULTS PYTHON SHARD
set -u
series=$1 methods=$2 results=$3 py=$4 shard=$5
dmesg -w > "$results/$series-$shard-dmesg.log" 2>&1 &
watch=$!
(while sleep 15; do echo "$(date +%T) $(free -m | sed -n 2p)"; done) \
    > "$results/$series-$shard-memory.log" 2>&1 &
watch="$watch $!"
for m in $methods; do
    echo "== guest $(uname -r) $m, shard $shard/2"
    ANONTRACE_SHARD=$shard/2 ANONTRACE_GUEST=1 ANONTRACE_TEST_BACKEND=$m "$py" -m pytest -q -rsx \
        --durations=8 -p no:cacheprovider --basetemp="/tmp/pytest-$m-$shard" tests/kernel \
        > "$results/$series-$m-$shard.log" 2>&1
    echo $? > "$results/$series-$m-$shard.rc"
done
# shellcheck disable=SC2086
kill $watch
