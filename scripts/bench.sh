#!/usr/bin/env bash
# Benchmark: two hosts in network namespaces joined by one veth pair.
#
# Rows: the bare underlay link, a reference userspace WireGuard tunnel (wireguard-go,
# Debian's package, no policy), meshd without policy (the data path alone), meshd with
# a layer-4 policy, meshd with a layer-7 policy (HTTP rules on the served port).
# Figures per row: iperf3 TCP throughput (1 and 4 streams), ping latency (avg and p99),
# HTTP requests/s and p99 latency (wrk against a 1 KiB static file served by nginx),
# CPU time and peak memory of the meshd processes, UDP receive-buffer errors and TCP
# retransmissions. Each figure is the median of RUNS runs. Output: a markdown table
# (stdout and bench-results/<stamp>.md). See docs/benchmarks.md.
#
# Usage (root): scripts/bench.sh
# Environment:
#   RUNS=3             runs per row (median reported); RUNS=1 for a quick check
#   ROWS="bare wggo plain l4 l7"  which rows to measure
#   IPERF_SECS=10      seconds per iperf3 run
#   WRK_SECS=10        seconds per wrk run
#   WRK_THREADS=2 WRK_CONNS=32   wrk load shape
#   PINGS=200 PING_INTERVAL=0.01
#   NGINX_WORKERS=1    nginx worker processes
#   MESHD=... MESHCTL=...  binaries (default: target/release/{meshd,meshctl}, built
#                      with `cargo build --release` when missing or BUILD=1)
#   READY_SECS=20      bound on waiting for meshd readiness and the first handshake
#   KEEP=1             keep the work directory (configs, logs) for inspection
#   CPU_LATENCY_US=N   measure every row under a CPU wake-up latency request of N µs
#                      (the kernel's CPU latency QoS; 0 keeps idle CPUs polling): meshd
#                      rows set node.cpu_latency_us = N (meshd holds it while traffic
#                      flows), the other rows run while the bench holds the same
#                      request. Unset (default): no request, the machine's idle states.
#   PROFILE=1          sample the meshd processes with `perf record` during the first
#                      1-stream run of each meshd row; flat profiles (by thread, object,
#                      symbol) go to bench-results/<stamp>-perf-<row>.txt
#
# Bounded in time: every measuring command runs under `timeout`, readiness polls are
# bounded, and everything started here (namespaces, processes by PID) is removed on
# exit, also on failure or Ctrl-C. Traffic stays inside the namespaces made here:
# underlay 198.18.0.0/15, overlay 100.64.0.0/10, no default route.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-3}"
ROWS="${ROWS:-bare wggo plain l4 l7}"
IPERF_SECS="${IPERF_SECS:-10}"
WRK_SECS="${WRK_SECS:-10}"
WRK_THREADS="${WRK_THREADS:-2}"
WRK_CONNS="${WRK_CONNS:-32}"
PINGS="${PINGS:-200}"
PING_INTERVAL="${PING_INTERVAL:-0.01}"
NGINX_WORKERS="${NGINX_WORKERS:-1}"
CPU_LATENCY_US="${CPU_LATENCY_US:-}"
READY_SECS="${READY_SECS:-20}"
MESHD="${MESHD:-$ROOT/target/release/meshd}"
MESHCTL="${MESHCTL:-$ROOT/target/release/meshctl}"
RESULTS="$ROOT/bench-results"

TAG="mb$$"                       # unique per invocation; veth names stay < 16 bytes
NS_A="${TAG}-a"                  # client host
NS_B="${TAG}-b"                  # server host
VETH_A="${TAG}a"
VETH_B="${TAG}b"
UNDER_A=198.18.0.1
UNDER_B=198.18.0.2
OVER_A=100.64.0.1
OVER_B=100.64.0.2
TD=bench.test                    # trust domain
ID_A="spiffe://$TD/client"
ID_B="spiffe://$TD/server"
WG_PORT=51820
HTTP_PORT=80
IPERF_PORT=5201

