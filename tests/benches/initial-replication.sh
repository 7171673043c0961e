#!/usr/bin/env bash
# Initial replication throughput vs raw mutual-TLS throughput on loopback.
#
# Ours: a 2 GiB disk on hv-a, half of it allocated with random (incompressible) data in
# alternating 64 MiB extents (written through the agent's NBD export), protected to hv-b
# with a 2 s policy; the figure is allocated bytes / wall time of `protect vm1 --wait`
# (the whole Enable protection job: consistency point, copy, log merge, finalize).
# Peer: `openssl s_server` (TLS 1.3, client certificate required) sending the same
# amount of random data to `openssl s_client` on loopback, timed from the client's
# start to the last byte read.
#
# Usage: tests/benches/initial-replication.sh        (builds --release; NO_BUILD=1 skips)
#        COMPRESSION=1 ... to protect with a --compression policy.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
build_release
command -v openssl >/dev/null || die "openssl is needed"

DISK=2G
EXTENT_MB=64
TOTAL_MB=2048
ALLOC_MB=$((TOTAL_MB / 2))

# The data: a sparse 2 GiB raw file, random data in every other 64 MiB extent.
SRC=$WORK/src.img
truncate -s ${TOTAL_MB}M "$SRC"
for ((i = 0; i < TOTAL_MB / EXTENT_MB; i += 2)); do
    head -c $((EXTENT_MB << 20)) /dev/urandom | dd of="$SRC" bs=1M seek=$((i * EXTENT_MB)) conv=notrunc status=none
done
ALLOC_BYTES=$((ALLOC_MB << 20))

# --- peer: raw mTLS on loopback ---------------------------------------------------------
T=$WORK/tls
mkdir -p "$T"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=127.0.0.1 \
    -keyout "$T/s.key" -out "$T/s.pem" 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=client \
    -keyout "$T/c.key" -out "$T/c.pem" 2>/dev/null
# The payload: the allocated extents only, concatenated (the same bytes, from page cache).
for ((i = 0; i < TOTAL_MB / EXTENT_MB; i += 2)); do
    dd if="$SRC" bs=1M skip=$((i * EXTENT_MB)) count=$EXTENT_MB status=none
done >"$T/payload"
tls_run() { # the openssl CLI now and then ends a transfer after 16 KiB: up to 3 tries
    local try s
    for try in 1 2 3; do
        s=$(tls_try) && { echo "$s"; return 0; }
        echo "openssl transfer try $try was short: $s" >&2
    done
    return 1
}
tls_try() {
    # The server sends the payload (s_server stops at EOF on its stdin, so it cannot be
    # the receiver); the client reads ALLOC_BYTES and the pipe closes.
    local port start secs srv
    port=$(free_port)
    openssl s_server -quiet -tls1_3 -accept "$port" -cert "$T/s.pem" -key "$T/s.key" -Verify 1 \
        -CAfile "$T/c.pem" -naccept 1 <"$T/payload" >/dev/null 2>"$T/srv.err" &
    srv=$!
    PIDS+=($srv)
    # (no probe connection: -naccept 1 would count it)
    wait_until 10 bash -c "ss -Hltn 'sport = :$port' | grep -q ." || die "s_server did not listen"
    start=$(now_s)
    got=$(timeout 120 openssl s_client -quiet -tls1_3 -connect "127.0.0.1:$port" -cert "$T/c.pem" -key "$T/c.key" \
        -CAfile "$T/s.pem" </dev/null 2>/dev/null | head -c "$ALLOC_BYTES" | wc -c) || true
    secs=$(elapsed "$start")
    kill "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
    [ "$got" = "$ALLOC_BYTES" ] || { echo "$got bytes"; return 1; }
    echo "$secs"
}

# A second peer: the same OpenSSL library driven with 1 MiB writes/reads from Python's
# ssl module (the openssl CLI moves 16 KiB per select() round and is slower than TLS).
cat >"$T/tlsbench.py" <<'PY'
import socket, ssl, sys, time
mode, d, port, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if mode == "recv":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(f"{d}/s.pem", f"{d}/s.key"); ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(f"{d}/c.pem")
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port)); ls.listen(1); print("ready", flush=True)
    c, _ = ls.accept(); s = ctx.wrap_socket(c, server_side=True)
    buf, got = bytearray(1 << 20), 0
    while got < n:
        k = s.recv_into(buf)
        if not k: break
        got += k
    s.sendall(b"k"); print(got, flush=True)
else:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(f"{d}/c.pem", f"{d}/c.key"); ctx.load_verify_locations(f"{d}/s.pem"); ctx.check_hostname = False
    data = memoryview(open(path, "rb").read(n))
    t = time.time()
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    for i in range(0, len(data), 1 << 20): s.sendall(data[i:i + (1 << 20)])
    s.recv(1)
    print(f"{time.time() - t:.3f}", flush=True)
