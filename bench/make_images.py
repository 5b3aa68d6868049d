#!/usr/bin/env python3
"""Write the benchmark's OCI image layouts (a bench/ variant of
tests/e2e/make_oci_layout.py that streams large layers to disk instead of
building them in memory).

Usage: make_images.py OUT_DIR [--scale DIVISOR]

Makes one OCI layout per image under OUT_DIR/<name>/, tag "v1":
  large  config + a small layer + layers of 32, 128 and 256 MiB random data
  small  config + one small layer (the manifest scenarios)
  many   config + 40 small layers (the whole-image scenario)
  huge   config + one 1 GiB layer (the memory scenario)
  procs  config + one 256 MiB layer (the storm of separate curl processes)
  dist   config + 16 layers of 2 MiB (the distant-upstream pulls)
--scale N divides the big layer sizes by N (smoke runs: --scale 64; the
2 MiB layers of `dist` become 32 KiB).
Big layers are a tar holding one random file, gzip'd at level 0 (stored
blocks: valid gzip, no time wasted compressing random bytes).
Content is random on every run.

Prints a JSON summary on stdout:
  {"images": {"large": {"layout": DIR, "manifest": "sha256:...",
                        "layers": [{"digest": ..., "size": ..., "path": ...}, ...],
                        "config": {...}}, ...}}
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MiB = 1024 * 1024


class HashingFile:
    """A write-only file that hashes and counts what goes through."""

    def __init__(self, path):
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


class RandomReader(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left, 4 * MiB)
        if k <= 0:
            return 0
        b[:k] = os.urandom(k)
        self.left -= k
        return k


def layer_file(blobs_dir, name, size, compresslevel):
    """A gzip'd tar with one file of `size` random bytes, written to a temp
    file and renamed to its digest. Returns (descriptor, diff_id)."""
    tmp = os.path.join(blobs_dir, ".tmp-%s" % os.urandom(6).hex())
    out = HashingFile(tmp)
    diff = hashlib.sha256()

    class DiffTee:
        def __init__(self, gz):
            self.gz = gz

        def write(self, b):
            diff.update(b)
            return self.gz.write(b)

        def flush(self):
            pass

        def tell(self):
            return 0

    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
        tee = DiffTee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BufferedReader(RandomReader(size), 4 * MiB))
    out.close()
    digest = "sha256:" + out.h.hexdigest()
    path = os.path.join(blobs_dir, out.h.hexdigest())
    os.rename(tmp, path)
    return {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest,
        "size": out.n,
        "path": path,
    }, "sha256:" + diff.hexdigest()


def put(blobs_dir, data):
    hexd = hashlib.sha256(data).hexdigest()
    path = os.path.join(blobs_dir, hexd)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + hexd, path


def image(out_dir, name, layer_sizes):
    layout = os.path.join(out_dir, name)
    blobs_dir = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs_dir, exist_ok=True)
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        big = size >= MiB
        desc, diff_id = layer_file(blobs_dir, "data/layer%d.bin" % i, size, 0 if big else 6)
        layers.append(desc)
        diff_ids.append(diff_id)
    nonce = os.urandom(8).hex()
    config = json.dumps({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["BENCH_NONCE=" + nonce], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "bench/make_images.py"}] * len(layers),
    }, sort_keys=True).encode()
    config_digest, config_path = put(blobs_dir, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{k: l[k] for k in ("mediaType", "digest", "size")} for l in layers],
    }, indent=2).encode()
    manifest_digest, _ = put(blobs_dir, manifest)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }]}, f)
    return {
        "layout": layout,
        "manifest": manifest_digest,
        "config": {"digest": config_digest, "size": len(config), "path": config_path},
        "layers": layers,
    }


def main():
    args = sys.argv[1:]
    scale = 1
    if "--scale" in args:
        i = args.index("--scale")
        scale = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1 or scale < 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = args[0]
    os.makedirs(out, exist_ok=True)
    big = lambda mib: max(MiB, mib * MiB // scale)
    images = {
        "large": image(out, "large", [64 * 1024, big(32), big(128), big(256)]),
        "small": image(out, "small", [64 * 1024]),
        "many": image(out, "many", [16 * 1024 + 97 * n for n in range(40)]),
        "huge": image(out, "huge", [big(1024)]),
        "procs": image(out, "procs", [big(256)]),
        "dist": image(out, "dist", [max(16 * 1024, 2 * MiB // scale)] * 16),
    }
    json.dump({"images": images}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
