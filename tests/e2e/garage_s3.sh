#!/usr/bin/env bash
# Self-check of the Garage fixture (tests/e2e/garage.sh) that the cluster
# tests stand on: a single-node Garage on loopback, its bucket and key made
# with Garage's own CLI, and its S3 API used by a real SigV4 client (curl
# --aws-sigv4): put, get, head, list, multipart upload, refusals, a stop and
# a start with the data kept, delete.
#
# Usage: tests/e2e/garage_s3.sh
# Environment:
#   GARAGE_BIN   garage binary (default: garage on PATH, else ~/.cargo/bin/garage;
#                .ci/run installs it with cargo install garage --locked)
#   KEEP_TMP=1   keep the temp dir (config, data, logs)
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line; exits
# non-zero if any check failed.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init garage

need_tools curl sha256sum head python3
garage_bin
start_garage garage stowage
version=$("$GARAGE_BIN" --version 2>/dev/null | awk '{ print $2 }')
pass "garage ${version##*:} up: layout applied, bucket $S3_BUCKET and key $AWS_ACCESS_KEY_ID made with its CLI"

info=$(garage_cli garage -- bucket info "$S3_BUCKET" 2>&1 || true)
if grep -qE "^RWO +$AWS_ACCESS_KEY_ID " <<<"$info"; then
    pass "garage bucket info: the key may read, write and own the bucket (RWO)"
else
    fail "garage bucket info does not show $AWS_ACCESS_KEY_ID with read and write: $(tr '\n' ' ' <<<"$info" | cut -c1-300)"
fi

sha() { sha256sum <"$1" | cut -d' ' -f1; }
head -c 3145728 /dev/urandom >"$TMP/blob"
WANT=$(sha "$TMP/blob")
KEY="blobs/sha256/$WANT"

code=$(s3_put "$KEY" "$TMP/blob")
check_eq "PUT of a 3 MiB object" "$code" 200 "$(head -c 300 "$TMP/s3.out")"

code=$(s3_get "$KEY" "$TMP/got")
if [[ $code == 200 && $(sha "$TMP/got") == "$WANT" ]]; then
    pass "GET returns the same bytes (sha256 $WANT)"
else
    fail "GET answered $code with sha256 $(sha "$TMP/got" 2>/dev/null || echo none), want $WANT"
fi

code=$(s3_head "$KEY")
len=$(tr -d '\r' <"$TMP/s3.head.headers" | awk -F': ' 'tolower($1) == "content-length" { print $2 }')
if [[ $code == 200 && $len == 3145728 ]]; then
    pass "HEAD: 200, Content-Length 3145728"
else
    fail "HEAD answered $code with Content-Length '$len'"
fi

if listed=$(s3_list "blobs/") && [[ $listed == "$KEY" ]]; then
    pass "ListObjectsV2 under blobs/ lists exactly the object"
else
    fail "ListObjectsV2 under blobs/ gave [$listed]: $(head -c 300 "$TMP/s3.list")"
fi

code=$(s3_get "no/such/object" "$TMP/missing")
check_eq "GET of a missing key" "$code" 404

code=$(curl -s -o /dev/null -w '%{http_code}' "$AWS_ENDPOINT_URL/$S3_BUCKET/$KEY" || true)
check_eq "GET without a signature" "$code" 403
code=$(AWS_SECRET_ACCESS_KEY=$(random_hex 32) s3_get "$KEY" "$TMP/badsig")
check_eq "GET signed with a wrong secret" "$code" 403

# Multipart: parts of 5 MiB (the S3 minimum for all but the last) and 1 MiB.
head -c 5242880 /dev/urandom >"$TMP/part1"
head -c 1048576 /dev/urandom >"$TMP/part2"
cat "$TMP/part1" "$TMP/part2" >"$TMP/big"
code=$(s3_multipart_put "big/object" "$TMP/part1" "$TMP/part2" || true)
if [[ $code == 200 ]] && [[ $(s3_get "big/object" "$TMP/big-got") == 200 && $(sha "$TMP/big-got") == "$(sha "$TMP/big")" ]]; then
    pass "multipart upload (5 MiB + 1 MiB): completed, GET returns the 6 MiB"
else
    fail "multipart upload: complete answered $code ($(head -c 300 "$TMP/s3.out" 2>/dev/null)), GET $S3_CODE"
fi

# Garage ignores If-None-Match on writes (so stowage must not rely on it):
# recorded here, not asserted, as it is Garage's behaviour, not ours.
code=$(s3_put "$KEY" "$TMP/blob" -H 'If-None-Match: *')
log "note: PUT with If-None-Match: * over an existing object answered $code"

stop_garage garage
code=$(s3_get "$KEY" "$TMP/down")
check_eq "garage stopped: a GET gets no answer (000: connection refused)" "$code" 000
start_garage garage
code=$(s3_get "$KEY" "$TMP/again")
if [[ $code == 200 && $(sha "$TMP/again") == "$WANT" ]]; then
    pass "garage started again on the same port: the object is still there, same bytes"
else
    fail "after a restart GET answered $code"
fi

code=$(s3_delete "$KEY")
check_eq "DELETE" "$code" 204
code=$(s3_get "$KEY" "$TMP/deleted")
check_eq "GET after DELETE" "$code" 404
