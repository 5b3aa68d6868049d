//! stowage started in-process on 127.0.0.1:0 with a temporary cache dir.

use std::net::SocketAddr;
use std::path::Path;

use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running stowage. Dropping it stops the server (the cache directory
/// is removed when `dir` is dropped).
pub struct Stowage {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), if enabled.
    pub admin: Option<SocketAddr>,
    /// White-box checks and hooks on the server's blob store.
    pub hooks: stowage::test_hooks::Hooks,
    pub dir: TempDir,
    pub handle: JoinHandle<()>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Stowage {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v2/<rest>`
    pub fn v2(&self, rest: &str) -> String {
        format!("http://{}/v2/{}", self.addr, rest)
    }

    /// `http://<admin addr><path>`; panics when the admin listener is off.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.expect("admin listener is off")
        )
    }

    pub fn manifest_url(&self, name: &str, reference: &str) -> String {
        self.v2(&format!("{name}/manifests/{reference}"))
    }

    pub fn blob_url(&self, name: &str, digest: &str) -> String {
        self.v2(&format!("{name}/blobs/{digest}"))
    }

    /// Stops the server, waits for it to exit cleanly and hands back the
    /// cache directory (for a restart on the same cache).
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        super::within(30, "stowage shutdown", handle)
            .await
            .expect("stowage server task panicked");
        // Move the directory out; Drop of `self` has nothing left to stop.
        std::mem::replace(&mut self.dir, TempDir::new().unwrap())
    }
}

impl Drop for Stowage {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The TOML stowage is started with: one upstream, `docker.io`, at
/// `upstream_url` with `library_prefix = true`, plus `upstream_extra` lines
/// inside that `[[upstream]]` table (e.g. `tag_ttl = "1s"`).
pub fn config_toml(cache_dir: &Path, upstream_url: &str, upstream_extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {dir:?}\nshutdown_timeout = \"2s\"\n\
         [[upstream]]\nhost = \"docker.io\"\nurl = \"{upstream_url}\"\nlibrary_prefix = true\n{upstream_extra}\n",
        dir = cache_dir.to_str().unwrap(),
    )
}

/// Starts stowage in front of `upstream_url` with a fresh cache dir.
pub async fn start_stowage(upstream_url: &str, upstream_extra: &str) -> Stowage {
    start_stowage_in(TempDir::new().unwrap(), upstream_url, upstream_extra).await
}

/// Starts stowage with prefetch off, for tests that count what a client's
/// own requests cause (outcomes, fills, upstream requests per step).
pub async fn start_stowage_no_prefetch(upstream_url: &str, upstream_extra: &str) -> Stowage {
    let dir = TempDir::new().unwrap();
    let toml = format!(
        "prefetch = false\n{}",
        config_toml(dir.path(), upstream_url, upstream_extra)
    );
    start_stowage_toml(dir, &toml).await
}

/// Starts stowage on an existing cache dir (e.g. from [`Stowage::stop`]).
pub async fn start_stowage_in(dir: TempDir, upstream_url: &str, upstream_extra: &str) -> Stowage {
    let toml = config_toml(dir.path(), upstream_url, upstream_extra);
    start_stowage_toml(dir, &toml).await
}

/// Starts stowage from a complete TOML document (which should use
/// `listen = "127.0.0.1:0"` and `dir` as its cache dir).
pub async fn start_stowage_toml(dir: TempDir, toml: &str) -> Stowage {
    let cfg = stowage::Config::from_toml_str(toml)
        .unwrap_or_else(|e| panic!("test config refused: {e}\n{toml}"));
    let server = stowage::Server::bind(cfg)
        .await
        .unwrap_or_else(|e| panic!("stowage did not start: {e}"));
    let addr = server.local_addr();
    let admin = server.admin_addr();
    let hooks = server.hooks();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        server
            .run(async move {
                let _ = rx.await;
            })
            .await
            .expect("stowage run() returned an error");
    });
    Stowage {
        addr,
        admin,
        hooks,
        dir,
        handle,
        shutdown: Some(tx),
    }
}

/// A loopback port free right now (bound and released: a cluster node must
/// know its URL before it starts, to advertise it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct free ports: all are held until all are picked, as the
/// kernel may hand a port just released by `free_port` out again (two
/// "nodes" on one port made a test looking for a tag owned by the second
/// loop forever).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `n` node URLs (`http://127.0.0.1:PORT`) on distinct free ports.
pub fn node_urls(n: usize) -> Vec<String> {
    free_ports(n)
        .into_iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect()
}

/// Starts one stowage per URL in `urls` (`http://127.0.0.1:PORT`), each
/// advertising its URL with all of `peers` as its peers, in front of
/// `upstream_url` (docker.io, `library_prefix`), with `extra` TOML appended
/// to node `i`'s config (after its `[cluster]` table: start with a new
/// table, or give `[cluster]` keys first).
pub async fn start_cluster_nodes(
    urls: &[String],
    peers: &[String],
    upstream_url: &str,
    upstream_extra: &str,
    extra: impl Fn(usize) -> String,
) -> Vec<Stowage> {
    let mut nodes = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let dir = TempDir::new().unwrap();
        let port = url.rsplit(':').next().unwrap();
        let peer_list = peers
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let toml = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {dir:?}\nshutdown_timeout = \"2s\"\n\
             [[upstream]]\nhost = \"docker.io\"\nurl = \"{upstream_url}\"\nlibrary_prefix = true\n{upstream_extra}\n\
             [cluster]\nadvertise = \"{url}\"\npeers = [{peer_list}]\n{}\n",
            extra(i),
            dir = dir.path().to_str().unwrap(),
        );
        nodes.push(start_stowage_toml(dir, &toml).await);
    }
    nodes
}

/// `n` nodes that all know each other.
pub async fn start_cluster(n: usize, upstream_url: &str, upstream_extra: &str) -> Vec<Stowage> {
    let urls = node_urls(n);
    start_cluster_nodes(&urls, &urls, upstream_url, upstream_extra, |_| {
        String::new()
    })
    .await
}

/// Index in `nodes` (URLs) of the owner of blob or manifest `digest`.
pub fn owner_of_digest(nodes: &[String], digest: &str) -> usize {
    assert_distinct(nodes);
    let owner = &stowage::test_hooks::rank_digest(nodes, digest)[0];
    nodes.iter().position(|n| n == owner).unwrap()
}

/// Two nodes on one URL would make every key "owned" by the first: a
/// test searching for a key owned by the second would never end.
fn assert_distinct(nodes: &[String]) {
    let mut sorted = nodes.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), nodes.len(), "two nodes on one URL: {nodes:?}");
}

/// Index in `nodes` (URLs) of the owner of `repo:tag` on docker.io.
pub fn owner_of_tag(nodes: &[String], repo: &str, tag: &str) -> usize {
    assert_distinct(nodes);
    let owner = &stowage::test_hooks::rank_tag(nodes, "docker.io", repo, tag)[0];
    nodes.iter().position(|n| n == owner).unwrap()
}
