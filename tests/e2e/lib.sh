# shellcheck shell=bash
# Shared helpers for the e2e scripts in this directory. Every script starts with
#
#     set -euo pipefail
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#     e2e_init NAME            # temp dir, traps, closing summary line
#
# and then uses what is below. Sections:
#   checks     log, pass, fail, check, check_eq, die, run_logged; the closing
#              "e2e: N passed, M failed" line that .ci/run adds up
#   processes  spawn (own process group), stop_service, wait_http, free_ports;
#              the EXIT trap stops every service (process group and all), kills
#              what still names the temp dir, unmounts under it, removes it
#   registry   start_token_server, start_registry (plain, htpasswd, token) and
#              counting requests in its access log
#   images     seed_image (make_oci_layout.py + skopeo push), skopeo_digest,
#              check_layout
#   stowage    stowage_bin, stowage_config, start_stowage, metric
#   docker     start_containerd, start_dockerd (vfs, no bridge, no iptables)
#   garage     in garage.sh (sourced from here): start_garage, stop_garage,
#              a small S3 client (curl --aws-sigv4)
#
# Conventions: helpers that set up a fixture (registry, dockerd, Garage) die
# when it cannot start, since nothing after them could pass; start_stowage
# returns non-zero with the reason in E2E_WHY so that a test can expect a
# refusal. Per-instance facts live in associative arrays keyed by the name the
# script gave (REG_ADDR[hub], STOWAGE_ADDR[node1], ...).
#
# Environment read:
#   STOWAGE_BIN  stowage binary (default: cargo build --bin stowage, then
#                target/debug/stowage)
#   KEEP_TMP=1   keep the temp dir (logs, configs, caches) for inspection

if [[ -n "${E2E_LIB_LOADED:-}" ]]; then
    return 0
fi
E2E_LIB_LOADED=1

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034 # for the scripts
HERE=$E2E_DIR
ROOT="$(cd "$E2E_DIR/../.." && pwd)"
# Debian's Python (python3-jwt, python3-cryptography, python3-yaml live there),
# not whichever python3 is first on PATH.
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3
DOCKER=/usr/bin/docker # Debian's client, matching its dockerd

PASSED=0
FAILED=0
TMP=""
E2E_NAME=e2e
E2E_WHY=""
E2E_LOGS_SHOWN=0
E2E_SERVICES=()      # service names in start order (stopped in reverse)
E2E_LOGS=()          # "FILE|TITLE|LINES" shown when a check failed
E2E_EXIT_HOOKS=()    # commands run first at exit (e.g. docker rm -f)
declare -A E2E_PID=() E2E_STOP_SECS=()
declare -A REG_ADDR=() REG_DIR=() TOKEN_ADDR=() TOKEN_DIR=()
declare -A STOWAGE_ADDR=() STOWAGE_ADMIN=() STOWAGE_CONFIG=() STOWAGE_LOG=() STOWAGE_SCHEME=()
declare -A MANIFEST=() BLOBS=() CONFIG_OF=() LAYOUT=()

# ================================================================ checks

