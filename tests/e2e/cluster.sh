#!/usr/bin/env bash
# Three stowage nodes on loopback acting as one cache, on a shared bucket in
# a real object store (Garage, its bucket and key made with its own CLI), in
# front of a real upstream (Debian's docker-registry, whose access log counts
# what reaches it). The nodes know each other by --peer-style lists in their
# config, share a cluster secret and the bucket. Shown:
#
#   1. a storm of clients spread over the three nodes for one 32 MiB blob:
#      one upstream GET, every body verified; the node that fetched it is the
#      rendezvous owner as computed independently here;
#   2. a tag asked through each node: one upstream request; then the image
#      pulled with skopeo through each node: every blob fetched once;
#   3. a peer request without the secret, or with a wrong one, is refused
#      (401, 403, OCI JSON);
#   4. kill -9 of the owner in the middle of a fill (64 MiB through a slowed
#      upstream): its clients fail fast, the other nodes' clients complete
#      (their fills go on from the next source with a Range), retries through
#      another node succeed; later blobs the dead node owned are fetched by
#      the survivors, one upstream GET each;
#   5. a node whose cache is wiped pulls the image again with no upstream GET
#      at all: from its peers and the bucket;
#   6. Garage stopped: the nodes keep serving from disk and upstream, ready,
#      stowage_store_up 0 and /readyz saying so; Garage back: up again.
# And the bucket is bounded by the lifecycle rule README recommends.
#
# Usage: tests/e2e/cluster.sh
# Environment: STOWAGE_BIN, GARAGE_BIN, KEEP_TMP=1 (see lib.sh, garage.sh).
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line; exits
# non-zero if any check failed.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init cluster

need_tools docker-registry skopeo jq curl python3 sha256sum openssl base64
stowage_bin
garage_bin

SKOPEO=(skopeo --insecure-policy)
skopeo_copy() { "${SKOPEO[@]}" copy --quiet --authfile "$TMP/empty-auth.json" --src-tls-verify=false "$@"; }
sha() { sha256sum <"$1" | cut -d' ' -f1; }
now() { date +%s.%N; }
ACCEPT='application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'

# ---------------------------------------------------------------- upstream, bucket
start_registry hub
HUB=${REG_ADDR[hub]}
seed_image app "$HUB" team/app v1 2097152 --layers 4
seed_image storm "$HUB" team/storm v1 33554432
seed_image slow "$HUB" team/slow v1 67108864
seed_image later "$HUB" team/later v1 200000 --layers 12
seed_image fresh "$HUB" team/fresh v1 1000000 --layers 3
big_layer() { jq -r '.layers[-1]' "${LAYOUT[$1]}.json"; }

start_garage garage stowage
PREFIX=cache
# The bucket is bounded as README says: a lifecycle rule expiring objects
# under the prefix 30 days after upload, aborting stale multipart uploads.
cat >"$TMP/lifecycle.xml" <<EOF
<LifecycleConfiguration><Rule><ID>stowage</ID><Status>Enabled</Status><Filter><Prefix>$PREFIX/</Prefix></Filter><Expiration><Days>30</Days></Expiration><AbortIncompleteMultipartUpload><DaysAfterInitiation>1</DaysAfterInitiation></AbortIncompleteMultipartUpload></Rule></LifecycleConfiguration>
EOF
code=$(s3_send PUT "?lifecycle=" "$TMP/lifecycle.xml" -H "Content-MD5: $(openssl md5 -binary <"$TMP/lifecycle.xml" | base64)" \
    -H 'Content-Type: application/xml')
s3_get "?lifecycle=" "$TMP/lifecycle.got" >/dev/null
if [[ $code == 200 ]] && grep -q "<Days>30</Days>" "$TMP/lifecycle.got"; then
    pass "bucket bounded by a lifecycle rule (expire after 30 days, abort multipart after 1): Garage accepts and returns it"
else
    fail "lifecycle rule: PUT answered $code ($(head -c 300 "$TMP/s3.out")), GET $S3_CODE: $(head -c 300 "$TMP/lifecycle.got")"
fi

