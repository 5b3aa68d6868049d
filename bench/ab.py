#!/usr/bin/env python3
"""A/B of two stowage builds on the scenarios a fill or a blob read change
moves: the cold 128 MiB blob (GB/s and server CPU, nginx's proxy_cache in
the same rounds for reference) and warm blobs over TLS (server CPU per GiB);
with `--scenario manifests`, wrk on a cached manifest by digest and by tag,
access logs on (req/s and server CPU per request, nginx alongside).
Rounds alternate the order of the two builds; medians are printed with the
values of every round. It reuses bench.py's upstream, images, mirrors and
load client, so it needs what bench/run.sh installs and builds:

    python3 bench/ab.py --old OLD_BIN --new NEW_BIN \\
        --client target/bench-client/release/bench-client [--rounds 5] \\
        [--scenario blobs|manifests]

Each round starts every mirror from a cold cache; about 25 s per round here.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="stowage binary A")
    ap.add_argument("--new", required=True, help="stowage binary B")
    ap.add_argument("--client", required=True, help="bench-client binary")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scenario", choices=["blobs", "manifests"], default="blobs")
    ap.add_argument("--wrk-seconds", type=int, default=5)
    ap.add_argument("--no-warmup", action="store_true",
                    help="do not touch the free memory (see bench.warm_free_memory())")
    a = ap.parse_args()
    bins = {"old": a.old, "new": a.new}
    args = types.SimpleNamespace(client=a.client, verify="cmp", warm_requests=32, warm_concurrency=8,
                                 perf=None, scale=1, wrk_seconds=a.wrk_seconds,
                                 no_warmup=a.no_warmup, smoke=False)
    work = tempfile.mkdtemp(prefix="stowage-ab.")
    up = bench.Upstream(work)
    try:
        images = bench.seed(work, up, 1)
        os.sync()
        bench.warm_free_memory(args)
        b = bench.Bench(args, work, images, up)
        b.tls = bench.make_tls(work)
        mirror = lambda k: (lambda d: bench.Nginx(up, d) if k == "nginx" else bench.Stowage(bins[k], up, d))
        if a.scenario == "manifests":
            names = ["manifest_digest_rps", "manifest_digest_cpu_us", "manifest_tag_rps", "manifest_tag_cpu_us"]
            res = {k: {n: [] for n in names} for k in ("old", "new", "nginx")}
            for r, k in rounds(a.rounds):
                out = measured(work, "w-%s-%d" % (k, r), mirror(k), lambda m, out: bench.manifests(b, m, out))
                for n in names:
                    res[k][n].append(out[n])
            return report(res)
        blob = images["large"]["layers"][2]
        cold_warm = lambda m, out: bench.cold_warm(b, m, "", blob, "bench/large", out, None)
        res = {k: {"cold_gbps": [], "cold_cpu_s": [], "tls_warm_cpu_s_per_gib": []}
               for k in ("old", "new", "nginx")}
        for r, k in rounds(a.rounds):
            out = measured(work, "m-%s-%d" % (k, r), mirror(k), cold_warm)
            res[k]["cold_gbps"].append(out["cold_gbps"])
            res[k]["cold_cpu_s"].append(out["cold_cpu_s"])
            if k != "nginx":
                tls = lambda d: bench.Stowage(bins[k], up, d, tls=b.tls)
                out = measured(work, "t-%s-%d" % (k, r), tls, cold_warm)
                res[k]["tls_warm_cpu_s_per_gib"].append(out["warm_cpu_s_per_gib"])
        report(res)
    finally:
        up.svc.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(res):
    for k, metrics in res.items():
        for name, vals in metrics.items():
            if vals:
                print("%-5s %-24s median %.3f  rounds %s" % (k, name, statistics.median(vals), vals))


def rounds(n):
    """(round, mirror) in the order they run: the two builds alternate which
    goes first, nginx last."""
    for r in range(n):
        for k in (["old", "new", "nginx"] if r % 2 == 0 else ["new", "old", "nginx"]):
            yield r, k


def measured(work, name, make, run):
    """Starts a mirror from a cold cache in work/name (make(dir)), has
    run(mirror, out) fill out, stops the mirror and removes its files;
    returns out."""
    d = os.path.join(work, name)
    m = make(d)
    try:
        out = {}
        run(m, out)
        return out
    finally:
        m.stop()
        shutil.rmtree(d, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
