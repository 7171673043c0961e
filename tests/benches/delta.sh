#!/usr/bin/env bash
# Delta replication under steady random 4 KiB writes: wire bytes per interval vs unique
# bytes written per interval, and the RPO lag.
#
# Each run: a fresh lab, a 1 GiB disk on hv-a protected to hv-b, then for DURATION
# seconds RATE writes of 4 KiB per second at random 4 KiB-aligned offsets through NBD
# (one qemu-io per second, commands on stdin). Data: distinct 4 KiB blocks from a pool of
# 20 000 (no block repeats within 20 s), each 1 KiB random + 3 KiB of log-like text, so
# zstd has something VM-like to work on (~0.3 ratio). While writing, `vm show --json` is
# sampled every second: replication.rpo_lag_ms (max, p95) and bytes_replicated.
# Wire bytes = bytes_replicated (the data messages as sent) from protection done to
# caught up after the writes; tcp = TCP payload both ways on hv-b's peer port in the
# same window (TLS, HTTP/2, acks). Unique bytes = distinct blocks per interval-sized
# window of the write schedule x 4 KiB, summed.
#
# Runs: 2 s interval, 2 s + --compression, 30 s interval (RUN30=0 skips it).
# Usage: tests/benches/delta.sh [DURATION] [RATE]    (default 60 s, 1000 writes/s;
#        builds --release; NO_BUILD=1 skips)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" = --one ]; then
    INTERVAL=$2 COMP=$3 DURATION=$4 RATE=$5
    source "$HERE/lib.sh"
    lab_start
    sr vm create --host hv-a --name vm1 --disk 1G >/dev/null || die "vm create"
    URI=$(disk_uri vm1)
    FLAGS=()
    [ "$COMP" = zstd ] && FLAGS+=(--compression)
    sr policy create --name p --interval "$INTERVAL" --retention 1h "${FLAGS[@]}" >/dev/null || die "policy create"
    sr cloud pair --source gold-a --target gold-b --policy p >/dev/null || die "cloud pair"
    sr protect vm1 --wait >"$WORK/protect.out" 2>&1 || { cat "$WORK/protect.out" >&2; die "protect failed"; }
    python3 - "$WORK" "$URI" "$PROVIDER_BIN" "$ADDR" "$INTERVAL" "$DURATION" "$RATE" "$COMP" "${AGENT_PORT[hv-b]}" <<'EOF'
import json, os, random, re, subprocess, sys, threading, time
work, uri, prov, addr, interval, duration, rate, comp, port = sys.argv[1:]
duration, rate = int(duration), int(rate)
iv = int(interval.rstrip("s")) if interval.endswith("s") else int(interval.rstrip("m")) * 60
BS, NBLK, POOL = 4096, (1 << 30) // 4096, 20000
pool = f"{work}/pool"
os.makedirs(pool)
rnd = random.Random(7)
for i in range(POOL):
    text = "".join(f"{i:06d} {j:04d} INFO service=replica op=write status=ok latency_us={rnd.randrange(999):03d}\n" for j in range(64))
    with open(f"{pool}/{i}", "wb") as f:
        f.write(os.urandom(1024) + text.encode()[:3072].ljust(3072, b"\0"))
def show():
    out = subprocess.run([prov, "--connect", addr, "--certs", f"{work}/op", "--json", "vm", "show", "vm1"],
                         capture_output=True, text=True)
    return (json.loads(out.stdout).get("replication") or {}) if out.returncode == 0 else {}
