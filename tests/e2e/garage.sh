# shellcheck shell=bash
# Garage (S3-compatible object store) for the e2e scripts; sourced by lib.sh.
#
#   start_garage [NAME] [BUCKET]  first call: a single-node Garage on free
#                                 loopback ports in $TMP/NAME (config, layout
#                                 assign + apply, a bucket and a key made with
#                                 Garage's own CLI, the key allowed on the
#                                 bucket), then exports what an S3 client
#                                 needs (below). Later calls after
#                                 stop_garage: the same node started again on
#                                 the same ports and data.
#   stop_garage [NAME]            SIGTERM, wait; data and config stay
#   garage_cli [NAME] -- ARGS...  the garage CLI against that node
#   s3_put/s3_get/s3_head/s3_delete/s3_list/s3_multipart_put
#                                 a tiny S3 client: curl --aws-sigv4
#
# Exported after start_garage (one Garage per script is the usual case; the
# per-name values are in GARAGE_* arrays):
#   AWS_ENDPOINT_URL        http://127.0.0.1:PORT (S3 API, path-style)
#   AWS_REGION, AWS_DEFAULT_REGION   "garage"
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#   AWS_ALLOW_HTTP=true     (object_store's from_env refuses http:// without it)
#   S3_BUCKET               the bucket
#
# The binary is $GARAGE_BIN, else `garage` on PATH, else ~/.cargo/bin/garage
# (.ci/run installs it there with cargo install garage --locked).
# Garage ignores If-None-Match on writes: nothing may depend on it.

# shellcheck disable=SC2034 # some only for the scripts
declare -A GARAGE_DIR=() GARAGE_S3=() GARAGE_RPC=() GARAGE_ADMIN=() GARAGE_BUCKET_OF=()
declare -A GARAGE_KEY_ID=() GARAGE_SECRET=()

garage_bin() {
    if [[ -z "${GARAGE_BIN:-}" ]]; then
        GARAGE_BIN=$(command -v garage 2>/dev/null || echo "$HOME/.cargo/bin/garage")
    fi
    [[ -x "$GARAGE_BIN" ]] ||
        die "garage not found (GARAGE_BIN, PATH, ~/.cargo/bin): bash .ci/run installs it (cargo install garage --locked)"
}

# garage_cli [NAME] -- ARGS...: the CLI talking to node NAME (RPC).
garage_cli() {
    local name=garage
    if [[ $1 != -- ]]; then
        name=$1
        shift
    fi
    shift
    "$GARAGE_BIN" -c "${GARAGE_DIR[$name]}/garage.toml" "$@"
}

# garage_up NAME: starts the server from its config, waits until the CLI
# reaches it and, once a layout exists, until the S3 API answers.
garage_up() {
    local name=$1 dir=${GARAGE_DIR[$1]} i
    spawn "$name" --stop-secs 10 env RUST_LOG=garage=info NO_COLOR=1 "$GARAGE_BIN" -c "$dir/garage.toml" server \
        >>"$dir/garage.log" 2>&1
    for ((i = 0; i < 300; i++)); do
        garage_cli "$name" -- status >/dev/null 2>&1 && break
        running "$name" || die "garage $name exited at start-up"
        sleep 0.1
    done
    garage_cli "$name" -- status >/dev/null 2>&1 || die "garage $name: 'garage status' failed for 30s"
    wait_http "http://${GARAGE_S3[$name]}/" "${E2E_PID[$name]}" 30 ||
        die "garage $name: the S3 API did not answer on ${GARAGE_S3[$name]}"
}

# garage_export NAME: the S3 client variables for NAME.
garage_export() {
    local name=$1
    export AWS_ENDPOINT_URL="http://${GARAGE_S3[$name]}"
    export AWS_REGION=garage AWS_DEFAULT_REGION=garage AWS_ALLOW_HTTP=true
    export AWS_ACCESS_KEY_ID=${GARAGE_KEY_ID[$name]}
    export AWS_SECRET_ACCESS_KEY=${GARAGE_SECRET[$name]}
    export S3_BUCKET=${GARAGE_BUCKET_OF[$name]}
}

