//! The command line's subcommands, called by `main.rs` (which only parses
//! arguments): run the mirror, check a configuration, `warm`, and the
//! operator commands on a cache directory (`cache stats|ls|purge`).

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::server::{Server, ServerError};

mod ops;
pub mod warm;

/// `stowage check-config FILE`: validates a configuration file and reports
/// the first problem (exit code 2).
pub fn check_config(file: &Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(c) => {
            println!(
                "{}: ok (listen {}, cache {}, {} upstream(s), default {})",
                file.display(),
                c.listen,
                c.cache_dir.display(),
                c.upstreams.len(),
                c.upstreams[0].host
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `stowage` with no subcommand: runs the mirror until SIGTERM or SIGINT.
pub fn run(config: Config) -> ExitCode {
    keep_freed_memory();
    // Dropped last: writes out buffered request lines at shutdown.
    let _log = crate::logging::init(&config.log);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let served = runtime.block_on(serve(config));
    // Blocking threads stuck on a disk that does not answer (a write, the
    // access times) do not hold up the exit for long: the files they would
    // have finished are either complete or in tmp/, emptied at start-up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stowage stopped");
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `stowage warm IMAGE...`.
pub fn warm(opts: &warm::WarmOptions, images: &[String]) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(warm::warm(opts, images)) {
        Ok(summary) => {
            println!("warmed: {summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stowage warm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The order of `stowage cache ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Largest first.
    Size,
    /// Least recently used first.
    Age,
}

/// `stowage cache ...`.
#[derive(Debug, Clone)]
pub enum CacheCommand {
    /// Usage, budget, entries and access times.
    Stats,
    /// The first `limit` blobs in `sort` order.
    Ls {
        /// The order.
        sort: SortKey,
        /// How many.
        limit: usize,
    },
    /// Remove blobs by digest, or what is cached for repositories or tags
    /// (keeping what other tags, repositories and pins still use).
    Purge {
        /// Digests or image references.
        targets: Vec<String>,
    },
}

/// `stowage cache stats|ls|purge` on the cache directory of `config`.
pub fn cache(config: &Config, command: CacheCommand) -> ExitCode {
    let dir = &config.cache_dir;
    let result = match command {
        CacheCommand::Stats => ops::stats(dir, Some(config.cache.max_size.as_u64())).map(|s| {
            println!("cache:           {}", dir.display());
            println!("{s}");
        }),
        CacheCommand::Ls { sort, limit } => ops::list_blobs(dir).map(|mut blobs| {
            match sort {
                SortKey::Size => blobs.sort_by_key(|b| std::cmp::Reverse(b.size)),
                SortKey::Age => blobs.sort_by_key(|b| b.last_access),
            }
            println!("{:<72} {:>12}  LAST ACCESS", "DIGEST", "SIZE");
            for b in blobs.iter().take(limit) {
                println!(
                    "{:<72} {:>12}  {}",
                    b.digest.to_string(),
                    ops::human_bytes(b.size),
                    ops::ago(b.last_access)
                );
            }
        }),
        CacheCommand::Purge { targets } => targets.iter().try_for_each(|t| {
            let p = ops::purge(config, t)?;
            println!(
                "{t}: removed {} blobs ({}), {} manifests, {} tags; kept {} still used elsewhere",
                p.blobs,
                ops::human_bytes(p.bytes),
                p.manifests,
                p.tags,
                p.shared
            );
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stowage cache: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Lets glibc's malloc keep memory it gets back for the next allocation
/// instead of returning it to the kernel at once.
///
/// A fill receives its upstream body in hyper's read buffers (up to about
/// 400 KiB each), and each buffer is freed once the writer has written and
/// hashed it. With glibc's defaults those buffers are either mapped and
/// unmapped one by one or trimmed off the top of their arena, so most
/// received bytes land in pages the kernel must fault in and zero: 6,000
/// to 16,000 page faults per cold 128 MiB blob from the bench's upstream
/// (nginx, which reuses its buffers, takes about 40). Reusing them took
/// that fill's CPU from 0.45 to 0.27 s (medians of 6 runs on the bench
/// VM, whose host backs guest memory lazily). Now allocations up to 1 MiB
/// come from the arenas, and an arena keeps up to 8 MiB free at its top,
/// which bounds what is kept per arena (glibc has at most 8 per core).
///
/// Only glibc has `mallopt` with these parameters; elsewhere this does
/// nothing.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of malloc's tuning parameters; it is
    // called before the runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Runtime::new() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            None
        }
    }
}

async fn serve(config: Config) -> Result<(), ServerError> {
    let server = Server::bind(config).await?;
    reload_on_sighup(server.reloader());
    server.run(shutdown_signal()).await
}

/// SIGHUP re-reads the TLS certificate, key, client CA and htpasswd file
/// (a rejected file is logged and the old one kept); it never stops the
/// process.
fn reload_on_sighup(reloader: crate::front::Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if !reloader.has_files() {
                            tracing::info!("SIGHUP received: nothing to reload");
                            continue;
                        }
                        tracing::info!("SIGHUP received: reloading TLS and htpasswd files");
                        if reloader.reload_now().await {
                            tracing::info!("reload complete");
                        } else {
                            tracing::warn!("reload incomplete: a file was rejected, see above");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; reload by file change only")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = reloader;
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
