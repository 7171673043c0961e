# Shared helpers for the end-to-end benchmarks in tests/benches/ (sourced, not run).
#
# `lab_start` sets up what `provider lab` sets up, with the CLI only: a vault, a provider
# (`--test-intervals`, so policies may use 1 s intervals) and two agents on loopback —
# hv-a (site primary, cloud gold-a) and hv-b (site secondary, cloud gold-b) — in $WORK.
# Everything started is killed by PID at exit and $WORK is removed (KEEP=1 keeps it).
#
# Binaries: target/release (built by the caller; BIN_DIR overrides).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
PROVIDER_BIN=$BIN_DIR/provider
AGENT_BIN=$BIN_DIR/agent
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sr-bench.XXXXXX")
PIDS=()
declare -A AGENT_PID AGENT_PORT

bench_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap bench_cleanup EXIT

die() {
    echo "error: $*" >&2
    for l in "$WORK"/*.log; do [ -f "$l" ] && { echo "--- $l (tail)" >&2; tail -n 15 "$l" >&2; }; done
    exit 1
}

build_release() {
    if [ "${NO_BUILD:-0}" != 1 ]; then
        (cd "$ROOT" && cargo build --release -q --workspace --bins) ||
            { [ -x "$PROVIDER_BIN" ] && [ -x "$AGENT_BIN" ] && echo "build failed; using the last good binaries in $BIN_DIR" >&2; } ||
            die "build failed and no binaries in $BIN_DIR"
    fi
    [ -x "$PROVIDER_BIN" ] && [ -x "$AGENT_BIN" ] || die "no binaries in $BIN_DIR"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.3f", b - a }'; }

# Operator CLI against the lab's provider.
sr() { "$PROVIDER_BIN" --connect "$ADDR" --certs "$WORK/op" "$@"; }

# wait_until SECONDS CMD...: polls CMD every 0.1 s.
wait_until() {
    local t=$1 end
    shift
    end=$(($(date +%s) + t))
    while [ "$(date +%s)" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

start_agent() { # host
    local h=$1
    # AGENT_LD_PRELOAD: experiments only (e.g. a shim setting TCP_NODELAY on accepted sockets).
    LD_PRELOAD=${AGENT_LD_PRELOAD:-${LD_PRELOAD:-}} "$AGENT_BIN" --data-dir "$WORK/$h" serve --heartbeat 1s --nbd-insecure-tcp >>"$WORK/$h.log" 2>&1 &
    AGENT_PID[$h]=$!
    PIDS+=($!)
}

# stop_agent HOST: SIGTERM, wait (bounded), then SIGKILL.
stop_agent() {
    local p=${AGENT_PID[$1]}
    kill "$p" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

hosts_connected() { [ "$(sr --json host list 2>/dev/null | jq '[.[]? // .hosts[]? | select(.connected)] | length')" = 2 ]; }

lab_start() {
    ADDR=127.0.0.1:$(free_port)
    "$PROVIDER_BIN" vault create --name bench --data-dir "$WORK/provider" --address "$ADDR" --out "$WORK/vault.key" >/dev/null ||
        die "vault create"
    "$PROVIDER_BIN" serve --data-dir "$WORK/provider" --test-intervals >"$WORK/provider.log" 2>&1 &
    PIDS+=($!)
    wait_until 20 bash -c "exec 3<>/dev/tcp/${ADDR%:*}/${ADDR#*:}" || die "provider did not listen on $ADDR"
    "$PROVIDER_BIN" operator-cert --data-dir "$WORK/provider" --out "$WORK/op" >/dev/null || die "operator-cert"
    local h site cloud
    for h in hv-a:primary:gold-a hv-b:secondary:gold-b; do
        IFS=: read -r h site cloud <<<"$h"
        AGENT_PORT[$h]=$(free_port)
        "$AGENT_BIN" --data-dir "$WORK/$h" register --vault-key "$WORK/vault.key" --host "$h" --site "$site" \
            --cloud "$cloud" --listen "127.0.0.1:${AGENT_PORT[$h]}" >/dev/null || die "register $h"
        start_agent "$h"
    done
    wait_until 30 hosts_connected || die "hosts did not connect"
}

# vm_json VM: `vm show --json`.
vm_json() { sr --json vm show "$1"; }
disk_uri() { vm_json "$1" | jq -r '.disks[0].nbd_unix_uri'; }

# TCP payload bytes (TLS records, gRPC/HTTP2 framing included; IP/TCP headers not) both
# ways on the connections to PORT, from `ss -ti` (bytes_acked + bytes_received of the
# listening side's sockets). Counters of connections closed before the call are lost:
# call it around a window in which the replication channel stays up. (The interface
# counters of `lo` are no good here: other processes on the machine use loopback too.)
peer_tcp_bytes() { # PORT
    { ss -Htin state established "( sport = :$1 )" || true; } |
        { grep -o -E 'bytes_(acked|received):[0-9]+' || true; } | awk -F: '{ s += $2 } END { printf "%d", s }'
}

load_note() { echo "load: $(uptime | sed 's/.*load average/load average/') · $(nproc) CPUs"; }
