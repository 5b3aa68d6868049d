#!/usr/bin/env python3
"""Side-by-side benchmark of stowage, distribution's proxy mode and an nginx
proxy_cache mirror (issue 6). Run through bench/run.sh, which installs the
tools and builds the binaries; see bench/README.md.

Everything runs on loopback: one upstream (Debian's docker-registry,
filesystem storage) seeded with generated images, and each mirror started
from an empty cache for every run. Prints one table (a column per mirror, a
row per metric, medians over --runs) with the issue's targets checked for
stowage, and writes it as JSON (bench/results/<date>.json) and Markdown.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# ------------------------------------------------------------------ processes

def proc_tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pids, key):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Service:
    """A server process with its logs in `dir`."""

    def __init__(self, name, argv, dir, env=None):
        self.name, self.argv, self.dir = name, argv, dir
        os.makedirs(dir, exist_ok=True)
        self.out = open(os.path.join(dir, "stdout.log"), "wb")
        self.err = open(os.path.join(dir, "stderr.log"), "wb")
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(argv, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL,
                                  env=e, start_new_session=True)

    def pids(self):
        return proc_tree(self.p.pid)

    def wait_http(self, url, secs=30, cafile=None):
        ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        end = time.time() + secs
        while time.time() < end:
            if self.p.poll() is not None:
                raise RuntimeError("%s exited with %s; stderr: %s" % (self.name, self.p.returncode, self.tail()))
            try:
                urllib.request.urlopen(url, timeout=2, context=ctx).read()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("%s did not answer %s within %ss: %s" % (self.name, url, secs, self.tail()))

    def tail(self):
        try:
            with open(os.path.join(self.dir, "stderr.log"), "rb") as f:
                return f.read()[-1500:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.out.close()
        self.err.close()


# ------------------------------------------------------------------ upstream

class Upstream:
    def __init__(self, work):
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.url = "http://" + self.addr
        self.dir = os.path.join(work, "upstream")
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write("""version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s/data
  delete:
    enabled: true
http:
  addr: %s
  secret: stowage-bench-not-a-secret
""" % (self.dir, self.addr))
        self.svc = Service("upstream docker-registry", ["docker-registry", "serve", cfg], self.dir)
        self.svc.wait_http(self.url + "/v2/")
        # distribution writes its access log (combined format) to stdout.
        self.access = os.path.join(self.dir, "stdout.log")

    def mark(self):
        return os.path.getsize(self.access)

    def settle(self, quiet=0.7, limit=20):
        """Wait until the access log has stopped growing (a line is written
        when a response has been sent)."""
        prev, still, end = self.mark(), time.time(), time.time() + limit
        while time.time() < end:
            time.sleep(0.1)
            cur = self.mark()
            if cur != prev:
                prev, still = cur, time.time()
            elif time.time() - still >= quiet:
                return

    def lines_since(self, mark):
        with open(self.access, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace").splitlines()

    def count(self, mark, pattern):
        rx = re.compile(pattern)
        return sum(1 for l in self.lines_since(mark) if rx.search(l))


# ------------------------------------------------------------------ mirrors

class Mirror:
    cafile = None
    scheme = "http"

    @property
    def base(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def pids(self):
        return self.svc.pids()

    def stop(self):
        self.svc.stop()


class Stowage(Mirror):
    def __init__(self, bin, upstream, dir, tls=None):
        self.port = free_port()
        self.dir = dir
        argv = [bin, "--listen", "127.0.0.1:%d" % self.port, "--upstream", upstream.url,
                "--cache-dir", os.path.join(dir, "cache"), "--admin-listen", "off", "--max-size", "200GiB"]
        if tls:
            argv += ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
            self.scheme, self.cafile = "https", tls["ca"]
        self.svc = Service("stowage", argv, dir, env={"NO_COLOR": "1"})
        self.svc.wait_http(self.base + "/v2/", cafile=self.cafile)


class Distribution(Mirror):
    def __init__(self, upstream, dir):
        self.port = free_port()
        os.makedirs(os.path.join(dir, "data"), exist_ok=True)
        cfg = os.path.join(dir, "config.yml")
        with open(cfg, "w") as f:
            f.write("""version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s/data
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
http:
  addr: 127.0.0.1:%d
  secret: stowage-bench-not-a-secret
proxy:
  remoteurl: %s
