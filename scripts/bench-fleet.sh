#!/usr/bin/env bash
# Fleet store convergence benchmark (issue 20): N meshd hosts (release build) in network
# namespaces against one etcd, each configured with a [store] table and no [[peer]].
# Not a test: it measures and prints, and fails only when something does not converge
# at all (within generous limits).
#
#   (a) policy: the time from `meshctl policy publish` (the clock read just before
#       meshctl runs) to each host's log line "store: policy document applied" for that
#       version (tracing's timestamp); p50/p99/max over the hosts, for each of
#       PUBLISHES publishes. The target from the issue: p99 under 1 s.
#   (b) join: the time from a new host's meshd start to each other host's log line
#       "store: peer in force" for it; p50/p99/max, and the steps on the way (the new
#       meshd connected to the store, its certificate written).
#   (c) memory: meshd's VmRSS on one host before and after EXTRA more certificates are
#       in the store (issued with `meshctl cert issue`, 100.65.0.0/16 and up, written
#       with `meshctl peer publish`), once that host holds them all as peers.
#
# Usage: scripts/bench-fleet.sh [--hosts N] [--publishes K] [--certs M]
#        (defaults 30, 5, 1000). BUILD=1 rebuilds; MESHD=/MESHCTL= other binaries;
#        KEEP=1 keeps the hosts' logs and state (the directory is printed).
#
# Needs root. Installs etcd-server/etcd-client if missing, builds meshd and meshctl
# (release) when missing, then re-runs itself inside private network and mount
# namespaces: every namespace and process it made is gone when it exits. Addresses:
# underlay 198.18.0.0/15 (etcd 198.18.0.9, hosts 198.18.1.1 and up), overlay
# 100.64.0.0/10.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MESHD="${MESHD:-$ROOT/target/release/meshd}"
MESHCTL="${MESHCTL:-$ROOT/target/release/meshctl}"
HOSTS_N=30
PUBLISHES=5
EXTRA=1000
PORT=51820
ETCD_IP=198.18.0.9
STORE="http://$ETCD_IP:2379"
TD=bench.mesh

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'bench-fleet: %s\n' "$*" >&2; exit 1; }
usage="usage: $0 [--hosts N] [--publishes K] [--certs M]"

while (($#)); do
    case $1 in
        --hosts) HOSTS_N=${2:?$usage}; shift 2 ;;
        --publishes) PUBLISHES=${2:?$usage}; shift 2 ;;
        --certs) EXTRA=${2:?$usage}; shift 2 ;;
        -h | --help) echo "$usage"; exit 0 ;;
        *) die "unknown argument $1 ($usage)" ;;
    esac
done
[[ $HOSTS_N =~ ^[0-9]+$ ]] && ((HOSTS_N >= 2 && HOSTS_N <= 1000)) || die "--hosts: 2..1000"
[[ $PUBLISHES =~ ^[0-9]+$ ]] && ((PUBLISHES >= 1)) || die "--publishes: 1 or more"
[[ $EXTRA =~ ^[0-9]+$ ]] && ((EXTRA <= 60000)) || die "--certs: 0..60000"

