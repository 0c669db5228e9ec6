#!/usr/bin/env bash
# The README's main command: a three-host mesh in network namespaces.
#
#   web  serves HTTP (a real python3 http.server) on its overlay address, under
#        default-deny policy;
#   app  and ops reach it with curl across the encrypted overlay;
#   then a layer-7 policy lets only app GET pages: app's GET passes, its POST gets 403
#        and ops (whom no rule could allow) is refused when it connects, before web
#        sees a byte, and web's decision log shows why;
#   then pods: shop and cron behind app, pay behind web, each with its own identity
#   and key in its own network namespace; pay takes requests from shop only;
#   then app's certificate is renewed in place (`meshctl cert renew`) and taken by the
#        running meshds without a restart or a new handshake;
#   then every host's `meshctl status` is printed.
#
# With --fleet, the same story on the fleet store (issue 20): an etcd on the underlay,
# hosts configured with a [store] table and no [[peer]] at all (each meshd publishes its
# own certificate and endpoint, and takes the others' from the store), the policies
# published once, signed, to every host (`meshctl policy publish`), and the renewed
# certificate published once (`meshctl peer publish`).
#
# Needs root (network namespaces, TUN). Installs its Debian packages if missing, builds
# the workspace, then re-runs itself inside private network and mount namespaces, so
# every namespace, link and process it made is gone when it exits, even on kill -9.
# Addresses: underlay 198.18.0.0/15, overlay 100.64.0.0/10 and fd00:6d65:7368::/48.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE_DIR="$ROOT/target/debug"
PORT=51820
HTTP_PORT=8080
HOSTS=(web app ops)
PODS=()
FLEET=0
ETCD_IP=198.18.0.9
STORE="http://$ETCD_IP:2379"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
    case $arg in
        --fleet) FLEET=1 ;;
        -h | --help)
            echo "usage: $0 [--fleet]   (--fleet: the same story on the fleet store, etcd)"
            exit 0
            ;;
        *) die "unknown argument $arg (usage: $0 [--fleet])" ;;
    esac
done

