#!/usr/bin/env bash
# Compares the agent's NBD server (examples/nbd_export.rs) — untracked (a RawFile
# export) and tracked (every write logged to an HRL log before it is acknowledged, as
# for a protected VM) — with qemu-nbd, both serving a 1 GiB sparse raw image on a unix socket, through the same
# client: `qemu-img bench`.
#
# Fairness: both servers use the page cache and make data durable only on FLUSH/FUA.
# qemu-nbd runs with `-f raw --cache=writeback --aio=threads` (its defaults spelled out:
# no O_DIRECT, a thread pool for I/O, no unsafe cache mode); ours does positional
# read/write on the blocking pool and fdatasync on FLUSH. Each server gets its own
# identical image. Workloads run in the same order for both (the sequential write first,
# so later reads hit written, cached data), ROUNDS times alternating servers; the best
# run of each is reported (these VMs are noisy, up to 2x run to run).
#
# Usage: agent/benches/nbd-vs-qemu-nbd.sh [ROUNDS]   (from anywhere; builds --release)
set -euo pipefail
ROUNDS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
cargo build --release -q -p siterecovery-agent --example nbd_export
OURS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/nbd_export"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/tracked"
truncate -s 1G "$WORK/ours.img" "$WORK/qemu.img" "$WORK/tracked/disk0.img"
"$OURS_BIN" --socket "$WORK/ours.sock" --export disk "$WORK/ours.img" &
PIDS+=($!)
"$OURS_BIN" --tracked --socket "$WORK/tracked.sock" --export disk "$WORK/tracked/disk0.img" &
PIDS+=($!)
qemu-nbd -f raw --cache=writeback --aio=threads --persistent --shared=4 \
    --export-name disk --socket "$WORK/qemu.sock" "$WORK/qemu.img" &
PIDS+=($!)
for s in ours tracked qemu; do
    for _ in $(seq 100); do [ -S "$WORK/$s.sock" ] && break; sleep 0.1; done
    [ -S "$WORK/$s.sock" ] || { echo "server $s did not start" >&2; exit 1; }
done

# name | qemu-img bench arguments | unit
WORKLOADS=(
    "seq write 64k QD64|-w -s 64k -d 64 -c 16384|MB/s"
    "4k scattered write QD16|-w -s 4k -S 1052672 -d 16 -c 100000|IOPS"
    "seq read 64k QD16|-s 64k -d 16 -c 16384|MB/s"
    "seq read 64k QD64|-s 64k -d 64 -c 16384|MB/s"
)

# Prints the figure (MB/s or IOPS) of one run.
bench() { # server args unit
    local uri="nbd+unix:///disk?socket=$WORK/$1.sock" secs count size
    # shellcheck disable=SC2086
    secs=$(qemu-img bench -f raw -t none $2 "$uri" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    count=$(sed -n 's/.*-c \([0-9]*\).*/\1/p' <<<"$2")
    size=$(sed -n 's/.*-s \([0-9]*\)k.*/\1/p' <<<"$2")
    if [ "$3" = "IOPS" ]; then
        awk -v c="$count" -v t="$secs" 'BEGIN { printf "%.0f", c / t }'
    else
        awk -v c="$count" -v s="$size" -v t="$secs" 'BEGIN { printf "%.0f", c * s * 1024 / t / 1e6 }'
    fi
}

declare -A BEST
for ((r = 1; r <= ROUNDS; r++)); do
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name args unit <<<"$w"
        for s in ours tracked qemu; do
            v=$(bench "$s" "$args" "$unit")
            key="$name/$s"
            if [ -z "${BEST[$key]:-}" ] || [ "$v" -gt "${BEST[$key]}" ]; then BEST[$key]=$v; fi
        done
    done
done

printf '%-26s %6s %10s %10s %10s %8s %8s\n' workload unit ours tracked qemu-nbd ours/q tracked/q
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name args unit <<<"$w"
    o=${BEST["$name/ours"]}; t=${BEST["$name/tracked"]}; q=${BEST["$name/qemu"]}
    printf '%-26s %6s %10s %10s %10s %8s %8s\n' "$name" "$unit" "$o" "$t" "$q" \
        "$(awk -v o="$o" -v q="$q" 'BEGIN { printf "%.2f", o / q }')" "$(awk -v o="$t" -v q="$q" 'BEGIN { printf "%.2f", o / q }')"
done
echo "(best of $ROUNDS rounds; qemu-img bench -f raw -t none ...; $(nproc) CPUs)"
