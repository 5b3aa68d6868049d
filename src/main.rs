//! The `stowage` command: run the mirror, or check a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stowage::config::{Config, Overrides};
use stowage::server::Server;

/// A pull-through caching mirror for container registries.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; without it, embedded defaults (a Docker Hub
    /// mirror on 0.0.0.0:5000 caching in ./data).
    #[arg(long, global = true)]
    config: Option<PathBuf>,

    /// Address to listen on, e.g. 127.0.0.1:5000.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,

    /// Upstream registry: a URL for the default upstream, or HOST=URL (may
    /// be repeated; the first HOST=URL becomes the default).
    #[arg(long)]
    upstream: Vec<String>,

    /// Cache directory.
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,

    /// Most bytes of blobs to keep, e.g. 50GiB.
    #[arg(long, global = true, value_name = "SIZE")]
    max_size: Option<bytesize::ByteSize>,

    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Admin listener for /metrics, /healthz and /readyz (plain HTTP), or
    /// "off" (default 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file and report the first problem.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Pull images through a running stowage so that their blobs are cached.
    Warm {
        /// Images as `[host/]repository[:tag|@digest]`.
        #[arg(required = true)]
        images: Vec<String>,
        /// URL of the mirror.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        mirror: String,
        /// Only this platform of multi-platform images (`os/arch[/variant]`);
        /// may be repeated. Default: all platforms.
        #[arg(long)]
        platform: Vec<String>,
        /// Extra PEM CA certificates for an HTTPS mirror.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Username for a mirror that requires client authentication.
        #[arg(long, env = "STOWAGE_USERNAME")]
        username: Option<String>,
        /// Password for --username.
        #[arg(long, env = "STOWAGE_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Blobs downloaded at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Inspect or trim the cache directory of a running or stopped instance.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Usage, budget, entries and access times.
    Stats,
    /// The largest or least recently used blobs.
    Ls {
        /// Order: `size` (largest first) or `age` (least recently used first).
        #[arg(long, value_enum, default_value_t = SortKey::Size)]
        sort: SortKey,
        /// How many to show.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: usize,
    },
    /// Remove blobs by digest, or everything cached for a repository or tag.
    Purge {
        /// Digests (`sha256:...`) or repositories (`docker.io/library/alpine`,
        /// `alpine:3.19`).
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SortKey {
    Size,
    Age,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::from_file(file) {
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
        };
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Cache { command }) => return cache_command(&config, command),
        Some(Command::Warm {
            images,
            mirror,
            platform,
            ca_file,
            username,
            password,
            concurrency,
        }) => {
            let opts = stowage::cli::warm::WarmOptions {
                mirror,
                platforms: platform,
                ca_file,
                username,
                password,
                concurrency,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            return warm(&opts, &images);
        }
        _ => {}
    }
    stowage::logging::init(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stowage stopped");
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<Config, stowage::config::ConfigError> {
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream.clone(),
        cache_dir: cli.cache_dir.clone(),
        max_size: cli.max_size,
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
        admin_listen: cli.admin_listen.clone(),
    };
    Config::load(cli.config.as_deref(), &overrides)
}

fn warm(opts: &stowage::cli::warm::WarmOptions, images: &[String]) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(stowage::cli::warm::warm(opts, images)) {
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

fn cache_command(config: &Config, command: CacheCommand) -> ExitCode {
    use stowage::cli::ops;
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
                "{t}: removed {} blobs ({}), {} manifests, {} tags",
                p.blobs,
                ops::human_bytes(p.bytes),
                p.manifests,
                p.tags
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

async fn run(config: Config) -> Result<(), stowage::server::ServerError> {
    let server = Server::bind(config).await?;
    reload_on_sighup(server.reloader());
    server.run(shutdown_signal()).await
}

/// SIGHUP re-reads the TLS certificate, key, client CA and htpasswd file
/// (a rejected file is logged and the old one kept); it never stops the
/// process.
fn reload_on_sighup(reloader: stowage::front::Reloader) {
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
