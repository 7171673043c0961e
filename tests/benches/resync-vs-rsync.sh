#!/usr/bin/env bash
# Resync vs rsync: 1% of the 4 KiB blocks of a 1 GiB disk changed at random offsets.
#
# Ours: a 1 GiB disk on hv-a filled with random data through NBD, protected to hv-b.
# The replica agent is stopped (SIGTERM), 1% of the 4 KiB blocks are overwritten through
# NBD at random 4 KiB-aligned offsets, the replica agent is started again and
# `provider resync vm1 --wait` is timed. The policy interval is long (10 min) so that no
# delta cycle ships the change log before the resync drops it (the resync would then
# find nothing to send). Bytes: the agent's own count (block data sent, from its log),
# and all TCP payload both ways on hv-b's peer port during the job (hashes, TLS, HTTP/2).
# Peer: `rsync --inplace --no-whole-file -I --stats` of the same changed 1 GiB file onto
# the original through an rsync daemon on loopback (bytes from --stats).
# Also shown: what a fixed block size B would send for this change pattern (blocks
# touched x B), computed from the offsets, to tell which block size meets 1.2x.
#
# Usage: tests/benches/resync-vs-rsync.sh     (builds --release; NO_BUILD=1 skips)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
build_release
command -v rsync >/dev/null || die "rsync is needed (apt-get install rsync)"

SIZE_MB=1024
BLOCK=4096
NBLOCKS=$((SIZE_MB * 256))
NCHANGE=$((NBLOCKS / 100))

ORIG=$WORK/orig.img
head -c $((SIZE_MB << 20)) /dev/urandom >"$ORIG"

# Change set: NCHANGE distinct random 4 KiB blocks; a qemu-io command file and the same
# change applied to a copy for rsync.
cp "$ORIG" "$WORK/new.img"
python3 - "$WORK" "$NBLOCKS" "$NCHANGE" <<'EOF'
import random, sys, os
work, nblocks, nchange = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(42)
blocks = sorted(rnd.sample(range(nblocks), nchange))
with open(f"{work}/changes.qemu-io", "w") as cmds, open(f"{work}/new.img", "r+b") as f:
    for b in blocks:
        pat = rnd.randrange(1, 256)
        cmds.write(f"write -P {pat} {b * 4096} 4k\n")
        f.seek(b * 4096); f.write(bytes([pat]) * 4096)
with open(f"{work}/blocks.txt", "w") as out:
    out.write("\n".join(map(str, blocks)) + "\n")
