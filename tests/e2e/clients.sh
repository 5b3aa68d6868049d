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

# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CONFIG="$ROOT/config"

# ================================================================ preflight
e2e_init clients
need_root "it starts dockerd and containerd"
need_tools dockerd containerd ctr runc containerd-shim-runc-v2 skopeo podman docker-registry htpasswd jq curl \
    sha256sum timeout python3 "$DOCKER" "$PY"
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

mkdir -p "$TMP/secrets" "$TMP/cache" "$TMP/out"
unset CONTAINERD_ADDRESS CONTAINERD_NAMESPACE

PUSH_PW=$(random_hex 12)
MIRROR_PW=$(random_hex 12)
GHCR_PUSH_PW=$(random_hex 12)
GHCR_MIRROR_PW=$(random_hex 12)

# ================================================================ upstreams
mkdir -p "$TMP/token" "$TMP/ghcr"
cat >"$TMP/token/users.json" <<EOF
{"pusher": {"password": "$PUSH_PW", "push": true},
 "stowage-mirror": {"password": "$MIRROR_PW"}}
EOF
start_token_server token stowage-e2e-auth stowage-e2e-hub "$TMP/token/users.json" --private acme/
TOKEN=${TOKEN_ADDR[token]}

htpasswd -Bbc "$TMP/ghcr/htpasswd" pusher "$GHCR_PUSH_PW" 2>/dev/null || die "htpasswd failed"
htpasswd -Bb "$TMP/ghcr/htpasswd" stowage-mirror "$GHCR_MIRROR_PW" 2>/dev/null || die "htpasswd failed"

start_registry hub token "http://$TOKEN/token" stowage-e2e-hub stowage-e2e-auth "$TMP/token/cert.pem"
start_registry ghcr htpasswd "$TMP/ghcr/htpasswd" stowage-e2e-ghcr
HUB=${REG_ADDR[hub]}
GHCR=${REG_ADDR[ghcr]}
stowage_config stowage
STOWAGE=${STOWAGE_ADDR[stowage]}
ADMIN=${STOWAGE_ADMIN[stowage]} # stowage's /metrics, /healthz
log "temp dir $TMP; token server $TOKEN, docker.io upstream $HUB, ghcr.io upstream $GHCR, stowage $STOWAGE"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$HUB/v2/")
chal=$(curl -s -D - -o /dev/null "http://$HUB/v2/" | grep -i '^www-authenticate:' | tr -d '\r' || true)
if [[ $code == 401 && $chal == *"Bearer realm=\"http://$TOKEN/token\""* ]]; then
    pass "docker.io upstream (distribution, auth: token) challenges with: ${chal#*: }"
else
    die "docker.io upstream /v2/ answered $code with '$chal' (want 401 and a Bearer challenge)"
fi

# ================================================================ containerd + dockerd
start_containerd
CTR=(ctr -a "$CTR_SOCK" -n stowage-e2e)
# The daemon.json keys the test needs on this machine (DOCKERD_BASE_JSON);
# the registry-mirrors key comes from config/docker/daemon.json later.
start_dockerd "{}"
DOCKERD_PID=${E2E_PID[dockerd]}
pass "containerd $(containerd --version | awk '{print $3}') and dockerd $("$DOCKER" version --format '{{.Server.Version}}') started"

# ================================================================ seed images
# Upstream manifest digest and blob lists (lib.sh's MANIFEST, BLOBS and
# CONFIG_OF), by "<upstream>/<repo>:<tag>".
skopeo_up() { skopeo --insecure-policy "$@"; }
raw_digest() { skopeo_digest "$@"; } # REF [skopeo inspect options...]

seed_layout() { # UPSTREAM(hub|ghcr) REPO TAG BIG_BYTES [make_oci_layout options]
    local up=$1 repo=$2 tag=$3 addr=$HUB creds="pusher:$PUSH_PW"
    shift 3
    [[ $up == ghcr ]] && addr=$GHCR creds="pusher:$GHCR_PUSH_PW"
    seed_image "$up/$repo:$tag" "$addr" "$repo" "$tag" --creds "$creds" "$@"
}

# busybox: a rootfs from busybox-static, docker import, docker push.
ROOTFS="$TMP/busybox-rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc/e2e" "$ROOTFS/tmp"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
for applet in sh echo cat ls uname true; do ln -s busybox "$ROOTFS/bin/$applet"; done
BUSYBOX_NONCE=$(random_hex 12)
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
stowage_bin
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

STOWAGE_CONFIG[stowage]="$TMP/stowage.toml"
STOWAGE_LOG[stowage]="$TMP/stowage.log"
start_stowage stowage ||
    die "$E2E_WHY (config $TMP/stowage.toml: $(tr '\n' ' ' <"$TMP/stowage.toml" | cut -c1-300))"
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
# (lib.sh: reg_mark, reg_since, reg_blob_gets, reg_manifest_reqs,
# check_only_stowage, check_fetched_once; the upstreams are "hub" and "ghcr".)
acc() { reg_log "$1"; }
mark() { reg_mark "$1"; }
since() { reg_since "$@"; }                 # UPSTREAM MARK
blob_gets() { reg_blob_gets "$@"; }         # UPSTREAM MARK [REPO] [DIGEST]
manifest_reqs() { reg_manifest_reqs "$@"; } # UPSTREAM MARK [REPO]
settle() { reg_settle hub ghcr; }
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
jq -s '.[0] * .[1]' <(echo "$DOCKERD_BASE_JSON") <(sed "s#mirror.example:5000#$STOWAGE#g" "$CONFIG/docker/daemon.json") \
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
# check_layout (lib.sh) checks a pulled OCI layout: tagged digest, every
# blob hashes to its name, exactly the expected blobs are there.

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
        counted=$(metric_in "$TMP/metrics.txt" stowage_upstream_requests_total upstream="$host" kind=blob status=200)
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