""" % (dir, self.port, upstream.url))
        self.svc = Service("distribution proxy", ["docker-registry", "serve", cfg], dir)
        self.svc.wait_http(self.base + "/v2/")


class Nginx(Mirror):
    def __init__(self, upstream, dir):
        self.port = free_port()
        for d in ("cache", "tmp"):
            os.makedirs(os.path.join(dir, d), exist_ok=True)
        with open(os.path.join(HERE, "nginx.conf.in")) as f:
            conf = f.read()
        conf = (conf.replace("@DIR@", dir).replace("@UPSTREAM@", upstream.addr)
                .replace("@LISTEN@", "127.0.0.1:%d" % self.port)
                .replace("@WORKERS@", str(os.cpu_count() or 2)))
        path = os.path.join(dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.svc = Service("nginx", [nginx, "-p", dir, "-c", path, "-e", os.path.join(dir, "error.log")], dir)
        self.svc.wait_http(self.base + "/v2/")


# ------------------------------------------------------------------ clients

class Bench:
    def __init__(self, args, work, images, upstream):
        self.args, self.work, self.images, self.up = args, work, images, upstream
        self.client = args.client
        self.seq = 0

    def fetch(self, base, repo, blob, n, c, sync=False, cafile=None):
        url = "%s/v2/%s/blobs/%s" % (base, repo, blob["digest"])
        argv = [self.client, "--url", url, "--requests", str(n), "--concurrency", str(c),
                "--expect", blob["path"], "--verify", self.args.verify, "--timeout", "600"]
        if self.args.verify == "sha256":
            argv += ["--digest", blob["digest"]]
        if sync:
            argv.append("--sync")
        if cafile:
            argv += ["--cacert", cafile]
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)
        try:
            out = json.loads(p.stdout)
        except ValueError:
            raise RuntimeError("bench-client failed (%s): %s" % (p.returncode, p.stderr.decode()[-800:]))
        if out["failed"]:
            log("  %d of %d requests failed: %s" % (out["failed"], out["requests"], out["first_error"]))
        return out

    def wrk(self, url):
        p = subprocess.run(["wrk", "-t2", "-c32", "-d%ds" % self.args.wrk_seconds, "--timeout", "10s",
                            "-s", os.path.join(HERE, "manifest.lua"), url],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        out = p.stdout.decode()
        m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errs = re.search(r"Socket errors:.*", out)
        if not m:
            raise RuntimeError("wrk: " + out[-500:])
        if bad or errs:
            log("  wrk %s: %s %s" % (url, bad.group(0) if bad else "", errs.group(0) if errs else ""))
        return float(m.group(1)), int(bad.group(1)) if bad else 0

    def get(self, url, accept=ACCEPT, cafile=None):
        ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        req = urllib.request.Request(url, headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return r.status, r.read()

    def skopeo(self, base, ref):
        self.seq += 1
        dest = os.path.join(self.work, "skopeo-out-%d" % self.seq)
        host = base.split("://", 1)[1]
        t = time.monotonic()
        p = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--retry-times", "0",
                            "--authfile", os.path.join(self.work, "auth.json"), "--src-tls-verify=false",
                            "docker://%s/%s" % (host, ref), "dir:" + dest],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                           env=dict(os.environ, TMPDIR=os.path.join(self.work, "skopeo-tmp")))
        secs = time.monotonic() - t
        shutil.rmtree(dest, ignore_errors=True)
        if p.returncode != 0:
            raise RuntimeError("skopeo copy: " + p.stdout.decode()[-600:])
        return secs


class Profiler:
    """perf record (cpu-clock, call graphs) of a server's processes while a
    scenario runs, when --perf DIR is given."""

    def __init__(self, outdir, name, pids):
        self.p = None
        if not outdir:
            return
        os.makedirs(outdir, exist_ok=True)
        self.data = os.path.join(outdir, name + ".perf.data")
        self.p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-g",
                                   "-p", ",".join(map(str, pids)), "-o", self.data],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        if not self.p:
            return
        self.p.send_signal(signal.SIGINT)
        self.p.wait(60)
        rep = self.data.replace(".perf.data", ".perf.txt")
        with open(rep, "w") as f:
            subprocess.run(["perf", "report", "-i", self.data, "--stdio", "--no-children",
                            "--percent-limit", "0.5", "-g", "none", "--sort", "dso,symbol"],
                           stdout=f, stderr=subprocess.DEVNULL)
        log("  profile: " + rep)


# ------------------------------------------------------------------ scenarios

def storm(b, m, prefix, blob, repo, res, perf_name=None):
    """32 clients at once ask for one uncached blob."""
    mark = b.up.mark()
    prof = Profiler(b.args.perf, perf_name, m.pids()) if perf_name else None
    cpu0 = cpu_seconds(m.pids())
    out = b.fetch(m.base, repo, blob, b.args.clients, b.args.clients, sync=True, cafile=m.cafile)
    cpu1 = cpu_seconds(m.pids())
    if prof:
        prof.stop()
    b.up.settle()
    res[prefix + "upstream_gets"] = b.up.count(mark, r'"GET /v2/%s/blobs/%s ' % (re.escape(repo), blob["digest"]))
    res[prefix + "ttfb_p50_ms"] = out["ttfb_p50_ms"]
    res[prefix + "ttfb_max_ms"] = out["ttfb_max_ms"]
    res[prefix + "wall_s"] = out["wall_s"]
    res[prefix + "verified"] = "%d/%d" % (out["ok"], out["requests"])
    res[prefix + "cpu_s"] = round(cpu1 - cpu0, 2)
    log("  %sstorm: %s upstream GETs, TTFB p50 %.1f ms max %.1f ms, wall %.2f s, %s verified" % (
        prefix, res[prefix + "upstream_gets"], out["ttfb_p50_ms"] or -1, out["ttfb_max_ms"] or -1,
        out["wall_s"], res[prefix + "verified"]))


def cold_warm(b, m, prefix, blob, repo, res, direct_gbps, perf_name=None):
    pids = m.pids()
    prof = Profiler(b.args.perf, perf_name + "-cold", pids) if perf_name else None
    cpu0 = cpu_seconds(pids)
    out = b.fetch(m.base, repo, blob, 1, 1, cafile=m.cafile)
    cpu1 = cpu_seconds(pids)
    if prof:
        prof.stop()
    res[prefix + "cold_gbps"] = out["gbps"] if out["ok"] == 1 else None
    res[prefix + "cold_cpu_s"] = round(cpu1 - cpu0, 3)
    res[prefix + "cold_last_read_ms"] = out["results"][0]["last_read_ms"]
    if direct_gbps and res[prefix + "cold_gbps"]:
        res[prefix + "cold_vs_direct"] = round(out["gbps"] / direct_gbps, 3)
    pids = m.pids()
    prof = Profiler(b.args.perf, perf_name + "-warm", pids) if perf_name else None
    cpu0 = cpu_seconds(pids)
    out = b.fetch(m.base, repo, blob, b.args.warm_requests, b.args.warm_concurrency, cafile=m.cafile)
    cpu1 = cpu_seconds(pids)
    if prof:
        prof.stop()
    ok = out["ok"] == out["requests"]
    res[prefix + "warm_gbps"] = out["gbps"] if ok else None
    res[prefix + "warm_cpu_s_per_gib"] = round((cpu1 - cpu0) / (out["bytes"] / GiB), 4) if ok else None
    res[prefix + "warm_verified"] = "%d/%d" % (out["ok"], out["requests"])
    log("  %scold %.3f GB/s; warm %.3f GB/s, %.3f CPU s/GiB (%s verified)" % (
        prefix, res[prefix + "cold_gbps"] or -1, out["gbps"], res[prefix + "warm_cpu_s_per_gib"] or -1,
        res[prefix + "warm_verified"]))


def manifests(b, m, res, perf_name=None):
    img = b.images["small"]
    by_digest = "%s/v2/bench/small/manifests/%s" % (m.base, img["manifest"])
    by_tag = "%s/v2/bench/small/manifests/v1" % m.base
    for u in (by_digest, by_tag):  # first (cold) fetch, and a check of the answer
        status, body = b.get(u)
        if status != 200 or not body:
            raise RuntimeError("GET %s: %s" % (u, status))
    pids = m.pids()
    prof = Profiler(b.args.perf, perf_name, pids) if perf_name else None
    cpu0 = cpu_seconds(pids)
    res["manifest_digest_rps"], res["manifest_digest_non2xx"] = b.wrk(by_digest)
    cpu1 = cpu_seconds(pids)
    if prof:
        prof.stop()
    res["manifest_digest_cpu_us"] = round((cpu1 - cpu0) / (res["manifest_digest_rps"] * b.args.wrk_seconds) * 1e6, 2)
    mark = b.up.mark()
    cpu0 = cpu_seconds(pids)
    res["manifest_tag_rps"], res["manifest_tag_non2xx"] = b.wrk(by_tag)
    cpu1 = cpu_seconds(pids)
    res["manifest_tag_cpu_us"] = round((cpu1 - cpu0) / (res["manifest_tag_rps"] * b.args.wrk_seconds) * 1e6, 2)
    b.up.settle(quiet=0.5)
    res["manifest_tag_upstream_requests"] = b.up.count(mark, r'"(GET|HEAD) /v2/bench/small/manifests/')
    log("  manifests: by digest %.0f req/s (%.1f CPU us/req), by tag %.0f req/s (%.1f CPU us/req, %d upstream requests)" % (
        res["manifest_digest_rps"], res["manifest_digest_cpu_us"], res["manifest_tag_rps"], res["manifest_tag_cpu_us"],
        res["manifest_tag_upstream_requests"]))


def whole_image(b, m, res):
    res["skopeo_cold_s"] = round(b.skopeo(m.base, "bench/many:v1"), 3)
    res["skopeo_warm_s"] = round(b.skopeo(m.base, "bench/many:v1"), 3)
    log("  skopeo copy of 40 layers: cold %.2f s, warm %.2f s" % (res["skopeo_cold_s"], res["skopeo_warm_s"]))


def guarded(name, res, fn, *a):
    try:
        fn(*a)
    except Exception as e:  # one failing scenario must not hide the others
        log("  %s FAILED: %s" % (name, e))
        res.setdefault("errors", []).append("%s: %s" % (name, str(e)[:300]))


def run_mirror(b, kind, run_dir, direct_gbps):
    dir = os.path.join(run_dir, kind)
    large = b.images["large"]
    big, mid = large["layers"][3], large["layers"][2]
    res = {}
    perf = lambda s: ("%s-%s" % (kind, s)) if b.args.perf else None
    if kind == "stowage":
        m = Stowage(b.args.stowage, b.up, dir)
    elif kind == "stowage-tls":
        m = Stowage(b.args.stowage, b.up, dir, tls=b.tls)
    elif kind == "stowage-1g":
        m = Stowage(b.args.stowage, b.up, dir)
    elif kind == "distribution":
        m = Distribution(b.up, dir)
    elif kind == "nginx":
        m = Nginx(b.up, dir)
    else:
        raise ValueError(kind)
    log("%s on %s (pids %s)" % (kind, m.base, m.pids()))
    try:
        if kind == "stowage-1g":
            guarded("storm", res, storm, b, m, "", b.images["huge"]["layers"][0], "bench/huge", res)
            res["rss_after_storm_mib"] = status_kb(m.pids(), "VmHWM") / 1024
            return res
        guarded("storm", res, storm, b, m, "", big, "bench/large", res, perf("storm"))
        res["rss_after_storm_mib"] = status_kb(m.pids(), "VmHWM") / 1024
        guarded("cold/warm", res, cold_warm, b, m, "", mid, "bench/large", res, direct_gbps, perf("blob"))
        if kind != "stowage-tls":
            guarded("manifests", res, manifests, b, m, res, perf("manifest-digest"))
            guarded("whole image", res, whole_image, b, m, res)
        res["peak_rss_mib"] = status_kb(m.pids(), "VmHWM") / 1024
        log("  peak RSS %.1f MiB" % res["peak_rss_mib"])
        return res
    finally:
        m.stop()
        shutil.rmtree(dir, ignore_errors=True)
        # Write back what this mirror left dirty now, so that the next one
        # does not share the disk with that writeback.
        os.sync()


# ------------------------------------------------------------------ setup

def make_tls(work):
    d = os.path.join(work, "tls")
    os.makedirs(d, exist_ok=True)
    sh = lambda *a: subprocess.run(a, check=True, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=stowage bench CA")
    sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    sh("openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": os.path.join(d, "ca.crt"), "cert": os.path.join(d, "tls.crt"), "key": os.path.join(d, "tls.key")}


def seed(work, up, scale):
    log("generating images (scale 1/%d)" % scale)
    p = subprocess.run([sys.executable, os.path.join(HERE, "make_images.py"), os.path.join(work, "images"),
                        "--scale", str(scale)], stdout=subprocess.PIPE, check=True)
    images = json.loads(p.stdout)["images"]
    with open(os.path.join(work, "auth.json"), "w") as f:
        f.write("{}")
    os.makedirs(os.path.join(work, "skopeo-tmp"), exist_ok=True)
    for name, img in images.items():
        t = time.monotonic()
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--authfile", os.path.join(work, "auth.json"),
                        "--dest-tls-verify=false", "oci:%s:v1" % img["layout"], "docker://%s/bench/%s:v1" % (up.addr, name)],
                       check=True, env=dict(os.environ, TMPDIR=os.path.join(work, "skopeo-tmp")))
        # The digest the upstream serves for the tag is the truth.
        req = urllib.request.Request("%s/v2/bench/%s/manifests/v1" % (up.url, name), method="HEAD",
                                     headers={"Accept": ACCEPT})
        with urllib.request.urlopen(req) as r:
            img["manifest"] = r.headers["Docker-Content-Digest"]
        log("pushed bench/%s:v1 (%s, %d blobs, %.1f s)" % (name, img["manifest"][:19], len(img["layers"]) + 1,
                                                          time.monotonic() - t))
    # Read the upstream's files once so that every mirror finds them in the
    # page cache alike.
    for dirpath, _, files in os.walk(os.path.join(up.dir, "data")):
        for fn in files:
            with open(os.path.join(dirpath, fn), "rb") as f:
                while f.read(8 * MiB):
                    pass
    return images


# ------------------------------------------------------------------ report

MIRRORS = ["stowage", "stowage-tls", "distribution", "nginx", "direct"]
HEAD = {"stowage": "stowage", "stowage-tls": "stowage TLS", "distribution": "distribution",
        "nginx": "nginx", "direct": "upstream direct"}
ROWS = [
    # key, label, format
    ("upstream_gets", "1 storm: upstream GETs", "{:.0f}"),
    ("ttfb_p50_ms", "1 storm: TTFB p50 (ms)", "{:.1f}"),
    ("ttfb_max_ms", "1 storm: TTFB max (ms)", "{:.1f}"),
    ("wall_s", "1 storm: wall time (s)", "{:.2f}"),
    ("verified", "1 storm: bodies verified", "{}"),
    ("cpu_s", "1 storm: server CPU (s)", "{:.2f}"),
    ("cold_gbps", "2 cold blob: GB/s", "{:.3f}"),
    ("cold_vs_direct", "2 cold blob: ratio to direct", "{:.2f}"),
    ("cold_last_read_ms", "2 cold blob: wait for last read (ms)", "{:.1f}"),
    ("cold_cpu_s", "2 cold blob: server CPU (s)", "{:.2f}"),
    ("warm_gbps", "3 warm blobs: GB/s", "{:.3f}"),
    ("warm_cpu_s_per_gib", "3 warm blobs: server CPU s/GiB", "{:.3f}"),
    ("manifest_digest_rps", "4 manifest by digest: req/s", "{:.0f}"),
    ("manifest_digest_cpu_us", "4 by digest: server CPU us/req", "{:.1f}"),
    ("manifest_tag_rps", "4 manifest by tag: req/s", "{:.0f}"),
    ("manifest_tag_cpu_us", "4 by tag: server CPU us/req", "{:.1f}"),
    ("manifest_tag_upstream_requests", "4 by tag: upstream requests", "{:.0f}"),
    ("skopeo_cold_s", "5 skopeo copy 40 layers cold (s)", "{:.2f}"),
    ("skopeo_warm_s", "5 skopeo copy 40 layers warm (s)", "{:.2f}"),
    ("rss_after_storm_mib", "6 peak RSS after 256 MiB storm (MiB)", "{:.1f}"),
    ("rss_1g_storm_mib", "6 peak RSS after 1 GiB storm (MiB)", "{:.1f}"),
    ("peak_rss_mib", "6 peak RSS, whole run (MiB)", "{:.1f}"),
]


def median(vals):
    nums = [v for v in vals if isinstance(v, (int, float)) and v is not None]
    if nums:
        return statistics.median(nums)
    strs = [v for v in vals if isinstance(v, str)]
    if strs:  # "32/32": add them up over the runs
        ok = sum(int(s.split("/")[0]) for s in strs)
        n = sum(int(s.split("/")[1]) for s in strs)
        return "%d/%d" % (ok, n)
    return None


def summarize(runs):
    med = {m: {} for m in MIRRORS}
    for m in MIRRORS:
        keys = set()
        for r in runs:
            keys |= set(r.get(m, {}))
        for k in keys:
            if k == "errors":
                continue
            med[m][k] = median([r.get(m, {}).get(k) for r in runs])
    # The 1 GiB storm ran in its own stowage; show it in the stowage column.
    g = [r.get("stowage-1g", {}) for r in runs]
    if any(g):
        med["stowage"]["rss_1g_storm_mib"] = median([x.get("rss_after_storm_mib") for x in g])
        med["stowage"]["storm_1g_verified"] = median([x.get("verified") for x in g])
        med["stowage"]["storm_1g_upstream_gets"] = median([x.get("upstream_gets") for x in g])
    return med


def targets(med):
    s, t, n, d, up = med["stowage"], med["stowage-tls"], med["nginx"], med["distribution"], med["direct"]
    out = []

    def add(row, target, value, ok):
        out.append({"row": row, "target": target, "stowage": value,
                    "pass": None if ok is None else bool(ok)})

    def val(x):
        return x is not None

    add("storm upstream GETs", "== 1", s.get("upstream_gets"), val(s.get("upstream_gets")) and s["upstream_gets"] == 1)
    add("storm TTFB p50", "<= 10 ms (upstream direct %s)" % num(up.get("ttfb_p50_ms")), s.get("ttfb_p50_ms"), val(s.get("ttfb_p50_ms")) and s["ttfb_p50_ms"] <= 10)
    add("storm TTFB max", "<= 50 ms (upstream direct %s)" % num(up.get("ttfb_max_ms")), s.get("ttfb_max_ms"), val(s.get("ttfb_max_ms")) and s["ttfb_max_ms"] <= 50)
    add("storm bodies verified", "all", s.get("verified"), val(s.get("verified")) and s["verified"].split("/")[0] == s["verified"].split("/")[1])
    add("TLS storm upstream GETs", "== 1", t.get("upstream_gets"), val(t.get("upstream_gets")) and t["upstream_gets"] == 1)
    add("TLS storm TTFB p50 / max", "<= 10 / 50 ms", [t.get("ttfb_p50_ms"), t.get("ttfb_max_ms")],
        val(t.get("ttfb_p50_ms")) and val(t.get("ttfb_max_ms")) and t["ttfb_p50_ms"] <= 10 and t["ttfb_max_ms"] <= 50)
    nw = n.get("warm_cpu_s_per_gib")
    add("warm CPU s/GiB", "<= nginx (%s)" % num(nw), s.get("warm_cpu_s_per_gib"),
        None if not val(nw) else val(s.get("warm_cpu_s_per_gib")) and s["warm_cpu_s_per_gib"] <= nw)
    add("TLS warm CPU s/GiB", "<= 2 x nginx plain (%s)" % (num(None if nw is None else 2 * nw)),
        t.get("warm_cpu_s_per_gib"),
        None if not val(nw) else val(t.get("warm_cpu_s_per_gib")) and t["warm_cpu_s_per_gib"] <= 2 * nw)
    for k, label in (("manifest_digest_rps", "manifest by digest req/s"), ("manifest_tag_rps", "manifest by tag req/s")):
        add(label, ">= nginx (%s)" % num(n.get(k)), s.get(k), None if not val(n.get(k)) else val(s.get(k)) and s[k] >= n[k])
    add("by tag upstream requests (TTL 5 min)", "<= 1", s.get("manifest_tag_upstream_requests"),
        val(s.get("manifest_tag_upstream_requests")) and s["manifest_tag_upstream_requests"] <= 1)
    for k, label in (("skopeo_cold_s", "skopeo cold"), ("skopeo_warm_s", "skopeo warm")):
        add(label + " (s)", "<= nginx (%s)" % num(n.get(k)), s.get(k), None if not val(n.get(k)) else val(s.get(k)) and s[k] <= n[k])
    add("peak RSS whole run", "<= 32 MiB", s.get("peak_rss_mib"), val(s.get("peak_rss_mib")) and s["peak_rss_mib"] <= 32)
    r256, r1g = s.get("rss_after_storm_mib"), s.get("rss_1g_storm_mib")
    add("peak RSS 1 GiB storm vs 256 MiB storm", "<= 32 MiB and <= 1.1 x", [r256, r1g],
        val(r256) and val(r1g) and r1g <= 32 and r1g <= 1.1 * r256)
    dg = d.get("cold_gbps")
    add("cold blob GB/s", ">= 1.5 x distribution (%s)" % num(None if dg is None else 1.5 * dg),
        s.get("cold_gbps"), None if not val(dg) else val(s.get("cold_gbps")) and s["cold_gbps"] >= 1.5 * dg)
    return out


def num(v):
    """A number for the targets table: no more digits than are meaningful."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v == int(v) and abs(v) < 1e6:
        return "%d" % v
    a = abs(v)
    return "%.0f" % v if a >= 100 else "%.2f" % v if a >= 1 else "%.3f" % v