# Blocks touched for other block sizes (bytes a fixed-block compare would send).
with open(f"{work}/model.txt", "w") as out:
    for kib in (4, 8, 16, 32, 64):
        per = kib // 4
        touched = len({b // per for b in blocks})
        hashes = nblocks // per * 16
        out.write(f"{kib} {touched} {touched * kib * 1024} {hashes}\n")
EOF
CHANGED_BYTES=$((NCHANGE * BLOCK))

# --- ours -----------------------------------------------------------------------------------
lab_start
sr vm create --host hv-a --name vm1 --disk ${SIZE_MB}M >/dev/null || die "vm create"
URI=$(disk_uri vm1)
qemu-img convert -n -f raw -O raw "$ORIG" "$URI" || die "writing the disk through NBD"
sr policy create --name p --interval 10m --retention 1h >/dev/null || die "policy create"
sr cloud pair --source gold-a --target gold-b --policy p >/dev/null || die "cloud pair"
sr protect vm1 --wait >"$WORK/protect.out" 2>&1 || { cat "$WORK/protect.out" >&2; die "protect failed"; }

stop_agent hv-b
qemu-io -f raw "$URI" <"$WORK/changes.qemu-io" >/dev/null || die "qemu-io changes"
qemu-img compare -q -f raw -F raw "$WORK/new.img" "$URI" || die "the primary differs from the rsync source"
start_agent hv-b
wait_until 30 hosts_connected || die "hv-b did not reconnect"
sync

tcp0=$(peer_tcp_bytes "${AGENT_PORT[hv-b]}")
start=$(now_s)
sr resync vm1 --wait >"$WORK/resync.out" 2>&1 || { cat "$WORK/resync.out" >&2; die "resync failed"; }
OURS_S=$(elapsed "$start")
OURS_TCP=$(($(peer_tcp_bytes "${AGENT_PORT[hv-b]}") - tcp0))
JOB=$(sr --json job list | jq -r '[.[]? // .jobs[]? | select((.kind // "") | test("resync"; "i"))] | last | .id' || true)
sr --json job show "$JOB" >"$WORK/job.json" 2>/dev/null || true
REPL=$(vm_json vm1 | jq -c '.replication // {}' || echo '{}')
# The resync step's detail: "resync done: COMPARED blocks compared, SENT sent, X MiB on the wire";
# the agent logs the exact bytes: "resync done: SENT of COMPARED blocks differed, BYTES bytes sent".
RLOG=$(grep -o 'resync done: [0-9]* of [0-9]* blocks differed, [0-9]* bytes sent' "$WORK/hv-a.log" | tail -n 1 || true)
OURS_SENT=$(sed -n 's/resync done: \([0-9]*\) of \([0-9]*\) blocks differed, \([0-9]*\) bytes sent/\1/p' <<<"$RLOG")
OURS_CMP=$(sed -n 's/resync done: \([0-9]*\) of \([0-9]*\) blocks differed, \([0-9]*\) bytes sent/\2/p' <<<"$RLOG")
OURS_WIRE=$(sed -n 's/resync done: \([0-9]*\) of \([0-9]*\) blocks differed, \([0-9]*\) bytes sent/\3/p' <<<"$RLOG")
OURS_WIRE=${OURS_WIRE:-0}
DETAIL=$(jq -r '[.steps[]? | "\(.name) \((.ended_unix_ms - .started_unix_ms) / 1000) s: \(.detail)"] | join(" | ")' "$WORK/job.json" 2>/dev/null || true)

# Correctness (not timed): the replica's latest point equals the primary.
SAME=unchecked
RURI=$(sr point export vm1 --point latest 2>/dev/null | grep -o 'nbd[+a-z]*://[^ ]*' | head -1 || true)
if [ -n "$RURI" ]; then
    if qemu-img compare -q -f raw -F raw "$URI" "$RURI"; then SAME=identical; else SAME=DIFFERENT; fi
    sr point unexport vm1 >/dev/null 2>&1 || true
fi

# --- peer: rsync daemon on loopback ----------------------------------------------------------
mkdir -p "$WORK/rsyncd/mod"
cp "$ORIG" "$WORK/rsyncd/mod/disk.img"
RPORT=$(free_port)
cat >"$WORK/rsyncd.conf" <<EOF
use chroot = no
pid file = $WORK/rsyncd.pid
log file = $WORK/rsyncd.log
[mod]
    path = $WORK/rsyncd/mod
    read only = no
    uid = $(id -u)
    gid = $(id -g)
EOF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --port="$RPORT" --address=127.0.0.1 &
PIDS+=($!)
wait_until 10 bash -c "ss -Hltn 'sport = :$RPORT' | grep -q ." || die "rsync daemon did not listen"
sync
start=$(now_s)
rsync --inplace --no-whole-file -I --stats "$WORK/new.img" "rsync://127.0.0.1:$RPORT/mod/disk.img" >"$WORK/rsync.out" ||
    die "rsync failed"
RSYNC_S=$(elapsed "$start")
RSYNC_SENT=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$WORK/rsync.out" | tr -d ,)
RSYNC_RECV=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$WORK/rsync.out" | tr -d ,)
RSYNC_LIT=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$WORK/rsync.out" | tr -d ,)
cmp -s "$WORK/new.img" "$WORK/rsyncd/mod/disk.img" || die "rsync result differs"

x() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "1 GiB disk (random data), $NCHANGE of $NBLOCKS 4 KiB blocks changed at random offsets = $CHANGED_BYTES bytes"
printf '%-40s %8s %12s %9s %12s %9s\n' what seconds "data bytes" "x changed" "all bytes" "x changed"
printf '%-40s %8s %12s %9s %12s %9s\n' "ours: resync --wait (64 KiB, then 4 KiB)" "$OURS_S" "$OURS_WIRE" "$(x "$OURS_WIRE" $CHANGED_BYTES)" \
    "$OURS_TCP" "$(x "$OURS_TCP" $CHANGED_BYTES)"
printf '%-40s %8s %12s %9s %12s %9s\n' "rsync daemon --inplace --no-whole-file" "$RSYNC_S" "$RSYNC_SENT" "$(x "$RSYNC_SENT" $CHANGED_BYTES)" \
    "$((RSYNC_SENT + RSYNC_RECV))" "$(x $((RSYNC_SENT + RSYNC_RECV)) $CHANGED_BYTES)"
echo "(data: ours = block data sent (agent log), rsync = Total bytes sent; all: ours = TCP payload both ways on hv-b's peer port"
echo " (TLS, HTTP/2, hashes), rsync = sent + received (unencrypted protocol stream))"
echo "time ours/rsync: $(x "$OURS_S" "$RSYNC_S") (goal < 1)   data bytes/changed: $(x "$OURS_WIRE" $CHANGED_BYTES) (goal <= 1.2)"
echo "rsync: sent $RSYNC_SENT, received $RSYNC_RECV, literal $RSYNC_LIT; ours: ${OURS_SENT:-?} of ${OURS_CMP:-?} 64 KiB blocks differed (their differing 4 KiB sub-blocks sent); replica vs primary: $SAME"
echo "job $JOB: $DETAIL"
echo "fixed block size B for this change pattern (data = blocks touched x B; hashes = 16 B per block, one per block of the disk):"
printf '  %8s %10s %14s %10s %12s %16s\n' B touched "data bytes" "x changed" "hash bytes" "x incl. hashes"
while read -r kib touched bytes hashes; do
    printf '  %5s KiB %10s %14s %10s %12s %16s\n' "$kib" "$touched" "$bytes" "$(x "$bytes" $CHANGED_BYTES)" "$hashes" \
        "$(x $((bytes + hashes)) $CHANGED_BYTES)"
done <"$WORK/model.txt"
load_note
