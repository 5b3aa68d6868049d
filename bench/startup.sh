#!/usr/bin/env bash
# Start-up with a large cache: seeds N blobs (default 100,000) into a cache
# directory, then measures (1) how long until stowage answers /v2/ and
# (2) how long the background index load takes (from its log line).
# Usage: bench/startup.sh [N]   (builds target/release/stowage)
set -euo pipefail
N=${1:-100000}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release --quiet --bin stowage
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stowage-startup.XXXXXX")
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
CACHE="$WORK/cache"

python3 - "$CACHE" "$N" <<'PY'
import hashlib, os, sys
cache, n = sys.argv[1], int(sys.argv[2])
os.makedirs(cache, exist_ok=True)
lines = []
for i in range(n):
    data = b"blob %d " % i + b"x" * (i % 4096)
    h = hashlib.sha256(data).hexdigest()
    d = os.path.join(cache, "blobs", "sha256", h[:2])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, h), "wb") as f:
        f.write(data)
    lines.append("+sha256:%s %d\n" % (h, len(data)))
with open(os.path.join(cache, "index.log"), "w") as j:
    j.writelines(lines)
PY
sync
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start=$(date +%s%N)
RUST_LOG=info ./target/release/stowage --listen "127.0.0.1:$PORT" --admin-listen off \
    --cache-dir "$CACHE" --upstream http://127.0.0.1:9 >"$WORK/log" 2>&1 &
PID=$!
until curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1; do sleep 0.005; done
ready=$(( ($(date +%s%N) - start) / 1000000 ))
for _ in $(seq 1 600); do grep -q "blob index loaded" "$WORK/log" && break; sleep 0.1; done
loaded=$(grep -o 'blob index loaded.*' "$WORK/log" | head -1)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
echo "blobs seeded:          $N"
echo "serving /v2/ after:    ${ready} ms"
echo "index load:            ${loaded}"
echo "peak RSS after load:   ${rss} kB"
