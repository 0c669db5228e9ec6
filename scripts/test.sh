#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the deterministic
# in-process tier and the network-namespace scenarios with real meshd processes.
#
# Installs the Debian packages the tests need (iproute2, curl, tcpdump, ...) when missing.
# The network-namespace tests need root and /dev/net/tun; without them they fail with a
# clear message. Set MESH_SKIP_NETNS=1 to skip them on purpose (e.g. without root).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run: command -> package. etcd and etcdctl: the fleet
# store tests run a real etcd; protoc: the etcd-client crate's build compiles etcd's
# .proto files (with the well-known types of libprotobuf-dev); openssl: test certificates
# for etcd over TLS.
declare -A PKG=(
  [ip]=iproute2 [ping]=iputils-ping [curl]=curl [tcpdump]=tcpdump
  [python3]=python3 [sha256sum]=coreutils [nft]=nftables
  [etcd]=etcd-server [etcdctl]=etcd-client [protoc]=protobuf-compiler [openssl]=openssl
)
missing=()
for cmd in "${!PKG[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: need root to apt-get install ${missing[*]} (or install them yourself)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets (run with `cargo +nightly fuzz run TARGET`, see fuzz/README.md)
# must keep compiling against the code they drive; libFuzzer itself is not built here.
echo "== fuzz targets compile"
CARGO_TARGET_DIR=target/fuzz-check cargo clippy --manifest-path fuzz/Cargo.toml --locked \
  --no-default-features --bins -- -D warnings
echo "== build binaries (the netns tests run them)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked "$@"
# A short soak (five hosts, mixed traffic, a policy change, a renewal and a restart,
# flows, memory and stuck sockets checked): scripts/soak.sh runs it for 10 minutes.
echo "== soak (1 minute)"
scripts/soak.sh --duration 60s
