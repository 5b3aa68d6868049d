#!/usr/bin/env bash
# End-to-end checks of auth = "passthrough": the caller's own credentials
# decide what it pulls through the mirror. Must run as root (it starts a
# dockerd of its own).
#
# Upstream: Debian's docker-registry (CNCF distribution 2.8) with
# `auth: token` and tests/e2e/token_server.py (Docker Hub style: anonymous
# pull on public repositories, valid credentials needed for acme/*), as
# "docker.io" of a stowage configured with auth = "passthrough" and no
# credentials of its own.
#
# Checks:
#   * stowage answers unauthenticated requests (GET /v2/, a manifest) with
#     the upstream's own challenge (realm, service, scope as upstream names
#     the repository);
#   * skopeo with the owner's credentials pulls the private image through
#     the mirror; the upstream saw every blob fetched once, and only tokens
#     the token server issued to the owner;
#   * then an anonymous caller gets 401 for the private manifest by tag and
#     by digest and for its layers under the private name and under a public
#     repository name (no Authorization at all, and an anonymous token), an
#     anonymous token for the public repository gets 404 for the private
#     layers under the public name, and an anonymous skopeo pull of the
#     private image fails; no private byte is served and nothing is fetched
#     upstream again;
#   * an anonymous skopeo pull of a public image works, and a second one is
#     served from the cache;
#   * dockerd with registry-mirrors: without credentials the private pull
#     fails; after a login (Docker Hub credentials in the client's
#     config.json, as `docker login` writes them) it pulls the private
#     Docker-Hub-style image through stowage. What dockerd sends the mirror
#     is read from the token server's log (its account on each token
#     request) and stowage's (the requests it served);
#   * containerd (ctr --hosts-dir with the shipped hosts.toml) fails without
#     credentials and pulls with the owner's (--user); podman (the shipped
#     registries.conf mirror) pulls with the owner's credentials in an
#     auth.json under the mirror's host:port.
#
# Usage: tests/e2e/private.sh            (as root)
# Environment: STOWAGE_BIN, KEEP_TMP=1 (see lib.sh).
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init private

need_root "it starts dockerd and containerd"
need_tools docker-registry skopeo jq curl sha256sum dockerd containerd ctr runc "$DOCKER" "$PY"
stowage_bin
ARCH=$(dpkg --print-architecture 2>/dev/null || true)
[[ $ARCH == amd64 || $ARCH == arm64 ]] || die "unsupported machine architecture '$ARCH'"

PUSH_PW=$(random_hex 12)
OWNER_PW=$(random_hex 12)
ALL="application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"

# ---------------------------------------------------------------- upstream
mkdir -p "$TMP/token"
cat >"$TMP/token/users.json" <<EOF
{"pusher": {"password": "$PUSH_PW", "push": true},
 "owner": {"password": "$OWNER_PW"}}
EOF
start_token_server token stowage-e2e-auth stowage-e2e-hub "$TMP/token/users.json" --private acme/
TOKEN=${TOKEN_ADDR[token]}
TOKEN_LOG="${TOKEN_DIR[token]}/requests.log"
start_registry hub token "http://$TOKEN/token" stowage-e2e-hub stowage-e2e-auth "$TMP/token/cert.pem"
HUB=${REG_ADDR[hub]}
seed_image private "$HUB" acme/private v1 --creds "pusher:$PUSH_PW" 262144 --layers 3 --platforms "linux/$ARCH"
seed_image public "$HUB" pub/app v1 --creds "pusher:$PUSH_PW" 131072
# The platform manifest docker pulls, and its blobs.
PLATFORM_MANIFEST=${MANIFEST[private@linux/$ARCH]}
PRIVATE_BLOBS=${BLOBS[private@linux/$ARCH]}
read -r -a PRIVATE_LAYERS <<<"$PRIVATE_BLOBS"
pass "upstream (distribution, token auth) seeded: acme/private:v1 (private, index ${MANIFEST[private]:7:12}) and pub/app:v1 (public)"

