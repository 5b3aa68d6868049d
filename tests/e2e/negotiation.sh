#!/usr/bin/env bash
# End-to-end checks of content negotiation and of signatures through the
# mirror, against the real upstream they are about: Debian's docker-registry
# (CNCF distribution 2.8, plain HTTP, no auth).
#
#   1. A two-platform image (linux/amd64 + linux/arm64, make_oci_layout.py)
#      is pushed with skopeo twice: as an OCI index (neg/oci:v1) and as a
#      Docker manifest list (neg/docker:v1, skopeo --format v2s2).
#   2. For every order of four clients (Docker schema 2 only, OCI only,
#      list/index aware, no Accept at all), a fresh stowage is asked by each
#      client in turn, GET and HEAD, by tag and by digest (the index/list and
#      every platform manifest): status, Content-Type and
#      Docker-Content-Digest must equal what the registry answers that client
#      directly, except where the registry converts to schema 1: there
#      stowage answers 404 MANIFEST_UNKNOWN (it never converts). Per fresh
#      stowage, the registry saw one GET per tag and accept class it
#      answered (refusals are not cached: one GET per refused request).
#   3. Tag-schema fallback, as cosign writes signatures: an OCI artifact
#      manifest with a subject is pushed (registry API, curl) under the tag
#      sha256-<hex>.sig. Through stowage: the referrers API answers 404 (2.8
#      has none) so clients fall back; the .sig tag and its layer come
#      through, are cached within the TTL, and are served stale when the
#      registry is stopped, also after stowage restarts.
#
# Usage: tests/e2e/negotiation.sh
# Environment: STOWAGE_BIN, KEEP_TMP=1 (see lib.sh).
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init negotiation

need_tools docker-registry skopeo jq curl sha256sum "$PY"
stowage_bin

S2=application/vnd.docker.distribution.manifest.v2+json
ML=application/vnd.docker.distribution.manifest.list.v2+json
OM=application/vnd.oci.image.manifest.v1+json
OI=application/vnd.oci.image.index.v1+json
declare -A ACCEPT=([schema2]="$S2" [oci]="$OM, $OI" [all]="$S2, $ML, $OM, $OI" [bare]="")
CLIENTS=(schema2 oci all bare)

# ---------------------------------------------------------------- upstream
start_registry up
UP=${REG_ADDR[up]}
seed_image oci "$UP" neg/oci v1 4096 --platforms linux/amd64,linux/arm64
layout=${LAYOUT[oci]}
run_logged 120 "$TMP/push.log" skopeo --insecure-policy copy --all --format v2s2 --quiet \
    --dest-tls-verify=false --dest-authfile "$TMP/empty-auth.json" \
    "oci:$layout:v1" "docker://$UP/neg/docker:v1" || die "pushing the Docker list with skopeo --format v2s2"
LIST=$(curl -s -H "Accept: $ML" "http://$UP/v2/neg/docker/manifests/v1")
LIST_DIGEST="sha256:$(printf '%s' "$LIST" | sha256sum | cut -d' ' -f1)"
[[ $(jq -r .mediaType <<<"$LIST") == "$ML" ]] || die "neg/docker:v1 is not a Docker manifest list: $LIST"
INDEX=$(curl -s -H "Accept: $OI" "http://$UP/v2/neg/oci/manifests/v1")
[[ $(jq -r .mediaType <<<"$INDEX") == "$OI" ]] || die "neg/oci:v1 is not an OCI index: $INDEX"
pass "upstream seeded: neg/oci:v1 (OCI index ${MANIFEST[oci]:7:12}) and neg/docker:v1 (Docker list ${LIST_DIGEST:7:12}), two platforms each"

# Paths asked, by tag and by digest (the index/list and each platform).
PATHS=(neg/docker/manifests/v1 neg/oci/manifests/v1
    "neg/docker/manifests/$LIST_DIGEST" "neg/oci/manifests/${MANIFEST[oci]}")
for d in $(jq -r '.manifests[].digest' <<<"$LIST"); do PATHS+=("neg/docker/manifests/$d"); done
for d in $(jq -r '.manifests[].digest' <<<"$INDEX"); do PATHS+=("neg/oci/manifests/$d"); done

# answer BASE PATH CLIENT METHOD: "status content-type digest" (digest '-' if
# none; the body of a GET must hash to it, schema 1 excepted).
answer() {
    local base=$1 path=$2 client=$3 method=$4 hdr=(-H "Accept:") status ct dg sum
    [[ -n ${ACCEPT[$client]} ]] && hdr=(-H "Accept: ${ACCEPT[$client]}")
    local opts=(-s -o "$TMP/body" -D "$TMP/hdr" "${hdr[@]}")
    [[ $method == HEAD ]] && opts+=(-I)
    : >"$TMP/body"
    curl "${opts[@]}" "http://$base/v2/$path" >/dev/null || true
    status=$(head -n1 "$TMP/hdr" | awk '{print $2}')
    ct=$(grep -i '^content-type:' "$TMP/hdr" | tr -d '\r' | awk '{print $2}' | cut -d';' -f1)
    dg=$(grep -i '^docker-content-digest:' "$TMP/hdr" | tr -d '\r' | awk '{print $2}')
    if [[ $method == GET && $status == 200 && $ct != *distribution.manifest.v1+* ]]; then
        sum="sha256:$(sha256sum <"$TMP/body" | cut -d' ' -f1)"
        [[ $sum == "$dg" ]] || dg="BODY-MISMATCH($sum)"
    fi
    echo "$status ${ct:--} ${dg:--}"
}

