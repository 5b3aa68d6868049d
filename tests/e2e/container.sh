#!/usr/bin/env bash
# End-to-end check of the container image: built FROM scratch from the
# stowage binary under test (deploy/container/build-local.sh: the binary,
# exactly the libraries ldd names, CA certificates, user 65532), loaded into
# a dockerd of this test's own, run the way deploy/ runs it, and pulled
# through with skopeo from a loopback docker-registry. Must run as root.
#
#   1. docker-registry (plain) on loopback, seeded with library/e2eimage:1.0
#      (make_oci_layout.py + skopeo);
#   2. containerd + dockerd (vfs, no bridge, no iptables) under the temp dir;
#      build-local.sh builds stowage:e2e into it;
#   3. the image: user 65532, entrypoint, the cache volume; its files are the
#      binary, exactly the libraries ldd names (no other .so), CA bundle,
#      passwd/group, the baked config; `--version` and `check-config` of the
#      baked config run inside it;
#   4. a container with --network host (no bridge here), --read-only,
#      --cap-drop ALL, no-new-privileges, the cache on a named volume and
#      deploy/container/stowage.toml with loopback addresses and the upstream
#      URL mounted over the baked config: /readyz says ready, the process
#      runs as 65532, skopeo pulls (digest and blobs checked, one upstream GET
#      per blob), a second pull makes no upstream GET, /metrics counts what
#      the upstream logged, the blobs are on the volume owned by 65532;
#   5. docker stop: SIGTERM, exit status 0; docker start: ready again and the
#      cache survived on the volume (a pull with no upstream GET);
#   6. cluster mode: two more containers as one cache (peers on loopback): a
#      pull through each costs one upstream GET per blob.
#
# Usage: tests/e2e/container.sh            (as root)
# Environment:
#   STOWAGE_BIN  stowage binary (default: cargo build --bin stowage, then
#                target/debug/stowage)
#   KEEP_TMP=1   keep the temp dir (logs, configs, image context)
# Prints PASS/FAIL lines and a closing "e2e: N passed, M failed" line; exits
# non-zero if any check failed.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
e2e_init container

need_root "it starts dockerd and containerd"
need_tools dockerd containerd ctr runc containerd-shim-runc-v2 skopeo docker-registry jq curl ldd sha256sum \
    timeout tar "$DOCKER" "$PY"
stowage_bin
IMAGE=stowage:e2e
NAME="stowage-e2e-$$"
VOLUME="stowage-e2e-cache-$$"
mkdir -p "$TMP/out"

# ---------------------------------------------------------------- upstream
start_registry up
UPSTREAM=${REG_ADDR[up]}
seed_image img "$UPSTREAM" library/e2eimage 1.0 1048576 --layers 3
pass "upstream docker-registry seeded with library/e2eimage:1.0 (${MANIFEST[img]})"

# ---------------------------------------------------------------- image
start_dockerd "{}"
if run_logged 600 "$TMP/build.log" "$ROOT/deploy/container/build-local.sh" --binary "$STOWAGE_BIN" \
    --context "$TMP/image" --tag "$IMAGE"; then
    pass "build-local.sh built $IMAGE FROM scratch: $(grep -o 'built .*' "$TMP/build.log")"
else
    die "deploy/container/build-local.sh failed"
fi

cfg=$("$DOCKER" image inspect --format '{{json .Config}}' "$IMAGE")
got=$(jq -c '[.User, .Entrypoint, .Cmd, (.Volumes | keys), (.ExposedPorts | keys)]' <<<"$cfg")
want='["65532:65532",["/usr/local/bin/stowage"],["--config","/etc/stowage/stowage.toml"],["/var/cache/stowage"],["5000/tcp","9090/tcp"]]'
if [[ $got == "$want" ]]; then
    pass "image config: user 65532, entrypoint stowage --config /etc/stowage/stowage.toml, volume /var/cache/stowage, ports 5000 and 9090"
else
    fail "image config is $got, want $want"
fi

