//! Logging: its configuration (`[log]`) and the subscriber set-up.

use serde::Deserialize;

use crate::error::ConfigError;

/// Logging.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `stowage=debug`; `RUST_LOG` wins
    /// when set.
    #[serde(default)]
    pub level: Option<String>,
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable single lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl LogConfig {
    /// Checks that `level` is a valid filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = &self.level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            return Err(ConfigError::invalid("log.level", format!("{level:?}: {e}")));
        }
        Ok(())
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`, else
/// `info`; human or JSON lines on stderr.
pub fn init(config: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, never in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.format {
        // Fields at the top level of each object, next to the span list that
        // carries the request id.
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
    }
}