def lo():  # TCP payload both ways on hv-b's peer port (see peer_tcp_bytes in lib.sh)
    out = subprocess.run(["ss", "-Htin", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return sum(int(v) for v in re.findall(r"bytes_(?:acked|received):(\d+)", out))
samples, stop = [], threading.Event()
def sampler():
    while not stop.is_set():
        t = time.time(); r = show()
        samples.append((t, r.get("rpo_lag_ms"), int(r.get("bytes_replicated") or 0), r.get("state")))
        stop.wait(max(0, 1 - (time.time() - t)))
b0, lo0 = int(show().get("bytes_replicated") or 0), lo()
th = threading.Thread(target=sampler); th.start()
schedule, k, late, t0 = [], 0, 0, time.time()
for sec in range(duration):
    blocks = rnd.sample(range(NBLK), rate)
    cmds = "".join(f"write -q -s {pool}/{(k + i) % POOL} {b * BS} 4k\n" for i, b in enumerate(blocks))
    k += rate
    p = subprocess.run(["qemu-io", "-f", "raw", uri], input=cmds, capture_output=True, text=True)
    if p.returncode != 0 or "error" in p.stdout.lower() + p.stderr.lower():
        print("qemu-io failed:", (p.stdout + p.stderr)[-500:], file=sys.stderr); sys.exit(1)
    schedule.append((time.time() - t0, blocks))
    wait = t0 + sec + 1 - time.time()
    if wait > 0: time.sleep(wait)
    else: late += 1
write_s = time.time() - t0
# Caught up: two samples in a row with lag below the interval + 2 s and no new bytes.
end = time.time() + max(60, 3 * iv)
last = None
while time.time() < end:
    time.sleep(1)
    cur = int(show().get("bytes_replicated") or 0)
    if last is not None and cur == last and time.time() - t0 > duration + iv + 2: break
    last = cur
stop.set(); th.join()
wire = int(show().get("bytes_replicated") or 0) - b0
lo_b = lo() - lo0
# Unique bytes per interval-sized window of the schedule.
windows = {}
for t, blocks in schedule:
    windows.setdefault(int(t // iv), set()).update(blocks)
unique = sum(len(s) for s in windows.values()) * BS
written = len(schedule) * rate * BS
n_iv = max(1, round(write_s / iv))
lags = sorted(l for (t, l, b, s) in samples if l is not None and t - t0 <= duration + 1)
p95 = lags[min(len(lags) - 1, int(0.95 * len(lags)))] if lags else -1
mx = lags[-1] if lags else -1
print(json.dumps(dict(interval=interval, comp=comp, write_s=round(write_s, 1), late_seconds=late,
    written=written, unique=unique, wire=wire, lo=lo_b, intervals=n_iv,
    lag_max_ms=mx, lag_p95_ms=p95, lag_samples=len(lags))))
with open(f"{work}/samples.txt", "w") as f:
    for s in samples: f.write(f"{s[0]-t0:.1f} {s[1]} {s[2]} {s[3]}\n")
EOF
    exit 0
fi

source "$HERE/lib.sh"
build_release
DURATION=${1:-60}
RATE=${2:-1000}
RUNS=("2s none" "2s zstd")
[ "${RUN30:-1}" = 1 ] && RUNS+=("30s none")
RESULTS=()
for r in "${RUNS[@]}"; do
    read -r iv comp <<<"$r"
    echo "run: interval $iv, compression $comp, $DURATION s of $RATE x 4 KiB random writes/s ..." >&2
    out=$(NO_BUILD=1 "$0" --one "$iv" "$comp" "$DURATION" "$RATE") || die "run $r failed"
    RESULTS+=("$(tail -n 1 <<<"$out")")
done

echo
echo "delta replication, 1 GiB disk, $RATE random 4 KiB writes/s for $DURATION s ($((RATE * 4)) KiB/s), 1 KiB random + 3 KiB text per block"
printf '%-8s %-5s %9s %13s %13s %8s %13s %8s %10s %10s %6s\n' interval zstd intervals "unique B/iv" "wire B/iv" "wire/uniq" "tcp B/iv" "tcp/uniq" "lag max ms" "lag p95 ms" late_s
for j in "${RESULTS[@]}"; do
    jq -r '[.interval, .comp, .intervals, (.unique / .intervals | floor), (.wire / .intervals | floor),
            ((.wire / .unique * 100 | round) / 100), (.lo / .intervals | floor), ((.lo / .unique * 100 | round) / 100),
            .lag_max_ms, .lag_p95_ms, .late_seconds] | @tsv' <<<"$j" |
        awk -F'\t' '{ printf "%-8s %-5s %9s %13s %13s %8s %13s %8s %10s %10s %6s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }'
done
echo "goal: RPO lag held under the 30 s policy (lag max < 30000 ms); wire/unique <= 1 without zstd means no write amplification"
echo "(late_s: seconds in which the writer could not issue its $RATE writes within the second)"
load_note
