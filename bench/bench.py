#!/usr/bin/env python3
"""Side-by-side benchmark of stowage, distribution's proxy mode and an nginx
proxy_cache mirror (issues 6, 13 and 10). Run through bench/run.sh, which
installs the tools and builds the binaries; see bench/README.md.

Everything runs on loopback: one upstream (Debian's docker-registry,
filesystem storage) seeded with generated images, a shaped copy of it that
looks 100 ms away (bench-shaper), and each mirror started from an empty cache
for every run. Prints one table (a column per mirror, a row per metric,
medians over --runs, ratios to the peer measured in the same run) with the
issues' targets checked for stowage, and writes it as JSON
(bench/results/<date>-<commit>.json) and Markdown.
"""
import argparse
import datetime
import hashlib
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
NOT_SUPPORTED = "not supported by this binary"


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


class MachineLoad:
    """How busy the machine was with work other than the benchmark's: the
    CPU time the kernel counts as busy (/proc/stat: user, nice, system, irq,
    softirq) minus the CPU time of this script, every process it started and
    waited for, and the long-lived services it still runs (upstream, shaper,
    dockerd). Other engineers' builds show up here, as does steal time."""

    def __init__(self):
        self.services = []  # Service objects alive across the runs

    @staticmethod
    def _stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        steal = v[7] if len(v) > 7 else 0
        return busy / CLK_TCK, steal / CLK_TCK

    def snap(self):
        busy, steal = self._stat()
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        for s in self.services:
            if s.p.poll() is None:
                ours += cpu_seconds(s.pids())
        with open("/proc/loadavg") as f:
            load = float(f.read().split()[0])
        return {"t": time.monotonic(), "busy": busy, "steal": steal, "ours": ours, "load1": load}

    @staticmethod
    def delta(a, b):
        el = max(b["t"] - a["t"], 1e-6)
        return {"seconds": round(el, 1),
                "other_cores": round(max(0.0, (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])) / el, 2),
                "bench_cores": round((b["ours"] - a["ours"]) / el, 2),
                "steal_cores": round((b["steal"] - a["steal"]) / el, 2),
                "loadavg_1m": [a["load1"], b["load1"]]}


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

    def page_in(self, blobs):
        """Reads the upstream's files of `blobs` (dicts with a "digest"), so
        that it serves them from the page cache to whichever mirror asks
        next, as it did at the setup.

        On the bench VM a kernel daemon (DAMON, a `pageout` scheme) drops
        file pages nobody has read for about a minute (at most 128 MiB/s):
        the 256 MiB blobs the upstream had served hours before were wholly
        out of the page cache, and the 128 MiB one lost 3 MiB in 70 s idle.
        A mirror whose turn came after such a gap would wait for the
        upstream's disk: noise about the upstream, not the mirror (likely
        what slowed some cold fills with normal CPU, e.g. nginx TLS at
        0.054 GB/s with 0.27 s of CPU, where 0.5 GB/s is usual)."""
        for blob in blobs:
            alg, hex_ = blob["digest"].split(":", 1)
            path = os.path.join(self.dir, "data", "docker", "registry", "v2", "blobs", alg, hex_[:2], hex_, "data")
            try:
                with open(path, "rb") as f:
                    while f.read(4 * MiB):
                        pass
            except OSError as e:
                log("cannot read the upstream's file of %s: %s" % (blob["digest"], e))

    def page_in_image(self, img):
        """page_in() for every blob of image `img` (its config and layers)."""
        self.page_in([img["config"]] + img["layers"])

    def lines_since(self, mark):
        with open(self.access, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace").splitlines()

    def count(self, mark, pattern):
        rx = re.compile(pattern)
        return sum(1 for l in self.lines_since(mark) if rx.search(l))


class Shaper:
    """bench-shaper in front of the upstream: the same registry, `rtt_ms`
    away with `rate_mibps` per connection and TCP slow start (see
    bench/client/src/shaper.rs). Its stderr has a line per connection."""

    def __init__(self, bin, upstream, dir, rtt_ms, rate_mibps, init_cwnd):
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.url = "http://" + self.addr
        self.settings = {"rtt_ms": rtt_ms, "rate_mibps": rate_mibps, "init_cwnd_segments": init_cwnd}
        self.svc = Service("shaper", [bin, "--listen", self.addr, "--upstream", upstream.addr,
                                      "--rtt-ms", str(rtt_ms), "--rate-mibps", str(rate_mibps),
                                      "--init-cwnd", str(init_cwnd)], dir)
        self.log = os.path.join(dir, "stderr.log")
        end = time.time() + 15
        while time.time() < end:
            if self.svc.p.poll() is not None:
                raise RuntimeError("bench-shaper exited: " + self.svc.tail())
            with open(os.path.join(dir, "stdout.log")) as f:
                if f.read().startswith("listening"):
                    return
            time.sleep(0.05)
        raise RuntimeError("bench-shaper did not start: " + self.svc.tail())

    def mark(self):
        return os.path.getsize(self.log)

    def count(self, mark, word):
        with open(self.log, "rb") as f:
            f.seek(mark)
            return sum(1 for l in f.read().decode(errors="replace").splitlines() if l.startswith(word + " "))


# ------------------------------------------------------------------ mirrors

class Mirror:
    cafile = None
    scheme = "http"
    # The file the server writes one line per request to, and a pattern
    # (with %s for the path prefix) that matches a request's line.
    access_log = None
    log_rx = None

    def upstream_mark(self):
        return None

    def upstream_header_ms(self, mark):
        """How long the upstream took to answer the mirror's blob GETs since
        `mark` (to the response head, ms), where the mirror tells."""
        return None

    @property
    def base(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def pids(self):
        return self.svc.pids()

    def stop(self):
        self.svc.stop()

    def log_mark(self):
        return os.path.getsize(self.access_log) if self.access_log and os.path.exists(self.access_log) else 0

    def log_count(self, mark, path_prefix):
        """Lines logged since `mark` for requests under path_prefix."""
        if not self.access_log:
            return None
        rx = re.compile(self.log_rx % re.escape(path_prefix))
        with open(self.access_log, "rb") as f:
            f.seek(mark)
            return sum(1 for l in f.read().decode(errors="replace").splitlines() if rx.search(l))


class Stowage(Mirror):
    # Its log: one line per request (tracing, human format) on stderr, which
    # Service writes to a file; request lines buffered as nginx can buffer
    # its access log (log.buffer = "64KiB": written when 64 KiB are
    # gathered, every second and at shutdown; the nginx column keeps
    # nginx's default, a write per request).
    log_rx = r" path=%s"
    config = '[log]\nbuffer = "64KiB"\n'

    def __init__(self, bin, upstream, dir, tls=None, extra=(), admin=True, port=None):
        self.port = port or free_port()
        self.dir = dir
        self.admin = "127.0.0.1:%d" % free_port() if admin else None
        os.makedirs(dir, exist_ok=True)
        config = os.path.join(dir, "stowage.toml")
        with open(config, "w") as f:
            f.write(self.config)
        argv = [bin, "--config", config, "--listen", "127.0.0.1:%d" % self.port, "--upstream", upstream.url,
                "--cache-dir", os.path.join(dir, "cache"), "--admin-listen", self.admin or "off",
                "--max-size", "200GiB"] + list(extra)
        if tls:
            argv += ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
            self.scheme, self.cafile = "https", tls["ca"]
        self.svc = Service("stowage", argv, dir, env={"NO_COLOR": "1"})
        self.access_log = os.path.join(dir, "stderr.log")
        self.svc.wait_http(self.base + "/v2/", cafile=self.cafile)

    def metrics(self):
        with urllib.request.urlopen("http://%s/metrics" % self.admin, timeout=10) as r:
            return r.read().decode()

    def upstream_mark(self):
        return upstream_blob_timing(self.metrics())

    def upstream_header_ms(self, mark):
        """Mean time from sending a blob GET upstream to its response head,
        over the GETs since `mark` (in a storm: the one GET), from the
        upstream request duration histogram."""
        s0, n0 = mark
        s1, n1 = upstream_blob_timing(self.metrics())
        return round((s1 - s0) / (n1 - n0) * 1000, 2) if n1 > n0 else None


class Distribution(Mirror):
    log_rx = r'"(?:GET|HEAD) %s'

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
        # distribution writes its access log (combined format) to stdout.
        self.access_log = os.path.join(dir, "stdout.log")
        self.svc.wait_http(self.base + "/v2/")


class Nginx(Mirror):
    log_rx = r'"(?:GET|HEAD) %s'

    def __init__(self, upstream, dir, tls=None):
        self.port = free_port()
        for d in ("cache", "tmp"):
            os.makedirs(os.path.join(dir, d), exist_ok=True)
        with open(os.path.join(HERE, "nginx.conf.in")) as f:
            conf = f.read()
        ssl_lines = ""
        if tls:
            self.scheme, self.cafile = "https", tls["ca"]
            ssl_lines = "ssl_certificate %s; ssl_certificate_key %s; ssl_protocols TLSv1.2 TLSv1.3;" % (
                tls["cert"], tls["key"])
        conf = (conf.replace("@DIR@", dir).replace("@UPSTREAM@", upstream.addr)
                .replace("@LISTEN@", "127.0.0.1:%d" % self.port)
                .replace("@WORKERS@", str(os.cpu_count() or 2))
                .replace("@SSL@", "ssl " if tls else "").replace("@TLS@", ssl_lines))
        path = os.path.join(dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.svc = Service("nginx", [nginx, "-p", dir, "-c", path, "-e", os.path.join(dir, "error.log")], dir)
        self.access_log = os.path.join(dir, "access.log")
        self.svc.wait_http(self.base + "/v2/", cafile=self.cafile)

    def upstream_mark(self):
        return self.log_mark()

    def upstream_header_ms(self, mark):
        """From the access log's uht= ($upstream_header_time, seconds) of the
        blob GETs logged since `mark` that went upstream."""
        with open(self.access_log, "rb") as f:
            f.seek(mark)
            t = [float(m.group(1)) for m in re.finditer(r'"GET /v2/[^"]*/blobs/[^"]*".* uht=([0-9.]+)',
                                                         f.read().decode(errors="replace"))]
        return round(sum(t) / len(t) * 1000, 2) if t else None


class Dockerd:
    """A private dockerd (and its containerd) with roots, sockets and
    configuration under the work dir, as tests/e2e/clients.sh runs one:
    no iptables, no bridge. Its registry mirror is changed with SIGHUP
    between pulls. Storage driver overlay2 when it works here, else vfs."""

    DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else (shutil.which("docker") or "docker")

    def __init__(self, work):
        self.dir = d = os.path.join(work, "docker")
        os.makedirs(os.path.join(d, "client"), exist_ok=True)
        self.ctr_sock = os.path.join(d, "containerd.sock")
        with open(os.path.join(d, "containerd.toml"), "w") as f:
            f.write('version = 2\nroot = "%s/containerd-root"\nstate = "%s/containerd-state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s"\n'
                    % (d, d, self.ctr_sock))
        self.containerd = Service("containerd", ["containerd", "--config", os.path.join(d, "containerd.toml")],
                                  os.path.join(d, "containerd-log"))
        self.sock = os.path.join(d, "docker.sock")
        self.env = dict(os.environ, DOCKER_HOST="unix://" + self.sock, DOCKER_CONFIG=os.path.join(d, "client"))
        self.dockerd = None
        self.driver = None
        self.services = [self.containerd]
        try:
            self._start()
        except BaseException:
            self.stop()  # containerd, and anything mounted
            raise

    def _start(self):
        d = self.dir
        end = time.time() + 30
        while not os.path.exists(self.ctr_sock):
            if self.containerd.p.poll() is not None or time.time() > end:
                raise RuntimeError("containerd did not start: " + self.containerd.tail())
            time.sleep(0.1)
        errors = []
        for driver in ("overlay2", "vfs"):
            self.driver = driver
            self.configure([])
            self.dockerd = Service("dockerd", [
                "dockerd", "--config-file", self.daemon_json, "--data-root", os.path.join(d, "root-" + driver),
                "--exec-root", os.path.join(d, "exec"), "--pidfile", os.path.join(d, "docker.pid"),
                "-H", "unix://" + self.sock, "--containerd", self.ctr_sock], os.path.join(d, "dockerd-" + driver))
            end = time.time() + 60
            while time.time() < end and self.dockerd.p.poll() is None:
                if self.docker("info", "--format", "{{.Driver}}", check=False).strip() == driver:
                    self.services.append(self.dockerd)
                    self.version = self.docker("version", "--format", "{{.Server.Version}}").strip()
                    return
                time.sleep(0.2)
            errors.append("%s: %s" % (driver, self.dockerd.tail()[-300:]))
            self.dockerd.stop()
            self.dockerd = None
        raise RuntimeError("dockerd did not start: " + " | ".join(errors))

    @property
    def daemon_json(self):
        return os.path.join(self.dir, "daemon.json")

    def configure(self, mirrors):
        with open(self.daemon_json, "w") as f:
            json.dump({"storage-driver": self.driver, "iptables": False, "ip-masq": False, "bridge": "none",
                       "deprecated-key-path": os.path.join(self.dir, "key.json"),
                       "max-concurrent-downloads": 3, "registry-mirrors": mirrors}, f)

    def docker(self, *args, check=True, timeout=600):
        p = subprocess.run([self.DOCKER] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError("docker %s: %s" % (" ".join(args), p.stdout.decode()[-600:]))
        return p.stdout.decode()

    def set_mirror(self, url):
        """registry-mirrors = [url], reloaded with SIGHUP."""
        self.configure([url])
        os.kill(self.dockerd.p.pid, signal.SIGHUP)
        host = url.split("://", 1)[1].rstrip("/")
        end = time.time() + 20
        while time.time() < end:
            if host in self.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}", check=False):
                return
            time.sleep(0.1)
        raise RuntimeError("dockerd did not take registry-mirrors %s" % url)

    def stop(self):
        for s in (self.dockerd, self.containerd):
            if s:
                s.stop()
        # Mounts left under our dir (overlay layers), deepest first.
        with open("/proc/self/mounts") as f:
            mounts = [l.split()[1] for l in f if l.split()[1].startswith(self.dir + "/")]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------ clients

def verify_dir(dest, img, layout):
    """A `skopeo copy` result (layout "dir" or "oci"): the manifest and every
    blob of the image present, each file hashing to its digest. Returns
    (ok, total)."""
    want = [img["config"]["digest"]] + [l["digest"] for l in img["layers"]]
    if layout == "oci":
        want.append(img["manifest"])
    ok = 0
    for d in want:
        if layout == "oci":
            path = os.path.join(dest, "blobs", "sha256", d.split(":", 1)[1])
        else:
            path = os.path.join(dest, d.split(":", 1)[1])
        try:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(4 * MiB)
                    if not chunk:
                        break
                    h.update(chunk)
            ok += "sha256:" + h.hexdigest() == d
        except OSError:
            pass
    try:
        if layout == "oci":  # the index names the manifest
            with open(os.path.join(dest, "index.json")) as f:
                ok += [m["digest"] for m in json.load(f)["manifests"]] == [img["manifest"]]
        else:
            with open(os.path.join(dest, "manifest.json"), "rb") as f:
                ok += "sha256:" + hashlib.sha256(f.read()).hexdigest() == img["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ok, len(want) + 1


class Bench:
    def __init__(self, args, work, images, upstream):
        self.args, self.work, self.images, self.up = args, work, images, upstream
        self.client = args.client
        self.seq = 0
        self.shaper = None
        self.dockerd = None

    def fetch(self, base, repo, blob, n, c, sync=False, cafile=None):
        """bench-client: n GETs of a blob, c at a time; `base` may be a list
        (request i goes to base i % len)."""
        argv = [self.client, "--requests", str(n), "--concurrency", str(c),
                "--expect", blob["path"], "--verify", self.args.verify, "--timeout", "600"]
        for b in (base if isinstance(base, list) else [base]):
            argv += ["--url", "%s/v2/%s/blobs/%s" % (b, repo, blob["digest"])]
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
        """requests/s, non-2xx responses, requests completed."""
        p = subprocess.run(["wrk", "-t2", "-c32", "-d%ds" % self.args.wrk_seconds, "--timeout", "10s",
                            "-s", os.path.join(HERE, "manifest.lua"), url],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        out = p.stdout.decode()
        m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
        n = re.search(r"(\d+) requests in", out)
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errs = re.search(r"Socket errors:.*", out)
        if not m or not n:
            raise RuntimeError("wrk: " + out[-500:])
        if bad or errs:
            log("  wrk %s: %s %s" % (url, bad.group(0) if bad else "", errs.group(0) if errs else ""))
        return float(m.group(1)), int(bad.group(1)) if bad else 0, int(n.group(1))

    def get(self, url, accept=ACCEPT, cafile=None):
        ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        req = urllib.request.Request(url, headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return r.status, r.read()

    def skopeo(self, base, name, layout="dir"):
        """`skopeo copy docker://<base>/bench/<name>:v1 <layout>:...`: seconds,
        and "ok/total" of the manifest and blobs found there with the right
        digest (skopeo checks digests itself too). Into `dir:` skopeo copies
        one blob at a time (that destination is not safe for concurrent
        writes); into `oci:` six at a time (its default)."""
        self.seq += 1
        dest = os.path.join(self.work, "skopeo-out-%d" % self.seq)
        host = base.split("://", 1)[1]
        t = time.monotonic()
        p = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--retry-times", "0",
                            "--authfile", os.path.join(self.work, "auth.json"), "--src-tls-verify=false",
                            "docker://%s/bench/%s:v1" % (host, name),
                            layout + ":" + dest + (":v1" if layout == "oci" else "")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                           env=dict(os.environ, TMPDIR=os.path.join(self.work, "skopeo-tmp")))
        secs = time.monotonic() - t
        try:
            if p.returncode != 0:
                raise RuntimeError("skopeo copy: " + p.stdout.decode()[-600:])
            ok, total = verify_dir(dest, self.images[name], layout)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if ok != total:
            log("  skopeo copy of bench/%s: only %d of %d files verified" % (name, ok, total))
        return secs, "%d/%d" % (ok, total)

    def docker_pull(self, name):
        """`docker pull bench/<name>:v1` (docker.io, so through the configured
        registry mirror), cold: seconds and "1/1" when the image ID is the
        upstream config's digest (dockerd checks every layer's digest while
        pulling). The image is removed again afterwards."""
        ref = "bench/%s:v1" % name
        t = time.monotonic()
        self.dockerd.docker("pull", "-q", ref)
        secs = time.monotonic() - t
        got = self.dockerd.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False).strip()
        self.dockerd.docker("rmi", ref)
        left = self.dockerd.docker("images", "-q").split()
        if left:
            raise RuntimeError("images left after docker rmi: %s" % left)
        ok = got == self.images[name]["config"]["digest"]
        if not ok:
            log("  docker pull %s: image ID %s, want %s" % (ref, got, self.images[name]["config"]["digest"]))
        return secs, "%d/1" % ok


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

def less(a, b):
    """a - b (ms, rounded), or None when either is unknown."""
    return None if a is None or b is None else round(a - b, 2)


def storm(b, m, prefix, blob, repo, res, perf_name=None):
    """32 clients at once ask for one uncached blob."""
    b.up.page_in([blob])
    mark = b.up.mark()
    umark = m.upstream_mark()
    prof = Profiler(b.args.perf, perf_name, m.pids()) if perf_name else None
    cpu0 = cpu_seconds(m.pids())
    out = b.fetch(m.base, repo, blob, b.args.clients, b.args.clients, sync=True, cafile=m.cafile)
    cpu1 = cpu_seconds(m.pids())
    if prof:
        prof.stop()
    b.up.settle()
    # The upstream's own time to answer the mirror's GET: every client's
    # first byte waits for it, so it is the floor of the TTFB.
    u = res[prefix + "upstream_header_ms"] = m.upstream_header_ms(umark)
    res[prefix + "ttfb_p50_over_upstream_ms"] = less(out["ttfb_p50_ms"], u)
    res[prefix + "upstream_gets"] = b.up.count(mark, r'"GET /v2/%s/blobs/%s ' % (re.escape(repo), blob["digest"]))
    res[prefix + "ttfb_p50_ms"] = out["ttfb_p50_ms"]
    res[prefix + "ttfb_max_ms"] = out["ttfb_max_ms"]
    res[prefix + "wall_s"] = out["wall_s"]
    res[prefix + "verified"] = "%d/%d" % (out["ok"], out["requests"])
    res[prefix + "cpu_s"] = round(cpu1 - cpu0, 2)
    if out.get("tls"):
        res[prefix + "tls"] = out["tls"]
    log("  %sstorm: %s upstream GETs (answered in %s ms), TTFB p50 %.1f ms max %.1f ms, wall %.2f s, %s verified%s" % (
        prefix, res[prefix + "upstream_gets"], res[prefix + "upstream_header_ms"], out["ttfb_p50_ms"] or -1,
        out["ttfb_max_ms"] or -1, out["wall_s"], res[prefix + "verified"],
        (" (%s)" % out["tls"]) if out.get("tls") else ""))


def cold_warm(b, m, prefix, blob, repo, res, direct_gbps, perf_name=None):
    # The cold fill's page-cache pages, every mirror's alike, from memory
    # touched just now (see warm_free_memory).
    warm_free_memory(b.args, 256 * MiB, quiet=True)
    b.up.page_in([blob])
    pids = m.pids()
    prof = Profiler(b.args.perf, perf_name + "-cold", pids) if perf_name else None
    umark = m.upstream_mark()
    io0 = io_stall_us()
    cpu0 = cpu_seconds(pids)
    out = b.fetch(m.base, repo, blob, 1, 1, cafile=m.cafile)
    cpu1 = cpu_seconds(pids)
    io1 = io_stall_us()
    if prof:
        prof.stop()
    res[prefix + "cold_gbps"] = out["gbps"] if out["ok"] == 1 else None
    # Where a slow cold fetch lost its time: before the first byte (the
    # upstream's answer is part of it) or in the body.
    res[prefix + "cold_ttfb_ms"] = out["ttfb_p50_ms"]
    res[prefix + "cold_upstream_header_ms"] = m.upstream_header_ms(umark)
    # Whether a fill slow with normal CPU waited on the disk: the time some
    # task of the machine (any process) was stalled on I/O meanwhile.
    res[prefix + "cold_io_stall_ms"] = round((io1 - io0) / 1000, 1) if None not in (io0, io1) else None
    res[prefix + "cold_verified"] = "%d/%d" % (out["ok"], out["requests"])
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
    log("  %scold %.3f GB/s (%.2f s CPU, I/O stall %s ms); warm %.3f GB/s, %.3f CPU s/GiB (%s verified)" % (
        prefix, res[prefix + "cold_gbps"] or -1, res[prefix + "cold_cpu_s"], res[prefix + "cold_io_stall_ms"],
        out["gbps"], res[prefix + "warm_cpu_s_per_gib"] or -1, res[prefix + "warm_verified"]))


def manifests(b, m, res, perf_name=None):
    """wrk on one manifest by digest, then by tag, with the server's access
    log on (nginx's access_log, stowage's default line per request, both to
    a file); the lines each run added are counted against the requests wrk
    completed."""
    img = b.images["small"]
    by_digest = "%s/v2/bench/small/manifests/%s" % (m.base, img["manifest"])
    by_tag = "%s/v2/bench/small/manifests/v1" % m.base
    for u in (by_digest, by_tag):  # first (cold) fetch, and a check of the answer
        status, body = b.get(u)
        if status != 200 or not body:
            raise RuntimeError("GET %s: %s" % (u, status))
        if u == by_digest and "sha256:" + hashlib.sha256(body).hexdigest() != img["manifest"]:
            raise RuntimeError("GET %s: the body does not hash to its digest" % u)
    pids = m.pids()
    for kind, url in (("digest", by_digest), ("tag", by_tag)):
        mark, lmark = b.up.mark(), m.log_mark()
        prof = Profiler(b.args.perf, "%s-%s" % (perf_name, kind), pids) if perf_name else None
        cpu0 = cpu_seconds(pids)
        rps, non2xx, n = b.wrk(url)
        cpu1 = cpu_seconds(pids)
        if prof:
            prof.stop()
        res["manifest_%s_rps" % kind] = rps
        res["manifest_%s_non2xx" % kind] = non2xx
        res["manifest_%s_cpu_us" % kind] = round((cpu1 - cpu0) / max(n, 1) * 1e6, 2)
        # Requests wrk gave up on at its deadline finish, and a buffered
        # log (stowage's log.buffer, nginx's buffer=) writes within a second.
        time.sleep(1.2)
        lines = m.log_count(lmark, "/v2/bench/small/manifests/")
        # Log lines per completed request: ~1.0 when every request is logged
        # (a few more for requests cut off at wrk's deadline).
        res["manifest_%s_log_lines_per_req" % kind] = round(lines / max(n, 1), 3) if lines is not None else None
        if kind == "tag":
            b.up.settle(quiet=0.5)
            res["manifest_tag_upstream_requests"] = b.up.count(mark, r'"(GET|HEAD) /v2/bench/small/manifests/')
    log("  manifests: by digest %.0f req/s (%.1f CPU us/req, %s log lines/req), by tag %.0f req/s "
        "(%.1f CPU us/req, %s log lines/req, %d upstream requests)" % (
            res["manifest_digest_rps"], res["manifest_digest_cpu_us"], res["manifest_digest_log_lines_per_req"],
            res["manifest_tag_rps"], res["manifest_tag_cpu_us"], res["manifest_tag_log_lines_per_req"],
            res["manifest_tag_upstream_requests"]))


def whole_image(b, m, res):
    b.up.page_in_image(b.images["many"])
    secs, v1 = b.skopeo(m.base, "many")
    res["skopeo_cold_s"] = round(secs, 3)
    secs, v2 = b.skopeo(m.base, "many")
    res["skopeo_warm_s"] = round(secs, 3)
    res["skopeo_verified"] = "%d/%d" % (int(v1.split("/")[0]) + int(v2.split("/")[0]),
                                        int(v1.split("/")[1]) + int(v2.split("/")[1]))
    log("  skopeo copy of 40 layers: cold %.2f s, warm %.2f s (%s files verified)" % (
        res["skopeo_cold_s"], res["skopeo_warm_s"], res["skopeo_verified"]))


READ_SYSCALL = {"x86_64": 0, "aarch64": 63}.get(platform.machine())


def wait_reading_stdin(pids, secs=20):
    """Waits until every process is blocked in read(0, ...) (from
    /proc/PID/syscall); returns how many were not by the deadline."""
    waiting = set(pids)
    if READ_SYSCALL is None:
        time.sleep(2)
        return 0
    end = time.time() + secs
    while waiting and time.time() < end:
        for p in list(waiting):
            try:
                with open("/proc/%d/syscall" % p) as f:
                    sc = f.read().split()
            except OSError:
                waiting.discard(p)  # gone: shows as a failed request
                continue
            if len(sc) >= 2 and sc[0] == str(READ_SYSCALL) and int(sc[1], 16) == 0:
                waiting.discard(p)
        if waiting:
            time.sleep(0.01)
    return len(waiting)


def curl_storm(b, m, blob, repo, res):
    """A storm from separate processes: `--clients` curl processes, each
    piping its body into `cmp - <expected file>`, all released at once for
    one uncached blob. Each curl is started first and blocks reading its
    configuration (the URL) from stdin; once all are blocked there, the
    URL is written to each stdin in turn (well under a millisecond apart).
    Time to first byte is curl's time_starttransfer - time_pretransfer: from
    the request being sent to the first response byte."""
    n = b.args.clients
    url = "%s/v2/%s/blobs/%s" % (m.base, repo, blob["digest"])
    b.seq += 1
    d = os.path.join(b.work, "curl-storm-%d" % b.seq)
    os.makedirs(d)
    wfmt = "%{stderr}%{http_code} %{size_download} %{time_pretransfer} %{time_starttransfer} %{time_total}\n"
    os.sync()  # the previous storm's blob is written back before this one starts
    b.up.page_in([blob])
    mark = b.up.mark()
    umark = m.upstream_mark()
    procs = []
    try:
        for i in range(n):
            err = open(os.path.join(d, "%d.txt" % i), "wb")
            c = subprocess.Popen(["curl", "-q", "-sS", "--http1.1", "--max-time", "600", "-w", wfmt, "-K", "-"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            v = subprocess.Popen(["cmp", "-s", "-", blob["path"]], stdin=c.stdout)
            c.stdout.close()
            procs.append((c, v, err))
        late = wait_reading_stdin([c.pid for c, _, _ in procs])
        cfg = ('url = "%s"\n' % url).encode()
        cpu0 = cpu_seconds(m.pids())
        t0 = time.monotonic()
        for c, _, _ in procs:
            c.stdin.write(cfg)
            c.stdin.close()
        for c, v, _ in procs:
            c.wait(900)
            v.wait(900)
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(m.pids())
    finally:
        for c, v, err in procs:
            for p in (c, v):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            err.close()
    ttfb, ok, first_error = [], 0, ""
    for i, (c, v, _) in enumerate(procs):
        with open(os.path.join(d, "%d.txt" % i)) as f:
            lines = f.read().strip().splitlines()
        try:
            code, size, pre, start, total = lines[-1].split()
            good = code == "200" and int(size) == blob["size"] and v.returncode == 0 and c.returncode == 0
        except (ValueError, IndexError):
            good = False
        if good:
            ok += 1
            ttfb.append((float(start) - float(pre)) * 1000)
        elif not first_error:
            first_error = "curl exit %s, cmp exit %s: %s" % (c.returncode, v.returncode, " | ".join(lines)[-200:])
    shutil.rmtree(d, ignore_errors=True)
    b.up.settle()
    res["pstorm_upstream_gets"] = b.up.count(mark, r'"GET /v2/%s/blobs/%s ' % (re.escape(repo), blob["digest"]))
    res["pstorm_ttfb_p50_ms"] = round(statistics.median(ttfb), 2) if ttfb else None
    # As in the storm: every first byte waits for the upstream's answer.
    u = res["pstorm_upstream_header_ms"] = m.upstream_header_ms(umark)
    res["pstorm_ttfb_p50_over_upstream_ms"] = less(res["pstorm_ttfb_p50_ms"], u)
    res["pstorm_ttfb_max_ms"] = round(max(ttfb), 2) if ttfb else None
    res["pstorm_wall_s"] = round(wall, 3)
    res["pstorm_cpu_s"] = round(cpu1 - cpu0, 2)
    res["pstorm_verified"] = "%d/%d" % (ok, n)
    res["pstorm_not_ready_at_start"] = late
    if first_error:
        log("  curl storm: " + first_error)
    log("  storm of %d curl processes: %s upstream GETs (answered in %s ms), TTFB p50 %s ms max %s ms, wall %.2f s, "
        "%s verified%s" % (
        n, res["pstorm_upstream_gets"], u, res["pstorm_ttfb_p50_ms"], res["pstorm_ttfb_max_ms"], wall,
        res["pstorm_verified"], (", %d curl not ready at the start" % late) if late else ""))


def start_mirror(b, kind, dir, upstream):
    if kind == "stowage":
        return Stowage(b.args.stowage, upstream, dir)
    if kind == "stowage-tls":
        return Stowage(b.args.stowage, upstream, dir, tls=b.tls)
    if kind == "distribution":
        return Distribution(upstream, dir)
    if kind == "nginx":
        return Nginx(upstream, dir)
    if kind == "nginx-tls":
        return Nginx(upstream, dir, tls=b.tls)
    raise ValueError(kind)


def rotate(xs, i):
    return xs[i % len(xs):] + xs[:i % len(xs)]


def distant(b, run_dir, i):
    """Cold pulls of bench/dist (16 layers of 2 MiB) from the shaped upstream
    (100 ms, 16 MiB/s per connection): straight from it ("direct") and
    through each mirror in front of it, with skopeo and, when dockerd runs,
    with docker pull (3 concurrent downloads). Returns {column: results}.
    --smoke leaves distribution out (its pull alone takes ~10 s)."""
    cols = {}
    for col in rotate(["direct", "stowage", "nginx"] + ([] if b.args.smoke else ["distribution"]), i):
        r = cols.setdefault(col, {})
        guarded("distant skopeo via " + col, r, distant_pull, b, col, run_dir, r, "skopeo")
    if b.dockerd:
        for col in rotate(["direct", "stowage", "nginx"], i):
            r = cols.setdefault(col, {})
            guarded("distant docker pull via " + col, r, distant_pull, b, col, run_dir, r, "docker")
    return cols


def distant_pull(b, col, run_dir, r, client):
    dir = os.path.join(run_dir, "distant-%s-%s" % (client, col))
    b.up.page_in_image(b.images["dist"])
    m = None if col == "direct" else start_mirror(b, col, dir, b.shaper)
    try:
        base = b.shaper.url if m is None else m.base
        if client == "docker":
            b.dockerd.set_mirror(base)
        b.up.settle(quiet=0.3)
        mark, smark = b.up.mark(), b.shaper.mark()
        if client == "skopeo":
            secs, ver = b.skopeo(base, "dist", layout="oci")
        else:
            secs, ver = b.docker_pull("dist")
        p = "distant_%s_" % client
        r[p + "s"] = round(secs, 3)
        r[p + "verified"] = ver
        b.up.settle(quiet=0.5)
        r[p + "upstream_blob_gets"] = b.up.count(mark, r'"GET /v2/bench/dist/blobs/')
        r[p + "upstream_conns"] = b.shaper.count(smark, "open")
        log("  distant %s via %s: %.2f s (%s verified), %d upstream blob GETs over %d connections" % (
            client, col, secs, ver, r[p + "upstream_blob_gets"], r[p + "upstream_conns"]))
    finally:
        if m:
            m.stop()
        shutil.rmtree(dir, ignore_errors=True)


def upstream_blob_timing(metrics):
    """(sum of seconds, count) of a stowage node's blob GETs upstream, to
    their response heads, from its /metrics."""
    total = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        mm = re.match(r'stowage_upstream_request_duration_seconds_(sum|count)\{([^}]*)\} (\S+)$', line.strip())
        if mm and dict(re.findall(r'(\w+)="([^"]*)"', mm.group(2))).get("kind") == "blob":
            total[mm.group(1)] += float(mm.group(3))
    return total["sum"], total["count"]


def upstream_blob_fetches(metrics):
    """Blob GETs a stowage node sent upstream, from its /metrics."""
    total = 0.0
    for line in metrics.splitlines():
        mm = re.match(r'stowage_upstream_requests_total\{([^}]*)\} (\S+)$', line.strip())
        if mm and dict(re.findall(r'(\w+)="([^"]*)"', mm.group(1))).get("kind") == "blob":
            total += float(mm.group(2))
    return total


def cluster(b, run_dir, res):
    """Three stowage nodes that know each other (issue 10: --advertise and
    --peer); a storm of `--clients` clients spread over the three for one
    uncached blob. Upstream GETs (1 wanted), and time to first byte through
    the blob's owner (the node whose metrics show the upstream fetch) against
    through the other two. Skipped, with a row saying so, when the binary
    has no such flags."""
    p = subprocess.run([b.args.stowage, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    usage = p.stdout.decode()
    if "--peer" not in usage or "--advertise" not in usage:
        res["cluster_status"] = NOT_SUPPORTED + " (no --peer/--advertise)"
        log("  3 nodes: skipped, %s" % res["cluster_status"])
        return
    ports = [free_port() for _ in range(3)]
    urls = ["http://127.0.0.1:%d" % p for p in ports]
    nodes = []
    try:
        for k, port in enumerate(ports):
            extra = ["--advertise", urls[k]]
            for u in urls:
                extra += ["--peer", u]
            nodes.append(Stowage(b.args.stowage, b.up, os.path.join(run_dir, "cluster", "node%d" % k),
                                 extra=extra, admin=True, port=port))
        res["cluster_status"] = "ran"
        blob, repo = b.images["large"]["layers"][3], "bench/large"
        b.up.page_in([blob])
        mark = b.up.mark()
        out = b.fetch([n.base for n in nodes], repo, blob, b.args.clients, b.args.clients, sync=True)
        b.up.settle()
        res["cluster_upstream_gets"] = b.up.count(mark, r'"GET /v2/%s/blobs/%s ' % (re.escape(repo), blob["digest"]))
        res["cluster_verified"] = "%d/%d" % (out["ok"], out["requests"])
        res["cluster_wall_s"] = out["wall_s"]
        fetched = []
        for n in nodes:
            try:
                fetched.append(upstream_blob_fetches(n.metrics()))
            except Exception as e:
                log("  3 nodes: metrics of %s: %s" % (n.base, e))
                fetched.append(None)
        res["cluster_upstream_by_node"] = fetched
        by_node = [[r["ttfb_ms"] for r in out["results"] if r["ok"] and r["target"] == k] for k in range(3)]
        res["cluster_ttfb_p50_by_node_ms"] = [round(statistics.median(x), 2) if x else None for x in by_node]
        owners = [k for k, f in enumerate(fetched) if f]
        if len(owners) == 1:
            o = owners[0]
            own = by_node[o]
            non = [x for k in range(3) if k != o for x in by_node[k]]
            res["cluster_owner"] = "node %d" % o
            if own and non:
                res["cluster_owner_ttfb_p50_ms"] = round(statistics.median(own), 2)
                res["cluster_nonowner_ttfb_p50_ms"] = round(statistics.median(non), 2)
                res["cluster_nonowner_vs_owner"] = round(
                    res["cluster_nonowner_ttfb_p50_ms"] / max(res["cluster_owner_ttfb_p50_ms"], 0.001), 3)
        else:
            res["cluster_owner"] = "unknown (%d nodes fetched it upstream)" % len(owners)
        log("  3 nodes: %s upstream GETs, %s verified, owner %s, TTFB p50 by node %s ms" % (
            res["cluster_upstream_gets"], res["cluster_verified"], res["cluster_owner"],
            res["cluster_ttfb_p50_by_node_ms"]))
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(os.path.join(run_dir, "cluster"), ignore_errors=True)
        os.sync()


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
    if kind == "cluster":
        guarded("3 nodes", res, cluster, b, run_dir, res)
        return res
    m = Stowage(b.args.stowage, b.up, dir) if kind == "stowage-1g" else start_mirror(b, kind, dir, b.up)
    log("%s on %s (pids %s)" % (kind, m.base, m.pids()))
    try:
        if kind == "stowage-1g":
            guarded("storm", res, storm, b, m, "", b.images["huge"]["layers"][0], "bench/huge", res)
            res["rss_after_storm_mib"] = status_kb(m.pids(), "VmHWM") / 1024
            return res
        guarded("storm", res, storm, b, m, "", big, "bench/large", res, perf("storm"))
        res["rss_after_storm_mib"] = status_kb(m.pids(), "VmHWM") / 1024
        if kind in ("stowage", "nginx"):
            guarded("curl storm", res, curl_storm, b, m, b.images["procs"]["layers"][0], "bench/procs", res)
        guarded("cold/warm", res, cold_warm, b, m, "", mid, "bench/large", res, direct_gbps, perf("blob"))
        if kind in ("stowage", "distribution", "nginx"):
            guarded("manifests", res, manifests, b, m, res, perf("manifest"))
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


def io_stall_us():
    """Microseconds some task of the machine has been stalled on I/O since
    boot (pressure stall information, `/proc/pressure/io`), or None
    where the kernel has none."""
    try:
        with open("/proc/pressure/io") as f:
            some = f.readline().split()
        return int(dict(kv.split("=") for kv in some[1:])["total"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def warm_free_memory(args, extra=GiB, quiet=False):
    """Touches the machine's free memory (a file in /dev/shm, written and
    deleted): once before the runs, and again just before each mirror's
    cold fill (`extra` 256 MiB), so that no mirror's fills pay for memory
    nobody has touched for a while.

    On the bench VM, touching memory that nobody has used for a while is
    slow, most likely a fault in the host for each page: the warming here
    writes it at about 20 us per 4 KiB page, memory in use lately at 1.6.
    The kernel hands out its smallest free blocks first, so (as far as I
    can tell) a fill's new page-cache pages come from those until they run
    out. The first mirror to fill after the setup paid for it: its cold
    128 MiB fill took 0.7-1.3 s of CPU instead of about 0.2 s, most of it
    in the kernel's copy into those pages, at 0.09-0.18 GB/s instead of
    0.5-0.8. It was whichever mirror went first: nginx alone, 0.154 and
    0.169 GB/s; stowage alone, 0.094-0.184 GB/s in eleven runs (rotation
    put stowage first in run 1 of every full bench). A throwaway nginx pass
    first did not cure it (the stowage after it: 0.167 GB/s); writing
    7 GiB here first did (0.630 GB/s, 0.2 s of CPU), but not always: in a
    later one-run bench stowage still filled at 0.203 GB/s with 0.66 s of
    CPU, 68 % of it in that copy, a few scenarios after the warming.
    Touched again just before the cold fill, three one-run benches of
    stowage alone gave 0.422, 0.661 and 0.657 GB/s (0.32, 0.24 and 0.21 s
    of CPU); in a full run one first fill was still slow (0.73 s of CPU).

    How much: the free memory outside the largest free blocks (from
    /proc/buddyinfo) and `extra` more, at most the free memory less 1 GiB."""
    if args.no_warmup or args.smoke:
        return
    small = 0
    with open("/proc/buddyinfo") as f:
        for line in f:
            counts = [int(x) for x in line.split()[4:]]
            small += sum(n * (4096 << order) for order, n in enumerate(counts[:-1]))
    with open("/proc/meminfo") as f:
        free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemFree:"))
    # Within the free memory: reclaiming page cache for it would push out
    # the upstream's files, read in at the setup.
    size = min(small + extra, free - GiB)
    if size <= 0:
        return
    path = "/dev/shm/stowage-bench-warm-%d" % os.getpid()
    block = b"\1" * MiB
    t = time.monotonic()
    try:
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(block)
    except OSError as e:  # a small /dev/shm: warm what fitted
        log("warming free memory stopped early: %s" % e)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if not quiet:
        log("touched %.1f GiB of free memory in %.1f s (see warm_free_memory)" % (size / GiB, time.monotonic() - t))


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

MIRRORS = ["stowage", "stowage-tls", "nginx", "nginx-tls", "distribution", "direct"]
HEAD = {"stowage": "stowage", "stowage-tls": "stowage TLS", "distribution": "distribution",
        "nginx": "nginx", "nginx-tls": "nginx TLS", "direct": "upstream direct"}
# Each column's peer for the "ratio" rows: the figure divided by the peer's
# in the same run, then the median over runs (paired, so a noisy run moves
# both sides).
PEER = {"stowage": "nginx", "stowage-tls": "nginx-tls", "distribution": "nginx"}
RATIO_TO_PEER = ["ttfb_p50_ms", "cold_gbps", "warm_cpu_s_per_gib", "manifest_digest_rps", "manifest_tag_rps",
                 "skopeo_cold_s", "skopeo_warm_s", "pstorm_ttfb_p50_ms"]
RATIO_TO_DIRECT = ["distant_skopeo_s", "distant_docker_s"]
ROWS = [
    # key, label, format
    ("upstream_gets", "1 storm: upstream GETs", "{:.0f}"),
    ("ttfb_p50_ms", "1 storm: TTFB p50 (ms)", "{:.1f}"),
    ("ttfb_p50_ms_vs_peer", "1 storm: TTFB p50, ratio to nginx*", "{:.3f}"),
    ("ttfb_max_ms", "1 storm: TTFB max (ms)", "{:.1f}"),
    ("upstream_header_ms", "1 storm: upstream's answer to the mirror's GET (ms)", "{:.1f}"),
    ("ttfb_p50_over_upstream_ms", "1 storm: TTFB p50 less the upstream's answer (ms)", "{:.1f}"),
    ("wall_s", "1 storm: wall time (s)", "{:.2f}"),
    ("verified", "1 storm: bodies verified", "{}"),
    ("cpu_s", "1 storm: server CPU (s)", "{:.2f}"),
    ("tls", "1 storm: TLS version / cipher", "{}"),
    ("cold_gbps", "2 cold blob: GB/s", "{:.3f}"),
    ("cold_gbps_vs_peer", "2 cold blob: GB/s, ratio to nginx*", "{:.2f}"),
    ("cold_vs_direct", "2 cold blob: ratio to upstream direct", "{:.2f}"),
    ("cold_last_read_ms", "2 cold blob: wait for last read (ms)", "{:.1f}"),
    ("cold_cpu_s", "2 cold blob: server CPU (s)", "{:.2f}"),
    ("cold_ttfb_ms", "2 cold blob: time to first byte (ms)", "{:.1f}"),
    ("cold_io_stall_ms", "2 cold blob: machine's I/O stall meanwhile (ms)", "{:.1f}"),
    ("cold_upstream_header_ms", "2 cold blob: upstream's answer to the mirror's GET (ms)", "{:.1f}"),
    ("warm_gbps", "3 warm blobs: GB/s", "{:.3f}"),
    ("warm_cpu_s_per_gib", "3 warm blobs: server CPU s/GiB", "{:.3f}"),
    ("warm_cpu_s_per_gib_vs_peer", "3 warm blobs: CPU s/GiB, ratio to nginx*", "{:.2f}"),
    ("warm_verified", "3 warm blobs: bodies verified", "{}"),
    ("manifest_digest_rps", "4 manifest by digest: req/s", "{:.0f}"),
    ("manifest_digest_rps_vs_peer", "4 by digest: req/s, ratio to nginx*", "{:.2f}"),
    ("manifest_digest_cpu_us", "4 by digest: server CPU us/req", "{:.1f}"),
    ("manifest_digest_log_lines_per_req", "4 by digest: access log lines/req", "{:.2f}"),
    ("manifest_tag_rps", "4 manifest by tag: req/s", "{:.0f}"),
    ("manifest_tag_rps_vs_peer", "4 by tag: req/s, ratio to nginx*", "{:.2f}"),
    ("manifest_tag_cpu_us", "4 by tag: server CPU us/req", "{:.1f}"),
    ("manifest_tag_log_lines_per_req", "4 by tag: access log lines/req", "{:.2f}"),
    ("manifest_tag_upstream_requests", "4 by tag: upstream requests", "{:.0f}"),
    ("skopeo_cold_s", "5 skopeo copy 40 layers cold (s)", "{:.2f}"),
    ("skopeo_cold_s_vs_peer", "5 skopeo cold: ratio to nginx*", "{:.2f}"),
    ("skopeo_warm_s", "5 skopeo copy 40 layers warm (s)", "{:.2f}"),
    ("skopeo_warm_s_vs_peer", "5 skopeo warm: ratio to nginx*", "{:.2f}"),
    ("skopeo_verified", "5 skopeo: files verified", "{}"),
    ("rss_after_storm_mib", "6 peak RSS after 256 MiB storm (MiB)", "{:.1f}"),
    ("rss_1g_storm_mib", "6 peak RSS after 1 GiB storm (MiB)", "{:.1f}"),
    ("peak_rss_mib", "6 peak RSS, whole run (MiB)", "{:.1f}"),
    ("pstorm_upstream_gets", "8 storm of curl processes: upstream GETs", "{:.0f}"),
    ("pstorm_ttfb_p50_ms", "8 curl storm: TTFB p50 (ms)", "{:.1f}"),
    ("pstorm_ttfb_p50_ms_vs_peer", "8 curl storm: TTFB p50, ratio to nginx*", "{:.3f}"),
    ("pstorm_ttfb_max_ms", "8 curl storm: TTFB max (ms)", "{:.1f}"),
    ("pstorm_upstream_header_ms", "8 curl storm: upstream's answer to the mirror's GET (ms)", "{:.1f}"),
    ("pstorm_ttfb_p50_over_upstream_ms", "8 curl storm: TTFB p50 less the upstream's answer (ms)", "{:.1f}"),
    ("pstorm_wall_s", "8 curl storm: wall time (s)", "{:.2f}"),
    ("pstorm_verified", "8 curl storm: bodies verified", "{}"),
    ("distant_skopeo_s", "9 distant: skopeo copy 16 x 2 MiB cold (s)", "{:.2f}"),
    ("distant_skopeo_s_vs_direct", "9 distant skopeo: ratio to direct", "{:.2f}"),
    ("distant_skopeo_upstream_blob_gets", "9 distant skopeo: upstream blob GETs", "{:.0f}"),
    ("distant_skopeo_upstream_conns", "9 distant skopeo: upstream connections", "{:.0f}"),
    ("distant_skopeo_verified", "9 distant skopeo: files verified", "{}"),
    ("distant_docker_s", "9 distant: docker pull cold (s)", "{:.2f}"),
    ("distant_docker_s_vs_direct", "9 distant docker pull: ratio to direct", "{:.2f}"),
    ("distant_docker_upstream_blob_gets", "9 distant docker: upstream blob GETs", "{:.0f}"),
    ("distant_docker_upstream_conns", "9 distant docker: upstream connections", "{:.0f}"),
    ("distant_docker_verified", "9 distant docker: images verified", "{}"),
    ("cluster_status", "10 three nodes", "{}"),
    ("cluster_upstream_gets", "10 three nodes storm: upstream GETs", "{:.0f}"),
    ("cluster_owner_ttfb_p50_ms", "10 TTFB p50 through the owner (ms)", "{:.1f}"),
    ("cluster_nonowner_ttfb_p50_ms", "10 TTFB p50 through a non-owner (ms)", "{:.1f}"),
    ("cluster_nonowner_vs_owner", "10 TTFB non-owner / owner", "{:.2f}"),
    ("cluster_verified", "10 three nodes: bodies verified", "{}"),
]
FOOTNOTE = ("* ratio rows: the median over runs of (this column's figure / its peer's in the same run); the peer "
            "is nginx for stowage and distribution, nginx TLS for stowage TLS. \"ratio to direct\": / the same "
            "pull straight from the shaped upstream in the same run.")


def isnum(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def add_ratios(run):
    for col, peer in PEER.items():
        a, p = run.get(col, {}), run.get(peer, {})
        for k in RATIO_TO_PEER:
            if isnum(a.get(k)) and isnum(p.get(k)) and p[k] > 0:
                a[k + "_vs_peer"] = round(a[k] / p[k], 3)
    d = run.get("direct", {})
    for col in ("stowage", "nginx", "distribution"):
        a = run.get(col, {})
        for k in RATIO_TO_DIRECT:
            if isnum(a.get(k)) and isnum(d.get(k)) and d[k] > 0:
                a[k + "_vs_direct"] = round(a[k] / d[k], 3)


def median(vals):
    nums = [v for v in vals if isnum(v)]
    if nums:
        return statistics.median(nums)
    strs = [v for v in vals if isinstance(v, str)]
    if strs and all(re.fullmatch(r"\d+/\d+", s) for s in strs):  # "32/32": add them up over the runs
        ok = sum(int(s.split("/")[0]) for s in strs)
        n = sum(int(s.split("/")[1]) for s in strs)
        return "%d/%d" % (ok, n)
    if strs:
        return ", ".join(sorted(set(strs)))
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
    # So did the three nodes.
    c = [r.get("cluster", {}) for r in runs]
    for k in set().union(*c):
        if k.startswith("cluster_"):
            med["stowage"][k] = median([x.get(k) for x in c])
    return med


def targets(med):
    """Issue 6's targets. A target whose stowage scenario did not run (a
    run limited with --mirrors) is n/a; one where it ran and gave no figure
    is FAIL."""
    s, t, n, d, up = med["stowage"], med["stowage-tls"], med["nginx"], med["distribution"], med["direct"]
    out = []

    def add(row, target, value, ok):
        # The 3-node scenario's figures sit in the stowage column too.
        col = t if row.startswith("TLS") else s
        ran = any(not k.startswith("cluster") for k in col)
        out.append({"row": row, "target": target, "stowage": value,
                    "pass": None if ok is None or not ran else bool(ok)})

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


def targets13(med):
    """Issue 13's targets (and issue 10's bench target), each with the peer's
    figure from the same runs and the ratio it is judged on. A target whose
    scenario did not run (or whose peer failed) is n/a; one where stowage
    failed is FAIL."""
    s, t, n, nt, up = med["stowage"], med["stowage-tls"], med["nginx"], med["nginx-tls"], med["direct"]
    out = []

    def add(row, want, value, peer, ratio, ok):
        out.append({"row": row, "target": want, "stowage": value, "peer": peer, "ratio": ratio,
                    "pass": None if ok is None else bool(ok)})

    def both(x, a, b):
        return None if x.get(a) is None and x.get(b) is None else [x.get(a), x.get(b)]

    for client, label in (("skopeo", "1 distant: skopeo copy 16 x 2 MiB (s)"),
                          ("docker", "1 distant: docker pull 16 x 2 MiB (s)")):
        k = "distant_%s_s" % client
        r = s.get(k + "_vs_direct")
        add(label, "<= 0.75 x direct (aim 0.3)", s.get(k), "direct %s; nginx %s x, distribution %s x" % (
            num(up.get(k)), num(n.get(k + "_vs_direct")), num(med["distribution"].get(k + "_vs_direct"))),
            r, None if up.get(k) is None else r is not None and r <= 0.75)
    r = t.get("warm_cpu_s_per_gib_vs_peer")
    add("2 TLS warm blobs: CPU s/GiB", "<= 0.7 x nginx TLS (aim 0.5)", t.get("warm_cpu_s_per_gib"),
        "nginx TLS %s" % num(nt.get("warm_cpu_s_per_gib")), r,
        None if nt.get("warm_cpu_s_per_gib") is None else r is not None and r <= 0.7)
    add("2 TLS storm: TTFB p50 / max (ms)", "p50 <= 10 ms", both(t, "ttfb_p50_ms", "ttfb_max_ms"),
        "nginx TLS %s; upstream answered stowage in %s ms" % (
            tv(both(nt, "ttfb_p50_ms", "ttfb_max_ms")), num(t.get("upstream_header_ms"))),
        t.get("ttfb_p50_ms_vs_peer"),
        None if not t else t.get("ttfb_p50_ms") is not None and t["ttfb_p50_ms"] <= 10)
    r = s.get("cold_gbps_vs_peer")
    add("3 cold 128 MiB blob: GB/s", ">= 1 x nginx", s.get("cold_gbps"), "nginx %s" % num(n.get("cold_gbps")), r,
        None if n.get("cold_gbps") is None else r is not None and r >= 1)
    r = s.get("skopeo_cold_s_vs_peer")
    add("3 skopeo 40 layers cold (s)", "<= 1 x nginx", s.get("skopeo_cold_s"), "nginx %s" % num(n.get("skopeo_cold_s")),
        r, None if n.get("skopeo_cold_s") is None else r is not None and r <= 1)
    for kind in ("digest", "tag"):
        k = "manifest_%s_rps" % kind
        r = s.get(k + "_vs_peer")
        add("4 manifest by %s, logs on: req/s" % kind, ">= 1 x nginx", s.get(k), "nginx %s" % num(n.get(k)), r,
            None if n.get(k) is None else r is not None and r >= 1)
    ls = [s.get("manifest_digest_log_lines_per_req"), s.get("manifest_tag_log_lines_per_req")]
    ln = [n.get("manifest_digest_log_lines_per_req"), n.get("manifest_tag_log_lines_per_req")]
    add("4 access log lines per request (digest / tag)", ">= 0.99, both servers", ls, "nginx %s" % tv(ln), None,
        None if None in ln else None not in ls and min(ls) >= 0.99 and min(ln) >= 0.99)
    add("5 storm of curl processes: TTFB p50 / max (ms)", "<= 10 / 50 ms", both(s, "pstorm_ttfb_p50_ms", "pstorm_ttfb_max_ms"),
        "nginx %s; upstream answered stowage in %s ms" % (
            tv(both(n, "pstorm_ttfb_p50_ms", "pstorm_ttfb_max_ms")), num(s.get("pstorm_upstream_header_ms"))),
        s.get("pstorm_ttfb_p50_ms_vs_peer"),
        None if s.get("pstorm_ttfb_p50_ms") is None and n.get("pstorm_ttfb_p50_ms") is None else
        s.get("pstorm_ttfb_p50_ms") is not None and s["pstorm_ttfb_p50_ms"] <= 10
        and s.get("pstorm_ttfb_max_ms") is not None and s["pstorm_ttfb_max_ms"] <= 50)
    status = s.get("cluster_status")
    ran = status == "ran"
    add("issue 10: 3 nodes storm: upstream GETs", "== 1", s.get("cluster_upstream_gets") if ran else status, None, None,
        None if not ran else s.get("cluster_upstream_gets") == 1)
    r = s.get("cluster_nonowner_vs_owner")
    add("issue 10: TTFB p50 non-owner / owner", "<= 2", r if ran else status,
        "owner %s ms" % num(s.get("cluster_owner_ttfb_p50_ms")) if ran else None, r,
        None if not ran else r is not None and r <= 2)
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


def tv(v):
    return " / ".join(num(x) for x in v) if isinstance(v, list) else num(v)


def fmt(v, f):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def tables(med, tgts, tgts13):
    cols = [m for m in MIRRORS if med.get(m)]
    rows = [[label] + [fmt(med[m].get(k), f) for m in cols] for k, label, f in ROWS
            if any(med[m].get(k) is not None for m in cols)]
    head = ["metric (median of runs)"] + [HEAD[m] for m in cols]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    text = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in [head] + rows]
    text.append(FOOTNOTE)
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", FOOTNOTE]
    pf = lambda p: "n/a" if p is None else ("PASS" if p else "FAIL")

    def aligned(rows):
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]

    def markdown(rows, align):
        return (["| " + " | ".join(rows[0]) + " |", "|" + "|".join(align) + "|"]
                + ["| " + " | ".join(r) + " |" for r in rows[1:]])

    t6 = [["target (issue 6)", "wanted", "stowage", ""]]
    t6 += [[t["row"], t["target"], tv(t["stowage"]), pf(t["pass"])] for t in tgts]
    t13 = [["target (issue 13; issue 10)", "wanted", "stowage", "peer (same runs)", "ratio", ""]]
    t13 += [[t["row"], t["target"], tv(t["stowage"]), t["peer"] or "-", num(t["ratio"]), pf(t["pass"])]
            for t in tgts13]
    ttext = aligned(t6) + [""] + aligned(t13)
    tmd = markdown(t6, ["---", "---", "---:", "---"]) + [""] + markdown(t13, ["---", "---", "---:", "---", "---:", "---"])
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
                       ("skopeo", ["skopeo", "--version"]), ("wrk", ["wrk", "-v"]), ("curl", ["curl", "--version"]),
                       ("dockerd", ["dockerd", "--version"]), ("containerd", ["containerd", "--version"])):
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
            v[name] = p.stdout.decode().strip().splitlines()[0]
        except Exception:
            v[name] = None
    return v


def load_line(whole, runs):
    return ("machine load: other processes (other engineers' builds, ...) used %.2f of %s cores on average "
            "(runs: %s), steal %.2f cores; 1-min load average %s at the start, %s at the end" % (
                whole["other_cores"], os.cpu_count(), ", ".join("%.2f" % r["load"]["other_cores"] for r in runs),
                whole["steal_cores"], whole["loadavg_1m"][0], whole["loadavg_1m"][1]))


def report(result, runs):
    """Ratios, medians, targets and tables from the runs' figures, into
    `result`; returns the text table, targets text and load line."""
    for run in runs:
        add_ratios(run)
    med = summarize(runs)
    tg, tg13 = targets(med), targets13(med)
    text, md, ttext, tmd = tables(med, tg, tg13)
    result.update(median=med, targets=tg, targets_issue13=tg13, runs=runs, table_markdown=md, targets_markdown=tmd)
    return text, ttext, load_line(result["load"], runs)


def write_results(result, out, loadline):
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(out[:-5] + ".md" if out.endswith(".json") else out + ".md", "w") as f:
        f.write("%s, %d run(s), stowage %s, machine: %s\n\n%s\n\n%s\n\n%s\n%s" % (
            result["finished"], len(result["runs"]), result["versions"].get("stowage_commit"),
            json.dumps(result["machine"]), loadline, result["table_markdown"], result["targets_markdown"],
            "".join("\nnote: %s\n" % n for n in result.get("notes", []))))


def render(path):
    """--render: the tables and targets of a results file again, from its
    runs' figures (after a change to the rows, ratios or targets); the
    measured figures are not touched. Rewrites the file and its .md."""
    with open(path) as f:
        result = json.load(f)
    text, ttext, loadline = report(result, result["runs"])
    print(loadline)
    print(text)
    print()
    print(ttext)
    write_results(result, path, loadline)
    print("\nrewrote " + path)
    return 0


def merge(run, col, res):
    r = run.setdefault(col, {})
    for k, v in res.items():
        if k == "errors":
            r.setdefault("errors", []).extend(v)
        else:
            r[k] = v


# ------------------------------------------------------------------ main

KINDS = ["stowage", "stowage-tls", "stowage-1g", "distribution", "nginx", "nginx-tls", "distant", "cluster"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stowage", help="stowage binary (required unless --render)")
    ap.add_argument("--client", help="bench-client binary (required unless --render)")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only rebuild the tables and targets of a results file from its runs' figures "
                         "(rewrites it and its .md)")
    ap.add_argument("--shaper", help="bench-shaper binary (default: next to --client)")
    ap.add_argument("--runs", type=int, default=3, help="runs (each mirror from a cold cache every run); medians reported")
    ap.add_argument("--mirrors", help="comma-separated subset of %s (default: all; with --smoke all but cluster)"
                    % ",".join(KINDS))
    ap.add_argument("--dockerd", choices=["auto", "on", "off"], default="auto",
                    help="docker pulls in the distant scenario (a private dockerd): auto = on unless --smoke, "
                         "and skipped with a note if dockerd cannot start; on = a failure to start is an error")
    ap.add_argument("--rtt-ms", type=float, default=100, help="distant upstream: round-trip time")
    ap.add_argument("--rate-mibps", type=float, default=16, help="distant upstream: MiB/s per connection")
    ap.add_argument("--init-cwnd", type=int, default=10,
                    help="distant upstream: initial congestion window in segments (0: no slow start)")
    ap.add_argument("--scale", type=int, default=1, help="divide big blob sizes by this (smoke: 64)")
    ap.add_argument("--clients", type=int, default=32, help="storm clients (threads, curl processes, over 3 nodes)")
    ap.add_argument("--warm-requests", type=int, default=32)
    ap.add_argument("--warm-concurrency", type=int, default=8)
    ap.add_argument("--wrk-seconds", type=int, default=5)
    ap.add_argument("--verify", default="cmp", choices=["cmp", "sha256"],
                    help="cmp: each body compared with the generated blob file, whose sha256 is its name "
                         "(default); sha256: each body hashed by the client")
    ap.add_argument("--perf", metavar="DIR", help="perf record the servers during storm and warm into DIR")
    ap.add_argument("--out", help="JSON results file (default bench/results/<date>-<commit>.json)")
    ap.add_argument("--workdir", help="scratch directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="do not touch the free memory before the runs (see warm_free_memory(); --smoke does not)")
    ap.add_argument("--smoke", action="store_true", help="check that everything works, no results file; "
                    "exit 1 if any body failed verification or a scenario failed")
    args = ap.parse_args()
    if args.render:
        return render(args.render)
    if not args.stowage or not args.client:
        ap.error("--stowage and --client are required")
    if not args.shaper:
        args.shaper = os.path.join(os.path.dirname(os.path.abspath(args.client)), "bench-shaper")
    if args.mirrors:
        kinds = [k.strip() for k in args.mirrors.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            ap.error("unknown --mirrors %s" % ",".join(unknown))
    else:
        kinds = [k for k in KINDS if not (args.smoke and k == "cluster")]
    use_dockerd = "distant" in kinds and (args.dockerd == "on" or (args.dockerd == "auto" and not args.smoke))

    work = args.workdir or tempfile.mkdtemp(prefix="stowage-bench.")
    os.makedirs(work, exist_ok=True)
    log("work dir " + work)
    up = None
    b = None
    load = MachineLoad()
    snap0 = load.snap()
    notes = []
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        up = Upstream(work)
        load.services.append(up.svc)
        images = seed(work, up, args.scale)
        os.sync()
        b = Bench(args, work, images, up)
        b.tls = make_tls(work)
        if "distant" in kinds:
            b.shaper = Shaper(args.shaper, up, os.path.join(work, "shaper"), args.rtt_ms, args.rate_mibps, args.init_cwnd)
            load.services.append(b.shaper.svc)
            log("distant upstream (bench-shaper) on %s: %s" % (b.shaper.url, b.shaper.settings))
            if use_dockerd:
                try:
                    b.dockerd = Dockerd(work)
                    load.services += b.dockerd.services
                    log("dockerd %s (storage driver %s)" % (b.dockerd.version, b.dockerd.driver))
                except Exception as e:
                    if args.dockerd == "on":
                        raise
                    notes.append("docker pulls skipped: %s" % str(e)[:300])
                    log(notes[-1])
        mid = images["large"]["layers"][2]
        # Direct from the upstream, for the cold-blob ratio.
        direct = []
        up.page_in([mid, images["large"]["layers"][3]])
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
        warm_free_memory(args)
        runs = []
        for i in range(args.runs):
            log("=== run %d of %d" % (i + 1, args.runs))
            s0 = load.snap()
            run = {"direct": dict({k: v for k, v in dstorm.items() if k != "verified"}, cold_gbps=direct_gbps)}
            run_dir = os.path.join(work, "run%d" % i)
            # Rotate the order so that no mirror always goes first.
            for k in rotate(kinds, i):
                try:
                    if k == "distant":
                        for col, r in distant(b, run_dir, i).items():
                            merge(run, col, r)
                    else:
                        merge(run, k, run_mirror(b, k, run_dir, direct_gbps))
                except Exception as e:
                    log("%s FAILED: %s" % (k, e))
                    merge(run, k, {"errors": [str(e)[:500]]})
            run["load"] = MachineLoad.delta(s0, load.snap())
            log("run %d: other processes used %.2f cores on average (1-min load average %s)" % (
                i + 1, run["load"]["other_cores"], run["load"]["loadavg_1m"]))
            runs.append(run)
        whole = MachineLoad.delta(snap0, load.snap())
        finished = datetime.datetime.now(datetime.timezone.utc)
        vers = versions(args.stowage)
        result = {
            "date": finished.strftime("%Y-%m-%d"),
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "machine": machine(),
            "load": whole,
            "versions": vers | ({"dockerd_storage_driver": b.dockerd.driver} if b.dockerd else {}),
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("stowage", "client", "shaper", "workdir", "out", "render")},
            "sizes": {n: [l["size"] for l in img["layers"]] for n, img in images.items()},
            "direct_gbps_samples": direct,
            "direct_storm": dstorm,
            "notes": notes,
        }
        text, ttext, loadline = report(result, runs)  # adds medians, targets, tables, runs
        med = result["median"]
        print()
        print("stowage benchmarks, %s, %d run(s), %s" % (finished.strftime("%Y-%m-%d %H:%M UTC"), len(runs),
                                                        "%(cores)s cores, %(memory_gib)s GiB" % machine()))
        print(loadline)
        print(text)
        print()
        if args.smoke:
            print("(smoke run: blobs at 1/%d size, one run: the PASS/FAIL below mean nothing)" % args.scale)
        print(ttext)
        for n in notes:
            print("note: " + n)
        errors = ["run %d, %s: %s" % (i + 1, k, e) for i, r in enumerate(runs) for k, v in r.items()
                  for e in (v.get("errors") or [])]
        result["errors"] = errors
        failed_bodies = any(isinstance(v, str) and re.fullmatch(r"\d+/\d+", v) and v.split("/")[0] != v.split("/")[1]
                            for m in med.values() for k, v in m.items() if "verified" in k)
        if errors:
            print("\nscenario errors:\n  " + "\n  ".join(errors))
        if not args.smoke:
            name = finished.strftime("%Y-%m-%d") + ("-" + vers["stowage_commit"] if vers.get("stowage_commit") else "")
            out = args.out or os.path.join(HERE, "results", name + ".json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            write_results(result, out, loadline)
            print("\nwrote " + out)
        if args.smoke:
            ok = not errors and not failed_bodies
            print("bench smoke: %d passed, %d failed" % (1 if ok else 0, 0 if ok else 1))
            return 0 if ok else 1
        return 0
    finally:
        if b and b.dockerd:
            b.dockerd.stop()
        if b and b.shaper:
            b.shaper.svc.stop()
        if up:
            up.svc.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
