#!/usr/bin/env bash
# End-to-end check of stowage's TLS front door with a real client (skopeo,
# Go's TLS stack) and a real upstream (Debian's docker-registry, plain HTTP on
# loopback).
#
#   1. start docker-registry and push a small OCI image (make_oci_layout.py)
#      as library/e2etls:1.0;
#   2. make a CA, a server certificate (localhost, 127.0.0.1) and a client
#      certificate with openssl, and an htpasswd file (bcrypt) with htpasswd;
#   3. stowage with --tls-cert/--tls-key: skopeo pulls with --src-cert-dir
#      holding the CA (digest and blobs checked); without the CA skopeo
#      refuses the certificate; curl negotiates h2;
#   4. a new certificate (new serial) written over the old files and SIGHUP:
#      new connections get it (openssl s_client), stowage keeps running and
#      skopeo pulls again; a broken key file and SIGHUP: the certificate stays;
#   5. stowage with [tls] client_ca (mTLS) and [access] htpasswd: skopeo
#      without a client certificate fails; with one but no credentials it gets
#      the Basic challenge (401); with both the pull works.
#
# Usage: tests/e2e/skopeo_tls.sh
# Environment:
#   STOWAGE_BIN  stowage binary (default: cargo build --bin stowage, then
#                target/debug/stowage)
#   KEEP_TMP=1   keep the temp dir (logs, certificates, cache) for inspection
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
STOWAGE_PID=""

log() { printf '[e2e-tls] %s\n' "$*"; }
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
    local f
    for f in "$TMP"/stowage-*.log; do
        [[ -e "$f" ]] && show_log "$f" "$(basename "$f")" 40
    done
    show_log "$TMP/registry/registry.log" "upstream registry log" 10
}

die() {
    fail "$*"
    show_logs
    exit 1
}

stop_pid() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 25; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    set +e
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
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

for tool in docker-registry skopeo openssl htpasswd jq curl python3 sha256sum; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "required tool '$tool' not found (install: apt-get install docker-registry skopeo openssl apache2-utils jq curl)"
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/stowage-e2e-tls.XXXXXX")"
mkdir -p "$TMP/registry/data" "$TMP/skopeo-tmp" "$TMP/pki" "$TMP/certs-ca" "$TMP/certs-client"
export TMPDIR="$TMP/skopeo-tmp"
echo '{}' >"$TMP/auth.json"
SKOPEO=(skopeo --insecure-policy)

read -r UPORT SPORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
UPSTREAM="127.0.0.1:$UPORT"
STOWAGE="127.0.0.1:$SPORT"
log "temp dir $TMP; upstream on $UPSTREAM, stowage on https://$STOWAGE"

if [[ -z "${STOWAGE_BIN:-}" ]]; then
    STOWAGE_BIN="$ROOT/target/debug/stowage"
    log "building stowage (cargo build --bin stowage)"
    (cd "$ROOT" && cargo build --quiet --bin stowage) || die "cargo build --bin stowage failed"
fi
[[ -x "$STOWAGE_BIN" ]] || die "stowage binary $STOWAGE_BIN not found"

# ---------------------------------------------------------------- upstream
cat >"$TMP/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $TMP/registry/data
http:
  addr: $UPSTREAM
  secret: stowage-e2e-tls-not-a-secret
EOF
docker-registry serve "$TMP/registry/config.yml" >"$TMP/registry/registry.log" 2>&1 </dev/null &
PIDS+=("$!")
REGISTRY_PID=$!
for ((i = 0; i < 150; i++)); do
    curl -fsS -o /dev/null --max-time 2 "http://$UPSTREAM/v2/" 2>/dev/null && break
    kill -0 "$REGISTRY_PID" 2>/dev/null || die "docker-registry exited at start-up"
    sleep 0.1
done
curl -fsS -o /dev/null --max-time 2 "http://$UPSTREAM/v2/" || die "docker-registry did not answer on http://$UPSTREAM/v2/"

layout="$TMP/src-layout"
python3 "$HERE/make_oci_layout.py" "$layout" 1.0 >"$layout.json" || die "make_oci_layout.py failed"
"${SKOPEO[@]}" copy --quiet --authfile "$TMP/auth.json" --dest-tls-verify=false \
    "oci:$layout:1.0" "docker://$UPSTREAM/library/e2etls:1.0" || die "pushing library/e2etls:1.0 upstream"
