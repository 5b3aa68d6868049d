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
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init e2e-tls

need_tools docker-registry skopeo openssl htpasswd jq curl python3 sha256sum
stowage_bin
mkdir -p "$TMP/pki" "$TMP/certs-ca" "$TMP/certs-client"
SKOPEO=(skopeo --insecure-policy)

# ---------------------------------------------------------------- upstream
start_registry up
UPSTREAM=${REG_ADDR[up]}
seed_image e2etls "$UPSTREAM" library/e2etls 1.0
WANT=${MANIFEST[e2etls]}
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
# Two instances, each with the config of stowage_config (upstream docker.io
# with library_prefix) and its own log: "flags" gets TLS from --tls-cert and
# --tls-key, "mtls" from [tls] with client_ca plus [access] htpasswd.
# STOWAGE is the one under test.
stowage_config flags "http://$UPSTREAM"
stowage_config mtls "http://$UPSTREAM"
STOWAGE_SCHEME[flags]=https
STOWAGE_SCHEME[mtls]=https
log "temp dir $TMP; upstream on $UPSTREAM, stowage on https://${STOWAGE_ADDR[flags]} then https://${STOWAGE_ADDR[mtls]}"

# pull WHAT OUT SKOPEO-ARGS...: skopeo copy from stowage into an OCI layout.
pull() {
    local out=$1
    shift
    rm -rf "$out"
    "${SKOPEO[@]}" copy --quiet --authfile "$TMP/empty-auth.json" --src-tls-verify=true "$@" \
        "docker://$STOWAGE/e2etls:1.0" "oci:$out:1.0" >"$out.err" 2>&1
}
check_pulled() { # OUT WHAT
    check_layout "$2" "$1" 1.0 e2etls
}
served_serial() {
    openssl s_client -connect "$STOWAGE" -servername localhost -CAfile "$P/ca.crt" </dev/null 2>/dev/null \
        | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2
}

# ---------------------------------------------------------------- TLS via flags
STOWAGE=${STOWAGE_ADDR[flags]}
start_stowage flags --config "${STOWAGE_CONFIG[flags]}" --tls-cert "$TMP/live/tls.crt" --tls-key "$TMP/live/tls.key" \
    || die "stowage with --tls-cert/--tls-key did not start: $E2E_WHY"
STOWAGE_PID=${E2E_PID[flags]}
pass "stowage started with --tls-cert/--tls-key (pid $STOWAGE_PID)"

if pull "$TMP/pull-tls" --src-cert-dir "$TMP/certs-ca"; then
    pass "skopeo copy over TLS with --src-cert-dir (the test CA)"
    check_pulled "$TMP/pull-tls" "TLS pull"
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
    check_pulled "$TMP/pull-reloaded" "pull after the reload"
else
    fail "skopeo copy after the reload failed: $(tr '\n' ' ' <"$TMP/pull-reloaded.err" | cut -c1-300)"
fi
echo "not a key" >"$TMP/live/tls.key"
kill -HUP "$STOWAGE_PID"
for ((i = 0; i < 50; i++)); do
    grep -q 'TLS reload rejected' "${STOWAGE_LOG[flags]}" && break
    sleep 0.1
done
if grep -q 'TLS reload rejected' "${STOWAGE_LOG[flags]}" && [[ "$(served_serial)" == "5102" ]] \
    && kill -0 "$STOWAGE_PID" 2>/dev/null; then
    pass "a broken key and SIGHUP: rejected with a log line, serial 5102 still served"
else
    fail "a broken key and SIGHUP: log line, old certificate or process missing (serial now '$(served_serial)')"
fi
stop_service flags

# ---------------------------------------------------------------- mTLS + htpasswd
cp "$P/server1.crt" "$TMP/live/tls.crt"
cp "$P/server1.key" "$TMP/live/tls.key"
cat >>"${STOWAGE_CONFIG[mtls]}" <<EOF

[tls]
cert = "$TMP/live/tls.crt"
key = "$TMP/live/tls.key"
client_ca = "$P/ca.crt"

[access]
htpasswd = "$TMP/htpasswd"
EOF
STOWAGE=${STOWAGE_ADDR[mtls]}
start_stowage mtls || die "stowage with mTLS and htpasswd did not start: $E2E_WHY"
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
    check_pulled "$TMP/pull-mtls" "mTLS + htpasswd pull"
else
    fail "skopeo with client certificate and credentials failed: $(tr '\n' ' ' <"$TMP/pull-mtls.err" | cut -c1-300)"
fi