PIDS=()                          # every background process started here
MESHD_PIDS=()
WORK=""

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Still running (not yet exited; an exited child stays a zombie until reaped).
running() { [[ -r /proc/$1/stat ]] && [[ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# Stops a process this script started: SIGTERM, up to 5 s, then SIGKILL; reaps it and
# forgets its PID (so that a later cleanup never signals a reused PID).
stop_pid() {
    local pid=$1 p keep=()
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then
            log "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces); run as root"
if [[ -n "$CPU_LATENCY_US" ]]; then
    [[ "$CPU_LATENCY_US" =~ ^[0-9]+$ ]] && ((CPU_LATENCY_US <= 100000)) ||
        die "CPU_LATENCY_US=$CPU_LATENCY_US: want microseconds, 0 to 100000"
    [[ -w /dev/cpu_dma_latency ]] || die "CPU_LATENCY_US needs /dev/cpu_dma_latency (the kernel's CPU latency QoS)"
fi

# ---- packages ----------------------------------------------------------------------
need_pkgs=()
command -v iperf3 >/dev/null || need_pkgs+=(iperf3)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || need_pkgs+=(nginx-light)
command -v ping >/dev/null || need_pkgs+=(iputils-ping)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v jq >/dev/null || need_pkgs+=(jq)
if [[ "${PROFILE:-0}" == 1 ]]; then command -v perf >/dev/null || need_pkgs+=(linux-perf); fi
if [[ " $ROWS " == *" wggo "* ]]; then
    command -v wireguard-go >/dev/null || need_pkgs+=(wireguard-go)
    command -v wg >/dev/null || need_pkgs+=(wireguard-tools)
fi
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    timeout 300 apt-get update -qq >/dev/null
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${need_pkgs[@]}" >/dev/null; then
        # nginx-light is gone from newer Debian releases; nginx is the same server.
        need_pkgs=("${need_pkgs[@]/nginx-light/nginx}")
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${need_pkgs[@]}" >/dev/null \
            || die "apt-get install ${need_pkgs[*]} failed"
    fi
fi

WORK="$(mktemp -d /tmp/meshd-bench.XXXXXX)"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RESULTS"

# ---- helpers -----------------------------------------------------------------------
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

# Starts a command in the background inside a namespace; remembers its PID.
# `ip netns exec` execs the command, so $! is the command's own PID.
spawn() { # spawn NS LOGFILE CMD...
    local ns=$1 logf=$2
    shift 2
    ip netns exec "$ns" "$@" >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# Polls CMD until it succeeds, at most SECS seconds.
wait_for() { # wait_for SECS what CMD...
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
        sleep 0.1
    done
}

port_listens() { # port_listens NS PORT
    ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q LISTEN
}

# A counter from /proc/net/snmp inside a namespace: snmp NS Udp RcvbufErrors
# shellcheck disable=SC2016 # the awk program is single-quoted on purpose
snmp() {
    ip netns exec "$1" awk -v sec="$2:" -v key="$3" '
        $1 == sec && !hdr { for (i = 2; i <= NF; i++) col[$i] = i; hdr = 1; next }
        $1 == sec && hdr { print $(col[key]); exit }' /proc/net/snmp
}
snmp_both() { echo $(($(snmp "$NS_A" "$1" "$2") + $(snmp "$NS_B" "$1" "$2"))); }

CLK_TCK="$(getconf CLK_TCK)"
# utime+stime (clock ticks) summed over the meshd processes.
meshd_ticks() {
    local total=0 pid stat
    for pid in "${MESHD_PIDS[@]}"; do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        # fields after the ")" that closes comm: state is $1, utime $12, stime $13
        stat="${stat##*) }"
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Peak resident memory (VmHWM, MiB) of the largest meshd process.
meshd_peak_mib() {
    local max=0 pid kb
    for pid in "${MESHD_PIDS[@]}"; do
        kb="$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$pid/status" 2>/dev/null)" || continue
        ((${kb:-0} > max)) && max=$kb
    done
    awk -v k="$max" 'BEGIN { printf "%.1f", k / 1024 }'
}

# A flat profile of what perf sampled: share of samples by thread, object and symbol.
perf_report() { # perf_report ROW
    local out="$RESULTS/$STAMP-perf-$1.txt"
    [[ -s "$WORK/perf-$1.data" ]] || return 0
    local sort
    {
        echo "# perf: meshd processes, row $1, first 1-stream run (${IPERF_SECS}s, 999 Hz)"
        for sort in comm,dso comm,dso,symbol; do
            echo
            echo "## samples by $sort (at least 0.5 %)"
            timeout 120 perf report -i "$WORK/perf-$1.data" --stdio --no-children \
                --sort "$sort" --percent-limit 0.5 2>/dev/null |
                grep -v '^#' | grep . | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -50
        done
    } >"$out" || true
    log "profile saved: $out"
}

median() { # median of the arguments (numbers; "-" entries ignored)
    printf '%s\n' "$@" | awk '$1 != "-"' | sort -g | awk '
        { v[NR] = $1 }
        END { if (NR == 0) { print "-"; exit }
              if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ---- the two hosts -----------------------------------------------------------------
# The CPU latency QoS in force: the smallest request of any process (µs).
cpu_latency_now() { od -An -td4 /dev/cpu_dma_latency | tr -d ' '; }

# For the rows without meshd under CPU_LATENCY_US: the bench's own request, held by a
# process of its own while the row runs (the open file is the request).
LATENCY_PID=""
hold_cpu_latency() {
    [[ -n "$CPU_LATENCY_US" ]] || return 0
    # Nine bytes, read by the kernel as a hex string (four would be read as binary).
    (exec 9>/dev/cpu_dma_latency && printf '%08x\n' "$CPU_LATENCY_US" >&9 && exec sleep infinity) &
    LATENCY_PID=$!
    PIDS+=("$LATENCY_PID")
    wait_for 5 "the CPU latency request" eval '(($(cpu_latency_now) <= CPU_LATENCY_US))'
}
release_cpu_latency() {
    [[ -n "$LATENCY_PID" ]] || return 0
    stop_pid "$LATENCY_PID"
    LATENCY_PID=""
}

make_hosts() {
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
    in_a ip link set lo up
    in_b ip link set lo up
    in_a ip addr add "$UNDER_A/15" dev "$VETH_A"
    in_b ip addr add "$UNDER_B/15" dev "$VETH_B"
    in_a ip link set "$VETH_A" up
    in_b ip link set "$VETH_B" up
    wait_for 10 "underlay link" in_a ping -c1 -W1 "$UNDER_B"
}

start_servers() {
    # iperf3 server, and nginx with a 1 KiB static file, both on the server host.
    spawn "$NS_B" "$WORK/iperf3.log" iperf3 -s -p "$IPERF_PORT"
    local ng="$WORK/nginx"
    mkdir -p "$ng/www" "$ng/tmp"
    head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 >"$ng/www/1k.txt"
    cat >"$ng/nginx.conf" <<EOF
daemon off;
user root;
worker_processes $NGINX_WORKERS;
pid $ng/nginx.pid;
error_log $ng/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $ng/tmp/body;
    proxy_temp_path $ng/tmp/proxy;
    fastcgi_temp_path $ng/tmp/fastcgi;
    uwsgi_temp_path $ng/tmp/uwsgi;
    scgi_temp_path $ng/tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen $HTTP_PORT;
        root $ng/www;
    }
}
EOF
    spawn "$NS_B" "$WORK/nginx.log" nginx -p "$ng" -c "$ng/nginx.conf" -e "$ng/error.log"
    wait_for 10 "iperf3 server" port_listens "$NS_B" "$IPERF_PORT"
    wait_for 10 "nginx" port_listens "$NS_B" "$HTTP_PORT"
}

# ---- measurements (one run; results appended to $WORK/row-<row>.tsv) --------------
# Each sets M[figure]=value.
declare -A M

measure_iperf() { # measure_iperf DST STREAMS -> Gbit/s
    local dst=$1 streams=$2 out
    out="$(timeout $((IPERF_SECS + 20)) ip netns exec "$NS_A" \
        iperf3 -c "$dst" -p "$IPERF_PORT" -P "$streams" -t "$IPERF_SECS" -J)" || { echo "-"; return; }
    jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$out"
}

measure_ping() { # measure_ping DST -> "avg p99" in ms
    local dst=$1 out
    out="$(timeout $((PINGS / 20 + 30)) ip netns exec "$NS_A" \
        ping -n -c "$PINGS" -i "$PING_INTERVAL" -W 1 "$dst")" || true
    echo "$out" >>"$WORK/ping.log"
    grep -o 'time=[0-9.]*' <<<"$out" | cut -d= -f2 | sort -g | awk '
        { v[NR] = $1; s += $1 }
        END { if (NR == 0) { print "- -"; exit }
              i = int(NR * 0.99); if (i < NR * 0.99) i++;   # nearest rank
              printf "%.4f %.4f\n", s / NR, v[i] }'
}

measure_wrk() { # measure_wrk DST -> "req/s p99ms"
    local dst=$1 out
    out="$(timeout $((WRK_SECS + 30)) ip netns exec "$NS_A" \
        wrk -t "$WRK_THREADS" -c "$WRK_CONNS" -d "${WRK_SECS}s" --latency \
        "http://$dst:$HTTP_PORT/1k.txt")" || { echo "- -"; return; }
    echo "$out" >>"$WORK/wrk.log"
    local rps p99 errs
    rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
    # "99%   1.23ms" (units us, ms or s) -> ms
    p99="$(awk '$1 == "99%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
                              if (u == "us") v /= 1000; else if (u == "s") v *= 1000;
                              print v }' <<<"$out")"
    errs="$(grep -E 'Non-2xx|Socket errors' <<<"$out" || true)"
    [[ -z "$errs" ]] || log "wrk: $errs"
    echo "${rps:--} ${p99:--}"
}

run_once() { # run_once ROW DST RUN
    local row=$1 dst=$2 run=$3
    local t0 t1 u0 u1 r0 r1 o0 o1 d0 d1
    M[load1]="$(cut -d' ' -f1 /proc/loadavg)"
    log "$row run $run: iperf3 1 stream"
    t0="$(meshd_ticks)"
    u0="$(snmp_both Udp RcvbufErrors)"; d0="$(snmp_both Udp InDatagrams)"
    r0="$(snmp_both Tcp RetransSegs)"; o0="$(snmp_both Tcp OutSegs)"
    local perf_pid=""
    if [[ "${PROFILE:-0}" == 1 && $run == 1 ]] && ((${#MESHD_PIDS[@]})); then
        timeout $((IPERF_SECS + 30)) perf record -q -F 999 -p "$(IFS=,; echo "${MESHD_PIDS[*]}")" \
            -o "$WORK/perf-$row.data" -- sleep "$IPERF_SECS" >"$WORK/perf-$row.log" 2>&1 &
        perf_pid=$!
        PIDS+=("$perf_pid")
    fi
    M[tcp1]="$(measure_iperf "$dst" 1)"
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || log "perf record failed: $(tail -1 "$WORK/perf-$row.log")"
        stop_pid "$perf_pid"
        perf_report "$row"
    fi
    t1="$(meshd_ticks)"
    u1="$(snmp_both Udp RcvbufErrors)"; d1="$(snmp_both Udp InDatagrams)"
    r1="$(snmp_both Tcp RetransSegs)"; o1="$(snmp_both Tcp OutSegs)"
    M[cpu1]="$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')"
    # CPU seconds per gigabyte carried: cost independent of the rate reached.
    M[cpu_gb]="$(awk -v c="${M[cpu1]}" -v g="${M[tcp1]}" -v s="$IPERF_SECS" 'BEGIN { if (g == "-" || g <= 0) print "-"; else printf "%.2f", c / (g * s / 8) }')"
    M[rcvbuf]="$((u1 - u0))"
    M[rcvbuf_pct]="$(awk -v e=$((u1 - u0)) -v d=$((d1 - d0)) 'BEGIN { if (e + d == 0) print 0; else printf "%.3f", 100 * e / (e + d) }')"
    M[retrans_pct]="$(awk -v r=$((r1 - r0)) -v o=$((o1 - o0)) 'BEGIN { if (o == 0) print "-"; else printf "%.3f", 100 * r / o }')"

    log "$row run $run: iperf3 4 streams"
    t0="$(meshd_ticks)"
    M[tcp4]="$(measure_iperf "$dst" 4)"
    t1="$(meshd_ticks)"
    M[cpu4]="$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')"

    log "$row run $run: ping x$PINGS"
    read -r 'M[ping_avg]' 'M[ping_p99]' <<<"$(measure_ping "$dst")"

    log "$row run $run: wrk ${WRK_SECS}s"
    t0="$(meshd_ticks)"
    read -r 'M[rps]' 'M[http_p99]' <<<"$(measure_wrk "$dst")"
    t1="$(meshd_ticks)"
    M[cpu_http]="$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')"

    M[rss]="$(meshd_peak_mib)"
    if ((${#MESHD_PIDS[@]} == 0)); then
        M[cpu1]=-; M[cpu4]=-; M[cpu_http]=-; M[cpu_gb]=-; M[rss]=-
    fi
    local line=""
    for f in "${FIGS[@]}"; do line+="${M[$f]:--}"$'\t'; done
    echo "${line%$'\t'}" >>"$WORK/row-$row.tsv"
    log "$row run $run: $(paste <(printf '%s\n' "${FIGS[@]}") <(tr '\t' '\n' <<<"${line%$'\t'}") | tr '\t\n' '= ')"
}

# Figures: key and column title.
FIGS=(tcp1 tcp4 ping_avg ping_p99 rps http_p99 cpu1 cpu_gb cpu4 cpu_http rss rcvbuf rcvbuf_pct retrans_pct load1)
declare -A TITLE=(
    [tcp1]="TCP 1 stream (Gbit/s)" [tcp4]="TCP 4 streams (Gbit/s)"
    [ping_avg]="ping avg (ms)" [ping_p99]="ping p99 (ms)"
    [rps]="HTTP req/s" [http_p99]="HTTP p99 (ms)"
    [cpu1]="meshd CPU s, 1 stream" [cpu_gb]="meshd CPU s per GB, 1 stream" [rss]="meshd peak RSS (MiB)" [cpu4]="meshd CPU s, 4 streams" [cpu_http]="meshd CPU s, HTTP"
    [rcvbuf]="UDP rcvbuf errors, 1 stream" [rcvbuf_pct]="UDP rcvbuf errors % of datagrams"
    [retrans_pct]="TCP retrans % of segments, 1 stream"
    [load1]="load avg (1 min) at run start"
)

# ---- meshd rows ----------------------------------------------------------------------
NOT_AVAILABLE=""   # set to a reason when the meshd rows cannot run

policy_l4() {
    cat <<EOF
# Layer 4: the client may reach the web server, iperf3 and ping.
[[policy]]
name = "bench-l4"
action = "allow"
[[policy.rule]]
from = [{ identities = ["$ID_A"] }]
to = [{ ports = [$HTTP_PORT, $IPERF_PORT] }]
[[policy.rule]]
from = [{ identities = ["$ID_A"] }]
to = [{ protocols = ["icmp"] }]
EOF
}

policy_l7() {
    cat <<EOF
# Layer 7: HTTP rules on the web port (GET on any path); iperf3 and ping at layer 4.
[[policy]]
name = "bench-l7"
action = "allow"
[[policy.rule]]
from = [{ identities = ["$ID_A"] }]
to = [{ ports = [$HTTP_PORT], methods = ["GET"], paths = ["/*"] }]
[[policy.rule]]
from = [{ identities = ["$ID_A"] }]
to = [{ ports = [$IPERF_PORT] }]
[[policy.rule]]
from = [{ identities = ["$ID_A"] }]
to = [{ protocols = ["icmp"] }]
EOF
}

# ---- reference row: wireguard-go ----------------------------------------------------
# The same two hosts joined by wireguard-go (userspace WireGuard, no policy), configured
# with `wg`; its UAPI sockets live in /var/run/wireguard under names unique to this run.
WG_A="${TAG}wa"
WG_B="${TAG}wb"

start_wggo() { # start_wggo DIR (under the work directory)
    local dir="$WORK/$1"
    mkdir -p "$dir"
    (umask 077 && wg genkey >"$dir/a.key" && wg genkey >"$dir/b.key") ||
        { NOT_AVAILABLE="wg genkey failed"; return 1; }
    MESHD_PIDS=()
    spawn "$NS_A" "$dir/a.log" env WG_PROCESS_FOREGROUND=1 wireguard-go "$WG_A"
    MESHD_PIDS+=("$LAST_PID")
    spawn "$NS_B" "$dir/b.log" env WG_PROCESS_FOREGROUND=1 wireguard-go "$WG_B"
    MESHD_PIDS+=("$LAST_PID")
    if ! wait_for "$READY_SECS" "wireguard-go (host a)" test -S "/var/run/wireguard/$WG_A.sock" ||
        ! wait_for "$READY_SECS" "wireguard-go (host b)" test -S "/var/run/wireguard/$WG_B.sock"; then
        NOT_AVAILABLE="wireguard-go did not start: $(tail -1 "$dir/a.log")"
        return 1
    fi
    if ! {
        in_a wg set "$WG_A" listen-port "$WG_PORT" private-key "$dir/a.key" \
            peer "$(wg pubkey <"$dir/b.key")" endpoint "$UNDER_B:$WG_PORT" allowed-ips "$OVER_B/32" &&
            in_b wg set "$WG_B" listen-port "$WG_PORT" private-key "$dir/b.key" \
                peer "$(wg pubkey <"$dir/a.key")" endpoint "$UNDER_A:$WG_PORT" allowed-ips "$OVER_A/32" &&
            ip -n "$NS_A" addr add "$OVER_A/10" dev "$WG_A" && ip -n "$NS_A" link set "$WG_A" up &&
            ip -n "$NS_B" addr add "$OVER_B/10" dev "$WG_B" && ip -n "$NS_B" link set "$WG_B" up
    }; then
        NOT_AVAILABLE="configuring wireguard-go failed"
        return 1
    fi
    in_a ping -c1 -W1 "$OVER_B" >/dev/null 2>&1 || true
    wait_for "$READY_SECS" "overlay ping (wireguard-go)" in_a ping -c1 -W1 "$OVER_B" ||
        { NOT_AVAILABLE="no traffic over wireguard-go within ${READY_SECS}s"; return 1; }
}

ensure_binaries() {
    if [[ "${BUILD:-0}" == 1 || ! -x "$MESHD" || ! -x "$MESHCTL" ]]; then
        log "building meshd and meshctl (release)"
        (cd "$ROOT" && timeout 1800 cargo build --release -q -p meshd -p meshctl) \
            || { NOT_AVAILABLE="cargo build --release -p meshd -p meshctl failed"; return 1; }
    fi
    [[ -x "$MESHD" && -x "$MESHCTL" ]] || { NOT_AVAILABLE="no meshd/meshctl binary"; return 1; }
}

make_pki() {
    local p="$WORK/pki"
    mkdir -p "$p"
    (cd "$p" &&
        "$MESHCTL" ca init --trust-domain "$TD" &&
        "$MESHCTL" cert issue --identity "$ID_A" --ip "$OVER_A" --out a.crt &&
        "$MESHCTL" cert issue --identity "$ID_B" --ip "$OVER_B" --out b.crt) \
        >"$WORK/pki.log" 2>&1 || { NOT_AVAILABLE="meshctl ca init / cert issue failed: $(tail -1 "$WORK/pki.log")"; return 1; }
}

write_host_config() { # write_host_config DIR ME PEER MY_UNDER PEER_UNDER POLICY
    local dir=$1 me=$2 peer=$3 mine=$4 theirs=$5 policy=$6
    mkdir -p "$dir"
    cp "$WORK/pki/ca.crt" "$WORK/pki/$me.crt" "$WORK/pki/$peer.crt" "$dir/"
    cp "$WORK/pki/$me.key" "$dir/" && chmod 600 "$dir/$me.key"
    cat >"$dir/meshd.toml" <<EOF
[node]
cert = "$me.crt"
key = "$me.key"
ca = "ca.crt"
listen = "$mine:$WG_PORT"
tun = "mesh0"
state_dir = "state"
control_socket = "meshd.sock"
routes = ["100.64.0.0/10"]
log_level = "warn"
$([[ -z "$CPU_LATENCY_US" ]] || echo "cpu_latency_us = $CPU_LATENCY_US")

[[peer]]
cert = "$peer.crt"
endpoint = "$theirs:$WG_PORT"
EOF
    if [[ -n "$policy" ]]; then
        "$policy" >"$dir/policy.toml"
        cat >>"$dir/meshd.toml" <<EOF

[policy]
default = "deny"
file = "policy.toml"
EOF
    fi
}

# The first warning or error meshd logged on either host, without its timestamp, as
# "; meshd said: ...", for a row marked not available.
meshd_complaint() { # meshd_complaint ROW
    local line
    line="$(cat "$WORK/$1/b/meshd.log" "$WORK/$1/a/meshd.log" 2>/dev/null |
        grep -m1 -E 'WARN|ERROR|error' | sed -E 's/^[0-9T:.Z-]+ +//' | cut -c1-200 || true)"
    [[ -z "$line" ]] || printf '; meshd said: %s' "$line"
}

status_ready() { # status_ready SOCKET: meshd says it is ready
    local s
    s="$("$MESHCTL" --socket "$1" status --json 2>/dev/null)" || return 1
    jq -e '.ready == true' <<<"$s" >/dev/null
}
handshake_done() {
    local s
    s="$("$MESHCTL" --socket "$1" status --json 2>/dev/null)" || return 1
    jq -e '[.peers[] | select(.latest_handshake != null)] | length > 0' <<<"$s" >/dev/null
}

start_meshd() { # start_meshd DIR POLICYFN (DIR under the work directory, e.g. l4/run1)
    local row=$1 policy=$2
    write_host_config "$WORK/$row/a" a b "$UNDER_A" "$UNDER_B" "$policy"
    write_host_config "$WORK/$row/b" b a "$UNDER_B" "$UNDER_A" "$policy"
    MESHD_PIDS=()
    spawn "$NS_A" "$WORK/$row/a/meshd.log" "$MESHD" --config "$WORK/$row/a/meshd.toml"
    MESHD_PIDS+=("$LAST_PID")
    spawn "$NS_B" "$WORK/$row/b/meshd.log" "$MESHD" --config "$WORK/$row/b/meshd.toml"
    MESHD_PIDS+=("$LAST_PID")
    if ! wait_for "$READY_SECS" "meshd ready (host a)" status_ready "$WORK/$row/a/meshd.sock" ||
        ! wait_for "$READY_SECS" "meshd ready (host b)" status_ready "$WORK/$row/b/meshd.sock"; then
        NOT_AVAILABLE="meshd did not become ready within ${READY_SECS}s$(meshd_complaint "$row")"
        return 1
    fi
    # The first packet starts the handshake.
    in_a ping -c1 -W1 "$OVER_B" >/dev/null 2>&1 || true
    if ! wait_for "$READY_SECS" "WireGuard handshake" handshake_done "$WORK/$row/a/meshd.sock" ||
        ! wait_for "$READY_SECS" "overlay ping" in_a ping -c1 -W1 "$OVER_B"; then
        NOT_AVAILABLE="no traffic over the overlay within ${READY_SECS}s$(meshd_complaint "$row")"
        return 1
    fi
    # Under CPU_LATENCY_US the overlay ping above made both meshds take the request:
    # a row measured without it would not be what the table says.
    if [[ -n "$CPU_LATENCY_US" ]]; then
        local h st
        for h in a b; do
            st="$("$MESHCTL" --socket "$WORK/$row/$h/meshd.sock" status --json |
                jq -r '.cpu_latency.state // "none"')" || st="?"
            if [[ $st != held && $st != released ]]; then
                NOT_AVAILABLE="meshd on host $h holds no CPU latency request (state: $st)$(meshd_complaint "$row")"
                return 1
            fi
        done
    fi
}

# The layer-7 row must really inspect HTTP: a POST (no rule allows it) is refused
# with 403 while GET passes.
http_status() { # http_status METHOD -> the status code nginx or meshd answered
    # shellcheck disable=SC2016 # the inner script is single-quoted on purpose
    timeout 5 ip netns exec "$NS_A" bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "%s /1k.txt HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" "$3" >&3
        head -n1 <&3' _ "$OVER_B" "$HTTP_PORT" "$1" | awk '{ print $2 }'
}
# The layer-4 row must really enforce: the served port answers, a port no rule names
# gets no answer at all (dropped), where without policy it would be refused (RST).
check_l4() {
    local get rc=0
    get="$(http_status GET || true)"
    # shellcheck disable=SC2016 # the inner script is single-quoted on purpose
    timeout 2 ip netns exec "$NS_A" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$OVER_B" 8081 2>/dev/null || rc=$?
    if [[ "$get" != 200 || $rc -ne 124 ]]; then
        NOT_AVAILABLE="layer-4 policy not in force: GET answered '${get:-nothing}', a connection to port 8081 ended with status $rc (expected 200, and 124: no answer)"
        return 1
    fi
    log "l4: GET 200, port 8081 dropped: layer-4 policy in force"
}

check_l7() {
    local get post
    get="$(http_status GET || true)"
    post="$(http_status POST || true)"
    if [[ "$get" != 200 || "$post" != 403 ]]; then
        NOT_AVAILABLE="layer-7 policy not in force: GET answered '${get:-nothing}', POST '${post:-nothing}' (expected 200 and 403)"
        return 1
    fi
    log "l7: GET 200, POST 403: layer-7 policy in force"
}

stop_meshd() {
    local pid
    for pid in "${MESHD_PIDS[@]}"; do
        stop_pid "$pid"
    done
    MESHD_PIDS=()
}

# ---- main --------------------------------------------------------------------------
log "work directory $WORK; rows: $ROWS; runs: $RUNS"
make_hosts
start_servers

declare -A ROW_NOTE
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
# Rows alternate within each run, so that a change in the machine's load over time
# (other work on a shared machine) weighs on every row alike. meshd starts afresh for
# each row and run; a row that cannot run is marked once and skipped.
for run in $(seq "$RUNS"); do
    for row in $ROWS; do
        [[ -z "${ROW_NOTE[$row]:-}" ]] || continue
        case $row in
        bare) dst=$UNDER_B ;;
        wggo)
            dst=$OVER_B
            NOT_AVAILABLE=""
            if ! start_wggo "$row/run$run"; then
                ROW_NOTE[$row]="not available: $NOT_AVAILABLE"
                log "$row: ${ROW_NOTE[$row]}"
                stop_meshd
                continue
            fi
            ;;
        plain | l4 | l7)
            dst=$OVER_B
            NOT_AVAILABLE=""
            if [[ -z "${PKI_DONE:-}" ]]; then
                ensure_binaries && make_pki && PKI_DONE=1
            fi
            if [[ -z "$NOT_AVAILABLE" ]]; then
                case $row in
                plain) start_meshd "$row/run$run" "" || true ;;
                l4) { start_meshd "$row/run$run" policy_l4 && check_l4; } || true ;;
                l7) { start_meshd "$row/run$run" policy_l7 && check_l7; } || true ;;
                esac
            fi
            if [[ -n "$NOT_AVAILABLE" ]]; then
                ROW_NOTE[$row]="not available: $NOT_AVAILABLE"
                log "$row: ${ROW_NOTE[$row]}"
                stop_meshd
                continue
            fi
            ;;
        *) die "unknown row $row (bare, wggo, plain, l4, l7)" ;;
        esac
        M=()
        [[ $row == bare || $row == wggo ]] && hold_cpu_latency
        run_once "$row" "$dst" "$run"
        release_cpu_latency
        stop_meshd
    done
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- table -------------------------------------------------------------------------
declare -A MED
for row in $ROWS; do
    [[ -f "$WORK/row-$row.tsv" ]] || continue
    for i in "${!FIGS[@]}"; do
        # shellcheck disable=SC2046 # one number per word
        MED[$row.${FIGS[$i]}]="$(median $(cut -f$((i + 1)) "$WORK/row-$row.tsv"))"
    done
done

fmt() { # number formatting per figure
    local f=$1 v=$2
    [[ $v == - ]] && { echo -; return; }
    case $f in
    tcp1 | tcp4) printf '%.2f' "$v" ;;
    ping_avg | ping_p99) printf '%.3f' "$v" ;;
    rps | rcvbuf) printf '%.0f' "$v" ;;
    http_p99) printf '%.2f' "$v" ;;
    *) printf '%s' "$v" ;;
    esac
}

