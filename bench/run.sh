#!/usr/bin/env bash
# One command for the side-by-side benchmarks of issues 6, 13 and 10 (see
# bench/README.md):
#
#   bench/run.sh                 full run: 3 runs, results in bench/results/<date>-<commit>.json/.md
#   bench/run.sh --runs 5        more runs (medians)
#   bench/run.sh --smoke         tiny blobs, 1 run, 1 s wrk, no dockerd, no 3-node scenario:
#                                checks that the harness works
#   bench/run.sh --perf DIR      also perf-record the servers during the storm and warm scenarios
#
# Any other arguments go to bench/bench.py (--help lists them).
# Installs, with apt-get, only what is missing: docker-registry, nginx, wrk,
# skopeo, python3, jq, curl, openssl (docker.io and containerd too, except
# with --smoke or --dockerd off; linux-perf with --perf); then builds stowage
# (cargo build --release; STOWAGE_BIN=path skips that) and bench/client (its
# own cargo project, built into target/bench-client): the load client
# bench-client and bench-shaper, the distant upstream.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT"
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

SMOKE=0 PERF=0 DOCKERD=auto prev=
for a in "$@"; do
    [[ $a == --smoke ]] && SMOKE=1
    [[ $a == --perf ]] && PERF=1
    [[ $a == --dockerd=off || ($prev == --dockerd && $a == off) ]] && DOCKERD=0
    [[ $a == --dockerd=on || ($prev == --dockerd && $a == on) ]] && DOCKERD=1
    prev=$a
done
[[ $DOCKERD == auto ]] && DOCKERD=$((1 - SMOKE))

# ---------------------------------------------------------------- tools
want=(docker-registry nginx wrk skopeo python3 jq curl openssl ca-certificates)
[[ $PERF == 1 ]] && want+=(linux-perf)
[[ $DOCKERD == 1 ]] && want+=(docker.io containerd runc)
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "[bench] installing with apt-get: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's nginx package may start a system nginx on port 80; the benchmark
# runs its own on a free loopback port and does not touch that one.

# ---------------------------------------------------------------- builds
if [[ -z "${STOWAGE_BIN:-}" ]]; then
    echo "[bench] cargo build --release" >&2
    cargo build --release --quiet --bin stowage
    STOWAGE_BIN="$ROOT/target/release/stowage"
fi
echo "[bench] building bench/client (bench-client, bench-shaper)" >&2
cargo build --release --quiet --manifest-path "$HERE/client/Cargo.toml" --target-dir "$ROOT/target/bench-client"
CLIENT="$ROOT/target/bench-client/release/bench-client"
SHAPER="$ROOT/target/bench-client/release/bench-shaper"

# Debian's python3 (stdlib only is needed; any python3 >= 3.9 works).
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

args=()
if [[ $SMOKE == 1 ]]; then
    args+=(--runs 1 --scale 64 --wrk-seconds 1)
fi
exec "$PY" "$HERE/bench.py" --stowage "$STOWAGE_BIN" --client "$CLIENT" --shaper "$SHAPER" "${args[@]}" "$@"
