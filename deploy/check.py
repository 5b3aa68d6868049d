#!/usr/bin/env python3
"""Checks everything in deploy/; exits non-zero on any problem.

    python3 deploy/check.py               (from anywhere; run by .ci/run)
    python3 deploy/check.py --regenerate  (first rewrites the Kubernetes
                                           PrometheusRule from alerts.yml)

Needs PyYAML (Debian: python3-yaml), systemd-analyze and systemd-sysusers
(Debian: systemd), and promtool: taken from PATH, or extracted from Debian's
`prometheus` package into target/deploy-tools/ (`apt-get download`, never
installed, so no Prometheus service is started).

What it checks:
  * every YAML / JSON / TOML file in deploy/ parses;
  * the systemd unit passes `systemd-analyze verify`, its exposure score
    (`systemd-analyze security --offline`) stays low, and the sysusers.d file
    is accepted by `systemd-sysusers`;
  * every stowage configuration shipped (systemd, container, compose, the
    Kubernetes ConfigMap) passes `stowage check-config`;
  * the alert rules pass `promtool check rules` and their unit tests
    (`promtool test rules`), and the Kubernetes PrometheusRule holds the
    same groups;
  * every dashboard query is valid PromQL (promtool, as recording rules),
    panels do not overlap, and only defined variables are used;
  * Kubernetes manifests are consistent: selectors match pod labels, probe
    and Service ports name container ports, volumes and ConfigMaps/Secrets
    exist, the config's listen/admin/cache_dir match ports and mounts, the
    ServiceMonitor finds the admin port, the pod meets the "restricted" Pod
    Security Standard, and the node hosts.toml uses the node port;
  * the Containerfile is multi-stage, runs as non-root with the cache on a
    volume, and copies only files that exist and are in the build context;
  * the compose file builds with that Containerfile once, mounts files that
    exist, declares its volumes, publishes the configured ports; in cluster
    mode every peer is a node advertising itself, each with its own cache,
    and the store's endpoint is a service of the file;
  * Kubernetes cluster mode: several replicas, peers_dns naming a headless
    Service on the registry port, --advertise from the pod IP.

That the dashboard and alerts query only metrics stowage exports is checked
by `cargo test --test deploy` (it needs the metric registry).
"""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("deploy/check.py needs PyYAML (apt-get install python3-yaml)")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROBLEMS = []
PASSED = []


def problem(where, message):
    PROBLEMS.append(f"{where}: {message}")


def ok(what):
    PASSED.append(what)


def rel(p):
    return str(Path(p).relative_to(ROOT))


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------ parsing

def load_all():
    """Parses every data file; returns {path: [documents]}."""
    docs = {}
    for p in sorted(DEPLOY.rglob("*")):
        if not p.is_file():
            continue
        try:
            if p.suffix in (".yaml", ".yml"):
                docs[p] = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            elif p.suffix == ".json":
                docs[p] = [json.loads(p.read_text())]
            elif p.suffix == ".toml":
                docs[p] = [tomllib.loads(p.read_text())]
            else:
                continue
        except Exception as e:  # noqa: BLE001 - any parse error is a finding
            problem(rel(p), f"does not parse: {e}")
            continue
        ok(f"parses: {rel(p)}")
    return docs


# ------------------------------------------------------------------ stowage

def stowage_binary():
    for profile in ("debug", "release"):
        b = ROOT / "target" / profile / "stowage"
        if b.is_file() and os.access(b, os.X_OK):
            return b
    print("building stowage for check-config (cargo build --bin stowage)")
    r = run(["cargo", "build", "--quiet", "--bin", "stowage"], cwd=ROOT)
    if r.returncode != 0:
        problem("cargo build", r.stderr.strip()[-2000:])
        return None
    return ROOT / "target" / "debug" / "stowage"


