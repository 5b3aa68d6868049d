#!/usr/bin/env python3
"""Write a small single-platform OCI image layout for the e2e tests.

Usage: make_oci_layout.py LAYOUT_DIR TAG [BIG_LAYER_BYTES]

The image has a config blob and two gzip'd tar layers:
  * a small layer with a few text files and a little random data;
  * a large layer holding one file of BIG_LAYER_BYTES (default 3 MiB) of
    random bytes.
Content is random on every run, so blobs never collide with earlier runs or
with another image made by this script.  No Docker is needed.

On stdout it prints a JSON summary:
  {"manifest": "sha256:...", "config": "sha256:...", "layers": [...],
   "blobs": [every blob digest]}
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for name, _ in files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1700000000
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    layout, tag = sys.argv[1], sys.argv[2]
    big = int(sys.argv[3]) if len(sys.argv) == 4 else 3 * 1024 * 1024

    blobs_dir = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs_dir, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        with open(os.path.join(blobs_dir, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return digest

    nonce = os.urandom(8).hex()
    small_tar = make_tar([
        ("etc/e2e/hello.txt", f"hello from the stowage e2e test {nonce}\n".encode()),
        ("etc/e2e/tag", f"{tag}\n".encode()),
        ("usr/share/e2e/random.bin", os.urandom(64 * 1024)),
    ])
    big_tar = make_tar([("data/big.bin", os.urandom(big))])

    layers = []
    diff_ids = []
    for raw, level in ((small_tar, 6), (big_tar, 1)):
        gz = gzip.compress(raw, compresslevel=level, mtime=0)
        layers.append({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(gz),
            "size": len(gz),
        })
        diff_ids.append(sha256(raw))

    config = json.dumps({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["E2E_NONCE=" + nonce], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "make_oci_layout.py"}] * 2,
    }, sort_keys=True).encode()
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": put(config),
        "size": len(config),
    }

    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
    }, indent=2).encode()
    manifest_digest = put(manifest)

    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }, f)

    json.dump({
        "manifest": manifest_digest,
        "config": config_desc["digest"],
        "layers": [l["digest"] for l in layers],
        "blobs": [config_desc["digest"]] + [l["digest"] for l in layers],
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