# The same registry at 16 MiB/s per connection, as registry host slow.local.
read -r SLOW_PORT < <(free_ports 1)
add_log "$TMP/slow_proxy.log" "slow proxy" 5
spawn slowproxy "$PY" -u "$E2E_DIR/slow_proxy.py" "$SLOW_PORT" "$HUB" 16777216 >"$TMP/slow_proxy.log" 2>&1
for _ in $(seq 50); do grep -q listening "$TMP/slow_proxy.log" && break; sleep 0.1; done
grep -q listening "$TMP/slow_proxy.log" || die "slow proxy did not start"

# ---------------------------------------------------------------- three nodes
SECRET=$(random_hex 24)
printf '%s\n' "$SECRET" >"$TMP/cluster-secret"
NODES=(node1 node2 node3)
declare -A URL=()
for n in "${NODES[@]}"; do
    stowage_config "$n" "http://$HUB"
    URL[$n]="http://${STOWAGE_ADDR[$n]}"
done
PEERS=$(for n in "${NODES[@]}"; do printf '"%s", ' "${URL[$n]}"; done)
for n in "${NODES[@]}"; do
    cat >>"${STOWAGE_CONFIG[$n]}" <<EOF

[[upstream]]
host = "slow.local"
url = "http://127.0.0.1:$SLOW_PORT"

[cluster]
advertise = "${URL[$n]}"
peers = [${PEERS%, }]
secret_file = "$TMP/cluster-secret"

[store]
url = "s3://$S3_BUCKET/$PREFIX"
endpoint = "$AWS_ENDPOINT_URL"
region = "$AWS_REGION"
EOF
    start_stowage "$n" || die "$E2E_WHY"
done
pass "three nodes up (${URL[node1]} ${URL[node2]} ${URL[node3]}), one secret, bucket s3://$S3_BUCKET/$PREFIX on Garage"

