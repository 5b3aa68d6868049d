#!/usr/bin/env bash
# End-to-end check of stowage with a real registry client (skopeo) and a real
# upstream registry (Debian's docker-registry, CNCF distribution 2.8).
#
#   1. start docker-registry on a free loopback port (filesystem storage in a
#      temp dir, no auth, access log in a file);
#   2. build two small OCI images without Docker (make_oci_layout.py) and push
#      them with skopeo as library/e2etest:1.0 and team/app:v1;
#   3. start target/debug/stowage with --upstream pointing at that registry;
#   4. pull both images through stowage with skopeo and check manifest digests,
#      blob contents, tags/list, HEAD manifest and pull-by-digest;
#   5. pull both again into fresh dirs and check that the upstream served no
#      further blob GETs (everything came from stowage's cache).
#
# Usage: tests/e2e/skopeo_pull.sh
# Environment:
#   STOWAGE_BIN  stowage binary to test (default: target/debug/stowage, built
#                with `cargo build --bin stowage` first)
#   KEEP_TMP=1   keep the temp dir (logs, layouts, cache) for inspection
#
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line; exits
# non-zero if any check failed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

PASSED=0
FAILED=0
PIDS=()
TMP=""

log() { printf '[e2e] %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; }

show_log() { # FILE TITLE LINES
    if [[ -s "$1" ]]; then
        printf -- '----- %s (last %s lines of %s) -----\n' "$2" "$3" "$1"
        tail -n "$3" "$1" | cut -c1-400
        printf -- '----- end of %s -----\n' "$2"
    fi
}

show_logs() {
    [[ -n "$TMP" ]] || return 0
    show_log "$TMP/stowage.log" "stowage log" 80
    show_log "$TMP/registry/access.log" "upstream access log" 40
    show_log "$TMP/registry/registry.log" "upstream registry log" 10
}

# A setup step failed: no point going on.
die() {
    fail "$*"
    show_logs
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        # Give it a moment, then insist.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            log "kept temp dir $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    if [[ $rc -ne 0 && $FAILED -eq 0 ]]; then
        FAILED=1
        printf 'FAIL: script aborted (exit %s)\n' "$rc"
    fi
    printf 'e2e: %d passed, %d failed\n' "$PASSED" "$FAILED"
    if [[ $FAILED -ne 0 && $rc -eq 0 ]]; then
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in docker-registry skopeo jq curl python3 sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found (install: apt-get install docker-registry skopeo jq curl)"
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/stowage-e2e.XXXXXX")"
mkdir -p "$TMP/registry/data" "$TMP/skopeo-tmp" "$TMP/cache"

# skopeo keeps big temporary files under TMPDIR (/var/tmp by default).
export TMPDIR="$TMP/skopeo-tmp"

# skopeo with a policy that accepts anything and no credentials from the host.
echo '{}' >"$TMP/auth.json"
SKOPEO=(skopeo --insecure-policy)
skopeo_copy() { "${SKOPEO[@]}" copy --quiet --authfile "$TMP/auth.json" "$@"; }
skopeo_inspect_raw() { "${SKOPEO[@]}" inspect --raw --tls-verify=false --authfile "$TMP/auth.json" "$1"; }
# sha256 digest of the raw manifest at a docker:// reference, or "error: ...".
manifest_digest() {
    if skopeo_inspect_raw "$1" >"$TMP/raw-manifest" 2>"$TMP/raw-manifest.err"; then
        printf 'sha256:%s\n' "$(sha256sum <"$TMP/raw-manifest" | cut -d' ' -f1)"
    else
        printf 'error: %s\n' "$(tr '\n' ' ' <"$TMP/raw-manifest.err" | cut -c1-300)"
    fi
}

# ---------------------------------------------------------------- ports
read -r UPORT SPORT APORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
UPSTREAM="127.0.0.1:$UPORT"
STOWAGE="127.0.0.1:$SPORT"
log "temp dir $TMP; upstream on $UPSTREAM, stowage on $STOWAGE"

# ---------------------------------------------------------------- stowage binary
if [[ -z "${STOWAGE_BIN:-}" ]]; then
    STOWAGE_BIN="$ROOT/target/debug/stowage"
    log "building stowage (cargo build --bin stowage)"
    (cd "$ROOT" && cargo build --quiet --bin stowage) || die "cargo build --bin stowage failed"
fi
[[ -x "$STOWAGE_BIN" ]] || die "stowage binary $STOWAGE_BIN not found"

# ---------------------------------------------------------------- upstream registry
cat >"$TMP/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $TMP/registry/data
  delete:
    enabled: true
http:
  addr: $UPSTREAM
  secret: stowage-e2e-not-a-secret
EOF

# distribution writes its combined-format access log to stdout and its own
# logrus log to stderr.
docker-registry serve "$TMP/registry/config.yml" \
    >"$TMP/registry/access.log" 2>"$TMP/registry/registry.log" </dev/null &
PIDS+=("$!")
REGISTRY_PID=$!

wait_http() { # URL PID SECONDS
    local url=$1 pid=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

wait_http "http://$UPSTREAM/v2/" "$REGISTRY_PID" 15 || die "upstream docker-registry did not answer on http://$UPSTREAM/v2/"
log "upstream registry is up (pid $REGISTRY_PID)"

# Upstream blob GETs in the access log, e.g.
#   127.0.0.1 - - [27/Nov/2026:10:14:57 +0000] "GET /v2/library/x/blobs/sha256:00..00 HTTP/1.1" 200 157 "" "curl/7.88.1"
# With a repository argument only that repository's are counted.
count_blob_gets() { # [REPO] [DIGEST]
    local repo='[^ ]+' digest='sha256:[0-9a-f]{64}'
    [[ $# -ge 1 ]] && repo=$1
    [[ $# -ge 2 ]] && digest=$2
    grep -cE "\"GET /v2/${repo}/blobs/${digest} HTTP/" "$TMP/registry/access.log" || true
}

# Wait until the access log stops growing (the registry writes a line when a
# response has been fully sent; stowage may also still be finishing a fill).
settle_access_log() {
    local prev cur i
    prev=$(wc -l <"$TMP/registry/access.log")
    for ((i = 0; i < 20; i++)); do
        sleep 0.5
        cur=$(wc -l <"$TMP/registry/access.log")
        [[ "$cur" == "$prev" ]] && return 0
        prev=$cur
    done
}

# ---------------------------------------------------------------- seed images
# name via stowage | upstream repository | tag
IMAGES=(
    "e2etest library/e2etest 1.0"
    "team/app team/app v1"
)

declare -A MANIFEST BLOBS
for spec in "${IMAGES[@]}"; do
    read -r name repo tag <<<"$spec"
    layout="$TMP/src-${repo//\//_}"
    python3 "$HERE/make_oci_layout.py" "$layout" "$tag" >"$layout.json" || die "make_oci_layout.py failed for $repo:$tag"
    MANIFEST[$repo]=$(jq -r .manifest "$layout.json")
    BLOBS[$repo]=$(jq -r '.blobs[]' "$layout.json" | tr '\n' ' ')
    skopeo_copy --dest-tls-verify=false "oci:$layout:$tag" "docker://$UPSTREAM/$repo:$tag" \
        || die "pushing $repo:$tag to the upstream registry"
    up_digest=$(manifest_digest "docker://$UPSTREAM/$repo:$tag")
    [[ "$up_digest" == sha256:* ]] || die "skopeo inspect of $repo:$tag on the upstream: $up_digest"
    if [[ "$up_digest" != "${MANIFEST[$repo]}" ]]; then
        # skopeo rewrote the manifest while pushing; the upstream's is the truth.
        log "note: upstream manifest of $repo:$tag is $up_digest (layout had ${MANIFEST[$repo]})"
        MANIFEST[$repo]=$up_digest
    fi
    log "seeded upstream $repo:$tag = ${MANIFEST[$repo]}"
done
pass "upstream docker-registry started and seeded with library/e2etest:1.0 and team/app:v1"

# ---------------------------------------------------------------- stowage
STOWAGE_ARGS=(--listen "$STOWAGE" --upstream "http://$UPSTREAM" --cache-dir "$TMP/cache")
# The admin listener (metrics/health) defaults to a fixed port that may be
# busy; move it to a free one when this stowage has the flag.
if "$STOWAGE_BIN" --help 2>/dev/null | grep -q -- '--admin-listen'; then
    STOWAGE_ARGS+=(--admin-listen "127.0.0.1:$APORT")
fi
NO_COLOR=1 "$STOWAGE_BIN" "${STOWAGE_ARGS[@]}" >"$TMP/stowage.log" 2>&1 </dev/null &
PIDS+=("$!")
STOWAGE_PID=$!
if ! wait_http "http://$STOWAGE/v2/" "$STOWAGE_PID" 30; then
    why="did not answer on http://$STOWAGE/v2/ within 30s"
    if ! kill -0 "$STOWAGE_PID" 2>/dev/null; then
        rc=0
        wait "$STOWAGE_PID" || rc=$?
        why="exited with status $rc before answering on http://$STOWAGE/v2/"
    fi
    [[ -s "$TMP/stowage.log" ]] || why+=" (its log is empty)"
    die "stowage $why; command: $STOWAGE_BIN ${STOWAGE_ARGS[*]}"
fi
pass "stowage answers GET /v2/ (pid $STOWAGE_PID)"

# Checks one pulled OCI layout against the upstream image.
check_layout() { # OUT NAME REPO TAG WHAT
    local out=$1 name=$2 repo=$3 tag=$4 what=$5
    local idx_digest bad=0 f sum got want
    idx_digest=$(jq -r --arg t "$tag" \
        '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
        "$out/index.json" 2>/dev/null || true)
    if [[ "$idx_digest" == "${MANIFEST[$repo]}" ]]; then
        pass "$what: manifest digest in OUT/index.json equals upstream's ($idx_digest)"
    else
        fail "$what: manifest digest in OUT/index.json is '$idx_digest', upstream's is ${MANIFEST[$repo]}"
    fi
    if [[ ! -d "$out/blobs/sha256" ]]; then
        fail "$what: no blobs/sha256 directory in $out"
        return 0
    fi
    for f in "$out"/blobs/sha256/*; do
        sum=$(sha256sum "$f" | cut -d' ' -f1) || sum="(unreadable)"
        if [[ "$sum" != "$(basename "$f")" ]]; then
            fail "$what: blob $(basename "$f") hashes to $sum"
            bad=1
        fi
    done
    got=$(cd "$out/blobs/sha256" && ls | sort | tr '\n' ' ')
    want=$(for d in ${MANIFEST[$repo]} ${BLOBS[$repo]}; do echo "${d#sha256:}"; done | sort | tr '\n' ' ')
    if [[ "$got" != "$want" ]]; then
        fail "$what: blobs in OUT are [$got], expected [$want]"
        bad=1
    fi
    if [[ $bad -eq 0 ]]; then
        pass "$what: all $(wc -w <<<"$got") blobs hash to their names and match the pushed image"
    fi
}

# ---------------------------------------------------------------- first pull
for spec in "${IMAGES[@]}"; do
    read -r name repo tag <<<"$spec"
    what="first pull of $name:$tag"
    out="$TMP/pull1-${repo//\//_}"
    if ! skopeo_copy --src-tls-verify=false "docker://$STOWAGE/$name:$tag" "oci:$out:$tag"; then
        fail "$what: skopeo copy docker://$STOWAGE/$name:$tag failed"
        continue
    fi
    pass "$what: skopeo copy through stowage succeeded"

    raw_digest=$(manifest_digest "docker://$STOWAGE/$name:$tag")
    if [[ "$raw_digest" == "${MANIFEST[$repo]}" ]]; then
        pass "$what: skopeo inspect --raw via stowage gives the upstream manifest digest"
    else
        fail "$what: manifest via stowage has digest $raw_digest, upstream's is ${MANIFEST[$repo]}"
    fi
    check_layout "$out" "$name" "$repo" "$tag" "$what"

    # Every blob of the image must have come from the upstream once.
    missing=""
    for d in ${BLOBS[$repo]}; do
        [[ $(count_blob_gets "$repo" "$d") -ge 1 ]] || missing+=" $d"
    done
    if [[ -z "$missing" ]]; then
        pass "$what: stowage fetched every blob from upstream $repo"
    else
        fail "$what: no upstream GET /v2/$repo/blobs/<digest> seen for:$missing"
    fi
done

# A few more endpoints, with the image now cached.
tags=$("${SKOPEO[@]}" list-tags --tls-verify=false --authfile "$TMP/auth.json" "docker://$STOWAGE/e2etest" 2>&1 || true)
if jq -e '.Tags | index("1.0")' >/dev/null 2>&1 <<<"$tags"; then
    pass "tags/list via stowage lists e2etest:1.0"
else
    fail "tags/list via stowage for e2etest did not list 1.0: $tags"
fi

hdrs=$(curl -sS -I --max-time 10 \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "http://$STOWAGE/v2/e2etest/manifests/1.0" 2>&1 || true)
status=$(head -n1 <<<"$hdrs" | tr -d '\r')
hdr_digest=$(grep -i '^docker-content-digest:' <<<"$hdrs" | head -n1 | cut -d: -f2- | tr -d ' \r')
if [[ "$status" == *" 200"* && "$hdr_digest" == "${MANIFEST[library/e2etest]}" ]]; then
    pass "HEAD /v2/e2etest/manifests/1.0 via stowage: 200 with Docker-Content-Digest ${hdr_digest}"
else
    fail "HEAD /v2/e2etest/manifests/1.0 via stowage: status '$status', Docker-Content-Digest '$hdr_digest' (want ${MANIFEST[library/e2etest]})"
fi

by_digest=$(manifest_digest "docker://$STOWAGE/team/app@${MANIFEST[team/app]}")
if [[ "$by_digest" == "${MANIFEST[team/app]}" ]]; then
    pass "GET manifest by digest via stowage (team/app@${MANIFEST[team/app]})"
else
    fail "GET manifest by digest via stowage for team/app@${MANIFEST[team/app]} gave $by_digest"
fi

# ---------------------------------------------------------------- second pull
settle_access_log
before=$(count_blob_gets)
log "upstream blob GETs after the first pull: $before"
for spec in "${IMAGES[@]}"; do
    read -r name repo tag <<<"$spec"
    what="second pull of $name:$tag"
    out="$TMP/pull2-${repo//\//_}"
    if ! skopeo_copy --src-tls-verify=false "docker://$STOWAGE/$name:$tag" "oci:$out:$tag"; then
        fail "$what: skopeo copy docker://$STOWAGE/$name:$tag failed"
        continue
    fi
    pass "$what: skopeo copy through stowage succeeded"
    check_layout "$out" "$name" "$repo" "$tag" "$what"
done
settle_access_log
after=$(count_blob_gets)
if [[ "$after" -eq "$before" ]]; then
    pass "second pulls caused no upstream blob GETs ($before before, $after after)"
else
    fail "second pulls caused $((after - before)) upstream blob GETs (expected 0):"
    grep -E '"GET /v2/[^ ]+/blobs/' "$TMP/registry/access.log" | tail -n +"$((before + 1))" | sed 's/^/    /'
fi

if [[ $FAILED -ne 0 ]]; then
    show_logs
fi