start_garage() {
    local name=${1:-garage} bucket=${2:-stowage} dir s3 rpc admin node
    garage_bin
    if [[ -n "${GARAGE_DIR[$name]:-}" ]]; then
        running "$name" && die "start_garage: $name is already running"
        garage_up "$name"
        garage_wait_bucket "$name" || die "garage $name: bucket not readable after restart (HEAD answered $S3_CODE)"
        garage_export "$name"
        log "garage $name started again on ${GARAGE_S3[$name]}"
        return 0
    fi
    dir="$TMP/$name"
    mkdir -p "$dir/meta" "$dir/data"
    read -r s3 rpc admin < <(free_ports 3)
    GARAGE_DIR[$name]=$dir
    GARAGE_S3[$name]="127.0.0.1:$s3"
    GARAGE_RPC[$name]="127.0.0.1:$rpc"
    GARAGE_ADMIN[$name]="127.0.0.1:$admin"
    GARAGE_BUCKET_OF[$name]=$bucket
    cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(random_hex 16)"
metrics_token = "$(random_hex 16)"
EOF
    chmod 600 "$dir/garage.toml"
    : >"$dir/garage.log"
    add_log "$dir/garage.log" "garage $name log" 30
    garage_up "$name"
    # A single node: assign it all the (nominal) capacity, apply layout v1.
    node=$(garage_cli "$name" -- node id -q 2>>"$dir/cli.log") || die "garage $name: 'garage node id' failed"
    node=${node%%@*}
    garage_cli "$name" -- layout assign -z dc1 -c 1G "$node" >>"$dir/cli.log" 2>&1 ||
        die "garage $name: layout assign failed: $(tail -n 3 "$dir/cli.log")"
    garage_cli "$name" -- layout apply --version 1 >>"$dir/cli.log" 2>&1 ||
        die "garage $name: layout apply failed: $(tail -n 3 "$dir/cli.log")"
    garage_cli "$name" -- bucket create "$bucket" >>"$dir/cli.log" 2>&1 ||
        die "garage $name: bucket create $bucket failed: $(tail -n 3 "$dir/cli.log")"
    garage_cli "$name" -- key create "stowage-e2e" >>"$dir/cli.log" 2>&1 ||
        die "garage $name: key create failed: $(tail -n 3 "$dir/cli.log")"
    garage_cli "$name" -- bucket allow --read --write --owner "$bucket" --key stowage-e2e >>"$dir/cli.log" 2>&1 ||
        die "garage $name: bucket allow failed: $(tail -n 3 "$dir/cli.log")"
    GARAGE_KEY_ID[$name]=$(garage_cli "$name" -- key info stowage-e2e --key-id 2>>"$dir/cli.log") ||
        die "garage $name: key info --key-id failed"
    GARAGE_SECRET[$name]=$(garage_cli "$name" -- key info stowage-e2e --secret-key 2>>"$dir/cli.log") ||
        die "garage $name: key info --secret-key failed"
    [[ ${GARAGE_KEY_ID[$name]} == GK* && ${#GARAGE_SECRET[$name]} -ge 32 ]] ||
        die "garage $name: unexpected key id '${GARAGE_KEY_ID[$name]}' or secret (${#GARAGE_SECRET[$name]} chars)"
    garage_export "$name"
    garage_wait_bucket "$name" || die "garage $name: bucket $bucket not usable (HEAD answered $S3_CODE)"
    log "garage $name: S3 on ${GARAGE_S3[$name]}, bucket $bucket, key ${GARAGE_KEY_ID[$name]} ($("$GARAGE_BIN" --version 2>/dev/null | head -n1))"
}

# garage_wait_bucket NAME: HEAD on the bucket with the key answers 200
# (for up to 30 s: the layout and the bucket take a moment to settle).
garage_wait_bucket() {
    local name=$1 i
    garage_export "$name"
    for ((i = 0; i < 60; i++)); do
        s3_head "" >/dev/null
        [[ $S3_CODE == 200 ]] && return 0
        sleep 0.5
    done
    return 1
}

stop_garage() {
    local name=${1:-garage}
    stop_service "$name"
    log "garage $name stopped"
}

# ---------------------------------------------------------------- S3 client
# s3_request METHOD KEY OUT [CURL_ARGS...]: a SigV4-signed request to
# $AWS_ENDPOINT_URL/$S3_BUCKET/KEY (KEY may carry ?query), the body in OUT,
# the response headers in OUT.headers. The status is in S3_CODE (000 when
# nothing answered) and printed. S3 wants the payload's SHA-256 in
# x-amz-content-sha256 (curl signs it with the other x-amz-* headers): that
# of S3_PAYLOAD (a file) when set, else of an empty body.
# curl 7.88 signs the query string as written: give parameters sorted by
# name, values percent-encoded (s3_list does), and "name=" for a bare name
# ("?uploads=", not "?uploads").
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
s3_request() {
    local method=$1 key=$2 out=$3 how=(-X "$1") sum=$EMPTY_SHA256
    shift 3
    [[ $method == HEAD ]] && how=(-I)
    if [[ -n "${S3_PAYLOAD:-}" ]]; then
        sum=$(sha256sum <"$S3_PAYLOAD" | cut -d' ' -f1)
        how+=(--data-binary "@$S3_PAYLOAD")
    fi
    S3_CODE=$(curl -s "${how[@]}" --max-time 60 -o "$out" -D "$out.headers" -w '%{http_code}' \
        --aws-sigv4 "aws:amz:${AWS_REGION}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: $sum" "$@" "$AWS_ENDPOINT_URL/$S3_BUCKET/$key" 2>/dev/null || true)
    [[ -n "$S3_CODE" ]] || S3_CODE=000
    echo "$S3_CODE"
}

s3_send() { # METHOD KEY FILE [CURL_ARGS...]: FILE as the body
    local method=$1 key=$2
    S3_PAYLOAD=$3
    shift 3
    s3_request "$method" "$key" "$TMP/s3.out" "$@"
    S3_PAYLOAD=""
}
s3_put() { s3_send PUT "$@"; }                          # KEY FILE [CURL_ARGS...]
s3_get() { s3_request GET "$1" "$2"; }                  # KEY OUT
s3_head() { s3_request HEAD "$1" "$TMP/s3.head"; }      # KEY (headers in $TMP/s3.head.headers)
s3_delete() { s3_request DELETE "$1" "$TMP/s3.out"; }   # KEY
# s3_list PREFIX: the keys under PREFIX (ListObjectsV2, up to 1000), one a
# line; fails unless the listing answered 200.
s3_list() {
    s3_request GET "?list-type=2&prefix=$(jq -rn --arg v "$1" '$v | @uri')" "$TMP/s3.list" >/dev/null
    [[ $S3_CODE == 200 ]] || return 1
    grep -oE '<Key>[^<]*</Key>' "$TMP/s3.list" | sed -E 's#</?Key>##g'
}

# s3_multipart_put KEY PART_FILE...: CreateMultipartUpload, one UploadPart
# per file (all but the last at least 5 MiB), CompleteMultipartUpload.
# Prints the final status (S3_CODE).
s3_multipart_put() {
    local key=$1 id n=0 part etag xml="<CompleteMultipartUpload>"
    shift
    : >"$TMP/s3.empty"
    s3_send POST "$key?uploads=" "$TMP/s3.empty" >/dev/null
    cp "$TMP/s3.out" "$TMP/s3.mpu"
    [[ $S3_CODE == 200 ]] || { echo "$S3_CODE"; return 1; }
    id=$(grep -oE '<UploadId>[^<]*</UploadId>' "$TMP/s3.mpu" | sed -E 's#</?UploadId>##g')
    [[ -n "$id" ]] || { S3_CODE=no-upload-id; echo "$S3_CODE"; return 1; }
    for part in "$@"; do
        n=$((n + 1))
        s3_put "$key?partNumber=$n&uploadId=$id" "$part" >/dev/null
        [[ $S3_CODE == 200 ]] || { echo "$S3_CODE"; return 1; }
        etag=$(tr -d '\r' <"$TMP/s3.out.headers" | grep -i '^etag:' | cut -d' ' -f2-)
        xml+="<Part><PartNumber>$n</PartNumber><ETag>$etag</ETag></Part>"
    done
    xml+="</CompleteMultipartUpload>"
    printf '%s' "$xml" >"$TMP/s3.complete.xml"
    s3_send POST "$key?uploadId=$id" "$TMP/s3.complete.xml" -H 'Content-Type: application/xml'
}