# The image's files, from docker export of a created (never started) container.
"$DOCKER" create --name "$NAME-files" "$IMAGE" >/dev/null || die "docker create $IMAGE failed"
"$DOCKER" export "$NAME-files" | tar --numeric-owner -tvf - >"$TMP/image-files.txt" || die "docker export of $IMAGE failed"
"$DOCKER" rm "$NAME-files" >/dev/null
# ldd of the binary under test names these (the loader included).
want_libs=$(ldd "$STOWAGE_BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sed 's#^/##' | sort -u | tr '\n' ' ')
got_libs=$(awk '{ print $6 }' "$TMP/image-files.txt" | grep -E '\.so(\.|$)' | sort -u | tr '\n' ' ')
if [[ -n $want_libs && $got_libs == "$want_libs" ]]; then
    pass "the image's shared libraries are exactly those ldd names: $got_libs"
else
    fail "the image has libraries [$got_libs], ldd names [$want_libs]"
fi
missing=""
for f in usr/local/bin/stowage etc/ssl/certs/ca-certificates.crt etc/passwd etc/group etc/stowage/stowage.toml; do
    grep -qE " $f\$" "$TMP/image-files.txt" || missing+=" $f"
done
shells=$(grep -E '/(sh|bash|busybox)$' "$TMP/image-files.txt" || true)
if grep -qE '^d.* 65532/65532 .* var/cache/stowage/?$' "$TMP/image-files.txt" && [[ -z $missing && -z $shells ]]; then
    pass "the image has the binary, CA bundle, passwd/group, baked config, /var/cache/stowage owned by 65532, and no shell"
else
    fail "image files: missing [$missing], shells [$shells], /var/cache/stowage: $(grep -E 'var/cache' "$TMP/image-files.txt" | tr '\n' ' ')"
fi

out=$("$DOCKER" run --rm --network none "$IMAGE" --version 2>&1 || true)
if [[ $out == "stowage $("$STOWAGE_BIN" --version | awk '{print $2}')" ]]; then
    pass "docker run $IMAGE --version: '$out' (the binary runs on the copied libraries alone)"
else
    fail "docker run $IMAGE --version printed: $out"
fi
out=$("$DOCKER" run --rm --network none "$IMAGE" check-config /etc/stowage/stowage.toml 2>&1 || true)
if [[ $out == "/etc/stowage/stowage.toml: ok"* ]]; then
    pass "check-config of the baked /etc/stowage/stowage.toml inside the image: $out"
else
    fail "check-config of the baked config inside the image: $out"
fi

# ---------------------------------------------------------------- container
# deploy/container/stowage.toml with loopback addresses (host network) and
# the test's upstream as docker.io.
read -r P_REG P_ADMIN < <(free_ports 2)
STOWAGE="127.0.0.1:$P_REG"
ADMIN="127.0.0.1:$P_ADMIN"
# derive_config OUT LISTEN ADMIN: the baked config with these addresses.
derive_config() {
    "$PY" - "$ROOT/deploy/container/stowage.toml" "$1" "$2" "$3" "http://$UPSTREAM" <<'EOF'
import sys, tomllib
src, dst, listen, admin, url = sys.argv[1:6]
text = open(src).read()
cfg = tomllib.loads(text)
assert cfg["upstream"][0]["host"] == "docker.io", cfg["upstream"]
for key, old, new in (("listen", cfg["listen"], listen), ("admin_listen", cfg["admin_listen"], admin),
                      ("url", cfg["upstream"][0]["url"], url)):
    line = f'{key} = "{old}"'
    assert text.count(line) == 1, line
    text = text.replace(line, f'{key} = "{new}"')
open(dst, "w").write(text)
EOF
}
derive_config "$TMP/container.toml" "$STOWAGE" "$ADMIN" ||
    die "could not derive the container's config from deploy/container/stowage.toml"
chmod 644 "$TMP/container.toml"
"$DOCKER" volume create "$VOLUME" >/dev/null || die "docker volume create failed"
on_exit "\"\$DOCKER\" rm -f \"$NAME\" >/dev/null 2>&1; \"\$DOCKER\" volume rm \"$VOLUME\" >/dev/null 2>&1"
add_log "$TMP/container.log" "container log (docker logs)" 40
on_exit "\"\$DOCKER\" logs \"$NAME\" >\"$TMP/container.log\" 2>&1"
RUN_ARGS=(--name "$NAME" --network host --read-only --cap-drop ALL --security-opt no-new-privileges
    -v "$VOLUME:/var/cache/stowage" -v "$TMP/container.toml:/etc/stowage/stowage.toml:ro")
run_logged 60 "$TMP/run.log" "$DOCKER" run -d "${RUN_ARGS[@]}" "$IMAGE" || die "docker run of $IMAGE failed"

# wait_ready WHAT: /readyz answers 200 "ready" within 30 s.
wait_ready() {
    local i body=""
    for ((i = 0; i < 300; i++)); do
        body=$(curl -sf --max-time 2 "http://$ADMIN/readyz" 2>/dev/null || true)
        [[ $body == ready ]] && break
        [[ $("$DOCKER" inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null) == true ]] || break
        sleep 0.1
    done
    if [[ $body == ready ]]; then
        pass "$1: the container's /readyz on $ADMIN answers 200 ready"
    else
        "$DOCKER" logs "$NAME" >"$TMP/container.log" 2>&1 || true
        die "$1: the container's /readyz did not answer ready (state: $("$DOCKER" inspect --format '{{json .State}}' "$NAME" 2>&1 | cut -c1-300))"
    fi
}
wait_ready "docker run"

pid=$("$DOCKER" inspect --format '{{.State.Pid}}' "$NAME")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status" 2>/dev/null || true)
ro=$("$DOCKER" inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.NetworkMode}}' "$NAME")
if [[ $uids == "65532 65532 65532 65532" && $ro == "true host" ]]; then
    pass "stowage runs as uid 65532 (not root) on a read-only root filesystem, host network"
