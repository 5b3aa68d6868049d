//! The `stowage` command: argument parsing only (clap); the work is done by
//! `stowage::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stowage::cli::{self, CacheCommand as Cache};
use stowage::config::{Config, Overrides};

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

    /// Cluster mode: the URL other nodes reach this one by (with --peer).
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,

    /// Cluster mode: a node of the cluster, this one included or not (may
    /// be repeated); misses for keys another node owns are asked of it.
    #[arg(long, value_name = "URL")]
    peer: Vec<String>,

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
        return cli::check_config(file);
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Cache { command }) => cli::cache(&config, cache_command(command)),
        Some(Command::Warm {
            images,
            mirror,
            platform,
            ca_file,
            username,
            password,
            concurrency,
        }) => {
            let opts = cli::warm::WarmOptions {
                mirror,
                platforms: platform,
                ca_file,
                username,
                password,
                concurrency,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            cli::warm(&opts, &images)
        }
        Some(Command::CheckConfig { .. }) | None => cli::run(config),
    }
}

fn cache_command(command: CacheCommand) -> Cache {
    match command {
        CacheCommand::Stats => Cache::Stats,
        CacheCommand::Ls { sort, limit } => Cache::Ls {
            sort: match sort {
                SortKey::Size => cli::SortKey::Size,
                SortKey::Age => cli::SortKey::Age,
            },
            limit,
        },
        CacheCommand::Purge { targets } => Cache::Purge { targets },
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
        advertise: cli.advertise.clone(),
        peers: cli.peer.clone(),
    };
    Config::load(cli.config.as_deref(), &overrides)
}