def check_config_text(binary, where, text):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
        name = f.name
    try:
        r = run([str(binary), "check-config", name])
    finally:
        os.unlink(name)
    if r.returncode != 0:
        problem(where, f"stowage check-config: {r.stderr.strip() or r.stdout.strip()}")
    else:
        ok(f"stowage check-config: {where}")


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


# ------------------------------------------------------------------ systemd

def check_systemd(binary):
    unit = DEPLOY / "systemd" / "stowage.service"
    text = unit.read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=",
                "ExecReload=/bin/kill -HUP $MAINPID"):
        if key not in text:
            problem(rel(unit), f"lacks {key}")
    if not re.search(r"^(DynamicUser=yes|User=\S+)", text, re.M):
        problem(rel(unit), "runs as root: set User= or DynamicUser=yes")
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.M)
    if not exec_start:
        problem(rel(unit), "no ExecStart=")
        return
    if shutil.which("systemd-analyze") is None:
        problem(rel(unit), "systemd-analyze not found (apt-get install systemd)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        # verify insists that ExecStart's binary exists: point it at the
        # built one (or a stub), everything else unchanged.
        target = binary if binary else Path(tmp) / "stowage-stub"
        if not binary:
            target.write_text("#!/bin/sh\n")
            target.chmod(0o755)
        copy = Path(tmp) / "stowage.service"
        copy.write_text(text.replace(f"ExecStart={exec_start.group(1)}", f"ExecStart={target}"))
        r = run(["systemd-analyze", "verify", "--man=no", str(copy)])
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            problem(rel(unit), f"systemd-analyze verify: {out or r.returncode}")
        else:
            ok(f"systemd-analyze verify: {rel(unit)}")
        r = run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(copy)])
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        if r.returncode != 0:
            problem(rel(unit), f"systemd-analyze security: exposure too high: {score.group(1) if score else r.stdout[-500:]}")
        else:
            ok(f"systemd-analyze security {score.group(1) if score else '?'} <= 2.0: {rel(unit)}")
        sysusers = DEPLOY / "systemd" / "stowage.sysusers.conf"
        root = Path(tmp) / "root"
        (root / "etc").mkdir(parents=True)
        r = run(["systemd-sysusers", f"--root={root}", str(sysusers)])
        passwd = (root / "etc" / "passwd").read_text() if (root / "etc" / "passwd").exists() else ""
        user = re.search(r"^User=(\S+)", text, re.M)
        if r.returncode != 0:
            problem(rel(sysusers), f"systemd-sysusers: {r.stderr.strip()}")
        elif user and not passwd.startswith(f"{user.group(1)}:"):
            problem(rel(sysusers), f"does not create the unit's User={user.group(1)}")
        else:
            ok(f"systemd-sysusers: {rel(sysusers)}")
    cache = re.search(r"^ReadWritePaths=(\S+)", text, re.M)
    cfg = tomllib.loads((DEPLOY / "systemd" / "stowage.toml").read_text())
    if cache and cfg.get("cache_dir") != cache.group(1):
        problem(rel(unit), f"ReadWritePaths={cache.group(1)} but stowage.toml has cache_dir {cfg.get('cache_dir')!r}")


# ------------------------------------------------------------------ promtool

def promtool():
    found = shutil.which("promtool")
    if found:
        return found
    tools = ROOT / "target" / "deploy-tools"
    cached = tools / "usr" / "bin" / "promtool"
    if cached.is_file():
        return str(cached)
    tools.mkdir(parents=True, exist_ok=True)
    print("fetching promtool from Debian's prometheus package (apt-get download)")
    r = run(["apt-get", "download", "prometheus"], cwd=tools)
    if r.returncode != 0:
        run(["apt-get", "update", "-qq"])
        r = run(["apt-get", "download", "prometheus"], cwd=tools)
    debs = sorted(tools.glob("prometheus_*.deb"))
    if r.returncode != 0 or not debs:
        problem("promtool", f"cannot fetch Debian's prometheus package: {r.stderr.strip()[-500:]}")
        return None
    r = run(["dpkg-deb", "-x", str(debs[-1]), str(tools)])
    for d in debs:
        d.unlink()
    if r.returncode != 0 or not cached.is_file():
        problem("promtool", f"cannot extract promtool: {r.stderr.strip()}")
        return None
    return str(cached)