# ---------------------------------------------------------------- stowage
stowage_config stowage "http://$HUB"
echo 'auth = "passthrough"' >>"${STOWAGE_CONFIG[stowage]}"
start_stowage stowage || die "$E2E_WHY"
ST=${STOWAGE_ADDR[stowage]}
log "temp dir $TMP; token server $TOKEN, upstream $HUB, stowage $ST (auth = passthrough)"

# status_of METHOD PATH [AUTH]: "status www-authenticate" of a request to
# stowage; the body is left in $TMP/body.
status_of() {
    local method=$1 path=$2 auth=${3:-} args=(-s -o "$TMP/body" -D "$TMP/hdr" -H "Accept: $ALL")
    [[ $method == HEAD ]] && args+=(-I)
    [[ -n $auth ]] && args+=(-H "Authorization: $auth")
    : >"$TMP/body"
    curl "${args[@]}" "http://$ST/v2/$path" >/dev/null || true
    printf '%s %s\n' "$(head -n1 "$TMP/hdr" | awk '{print $2}')" \
        "$(grep -i '^www-authenticate:' "$TMP/hdr" | tr -d '\r' | cut -d' ' -f2-)"
}
token_for() { # SCOPE_REPO [USER:PASSWORD]
    local args=(-s)
    [[ -n ${2:-} ]] && args+=(-u "$2")
    curl "${args[@]}" "http://$TOKEN/token?service=stowage-e2e-hub&scope=repository:$1:pull" | jq -r .token
}

# ---------------------------------------------------------------- challenges
realm="Bearer realm=\"http://$TOKEN/token\",service=\"stowage-e2e-hub\""
check_eq "GET /v2/ without credentials" "$(status_of GET "")" "401 $realm"
check_eq "GET acme/private:v1 without credentials" "$(status_of GET acme/private/manifests/v1)" \
    "401 $realm,scope=\"repository:acme/private:pull\""
check_eq "GET busybox:latest without credentials (library/ as upstream names it)" \
    "$(status_of GET busybox/manifests/latest)" "401 $realm,scope=\"repository:library/busybox:pull\""

# ---------------------------------------------------------------- owner pull
mark=$(reg_mark hub)
tokens_before=$(wc -l <"$TOKEN_LOG")
out="$TMP/owner-pull"
if run_logged 120 "$TMP/skopeo.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false \
    --src-creds "owner:$OWNER_PW" "docker://$ST/acme/private:v1" "oci:$out:v1"; then
    pass "skopeo with the owner's credentials pulled acme/private:v1 through stowage"
else
    fail "skopeo with the owner's credentials could not pull acme/private:v1 through stowage"