log() { printf '[%s +%ss] %s\n' "$E2E_NAME" "$SECONDS" "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; }

# check WHAT COMMAND...: pass when COMMAND succeeds, fail otherwise.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# check_eq WHAT GOT WANT [DETAIL]: pass "WHAT: GOT" when GOT is WANT, else
# fail saying both (and DETAIL).
check_eq() {
    if [[ $2 == "$3" ]]; then
        pass "$1: $2"
    else
        fail "$1: got '$2', want '$3'${4:+ ($4)}"
    fi
}

# A setup step failed: no point going on.
die() {
    fail "$*"
    show_logs
    exit 1
}

# need_tools TOOL... : die naming every missing one.
need_tools() {
    local t absent=()
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || absent+=("$t")
    done
    [[ ${#absent[@]} -eq 0 ]] || die "required programs not found: ${absent[*]} (bash .ci/run installs them)"
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root: $* (run via .ci/run, or sudo)"
}

show_log() { # FILE TITLE LINES
    if [[ -s "$1" ]]; then
        printf -- '----- %s (last %s lines of %s) -----\n' "$2" "$3" "$1"
        tail -n "$3" "$1" | cut -c1-400
        printf -- '----- end of %s -----\n' "$2"
    fi
}

# add_log FILE TITLE [LINES]: show FILE's tail if the script fails.
add_log() { E2E_LOGS+=("$1|$2|${3:-30}"); }

show_logs() {
    local entry file title lines
    [[ $E2E_LOGS_SHOWN -eq 0 && -n "$TMP" && -d "$TMP" ]] || return 0
    E2E_LOGS_SHOWN=1
    for entry in "${E2E_LOGS[@]}"; do
        IFS='|' read -r file title lines <<<"$entry"
        show_log "$file" "$title" "$lines"
    done
}

# run_logged SECONDS FILE COMMAND...: runs COMMAND with a time limit, its
# output in FILE; on failure prints the command and the tail of FILE.
run_logged() {
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

# on_exit COMMAND: run COMMAND (with eval) at exit, before services stop;
# hooks run last-registered first.
on_exit() { E2E_EXIT_HOOKS+=("$1"); }

# e2e_init NAME: the temp dir $TMP (mode 755, so services running as other
# users can read configs in it), TMPDIR inside it (skopeo and podman write big
# temporary files there), the traps and the closing summary.
e2e_init() {
    E2E_NAME=$1
    trap e2e_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/stowage-$1.XXXXXX")"
    chmod 755 "$TMP"
    mkdir -p "$TMP/tmp"
    export TMPDIR="$TMP/tmp"
    echo '{}' >"$TMP/empty-auth.json"
}

e2e_cleanup() {
    local rc=$? i name pids pid cmd m
    set +e
    for ((i = ${#E2E_EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
        eval "${E2E_EXIT_HOOKS[$i]}"
    done
    if [[ $rc -ne 0 || $FAILED -ne 0 ]]; then
        show_logs
    fi
    for ((i = ${#E2E_SERVICES[@]} - 1; i >= 0; i--)); do
        stop_service "${E2E_SERVICES[$i]}"
    done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        # What still names the temp dir on its command line (container shims
        # started by our containerd outlive it, for one) is ours: kill it.
        pids=$(grep -lsF -- "$TMP/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vxE "$$|$BASHPID" || true)
        for pid in $pids; do
            cmd=$(tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline) || continue # gone
            [[ $cmd == *"$TMP/"* ]] || continue
            log "killing leftover process $pid: $(cut -c1-160 <<<"$cmd")"
            kill -KILL "$pid" 2>/dev/null
        done
        # Mounts left under $TMP (netns bind mounts, snapshots, volumes),
        # deepest first.
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

# ================================================================ processes

# free_ports N: N distinct free loopback TCP ports, on one line. They are
# held open together while picked, so they differ from each other.
free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
}

# spawn NAME [--stop-secs N] COMMAND...: starts COMMAND in the background in
# its own process group (setsid), stdin from /dev/null, stdout and stderr
# wherever the call is redirected (`spawn reg docker-registry ... >log 2>&1`).
# Its pid is in SPAWNED_PID and E2E_PID[NAME]; at exit the whole group gets
# SIGTERM, then SIGKILL after N seconds (default 5). A NAME may be spawned
# again once stopped (a restart).
spawn() {
    local name=$1 secs=5 s
    shift
    if [[ $1 == --stop-secs ]]; then
        secs=$2
        shift 2
    fi
    if [[ -n "${E2E_PID[$name]:-}" ]] && kill -0 "${E2E_PID[$name]}" 2>/dev/null; then
        die "spawn: $name is already running (pid ${E2E_PID[$name]})"
    fi
    # Not a process group leader (no job control here), so setsid(1) calls
    # setsid(2) and execs without forking: $! is the group's id.
    setsid "$@" </dev/null &
    SPAWNED_PID=$!
    E2E_PID[$name]=$SPAWNED_PID
    E2E_STOP_SECS[$name]=$secs
    for s in "${E2E_SERVICES[@]}"; do
        [[ $s == "$name" ]] && return 0
    done
    E2E_SERVICES+=("$name")
}

# running NAME: the service is alive.
running() { [[ -n "${E2E_PID[$1]:-}" ]] && kill -0 "${E2E_PID[$1]}" 2>/dev/null; }

# stop_service NAME [SIGNAL]: SIGNAL (default TERM) to NAME's process
# group, SIGKILL to the group if it has not exited in its stop time; then
# anything left in the group is killed. `stop_service NAME KILL` is kill -9.
stop_service() {
    local name=$1 sig=${2:-TERM} pid=${E2E_PID[$1]:-} secs=${E2E_STOP_SECS[$1]:-5} i
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -"$sig" -- "-$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < secs * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop in ${secs}s after SIG$sig; killing it"
        fi
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    E2E_PID[$name]=""
}

# wait_http URL PID SECONDS [CURL_ARGS...]: waits until URL answers with any
# HTTP status (401 and 503 included: the server is up), for at most SECONDS;
# fails at once if PID (when not empty) has exited. The status is left in
# WAIT_HTTP_CODE.
wait_http() {
    local url=$1 pid=$2 secs=$3 i
    shift 3
    WAIT_HTTP_CODE=000
    for ((i = 0; i < secs * 10; i++)); do
        WAIT_HTTP_CODE=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" 2>/dev/null || true)
        [[ -n "$WAIT_HTTP_CODE" && "$WAIT_HTTP_CODE" != 000 ]] && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

# http_code URL [CURL_ARGS...]: the status of a GET, 000 when unreachable.
http_code() {
    local url=$1
    shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" "$url" 2>/dev/null || true
}

# random_hex BYTES: that many random bytes in hex (secrets, passwords).
random_hex() { od -An -N"${1:-12}" -tx1 /dev/urandom | tr -d ' \n'; }

# ================================================================ registry

# start_token_server NAME ISSUER SERVICE USERS_JSON [--private PREFIX]...:
# tests/e2e/token_server.py (Docker Hub style token auth) on a free port, its
# signing certificate in $TMP/NAME/cert.pem, one JSON line per token request
# in $TMP/NAME/requests.log. Sets TOKEN_ADDR[NAME] and TOKEN_DIR[NAME].
start_token_server() {
    local name=$1 issuer=$2 service=$3 users=$4 dir="$TMP/$1" port
    shift 4
    mkdir -p "$dir"
    "$PY" -c 'import jwt, cryptography' 2>/dev/null ||
        die "$PY cannot import jwt and cryptography (apt-get install python3-jwt python3-cryptography)"
    "$PY" "$E2E_DIR/token_server.py" gen-cert "$dir" || die "token_server.py gen-cert failed"
    read -r port < <(free_ports 1)
    TOKEN_ADDR[$name]="127.0.0.1:$port"
    # shellcheck disable=SC2034 # for the scripts
    TOKEN_DIR[$name]=$dir
    : >"$dir/requests.log"
    add_log "$dir/requests.log" "token server $name requests" 20
    add_log "$dir/server.log" "token server $name output" 10
    spawn "$name" "$PY" "$E2E_DIR/token_server.py" serve --listen "${TOKEN_ADDR[$name]}" --dir "$dir" \
        --issuer "$issuer" --service "$service" --users "$users" --log "$dir/requests.log" "$@" \
        >"$dir/server.log" 2>&1
    wait_http "http://${TOKEN_ADDR[$name]}/token" "$SPAWNED_PID" 15 ||
        die "token server $name did not start on ${TOKEN_ADDR[$name]}"
}

# start_registry NAME [plain | htpasswd FILE REALM | token REALM SERVICE ISSUER CERT_PEM]:
# Debian's docker-registry (CNCF distribution 2.8) on a free loopback port,
# storage in $TMP/NAME/data, deletes enabled. Its access log (one combined
# format line per finished request, on stdout) goes to $TMP/NAME/access.log,
# its own log to $TMP/NAME/registry.log. Sets REG_ADDR[NAME] (host:port) and
# REG_DIR[NAME]; waits until /v2/ answers (401 counts).
start_registry() {
    local name=$1 mode=${2:-plain} dir="$TMP/$1" port auth=""
    mkdir -p "$dir/data"
    case $mode in
        plain) ;;
        htpasswd)
            auth="auth:
  htpasswd:
    realm: $4
    path: $3"
            ;;
        token)
            auth="auth:
  token:
    realm: $3
    service: $4
    issuer: $5
    rootcertbundle: $6"
            ;;
        *) die "start_registry: unknown mode '$mode'" ;;
    esac
    read -r port < <(free_ports 1)
    REG_ADDR[$name]="127.0.0.1:$port"
    REG_DIR[$name]=$dir
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: ${REG_ADDR[$name]}
  secret: stowage-e2e-not-a-secret
$auth
EOF
    : >"$dir/access.log"
    add_log "$dir/access.log" "upstream $name access log" 30
    add_log "$dir/registry.log" "upstream $name registry log" 10
    spawn "$name" docker-registry serve "$dir/config.yml" >"$dir/access.log" 2>"$dir/registry.log"
    wait_http "http://${REG_ADDR[$name]}/v2/" "$SPAWNED_PID" 15 ||
        die "docker-registry $name did not answer on http://${REG_ADDR[$name]}/v2/"
    log "upstream registry $name ($mode) on ${REG_ADDR[$name]}"
}

# Access log lines look like
#   127.0.0.1 - - [27/Nov/2026:10:14:57 +0000] "GET /v2/library/x/blobs/sha256:00..00 HTTP/1.1" 200 157 "" "stowage/0.1.0"
reg_log() { echo "${REG_DIR[$1]}/access.log"; }
# reg_mark NAME: the access log's line count, for reg_since.
reg_mark() { wc -l <"$(reg_log "$1")"; }
reg_since() { tail -n +"$(($2 + 1))" "$(reg_log "$1")"; } # NAME MARK
# reg_blob_gets NAME MARK [REPO] [DIGEST]: blob GETs since MARK (0: ever).
reg_blob_gets() {
    local repo='[^ ]+' digest='sha256:[0-9a-f]{64}'
    [[ $# -ge 3 ]] && repo=$3
    [[ $# -ge 4 ]] && digest=$4
    reg_since "$1" "$2" | grep -cE "\"GET /v2/${repo}/blobs/${digest} HTTP/" || true
}
# reg_manifest_reqs NAME MARK [REPO]: manifest GETs and HEADs since MARK.
reg_manifest_reqs() {
    local repo='[^ ]+'
    [[ $# -ge 3 ]] && repo=$3
    reg_since "$1" "$2" | grep -cE "\"(GET|HEAD) /v2/${repo}/manifests/" || true
}
# reg_settle NAME...: waits (up to 10 s) until the access logs stop growing:
# a line is written when a response has been sent, and stowage may still be
# finishing a fill.
reg_settle() {
    local prev cur i n
    prev=$(for n in "$@"; do reg_mark "$n"; done | tr '\n' ' ')
    for ((i = 0; i < 20; i++)); do
        sleep 0.5
        cur=$(for n in "$@"; do reg_mark "$n"; done | tr '\n' ' ')
        [[ "$cur" == "$prev" ]] && return 0
        prev=$cur
    done
}
# check_fetched_once WHAT NAME MARK REPO DIGEST...: each DIGEST was fetched
# from upstream NAME exactly once since MARK.
check_fetched_once() {
    local what=$1 up=$2 m=$3 repo=$4 d n bad=""
    shift 4
    for d in "$@"; do
        n=$(reg_blob_gets "$up" "$m" "$repo" "$d")
        [[ $n -eq 1 ]] || bad+=" ${d:7:12}…=$n"
    done
    if [[ -z "$bad" ]]; then
        pass "$what: each of its $# blobs was fetched from the $up upstream exactly once"
    else
        fail "$what: upstream GETs per blob should be 1:$bad"
    fi
}
# check_only_stowage WHAT NAME MARK: every request upstream NAME saw since
# MARK came from stowage (its User-Agent), none from a client that went
# around the mirror.
check_only_stowage() {
    local others
    others=$(reg_since "$2" "$3" | grep -vE '"stowage/[^"]*"$' || true)
    if [[ -z "$others" ]]; then
        pass "$1: every request the $2 upstream saw came from stowage"
    else
        fail "$1: the $2 upstream saw requests not from stowage:"
        printf '%s\n' "$others" | head -n 10 | sed 's/^/    /'
    fi
}

# ================================================================ images

# skopeo_digest REF [skopeo inspect options...]: sha256 of the raw manifest
# at a docker:// reference, or "error: ...".
skopeo_digest() {
    local ref=$1
    shift
    if skopeo --insecure-policy inspect --raw --tls-verify=false "$@" "$ref" >"$TMP/raw" 2>"$TMP/raw.err"; then
        printf 'sha256:%s\n' "$(sha256sum <"$TMP/raw" | cut -d' ' -f1)"
    else
        printf 'error: %s\n' "$(tr '\n' ' ' <"$TMP/raw.err" | cut -c1-300)"
    fi
}

# seed_image KEY ADDR REPO TAG [--creds USER:PASSWORD] [BIG_BYTES [make_oci_layout options...]]:
# makes a random image with make_oci_layout.py (an index when --platforms is
# given) and pushes it with skopeo copy --all to ADDR/REPO:TAG. Records
# MANIFEST[KEY] (the upstream's digest: the truth if skopeo rewrote it),
# BLOBS[KEY] (config and layer digests), LAYOUT[KEY] and, per platform P,
# MANIFEST[KEY@P], BLOBS[KEY@P], CONFIG_OF[KEY@P]. Dies on failure.
seed_image() {
    local key=$1 addr=$2 repo=$3 tag=$4 cred_args=() layout d p
    shift 4
    if [[ ${1:-} == --creds ]]; then
        cred_args=(--creds "$2")
        shift 2
    fi
    layout="$TMP/layouts/${key//[^A-Za-z0-9._-]/_}"
    mkdir -p "$TMP/layouts"
    "$PY" "$E2E_DIR/make_oci_layout.py" "$layout" "$tag" "$@" >"$layout.json" ||
        die "make_oci_layout.py failed for $key"
    local dest=(--dest-tls-verify=false)
    if [[ ${#cred_args[@]} -gt 0 ]]; then
        dest+=(--dest-creds "${cred_args[1]}")
    else
        cred_args=(--authfile "$TMP/empty-auth.json")
        dest+=(--dest-authfile "$TMP/empty-auth.json")
    fi
    run_logged 120 "$TMP/push.log" skopeo --insecure-policy copy --all --quiet "${dest[@]}" \
        "oci:$layout:$tag" "docker://$addr/$repo:$tag" || die "pushing $key to $addr/$repo:$tag with skopeo"
    d=$(skopeo_digest "docker://$addr/$repo:$tag" "${cred_args[@]}")
    [[ $d == sha256:* ]] || die "skopeo inspect of $key on the upstream: $d"
    [[ $d == "$(jq -r .manifest "$layout.json")" ]] ||
        log "note: upstream manifest of $key is $d (layout had $(jq -r .manifest "$layout.json"))"
    MANIFEST[$key]=$d
    # shellcheck disable=SC2034 # for the scripts
    LAYOUT[$key]=$layout
    BLOBS[$key]=$(jq -r '.blobs[]' "$layout.json" | tr '\n' ' ')
    for p in $(jq -r '.platforms | keys[]' "$layout.json"); do
        MANIFEST[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p].manifest' "$layout.json")
        BLOBS[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p] | [.config] + .layers | .[]' "$layout.json" | tr '\n' ' ')
        # shellcheck disable=SC2034 # for the scripts
        CONFIG_OF[$key@$p]=$(jq -r --arg p "$p" '.platforms[$p].config' "$layout.json")
    done
    log "seeded $key = $d"
}

# check_layout WHAT OUT TAG KEY [DIGEST...]: an OCI layout written by skopeo
# copy holds the upstream image KEY: (1) the manifest tagged TAG in
# index.json is MANIFEST[KEY]; (2) every file under blobs/sha256 hashes to
# its name and the files are exactly MANIFEST[KEY], BLOBS[KEY] and the extra
# DIGESTs (per-platform manifests of an index). Two checks.
check_layout() {
    local what=$1 out=$2 tag=$3 key=$4 idx f sum bad="" got want d
    shift 4
    idx=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
        "$out/index.json" 2>/dev/null || true)
    if [[ $idx == "${MANIFEST[$key]}" ]]; then
        pass "$what: copied manifest digest equals the upstream's ($idx)"
    else
        fail "$what: copied manifest digest is '$idx', the upstream's is ${MANIFEST[$key]}"
    fi
    if [[ ! -d "$out/blobs/sha256" ]]; then
        fail "$what: no blobs/sha256 directory in $out"
        return 0
    fi
    for f in "$out"/blobs/sha256/*; do
        [[ -f $f ]] || continue
        sum=$(sha256sum "$f" | cut -d' ' -f1)
        [[ $sum == "$(basename "$f")" ]] || bad+=" $(basename "$f")"
    done
    got=$(find "$out/blobs/sha256" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | tr '\n' ' ')
    # shellcheck disable=SC2086
    want=$(for d in ${MANIFEST[$key]} ${BLOBS[$key]} "$@"; do echo "${d#sha256:}"; done | sort -u | tr '\n' ' ')
    if [[ -z "$bad" && "$got" == "$want" ]]; then
        pass "$what: all $(wc -w <<<"$got") blobs hash to their names and are exactly the upstream image's"
    else
        fail "$what: blobs not hashing to their names:${bad:- none}; blobs are [$got], expected [$want]"
    fi
}

# ================================================================ stowage

# stowage_bin: sets STOWAGE_BIN, building target/debug/stowage when it is
# not given.
stowage_bin() {
    if [[ -z "${STOWAGE_BIN:-}" ]]; then
        STOWAGE_BIN="$ROOT/target/debug/stowage"
        log "building stowage (cargo build --bin stowage)"
        (cd "$ROOT" && cargo build --quiet --bin stowage) || die "cargo build --bin stowage failed"
    fi
    [[ -x "$STOWAGE_BIN" ]] || die "stowage binary $STOWAGE_BIN not found"
}

# stowage_config NAME [UPSTREAM_URL]: free ports for NAME's registry and
# admin listeners (STOWAGE_ADDR[NAME], STOWAGE_ADMIN[NAME]) and a config file
# $TMP/NAME/stowage.toml (STOWAGE_CONFIG[NAME]): those listeners, cache in
# $TMP/NAME/cache, a 2 s shutdown and, with UPSTREAM_URL, that URL as
# docker.io (library_prefix). Append tables to the file as a test needs.
stowage_config() {
    local name=$1 url=${2:-} dir="$TMP/$1" p a
    mkdir -p "$dir/cache"
    read -r p a < <(free_ports 2)
    STOWAGE_ADDR[$name]="127.0.0.1:$p"
    STOWAGE_ADMIN[$name]="127.0.0.1:$a"
    STOWAGE_CONFIG[$name]="$dir/stowage.toml"
    STOWAGE_LOG[$name]="$dir/stowage.log"
    STOWAGE_SCHEME[$name]=http
    cat >"$dir/stowage.toml" <<EOF
listen = "${STOWAGE_ADDR[$name]}"
admin_listen = "${STOWAGE_ADMIN[$name]}"
cache_dir = "$dir/cache"
shutdown_timeout = "2s"
EOF
    if [[ -n "$url" ]]; then
        cat >>"$dir/stowage.toml" <<EOF

[[upstream]]
host = "docker.io"
url = "$url"
library_prefix = true
EOF
    fi
}

# start_stowage NAME [ARGS...]: runs $STOWAGE_BIN with ARGS, or with
# --config STOWAGE_CONFIG[NAME] when none are given, logging to
# STOWAGE_LOG[NAME] ($TMP/NAME/stowage.log unless changed). Waits (30 s) until it logs "stowage listening" or
# its listener answers (https when STOWAGE_SCHEME[NAME]=https). Returns
# non-zero with the reason in E2E_WHY when it exits or does not answer.
start_stowage() {
    local name=$1 i rc url log
    shift
    [[ -n "${STOWAGE_ADDR[$name]:-}" ]] || die "start_stowage $name: call stowage_config $name first"
    [[ $# -gt 0 ]] || set -- --config "${STOWAGE_CONFIG[$name]}"
    log=${STOWAGE_LOG[$name]}
    url="${STOWAGE_SCHEME[$name]}://${STOWAGE_ADDR[$name]}/v2/"
    [[ " ${E2E_LOGS[*]} " == *" $log|"* ]] || add_log "$log" "stowage[$name] log" 60
    : >"$log"
    spawn "$name" env NO_COLOR=1 "$STOWAGE_BIN" "$@" >>"$log" 2>&1
    for ((i = 0; i < 300; i++)); do
        if grep -q 'stowage listening' "$log" ||
            [[ $(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true) != 000 ]]; then
            return 0
        fi
        if ! kill -0 "$SPAWNED_PID" 2>/dev/null; then
            rc=0
            wait "$SPAWNED_PID" || rc=$?
            E2E_WHY="stowage[$name] exited with status $rc before answering on $url"
            [[ -s "$log" ]] || E2E_WHY+=" (its log is empty)"
            E2E_WHY+="; command: $STOWAGE_BIN $*"
            return 1
        fi
        sleep 0.1
    done
    E2E_WHY="stowage[$name] did not answer on $url within 30s; command: $STOWAGE_BIN $*"
    return 1
}

# metric ADMIN_ADDR NAME [LABEL=VALUE...]: the sum of metric NAME's samples
# whose labels include every LABEL=VALUE, read from http://ADMIN_ADDR/metrics
# (0 when none match; "error: ..." when the endpoint does not answer).
metric() {
    local admin=$1 body
    shift
    if ! body=$(curl -sf --max-time 5 "http://$admin/metrics" 2>&1); then
        echo "error: http://$admin/metrics did not answer ($body)"
        return 0
    fi
    metric_in <(printf '%s\n' "$body") "$@"
}

# metric_in FILE NAME [LABEL=VALUE...]: the same, from saved /metrics text.
metric_in() {
    "$PY" - "$@" <<'EOF'
import re, sys
path, name, want = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
total = 0.0
for line in open(path):
    m = re.match(r'([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)', line.strip())
    if not m or m.group(1) != name:
        continue
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        total += float(m.group(3))
print(int(total) if total == int(total) else total)
EOF
}

# ================================================================ docker

# start_containerd: a containerd of this test's own (root, state and socket
# under $TMP/containerd; the CRI plugin off). Sets CTR_SOCK.
start_containerd() {
    local i
    need_root "it starts containerd"
    mkdir -p "$TMP/containerd"
    cat >"$TMP/containerd.toml" <<EOF
version = 2
root = "$TMP/containerd/root"
state = "$TMP/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$TMP/containerd/containerd.sock"
EOF
    CTR_SOCK="$TMP/containerd/containerd.sock"
    add_log "$TMP/containerd.log" "containerd log" 15
    spawn containerd --stop-secs 10 containerd --config "$TMP/containerd.toml" >"$TMP/containerd.log" 2>&1
    for ((i = 0; i < 150; i++)); do
        ctr -a "$CTR_SOCK" version >/dev/null 2>&1 && return 0
        running containerd || break
        sleep 0.1
    done
    die "containerd did not start (socket $CTR_SOCK)"
}

# start_dockerd [DAEMON_JSON]: a dockerd of this test's own on the
# containerd of start_containerd (started first if needed): data, exec root
# and socket under $TMP, DOCKER_HOST exported for the docker client. The
# daemon.json ($DOCKERD_JSON) is DOCKERD_BASE_JSON, what this machine needs
# (vfs storage, no iptables, no bridge: containers use --network host or
# none), merged with DAEMON_JSON. Reload a changed file with
# `kill -HUP ${E2E_PID[dockerd]}`.
DOCKERD_BASE_JSON=""
start_dockerd() {
    local extra=${1:-"{}"} i
    need_root "it starts dockerd"
    [[ -n "${CTR_SOCK:-}" ]] || start_containerd
    DOCKERD_BASE_JSON='{"storage-driver": "vfs", "iptables": false, "ip-masq": false, "bridge": "none",
  "deprecated-key-path": "'"$TMP/docker-key.json"'"}'
    DOCKERD_JSON="$TMP/daemon.json"
    jq -s '.[0] * .[1]' <(echo "$DOCKERD_BASE_JSON") <(echo "$extra") >"$DOCKERD_JSON" ||
        die "start_dockerd: cannot merge daemon.json with $extra"
    mkdir -p "$TMP/docker-client"
    export DOCKER_CONFIG="$TMP/docker-client"
    unset DOCKER_CONTEXT
    export DOCKER_HOST="unix://$TMP/docker.sock"
    add_log "$TMP/dockerd.log" "dockerd log" 30
    spawn dockerd --stop-secs 20 dockerd --config-file "$DOCKERD_JSON" --data-root "$TMP/docker" \
        --exec-root "$TMP/docker-exec" --pidfile "$TMP/docker.pid" -H "$DOCKER_HOST" --containerd "$CTR_SOCK" \
        >"$TMP/dockerd.log" 2>&1
    for ((i = 0; i < 300; i++)); do
        "$DOCKER" version >/dev/null 2>&1 && return 0
        running dockerd || break
        sleep 0.1
    done
    die "dockerd did not start (daemon.json: $(tr '\n' ' ' <"$DOCKERD_JSON")); see its log"
}

# ================================================================ garage
# shellcheck source=tests/e2e/garage.sh
source "$E2E_DIR/garage.sh"