def check_alerts(docs, tool):
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    tests = DEPLOY / "prometheus" / "alerts_test.yml"
    rule = DEPLOY / "kubernetes" / "prometheusrule.yaml"
    groups = docs.get(alerts, [{}])[0].get("groups")
    names = set()
    for g in groups or []:
        for r in g.get("rules", []):
            names.add(r.get("alert"))
            for key in ("expr", "labels", "annotations"):
                if key not in r:
                    problem(rel(alerts), f"rule {r.get('alert')} lacks {key}")
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problem(rel(alerts), f"rule {r.get('alert')}: severity must be critical, warning or info")
    for required in ("StowageUpstreamFailing", "StowageCacheNearBudget",
                     "StowageDigestMismatch", "StowageServingStale"):
        if required not in names:
            problem(rel(alerts), f"no {required} alert")
    operator = docs.get(rule, [{}])[0]
    if operator.get("kind") != "PrometheusRule" or operator.get("spec", {}).get("groups") != groups:
        problem(rel(rule), f"spec.groups differs from {rel(alerts)}: regenerate it")
    else:
        ok(f"{rel(rule)} == {rel(alerts)}")
    if not tool:
        return
    for cmd, what in (([tool, "check", "rules", str(alerts)], "promtool check rules"),
                      ([tool, "test", "rules", str(tests)], "promtool test rules")):
        r = run(cmd, cwd=alerts.parent)
        if r.returncode != 0:
            problem(rel(alerts), f"{what}:\n{r.stdout}{r.stderr}")
        else:
            ok(f"{what}: {rel(alerts)}")


# ------------------------------------------------------------------ grafana

def check_dashboard(docs, tool):
    path = DEPLOY / "grafana" / "stowage.json"
    dash = docs.get(path, [None])[0]
    if not isinstance(dash, dict):
        return
    where = rel(path)
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    builtin = {"__rate_interval", "__interval", "__range"}
    ids, cells, exprs = set(), {}, []
    for p in dash.get("panels", []):
        pid = p.get("id")
        if pid in ids:
            problem(where, f"panel id {pid} used twice")
        ids.add(pid)
        g = p.get("gridPos", {})
        x, y, w, h = g.get("x", 0), g.get("y", 0), g.get("w", 0), g.get("h", 0)
        if x < 0 or w <= 0 or h <= 0 or x + w > 24:
            problem(where, f"panel {p.get('title')!r}: gridPos {g} is outside the 24 columns")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    problem(where, f"panels {cells[(cx, cy)]!r} and {p.get('title')!r} overlap")
                    break
                cells[(cx, cy)] = p.get("title")
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        ds = p.get("datasource", {})
        if ds.get("uid") != "${datasource}":
            problem(where, f"panel {p.get('title')!r} does not use the $datasource variable")
        targets = p.get("targets") or []
        if not targets:
            problem(where, f"panel {p.get('title')!r} has no queries")
        for t in targets:
            expr = t.get("expr", "")
            if not expr:
                problem(where, f"panel {p.get('title')!r}: target {t.get('refId')} has no expr")
            exprs.append((p.get("title"), expr))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            inner = q["query"][len("label_values("):-1].rsplit(",", 1)[0]
            exprs.append((f"variable {v['name']}", inner))
    for title, expr in exprs:
        for var in re.findall(r"\$\{?(\w+)", expr):
            if var not in variables and var not in builtin:
                problem(where, f"{title!r} uses undefined variable ${var}")
    ok(f"dashboard structure: {where} ({len(exprs)} queries)")
    if not tool:
        return
    # Valid PromQL: every query as a recording rule, variables filled in.
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, (title, expr) in enumerate(exprs):
        e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
        e = re.sub(r"\$\{?\w+\}?", ".*", e)
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
        name = f.name
    try:
        r = run([tool, "check", "rules", name])
    finally:
        os.unlink(name)
    if r.returncode != 0:
        problem(where, f"invalid PromQL:\n{r.stdout}{r.stderr}")
    else:
        ok(f"promtool: {len(exprs)} dashboard queries are valid PromQL")


