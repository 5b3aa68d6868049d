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
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init e2e

need_tools docker-registry skopeo jq curl python3 sha256sum
stowage_bin
mkdir -p "$TMP/cache"

# skopeo with a policy that accepts anything and no credentials from the host.
SKOPEO=(skopeo --insecure-policy)
skopeo_copy() { "${SKOPEO[@]}" copy --quiet --authfile "$TMP/empty-auth.json" "$@"; }
manifest_digest() { skopeo_digest "$1" --authfile "$TMP/empty-auth.json"; }

# ---------------------------------------------------------------- upstream registry
start_registry up
UPSTREAM=${REG_ADDR[up]}
# Upstream blob GETs in the access log, optionally of one repository (and digest).
count_blob_gets() { reg_blob_gets up 0 "$@"; }
settle_access_log() { reg_settle up; }

# ---------------------------------------------------------------- seed images
# name via stowage | upstream repository | tag
IMAGES=(
    "e2etest library/e2etest 1.0"
    "team/app team/app v1"
)
for spec in "${IMAGES[@]}"; do
    read -r name repo tag <<<"$spec"
    seed_image "$repo" "$UPSTREAM" "$repo" "$tag"
done
pass "upstream docker-registry started and seeded with library/e2etest:1.0 and team/app:v1"

# ---------------------------------------------------------------- stowage
# From flags, not a config file: the command-line path is what this suite
# covers (stowage_config only picks the ports here).
stowage_config stowage
STOWAGE=${STOWAGE_ADDR[stowage]}
log "temp dir $TMP; upstream on $UPSTREAM, stowage on $STOWAGE"
STOWAGE_ARGS=(--listen "$STOWAGE" --upstream "http://$UPSTREAM" --cache-dir "$TMP/cache"
    --admin-listen "${STOWAGE_ADMIN[stowage]}")
start_stowage stowage "${STOWAGE_ARGS[@]}" || die "$E2E_WHY"
code=$(http_code "http://$STOWAGE/v2/")
[[ $code == 200 ]] || die "stowage answered GET /v2/ with $code (want 200)"
pass "stowage answers GET /v2/ (pid ${E2E_PID[stowage]})"

# Checks one pulled OCI layout against the upstream image (lib's
# check_layout: tagged manifest digest; the blobs, exactly).
check_pulled() { # OUT REPO TAG WHAT
    check_layout "$4" "$1" "$3" "$2"
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
    check_pulled "$out" "$repo" "$tag" "$what"

    # Every blob of the image came from the upstream, once (the client's
    # request and the prefetch share one fetch).
    settle_access_log
    # shellcheck disable=SC2086 # BLOBS holds space-separated digests
    check_fetched_once "$what" up 0 "$repo" ${BLOBS[$repo]}
done

# A few more endpoints, with the image now cached.
tags=$("${SKOPEO[@]}" list-tags --tls-verify=false --authfile "$TMP/empty-auth.json" "docker://$STOWAGE/e2etest" 2>&1 || true)
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
    check_pulled "$out" "$repo" "$tag" "$what"
done
settle_access_log
after=$(count_blob_gets)
if [[ "$after" -eq "$before" ]]; then
    pass "second pulls caused no upstream blob GETs ($before before, $after after)"
else
    fail "second pulls caused $((after - before)) upstream blob GETs (expected 0):"
    grep -E '"GET /v2/[^ ]+/blobs/' "$(reg_log up)" | tail -n +"$((before + 1))" | sed 's/^/    /'
fi

