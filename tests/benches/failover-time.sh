#!/usr/bin/env bash
# Unplanned failover time: from the failover command to the replica's NBD export
# answering a read, for a 1 GiB and a 16 GiB sparse disk with many recovery points.
#
# Each run: a fresh lab, vm1 on hv-a with one sparse disk, 256 MiB of it written, a 1 s
# policy, protected to hv-b; then POINTS_S seconds of writes (8 x 64 KiB at random offsets
# spread over the whole disk every second) so that a point is made every second. Then
# the primary agent is killed (SIGKILL: unplanned, the host is gone), the provider is
# left to notice it is disconnected, and the clock starts at
#   provider failover unplanned vm1 --point latest --wait     (MODE=provider, default)
#   agent --data-dir hv-b failover vm1                        (MODE=local)
# with a poller running `qemu-io -c 'read 0 4k'` on the replica's export every 20 ms.
# Figures: time to the first successful read, and time until the command returned.
#
# Usage: tests/benches/failover-time.sh     (builds --release; NO_BUILD=1 skips;
#        POINTS_S=60 seconds of points; MODE=provider|local|both)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" = --one ]; then
    DISK=$2 POINTS_S=$3 MODE=$4
    source "$HERE/lib.sh"
    lab_start
    sr vm create --host hv-a --name vm1 --disk "$DISK" >/dev/null || die "vm create"
    URI=$(disk_uri vm1)
    SIZE=$(vm_json vm1 | jq -r '.disks[0].size_bytes // empty')
    [ -n "$SIZE" ] || SIZE=$(stat -c %s "$(find "$WORK/hv-a/vms/vm1" -maxdepth 1 -type f -size +1M | head -1)")
    qemu-io -f raw -c 'write -P 0x11 0 256M' "$URI" >/dev/null || die "initial write"
    sr policy create --name p --interval 1s --retention 1h >/dev/null || die "policy create"
    sr cloud pair --source gold-a --target gold-b --policy p >/dev/null || die "cloud pair"
    sr protect vm1 --wait >"$WORK/protect.out" 2>&1 || { cat "$WORK/protect.out" >&2; die "protect failed"; }
    # Points: writes every second for POINTS_S seconds.
    end=$(($(date +%s) + POINTS_S))
    n=0
    while [ "$(date +%s)" -lt "$end" ]; do
        cmds=()
        for _ in 1 2 3 4 5 6 7 8; do
            off=$(((RANDOM * 32768 + RANDOM) % (SIZE / 65536) * 65536))
            cmds+=(-c "write -q -P $((n % 250 + 1)) $off 64k")
        done
        qemu-io -f raw "${cmds[@]}" "$URI" >/dev/null || die "writes"
        n=$((n + 1))
        sleep 1
    done
    sleep 3 # let the last writes become a point
    POINTS=$(sr --json points vm1 | jq 'if type == "array" then length else (.points | length) end' || echo '?')
    LAG=$(vm_json vm1 | jq -r '.replication.rpo_lag_ms // "?"' || echo '?')
    NLOGS=$(find "$WORK/hv-b" -type f | wc -l)
    # Unplanned: the primary host is gone.
    kill -9 "${AGENT_PID[hv-a]}"
    wait "${AGENT_PID[hv-a]}" 2>/dev/null || true
    hv_a_down() { [ "$(sr --json host list | jq -r '[.[]? // .hosts[]? | select(.name == "hv-a" or .host == "hv-a")][0].connected')" = false ]; }
    wait_until 60 hv_a_down || echo "warning: the provider still shows hv-a connected" >&2
    # The replica's export: vm1-disk0 on the nbd.sock of whichever VM folder hv-b makes.
    nbd_up() {
        local s
        for s in "$WORK"/hv-b/vms/*/nbd.sock; do
            [ -S "$s" ] && qemu-io -f raw -c 'read -q 0 4k' "nbd+unix:///vm1-disk0?socket=$s" >/dev/null 2>&1 && return 0
        done
        return 1
    }
    ! nbd_up || die "hv-b already serves vm1-disk0 before the failover"
    (while ! nbd_up; do sleep 0.02; done; now_s >"$WORK/nbd_ok") &
    POLL=$!
    PIDS+=($POLL)
    start=$(now_s)
    if [ "$MODE" = local ]; then
        "$AGENT_BIN" --data-dir "$WORK/hv-b" failover vm1 >"$WORK/failover.out" 2>&1 || { cat "$WORK/failover.out" >&2; die "local failover failed"; }
    else
        timeout 120 "$PROVIDER_BIN" --connect "$ADDR" --certs "$WORK/op" failover unplanned vm1 --point latest --wait \
            >"$WORK/failover.out" 2>&1 || { cat "$WORK/failover.out" >&2; die "failover failed"; }
    fi
    CMD_S=$(elapsed "$start")
    for _ in $(seq 300); do [ -s "$WORK/nbd_ok" ] && break; sleep 0.1; done
    if [ -s "$WORK/nbd_ok" ]; then
        NBD_S=$(awk -v a="$start" -v b="$(cat "$WORK/nbd_ok")" 'BEGIN { printf "%.3f", b - a }')
    else
        NBD_S=timeout
    fi
    # Data check (not timed): the failed-over disk equals the dead primary's image (the
    # writes stopped 3 s before the kill, so the latest point holds all of them).
    SAME=unchecked
    for sock in "$WORK"/hv-b/vms/*/nbd.sock; do
        if qemu-img compare -q -f raw -F raw "$WORK/hv-a/vms/vm1/disk0.img" "nbd+unix:///vm1-disk0?socket=$sock" 2>/dev/null; then
            SAME=identical
        else
            SAME=DIFFERENT
        fi
    done
    echo "{\"disk\":\"$DISK\",\"mode\":\"$MODE\",\"points\":\"$POINTS\",\"intervals_written\":$n,\"lag_ms_before\":\"$LAG\",\"replica_files\":$NLOGS,\"nbd_s\":\"$NBD_S\",\"cmd_s\":\"$CMD_S\",\"same\":\"$SAME\"}"
    exit 0
fi

source "$HERE/lib.sh"
build_release
POINTS_S=${POINTS_S:-60}
MODE=${MODE:-provider}
MODES=("$MODE")
[ "$MODE" = both ] && MODES=(provider local)
RESULTS=()
for m in "${MODES[@]}"; do
    for d in 1G 16G; do
        echo "run: $d disk, $POINTS_S s of 1 s points, failover via $m ..." >&2
        out=$(NO_BUILD=1 "$0" --one "$d" "$POINTS_S" "$m") || die "run $d $m failed"
        RESULTS+=("$(tail -n 1 <<<"$out")")
    done
done
echo
echo "unplanned failover (primary agent killed), time from the command to the replica's NBD export answering"
printf '%-6s %-9s %8s %10s %10s %14s %12s %8s %10s\n' disk via points intervals "lag ms" "nbd read s" "command s" "goal<2s" "data"
for j in "${RESULTS[@]}"; do
    jq -r '[.disk, .mode, .points, .intervals_written, .lag_ms_before, .nbd_s, .cmd_s,
            (if (.nbd_s | tonumber? // 99) < 2 then "met" else "MISSED" end), .same] | @tsv' <<<"$j" |
        awk -F'\t' '{ printf "%-6s %-9s %8s %10s %10s %14s %12s %8s %10s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }'
done
echo "(points: recovery points listed on the replica before failover; intervals: 1 s cycles with writes;"
echo " lag: rpo_lag_ms just before the kill; data: failed-over disk vs the dead primary's image)"
load_note