"${SKOPEO[@]}" inspect --raw --tls-verify=false --authfile "$TMP/auth.json" \
    "docker://$UPSTREAM/library/e2etls:1.0" >"$TMP/upstream-manifest" || die "inspecting the upstream image"
WANT="sha256:$(sha256sum <"$TMP/upstream-manifest" | cut -d' ' -f1)"
BLOBS=$(jq -r '.blobs[]' "$layout.json" | tr '\n' ' ')
pass "upstream seeded with library/e2etls:1.0 ($WANT)"

# ---------------------------------------------------------------- PKI
P="$TMP/pki"
ext() { printf '%s\n' "$@" >"$P/ext.cnf"; echo "$P/ext.cnf"; }
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# issue NAME CN SERIAL EXT...: NAME.key and NAME.crt signed by the CA.
issue() {
    local name=$1 cn=$2 serial=$3
    shift 3
    new_key "$P/$name.key"
    openssl req -new -key "$P/$name.key" -subj "/O=stowage e2e/CN=$cn" -out "$P/$name.csr" 2>/dev/null
    openssl x509 -req -in "$P/$name.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -set_serial "$serial" \
        -days 2 -extfile "$(ext "$@")" -out "$P/$name.crt" 2>/dev/null
}
{
    new_key "$P/ca.key" &&
    openssl req -x509 -new -key "$P/ca.key" -subj "/O=stowage e2e/CN=stowage e2e CA" -days 2 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$P/ca.crt" 2>/dev/null &&
    issue server1 localhost 0x5101 "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth" "basicConstraints=CA:FALSE" &&
    issue server2 localhost 0x5102 "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth" "basicConstraints=CA:FALSE" &&
    issue client e2e-client 0x5201 "extendedKeyUsage=clientAuth" "basicConstraints=CA:FALSE"
} || die "openssl could not create the test CA and certificates"
# skopeo's --src-cert-dir: *.crt are CAs, NAME.cert + NAME.key a client pair.
cp "$P/ca.crt" "$TMP/certs-ca/ca.crt"
cp "$P/ca.crt" "$TMP/certs-client/ca.crt"
cp "$P/client.crt" "$TMP/certs-client/client.cert"
cp "$P/client.key" "$TMP/certs-client/client.key"
mkdir -p "$TMP/live"
cp "$P/server1.crt" "$TMP/live/tls.crt"
cp "$P/server1.key" "$TMP/live/tls.key"
htpasswd -cbB -C 5 "$TMP/htpasswd" e2euser 'e2e pass!' 2>/dev/null || die "htpasswd -B failed"
pass "CA, server and client certificates (openssl) and a bcrypt htpasswd created"

# ---------------------------------------------------------------- stowage
# start_stowage NAME ARGS...: runs stowage with the base config plus ARGS and
# waits for the TLS port.
BASE="$TMP/base.toml"
cat >"$BASE" <<EOF
listen = "$STOWAGE"
admin_listen = "off"
cache_dir = "$TMP/cache"
shutdown_timeout = "2s"