# owner_of KEY [NODE...]: the rendezvous owner of KEY among NODES (default
# all): the highest first 8 bytes of SHA-256(url, 0, key), computed here
# independently of stowage.
owner_of() {
    local key=$1 args=() n
    shift
    [[ $# -gt 0 ]] || set -- "${NODES[@]}"
    for n in "$@"; do args+=("$n=${URL[$n]}"); done
    "$PY" - "$key" "${args[@]}" <<'EOF'
import hashlib, sys
key = sys.argv[1].encode()
def weight(url):
    return int.from_bytes(hashlib.sha256(url.encode() + b"\0" + key).digest()[:8], "big")
nodes = [a.split("=", 1) for a in sys.argv[2:]]
print(sorted((-weight(u), u, n) for n, u in nodes)[0][2])
EOF
}
blob_url() { echo "${URL[$1]}/v2/$2/blobs/$3${4:+?ns=$4}"; } # NODE REPO DIGEST [NS]
upstream_blob_metric() { metric "${STOWAGE_ADMIN[$1]}" stowage_upstream_requests_total kind=blob; }

# ---------------------------------------------------------------- 1. storm
D=$(big_layer storm)
m=$(reg_mark hub)
mkdir -p "$TMP/storm"
pids=()
for i in $(seq 0 23); do
    n=${NODES[$((i % 3))]}
    curl -s --max-time 120 -o "$TMP/storm/$i" "$(blob_url "$n" team/storm "$D")" &
    pids+=($!)
done
wait "${pids[@]}" || true
bad=0
for i in $(seq 0 23); do [[ $(sha "$TMP/storm/$i") == "${D#sha256:}" ]] || bad=$((bad + 1)); done
check_eq "storm: 24 clients over 3 nodes, bodies that fail verification" "$bad" 0
reg_settle hub
check_eq "storm: upstream GETs of the 32 MiB blob" "$(reg_blob_gets hub "$m" team/storm "$D")" 1
fetched_by=""
for n in "${NODES[@]}"; do [[ $(upstream_blob_metric "$n") == 1 ]] && fetched_by+="$n"; done
predicted=$(owner_of "$D")
check_eq "storm: the node that went upstream is the rendezvous owner computed here" "$fetched_by" "$predicted"

# ---------------------------------------------------------------- 2. a tag through each node
m=$(reg_mark hub)
# Prefetch starts the image's blob fills at these manifest GETs already, so
# the blobs are counted from here (once for the whole cluster).
m_blobs=$m
bad=""
for n in "${NODES[@]}"; do
    curl -s --max-time 30 -H "Accept: $ACCEPT" -o "$TMP/tag-$n" "${URL[$n]}/v2/team/app/manifests/v1"
    [[ "sha256:$(sha "$TMP/tag-$n")" == "${MANIFEST[app]}" ]] || bad+=" $n"
done
check_eq "tag: team/app:v1 through each node, manifests that differ from upstream's" "${bad:-none}" none
reg_settle hub
check_eq "tag: upstream manifest requests for three nodes" "$(reg_manifest_reqs hub "$m" team/app)" 1
m=$(reg_mark hub)
for n in "${NODES[@]}"; do
    if skopeo_copy "docker://${STOWAGE_ADDR[$n]}/team/app:v1" "oci:$TMP/pull-$n:v1"; then
        check_layout "skopeo pull through $n" "$TMP/pull-$n" v1 app
    else
        fail "skopeo pull of team/app:v1 through $n failed"
    fi
done
reg_settle hub
# shellcheck disable=SC2086
check_fetched_once "team/app:v1 pulled through three nodes" hub "$m_blobs" team/app ${BLOBS[app]}

# ---------------------------------------------------------------- 3. the secret
u="$(blob_url node1 team/app "$(big_layer app)" docker.io)"
code=$(curl -s --max-time 10 -o "$TMP/refused" -w '%{http_code}' -H "x-stowage-hop: http://intruder:1" "$u" || true)
if [[ $code == 401 ]] && jq -e '.errors[0].code == "UNAUTHORIZED"' "$TMP/refused" >/dev/null 2>&1; then
    pass "a peer request without the secret: 401 UNAUTHORIZED (OCI JSON)"
else
    fail "a peer request without the secret answered $code: $(head -c 300 "$TMP/refused")"
fi
code=$(curl -s --max-time 10 -o "$TMP/refused" -w '%{http_code}' -H "x-stowage-hop: http://intruder:1" \
    -H "x-stowage-cluster-secret: $(random_hex 24)" "$u" || true)
if [[ $code == 403 ]] && jq -e '.errors[0].code == "DENIED"' "$TMP/refused" >/dev/null 2>&1; then
    pass "a peer request with a wrong secret: 403 DENIED (OCI JSON)"
else
    fail "a peer request with a wrong secret answered $code: $(head -c 300 "$TMP/refused")"
fi
code=$(curl -s --max-time 10 -o /dev/null -w '%{http_code}' -H "x-stowage-hop: http://a-peer:1" \
    -H "x-stowage-cluster-secret: $SECRET" "$u" || true)
check_eq "a peer request with the secret" "$code" 200
check_eq "node1 counts two refused peer requests" \
    "$(metric "${STOWAGE_ADMIN[node1]}" stowage_peer_requests_received_total result=refused)" 2

# ---------------------------------------------------------------- 4. kill -9 of the owner mid-fill
K=$(big_layer slow)
O=$(owner_of "$K")
SURVIVORS=()
for n in "${NODES[@]}"; do [[ $n == "$O" ]] || SURVIVORS+=("$n"); done
log "64 MiB blob ${K:7:12}… is owned by $O; survivors ${SURVIVORS[*]}"
m=$(reg_mark hub)
mkdir -p "$TMP/kill"
declare -A CLIENT_NODE=()
i=0
pids=()
for n in "${NODES[@]}"; do
    for _ in 1 2; do
        CLIENT_NODE[$i]=$n
        (
            rc=0
            curl -s --max-time 120 -o "$TMP/kill/$i" "$(blob_url "$n" team/slow "$K" slow.local)" || rc=$?
            echo "$rc $(now)" >"$TMP/kill/$i.end"
        ) &
        pids+=($!)
        i=$((i + 1))
    done
done
# Kill once the owner's clients have some 8 MiB each (the fill is under way).
for _ in $(seq 200); do
    small=0
    for c in "${!CLIENT_NODE[@]}"; do
        [[ ${CLIENT_NODE[$c]} == "$O" ]] || continue
        [[ $(stat -c %s "$TMP/kill/$c" 2>/dev/null || echo 0) -ge 8388608 ]] || small=1
    done
    [[ $small == 0 ]] && break
    sleep 0.1
done
killed_at=$(now)
stop_service "$O" KILL
log "killed $O (kill -9)"
wait "${pids[@]}" || true
slowest_fail=0 bad=""
for c in "${!CLIENT_NODE[@]}"; do
    read -r rc ended <"$TMP/kill/$c.end"
    if [[ ${CLIENT_NODE[$c]} == "$O" ]]; then
        [[ $rc != 0 ]] || bad+=" client$c:completed-from-a-dead-node?"
        took=$("$PY" -c "print(int(($ended - $killed_at) * 1000))")
        [[ $took -gt $slowest_fail ]] && slowest_fail=$took
    else
        [[ $rc == 0 && $(sha "$TMP/kill/$c") == "${K#sha256:}" ]] || bad+=" client$c(${CLIENT_NODE[$c]}):rc=$rc"
    fi
done
check_eq "kill -9: survivors' clients complete and verify; the owner's fail" "${bad:-ok}" ok
if [[ $slowest_fail -lt 3000 ]]; then
    pass "kill -9: the dead node's clients failed fast (within $slowest_fail ms)"
else
    fail "kill -9: the dead node's clients took $slowest_fail ms to fail"
fi
bad=""
for c in "${!CLIENT_NODE[@]}"; do
    [[ ${CLIENT_NODE[$c]} == "$O" ]] || continue
    to=${SURVIVORS[$((c % 2))]}
    curl -s --max-time 120 -o "$TMP/kill/retry$c" "$(blob_url "$to" team/slow "$K" slow.local)" || true
    [[ $(sha "$TMP/kill/retry$c") == "${K#sha256:}" ]] || bad+=" client$c-via-$to"
done
check_eq "kill -9: the dead node's clients retried through another node get verified bytes" "${bad:-ok}" ok
reg_settle hub
full=$(reg_since hub "$m" | grep -cE "\"GET /v2/team/slow/blobs/$K HTTP/[0-9.]+\" 200 " || true)
ranged=$(reg_since hub "$m" | grep -cE "\"GET /v2/team/slow/blobs/$K HTTP/[0-9.]+\" 206 " || true)
if [[ $full == 1 && $ranged -ge 1 && $ranged -le 2 ]]; then
    pass "kill -9: upstream sent the blob once in full (to the dead owner) and the rest by Range ($ranged GET)"
else
    fail "kill -9: upstream full GETs $full (want 1), ranged GETs $ranged (want 1 or 2)"
fi
later=()
key=later
for more in 2 3 4 5; do
    for d in ${BLOBS[$key]}; do [[ $(owner_of "$d") == "$O" ]] && later+=("$d"); done
    [[ ${#later[@]} -gt 0 ]] && break
    # None of the 13 is the dead node's (a 0.5 % chance): another image.
    key=later$more
    seed_image "$key" "$HUB" team/later "v$more" 200000 --layers 12
done
[[ ${#later[@]} -gt 0 ]] || die "after kill -9: no blob of team/later is owned by the dead node $O"
m=$(reg_mark hub)
bad=""
for d in "${later[@]}"; do
    for n in "${SURVIVORS[@]}"; do
        curl -s --max-time 30 -o "$TMP/later" "$(blob_url "$n" team/later "$d")" || true
        [[ "sha256:$(sha "$TMP/later")" == "$d" ]] || bad+=" ${d:7:12}@$n"
    done
done
check_eq "after kill -9: blobs the dead node owned, through both survivors, failing verification" "${bad:-none}" none
reg_settle hub
# shellcheck disable=SC2068
check_fetched_once "after kill -9: ${#later[@]} blobs the dead node owned" hub "$m" team/later ${later[@]}

# ---------------------------------------------------------------- 5. a wiped node, the bucket
# Every blob and the manifest of team/app:v1 reached the bucket.
missing="x"
for _ in $(seq 60); do
    listed=$(s3_list "$PREFIX/" || true)
    missing=""
    for d in ${BLOBS[app]} ${MANIFEST[app]}; do grep -q "${d#sha256:}" <<<"$listed" || missing+=" ${d:7:12}"; done
    [[ -z $missing ]] && break
    sleep 0.5
done
check_eq "bucket: every blob and the manifest of team/app:v1 uploaded, missing" "${missing:-none}" none
W=${SURVIVORS[0]}
stop_service "$W"
rm -rf "$TMP/$W/cache"
mkdir -p "$TMP/$W/cache"
start_stowage "$W" || die "$E2E_WHY"
m=$(reg_mark hub)
if skopeo_copy "docker://${STOWAGE_ADDR[$W]}/team/app:v1" "oci:$TMP/wiped:v1"; then
    check_layout "wiped $W: skopeo pull" "$TMP/wiped" v1 app
else
    fail "wiped $W: skopeo pull of team/app:v1 failed"
fi
reg_settle hub
gets=$(reg_since hub "$m" | grep -cE '"GET /v2/' || true)
check_eq "wiped $W: upstream GETs (blobs and manifests) for the whole pull" "$gets" 0
hits=$(metric "${STOWAGE_ADMIN[$W]}" stowage_store_requests_total result=hit)
if [[ $hits -ge 1 ]]; then
    pass "wiped $W: $hits objects read from the bucket"
else
    fail "wiped $W: no object read from the bucket ($hits)"
fi

# ---------------------------------------------------------------- 6. Garage stopped
stop_garage garage
# A must own (among the survivors) a blob of the new image, so that it asks
# the store itself: a node that owns none of them gets each from its owner
# and never sees the store fail (its ownership depends on the image's
# random digests, so this failed about one run in sixty).
A=${SURVIVORS[0]} B=${SURVIVORS[1]}
owns=
for d in ${BLOBS[fresh]}; do [[ $(owner_of "$d" "${SURVIVORS[@]}") == "$A" ]] && owns=1; done
[[ -n $owns ]] || { A=${SURVIVORS[1]} B=${SURVIVORS[0]}; }
log "store down: pulling team/fresh through $A, which owns one of its blobs"
m=$(reg_mark hub)
if skopeo_copy "docker://${STOWAGE_ADDR[$A]}/team/fresh:v1" "oci:$TMP/fresh:v1"; then
    check_layout "store down: new image through $A" "$TMP/fresh" v1 fresh
else
    fail "store down: skopeo pull of team/fresh:v1 through $A failed"
fi
if skopeo_copy "docker://${STOWAGE_ADDR[$B]}/team/app:v1" "oci:$TMP/cached:v1"; then
    check_layout "store down: cached image through $B" "$TMP/cached" v1 app
else
    fail "store down: skopeo pull of team/app:v1 through $B failed"
fi
reg_settle hub
# shellcheck disable=SC2086
check_fetched_once "store down: team/fresh:v1" hub "$m" team/fresh ${BLOBS[fresh]}
check_eq "store down: upstream blob GETs for the cached image" "$(reg_blob_gets hub "$m" team/app)" 0
store_label="store=s3://$S3_BUCKET/$PREFIX"
check_eq "store down: stowage_store_up on $A" "$(metric "${STOWAGE_ADMIN[$A]}" stowage_store_up "$store_label")" 0
code=$(curl -s --max-time 10 -o "$TMP/readyz" -w '%{http_code}' "http://${STOWAGE_ADMIN[$A]}/readyz" || true)
if [[ $code == 200 ]] && grep -q "DOWN" "$TMP/readyz"; then
    pass "store down: /readyz still 200 (ready), its body says the store is down"
else
    fail "store down: /readyz answered $code: $(tr '\n' ' ' <"$TMP/readyz" | head -c 300)"
fi
start_garage garage
up=0
for _ in $(seq 40); do
    up=$(metric "${STOWAGE_ADMIN[$A]}" stowage_store_up "$store_label")
    [[ $up == 1 ]] && break
    sleep 0.5
done
check_eq "store back: stowage_store_up on $A within 20 s" "$up" 1