fi
# skopeo copies the host platform's image of the (one-platform) index.
check_layout "owner's pull" "$out" v1 "private@linux/$ARCH"
reg_settle hub
# shellcheck disable=SC2086
check_fetched_once "owner's pull" hub "$mark" acme/private $PRIVATE_BLOBS
check_only_stowage "owner's pull" hub "$mark"
accounts=$(tail -n +"$((tokens_before + 1))" "$TOKEN_LOG" | jq -r '"\(.account // "anonymous") \(.user_agent | split("/")[0])"' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
if [[ $accounts == *"owner skopeo"* && $accounts != *stowage* ]]; then
    pass "tokens came from the token server to skopeo as owner, none to stowage ($accounts)"
else
    fail "token requests during the owner's pull: $accounts (want skopeo as owner, none from stowage)"
fi

# ---------------------------------------------------------------- anonymous callers
mark=$(reg_mark hub)
anon_private=$(token_for acme/private)
anon_public=$(token_for pub/app)
bad=0 n=0
for repo in acme/private pub/app; do
    for path in manifests/v1 "manifests/${MANIFEST[private]}" "manifests/$PLATFORM_MANIFEST" \
        "blobs/${PRIVATE_LAYERS[0]}" "blobs/${PRIVATE_LAYERS[-1]}"; do
        [[ $repo == pub/app && $path == manifests/v1 ]] && continue # the public tag is public
        for method in GET HEAD; do
            n=$((n + 1))
            got=$(status_of "$method" "$repo/$path")
            [[ $got == "401 Bearer "* ]] || { bad=$((bad + 1)); fail "no credentials: $method $repo/$path answered '$got'"; }
        done
    done
done
check_eq "anonymous requests without Authorization ($n: the private manifest by tag and digest, its layers, under acme/private and pub/app) not answered 401 with a challenge" "$bad" 0
bad=0 n=0
for path in manifests/v1 "manifests/${MANIFEST[private]}" "blobs/${PRIVATE_LAYERS[0]}" "blobs/${PRIVATE_LAYERS[-1]}"; do
    n=$((n + 1))
    got=$(status_of GET "acme/private/$path" "Bearer $anon_private")
    [[ $got == "401 $realm,scope=\"repository:acme/private:pull\""* ]] || {
        bad=$((bad + 1))
        fail "anonymous token: GET acme/private/$path answered '$got'"
    }
done
check_eq "requests with an anonymous token for acme/private ($n) not answered 401" "$bad" 0
bad=0 n=0
for d in "${PRIVATE_LAYERS[@]}" "${MANIFEST[private]}"; do
    kind=blobs
    [[ $d == "${MANIFEST[private]}" ]] && kind=manifests
    n=$((n + 1))
    got=$(status_of GET "pub/app/$kind/$d" "Bearer $anon_public")
    body_sum="sha256:$(sha256sum <"$TMP/body" | cut -d' ' -f1)"
    [[ $got == 404* && $body_sum != "$d" ]] || {
        bad=$((bad + 1))
        fail "anonymous token for pub/app: GET pub/app/$kind/$d answered '$got'"
    }
done
check_eq "private digests asked under the public name with a token for it ($n) not answered 404" "$bad" 0
if run_logged 60 "$TMP/anon.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false --src-no-creds \
    "docker://$ST/acme/private:v1" "oci:$TMP/anon-pull:v1"; then
    fail "an anonymous skopeo pull of acme/private:v1 through stowage succeeded"
else
    pass "an anonymous skopeo pull of acme/private:v1 through stowage fails ($(grep -oiE 'unauthorized[^"]*|denied[^"]*|401[^"]*' "$TMP/anon.log" | head -n1 | cut -c1-80))"
fi
reg_settle hub
check_eq "private blob GETs upstream during the anonymous attempts" "$(reg_blob_gets hub "$mark" acme/private)" 0

# ---------------------------------------------------------------- public image, anonymously
mark=$(reg_mark hub)
for round in 1 2; do
    out="$TMP/public-$round"
    if run_logged 120 "$TMP/skopeo.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false --src-no-creds \
        "docker://$ST/pub/app:v1" "oci:$out:v1"; then
        pass "anonymous skopeo pull $round of the public pub/app:v1 through stowage"
    else
        fail "anonymous skopeo pull $round of the public pub/app:v1 through stowage failed"
    fi
    check_layout "anonymous pull $round" "$out" v1 public
done
reg_settle hub
# shellcheck disable=SC2086
check_fetched_once "two anonymous pulls of pub/app:v1" hub "$mark" pub/app ${BLOBS[public]}
heads=$(reg_since hub "$mark" | grep -cE '"HEAD /v2/pub/app/' || true)
log "upstream HEADs for pub/app during two anonymous pulls: $heads (the second caller's token checked once)"

# ---------------------------------------------------------------- dockerd
start_dockerd "{\"registry-mirrors\": [\"http://$ST\"]}"
mirrors=$("$DOCKER" info --format '{{json .RegistryConfig.Mirrors}}' 2>/dev/null || true)
[[ $mirrors == *"$ST"* ]] || die "dockerd does not list the mirror ($mirrors)"
tokens_before=$(wc -l <"$TOKEN_LOG")
st_before=$(wc -l <"${STOWAGE_LOG[stowage]}")
if run_logged 120 "$TMP/docker-pull.log" "$DOCKER" pull acme/private:v1; then
    fail "dockerd pulled acme/private:v1 without credentials"