else
    fail "the container's process has uids '$uids'; read-only rootfs and network: '$ro'"
fi

# pull WHAT OUT: skopeo copy of e2eimage:1.0 through the container.
pull() {
    if run_logged 120 "$TMP/skopeo.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false \
        --authfile "$TMP/empty-auth.json" "docker://$STOWAGE/e2eimage:1.0" "oci:$2:1.0"; then
        pass "$1: skopeo copy through the container succeeded"
        check_layout "$1" "$2" 1.0 img
    else
        fail "$1: skopeo copy docker://$STOWAGE/e2eimage:1.0 failed"
    fi
}

M=$(reg_mark up)
pull "first pull" "$TMP/out/pull1"
d=$(skopeo_digest "docker://$STOWAGE/e2eimage:1.0" --authfile "$TMP/empty-auth.json")
if [[ $d == "${MANIFEST[img]}" ]]; then
    pass "skopeo inspect --raw through the container gives the upstream manifest digest"
else
    fail "manifest through the container has digest $d, upstream's is ${MANIFEST[img]}"
fi
reg_settle up
# shellcheck disable=SC2086
check_fetched_once "first pull" up "$M" library/e2eimage ${BLOBS[img]}
check_only_stowage "first pull" up "$M"

M=$(reg_mark up)
pull "second pull" "$TMP/out/pull2"
reg_settle up
n=$(reg_blob_gets up "$M")
if [[ $n -eq 0 ]]; then
    pass "second pull: no upstream blob GETs (served from the container's cache)"
else
    fail "second pull: $n upstream blob GETs (want 0)"
fi

logged=$(grep -cE '"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" 200 .*"stowage/[^"]*"$' "$(reg_log up)" || true)
counted=$(metric "$ADMIN" stowage_upstream_requests_total upstream=docker.io kind=blob status=200)
if [[ $counted == "$logged" && $logged -gt 0 ]]; then
    pass "metrics: stowage_upstream_requests_total{upstream=\"docker.io\",kind=\"blob\",status=\"200\"} = $counted, the upstream logged $logged blob GETs"
else
    fail "metrics: the container counted '$counted' upstream blob GETs, the upstream logged $logged"
fi

mp=$("$DOCKER" volume inspect --format '{{.Mountpoint}}' "$VOLUME")
bad=""
for d in ${BLOBS[img]}; do
    f=$(find "$mp" -type f -name "*${d#sha256:}*" 2>/dev/null | head -n 1)
    if [[ -z $f ]]; then
        bad+=" ${d:7:12}(absent)"
    elif [[ $(stat -c %u "$f") != 65532 || $(sha256sum <"$f" | cut -d' ' -f1) != "${d#sha256:}" ]]; then
        bad+=" ${d:7:12}(owner $(stat -c %u "$f"))"
    fi
done
if [[ -z $bad ]]; then
    pass "the image's $(wc -w <<<"${BLOBS[img]}") blobs are on the volume, owned by 65532, each hashing to its digest"
else
    fail "blobs on the volume $mp:$bad"
fi

