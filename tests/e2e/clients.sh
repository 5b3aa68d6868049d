#!/usr/bin/env bash
# End-to-end suite: real clients (dockerd, containerd's ctr, skopeo) pulling
# through one stowage that fronts two upstream registries, the way operators
# run it. Must run as root (it starts its own dockerd and containerd, with
# their own roots and sockets under a temp dir; the machine's are untouched).
#
# Upstreams (all on loopback):
#   "docker.io": Debian's docker-registry (CNCF distribution 2.8) with
#       `auth: token`, and tests/e2e/token_server.py issuing signed JWTs the
#       way Docker Hub's auth service does: anonymous pull on public
#       repositories, credentials required for acme/* (private).
#   "ghcr.io": a second docker-registry with htpasswd basic auth (every
#       repository private).
# stowage's config is config/stowage.toml (both [[upstream]] hosts, their
# library_prefix/tag_ttl) with the URLs pointed at those registries and
# credentials added (password_file for docker.io, password_env for ghcr.io).
# Client configs are the shipped examples with mirror.example:5000 replaced:
# config/docker/daemon.json, config/containerd/certs.d/*/hosts.toml,
# config/containers/registries.conf, config/kubernetes/containerd-config.toml.
#
# Images are seeded by the test: busybox from a busybox-static rootfs with
# `docker import` + `docker push`; multi-layer and multi-arch (OCI index)
# images from make_oci_layout.py pushed with skopeo.
#
# Checks:
#   * dockerd (registry-mirrors, reloaded with SIGHUP): docker pull busybox,
#     a multi-layer and a multi-arch image; docker run busybox; digests and
#     image IDs equal the upstream's; every blob fetched upstream exactly once;
#     after docker rmi, pulling again makes no upstream blob request.
#   * containerd (ctr --hosts-dir): the same repository name on both hosts,
#     routed by ?ns=, each digest equal to its upstream's; a multi-arch index
#     with all platforms; after removal, re-pulls fetch no blob upstream.
#   * skopeo (registries.conf [[registry.mirror]]): a private docker.io image
#     with credentials configured in stowage only, and a ghcr.io multi-arch
#     image through the path-prefix mirror.
#   * every upstream request comes from stowage (no client fell back to an
#     upstream directly); token requests are cached.
# A program that is missing or cannot run fails the suite, saying why.
#
# Usage: tests/e2e/clients.sh            (as root)
# Environment:
#   STOWAGE_BIN  stowage binary (default: cargo build --bin stowage, then
#                target/debug/stowage)
#   KEEP_TMP=1   keep the temp dir (logs, configs, caches) for inspection
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line; exits
# non-zero if any check failed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CONFIG="$ROOT/config"

PASSED=0
FAILED=0
TMP=""
# name=pid, in start order; stopped in reverse order.
SERVICES=()
DOCKER=/usr/bin/docker        # Debian's client, matching its dockerd
PY=/usr/bin/python3           # Debian's Python, which has python3-jwt

log() { printf '[e2e +%ss] %s\n' "$SECONDS" "$*"; }
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
    [[ -n "$TMP" && -d "$TMP" ]] || return 0
    show_log "$TMP/stowage.log" "stowage log" 60
    show_log "$TMP/hub/access.log" "docker.io upstream access log" 30
    show_log "$TMP/hub/registry.log" "docker.io upstream registry log" 10
    show_log "$TMP/ghcr/access.log" "ghcr.io upstream access log" 20
    show_log "$TMP/ghcr/registry.log" "ghcr.io upstream registry log" 10
    show_log "$TMP/token/requests.log" "token server requests" 20
    show_log "$TMP/token/server.log" "token server output" 10
    show_log "$TMP/dockerd.log" "dockerd log" 30
    show_log "$TMP/containerd.log" "containerd log" 15
}

# A setup step failed: no point going on.
die() {
    fail "$*"
    show_logs
    exit 1
}

# Runs a command with a time limit, its output in FILE; on failure prints it.
run_logged() { # SECONDS FILE COMMAND...
    local secs=$1 out=$2 rc=0
    shift 2
    timeout --kill-after=10 "$secs" "$@" >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        printf '    $ %s\n' "$*"
        [[ $rc -eq 124 || $rc -eq 137 ]] && printf '    (timed out after %ss)\n' "$secs"
        tail -n 15 "$out" | cut -c1-300 | sed 's/^/    | /'
    fi
    return "$rc"
}