else
    pass "dockerd without credentials cannot pull acme/private:v1 ($(tail -n1 "$TMP/docker-pull.log" | cut -c1-120))"
fi
# `docker login` for Docker Hub writes exactly this (and would check the
# credentials against Docker Hub, unreachable here).
printf '{"auths": {"https://index.docker.io/v1/": {"auth": "%s"}}}\n' \
    "$(printf 'owner:%s' "$OWNER_PW" | base64 -w0)" >"$DOCKER_CONFIG/config.json"
mark=$(reg_mark hub)
if run_logged 180 "$TMP/docker-pull.log" "$DOCKER" pull acme/private:v1; then
    pass "after a login, dockerd (registry-mirrors) pulled the private acme/private:v1 through stowage"
else
    fail "after a login, dockerd could not pull acme/private:v1 through stowage"
fi
digests=$("$DOCKER" image inspect --format '{{json .RepoDigests}}' acme/private:v1 2>&1 || true)
if [[ $digests == *"${MANIFEST[private]}"* ]]; then
    pass "dockerd's image has the upstream index digest ${MANIFEST[private]:7:12} in RepoDigests"
else
    fail "dockerd's RepoDigests is $digests, the upstream index is ${MANIFEST[private]}"
fi
reg_settle hub
check_only_stowage "dockerd's pull" hub "$mark"
check_eq "private blob GETs upstream for dockerd's pull (all cached by skopeo's)" "$(reg_blob_gets hub "$mark" acme/private)" 0
docker_tokens=$(tail -n +"$((tokens_before + 1))" "$TOKEN_LOG" | jq -rc 'select(.user_agent | test("docker"; "i")) | "\(.account // "anonymous") \(.scope | join(" ")) \(.user_agent | split(" ")[0])"' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
log "token requests from dockerd (account, scope): $docker_tokens"
if [[ $docker_tokens == *"owner repository:acme/private:pull"* ]]; then
    pass "dockerd asked the upstream's token service itself, with its Docker Hub credentials (account owner), for the scope stowage relayed"
else
    fail "dockerd's token requests: '$docker_tokens' (want owner for repository:acme/private:pull)"
fi
served=$(tail -n +"$((st_before + 1))" "${STOWAGE_LOG[stowage]}" | grep -oE 'method=[A-Z]+ path=[^ ]+ status=[0-9]+' | sed -E 's/sha256:[0-9a-f]{64}/<digest>/' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
log "what dockerd asked stowage (count method path status): $served"

# ---------------------------------------------------------------- containerd
# hosts.toml as shipped (config/containerd/certs.d/docker.io), the mirror
# this stowage; the owner's credentials with ctr's --user (CRI: the pod's
# imagePullSecrets, or the registry auth of containerd's config).
HOSTS_DIR="$TMP/certs.d"
mkdir -p "$HOSTS_DIR/docker.io"
sed "s#mirror.example:5000#$ST#g" "$ROOT/config/containerd/certs.d/docker.io/hosts.toml" >"$HOSTS_DIR/docker.io/hosts.toml"
CTR=(ctr -a "$CTR_SOCK" -n stowage-private)
tokens_before=$(wc -l <"$TOKEN_LOG")
if run_logged 120 "$TMP/ctr.log" "${CTR[@]}" images pull --hosts-dir "$HOSTS_DIR" docker.io/acme/private:v1; then
    fail "ctr pulled acme/private:v1 without credentials"
else
    pass "ctr without credentials cannot pull acme/private:v1 ($(grep -oiE '401 Unauthorized|unauthorized|denied' "$TMP/ctr.log" | head -n1))"
fi
mark=$(reg_mark hub)
if run_logged 120 "$TMP/ctr.log" "${CTR[@]}" images pull --hosts-dir "$HOSTS_DIR" --user "owner:$OWNER_PW" docker.io/acme/private:v1; then
    got=$("${CTR[@]}" images ls -q | grep -c '^docker.io/acme/private:v1$' || true)
    dg=$("${CTR[@]}" images ls | awk '$1 == "docker.io/acme/private:v1" { print $3 }')
    check_eq "ctr --hosts-dir --user owner pulled acme/private:v1 through stowage (image digest)" "$dg" "${MANIFEST[private]}"
else
    fail "ctr with the owner's credentials could not pull acme/private:v1 through stowage"
fi
reg_settle hub
check_only_stowage "ctr's pull" hub "$mark"
ctr_tokens=$(tail -n +"$((tokens_before + 1))" "$TOKEN_LOG" | jq -rc 'select(.user_agent | test("containerd"; "i")) | "\(.method) \(.account // "anonymous") \(.status)"' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
log "token requests from containerd (method, account, status): $ctr_tokens"

# ---------------------------------------------------------------- podman
# registries.conf as shipped (a docker.io mirror), credentials in an
# auth.json under the mirror's host:port (where containers/image looks for
# a mirror's credentials).
sed "s#mirror.example:5000#$ST#g" "$ROOT/config/containers/registries.conf" >"$TMP/registries.conf"
PODMAN_DIR="$TMP/podman"
mkdir -p "$PODMAN_DIR"
: >"$PODMAN_DIR/containers.conf"
PODMAN=(env CONTAINERS_REGISTRIES_CONF="$TMP/registries.conf" CONTAINERS_CONF="$PODMAN_DIR/containers.conf"
    podman --root "$PODMAN_DIR/root" --runroot "$PODMAN_DIR/run" --storage-driver vfs
    --cgroup-manager cgroupfs --events-backend file --tmpdir "$PODMAN_DIR/tmp"
    --network-config-dir "$PODMAN_DIR/networks")
printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$ST" "$(printf 'owner:%s' "$OWNER_PW" | base64 -w0)" >"$PODMAN_DIR/auth.json"
mark=$(reg_mark hub)
if run_logged 180 "$TMP/podman.log" "${PODMAN[@]}" pull --quiet --authfile "$PODMAN_DIR/auth.json" docker.io/acme/private:v1; then
    got=$("${PODMAN[@]}" image inspect --format '{{.Digest}}' docker.io/acme/private:v1 2>&1 || true)
    check_eq "podman (registries.conf mirror, auth.json for the mirror's host) pulled acme/private:v1 through stowage (digest)" \
        "$got" "${MANIFEST[private]}"
else
    fail "podman with the owner's credentials for the mirror host could not pull acme/private:v1"
fi
reg_settle hub
check_only_stowage "podman's pull" hub "$mark"

# ---------------------------------------------------------------- path prefix
# skopeo naming the registry host in the mirror's path (a registries.conf
# location with a path, `mirror/ghcr.io`): it asks a token for the name it
# used (docker.io/acme/private), gets stowage's relayed 401 whose scope
# names the repository as upstream does, and asks again with that scope.
tokens_before=$(wc -l <"$TOKEN_LOG")
if run_logged 60 "$TMP/prefix.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false \
    --src-creds "owner:$OWNER_PW" "docker://$ST/docker.io/acme/private:v1" "oci:$TMP/prefix:v1"; then
    check_layout "skopeo through the path prefix /v2/docker.io/" "$TMP/prefix" v1 "private@linux/$ARCH"
else
    fail "skopeo with the owner's credentials could not pull $ST/docker.io/acme/private:v1"
fi
scopes=$(tail -n +"$((tokens_before + 1))" "$TOKEN_LOG" | jq -rc 'select(.user_agent | test("skopeo")) | .scope | join(" ")' | tr '\n' ';')
log "skopeo's token scopes through the path prefix: $scopes"