PY
py_tls_run() {
    local port out
    port=$(free_port)
    python3 "$T/tlsbench.py" recv "$T" "$port" "$T/payload" "$ALLOC_BYTES" >"$T/recv.out" &
    local rcv=$!
    PIDS+=($rcv)
    wait_until 10 grep -q ready "$T/recv.out" || die "python TLS receiver did not start"
    out=$(timeout 120 python3 "$T/tlsbench.py" send "$T" "$port" "$T/payload" "$ALLOC_BYTES") || die "python TLS sender failed"
    wait "$rcv" 2>/dev/null || true
    [ "$(tail -n 1 "$T/recv.out")" = "$ALLOC_BYTES" ] || die "python TLS receiver got $(tail -n 1 "$T/recv.out")"
    echo "$out"
}

# --- ours ---------------------------------------------------------------------------------
lab_start
sr vm create --host hv-a --name vm1 --disk $DISK >/dev/null || die "vm create"
URI=$(disk_uri vm1)
qemu-img convert -n --target-is-zero -f raw -O raw "$SRC" "$URI" || die "writing the disk through NBD"
IMG=$(find "$WORK/hv-a/vms/vm1" -maxdepth 1 -type f -size +1M | head -1)
ALLOC_ON_DISK=$(($(stat -c %b "$IMG") * 512))

POLICY_FLAGS=()
[ "${COMPRESSION:-0}" = 1 ] && POLICY_FLAGS+=(--compression)
sr policy create --name p --interval 2s --retention 1h "${POLICY_FLAGS[@]}" >/dev/null || die "policy create"
sr cloud pair --source gold-a --target gold-b --policy p >/dev/null || die "cloud pair"

sync
start=$(now_s)
sr protect vm1 --wait >"$WORK/protect.out" 2>&1 || { cat "$WORK/protect.out" >&2; die "protect failed"; }
OURS_S=$(elapsed "$start")
REPL=$(vm_json vm1 | jq -c '.replication // {}' || echo '{}')
BYTES_REPL=$(jq -r '.bytes_replicated // 0' <<<"$REPL")
STATE=$(jq -r '.state // "?"' <<<"$REPL")

# Correctness check (not timed): the replica's latest point equals the primary.
SAME=unchecked
if wait_until 30 bash -c "[ \"\$($PROVIDER_BIN --connect $ADDR --certs $WORK/op --json points vm1 | jq 'length')\" -gt 0 ]"; then
    RURI=$(sr point export vm1 --point latest 2>/dev/null | grep -o 'nbd[+a-z]*://[^ ]*' | head -1 || true)
    if [ -n "$RURI" ]; then
        if qemu-img compare -q -f raw -F raw "$URI" "$RURI"; then SAME=identical; else SAME=DIFFERENT; fi
        sr point unexport vm1 >/dev/null 2>&1 || true
    fi
fi

TLS_S=$(tls_run) || die "the openssl peer failed 3 times"
TLS_S2=$(tls_run) || die "the openssl peer failed 3 times"
TLS_BEST=$(awk -v a="$TLS_S" -v b="$TLS_S2" 'BEGIN { print (a < b) ? a : b }')
PY_S=$(py_tls_run)
PY_S2=$(py_tls_run)
PY_BEST=$(awk -v a="$PY_S" -v b="$PY_S2" 'BEGIN { print (a < b) ? a : b }')

mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
OURS_MBPS=$(mbps "$ALLOC_BYTES" "$OURS_S")
TLS_MBPS=$(mbps "$ALLOC_BYTES" "$TLS_BEST")
PY_MBPS=$(mbps "$ALLOC_BYTES" "$PY_BEST")
echo
echo "initial replication of a $DISK disk, $((ALLOC_BYTES >> 20)) MiB allocated (random data; ${ALLOC_ON_DISK} bytes allocated in the image)${POLICY_FLAGS[*]:+, policy ${POLICY_FLAGS[*]}}"
r() { awk -v o="$1" -v t="$2" 'BEGIN { printf "%.2f", o / t }'; }
printf '%-40s %9s %8s %14s %14s\n' what seconds MB/s "ours/openssl" "ours/py-ssl"
printf '%-40s %9s %8s %14s %14s\n' "ours: protect --wait (allocated bytes)" "$OURS_S" "$OURS_MBPS" "$(r "$OURS_MBPS" "$TLS_MBPS")" "$(r "$OURS_MBPS" "$PY_MBPS")"
printf '%-40s %9s %8s %14s %14s\n' "openssl s_server -> s_client, mTLS 1.3" "$TLS_BEST" "$TLS_MBPS" 1.00 ""
printf '%-40s %9s %8s %14s %14s\n' "python ssl 1 MiB sendall, mTLS 1.3" "$PY_BEST" "$PY_MBPS" "" 1.00
echo "bytes_replicated after protect: $BYTES_REPL ($(awk -v b="$BYTES_REPL" -v a="$ALLOC_BYTES" 'BEGIN { printf "%.3f", b / a }')x allocated); state $STATE; replica point vs primary: $SAME"
echo "(peers: best of 2 runs: openssl $TLS_S s, $TLS_S2 s; python ssl $PY_S s, $PY_S2 s)"
J=$(sr --json job list | jq -c '[.[]? // .jobs[]? | select(.kind == "Enable protection")] | last' || echo null)
jq -r '.steps[]? | "  step \(.name): \((.ended_unix_ms - .started_unix_ms) / 1000) s"' <<<"$J" || true
load_note