# ------------------------------------------------------------------ kubernetes

def k8s_objects(docs):
    objs = {}
    for p, ds in docs.items():
        if DEPLOY / "kubernetes" not in p.parents:
            continue
        for d in ds:
            if isinstance(d, dict) and "kind" in d and d.get("kind") != "Kustomization":
                name = d.get("metadata", {}).get("name")
                if not d.get("apiVersion") or not name:
                    problem(rel(p), f"{d.get('kind')} lacks apiVersion or metadata.name")
                objs.setdefault(d["kind"], {})[name] = (p, d)
    return objs


def matches(selector, labels):
    for k, v in (selector.get("matchLabels") or selector).items():
        if k in ("matchLabels", "matchExpressions"):
            continue
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []) or []:
        present = e["key"] in labels
        if e["operator"] == "DoesNotExist" and present:
            return False
        if e["operator"] == "Exists" and not present:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e.get("values", []):
            return False
    return True


def services_of(objs):
    return objs.get("Service", {})


def check_k8s_cluster(where, spec, c, cluster, services, ports, mounts, objs, namespace):
    """Cluster mode: several replicas that find each other through a
    headless Service (peers_dns), each advertising its pod IP."""
    if spec.get("replicas", 1) < 2:
        problem(where, "[cluster] with fewer than 2 replicas")
    dns = cluster.get("peers_dns")
    if dns:
        host, _, port = dns.rpartition(":")
        labels = host.split(".")
        svc = services.get(labels[0])
        if not svc:
            problem(where, f"peers_dns {dns}: no Service {labels[0]} here")
        else:
            s = svc[1]["spec"]
            if s.get("clusterIP") != "None":
                problem(rel(svc[0]), f"Service {labels[0]} (peers_dns) must be headless (clusterIP: None)")
            if int(port) not in [sp["port"] for sp in s["ports"]] or int(port) != ports.get("registry"):
                problem(where, f"peers_dns port {port} is not the registry port of Service {labels[0]}")
            if not s.get("publishNotReadyAddresses"):
                problem(rel(svc[0]), f"Service {labels[0]}: publishNotReadyAddresses lets starting replicas see each other")
        if len(labels) > 1 and namespace and labels[1] != namespace:
            problem(where, f"peers_dns {dns} is not in the namespace {namespace}")
        if spec.get("serviceName") != labels[0]:
            problem(where, f"serviceName should be the headless Service {labels[0]}")
    elif len(cluster.get("peers", [])) < 2:
        problem(where, "[cluster] needs peers_dns or a list of peers")
    args = c.get("args", [])
    if "--advertise" not in args and "advertise" not in cluster:
        problem(where, "no --advertise and no cluster.advertise: a node must say how peers reach it")
    if "--advertise" in args:
        adv = args[args.index("--advertise") + 1]
        m = re.match(r"https?://\$\(POD_IP\):(\d+)$", adv)
        if not m or int(m.group(1)) != ports.get("registry"):
            problem(where, f"--advertise {adv} should be http://$(POD_IP):<registry port>")
        env = {e["name"]: e for e in c.get("env", [])}
        field = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field != "status.podIP":
            problem(where, "env POD_IP must come from fieldRef status.podIP")
    secret_file = cluster.get("secret_file")
    if secret_file and not any(secret_file.startswith(m + "/") for m in mounts.values()):
        problem(where, f"cluster.secret_file {secret_file} is not under a mounted volume")
    ok(f"kubernetes cluster mode: {spec.get('replicas')} replicas, peers through {dns or 'a list'}")