# ---------------------------------------------------------------- outside: prepare
if [[ -z "${MESH_DEMO_INNER:-}" ]]; then
    [[ $(id -u) -eq 0 ]] || die "run as root (network namespaces and TUN devices need it): sudo $0"
    [[ -e /dev/net/tun ]] || die "/dev/net/tun is missing (load the tun module, or give the container --device /dev/net/tun)"

    need=()
    for pair in ip:iproute2 ss:iproute2 curl:curl tcpdump:tcpdump python3:python3 \
                ping:iputils-ping unshare:util-linux nft:nftables protoc:protobuf-compiler; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
    done
    if ((FLEET)); then
        for pair in etcd:etcd-server etcdctl:etcd-client; do
            command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
        done
    fi
    if ((${#need[@]})); then
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi

    say "building meshd and meshctl"
    (cd "$ROOT" && cargo build --workspace --bins)

    export MESH_DEMO_INNER=1
    exec unshare --net --mount --propagation private -- "$0" "$@"
fi

# ---------------------------------------------------------------- inside: the demo
MESHD="$PROFILE_DIR/meshd"
MESHCTL="$PROFILE_DIR/meshctl"
[[ -x $MESHD && -x $MESHCTL ]] || die "meshd/meshctl not found in $PROFILE_DIR: cargo build --workspace --bins"

# Our own /run/netns, private to this mount namespace.
mkdir -p /run/netns
mount -t tmpfs -o mode=0755 tmpfs /run/netns
ip link set lo up

WORK="$(mktemp -d /tmp/mesh-demo.XXXXXX)"
PIDS=()
declare -A MESHD_PID
ok=0

cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for h in "${HOSTS[@]}" "${PODS[@]}" etcd ul; do ip netns del "demo-$h" 2>/dev/null || true; done
    if ((ok)); then
        rm -rf "$WORK"
        say "done: everything cleaned up"
    else
        echo "demo failed (exit $rc); logs kept in $WORK" >&2
        for h in "${HOSTS[@]}"; do
            [[ -f $WORK/$h/meshd.log ]] && { echo "--- $h/meshd.log" >&2; tail -n 20 "$WORK/$h/meshd.log" >&2; }
        done
        [[ -f $WORK/etcd/etcd.log ]] && { echo "--- etcd/etcd.log" >&2; tail -n 10 "$WORK/etcd/etcd.log" >&2; }
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local h=$1; shift; ip netns exec "demo-$h" "$@"; }
# Background processes die with this script, even if it is killed (-9).
in_ns_bg() { local h=$1; shift; ip netns exec "demo-$h" setpriv --pdeathsig KILL -- "$@"; }
ctl() { local h=$1; shift; "$MESHCTL" --socket "$WORK/$h/meshd.sock" "$@"; }
# The operator's meshctl against the fleet store (from etcd's namespace, on the underlay).
fleetctl() { in_ns etcd "$MESHCTL" --store "$STORE" --trust-domain demo.mesh "$@"; }
# js HOST EXPR: EXPR (Python) over HOST's `meshctl status --json`, bound to `s`.
js() { ctl "$1" status --json | python3 -c "import json, sys; s = json.load(sys.stdin); print($2)"; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds.
wait_for() {
    local what=$1 secs=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.1
    done
}

say "1. a mesh CA and one certificate per host"
cd "$WORK"
"$MESHCTL" ca init --trust-domain demo.mesh --cert ca.crt --key ca.key \
    --allow-ip 100.64.0.0/10 --allow-ip fd00:6d65:7368::/48
i=0
for h in "${HOSTS[@]}"; do
    i=$((i + 1))
    mkdir -p "$h/www"
    "$MESHCTL" cert issue --identity "spiffe://demo.mesh/$h" \
        --ip "100.64.0.$i" --ip "fd00:6d65:7368::$i" \
        --ca ca.crt --ca-key ca.key --out "$h/host.crt" --key-out "$h/host.key"
    cp ca.crt "$h/ca.crt"
done
"$MESHCTL" cert show web/host.crt
if ((FLEET)); then
    echo "  and a policy signing key: the hosts accept only documents it signed"
    "$MESHCTL" policy key gen --out policy.key | sed 's/^/  /'
    for h in "${HOSTS[@]}"; do cp policy.pub "$h/policy.pub"; done
fi

say "2. three hosts on one underlay (network namespaces, veth pairs, a bridge)"
ip netns add demo-ul
ip -n demo-ul link set lo up
ip -n demo-ul link add br0 type bridge
ip -n demo-ul link set br0 up
i=0
for h in "${HOSTS[@]}"; do
    i=$((i + 1))
    ip netns add "demo-$h"
    ip -n "demo-$h" link set lo up
    ip -n demo-ul link add "h-$h" type veth peer name eth0 netns "demo-$h"
    ip -n demo-ul link set "h-$h" master br0 up
    ip -n "demo-$h" addr add "198.18.0.$i/15" dev eth0
    ip -n "demo-$h" link set eth0 up
    echo "  $h: underlay 198.18.0.$i, overlay 100.64.0.$i and fd00:6d65:7368::$i"
done
if ((FLEET)); then
    # etcd (Debian's etcd-server, no systemd): one member, its own namespace on the
    # bridge, its peer port on that namespace's loopback.
    mkdir -p etcd
    ip netns add demo-etcd
    ip -n demo-etcd link set lo up
    ip -n demo-ul link add h-etcd type veth peer name eth0 netns demo-etcd
    ip -n demo-ul link set h-etcd master br0 up
    ip -n demo-etcd addr add "$ETCD_IP/15" dev eth0
    ip -n demo-etcd link set eth0 up
    in_ns_bg etcd etcd --name etcd --data-dir "$WORK/etcd/data" \
        --listen-client-urls "$STORE" --advertise-client-urls "$STORE" \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster etcd=http://127.0.0.1:2380 \
        --logger zap --log-outputs stderr >etcd/etcd.log 2>&1 &
    PIDS+=($!)
    wait_for "etcd" 20 in_ns etcd etcdctl --endpoints "$STORE" --dial-timeout 2s endpoint health
    echo "  etcd: underlay $ETCD_IP, the fleet store at $STORE (prefix /meshd/demo.mesh/)"
fi

if ((FLEET)); then
    say "3. meshd on every host, knowing only its own certificate, the CA and the store"
else
    say "3. meshd on every host, each knowing the others as peers"
fi
cat >web/policy.toml <<EOF
[[policy]]
name = "web-clients"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://demo.mesh/app", "spiffe://demo.mesh/ops"] }]
to = [{ ports = [$HTTP_PORT], protocols = ["tcp"] }]

[[test]]
from = "spiffe://demo.mesh/ops"
to_port = $HTTP_PORT
expect = "allow"

[[test]]
from = "spiffe://demo.mesh/ops"
to_port = 22
expect = "deny"
EOF
i=0
for h in "${HOSTS[@]}"; do
    i=$((i + 1))
    {
        printf '[node]\ncert = "host.crt"\nkey = "host.key"\nca = "ca.crt"\n'
        printf 'listen = "198.18.0.%s:%s"\ntun = "mesh0"\nstate_dir = "state"\n' "$i" "$PORT"
        printf 'control_socket = "meshd.sock"\nroutes = ["100.64.0.0/10", "fd00:6d65:7368::/48"]\n'
        printf 'log_level = "info"\n'
        # web runs under the recommended default deny; its start-up policy lets app
        # and ops open TCP connections to the HTTP port (layer 4), nothing else.
        if [[ $h == web ]]; then
            printf '\n[policy]\ndefault = "deny"\nfile = "policy.toml"\n'
        fi
        # In the fleet, no [[peer]]: meshd publishes its certificate and endpoint
        # (node.listen) and takes the others' from the store.
        if ((FLEET)); then
            printf '\n[store]\nendpoints = ["%s"]\npolicy_keys = ["policy.pub"]\n' "$STORE"
        else
            j=0
            for p in "${HOSTS[@]}"; do
                j=$((j + 1))
                [[ $p == "$h" ]] && continue
                printf '\n[[peer]]\ncert = "../%s/host.crt"\nendpoint = "198.18.0.%s:%s"\n' "$p" "$j" "$PORT"
            done
        fi
    } >"$h/meshd.toml"
    in_ns_bg "$h" "$MESHD" --config "$WORK/$h/meshd.toml" >"$h/meshd.log" 2>&1 &
    PIDS+=($!)
    MESHD_PID[$h]=$!
done
# meshd_ready HOST: its meshd runs (else stop waiting) and reports ready.
meshd_ready() {
    kill -0 "${MESHD_PID[$1]}" 2>/dev/null || die "meshd on $1 exited: $(tail -n 3 "$WORK/$1/meshd.log")"
    ctl "$1" status --json 2>/dev/null | grep -q '"ready":true'
}
for h in "${HOSTS[@]}"; do
    deadline=$((SECONDS + 15))
    until meshd_ready "$h"; do
        ((SECONDS < deadline)) || die "timed out waiting for meshd on $h to be ready"
        sleep 0.1
    done
    echo "  meshd on $h is ready"
done
if ((FLEET)); then
    # two_store_peers HOST: HOST took both other hosts from the store.
    two_store_peers() { [[ $(js "$1" "s['store']['applied']['peers']") == 2 ]]; }
    for h in "${HOSTS[@]}"; do
        wait_for "$h to take its two peers from the store" 20 two_store_peers "$h"
        echo "  $h took its peers from the store: $(js "$h" "', '.join(sorted({p['identity'] for p in s['peers']}))")"
    done
    echo "  \$ meshctl --store $STORE fleet status"
    fleetctl fleet status | sed 's/^/  /'
fi

say "4. a real HTTP server on web (python3 -m http.server, port $HTTP_PORT)"
echo "hello from web, over the mesh" >web/www/index.html
in_ns_bg web python3 -m http.server "$HTTP_PORT" --bind :: --directory "$WORK/web/www" >web/http.log 2>&1 &
PIDS+=($!)
wait_for "the HTTP server" 10 bash -c "ip netns exec demo-web ss -Hltn 'sport = :$HTTP_PORT' | grep -q ."

say "5. curl from app and ops to web's overlay addresses (IPv4 and IPv6)"
for h in app ops; do
    for addr in 100.64.0.1 "[fd00:6d65:7368::1]"; do
        printf '  %s -> http://%s:%s/  ' "$h" "$addr" "$HTTP_PORT"
        in_ns "$h" curl -sS -g --retry 5 --retry-connrefused --retry-delay 1 --max-time 10 \
            "http://$addr:$HTTP_PORT/"
    done
done

say "6. what the underlay sees: only WireGuard (UDP $PORT), never the page"
ip netns exec demo-ul tcpdump -i br0 -n -U --immediate-mode -w "$WORK/underlay.pcap" >"$WORK/tcpdump.log" 2>&1 &
TCPDUMP=$!
PIDS+=("$TCPDUMP")
wait_for "tcpdump" 10 grep -q "listening on" "$WORK/tcpdump.log"
in_ns app curl -sS --max-time 10 -o /dev/null "http://100.64.0.1:$HTTP_PORT/"
kill -INT "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true
total=$(tcpdump -r "$WORK/underlay.pcap" -n 2>/dev/null | wc -l)
udp=$(tcpdump -r "$WORK/underlay.pcap" -n "udp port $PORT" 2>/dev/null | wc -l)
echo "  captured $total packets on the underlay, $udp of them WireGuard on UDP $PORT"
if grep -qa "hello from web" "$WORK/underlay.pcap"; then
    die "the page crossed the underlay in clear"
fi
echo "  the page's text appears nowhere in the capture"

say "7. policy: only app may GET pages from web (layer 7), checked before web sees a byte"
cat >web/policy-l7.toml <<EOF
[[policy]]
name = "web"
action = "allow"

[[policy.rule]]
name = "app-reads"
from = [{ identities = ["spiffe://demo.mesh/app"] }]
to = [{ ports = [$HTTP_PORT], methods = ["GET", "HEAD"], paths = ["/", "/index.html", "/api/*"] }]

[[test]]
name = "app reads the page"
from = "spiffe://demo.mesh/app"
to_port = $HTTP_PORT
method = "GET"
path = "/"
expect = "allow"

[[test]]
name = "app may not POST"
from = "spiffe://demo.mesh/app"
to_port = $HTTP_PORT
method = "POST"
path = "/"
expect = "deny"

[[test]]
name = "ops is out"
from = "spiffe://demo.mesh/ops"
to_port = $HTTP_PORT
method = "GET"
path = "/"
expect = "deny"
expect_reason = "no_allow_matched"
EOF
sed 's/^/  | /' web/policy-l7.toml
echo "  \$ meshctl policy test web/policy-l7.toml"
"$MESHCTL" policy test web/policy-l7.toml | sed 's/^/  /'
# applied HOST VERSION: HOST enforces store policy VERSION.
applied() { [[ $(js "$1" "s['store']['applied']['policy_version']") == "$2" ]]; }
# publish FILE: `meshctl policy publish` (signed, one write to the store), then wait
# until every host applied that version.
publish() {
    local out version h
    out=$(fleetctl policy publish "$1" --key policy.key) || die "policy publish $1: $out"
    echo "  $out"
    version=$(sed -n 's/^published policy version \([0-9]*\) .*/\1/p' <<<"$out")
    [[ -n $version ]] || die "policy publish $1: no version in \"$out\""
    for h in "${HOSTS[@]}"; do
        wait_for "$h to apply policy version $version" 10 applied "$h" "$version"
        printf '  %s: %s\n' "$h" "$(grep -F "store: policy document applied" "$h/meshd.log" | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g')"
    done
}
if ((FLEET)); then
    echo "  \$ meshctl --store $STORE policy publish web/policy-l7.toml --key policy.key"
    echo "  (tests run, signed as the next version, one write; every meshd checks the signature,"
    echo "   runs the tests again and swaps: the policy is in force on every host, not only web)"
    publish web/policy-l7.toml
else
    echo "  \$ meshctl policy apply web/policy-l7.toml     (meshd runs the tests again, then swaps)"
    ctl web policy apply web/policy-l7.toml | sed 's/^/  /'
fi

# expect_status HOST WANT METHOD: one curl to web's page; its status must be WANT
# (000: no HTTP answer, the connection refused).
expect_status() {
    local h=$1 want=$2 method=$3 got
    got=$(in_ns "$h" curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X "$method" \
        "http://100.64.0.1:$HTTP_PORT/") || true
    [[ $got == 000 ]] && shown="refused when it connects" || shown=$got
    printf '  %-3s %-4s http://100.64.0.1:%s/  ->  %s\n' "$h" "$method" "$HTTP_PORT" "$shown"
    [[ $got == "$want" ]] || die "$h $method: expected HTTP $want, got $got"
}
expect_status app 200 GET
expect_status app 403 POST
# No rule could allow ops on this port, whatever it asks: refused at its SYN
# (docs/policy.md), not let in to be answered 403.
expect_status ops 000 GET
echo "  the last requests in web's server log: app's GET; the refused ones never reached it"
grep -E '"(GET|POST|HEAD|PUT|DELETE) ' web/http.log | tail -n 2 | sed 's/^/  | /'

echo "  \$ meshctl policy explain --from spiffe://demo.mesh/ops --to-port $HTTP_PORT --method GET --path /   (asks web's meshd)"
ctl web policy explain --from spiffe://demo.mesh/ops --to-port "$HTTP_PORT" --method GET --path / | sed 's/^/  /'

if ((FLEET)); then
    echo "  \$ meshctl policy explain ... (the same question, asked app's meshd: the same answer)"
    ctl app policy explain --from spiffe://demo.mesh/ops --to-port "$HTTP_PORT" --method GET --path / | sed 's/^/  /'
    echo "  \$ meshctl --store $STORE fleet status"
    fleetctl fleet status | sed 's/^/  /'
    echo "  \$ meshctl --store $STORE fleet diff   (nodes not on the published version; exit 1 if any)"
    wait_for "every node to report the published version" 10 fleetctl fleet diff
    fleetctl fleet diff | sed 's/^/  /'
fi

echo "  \$ meshctl log   (on web: every deny, who, what and why)"
echo "  (lines without a request: connections tracked under the old policy, cut when it was"
echo "   applied, since port $HTTP_PORT is now inspected and a stream cannot be inspected from"
echo "   its middle; lines with one: requests refused with 403)"
ctl web log | sed 's/^/  /'

say "8. pods: shop and cron behind app, pay behind web, each with its own identity"
# pod HOST HOST_INDEX POD ADDRESS: what a CNI plugin does (namespace, veth with the
# tunnel's MTU, address, route, proxy ARP, forwarding), then the operator's part: the
# pod's certificate, `meshctl workload add` on its host, `meshctl peer add` elsewhere.
pod() {
    local host=$1 hi=$2 pod=$3 addr=$4
    PODS+=("$pod")
    "$MESHCTL" cert issue --identity "spiffe://demo.mesh/$pod" --ip "$addr" \
        --ca ca.crt --ca-key ca.key --out "$host/$pod.crt" --key-out "$host/$pod.key" >/dev/null
    ip netns add "demo-$pod"
    ip -n "demo-$pod" link set lo up
    ip -n "demo-$host" link add "p-$pod" mtu 1420 type veth peer name eth0 netns "demo-$pod"
    ip -n "demo-$host" link set "p-$pod" up
    ip -n "demo-$pod" addr add "$addr/32" dev eth0
    ip -n "demo-$pod" link set eth0 mtu 1420 up
    ip -n "demo-$pod" route add 100.64.0.0/10 dev eth0
    in_ns "$host" sh -c "echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/ipv4/conf/p-$pod/proxy_arp"
    ctl "$host" workload add "$pod" --cert "$host/$pod.crt" --key "$host/$pod.key" --veth "p-$pod"
    # (In the fleet too: the store has endpoints only for nodes, which publish their own.)
    local j=0 other
    for other in "${HOSTS[@]}"; do
        j=$((j + 1))
        [[ $other == "$host" ]] && continue
        ctl "$other" peer add "$host/$pod.crt" --endpoint "198.18.0.$hi:$PORT" >/dev/null
    done
}
if ((FLEET)); then
    echo "  (pods join by hand, meshctl peer add --endpoint on the other hosts: the store holds only nodes' endpoints)"
fi
pod app 2 shop 100.65.2.1
pod app 2 cron 100.65.2.2
pod web 1 pay 100.65.1.1
ctl app workload list
mkdir -p pay/www
echo "pay: payment accepted" >pay/www/index.html
in_ns_bg pay python3 -m http.server "$HTTP_PORT" --bind 0.0.0.0 --directory "$WORK/pay/www" >pay/http.log 2>&1 &
PIDS+=($!)
wait_for "pay's HTTP server" 10 bash -c "ip netns exec demo-pay ss -Hltn 'sport = :$HTTP_PORT' | grep -q ."
cat >pay.toml <<'POLICY'
# pay takes HTTP from shop only; every other workload keeps the mesh default.
[[policy]]
name = "pay-from-shop"
action = "allow"
selector = { identities = ["spiffe://demo.mesh/pay"] }
[[policy.rule]]
from = [{ identities = ["spiffe://demo.mesh/shop"] }]
to = [{ ports = [8080] }]
POLICY
if ((FLEET)); then
    echo "  \$ meshctl --store $STORE policy publish pay.toml --key policy.key"
    publish pay.toml
else
    ctl web policy apply pay.toml
fi
printf '  shop -> pay (allowed):  '
in_ns shop curl -sS --retry 5 --retry-connrefused --retry-delay 1 --max-time 10 "http://100.65.1.1:$HTTP_PORT/"
printf '  cron -> pay (refused):  '
if in_ns cron curl -sS --max-time 3 "http://100.65.1.1:$HTTP_PORT/" 2>/dev/null; then
    die "cron reached pay"
fi
echo "no answer (shop and cron share a host, but not an identity)"
echo "  web's decision log, for pay:"
ctl web log -n 50 | grep -F -- "-> spiffe://demo.mesh/pay" | tail -n 2 | sed 's/^/  /' \
    || die "cron's refused request is missing from web's decision log"

say "9. certificate renewal: app's, in place, taken by the running meshds"
handshake_with_app() { js web "[p['latest_handshake'] for p in s['peers'] if p['identity'] == 'spiffe://demo.mesh/app'][0]"; }
before=$(handshake_with_app)
echo "  \$ meshctl cert renew app/host.crt --validity 90d"
"$MESHCTL" cert renew app/host.crt --validity 90d --ca ca.crt --ca-key ca.key | sed 's/^/  /'
end=$("$MESHCTL" cert show --json app/host.crt | python3 -c 'import json, sys; print(json.load(sys.stdin)["not_after_unix"])')
app_took_it() { [[ $(js app "s['workloads'][0]['not_after']") == "$end" ]]; }
wait_for "app's meshd to take its renewed certificate" 10 app_took_it
grep -F "node certificate renewed" app/meshd.log | tail -n 1 | sed 's/^/  | /'
if ((FLEET)); then
    echo "  \$ meshctl --store $STORE peer publish app/host.crt --ca ca.crt"
    fleetctl peer publish app/host.crt --ca ca.crt | sed 's/^/  /'
    # peer_took_it HOST: HOST holds app's renewed certificate.
    peer_took_it() {
        [[ $(js "$1" "[p['not_after'] for p in s['peers'] if p['identity'] == 'spiffe://demo.mesh/app'][0]") == "$end" ]]
    }
    for h in web ops; do wait_for "$h to take app's renewed certificate from the store" 10 peer_took_it "$h"; done
    echo "  web and ops hold the renewed certificate too (from the store)"
else
    for h in web ops; do
        ctl "$h" peer add app/host.crt --endpoint "198.18.0.2:$PORT" >/dev/null
    done
    echo "  web and ops hold the renewed certificate too (meshctl peer add app/host.crt)"
fi
# (web's policy now guards pay only, under default deny; app takes anything.)
pinged=$(in_ns web ping -n -q -c 3 -i 0.2 -W 2 100.64.0.2) || die "web cannot reach app after the renewal"
grep -F "packets transmitted" <<<"$pinged" | sed 's/^/  web -> app: /'
after=$(handshake_with_app)
[[ $after == "$before" ]] || die "web and app made a new handshake ($before -> $after)"
echo "  web's session with app carried on: no new handshake (latest still $(date -u -d "@$before" +%H:%M:%SZ))"

say "10. meshctl status on every host"
for h in "${HOSTS[@]}"; do
    echo "--- $h"
    ctl "$h" status
done

ok=1