stop_pid() { # NAME PID SECONDS
    local name=$1 pid=$2 secs=$3 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop in ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i entry name pid pids m cmd
    set +e
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        entry=${SERVICES[$i]}
        name=${entry%%=*}
        pid=${entry#*=}
        case $name in
            dockerd) stop_pid "$name" "$pid" 20 ;;
            containerd) stop_pid "$name" "$pid" 10 ;;
            *) stop_pid "$name" "$pid" 5 ;;
        esac
    done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        # Container shims started by our containerd outlive it; they name our
        # socket under $TMP on their command line.
        pids=$(grep -lsF -- "$TMP/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true)
        for pid in $pids; do
            cmd=$(tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline) || continue # gone (the grep itself)
            [[ $cmd == *"$TMP/"* ]] || continue
            log "killing leftover process $pid: $(cut -c1-160 <<<"$cmd")"
            kill -KILL "$pid" 2>/dev/null
        done
        # Mounts left under $TMP (netns bind mounts, snapshots), deepest first.
        awk -v t="$TMP/" 'index($2, t) == 1 { print $2 }' /proc/self/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null; done
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

# ================================================================ preflight
[[ $(id -u) -eq 0 ]] || die "must run as root: it starts dockerd and containerd (run via .ci/run, or sudo)"
missing=()
for tool in dockerd containerd ctr runc containerd-shim-runc-v2 skopeo podman docker-registry htpasswd jq curl sha256sum timeout python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -x $DOCKER ]] || missing+=("$DOCKER")
[[ -x $PY ]] || missing+=("$PY")
if [[ ${#missing[@]} -gt 0 ]]; then
    die "required programs not found: ${missing[*]} (apt-get install docker.io containerd runc skopeo podman docker-registry apache2-utils jq curl python3-jwt python3-cryptography busybox-static)"
fi
"$PY" -c 'import jwt, cryptography' 2>/dev/null ||
    die "$PY cannot import jwt and cryptography (apt-get install python3-jwt python3-cryptography)"
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; the test image needs busybox-static (apt-get install busybox-static)"
fi
ARCH=$(dpkg --print-architecture 2>/dev/null || true)
case $ARCH in
    amd64 | arm64) ;;
    *) die "unsupported machine architecture '$ARCH' (the multi-arch images are linux/amd64 + linux/arm64)" ;;
esac
OTHER_ARCH=arm64
[[ $ARCH == arm64 ]] && OTHER_ARCH=amd64
for f in docker/daemon.json containerd/certs.d/docker.io/hosts.toml containerd/certs.d/ghcr.io/hosts.toml \
    containers/registries.conf kubernetes/containerd-config.toml stowage.toml; do
    [[ -f "$CONFIG/$f" ]] || die "example config/$f is missing"
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/stowage-clients.XXXXXX")"
chmod 755 "$TMP"
mkdir -p "$TMP/hub/data" "$TMP/ghcr/data" "$TMP/token" "$TMP/secrets" "$TMP/cache" "$TMP/tmp" \
    "$TMP/out" "$TMP/layouts" "$TMP/docker-client"
export TMPDIR="$TMP/tmp"          # skopeo's big temporary files
export DOCKER_CONFIG="$TMP/docker-client"
unset DOCKER_HOST DOCKER_CONTEXT CONTAINERD_ADDRESS CONTAINERD_NAMESPACE

read -r P_TOKEN P_HUB P_GHCR P_STOWAGE P_ADMIN < <("$PY" - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
TOKEN="127.0.0.1:$P_TOKEN"
HUB="127.0.0.1:$P_HUB"
GHCR="127.0.0.1:$P_GHCR"
STOWAGE="127.0.0.1:$P_STOWAGE"
ADMIN="127.0.0.1:$P_ADMIN"         # stowage's /metrics, /healthz
log "temp dir $TMP; token server $TOKEN, docker.io upstream $HUB, ghcr.io upstream $GHCR, stowage $STOWAGE"

secret() { od -An -N12 -tx1 /dev/urandom | tr -d ' \n'; }
PUSH_PW=$(secret)
MIRROR_PW=$(secret)
GHCR_PUSH_PW=$(secret)
GHCR_MIRROR_PW=$(secret)

# Waits until URL answers with any HTTP status (401 included).
wait_http() { # URL PID SECONDS
    local url=$1 pid=$2 secs=$3 i code
    for ((i = 0; i < secs * 10; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true)
        [[ -n "$code" && "$code" != 000 ]] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ================================================================ upstreams
"$PY" "$HERE/token_server.py" gen-cert "$TMP/token" || die "token_server.py gen-cert failed"
cat >"$TMP/token/users.json" <<EOF
{"pusher": {"password": "$PUSH_PW", "push": true},
 "stowage-mirror": {"password": "$MIRROR_PW"}}
EOF
"$PY" "$HERE/token_server.py" serve --listen "$TOKEN" --dir "$TMP/token" \
    --issuer stowage-e2e-auth --service stowage-e2e-hub --users "$TMP/token/users.json" \
    --private acme/ --log "$TMP/token/requests.log" >"$TMP/token/server.log" 2>&1 </dev/null &
SERVICES+=("token-server=$!")
wait_http "http://$TOKEN/token" "$!" 15 || die "token server did not start on $TOKEN"

htpasswd -Bbc "$TMP/ghcr/htpasswd" pusher "$GHCR_PUSH_PW" 2>/dev/null || die "htpasswd failed"
htpasswd -Bb "$TMP/ghcr/htpasswd" stowage-mirror "$GHCR_MIRROR_PW" 2>/dev/null || die "htpasswd failed"

registry_config() { # DIR ADDR AUTH-YAML
    cat >"$1/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $1/data
  delete:
    enabled: true
http:
  addr: $2
  secret: stowage-e2e-not-a-secret
$3
EOF
}
registry_config "$TMP/hub" "$HUB" "auth:
  token:
    realm: http://$TOKEN/token
    service: stowage-e2e-hub
    issuer: stowage-e2e-auth
    rootcertbundle: $TMP/token/cert.pem"
registry_config "$TMP/ghcr" "$GHCR" "auth:
  htpasswd:
    realm: stowage-e2e-ghcr
    path: $TMP/ghcr/htpasswd"

# distribution writes its access log to stdout, its own log to stderr.
for r in hub ghcr; do
    docker-registry serve "$TMP/$r/config.yml" >"$TMP/$r/access.log" 2>"$TMP/$r/registry.log" </dev/null &
    SERVICES+=("registry-$r=$!")
    addr=$HUB
    [[ $r == ghcr ]] && addr=$GHCR
    wait_http "http://$addr/v2/" "$!" 15 || die "docker-registry ($r) did not answer on http://$addr/v2/"
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$HUB/v2/")
chal=$(curl -s -D - -o /dev/null "http://$HUB/v2/" | grep -i '^www-authenticate:' | tr -d '\r' || true)
if [[ $code == 401 && $chal == *"Bearer realm=\"http://$TOKEN/token\""* ]]; then
    pass "docker.io upstream (distribution, auth: token) challenges with: ${chal#*: }"
else
    die "docker.io upstream /v2/ answered $code with '$chal' (want 401 and a Bearer challenge)"
fi

# ================================================================ containerd + dockerd
cat >"$TMP/containerd.toml" <<EOF
version = 2
root = "$TMP/containerd/root"
state = "$TMP/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$TMP/containerd/containerd.sock"
EOF
CTR_SOCK="$TMP/containerd/containerd.sock"
containerd --config "$TMP/containerd.toml" >"$TMP/containerd.log" 2>&1 </dev/null &
SERVICES+=("containerd=$!")
CONTAINERD_PID=$!
for ((i = 0; i < 150; i++)); do
    ctr -a "$CTR_SOCK" version >/dev/null 2>&1 && break
    kill -0 "$CONTAINERD_PID" 2>/dev/null || break
    sleep 0.1
done
ctr -a "$CTR_SOCK" version >/dev/null 2>&1 || die "containerd did not start (socket $CTR_SOCK)"
CTR=(ctr -a "$CTR_SOCK" -n stowage-e2e)

# The daemon.json keys the test needs on this machine; the registry-mirrors
# key comes from config/docker/daemon.json later.
BASE_DAEMON='{"storage-driver": "vfs", "iptables": false, "ip-masq": false, "bridge": "none",
  "deprecated-key-path": "'"$TMP/docker-key.json"'"}'
echo "$BASE_DAEMON" >"$TMP/daemon.json"
DOCKER_SOCK="$TMP/docker.sock"
dockerd --config-file "$TMP/daemon.json" --data-root "$TMP/docker" --exec-root "$TMP/docker-exec" \
    --pidfile "$TMP/docker.pid" -H "unix://$DOCKER_SOCK" --containerd "$CTR_SOCK" \
    >"$TMP/dockerd.log" 2>&1 </dev/null &
SERVICES+=("dockerd=$!")
DOCKERD_PID=$!
export DOCKER_HOST="unix://$DOCKER_SOCK"
for ((i = 0; i < 300; i++)); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.1
done
if ! "$DOCKER" version >/dev/null 2>&1; then
    die "dockerd did not start (daemon.json: $BASE_DAEMON); see its log"
fi
pass "containerd $(containerd --version | awk '{print $3}') and dockerd $("$DOCKER" version --format '{{.Server.Version}}') started"

# ================================================================ seed images
# Upstream manifest digest and blob lists, by "<upstream>/<repo>:<tag>".
declare -A MANIFEST BLOBS CONFIG_OF
skopeo_up() { skopeo --insecure-policy "$@"; }

# Raw manifest digest at a docker:// reference, or "error: ...".
raw_digest() { # REF [skopeo inspect options...]
    local ref=$1
    shift
    if skopeo_up inspect --raw --tls-verify=false "$@" "$ref" >"$TMP/raw" 2>"$TMP/raw.err"; then
        printf 'sha256:%s\n' "$(sha256sum <"$TMP/raw" | cut -d' ' -f1)"
    else
        printf 'error: %s\n' "$(tr '\n' ' ' <"$TMP/raw.err" | cut -c1-300)"
    fi
}

seed_layout() { # UPSTREAM(hub|ghcr) REPO TAG BIG_BYTES [make_oci_layout options]
    local up=$1 repo=$2 tag=$3 big=$4 addr creds layout key d
    shift 4
    addr=$HUB creds="pusher:$PUSH_PW"
    [[ $up == ghcr ]] && addr=$GHCR creds="pusher:$GHCR_PUSH_PW"
    key="$up/$repo:$tag"
    layout="$TMP/layouts/${up}_${repo//\//_}"
    python3 "$HERE/make_oci_layout.py" "$layout" "$tag" "$big" "$@" >"$layout.json" ||
        die "make_oci_layout.py failed for $key"
    run_logged 120 "$TMP/push.log" skopeo --insecure-policy copy --all --quiet --dest-tls-verify=false --dest-creds "$creds" \
        "oci:$layout:$tag" "docker://$addr/$repo:$tag" || die "pushing $key with skopeo"
    d=$(raw_digest "docker://$addr/$repo:$tag" --creds "$creds")
    [[ $d == sha256:* ]] || die "skopeo inspect of $key on the upstream: $d"
    [[ $d == "$(jq -r .manifest "$layout.json")" ]] || log "note: upstream rewrote $key: $d"
    MANIFEST[$key]=$d
    BLOBS[$key]=$(jq -r '.blobs[]' "$layout.json" | tr '\n' ' ')
    for p in $(jq -r '.platforms | keys[]' "$layout.json"); do
        MANIFEST[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p].manifest' "$layout.json")
        BLOBS[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p] | [.config] + .layers | .[]' "$layout.json" | tr '\n' ' ')
        CONFIG_OF[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p].config' "$layout.json")
    done
    log "seeded $key = $d"
}

# busybox: a rootfs from busybox-static, docker import, docker push.
ROOTFS="$TMP/busybox-rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc/e2e" "$ROOTFS/tmp"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
for applet in sh echo cat ls uname true; do ln -s busybox "$ROOTFS/bin/$applet"; done
BUSYBOX_NONCE=$(secret)
echo "hello from busybox via stowage $BUSYBOX_NONCE" >"$ROOTFS/etc/e2e/motd"
tar -C "$ROOTFS" -cf "$TMP/busybox-rootfs.tar" . || die "tar of the busybox rootfs failed"
run_logged 60 "$TMP/import.log" "$DOCKER" import -c 'CMD ["/bin/sh"]' "$TMP/busybox-rootfs.tar" "$HUB/library/busybox:latest" ||
    die "docker import of the busybox rootfs failed"
echo "$PUSH_PW" | run_logged 60 "$TMP/login.log" "$DOCKER" login -u pusher --password-stdin "$HUB" ||
    die "docker login to the docker.io upstream (token auth) failed"
run_logged 120 "$TMP/push.log" "$DOCKER" push "$HUB/library/busybox:latest" ||
    die "docker push of busybox to the docker.io upstream failed"
d=$(raw_digest "docker://$HUB/library/busybox:latest" --creds "pusher:$PUSH_PW")
[[ $d == sha256:* ]] || die "skopeo inspect of the pushed busybox: $d"
MANIFEST[hub/library/busybox:latest]=$d
skopeo_up inspect --raw --tls-verify=false --creds "pusher:$PUSH_PW" "docker://$HUB/library/busybox:latest" >"$TMP/busybox-manifest.json"
BLOBS[hub/library/busybox:latest]=$(jq -r '[.config.digest] + [.layers[].digest] | .[]' "$TMP/busybox-manifest.json" | tr '\n' ' ')
CONFIG_OF[hub/library/busybox:latest]=$(jq -r .config.digest "$TMP/busybox-manifest.json")
"$DOCKER" rmi "$HUB/library/busybox:latest" >/dev/null || die "docker rmi of the seeded busybox failed"
"$DOCKER" logout "$HUB" >/dev/null 2>&1 || true
log "seeded hub/library/busybox:latest = $d (docker import + docker push)"

# name                                       big layer  options
seed_layout hub library/layers v1 1048576 --layers 5
seed_layout hub library/multiarch v1 262144 --layers 3 --platforms "linux/amd64,linux/arm64"
seed_layout hub shared/app v1 131072
seed_layout hub acme/private v1 262144 --layers 3
seed_layout ghcr shared/app v1 131072
seed_layout ghcr team/tool v1 262144 --platforms "linux/amd64,linux/arm64"
seed_layout hub library/together v1 8388608 --layers 3
seed_layout ghcr team/direct v1 65536
# The same image under another name on the other registry: same blobs.
run_logged 120 "$TMP/push.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false --dest-tls-verify=false \
    --src-creds "pusher:$PUSH_PW" --dest-creds "pusher:$GHCR_PUSH_PW" \
    "docker://$HUB/library/layers:v1" "docker://$GHCR/team/layers:v1" || die "copying library/layers:v1 to ghcr.io team/layers:v1"
MANIFEST[ghcr/team/layers:v1]=$(raw_digest "docker://$GHCR/team/layers:v1" --creds "pusher:$GHCR_PUSH_PW")
[[ ${MANIFEST[ghcr/team/layers:v1]} == "${MANIFEST[hub/library/layers:v1]}" ]] ||
    die "ghcr.io team/layers:v1 is ${MANIFEST[ghcr/team/layers:v1]}, not docker.io library/layers:v1's ${MANIFEST[hub/library/layers:v1]}"
BLOBS[ghcr/team/layers:v1]=${BLOBS[hub/library/layers:v1]}
log "seeded ghcr/team/layers:v1 = ${MANIFEST[ghcr/team/layers:v1]} (a copy of docker.io library/layers:v1)"
if [[ -n "$("$DOCKER" images -q)" ]]; then
    die "dockerd still has images after seeding: $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
fi
pass "upstreams seeded: docker.io has library/{busybox,layers,multiarch,together}, shared/app, acme/private (private); ghcr.io has shared/app, team/tool, team/layers, team/direct"

# ---- the token server behaves like Docker Hub's
anon_access=$(curl -s "http://$TOKEN/token?service=stowage-e2e-hub&scope=repository:library/layers:pull" |
    jq -r '.token | split(".")[1] | gsub("-";"+") | gsub("_";"/") | . + ("=" * ((4 - length % 4) % 4)) | @base64d | fromjson | .access | tostring' 2>/dev/null || true)
if [[ $anon_access == *'"pull"'* ]]; then
    pass "token server: anonymous token for a public repository grants pull ($anon_access)"
else
    fail "token server: anonymous token for library/layers grants '$anon_access'"
fi
if out=$(skopeo_up inspect --raw --tls-verify=false --no-creds "docker://$HUB/acme/private:v1" 2>&1); then
    fail "anonymous pull of docker.io upstream acme/private:v1 succeeded; it must need credentials"
else
    pass "anonymous pull of the private acme/private:v1 from the docker.io upstream is refused ($(tr '\n' ' ' <<<"$out" | grep -oE 'unauthorized[^"]*|denied[^"]*' | head -n1 | cut -c1-80))"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' -u "stowage-mirror:wrong" "http://$TOKEN/token?service=stowage-e2e-hub&scope=repository:acme/private:pull")
if [[ $code == 401 ]]; then
    pass "token server refuses wrong credentials with 401"
else
    fail "token server answered $code to wrong credentials (want 401)"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GHCR/v2/team/tool/manifests/v1")
if [[ $code == 401 ]]; then
    pass "ghcr.io upstream (htpasswd) refuses anonymous pulls (401)"
else
    fail "ghcr.io upstream answered $code to an anonymous manifest GET (want 401)"
fi

# ================================================================ stowage
if [[ -z "${STOWAGE_BIN:-}" ]]; then
    STOWAGE_BIN="$ROOT/target/debug/stowage"
    log "building stowage (cargo build --bin stowage)"
    (cd "$ROOT" && cargo build --quiet --bin stowage) || die "cargo build --bin stowage failed"
fi
[[ -x "$STOWAGE_BIN" ]] || die "stowage binary $STOWAGE_BIN not found"
log "stowage binary: $STOWAGE_BIN"

printf '%s\n' "$MIRROR_PW" >"$TMP/secrets/docker.io-password"
chmod 600 "$TMP/secrets/docker.io-password"
export STOWAGE_E2E_GHCR_PASSWORD="$GHCR_MIRROR_PW"
# config/stowage.toml as shipped (every key and table in it), with the
# addresses pointed here, JSON logs, and credentials added to both upstreams.
"$PY" - "$CONFIG/stowage.toml" "$TMP/stowage.toml" <<EOF || die "could not derive the test config from config/stowage.toml"
import json, sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
hosts = [u["host"] for u in cfg.get("upstream", [])]
if hosts[:2] != ["docker.io", "ghcr.io"]:
    sys.exit(f"config/stowage.toml must list docker.io then ghcr.io, has {hosts}")
cfg.update(listen="$STOWAGE", cache_dir="$TMP/cache", admin_listen="$ADMIN")
cfg["log"] = dict(cfg.get("log", {}), format="json", level="info,stowage=debug")
ups = {u["host"]: u for u in cfg["upstream"]}
ups["docker.io"].update(url="http://$HUB", username="stowage-mirror",
                        password_file="$TMP/secrets/docker.io-password")
ups["ghcr.io"].update(url="http://$GHCR", username="stowage-mirror",
                      password_env="STOWAGE_E2E_GHCR_PASSWORD")

def value(v):  # TOML scalars and arrays; strings as JSON strings
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    sys.exit(f"cannot write {v!r}")

def table(d, name, out, header):
    if header:
        out += ["", header]
    for k, v in d.items():
        if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
            out.append(f"{k} = {value(v)}")
    for k, v in d.items():
        sub = f"{name}.{k}" if name else k
        if isinstance(v, dict):
            table(v, sub, out, f"[{sub}]")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                table(item, sub, out, f"[[{sub}]]")

out = []
table(cfg, "", out, None)
open(sys.argv[2], "w").write("\n".join(out) + "\n")
EOF
if out=$("$STOWAGE_BIN" check-config "$CONFIG/stowage.toml" 2>&1) && out2=$("$STOWAGE_BIN" check-config "$TMP/stowage.toml" 2>&1); then
    pass "stowage check-config accepts config/stowage.toml and the test's derivative: $out2"
else
    fail "stowage check-config: $out ${out2:-}"
fi
# The README's examples are the files tested here: a fenced block after
# "<!-- example: config/FILE -->" must be FILE without its comments; one
# after "<!-- example: check-config -->" must pass check-config and agree
# with config/stowage.toml on every [[upstream]] key they share.
mkdir -p "$TMP/readme"
if out=$("$PY" - "$ROOT/README.md" "$ROOT" "$TMP/readme" <<'EOF' 2>&1
import os, re, sys, tomllib
readme, root, outdir = sys.argv[1:4]
text = open(readme).read()
blocks = re.findall(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", text, re.S)
def norm(t):
    lines = [l.rstrip() for l in t.splitlines() if not l.strip().startswith("#")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
example = {u["host"]: u for u in tomllib.load(open(f"{root}/config/stowage.toml", "rb"))["upstream"]}
files, checks, bad = 0, 0, []
for target, body in blocks:
    if target == "check-config":
        checks += 1
        path = f"{outdir}/block{checks}.toml"
        open(path, "w").write(body)
        print("CHECK", path)
        for u in tomllib.loads(body).get("upstream", []):
            for k, v in u.items():
                if k in example.get(u["host"], {}) and example[u["host"]][k] != v:
                    bad.append(f"README upstream {u['host']}.{k} = {v!r}, config/stowage.toml has {example[u['host']][k]!r}")
    else:
        files += 1
        if norm(body) != norm(open(f"{root}/{target}").read()):
            bad.append(f"README block for {target} differs from the file")
if files < 4 or checks < 2:
    bad.append(f"expected >= 4 file examples and >= 2 check-config examples, found {files} and {checks}")
for b in bad:
    print("BAD", b)
print("COUNT", files, checks)
EOF
); then
    bad=$(grep '^BAD ' <<<"$out" || true)
    while read -r block; do
        "$STOWAGE_BIN" check-config "$block" >/dev/null 2>"$block.err" || bad+=$'\n'"README block $(basename "$block") fails check-config: $(cat "$block.err")"
    done < <(sed -n 's/^CHECK //p' <<<"$out")
    if [[ -z "$bad" ]]; then
        pass "README examples: $(sed -n 's/^COUNT \([0-9]*\) \([0-9]*\)/\1 match their config\/ files, \2 pass check-config/p' <<<"$out")"
    else
        fail "README examples out of date:$(sed 's/^BAD /\n    /' <<<"$bad")"
    fi
else
    fail "checking the README examples failed: $out"
fi

"$STOWAGE_BIN" --config "$TMP/stowage.toml" >"$TMP/stowage.log" 2>&1 </dev/null &
SERVICES+=("stowage=$!")
STOWAGE_PID=$!
wait_http "http://$STOWAGE/v2/" "$STOWAGE_PID" 30 ||
    die "stowage did not answer on http://$STOWAGE/v2/ (config $TMP/stowage.toml: $(tr '\n' ' ' <"$TMP/stowage.toml" | cut -c1-300))"
pass "stowage is up with two upstreams (docker.io token auth + ghcr.io basic auth)"

# Routing refuses hosts it has no upstream for.
body=$(curl -s "http://$STOWAGE/v2/some/repo/manifests/v1?ns=quay.io" -w ' %{http_code}')
if [[ $body == *NAME_UNKNOWN*quay.io*' 404' ]]; then
    pass "?ns=quay.io (no such upstream) gets 404 NAME_UNKNOWN naming the host"
else
    fail "?ns=quay.io answered: $body (want 404 NAME_UNKNOWN naming quay.io)"
fi

# /v2/docker.io/... is the default upstream by path prefix (a
# registries.conf mirror location of mirror.example:5000/docker.io).
hdr=$(curl -s -I "http://$STOWAGE/v2/docker.io/library/busybox/manifests/latest" -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' |
    tr -d '\r' | grep -i '^docker-content-digest:' | awk '{print $2}')
if [[ $hdr == "${MANIFEST[hub/library/busybox:latest]}" ]]; then
    pass "HEAD /v2/docker.io/library/busybox/manifests/latest (path prefix docker.io) gives the upstream digest"
else
    fail "HEAD /v2/docker.io/library/busybox/manifests/latest gave Docker-Content-Digest '$hdr', want ${MANIFEST[hub/library/busybox:latest]}"
fi

# ================================================================ helpers for the checks
# Upstream access logs, one line per finished request, e.g.
#   127.0.0.1 - - [27/Nov/2026:10:14:57 +0000] "GET /v2/library/x/blobs/sha256:00..00 HTTP/1.1" 200 157 "" "stowage/0.1.0"
acc() { [[ $1 == ghcr ]] && echo "$TMP/ghcr/access.log" || echo "$TMP/hub/access.log"; }
mark() { wc -l <"$(acc "$1")"; }
since() { tail -n +"$(($2 + 1))" "$(acc "$1")"; } # UPSTREAM MARK
# Blob GETs since MARK, optionally of one repository and digest.
blob_gets() { # UPSTREAM MARK [REPO] [DIGEST]
    local repo='[^ ]+' digest='sha256:[0-9a-f]{64}'
    [[ $# -ge 3 ]] && repo=$3
    [[ $# -ge 4 ]] && digest=$4
    since "$1" "$2" | grep -cE "\"GET /v2/${repo}/blobs/${digest} HTTP/" || true
}
manifest_reqs() { # UPSTREAM MARK [REPO]
    local repo='[^ ]+'
    [[ $# -ge 3 ]] && repo=$3
    since "$1" "$2" | grep -cE "\"(GET|HEAD) /v2/${repo}/manifests/" || true
}
# Wait until the access logs stop growing (a line is written when a response
# has been sent; stowage may still be finishing a fill).
settle() {
    local prev cur i
    prev="$(mark hub) $(mark ghcr)"
    for ((i = 0; i < 20; i++)); do
        sleep 0.5
        cur="$(mark hub) $(mark ghcr)"
        [[ "$cur" == "$prev" ]] && return 0
        prev=$cur
    done
}
# Every upstream request since MARK came from stowage, none from a client
# that went around the mirror.
check_only_stowage() { # WHAT UPSTREAM MARK
    local others
    others=$(since "$2" "$3" | grep -vE '"stowage/[^"]*"$' || true)
    if [[ -z "$others" ]]; then
        pass "$1: every request the $2 upstream saw came from stowage"
    else
        fail "$1: the $2 upstream saw requests not from stowage:"
        sed 's/^/    /' <<<"$others" | head -n 10
    fi
}
# Each of BLOBS was fetched from the upstream exactly once since MARK.
check_fetched_once() { # WHAT UPSTREAM MARK REPO BLOBS...
    local what=$1 up=$2 m=$3 repo=$4 d n bad=""
    shift 4
    for d in "$@"; do
        n=$(blob_gets "$up" "$m" "$repo" "$d")
        [[ $n -eq 1 ]] || bad+=" ${d:7:12}…=$n"
    done
    if [[ -z "$bad" ]]; then
        pass "$what: each of its $# blobs was fetched from the $up upstream exactly once"
    else
        fail "$what: upstream GETs per blob should be 1:$bad"
    fi
}
# stowage request log lines (JSON) since a byte offset.
stowage_paths() { # OFFSET
    tail -c +"$(($1 + 1))" "$TMP/stowage.log" |
        jq -Rr 'fromjson? | (.fields // .) | select(.message == "request") | "\(.method) \(.path) \(.status) \(.cache)"'
}
stowage_mark() { stat -c %s "$TMP/stowage.log"; }

# ================================================================ dockerd
log "dockerd checks"
# daemon.json: the shipped example's registry-mirrors, pointed at this
# stowage, on top of the keys this machine needs; applied with SIGHUP.
jq -s '.[0] * .[1]' <(echo "$BASE_DAEMON") <(sed "s#mirror.example:5000#$STOWAGE#g" "$CONFIG/docker/daemon.json") \
    >"$TMP/daemon.json.new" || die "cannot build daemon.json from config/docker/daemon.json"
mv "$TMP/daemon.json.new" "$TMP/daemon.json"
kill -HUP "$DOCKERD_PID"
mirrors=""
for ((i = 0; i < 50; i++)); do
    mirrors=$("$DOCKER" info --format '{{json .RegistryConfig.Mirrors}}' 2>/dev/null || true)
    [[ $mirrors == *"http://$STOWAGE/"* ]] && break
    sleep 0.2
done
if [[ $mirrors == *"http://$STOWAGE/"* ]]; then
    pass "dockerd: registry-mirrors from config/docker/daemon.json applied on SIGHUP ($mirrors)"
else
    die "dockerd did not pick up registry-mirrors on SIGHUP (docker info shows '$mirrors')"
fi

HOST_P="linux/$ARCH"
OTHER_P="linux/$OTHER_ARCH"
# docker name | upstream key | blobs a pull of the host platform fetches
DOCKER_IMAGES=(
    "busybox:latest hub/library/busybox:latest library/busybox"
    "layers:v1 hub/library/layers:v1 library/layers"
    "multiarch:v1 hub/library/multiarch:v1 library/multiarch"
)
docker_expected_blobs() { # KEY
    if [[ -n "${BLOBS[$1@$HOST_P]:-}" && $1 == *multiarch* ]]; then echo "${BLOBS[$1@$HOST_P]}"; else echo "${BLOBS[$1]}"; fi
}
docker_expected_id() { # KEY
    if [[ $1 == *multiarch* ]]; then echo "${CONFIG_OF[$1@$HOST_P]}"; else echo "${CONFIG_OF[$1]:-${CONFIG_OF[$1@linux/amd64]}}"; fi
}
# Image checks after a pull: RepoDigests holds the upstream manifest digest,
# the image ID is the config digest (of the host platform's image).
check_docker_image() { # WHAT NAME KEY
    local what=$1 name=$2 key=$3 digests id want_id
    digests=$("$DOCKER" image inspect --format '{{json .RepoDigests}}' "$name" 2>&1 || true)
    if jq -e --arg d "${MANIFEST[$key]}" 'any(.[]; endswith("@" + $d))' >/dev/null 2>&1 <<<"$digests"; then
        pass "$what: RepoDigests has the upstream manifest digest ${MANIFEST[$key]}"
    else
        fail "$what: RepoDigests is $digests, upstream manifest is ${MANIFEST[$key]}"
    fi
    id=$("$DOCKER" image inspect --format '{{.Id}}' "$name" 2>&1 || true)
    want_id=$(docker_expected_id "$key")
    if [[ $id == "$want_id" ]]; then
        pass "$what: image ID equals the upstream config digest ($want_id)"
    else
        fail "$what: image ID is $id, upstream config digest is $want_id"
    fi
}
docker_pull() { # WHAT NAME
    if run_logged 180 "$TMP/docker-pull.log" "$DOCKER" pull "$2"; then
        pass "$1: docker pull $2 through stowage succeeded"
        return 0
    fi
    fail "$1: docker pull $2 failed"
    return 1
}
BUSYBOX_WANT="hello from busybox via stowage $BUSYBOX_NONCE
42"
docker_run_busybox() { # WHAT
    local out
    # shellcheck disable=SC2016 # $((...)) is for the container's shell
    if out=$(timeout 60 "$DOCKER" run --rm --network none busybox sh -c 'cat /etc/e2e/motd; echo $((6 * 7))' 2>&1) &&
        [[ $out == "$BUSYBOX_WANT" ]]; then
        pass "$1: docker run --network none busybox prints the seeded motd and 42"
    else
        fail "$1: docker run busybox printed: $(tr '\n' '|' <<<"$out" | cut -c1-300) (want $(tr '\n' '|' <<<"$BUSYBOX_WANT"))"
    fi
}

M_HUB=$(mark hub)
M_GHCR=$(mark ghcr)
S0=$(stowage_mark)
for spec in "${DOCKER_IMAGES[@]}"; do
    read -r name key repo <<<"$spec"
    what="dockerd first pull of $name"
    docker_pull "$what" "$name" || continue
    check_docker_image "$what" "$name" "$key"
done
docker_run_busybox "dockerd"
settle
for spec in "${DOCKER_IMAGES[@]}"; do
    read -r name key repo <<<"$spec"
    # shellcheck disable=SC2046
    check_fetched_once "dockerd first pull of $name" hub "$M_HUB" "$repo" $(docker_expected_blobs "$key")
done
n=$(blob_gets hub "$M_HUB" library/multiarch)
want=$(wc -w <<<"${BLOBS[hub/library/multiarch:v1@$HOST_P]}")
if [[ $n -eq $want ]]; then
    pass "dockerd pull of the multi-arch index fetched only the $HOST_P image's $want blobs, none of $OTHER_P's"
else
    fail "dockerd pull of multiarch:v1 caused $n upstream blob GETs (want $want, the $HOST_P image's)"
fi
check_only_stowage "dockerd first pulls" hub "$M_HUB"
if stowage_paths "$S0" | grep -q ' /v2/library/busybox/manifests/latest 200 '; then
    pass "dockerd's requests reached stowage as /v2/library/busybox/... (registry-mirrors)"
else
    fail "stowage logged no GET/HEAD /v2/library/busybox/manifests/latest from dockerd"
fi

# Other registries than Docker Hub: the mirror's address and a path prefix
# in the image name (dockerd treats loopback registries as plain HTTP).
what="docker pull of $STOWAGE/ghcr.io/team/direct:v1 (path prefix)"
if docker_pull "$what" "$STOWAGE/ghcr.io/team/direct:v1"; then
    check_docker_image "$what" "$STOWAGE/ghcr.io/team/direct:v1" ghcr/team/direct:v1
    settle
    # shellcheck disable=SC2086
    check_fetched_once "$what" ghcr "$M_GHCR" team/direct ${BLOBS[ghcr/team/direct:v1]}
    check_only_stowage "$what" ghcr "$M_GHCR"
fi

# docker rmi, then pull again: everything from stowage's cache.
if run_logged 60 "$TMP/rmi.log" "$DOCKER" rmi busybox:latest layers:v1 multiarch:v1 "$STOWAGE/ghcr.io/team/direct:v1"; then
    left=$("$DOCKER" images -q)
    if [[ -z "$left" ]]; then
        pass "docker rmi removed all the images (no local layers left)"
    else
        fail "images left after docker rmi: $left"
    fi
else
    fail "docker rmi of the pulled images failed"
fi
settle
M_HUB=$(mark hub)
for spec in "${DOCKER_IMAGES[@]}"; do
    read -r name key repo <<<"$spec"
    what="dockerd second pull of $name"
    docker_pull "$what" "$name" || continue
    check_docker_image "$what" "$name" "$key"
done
docker_run_busybox "dockerd after re-pull"
what="dockerd pull by digest"
if docker_pull "$what" "busybox@${MANIFEST[hub/library/busybox:latest]}"; then
    id=$("$DOCKER" image inspect --format '{{.Id}}' "busybox@${MANIFEST[hub/library/busybox:latest]}" 2>&1 || true)
    if [[ $id == "${CONFIG_OF[hub/library/busybox:latest]}" ]]; then
        pass "$what: busybox@${MANIFEST[hub/library/busybox:latest]} is the same image"
    else
        fail "$what: image ID $id, want ${CONFIG_OF[hub/library/busybox:latest]}"
    fi
fi
settle
n=$(blob_gets hub "$M_HUB")
nm=$(manifest_reqs hub "$M_HUB")
if [[ $n -eq 0 ]]; then
    pass "dockerd second pulls made no upstream blob requests ($nm manifest requests, tags within tag_ttl)"
else
    fail "dockerd second pulls made $n upstream blob requests (want 0):"
    since hub "$M_HUB" | grep -E '/blobs/' | sed 's/^/    /' | head -n 10
fi

# ================================================================ containerd
log "containerd checks"
HOSTS_DIR="$TMP/certs.d"
for h in docker.io ghcr.io; do
    mkdir -p "$HOSTS_DIR/$h"
    sed "s#mirror.example:5000#$STOWAGE#g" "$CONFIG/containerd/certs.d/$h/hosts.toml" >"$HOSTS_DIR/$h/hosts.toml"
done
# The Kubernetes node snippet: containerd must accept it and point its CRI
# registry config at the hosts directory.
sed "s#/etc/containerd/certs.d#$HOSTS_DIR#" "$CONFIG/kubernetes/containerd-config.toml" >"$TMP/k8s-containerd.toml"
if containerd --config "$TMP/k8s-containerd.toml" config dump 2>"$TMP/k8s-dump.err" >"$TMP/k8s-dump.toml" &&
    grep -qF "config_path = \"$HOSTS_DIR\"" "$TMP/k8s-dump.toml"; then
    pass "containerd accepts config/kubernetes/containerd-config.toml (CRI registry config_path = the hosts dir)"
else
    fail "containerd config dump of config/kubernetes/containerd-config.toml: $(head -c 300 "$TMP/k8s-dump.err") (config_path not set)"
fi

ctr_digest() { "${CTR[@]}" images ls 2>/dev/null | awk -v r="$1" '$1 == r { print $3 }'; }
ctr_pull() { # WHAT REF [ctr pull options]
    local what=$1 ref=$2
    shift 2
    if run_logged 180 "$TMP/ctr-pull.log" "${CTR[@]}" images pull --hosts-dir "$HOSTS_DIR" "$@" "$ref"; then
        pass "$what: ctr images pull --hosts-dir $ref through stowage succeeded"
        return 0
    fi
    fail "$what: ctr images pull $ref failed"
    return 1
}
check_ctr_digest() { # WHAT REF KEY
    local got
    got=$(ctr_digest "$2")
    if [[ $got == "${MANIFEST[$3]}" ]]; then
        pass "$1: containerd's image digest equals the upstream's ($got)"
    else
        fail "$1: containerd has $2 at '$got', the upstream has ${MANIFEST[$3]}"
    fi
}

settle
M_HUB=$(mark hub)
M_GHCR=$(mark ghcr)
S0=$(stowage_mark)
# The same repository name on both hosts, different content: only ?ns=
# routing gives each its own.
CTR_IMAGES=(
    "docker.io/shared/app:v1 hub/shared/app:v1"
    "ghcr.io/shared/app:v1 ghcr/shared/app:v1"
)
for spec in "${CTR_IMAGES[@]}"; do
    read -r ref key <<<"$spec"
    ctr_pull "containerd first pull of $ref" "$ref" || continue
    check_ctr_digest "containerd first pull of $ref" "$ref" "$key"
done
if [[ ${MANIFEST[hub/shared/app:v1]} != "${MANIFEST[ghcr/shared/app:v1]}" ]]; then
    pass "docker.io/shared/app:v1 and ghcr.io/shared/app:v1 are different images upstream, so the digests above prove ns routing"
else
    fail "the two shared/app:v1 images have the same digest; the routing check proves nothing"
fi
# Blobs are shared across upstreams by digest: ghcr.io/team/layers:v1 has
# the blobs of docker.io/library/layers:v1, which dockerd's pull cached.
ctr_pull "containerd pull of ghcr.io/team/layers:v1" ghcr.io/team/layers:v1 &&
    check_ctr_digest "containerd pull of ghcr.io/team/layers:v1" ghcr.io/team/layers:v1 ghcr/team/layers:v1
ctr_pull "containerd pull of the multi-arch index" docker.io/library/multiarch:v1 --all-platforms &&
    check_ctr_digest "containerd pull of docker.io/library/multiarch:v1" docker.io/library/multiarch:v1 hub/library/multiarch:v1
settle
# shellcheck disable=SC2086
check_fetched_once "containerd pull of docker.io/shared/app:v1" hub "$M_HUB" shared/app ${BLOBS[hub/shared/app:v1]}
# shellcheck disable=SC2086
check_fetched_once "containerd pull of ghcr.io/shared/app:v1" ghcr "$M_GHCR" shared/app ${BLOBS[ghcr/shared/app:v1]}
# shellcheck disable=SC2086
check_fetched_once "containerd --all-platforms pull of multiarch:v1 ($OTHER_P image)" hub "$M_HUB" library/multiarch \
    ${BLOBS[hub/library/multiarch:v1@$OTHER_P]}
n=0
for d in ${BLOBS[hub/library/multiarch:v1@$HOST_P]}; do
    n=$((n + $(blob_gets hub "$M_HUB" library/multiarch "$d")))
done
if [[ $n -eq 0 ]]; then
    pass "containerd got the $HOST_P image's blobs of multiarch:v1 from stowage's cache (dockerd had pulled them): 0 upstream GETs"
else
    fail "containerd's pull of multiarch:v1 refetched $n $HOST_P blobs upstream that dockerd's pull had cached"
fi
n=$(blob_gets ghcr "$M_GHCR" team/layers)
nm=$(manifest_reqs ghcr "$M_GHCR" team/layers)
if [[ $n -eq 0 && $nm -ge 1 ]]; then
    pass "ghcr.io/team/layers:v1: manifest from the ghcr.io upstream, all blobs from the cache filled via docker.io (shared by digest)"
else
    fail "ghcr.io/team/layers:v1: $nm manifest and $n blob requests at the ghcr.io upstream (want >= 1 and 0)"
fi
check_only_stowage "containerd pulls" hub "$M_HUB"
check_only_stowage "containerd pulls" ghcr "$M_GHCR"
if stowage_paths "$S0" | grep -q '^GET /v2/shared/app/manifests/'; then
    pass "containerd asked stowage for /v2/shared/app/... (host in ?ns=, not in the path)"
else
    fail "stowage logged no /v2/shared/app/manifests/ request from containerd"
fi

# Remove the images (and, with --sync, their content), pull again.
if run_logged 60 "$TMP/ctr-rm.log" "${CTR[@]}" images rm --sync docker.io/shared/app:v1 ghcr.io/shared/app:v1 ghcr.io/team/layers:v1 docker.io/library/multiarch:v1; then
    left=$("${CTR[@]}" content ls -q 2>/dev/null | wc -l)
    if [[ $left -eq 0 ]]; then
        pass "ctr images rm --sync removed the images and all their content"
    else
        fail "$left blobs left in containerd's content store after ctr images rm --sync"
    fi
else
    fail "ctr images rm failed"
fi
settle
M_HUB=$(mark hub)
M_GHCR=$(mark ghcr)
for spec in "${CTR_IMAGES[@]}"; do
    read -r ref key <<<"$spec"
    ctr_pull "containerd second pull of $ref" "$ref" || continue
    check_ctr_digest "containerd second pull of $ref" "$ref" "$key"
done
settle
n=$(($(blob_gets hub "$M_HUB") + $(blob_gets ghcr "$M_GHCR")))
if [[ $n -eq 0 ]]; then
    pass "containerd second pulls made no upstream blob requests"
else
    fail "containerd second pulls made $n upstream blob requests (want 0)"
fi

# ================================================================ skopeo
log "skopeo checks"
# skopeo 1.9 takes the file with --registries-conf (podman reads
# $CONTAINERS_REGISTRIES_CONF); /etc/containers is left alone.
sed "s#mirror.example:5000#$STOWAGE#g" "$CONFIG/containers/registries.conf" >"$TMP/registries.conf"
SKOPEO_M=(skopeo --registries-conf "$TMP/registries.conf" --insecure-policy)
echo '{}' >"$TMP/empty-auth.json"
# Checks a pulled OCI layout: tagged digest, every blob hashes to its name,
# the expected blobs are all there.
check_layout() { # WHAT OUT TAG KEY BLOBS...
    local what=$1 out=$2 tag=$3 key=$4 idx f sum bad="" absent=""
    shift 4
    idx=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
        "$out/index.json" 2>/dev/null || true)
    if [[ $idx == "${MANIFEST[$key]}" ]]; then
        pass "$what: copied manifest digest equals the upstream's ($idx)"
    else
        fail "$what: copied manifest digest is '$idx', the upstream's is ${MANIFEST[$key]}"
    fi
    for f in "$out"/blobs/sha256/*; do
        [[ -f $f ]] || continue
        sum=$(sha256sum "$f" | cut -d' ' -f1)
        [[ $sum == "$(basename "$f")" ]] || bad+=" $(basename "$f")"
    done
    for d in "$@"; do
        [[ -f "$out/blobs/sha256/${d#sha256:}" ]] || absent+=" $d"
    done
    if [[ -z "$bad$absent" ]]; then
        pass "$what: all $# image blobs present, every file hashes to its name"
    else
        fail "$what: blobs not hashing to their names:${bad:- none}; missing:${absent:- none}"
    fi
}

settle
M_HUB=$(mark hub)
M_GHCR=$(mark ghcr)
S0=$(stowage_mark)
T0=$(wc -l <"$TMP/token/requests.log")

what="skopeo copy of private docker.io/acme/private:v1 (credentials in stowage only)"
out="$TMP/out/private"
if run_logged 180 "$TMP/skopeo.log" "${SKOPEO_M[@]}" copy --quiet --authfile "$TMP/empty-auth.json" \
    docker://docker.io/acme/private:v1 "oci:$out:v1"; then
    pass "$what: succeeded"
    # shellcheck disable=SC2086
    check_layout "$what" "$out" v1 hub/acme/private:v1 ${BLOBS[hub/acme/private:v1]}
else
    fail "$what: failed"
fi
if tail -n +"$((T0 + 1))" "$TMP/token/requests.log" |
    jq -e -s 'any(.[]; .account == "stowage-mirror" and (.user_agent | startswith("stowage/"))
                      and any(.granted[]; .name == "acme/private" and (.actions | index("pull"))))' >/dev/null; then
    pass "$what: stowage got a pull token for acme/private with its configured credentials (password_file)"
else
    fail "$what: no token for acme/private was issued to stowage-mirror"
fi

what="skopeo copy --all of ghcr.io/team/tool:v1 (path-prefix mirror)"
out="$TMP/out/tool"
if run_logged 180 "$TMP/skopeo.log" "${SKOPEO_M[@]}" copy --all --quiet --authfile "$TMP/empty-auth.json" \
    docker://ghcr.io/team/tool:v1 "oci:$out:v1"; then
    pass "$what: succeeded"
    # shellcheck disable=SC2086
    check_layout "$what" "$out" v1 ghcr/team/tool:v1 ${BLOBS[ghcr/team/tool:v1]} \
        "${MANIFEST[ghcr/team/tool:v1@linux/amd64]}" "${MANIFEST[ghcr/team/tool:v1@linux/arm64]}"
else
    fail "$what: failed"
fi
if "${SKOPEO_M[@]}" inspect --raw --authfile "$TMP/empty-auth.json" docker://ghcr.io/team/tool:v1 >"$TMP/raw" 2>"$TMP/raw.err"; then
    d="sha256:$(sha256sum <"$TMP/raw" | cut -d' ' -f1)"
else
    d="error: $(tr '\n' ' ' <"$TMP/raw.err" | cut -c1-300)"
fi
if [[ $d == "${MANIFEST[ghcr/team/tool:v1]}" ]]; then
    pass "skopeo inspect --raw ghcr.io/team/tool:v1 via the mirror: upstream's index digest"
else
    fail "skopeo inspect --raw ghcr.io/team/tool:v1 via the mirror gave $d, upstream has ${MANIFEST[ghcr/team/tool:v1]}"
fi
if stowage_paths "$S0" | grep -q '^GET /v2/ghcr.io/team/tool/manifests/v1 200'; then
    pass "$what: skopeo asked stowage for /v2/ghcr.io/team/tool/... (registries.conf location with a path)"
else
    fail "$what: stowage logged no GET /v2/ghcr.io/team/tool/manifests/v1"
fi
# tags/list is passed through, with stowage's credentials, by either route.
for spec in "/v2/ghcr.io/team/tool/tags/list team/tool" "/v2/team/tool/tags/list?ns=ghcr.io team/tool" \
    "/v2/acme/private/tags/list acme/private"; do
    read -r path repo <<<"$spec"
    got=$(curl -s "http://$STOWAGE$path" | jq -c . 2>&1 || true)
    if [[ $got == "{\"name\":\"$repo\",\"tags\":[\"v1\"]}" ]]; then
        pass "GET $path via stowage: $got"
    else
        fail "GET $path via stowage: $got"
    fi
done
settle
# shellcheck disable=SC2086
check_fetched_once "skopeo copy of docker.io/acme/private:v1" hub "$M_HUB" acme/private ${BLOBS[hub/acme/private:v1]}
# shellcheck disable=SC2086
check_fetched_once "skopeo copy --all of ghcr.io/team/tool:v1" ghcr "$M_GHCR" team/tool ${BLOBS[ghcr/team/tool:v1]}
check_only_stowage "skopeo copies" hub "$M_HUB"
check_only_stowage "skopeo copies" ghcr "$M_GHCR"

# ================================================================ podman
log "podman checks"
# The same registries.conf, read by podman from $CONTAINERS_REGISTRIES_CONF;
# storage, runtime state and containers.conf are the test's own.
PODMAN_DIR="$TMP/podman"
mkdir -p "$PODMAN_DIR"
: >"$PODMAN_DIR/containers.conf"
PODMAN=(env CONTAINERS_REGISTRIES_CONF="$TMP/registries.conf" CONTAINERS_CONF="$PODMAN_DIR/containers.conf"
    podman --root "$PODMAN_DIR/root" --runroot "$PODMAN_DIR/run" --storage-driver vfs
    --cgroup-manager cgroupfs --events-backend file --tmpdir "$PODMAN_DIR/tmp"
    --network-config-dir "$PODMAN_DIR/networks")
settle
M_HUB=$(mark hub)
M_GHCR=$(mark ghcr)
S0=$(stowage_mark)
for spec in "docker.io/library/busybox:latest hub/library/busybox:latest" "ghcr.io/shared/app:v1 ghcr/shared/app:v1"; do
    read -r ref key <<<"$spec"
    what="podman pull of $ref"
    if run_logged 180 "$TMP/podman.log" "${PODMAN[@]}" pull --quiet "$ref"; then
        pass "$what: succeeded through stowage"
        got=$("${PODMAN[@]}" image inspect --format '{{.Digest}}' "$ref" 2>&1 || true)
        if [[ $got == "${MANIFEST[$key]}" ]]; then
            pass "$what: podman's image digest equals the upstream's ($got)"
        else
            fail "$what: podman has digest '$got', the upstream has ${MANIFEST[$key]}"
        fi
    else
        fail "$what: failed"
    fi
done
if stowage_paths "$S0" | grep -q '^GET /v2/ghcr.io/shared/app/manifests/v1 200'; then
    pass "podman asked stowage for /v2/ghcr.io/shared/app/... (path-prefix mirror), and got ghcr.io's image, not docker.io's"
else
    fail "stowage logged no GET /v2/ghcr.io/shared/app/manifests/v1 from podman"
fi
# podman raises RLIMIT_NOFILE/NPROC by default, above this machine's hard
# limits; runc then fails with "error setting rlimits". Ask for small ones.
# shellcheck disable=SC2016 # $((...)) is for the container's shell
if out=$(timeout 60 "${PODMAN[@]}" run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 docker.io/library/busybox:latest sh -c 'cat /etc/e2e/motd; echo $((6 * 7))' 2>&1) &&
    [[ $out == "$BUSYBOX_WANT" ]]; then
    pass "podman run --network none busybox prints the seeded motd and 42"
else
    fail "podman run busybox printed: $(tr '\n' '|' <<<"$out" | cut -c1-300)"
fi
settle
n=$(($(blob_gets hub "$M_HUB") + $(blob_gets ghcr "$M_GHCR")))
if [[ $n -eq 0 ]]; then
    pass "podman pulls were served from stowage's cache: no upstream blob requests"
else
    fail "podman pulls of cached images made $n upstream blob requests (want 0)"
fi

# ================================================================ all at once
# dockerd, containerd, skopeo and podman pull the same uncached image at the
# same time: one upstream GET per blob, every client gets the image.
log "concurrent pulls of docker.io/library/together:v1"
settle
M_HUB=$(mark hub)
KEY=hub/library/together:v1
declare -A CPID
"$DOCKER" pull together:v1 >"$TMP/c-docker.log" 2>&1 &
CPID[docker]=$!
"${CTR[@]}" images pull --hosts-dir "$HOSTS_DIR" docker.io/library/together:v1 >"$TMP/c-ctr.log" 2>&1 &
CPID[ctr]=$!
"${SKOPEO_M[@]}" copy --quiet --authfile "$TMP/empty-auth.json" docker://docker.io/library/together:v1 \
    "oci:$TMP/out/together:v1" >"$TMP/c-skopeo.log" 2>&1 &
CPID[skopeo]=$!
"${PODMAN[@]}" pull --quiet docker.io/library/together:v1 >"$TMP/c-podman.log" 2>&1 &
CPID[podman]=$!
for c in docker ctr skopeo podman; do
    if wait "${CPID[$c]}"; then
        pass "concurrent pull: $c succeeded"
    else
        fail "concurrent pull: $c failed: $(tail -n 3 "$TMP/c-$c.log" | tr '\n' ' ' | cut -c1-300)"
    fi
done
digests="docker=$("$DOCKER" image inspect --format '{{.Id}}' together:v1 2>&1 || true)"
digests+=" ctr=$(ctr_digest docker.io/library/together:v1)"
digests+=" skopeo=$(jq -r '.manifests[0].digest' "$TMP/out/together/index.json" 2>&1 || true)"
digests+=" podman=$("${PODMAN[@]}" image inspect --format '{{.Digest}}' docker.io/library/together:v1 2>&1 || true)"
want="docker=${CONFIG_OF[$KEY@linux/amd64]} ctr=${MANIFEST[$KEY]} skopeo=${MANIFEST[$KEY]} podman=${MANIFEST[$KEY]}"
if [[ $digests == "$want" ]]; then
    pass "concurrent pull: every client has the upstream image (manifest ${MANIFEST[$KEY]})"
else
    fail "concurrent pull: clients have [$digests], want [$want]"
fi
settle
# shellcheck disable=SC2086
check_fetched_once "concurrent pull by four clients of together:v1" hub "$M_HUB" library/together ${BLOBS[$KEY]}
check_only_stowage "concurrent pulls" hub "$M_HUB"

# ================================================================ metrics
# stowage's own count of upstream blob fetches matches the upstreams' logs.
if curl -sf --max-time 5 "http://$ADMIN/metrics" >"$TMP/metrics.txt"; then
    for up in hub ghcr; do
        host=docker.io
        [[ $up == ghcr ]] && host=ghcr.io
        logged=$(grep -cE '"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" 200 .*"stowage/[^"]*"$' "$(acc $up)" || true)
        counted=$("$PY" - "$TMP/metrics.txt" "$host" <<'EOF'
import re, sys
total = 0
for line in open(sys.argv[1]):
    m = re.match(r'stowage_upstream_requests_total\{([^}]*)\} (\S+)$', line.strip())
    if not m:
        continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    if labels.get("upstream") == sys.argv[2] and labels.get("kind") == "blob" and labels.get("status") == "200":
        total += float(m.group(2))
print(int(total))
EOF
)
        if [[ $counted == "$logged" && $logged -gt 0 ]]; then
            pass "metrics: stowage_upstream_requests_total{upstream=\"$host\",kind=\"blob\",status=\"200\"} = $counted, the $up upstream logged $logged"
        else
            fail "metrics: stowage counted $counted blob fetches from $host, the $up upstream logged $logged"
        fi
    done
else
    fail "stowage's admin listener http://$ADMIN/metrics did not answer"
fi

# ================================================================ token caching
# stowage caches tokens per scope; a handful of repositories means a handful
# of token requests, not one per request.
tokens=$(jq -s '[.[] | select(.user_agent | startswith("stowage/"))] | length' "$TMP/token/requests.log")
scopes=$(jq -s '[.[] | select(.user_agent | startswith("stowage/")) | .scope[]] | unique | length' "$TMP/token/requests.log")
hub_reqs=$(grep -c '"stowage/' "$TMP/hub/access.log" || true)
if [[ $tokens -ge 1 && $tokens -le $((scopes * 2)) ]]; then
    pass "stowage fetched $tokens tokens for $scopes scopes over $hub_reqs docker.io upstream requests (tokens cached)"
else
    fail "stowage fetched $tokens tokens for $scopes scopes over $hub_reqs upstream requests"
fi

if [[ $FAILED -ne 0 ]]; then
    show_logs
fi