# What stowage must answer given the registry's answer: the same, or 404
# MANIFEST_UNKNOWN where the registry refuses or converts to schema 1.
expected() {
    local status ct dg
    read -r status ct dg <<<"$1"
    if [[ $status == 200 && $ct != *distribution.manifest.v1+* ]]; then
        echo "$status $ct $dg"
    else
        echo "404 application/json -"
    fi
}

declare -A WANT=()
schema1=0
for path in "${PATHS[@]}"; do
    for c in "${CLIENTS[@]}"; do
        for m in GET HEAD; do
            up=$(answer "$UP" "$path" "$c" "$m")
            [[ $up == *distribution.manifest.v1+* ]] && schema1=$((schema1 + 1))
            WANT[$path|$c|$m]=$(expected "$up")
        done
    done
done
# Evidence for the docs: what distribution 2.8 gives each client by tag.
for c in "${CLIENTS[@]}"; do
    log "registry, neg/docker:v1 as $c: $(answer "$UP" neg/docker/manifests/v1 "$c" GET)"
    log "registry, neg/oci:v1 as $c: $(answer "$UP" neg/oci/manifests/v1 "$c" GET)"
done
if [[ ${WANT[neg/docker/manifests/v1|schema2|GET]} == "200 $S2 $(jq -r '.manifests[] | select(.platform.architecture == "amd64") | .digest' <<<"$LIST")" ]]; then
    pass "the registry gives a schema-2-only client the list's linux/amd64 manifest by tag"
else
    fail "the registry gave a schema-2-only client '${WANT[neg/docker/manifests/v1|schema2|GET]}'"
fi
check "the registry converts to schema 1 for some clients ($schema1 answers), which stowage must answer with 404" \
    test "$schema1" -gt 0