declare -A ROW_TITLE=([bare]="bare underlay link" [wggo]="reference: wireguard-go, no policy" [plain]="meshd, no policy" [l4]="meshd, layer-4 policy" [l7]="meshd, layer-7 policy")
{
    echo "# meshd benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Host: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)."
    echo "Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER."
    echo "Median of $RUNS run(s). iperf3 ${IPERF_SECS}s; ping $PINGS x ${PING_INTERVAL}s; wrk -t$WRK_THREADS -c$WRK_CONNS ${WRK_SECS}s, 1 KiB file, nginx $NGINX_WORKERS worker(s)."
    if [[ -n "$CPU_LATENCY_US" ]]; then
        echo "CPU wake-up latency request: $CPU_LATENCY_US µs in every row (meshd rows: node.cpu_latency_us, held by meshd while traffic flows; other rows: held by the bench)."
    else
        echo "CPU wake-up latency request: none (the machine's idle states; see CPU_LATENCY_US)."
    fi
    echo "Ratios (×) compare a meshd figure with the bare link's. meshd CPU: seconds of CPU (user+system) used by both meshd processes during that test (by both wireguard-go processes in the reference row). UDP errors and TCP retransmissions: during the 1-stream test, both namespaces."
    echo
    hdr="| row |"; sep="|---|"
    for f in "${FIGS[@]}"; do hdr+=" ${TITLE[$f]} |"; sep+="---|"; done
    echo "$hdr"
    echo "$sep"
    for row in $ROWS; do
        line="| ${ROW_TITLE[$row]} |"
        if [[ -n "${ROW_NOTE[$row]:-}" ]]; then
            for f in "${FIGS[@]}"; do line+=" - |"; done
            echo "$line"
            continue
        fi
        for f in "${FIGS[@]}"; do
            v="${MED[$row.$f]:--}"
            cell="$(fmt "$f" "$v")"
            b="${MED[bare.$f]:--}"
            # Ratios for the figures the bare link has; the error and retransmission
            # shares are judged absolutely (targets: < 0.1 % and < 1 %).
            if [[ $row != bare && " tcp1 tcp4 ping_avg ping_p99 rps http_p99 " == *" $f "* && $v != - && $b != - ]] && awk -v b="$b" 'BEGIN { exit !(b > 0) }'; then
                cell+=" ($(awk -v v="$v" -v b="$b" 'BEGIN { printf "%.2f", v / b }')×)"
            fi
            line+=" $cell |"
        done
        echo "$line"
    done
    for row in $ROWS; do
        if [[ -n "${ROW_NOTE[$row]:-}" ]]; then
            echo
            echo "${ROW_TITLE[$row]}: ${ROW_NOTE[$row]}"
        fi
    done
    echo
    echo "Raw runs (tab-separated: ${FIGS[*]}):"
    echo
    for row in $ROWS; do
        [[ -f "$WORK/row-$row.tsv" ]] || continue
        sed "s/^/    $row\t/" "$WORK/row-$row.tsv"
    done
} >"$RESULTS/$STAMP.md"
cat "$RESULTS/$STAMP.md"
log "saved $RESULTS/$STAMP.md"