def fmt(v, f):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def tables(med, tgts):
    cols = [m for m in MIRRORS if med.get(m)]
    rows = [[label] + [fmt(med[m].get(k), f) for m in cols] for k, label, f in ROWS
            if any(med[m].get(k) is not None for m in cols)]
    head = ["metric (median of runs)"] + [HEAD[m] for m in cols]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    text = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in [head] + rows]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    tv = lambda v: " / ".join(num(x) for x in v) if isinstance(v, list) else num(v)
    pf = lambda p: "n/a" if p is None else ("PASS" if p else "FAIL")
    ttext = ["%-40s %-30s %-14s %s" % ("target (stowage)", "wanted", "stowage", "")]
    ttext += ["%-40s %-30s %-14s %s" % (t["row"], t["target"], tv(t["stowage"]), pf(t["pass"])) for t in tgts]
    tmd = ["| target (stowage) | wanted | stowage | |", "|---|---|---:|---|"]
    tmd += ["| %s | %s | %s | %s |" % (t["row"], t["target"], tv(t["stowage"]), pf(t["pass"])) for t in tgts]
    return "\n".join(text), "\n".join(md), "\n".join(ttext), "\n".join(tmd)


def machine():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "memory_gib": round(mem / GiB, 1), "cpu": cpu,
            "kernel": platform.release()}