# ---------------------------------------------------------------- every order
permutations() { # items... : one permutation per line
    local i rest
    if [[ $# -le 1 ]]; then
        echo "$*"
        return
    fi
    for ((i = 1; i <= $#; i++)); do
        rest=("${@:1:i-1}" "${@:i+1}")
        permutations "${rest[@]}" | sed "s/^/${!i} /"
    done
}
orders=0 bad=0 class_gets_bad=0
while read -r -a order; do
    orders=$((orders + 1))
    name="neg$orders"
    stowage_config "$name" "http://$UP"
    start_stowage "$name" || die "$E2E_WHY"
    st=${STOWAGE_ADDR[$name]}
    mark=$(reg_mark up)
    declare -A cached=() want_gets=([neg/docker]=0 [neg/oci]=0)
    for path in "${PATHS[@]}"; do
        for c in "${order[@]}"; do
            for m in GET HEAD; do
                if [[ $path == */manifests/v1 ]]; then
                    # Upstream GETs this request should cause: a class
                    # (bare is asked as all) the registry answers is fetched
                    # once and then cached; one it refuses (404, schema 1)
                    # is asked every time.
                    k=$c
                    [[ $k == bare ]] && k=all
                    repo=${path%/manifests/v1}
                    if [[ ${WANT[$path|$k|GET]} == 404* ]]; then
                        want_gets[$repo]=$((want_gets[$repo] + 1))
                    elif [[ -z ${cached[$path|$k]:-} ]]; then
                        cached[$path|$k]=1
                        want_gets[$repo]=$((want_gets[$repo] + 1))
                    fi
                fi
                got=$(answer "$st" "$path" "$c" "$m")
                if [[ $got != "${WANT[$path|$c|$m]}" ]]; then
                    bad=$((bad + 1))
                    [[ $bad -le 10 ]] && fail "order ${order[*]}: $m $path as $c: stowage '$got', want '${WANT[$path|$c|$m]}'"
                fi
            done
        done
    done
    reg_settle up
    for repo in neg/docker neg/oci; do
        n=$(reg_since up "$mark" | grep -cE "\"GET /v2/$repo/manifests/v1 HTTP/" || true)
        [[ $n -eq ${want_gets[$repo]} ]] || {
            class_gets_bad=$((class_gets_bad + 1))
            log "order ${order[*]}: $repo:v1 fetched $n times (want ${want_gets[$repo]})"
        }
    done
    unset cached want_gets
    stop_service "$name"
done < <(permutations "${CLIENTS[@]}")
check_eq "orders of four clients tried, each on a fresh stowage" "$orders" 24
check_eq "answers differing from the registry's (404 for schema 1) over $orders orders x ${#PATHS[@]} paths x 4 clients x GET/HEAD" "$bad" 0
check_eq "fresh stowages whose upstream tag GETs were not one per cached accept class (plus one per refused request)" "$class_gets_bad" 0

# ---------------------------------------------------------------- tag-schema fallback
SUBJECT=$(jq -r '.manifests[0].digest' <<<"$INDEX")
SIG_TAG="sha256-${SUBJECT#sha256:}.sig"
push_blob() { # REPO FILE -> digest
    local d loc
    d="sha256:$(sha256sum <"$2" | cut -d' ' -f1)"
    loc=$(curl -s -D - -o /dev/null -X POST "http://$UP/v2/$1/blobs/uploads/" | tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
    [[ $loc == http* ]] || loc="http://$UP$loc"
    [[ $loc == *\?* ]] && loc+="&digest=$d" || loc+="?digest=$d"
    curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" "$loc" >/dev/null ||
        die "blob upload of $2 to $1 failed"
    echo "$d"
}
printf '{"critical":{"image":{"docker-manifest-digest":"%s"},"type":"cosign container image signature"},"optional":{"nonce":"%s"}}' \
    "$SUBJECT" "$(random_hex 8)" >"$TMP/sig-payload.json"
printf '{}' >"$TMP/empty.json"
PAYLOAD=$(push_blob neg/oci "$TMP/sig-payload.json")
EMPTY=$(push_blob neg/oci "$TMP/empty.json")
jq -nc --arg s "$SUBJECT" --arg p "$PAYLOAD" --arg e "$EMPTY" --argjson n "$(stat -c %s "$TMP/sig-payload.json")" \
    --arg om "$OM" '{schemaVersion: 2, mediaType: $om,
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $e, size: 2},
      layers: [{mediaType: "application/vnd.dev.cosign.simplesigning.v1+json", digest: $p, size: $n,
        annotations: {"dev.cosignproject.cosign/signature": "MEUCIQ-not-a-real-signature"}}],
      subject: {mediaType: $om, digest: $s, size: 1}}' >"$TMP/sig.json"
SIG_DIGEST="sha256:$(sha256sum <"$TMP/sig.json" | cut -d' ' -f1)"
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "Content-Type: $OM" --data-binary "@$TMP/sig.json" \
    "http://$UP/v2/neg/oci/manifests/$SIG_TAG")
[[ $code == 201 ]] || die "pushing the signature manifest as $SIG_TAG answered $code"
pass "signature pushed as the cosign tag $SIG_TAG (${SIG_DIGEST:7:12}), its subject the amd64 manifest"

stowage_config sig "http://$UP"
sed -i 's/^library_prefix = true$/library_prefix = true\ntag_ttl = "2s"/' "${STOWAGE_CONFIG[sig]}"
start_stowage sig || die "$E2E_WHY"
ST=${STOWAGE_ADDR[sig]}
code=$(http_code "http://$ST/v2/neg/oci/referrers/$SUBJECT")
check_eq "referrers API through stowage (distribution 2.8 has none: clients fall back to the tag schema)" "$code" 404
mark=$(reg_mark up)
got=$(answer "$ST" "neg/oci/manifests/$SIG_TAG" all GET)
check_eq "the .sig tag through stowage" "$got" "200 $OM $SIG_DIGEST"
got=$(curl -s "http://$ST/v2/neg/oci/blobs/$PAYLOAD" | sha256sum | cut -d' ' -f1)
check_eq "the signature payload through stowage" "sha256:$got" "$PAYLOAD"
got=$(answer "$ST" "neg/oci/manifests/$SIG_TAG" all GET)
reg_settle up
n=$(reg_since up "$mark" | grep -cE "\"(GET|HEAD) /v2/neg/oci/manifests/$SIG_TAG HTTP/" || true)
check_eq "upstream requests for the .sig tag after two pulls within the TTL" "$n" 1
stop_service up
sleep 2.5
got=$(curl -s -D "$TMP/hdr" -o "$TMP/body" -H "Accept: ${ACCEPT[all]}" "http://$ST/v2/neg/oci/manifests/$SIG_TAG" -w '%{http_code}')
cache=$(grep -i '^x-stowage-cache:' "$TMP/hdr" | tr -d '\r' | awk '{print $2}')
check_eq "the .sig tag with the registry stopped, past the TTL" "$got $cache sha256:$(sha256sum <"$TMP/body" | cut -d' ' -f1)" \
    "200 stale $SIG_DIGEST"
stop_service sig
start_stowage sig || die "$E2E_WHY"
got=$(curl -s -D "$TMP/hdr" -o "$TMP/body" -H "Accept: ${ACCEPT[all]}" "http://$ST/v2/neg/oci/manifests/$SIG_TAG" -w '%{http_code}')
cache=$(grep -i '^x-stowage-cache:' "$TMP/hdr" | tr -d '\r' | awk '{print $2}')
check_eq "the .sig tag after a restart of stowage, registry still stopped" "$got $cache sha256:$(sha256sum <"$TMP/body" | cut -d' ' -f1)" \
    "200 stale $SIG_DIGEST"
got=$(curl -s "http://$ST/v2/neg/oci/blobs/$PAYLOAD" | sha256sum | cut -d' ' -f1)
check_eq "the signature payload offline" "sha256:$got" "$PAYLOAD"
