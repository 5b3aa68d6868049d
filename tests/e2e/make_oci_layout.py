#!/usr/bin/env python3
"""Write a small OCI image layout for the e2e tests.

Usage: make_oci_layout.py LAYOUT_DIR TAG [BIG_LAYER_BYTES]
                          [--layers N] [--platforms OS/ARCH[,OS/ARCH...]]

By default the image is a single-platform (linux/amd64) manifest with a
config blob and two gzip'd tar layers:
  * a small layer with a few text files and a little random data;
  * a large layer holding one file of BIG_LAYER_BYTES (default 3 MiB) of
    random bytes.
--layers N (N >= 2) puts N - 2 more small layers between those two.
--platforms makes one such image per platform and tags an OCI image index
(multi-arch image) listing them instead of a single manifest.
Content is random on every run, so blobs never collide with earlier runs or
with another image made by this script.  No Docker is needed.

On stdout it prints a JSON summary:
  {"manifest": "sha256:..." (the tagged manifest, or the index),
   "config": "sha256:...", "layers": [...]  (the first platform's image),
   "blobs": [every config and layer digest],
   "platforms": {"linux/amd64": {"manifest": ..., "config": ...,
                                 "layers": [...]}, ...}}
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
    args = sys.argv[1:]
    layers_n, platforms = 2, None
    positional = []
    i = 0
    try:
        while i < len(args):
            if args[i] == "--layers":
                layers_n = int(args[i + 1])
                i += 2
            elif args[i] == "--platforms":
                platforms = [p for p in args[i + 1].split(",") if p]
                i += 2
            else:
                positional.append(args[i])
                i += 1
    except (IndexError, ValueError):
        print(__doc__, file=sys.stderr)
        return 2
    if len(positional) not in (2, 3) or layers_n < 2 or platforms == []:
        print(__doc__, file=sys.stderr)
        return 2
    layout, tag = positional[0], positional[1]
    big = int(positional[2]) if len(positional) == 3 else 3 * 1024 * 1024

    blobs_dir = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs_dir, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        with open(os.path.join(blobs_dir, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return digest

    def image(os_name: str, arch: str) -> dict:
        nonce = os.urandom(8).hex()
        tars = [make_tar([
            ("etc/e2e/hello.txt", f"hello from the stowage e2e test {nonce}\n".encode()),
            ("etc/e2e/tag", f"{tag}\n".encode()),
            ("etc/e2e/platform", f"{os_name}/{arch}\n".encode()),
            ("usr/share/e2e/random.bin", os.urandom(64 * 1024)),
        ])]
        for n in range(layers_n - 2):
            tars.append(make_tar([
                (f"usr/share/e2e/layer{n + 2}.bin", os.urandom(16 * 1024 + n)),
            ]))
        tars.append(make_tar([("data/big.bin", os.urandom(big))]))

        layers = []
        diff_ids = []
        for n, raw in enumerate(tars):
            level = 1 if n == len(tars) - 1 else 6
            gz = gzip.compress(raw, compresslevel=level, mtime=0)
            layers.append({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(gz),
                "size": len(gz),
            })
            diff_ids.append(sha256(raw))

        config = json.dumps({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": os_name,
            "config": {"Env": ["E2E_NONCE=" + nonce], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "make_oci_layout.py"}] * len(tars),
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
        return {
            "manifest": put(manifest),
            "size": len(manifest),
            "config": config_desc["digest"],
            "layers": [l["digest"] for l in layers],
        }

    if platforms is None:
        images = {"linux/amd64": image("linux", "amd64")}
        first = images["linux/amd64"]
        top = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": first["manifest"],
            "size": first["size"],
        }
    else:
        images = {}
        for p in platforms:
            os_name, _, arch = p.partition("/")
            images[p] = image(os_name, arch)
        index = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": images[p]["manifest"],
                "size": images[p]["size"],
                "platform": {"os": p.partition("/")[0], "architecture": p.partition("/")[2]},
            } for p in platforms],
        }, indent=2).encode()
        top = {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": put(index),
            "size": len(index),
        }
        first = images[platforms[0]]

    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({
            "schemaVersion": 2,
            "manifests": [dict(top, annotations={"org.opencontainers.image.ref.name": tag})],
        }, f)

    blobs = []
    for img in images.values():
        blobs += [img["config"]] + img["layers"]
    json.dump({
        "manifest": top["digest"],
        "config": first["config"],
        "layers": first["layers"],
        "blobs": blobs,
        "platforms": {p: {k: img[k] for k in ("manifest", "config", "layers")} for p, img in images.items()},
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