def versions(stowage_bin):
    v = {}
    # The commit of the tree the stowage binary was built in.
    tree = os.path.dirname(os.path.abspath(stowage_bin))
    try:
        if os.environ.get("STOWAGE_COMMIT"):  # a binary built outside this tree
            v["stowage_commit"] = os.environ["STOWAGE_COMMIT"]
            return v | versions_tools()
        v["stowage_commit"] = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL).stdout.decode().strip()
        top = subprocess.run(["git", "-C", tree, "rev-parse", "--show-toplevel"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", top or tree, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode().strip()
        v["stowage_src_modified"] = bool(dirty)
    except OSError:
        pass
    return v | versions_tools()


def versions_tools():
    v = {}
    for name, argv in (("docker-registry", ["docker-registry", "--version"]), ("nginx", ["nginx", "-v"]),
                       ("skopeo", ["skopeo", "--version"]), ("wrk", ["wrk", "-v"])):
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
            v[name] = p.stdout.decode().strip().splitlines()[0]
        except Exception:
            v[name] = None
    return v


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stowage", required=True, help="stowage binary")
    ap.add_argument("--client", required=True, help="bench-client binary")
    ap.add_argument("--runs", type=int, default=3, help="runs (each mirror from a cold cache every run); medians reported")
    ap.add_argument("--mirrors", default="stowage,stowage-tls,stowage-1g,distribution,nginx",
                    help="comma-separated subset of stowage,stowage-tls,stowage-1g,distribution,nginx")
    ap.add_argument("--scale", type=int, default=1, help="divide big blob sizes by this (smoke: 64)")
    ap.add_argument("--clients", type=int, default=32, help="storm clients")
    ap.add_argument("--warm-requests", type=int, default=32)
    ap.add_argument("--warm-concurrency", type=int, default=8)
    ap.add_argument("--wrk-seconds", type=int, default=5)
    ap.add_argument("--verify", default="cmp", choices=["cmp", "sha256"],
                    help="cmp: each body compared with the generated blob file, whose sha256 is its name "
                         "(default); sha256: each body hashed by the client")
    ap.add_argument("--perf", metavar="DIR", help="perf record the servers during storm and warm into DIR")
    ap.add_argument("--out", help="JSON results file (default bench/results/<date>.json)")
    ap.add_argument("--workdir", help="scratch directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--smoke", action="store_true", help="check that everything works, no results file; "
                    "exit 1 if any body failed verification or a scenario failed")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="stowage-bench.")
    os.makedirs(work, exist_ok=True)
    log("work dir " + work)
    up = None
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        up = Upstream(work)
        images = seed(work, up, args.scale)
        os.sync()
        b = Bench(args, work, images, up)
        b.tls = make_tls(work)
        mid = images["large"]["layers"][2]
        # Direct from the upstream, for the cold-blob ratio.
        direct = []
        for _ in range(3):
            out = b.fetch(up.url, "bench/large", mid, 1, 1)
            if out["ok"]:
                direct.append(out["gbps"])
        direct_gbps = statistics.median(direct) if direct else None
        log("direct from upstream: %s GB/s" % direct)
        # The storm straight at the upstream: the floor for time to first byte.
        direct_storm = []
        for _ in range(3 if args.runs > 1 else 1):
            direct_storm.append(b.fetch(up.url, "bench/large", images["large"]["layers"][3], args.clients, args.clients, sync=True))
        dstorm = {"ttfb_p50_ms": statistics.median(o["ttfb_p50_ms"] for o in direct_storm),
                  "ttfb_max_ms": statistics.median(o["ttfb_max_ms"] for o in direct_storm),
                  "wall_s": statistics.median(o["wall_s"] for o in direct_storm),
                  "verified": "%d/%d" % (sum(o["ok"] for o in direct_storm), sum(o["requests"] for o in direct_storm))}
        log("storm direct from upstream: %s" % dstorm)
        kinds = [k.strip() for k in args.mirrors.split(",") if k.strip()]
        runs = []
        for i in range(args.runs):
            log("=== run %d of %d" % (i + 1, args.runs))
            run = {"direct": dict({k: v for k, v in dstorm.items() if k != "verified"}, cold_gbps=direct_gbps)}
            run_dir = os.path.join(work, "run%d" % i)
            # Rotate the order so that no mirror always goes first.
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for k in order:
                try:
                    run[k] = run_mirror(b, k, run_dir, direct_gbps)
                except Exception as e:
                    log("%s FAILED: %s" % (k, e))
                    run[k] = {"errors": [str(e)[:500]]}
            runs.append(run)
        med = summarize(runs)
        tg = targets(med)
        text, md, ttext, tmd = tables(med, tg)
        finished = datetime.datetime.now(datetime.timezone.utc)
        print()
        print("stowage benchmarks, %s, %d run(s), %s" % (finished.strftime("%Y-%m-%d %H:%M UTC"), len(runs),
                                                        "%(cores)s cores, %(memory_gib)s GiB" % machine()))
        print(text)
        print()
        if args.smoke:
            print("(smoke run: blobs at 1/%d size, one run: the PASS/FAIL below mean nothing)" % args.scale)
        print(ttext)
        errors = {k: v["errors"] for r in runs for k, v in r.items() if v.get("errors")}
        failed_bodies = any(isinstance(v, str) and v.split("/")[0] != v.split("/")[1]
                            for m in med.values() for k, v in m.items() if "verified" in k)
        if errors:
            print("\nscenario errors: " + json.dumps(errors, indent=1))
        result = {
            "date": finished.strftime("%Y-%m-%d"),
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": versions(args.stowage),
            "settings": {k: v for k, v in vars(args).items() if k not in ("stowage", "client", "workdir", "out")},
            "sizes": {n: [l["size"] for l in img["layers"]] for n, img in images.items()},
            "direct_gbps_samples": direct,
            "direct_storm": dstorm,
            "median": med,
            "targets": tg,
            "runs": runs,
            "table_markdown": md,
            "targets_markdown": tmd,
        }
        if not args.smoke:
            out = args.out or os.path.join(HERE, "results", finished.strftime("%Y-%m-%d") + ".json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            with open(out[:-5] + ".md" if out.endswith(".json") else out + ".md", "w") as f:
                f.write("%s, %d run(s), machine: %s\n\n%s\n\n%s\n" % (
                    result["finished"], len(runs), json.dumps(result["machine"]), md, tmd))
            print("\nwrote " + out)
        if args.smoke:
            ok = not errors and not failed_bodies
            print("bench smoke: %d passed, %d failed" % (1 if ok else 0, 0 if ok else 1))
            return 0 if ok else 1
        return 0
    finally:
        if up:
            up.svc.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