"$DOCKER" logs "$NAME" >"$TMP/container.log" 2>&1 || true
if head -n 5 "$TMP/container.log" | jq -es 'length > 0 and all(.[]; has("level"))' >/dev/null 2>&1; then
    pass "the container logs JSON lines ([log] format = \"json\" of the baked config)"
else
    fail "the container's first log lines are not JSON: $(head -n 2 "$TMP/container.log" | cut -c1-200 | tr '\n' '|')"
fi

# ---------------------------------------------------------------- stop, start
start=$SECONDS
if run_logged 60 "$TMP/stop.log" "$DOCKER" stop -t 20 "$NAME"; then
    code=$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$NAME")
    if [[ $code == 0 ]]; then
        pass "docker stop: stowage exited 0 on SIGTERM after $((SECONDS - start))s"
    else
        fail "docker stop: stowage exited with status $code"
    fi
else
    fail "docker stop failed"
fi
run_logged 60 "$TMP/start.log" "$DOCKER" start "$NAME" || die "docker start failed"
wait_ready "docker start"
M=$(reg_mark up)
pull "pull after a restart" "$TMP/out/pull3"
reg_settle up
n=$(reg_blob_gets up "$M")
if [[ $n -eq 0 ]]; then
    pass "pull after a restart: no upstream blob GETs (the cache survived on the volume)"
else
    fail "pull after a restart: $n upstream blob GETs (want 0)"
fi

# ---------------------------------------------------------------- cluster mode
# Two more containers of the image acting as one cache (peers on loopback,
# host network): a pull through each costs one upstream GET per blob, the
# misses of the node that does not own a blob going to the one that does.
read -r CP1 CA1 CP2 CA2 < <(free_ports 4)
declare -A C_ADDR=([1]="127.0.0.1:$CP1" [2]="127.0.0.1:$CP2") C_ADMIN=([1]="127.0.0.1:$CA1" [2]="127.0.0.1:$CA2")
for i in 1 2; do
    derive_config "$TMP/cluster$i.toml" "${C_ADDR[$i]}" "${C_ADMIN[$i]}" ||
        die "could not derive the config of cluster node $i"
    cat >>"$TMP/cluster$i.toml" <<EOF

[cluster]
advertise = "http://${C_ADDR[$i]}"
peers = ["http://${C_ADDR[1]}", "http://${C_ADDR[2]}"]
EOF
    chmod 644 "$TMP/cluster$i.toml"
    "$DOCKER" volume create "$VOLUME-$i" >/dev/null || die "docker volume create failed"
    on_exit "\"\$DOCKER\" rm -f \"$NAME-$i\" >/dev/null 2>&1; \"\$DOCKER\" volume rm \"$VOLUME-$i\" >/dev/null 2>&1"
    run_logged 60 "$TMP/run$i.log" "$DOCKER" run -d --name "$NAME-$i" --network host --read-only --cap-drop ALL \
        --security-opt no-new-privileges -v "$VOLUME-$i:/var/cache/stowage" \
        -v "$TMP/cluster$i.toml:/etc/stowage/stowage.toml:ro" "$IMAGE" || die "docker run of cluster node $i failed"
done
for i in 1 2; do
    wait_http "http://${C_ADMIN[$i]}/readyz" "" 30 || die "cluster node $i did not answer /readyz"
done
M=$(reg_mark up)
for i in 1 2; do
    if run_logged 120 "$TMP/skopeo.log" skopeo --insecure-policy copy --quiet --src-tls-verify=false \
        --authfile "$TMP/empty-auth.json" "docker://${C_ADDR[$i]}/e2eimage:1.0" "oci:$TMP/out/cluster$i:1.0"; then
        check_layout "cluster: pull through container node $i" "$TMP/out/cluster$i" 1.0 img
    else
        fail "cluster: skopeo copy through container node $i failed"
    fi
done
reg_settle up
# shellcheck disable=SC2086
check_fetched_once "cluster: one pull through each of two containers" up "$M" library/e2eimage ${BLOBS[img]}
hops=$(($(metric "${C_ADMIN[1]}" stowage_owner_hops_total) + $(metric "${C_ADMIN[2]}" stowage_owner_hops_total)))
if [[ $hops -ge 1 ]]; then
    pass "cluster: the containers asked each other $hops time(s) (stowage_owner_hops_total)"
else
    fail "cluster: no owner hop counted between the containers"
fi