[[upstream]]
host = "docker.io"
url = "http://$UPSTREAM"
library_prefix = true
EOF
start_stowage() {
    local name=$1 i
    shift
    "$STOWAGE_BIN" "$@" >"$TMP/stowage-$name.log" 2>&1 </dev/null &
    STOWAGE_PID=$!
    PIDS+=("$STOWAGE_PID")
    for ((i = 0; i < 300; i++)); do
        if curl -s -o /dev/null --max-time 2 --cacert "$P/ca.crt" "https://$STOWAGE/v2/" 2>/dev/null \
            || grep -q 'stowage listening' "$TMP/stowage-$name.log"; then
            return 0
        fi
        kill -0 "$STOWAGE_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
stop_stowage() {
    [[ -n "$STOWAGE_PID" ]] && stop_pid "$STOWAGE_PID"
    STOWAGE_PID=""
}

# pull WHAT OUT SKOPEO-ARGS...: skopeo copy from stowage into an OCI layout.
pull() {
    local out=$1
    shift
    rm -rf "$out"
    "${SKOPEO[@]}" copy --quiet --authfile "$TMP/auth.json" --src-tls-verify=true "$@" \
        "docker://$STOWAGE/e2etls:1.0" "oci:$out:1.0" >"$out.err" 2>&1
}
check_layout() { # OUT WHAT
    local out=$1 what=$2 got d bad=0
    got=$(jq -r '.manifests[0].digest' "$out/index.json" 2>/dev/null || true)
    [[ "$got" == "$WANT" ]] || { fail "$what: manifest digest $got, upstream's is $WANT"; return 0; }
    for d in $BLOBS; do
        if [[ "$(sha256sum <"$out/blobs/sha256/${d#sha256:}" 2>/dev/null | cut -d' ' -f1)" != "${d#sha256:}" ]]; then
            bad=1
        fi
    done
    if [[ $bad -eq 0 ]]; then
        pass "$what: manifest digest and every blob match the upstream image"
    else
        fail "$what: a blob is missing or does not hash to its name"
    fi
}
served_serial() {
    openssl s_client -connect "$STOWAGE" -servername localhost -CAfile "$P/ca.crt" </dev/null 2>/dev/null \
        | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2
}

# ---------------------------------------------------------------- TLS via flags
start_stowage flags --config "$BASE" --tls-cert "$TMP/live/tls.crt" --tls-key "$TMP/live/tls.key" \
    || die "stowage with --tls-cert/--tls-key did not start"
pass "stowage started with --tls-cert/--tls-key (pid $STOWAGE_PID)"

if pull "$TMP/pull-tls" --src-cert-dir "$TMP/certs-ca"; then
    pass "skopeo copy over TLS with --src-cert-dir (the test CA)"
    check_layout "$TMP/pull-tls" "TLS pull"
else
    fail "skopeo copy over TLS with --src-cert-dir failed: $(tr '\n' ' ' <"$TMP/pull-tls.err" | cut -c1-300)"
fi

if pull "$TMP/pull-noca"; then
    fail "skopeo accepted stowage's certificate without the test CA"
elif grep -qiE 'certificate|x509|tls' "$TMP/pull-noca.err"; then
    pass "without the CA skopeo refuses the certificate ($(grep -oiE 'x509: [^"]{0,60}|certificate [^"]{0,60}' "$TMP/pull-noca.err" | head -n1))"
else
    fail "skopeo without the CA failed, but not on the certificate: $(tr '\n' ' ' <"$TMP/pull-noca.err" | cut -c1-300)"
fi

ver=$(curl -sS -o /dev/null --max-time 10 --http2 --cacert "$P/ca.crt" -w '%{http_version}' "https://$STOWAGE/v2/" 2>&1 || true)
if [[ "$ver" == "2" ]]; then
    pass "curl --http2 negotiates h2 over TLS (ALPN)"
else
    fail "curl --http2 got HTTP version '$ver', expected 2"
fi
ver=$(curl -sS -o /dev/null --max-time 10 --http1.1 --cacert "$P/ca.crt" -w '%{http_version}' "https://$STOWAGE/v2/" 2>&1 || true)
[[ "$ver" == "1.1" ]] && pass "curl --http1.1 over TLS is served HTTP/1.1" || fail "curl --http1.1 got HTTP version '$ver'"

# ---------------------------------------------------------------- SIGHUP reload
before=$(served_serial)
[[ "$before" == "5101" ]] || fail "served certificate serial is '$before', expected 5101"
cp "$P/server2.key" "$TMP/live/tls.key.new" && mv "$TMP/live/tls.key.new" "$TMP/live/tls.key"
cp "$P/server2.crt" "$TMP/live/tls.crt.new" && mv "$TMP/live/tls.crt.new" "$TMP/live/tls.crt"
kill -HUP "$STOWAGE_PID"
after=""
for ((i = 0; i < 100; i++)); do
    after=$(served_serial)
    [[ "$after" == "5102" ]] && break
    sleep 0.1
done
if [[ "$after" == "5102" ]] && kill -0 "$STOWAGE_PID" 2>/dev/null; then
    pass "after replacing the files and SIGHUP new connections get serial 5102 (was $before); stowage still running"
else
    fail "after SIGHUP the served serial is '$after' (want 5102); running: $(kill -0 "$STOWAGE_PID" 2>/dev/null && echo yes || echo no)"
fi
if pull "$TMP/pull-reloaded" --src-cert-dir "$TMP/certs-ca"; then
    check_layout "$TMP/pull-reloaded" "pull after the reload"
else
    fail "skopeo copy after the reload failed: $(tr '\n' ' ' <"$TMP/pull-reloaded.err" | cut -c1-300)"
fi
echo "not a key" >"$TMP/live/tls.key"
kill -HUP "$STOWAGE_PID"
for ((i = 0; i < 50; i++)); do
    grep -q 'TLS reload rejected' "$TMP/stowage-flags.log" && break
    sleep 0.1
done
if grep -q 'TLS reload rejected' "$TMP/stowage-flags.log" && [[ "$(served_serial)" == "5102" ]] \
    && kill -0 "$STOWAGE_PID" 2>/dev/null; then
    pass "a broken key and SIGHUP: rejected with a log line, serial 5102 still served"
else
    fail "a broken key and SIGHUP: log line, old certificate or process missing (serial now '$(served_serial)')"
fi
stop_stowage

# ---------------------------------------------------------------- mTLS + htpasswd
cp "$P/server1.crt" "$TMP/live/tls.crt"
cp "$P/server1.key" "$TMP/live/tls.key"
cat "$BASE" - >"$TMP/mtls.toml" <<EOF

[tls]
cert = "$TMP/live/tls.crt"
key = "$TMP/live/tls.key"
client_ca = "$P/ca.crt"

[access]
htpasswd = "$TMP/htpasswd"
EOF
start_stowage mtls --config "$TMP/mtls.toml" || die "stowage with mTLS and htpasswd did not start"
pass "stowage started with [tls] client_ca and [access] htpasswd"

if pull "$TMP/pull-nocert" --src-cert-dir "$TMP/certs-ca" --src-creds 'e2euser:e2e pass!'; then
    fail "skopeo without a client certificate pulled through an mTLS listener"
else
    pass "without a client certificate skopeo is refused ($(grep -oiE 'remote error: [^"]{0,50}|certificate required|bad certificate|EOF' "$TMP/pull-nocert.err" | head -n1))"
fi

if pull "$TMP/pull-nocreds" --src-cert-dir "$TMP/certs-client"; then
    fail "skopeo without credentials pulled through an htpasswd-protected mirror"
elif grep -qiE 'unauthorized|authentication required|401' "$TMP/pull-nocreds.err"; then
    pass "client certificate but no credentials: refused as unauthorized"
else
    fail "client certificate but no credentials failed, but not with 401: $(tr '\n' ' ' <"$TMP/pull-nocreds.err" | cut -c1-300)"
fi
challenge=$(curl -sS -D - -o /dev/null --max-time 10 --cacert "$P/ca.crt" --cert "$P/client.crt" --key "$P/client.key" \
    "https://$STOWAGE/v2/" 2>/dev/null | tr -d '\r' | grep -i '^www-authenticate:' | cut -d' ' -f2- || true)
[[ "$challenge" == 'Basic realm="stowage"' ]] && pass "GET /v2/ without credentials: WWW-Authenticate: $challenge" \
    || fail "GET /v2/ without credentials: WWW-Authenticate '$challenge'"

if pull "$TMP/pull-mtls" --src-cert-dir "$TMP/certs-client" --src-creds 'e2euser:wrong'; then
    fail "skopeo with a wrong password pulled"
else
    pass "client certificate and a wrong password: refused"
fi
if pull "$TMP/pull-mtls" --src-cert-dir "$TMP/certs-client" --src-creds 'e2euser:e2e pass!'; then
    pass "skopeo with a client certificate and credentials pulls through mTLS + htpasswd"
    check_layout "$TMP/pull-mtls" "mTLS + htpasswd pull"
else
    fail "skopeo with client certificate and credentials failed: $(tr '\n' ' ' <"$TMP/pull-mtls.err" | cut -c1-300)"
fi

if [[ $FAILED -ne 0 ]]; then
    show_logs
fi
