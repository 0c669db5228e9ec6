#!/usr/bin/env bash
# Soak: five hosts in network namespaces (two servers with a default-deny policy, three
# clients) under mixed traffic for a while -- HTTP allowed and denied (1 in 10) on an
# inspected port, uploads, bulk TCP on a layer-4 port, UDP -- with policy changes through
# meshctl, a certificate renewal and a meshd restart; tracked flows, meshd's resident
# memory and stuck client sockets are sampled over time. At the end it checks: no crash,
# flows and memory back to their warm-up level (within 10%), every allowed transfer
# intact, every denied request refused, no client socket stuck; it prints a table and
# exits non-zero if a check fails. The driver is tests/src/soak.rs (`mesh-soak`, on the
# netns test harness); see its docs for the details.
#
# Usage (root): scripts/soak.sh [--duration 10m] [--sample 15s]
# Environment:
#   MESH_SOAK_DURATION=60s   the duration when --duration is not given (default 10m)
#   PROFILE=release          build and run release binaries (default: debug, as the tests)
#   MESH_SKIP_NETNS=1        skip (without root) instead of failing
#
# Bounded and clean: everything runs inside network namespaces of its own process
# (198.18.0.0/15 underlay, 100.64.0.0/10 overlay, no default route), removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${PROFILE:-debug}"
case "$profile" in
  debug) build=() ;;
  release) build=(--release) ;;
  *) echo "soak.sh: PROFILE is debug or release, not $profile" >&2; exit 2 ;;
esac
cargo build --workspace --bins --locked "${build[@]}"
exec "target/$profile/mesh-soak" "$@"
