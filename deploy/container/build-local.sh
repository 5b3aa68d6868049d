#!/usr/bin/env bash
# Builds a stowage container image FROM scratch out of a stowage binary built
# on this machine, with the local dockerd: no base image and no network, so
# it works where `docker build -f deploy/container/Containerfile` cannot (CI
# has no registry to pull rust:bookworm or distroless from).
#
# The build context (see Containerfile.scratch) gets:
#   rootfs/usr/local/bin/stowage            the binary (debug info stripped
#                                           unless --no-strip)
#   rootfs/<path>                           every shared library `ldd` names
#                                           for it, and the loader, at the
#                                           paths ldd prints (symlinks
#                                           resolved)
#   rootfs/etc/ssl/certs/ca-certificates.crt  the host's CA bundle
#   rootfs/etc/passwd, group, nsswitch.conf root and stowage (65532), no shell
#   rootfs/etc/stowage/stowage.toml         deploy/container/stowage.toml
#   rootfs/tmp                              (1777)
#   cache/                                  /var/cache/stowage, owned by 65532
#   libs.txt                                the libraries copied, one a line
#
# Usage:
#   deploy/container/build-local.sh [--binary PATH] [--tag TAG] [--context DIR]
#                                   [--no-strip] [--no-build]
#     --binary   stowage binary (default target/release/stowage)
#     --tag      image name (default stowage:local)
#     --context  where to assemble the context (default: a temp dir, removed
#                after the build); it must not exist or be empty
#     --no-build assemble the context only (implies keeping it)
# Environment: DOCKER (default docker), DOCKER_HOST as usual.
# The build runs with --network host: the dockerd CI starts has no bridge.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DOCKER=${DOCKER:-docker}

BIN="$ROOT/target/release/stowage"
TAG=stowage:local
CTX=""
STRIP=1
BUILD=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --binary) BIN=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --context) CTX=$2; shift 2 ;;
        --no-strip) STRIP=0; shift ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-local.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "build-local.sh: $*" >&2; exit 1; }

[[ -x "$BIN" ]] || die "no stowage binary at $BIN (cargo build --release, or pass --binary)"
command -v ldd >/dev/null || die "ldd not found"
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || die "/etc/ssl/certs/ca-certificates.crt missing (apt-get install ca-certificates)"

KEEP_CTX=1
if [[ -z "$CTX" ]]; then
    CTX=$(mktemp -d "${TMPDIR:-/tmp}/stowage-image.XXXXXX")
    [[ $BUILD -eq 1 ]] && KEEP_CTX=0
elif [[ -e "$CTX" && -n "$(ls -A "$CTX")" ]]; then
    die "context directory $CTX is not empty"
fi
cleanup() { [[ $KEEP_CTX -eq 1 ]] || rm -rf "$CTX"; }
trap cleanup EXIT

R="$CTX/rootfs"
mkdir -p "$R/usr/local/bin" "$R/etc/ssl/certs" "$R/etc/stowage" "$R/tmp" "$CTX/cache"
chmod 1777 "$R/tmp"
chmod 0750 "$CTX/cache"

# ---- the binary
if [[ $STRIP -eq 1 ]] && command -v strip >/dev/null; then
    strip --strip-debug -o "$R/usr/local/bin/stowage" "$BIN"
else
    cp "$BIN" "$R/usr/local/bin/stowage"
fi
chmod 0755 "$R/usr/local/bin/stowage"

# ---- exactly the libraries ldd names, and the loader
# ldd prints "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", the
# loader as "/lib64/ld-linux-x86-64.so.2 (0x...)", the vDSO without a path;
# a static binary gets "not a dynamic executable" or "statically linked".
: >"$CTX/libs.txt"
if ldd_out=$(ldd "$BIN" 2>&1); then
    if grep -q 'not found' <<<"$ldd_out"; then
        die "ldd cannot resolve every library of $BIN: $(grep 'not found' <<<"$ldd_out" | tr '\n' ' ')"
    fi
    while read -r lib; do
        [[ -n "$lib" ]] || continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
        echo "$lib" >>"$CTX/libs.txt"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out" | sort -u)
elif ! grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out"; then
    die "ldd $BIN failed: $ldd_out"
fi

# ---- CA certificates, users, name service, configuration
cp -L /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
stowage:x:65532:65532:stowage:/var/cache/stowage:/sbin/nologin
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
stowage:x:65532:
EOF
# glibc's resolver reads it; the files and dns modules are built into libc.
echo 'hosts: files dns' >"$R/etc/nsswitch.conf"
cp "$HERE/stowage.toml" "$R/etc/stowage/stowage.toml"
chmod 0644 "$R/etc/passwd" "$R/etc/group" "$R/etc/nsswitch.conf" "$R/etc/stowage/stowage.toml" \
    "$R/etc/ssl/certs/ca-certificates.crt"
cp "$HERE/Containerfile.scratch" "$CTX/Containerfile"

echo "build-local.sh: context $CTX: $(du -sh "$CTX" | cut -f1), libraries: $(tr '\n' ' ' <"$CTX/libs.txt")"
[[ $BUILD -eq 1 ]] || exit 0

# The legacy builder: BuildKit needs the buildx plugin, which Debian's
# docker.io does not ship, and this build has no RUN step anyway.
DOCKER_BUILDKIT=0 "$DOCKER" build --quiet --network host -f "$CTX/Containerfile" -t "$TAG" "$CTX" >/dev/null
echo "build-local.sh: built $TAG ($("$DOCKER" image inspect --format '{{.Id}} {{.Size}} bytes' "$TAG"))"