# ---------------------------------------------------------------- outside: prepare
if [[ -z "${MESH_BENCH_FLEET_INNER:-}" ]]; then
    [[ $(id -u) -eq 0 ]] || die "run as root (network namespaces and TUN devices need it): sudo $0"
    [[ -e /dev/net/tun ]] || die "/dev/net/tun is missing"
    need=()
    for pair in ip:iproute2 python3:python3 unshare:util-linux etcd:etcd-server \
                etcdctl:etcd-client protoc:protobuf-compiler; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
    done
    if ((${#need[@]})); then
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if [[ "${BUILD:-0}" == 1 || ! -x $MESHD || ! -x $MESHCTL ]]; then
        say "building meshd and meshctl (release)"
        (cd "$ROOT" && cargo build --release -p meshd -p meshctl)
    fi
    # The options, for the re-run inside the namespaces.
    export MESH_BENCH_FLEET_INNER=1 MESHD MESHCTL \
        BENCH_HOSTS_N=$HOSTS_N BENCH_PUBLISHES=$PUBLISHES BENCH_EXTRA=$EXTRA
    exec unshare --net --mount --propagation private -- "$0"
fi

# ---------------------------------------------------------------- inside: the bench
HOSTS_N=$BENCH_HOSTS_N PUBLISHES=$BENCH_PUBLISHES EXTRA=$BENCH_EXTRA
[[ -x $MESHD && -x $MESHCTL ]] || die "meshd/meshctl not found: cargo build --release -p meshd -p meshctl"

mkdir -p /run/netns
mount -t tmpfs -o mode=0755 tmpfs /run/netns
ip link set lo up

WORK="$(mktemp -d /tmp/mesh-bench-fleet.XXXXXX)"
PIDS=()
NSES=()
declare -A MESHD_PID
ok=0

cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${NSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if ((ok)); then
        [[ -n ${KEEP:-} ]] || rm -rf "$WORK"
    else
        echo "bench-fleet failed (exit $rc); logs kept in $WORK" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Host k (1-based): its name, underlay and overlay addresses.
hname() { printf 'h%03d' "$1"; }
underlay() { echo "198.18.$((($1 - 1) / 250 + 1)).$((($1 - 1) % 250 + 1))"; }
overlay() { echo "100.64.$((($1 - 1) / 250)).$((($1 - 1) % 250 + 1))"; }
in_ns() { local n=$1; shift; ip netns exec "fb-$n" "$@"; }
in_ns_bg() { local n=$1; shift; ip netns exec "fb-$n" setpriv --pdeathsig KILL -- "$@"; }
ctl() { local h=$1; shift; "$MESHCTL" --socket "$WORK/$h/meshd.sock" "$@"; }
fleetctl() { in_ns etcd "$MESHCTL" --store "$STORE" --trust-domain "$TD" "$@"; }
js() { ctl "$1" status --json | python3 -c "import json, sys; s = json.load(sys.stdin); print($2)"; }
now() { date +%s.%N; }

wait_for() {
    local what=$1 secs=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >"$WORK/wait.out" 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what ($(tail -n 3 "$WORK/wait.out"))"
        sleep 0.1
    done
}

# stats: seconds on stdin, one a line -> "n=.. p50=.. p99=.. max=.." in ms.
stats() {
    python3 -c '
import sys
v = sorted(float(x) for x in sys.stdin.read().split())
if not v:
    print("n=0"); sys.exit()
def q(p):
    # nearest rank
    import math
    return v[max(0, math.ceil(p * len(v)) - 1)]
print("n=%d p50=%.0f ms p99=%.0f ms max=%.0f ms" % (len(v), q(0.5) * 1e3, q(0.99) * 1e3, v[-1] * 1e3))
'
}

# log_times PATTERN T0 HOST...: for each host, the first log line matching PATTERN
# (a fixed string) whose timestamp is at or after T0, minus T0 (seconds); one a line.
log_times() {
    local pat=$1 t0=$2; shift 2
    python3 - "$pat" "$t0" "$@" <<'PY'
import sys, datetime
pat, t0, hosts = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
for log in hosts:
    best = None
    for line in open(log, errors="replace"):
        if pat not in line:
            continue
        ts = line.split(None, 1)[0]
        t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        if t >= t0 - 0.002:  # log timestamps are microseconds, date nanoseconds
            best = t
            break
    print("missing" if best is None else "%.6f" % (best - t0))
PY
}

# all_logged PATTERN HOST...: every host's log has PATTERN.
all_logged() {
    local pat=$1; shift
    local h
    for h in "$@"; do grep -qF -- "$pat" "$WORK/$h/meshd.log" || return 1; done
}

say "setup: CA, $((HOSTS_N + 1)) host certificates, a policy key, etcd, $HOSTS_N hosts"
cd "$WORK"
"$MESHCTL" ca init --trust-domain "$TD" --cert ca.crt --key ca.key --allow-ip 100.64.0.0/10 >/dev/null
"$MESHCTL" policy key gen --out policy.key >/dev/null
ALL=$((HOSTS_N + 1)) # the last one joins in (b)
for k in $(seq 1 "$ALL"); do
    h=$(hname "$k")
    mkdir -p "$h"
    "$MESHCTL" cert issue --identity "spiffe://$TD/$h" --ip "$(overlay "$k")" \
        --ca ca.crt --ca-key ca.key --out "$h/host.crt" --key-out "$h/host.key" >/dev/null
    cat >"$h/meshd.toml" <<EOF
[node]
cert = "host.crt"
key = "host.key"
ca = "../ca.crt"
listen = "$(underlay "$k"):$PORT"
tun = "mesh0"
state_dir = "state"
control_socket = "meshd.sock"
routes = ["100.64.0.0/10"]
log_level = "info"

[policy]
default = "deny"

[store]
endpoints = ["$STORE"]
policy_keys = ["../policy.pub"]
EOF
done

NSES+=(fb-ul)
ip netns add fb-ul
ip -n fb-ul link set lo up
ip -n fb-ul link add br0 type bridge
ip -n fb-ul link set br0 up
# attach NAME ADDRESS: a namespace fb-NAME on the bridge.
attach() {
    NSES+=("fb-$1")
    ip netns add "fb-$1"
    ip -n "fb-$1" link set lo up
    ip -n fb-ul link add "v-$1" type veth peer name eth0 netns "fb-$1"
    ip -n fb-ul link set "v-$1" master br0 up
    ip -n "fb-$1" addr add "$2/15" dev eth0
    ip -n "fb-$1" link set eth0 up
}
attach etcd "$ETCD_IP"
mkdir -p etcd
in_ns_bg etcd etcd --name etcd --data-dir "$WORK/etcd/data" \
    --listen-client-urls "$STORE" --advertise-client-urls "$STORE" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster etcd=http://127.0.0.1:2380 \
    --logger zap --log-outputs stderr >etcd/etcd.log 2>&1 &
PIDS+=($!)
wait_for "etcd" 20 in_ns etcd etcdctl --endpoints "$STORE" --dial-timeout 2s endpoint health

start_meshd() {
    local h=$1
    in_ns_bg "$h" "$MESHD" --config "$WORK/$h/meshd.toml" >"$h/meshd.log" 2>&1 &
    PIDS+=($!)
    MESHD_PID[$h]=$!
}
# peers_in_force HOST N: HOST holds N peers from the store.
peers_in_force() {
    local n
    n=$(js "$1" "s['store']['applied']['peers']")
    [[ $n == "$2" ]] || { echo "$1 holds $n peers from the store"; return 1; }
}

HOSTS=()
for k in $(seq 1 "$ALL"); do
    h=$(hname "$k")
    attach "$h" "$(underlay "$k")"
    ((k <= HOSTS_N)) || continue
    HOSTS+=("$h")
    start_meshd "$h"
done
t_start=$SECONDS
for h in "${HOSTS[@]}"; do
    wait_for "$h to hold $((HOSTS_N - 1)) peers from the store" 120 peers_in_force "$h" $((HOSTS_N - 1))
done
echo "  $HOSTS_N meshd hosts up, each holding the $((HOSTS_N - 1)) others as peers from the store ($((SECONDS - t_start)) s after the meshds started)"
FIRST=${HOSTS[0]}
# meshd's own PID on FIRST (below `ip netns exec`, which may fork): the process named
# meshd whose command line names FIRST's config.
MESHD_REAL=
for d in /proc/[0-9]*; do
    [[ $(cat "$d/comm" 2>/dev/null) == meshd ]] || continue
    tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$WORK/$FIRST/meshd.toml" && MESHD_REAL=${d#/proc/}
done
[[ -n $MESHD_REAL ]] || die "no meshd process for $FIRST"

logs=()
for h in "${HOSTS[@]}"; do logs+=("$WORK/$h/meshd.log"); done

say "(a) policy: from \`meshctl policy publish\` to each host applying it ($PUBLISHES publishes)"
declare -a A_LINES=()
for n in $(seq 1 "$PUBLISHES"); do
    cat >"policy-$n.toml" <<EOF
# publish $n of $PUBLISHES
[[policy]]
name = "mesh-http-$n"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://$TD/*"] }]
to = [{ ports = [8080, $((9000 + n))] }]

[[test]]
from = "spiffe://$TD/h001"
to_port = $((9000 + n))
expect = "allow"
EOF
    t0=$(now)
    out=$(fleetctl policy publish "policy-$n.toml" --key policy.key) || die "publish: $out"
    t1=$(now)
    v=$(sed -n 's/^published policy version \([0-9]*\) .*/\1/p' <<<"$out")
    [[ -n $v ]] || die "publish: no version in \"$out\""
    wait_for "every host to apply policy version $v" 60 all_logged "store: policy document applied version=$v " "${HOSTS[@]}"
    times=$(log_times "store: policy document applied version=$v " "$t0" "${logs[@]}")
    grep -q missing <<<"$times" && die "a host's log line for version $v predates the publish"
    line=$(printf '  publish %d (version %d): meshctl took %.0f ms; applied: %s' "$n" "$v" \
        "$(python3 -c "print(($t1 - $t0) * 1e3)")" "$(stats <<<"$times")")
    echo "$line"
    A_LINES+=("$line")
    sleep 1 # let the status writes that follow each apply settle
done

say "(b) join: from a new host's meshd start to every other host holding it as a peer"
NEW=$(hname "$ALL")
t0=$(now)
start_meshd "$NEW"
wait_for "every host to take $NEW as a peer" 60 all_logged "store: peer in force peer=spiffe://$TD/$NEW " "${HOSTS[@]}"
times=$(log_times "store: peer in force peer=spiffe://$TD/$NEW " "$t0" "${logs[@]}")
t_ready=$(log_times "meshd: ready" "$t0" "$WORK/$NEW/meshd.log")
t_conn=$(log_times "store connected" "$t0" "$WORK/$NEW/meshd.log")
B_LINE=$(printf '  %s joined: the others hold it as a peer: %s (its meshd ready after %.0f ms; its store client listed and watching after %.0f ms)' \
    "$NEW" "$(stats <<<"$times")" "$(python3 -c "print($t_ready * 1e3)")" "$(python3 -c "print($t_conn * 1e3)")")
echo "$B_LINE"
wait_for "$NEW to hold its $HOSTS_N peers" 60 peers_in_force "$NEW" "$HOSTS_N"
HOSTS+=("$NEW")

say "(c) memory: meshd on $FIRST before and after $EXTRA more certificates in the store"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$MESHD_REAL/status"; }
rss_before=$(rss)
peers_before=$(js "$FIRST" "s['store']['applied']['peers']")
echo "  before: VmRSS $((rss_before / 1024)) MiB ($rss_before kB), $peers_before peers from the store"
if ((EXTRA > 0)); then
    mkdir -p extra
    t_issue=$SECONDS
    for i in $(seq 1 "$EXTRA"); do
        "$MESHCTL" cert issue --identity "spiffe://$TD/extra-$i" \
            --ip "100.$((65 + (i - 1) / 65536)).$(((i - 1) / 256 % 256)).$(((i - 1) % 256))" \
            --ca ca.crt --ca-key ca.key --out "extra/$i.crt" --key-out "extra/$i.key" >/dev/null
    done
    echo "  issued $EXTRA certificates ($((SECONDS - t_issue)) s)"
    t0=$(now)
    seq 1 "$EXTRA" | xargs -P 4 -I{} ip netns exec fb-etcd "$MESHCTL" --store "$STORE" \
        peer publish "extra/{}.crt" --ca ca.crt >/dev/null
    t1=$(now)
    want=$((peers_before + EXTRA))
    wait_for "$FIRST to hold $want peers" 600 peers_in_force "$FIRST" "$want"
    t2=$(now)
    # Every host takes every certificate: the last one to hold them all.
    for h in "${HOSTS[@]}"; do
        wait_for "$h to hold $want peers" 600 peers_in_force "$h" "$want"
    done
    t3=$(now)
    sleep 2
    rss_after=$(rss)
    peers_after=$(js "$FIRST" "s['store']['applied']['peers']")
    sessions=$(js "$FIRST" "len(s['peers'])")
    printf '  written with meshctl peer publish (4 at a time) in %.1f s; %s held them all %.1f s after the first write; every host %.1f s\n' \
        "$(python3 -c "print($t1 - $t0)")" "$FIRST" "$(python3 -c "print($t2 - $t0)")" "$(python3 -c "print($t3 - $t0)")"
    C_LINE=$(printf '  %s: VmRSS %d MiB (%d kB) with %d peers -> %d MiB (%d kB) with %d peers from the store (%d in status)' \
        "$FIRST" $((rss_before / 1024)) "$rss_before" "$peers_before" \
        $((rss_after / 1024)) "$rss_after" "$peers_after" "$sessions")
    echo "$C_LINE"
fi

say "summary ($HOSTS_N hosts, $(date -u +%Y-%m-%dT%H:%MZ))"
printf '%s\n' "${A_LINES[@]}" "$B_LINE" "${C_LINE:-}"
ok=1
[[ -z ${KEEP:-} ]] || echo "logs and state kept in $WORK"
