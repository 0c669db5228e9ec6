#!/usr/bin/env bash
# Memory check for issue 6: resident memory of meshd with PEERS peers configured and
# FLOWS tracked flows. Two hosts in namespaces; host b lists PEERS peers (one real: a;
# the rest certificates with no endpoint), a opens FLOWS UDP flows to b (one datagram
# to each of FLOWS ports through the overlay; no policy, so every flow is tracked).
# Then a 3-second iperf3 bulk transfer a -> b (buffers the data path touches only
# under load). Prints b's VmRSS/VmHWM at each stage and the flow count meshd reports.
#
# Usage (root): scripts/memtest.sh      Environment: PEERS=1000 FLOWS=10000
# Bounded in time; everything started here is removed on exit. Underlay 198.18.0.0/15,
# overlay 100.64.0.0/10, no default route.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-1000}"
FLOWS="${FLOWS:-10000}"
MESHD="${MESHD:-$ROOT/target/release/meshd}"
MESHCTL="${MESHCTL:-$ROOT/target/release/meshctl}"
TAG="mm$$"
NS_A="${TAG}-a" NS_B="${TAG}-b"
PIDS=()
WORK="$(mktemp -d /tmp/meshd-mem.XXXXXX)"
log() { printf 'memtest: %s\n' "$*" >&2; }
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    [[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[[ $(id -u) -eq 0 ]] || { log "needs root"; exit 1; }
[[ -x "$MESHD" && -x "$MESHCTL" ]] || { log "build first: cargo build --release -p meshd -p meshctl"; exit 1; }

ip netns add "$NS_A"; ip netns add "$NS_B"
ip link add "${TAG}a" netns "$NS_A" type veth peer name "${TAG}b" netns "$NS_B"
for ns in "$NS_A" "$NS_B"; do ip netns exec "$ns" ip link set lo up; done
ip netns exec "$NS_A" ip addr add 198.18.0.1/15 dev "${TAG}a"
ip netns exec "$NS_B" ip addr add 198.18.0.2/15 dev "${TAG}b"
ip netns exec "$NS_A" ip link set "${TAG}a" up
ip netns exec "$NS_B" ip link set "${TAG}b" up

log "issuing $PEERS certificates"
P="$WORK/pki"; mkdir -p "$P" "$WORK/a" "$WORK/b"
(cd "$P" && "$MESHCTL" ca init --trust-domain mem.test >/dev/null &&
    "$MESHCTL" cert issue --identity spiffe://mem.test/a --ip 100.64.0.1 --out a.crt >/dev/null &&
    "$MESHCTL" cert issue --identity spiffe://mem.test/b --ip 100.64.0.2 --out b.crt >/dev/null
    for i in $(seq 3 "$PEERS"); do
        "$MESHCTL" cert issue --identity "spiffe://mem.test/p$i" \
            --ip "100.65.$((i / 250)).$((i % 250 + 1))" --out "p$i.crt" >/dev/null
    done)
conf() { # conf ME LISTEN
    cat <<C
[node]
cert = "$P/$1.crt"
key = "$1.key"
ca = "$P/ca.crt"
listen = "$2:51820"
state_dir = "state"
control_socket = "meshd.sock"
routes = ["100.64.0.0/10"]
log_level = "warn"
C
}
cp "$P/a.key" "$WORK/a/"; cp "$P/b.key" "$WORK/b/"; chmod 600 "$WORK"/*/*.key
{ conf a 198.18.0.1; printf '\n[[peer]]\ncert = "%s"\nendpoint = "198.18.0.2:51820"\n' "$P/b.crt"; } >"$WORK/a/meshd.toml"
{
    conf b 198.18.0.2
    printf '\n[[peer]]\ncert = "%s"\nendpoint = "198.18.0.1:51820"\n' "$P/a.crt"
    for i in $(seq 3 "$PEERS"); do printf '\n[[peer]]\ncert = "%s"\n' "$P/p$i.crt"; done
} >"$WORK/b/meshd.toml"

ip netns exec "$NS_A" "$MESHD" --config "$WORK/a/meshd.toml" >"$WORK/a.log" 2>&1 &
PIDS+=($!)
ip netns exec "$NS_B" "$MESHD" --config "$WORK/b/meshd.toml" >"$WORK/b.log" 2>&1 &
PIDS+=($!); PID_B=$!
ready() { "$MESHCTL" --socket "$WORK/$1/meshd.sock" status --json 2>/dev/null | jq -e .ready >/dev/null; }
for _ in $(seq 300); do ready a && ready b && break; sleep 0.1; done
ready b || { log "meshd b not ready"; tail -3 "$WORK/b.log"; exit 1; }
for _ in $(seq 50); do ip netns exec "$NS_A" ping -c1 -W1 100.64.0.2 >/dev/null 2>&1 && break; done
rss() { awk '/^VmRSS|^VmHWM/ { printf "%s %s MiB  ", $1, $2 / 1024 }' "/proc/$PID_B/status"; echo; }
log "b with $PEERS peers, before flows: $(rss)"
ip netns exec "$NS_A" timeout 120 python3 - "$FLOWS" <<'PY'
import socket, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(b"x" * 64, ("100.64.0.2", 10000 + i % 50000))
    if i % 500 == 499:
        time.sleep(0.02)  # let the socket drain; this is a flow count test, not a flood
PY
sleep 1
FL="$("$MESHCTL" --socket "$WORK/b/meshd.sock" status --json | jq '.enforcement.counters.flows')"
log "b after $FLOWS flows (meshd reports $FL tracked): $(rss)"
if command -v iperf3 >/dev/null; then
    ip netns exec "$NS_B" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do ip netns exec "$NS_B" ss -Hltn "sport = :5201" | grep -q LISTEN && break; sleep 0.1; done
    ip netns exec "$NS_A" timeout 20 iperf3 -c 100.64.0.2 -p 5201 -t 3 >/dev/null 2>&1 || log "iperf3 failed"
    log "b after a 3 s bulk transfer: $(rss)"
fi
echo "peers=$PEERS flows_sent=$FLOWS flows_tracked=$FL $(rss)"