def check_kubernetes(docs, binary):
    kdir = DEPLOY / "kubernetes"
    kust = docs.get(kdir / "kustomization.yaml", [{}])[0]
    for r in kust.get("resources", []):
        if not (kdir / r).is_file():
            problem(rel(kdir / "kustomization.yaml"), f"resource {r} does not exist")
    listed = {kdir / r for r in kust.get("resources", [])}
    for p in kdir.glob("*.yaml"):
        if p.name != "kustomization.yaml" and p not in listed:
            problem(rel(p), "not listed in kustomization.yaml")
    objs = k8s_objects(docs)
    sts_all = objs.get("StatefulSet", {}) | objs.get("Deployment", {})
    if len(sts_all) != 1:
        problem("deploy/kubernetes", f"expected one StatefulSet or Deployment, found {list(sts_all)}")
        return
    (path, sts), = sts_all.values()
    where = rel(path)
    spec = sts["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"].get("labels", {})
    if not matches(spec["selector"], pod_labels):
        problem(where, "selector does not match the pod template's labels")
    pspec = pod["spec"]
    containers = pspec["containers"]
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe in ("readinessProbe", "livenessProbe"):
        pr = c.get(probe)
        if not pr:
            problem(where, f"no {probe}")
            continue
        port = pr.get("httpGet", {}).get("port")
        if port not in ports:
            problem(where, f"{probe} uses port {port!r}, not a container port")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problem(where, "readinessProbe must GET /readyz")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problem(where, "livenessProbe must GET /healthz")
    # Restricted Pod Security Standard.
    psc, csc = pspec.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and psc.get("runAsUser", 0) != 0):
        problem(where, "pod must run as a non-root user")
    if (psc.get("seccompProfile") or csc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
        problem(where, "seccompProfile must be RuntimeDefault")
    if csc.get("allowPrivilegeEscalation") is not False:
        problem(where, "allowPrivilegeEscalation must be false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problem(where, "capabilities must drop ALL")
    if not csc.get("readOnlyRootFilesystem"):
        problem(where, "readOnlyRootFilesystem should be true")
    # Volumes.
    volumes = {v["name"]: v for v in pspec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    for name in mounts:
        if name not in volumes and name not in claims:
            problem(where, f"volumeMount {name} has no volume or claim")
    if not claims:
        problem(where, "no PersistentVolumeClaim for the cache")
    config_text = None
    for v in volumes.values():
        if "configMap" in v:
            cm = objs.get("ConfigMap", {}).get(v["configMap"]["name"])
            if not cm:
                problem(where, f"ConfigMap {v['configMap']['name']} is not in deploy/kubernetes")
            else:
                config_text = cm[1].get("data", {}).get("stowage.toml")
        if "secret" in v and v["secret"]["secretName"] not in objs.get("Secret", {}):
            problem(where, f"Secret {v['secret']['secretName']} is not in deploy/kubernetes")
    args = c.get("args", [])
    if config_text is None:
        problem(where, "no ConfigMap with stowage.toml mounted")
    else:
        cfg = tomllib.loads(config_text)
        if binary:
            check_config_text(binary, "deploy/kubernetes/configmap.yaml stowage.toml", config_text)
        if "--config" in args:
            conf_path = args[args.index("--config") + 1]
            if not any(conf_path.startswith(m + "/") for m in mounts.values()):
                problem(where, f"--config {conf_path} is not under a mounted volume")
        if port_of(cfg.get("listen", "0.0.0.0:5000")) != ports.get("registry"):
            problem(where, "container port `registry` differs from the config's listen port")
        admin = cfg.get("admin_listen", "127.0.0.1:9090")
        if not str(admin).startswith("0.0.0.0:"):
            problem("deploy/kubernetes/configmap.yaml", "admin_listen must listen on 0.0.0.0 for the probes")
        elif port_of(admin) != ports.get("admin"):
            problem(where, "container port `admin` differs from the config's admin_listen port")
        if cfg.get("cache_dir") != mounts.get(next(iter(claims), None)):
            problem(where, "cache_dir is not the PersistentVolumeClaim's mount path")
        if cfg.get("cluster"):
            check_k8s_cluster(where, spec, c, cfg["cluster"], services_of(objs), ports, mounts,
                              objs, kust.get("namespace"))
        grace = pspec.get("terminationGracePeriodSeconds", 30)
        shutdown = cfg.get("shutdown_timeout", "30s")
        if shutdown.endswith("s") and int(shutdown[:-1]) >= grace:
            problem(where, f"terminationGracePeriodSeconds {grace} must exceed shutdown_timeout {shutdown}")
    for ef in c.get("envFrom", []):
        ref = ef.get("secretRef", {}).get("name")
        if ref and ref not in objs.get("Secret", {}):
            problem(where, f"envFrom Secret {ref} is not in deploy/kubernetes")
    # Services.
    services = services_of(objs)
    node_ports = set()
    for name, (p, svc) in services.items():
        if not matches(svc["spec"].get("selector", {}), pod_labels):
            problem(rel(p), f"Service {name} selects no pod of the StatefulSet")
        for sp in svc["spec"]["ports"]:
            tp = sp.get("targetPort", sp["port"])
            if tp not in ports and tp not in ports.values():
                problem(rel(p), f"Service {name} port {sp['name']}: targetPort {tp} is no container port")
            if "nodePort" in sp:
                node_ports.add(sp["nodePort"])
                if tp in ("admin", ports.get("admin")):
                    problem(rel(p), f"Service {name} exposes the admin port on nodes")
    if spec.get("serviceName") not in services:
        problem(where, f"serviceName {spec.get('serviceName')} is not a Service here")
    # ServiceMonitor -> exactly one Service, with the admin port.
    for name, (p, sm) in objs.get("ServiceMonitor", {}).items():
        selected = [s for s in services.values() if matches(sm["spec"]["selector"], s[1]["metadata"].get("labels", {}))]
        if len(selected) != 1:
            problem(rel(p), f"ServiceMonitor {name} selects {len(selected)} Services, expected 1")
            continue
        svc_ports = {sp["name"]: sp for sp in selected[0][1]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            sp = svc_ports.get(ep.get("port"))
            if not sp or sp.get("targetPort") not in ("admin", ports.get("admin")):
                problem(rel(p), f"endpoint port {ep.get('port')!r} is not the Service's admin port")
            if ep.get("path", "/metrics") != "/metrics":
                problem(rel(p), "endpoint path must be /metrics")
    if "ServiceMonitor" not in objs:
        problem("deploy/kubernetes", "no ServiceMonitor")
    # containerd hosts.toml for nodes.
    for hosts in kdir.glob("containerd/certs.d/*/hosts.toml"):
        h = docs.get(hosts, [{}])[0]
        if not h.get("server", "").startswith("https://"):
            problem(rel(hosts), "server must be the upstream registry's https URL")
        mirrors = h.get("host", {})
        if not mirrors:
            problem(rel(hosts), "no [host.\"...\"] mirror entry")
        for url, entry in mirrors.items():
            if set(entry.get("capabilities", [])) != {"pull", "resolve"}:
                problem(rel(hosts), f"{url}: capabilities must be pull and resolve (a mirror cannot push)")
            m = re.match(r"https?://[^/]+:(\d+)$", url)
            if not m or int(m.group(1)) not in node_ports:
                problem(rel(hosts), f"{url} does not use a node port of service.yaml ({sorted(node_ports)})")
        ok(f"containerd hosts.toml: {rel(hosts)}")
    ok("kubernetes manifests are consistent")


# ------------------------------------------------------------------ container

def dockerignore_allows(path):
    """Whether the root .dockerignore keeps `path` (repo-relative) in the
    build context (last matching pattern wins)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.is_file():
        return True
    keep = True
    for line in ignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            keep = neg
    return keep


def check_container(binary):
    cf = DEPLOY / "container" / "Containerfile"
    where = rel(cf)
    lines = []
    for raw in re.sub(r"\\\n", " ", cf.read_text()).splitlines():
        s = raw.strip()
        if s and not s.startswith("#"):
            lines.append(s)
    stages, final = [], None
    copies, users, volumes, exposes, entry = [], [], [], [], None
    for s in lines:
        word, _, rest = s.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append(m.group(2))
            final = len(stages) - 1
            users, volumes, exposes = [], [], []
        elif word == "COPY":
            copies.append((len(stages) - 1, rest))
        elif word == "USER":
            users.append(rest.strip())
        elif word == "VOLUME":
            volumes += json.loads(rest) if rest.startswith("[") else rest.split()
        elif word == "EXPOSE":
            exposes += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "ENTRYPOINT":
            entry = rest
    if len(stages) < 2:
        problem(where, "not a multi-stage build")
    for stage, rest in copies:
        args = rest.split()
        from_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
        paths = [a for a in args if not a.startswith("--")]
        if from_stage:
            if from_stage not in stages[:stage]:
                problem(where, f"COPY --from={from_stage}: no earlier stage of that name")
            continue
        for src in paths[:-1]:
            if not (ROOT / src).exists():
                problem(where, f"COPY {src}: no such file in the repository")
            elif not dockerignore_allows(src.rstrip("/")):
                problem(where, f"COPY {src}: excluded from the build context by .dockerignore")
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problem(where, "the runtime stage must set a non-root USER")
    if not entry or not entry.startswith("["):
        problem(where, "ENTRYPOINT must use the exec form")
    cfg_path = DEPLOY / "container" / "stowage.toml"
    cfg = tomllib.loads(cfg_path.read_text())
    if binary:
        check_config_text(binary, rel(cfg_path), cfg_path.read_text())
    if cfg.get("cache_dir") not in volumes:
        problem(where, f"cache_dir {cfg.get('cache_dir')} is not a VOLUME")
    for key in ("listen", "admin_listen"):
        if port_of(cfg[key]) not in exposes:
            problem(where, f"{key} port {port_of(cfg[key])} is not EXPOSEd")
    ok(f"container build file: {where} ({len(stages)} stages, USER {users[-1] if users else '?'})")


def check_compose(docs, binary):
    """The compose file: stowage nodes built once from the Containerfile,
    each non-root and read-only with its own cache volume and a config that
    passes check-config, ports published once; in cluster mode one service
    per peer, each advertising its own URL, and the store's endpoint a
    service of the file with its credentials in the nodes' environment."""
    path = DEPLOY / "compose" / "compose.yaml"
    where = rel(path)
    comp = docs.get(path, [{}])[0]
    services = comp.get("services", {})
    nodes = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("stowage:")}
    if not nodes:
        problem(where, "no stowage service")
        return
    builds = [n for n, s in nodes.items() if s.get("build")]
    if len(builds) != 1:
        problem(where, f"the stowage image should be built by exactly one service, not {builds}")
    for n in builds:
        build = nodes[n]["build"]
        context = (path.parent / build.get("context", ".")).resolve()
        if not (context / "Cargo.toml").is_file():
            problem(where, f"{n}: build context {build.get('context')} is not the repository root")
        if not (context / build.get("dockerfile", "Dockerfile")).is_file():
            problem(where, f"{n}: dockerfile {build.get('dockerfile')} does not exist")
    declared = set((comp.get("volumes") or {}).keys())
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith(".") or src.startswith("/"):
                if not (path.parent / src).exists():
                    problem(where, f"{name} mounts {src}, which does not exist")
            elif src not in declared:
                problem(where, f"{name}: volume {src} is not declared")
    published, caches, configs = [], [], {}
    for name, svc in nodes.items():
        if str(svc.get("user", "0")).split(":")[0] in ("0", "root"):
            problem(where, f"{name} must run as a non-root user")
        if svc.get("read_only") is not True:
            problem(where, f"{name}: read_only should be true")
        published += [str(p).rsplit(":", 2)[-2] for p in svc.get("ports", [])]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        src = mounts.get("/etc/stowage/stowage.toml")
        if not src:
            problem(where, f"{name} mounts no /etc/stowage/stowage.toml")
            continue
        text = (path.parent / src).read_text()
        cfg = tomllib.loads(text)
        configs[name] = cfg
        if binary:
            check_config_text(binary, f"{rel(path.parent / src)} ({name})", text)
        container_ports = {int(str(p).rsplit(":", 1)[1]) for p in svc.get("ports", [])}
        for key in ("listen", "admin_listen"):
            if port_of(cfg[key]) not in container_ports:
                problem(where, f"{name}: {key} port {port_of(cfg[key])} is not published")
        cache = mounts.get(cfg.get("cache_dir"))
        if not cache:
            problem(where, f"{name}: cache_dir is not on a volume")
        caches.append(cache)
    if len(set(published)) != len(published):
        problem(where, f"a host port is published twice: {published}")
    if len(set(caches)) != len(caches):
        problem(where, f"nodes share a cache volume: {caches}")
    for name, cfg in configs.items():
        cluster = cfg.get("cluster")
        if cluster:
            peers = cluster.get("peers", [])
            hosts = {re.sub(r"^https?://", "", p).split(":")[0]: p for p in peers}
            if set(hosts) != set(nodes):
                problem(where, f"cluster.peers {peers} are not exactly the stowage services {sorted(nodes)}")
            cmd = nodes[name].get("command", [])
            adv = cmd[cmd.index("--advertise") + 1] if "--advertise" in cmd else cluster.get("advertise")
            if adv not in peers or hosts.get(name) != adv:
                problem(where, f"{name} advertises {adv}, not its own entry of cluster.peers")
            for p in peers:
                if port_of(p) != port_of(cfg["listen"]):
                    problem(where, f"peer {p}: not the listen port {port_of(cfg['listen'])}")
        store = cfg.get("store")
        if store and store.get("endpoint"):
            host = re.sub(r"^https?://", "", store["endpoint"]).split(":")[0].split("/")[0]
            if host not in services:
                problem(where, f"store endpoint {store['endpoint']}: no service {host}")
            env = nodes[name].get("environment", {})
            if store["url"].startswith("s3://") and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env):
                problem(where, f"{name}: no S3 credentials in its environment")
    ok(f"compose file: {where} ({len(nodes)} stowage node(s){', cluster' if any(c.get('cluster') for c in configs.values()) else ''})")


def regenerate_prometheusrule():
    """Rewrites kubernetes/prometheusrule.yaml from prometheus/alerts.yml."""
    src = (DEPLOY / "prometheus" / "alerts.yml").read_text().splitlines()
    body = "\n".join(("  " + l) if l.strip() else "" for l in src[src.index("groups:"):])
    out = DEPLOY / "kubernetes" / "prometheusrule.yaml"
    head = out.read_text().split("spec:\n", 1)[0]
    out.write_text(head + "spec:\n" + body + "\n")
    print(f"rewrote {rel(out)}")


def main():
    if "--regenerate" in sys.argv[1:]:
        regenerate_prometheusrule()
    docs = load_all()
    binary = stowage_binary()
    check_systemd(binary)
    if binary:
        p = DEPLOY / "systemd" / "stowage.toml"
        check_config_text(binary, rel(p), p.read_text())
    tool = promtool()
    check_alerts(docs, tool)
    check_dashboard(docs, tool)
    check_kubernetes(docs, binary)
    check_container(binary)
    check_compose(docs, binary)
    for p in PASSED:
        print(f"ok: {p}")
    for p in PROBLEMS:
        print(f"FAIL: {p}")
    print(f"deploy: {len(PASSED)} passed, {len(PROBLEMS)} failed")
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
