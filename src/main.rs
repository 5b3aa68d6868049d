//! The `stowage` command: run the mirror, or check a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stowage::config::{Config, LogFormat};
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
    #[arg(long)]
    cache_dir: Option<PathBuf>,

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
    init_logging(&config);
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
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = &cli.cache_dir {
        config.cache_dir = dir.clone();
    }
    if let Some(admin) = &cli.admin_listen {
        config.admin_listen = stowage::config::parse_admin_listen(admin).map_err(|message| {
            stowage::config::ConfigError::Invalid {
                key: "--admin-listen".into(),
                message,
            }
        })?;
    }
    config.apply_upstream_flags(&cli.upstream)?;
    config.apply_tls_flags(cli.tls_cert.clone(), cli.tls_key.clone())?;
    Ok(config)
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.log.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, never in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        // Fields at the top level of each object, next to the span list that
        // carries the request id.
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
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
