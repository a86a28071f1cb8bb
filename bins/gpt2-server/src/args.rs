use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gpt2_engine::{EngineConfig, KvFormat, Limits, ModelSource, WeightFormat};

/// Environment variable SageMaker sets to the port a container must listen on.
pub const SAGEMAKER_PORT_ENV: &str = "SAGEMAKER_BIND_TO_PORT";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "gpt2-server",
    version,
    about = "Serve the GPT-2 API over HTTP (SageMaker-compatible)"
)]
pub struct ServerArgs {
    /// Accepted for SageMaker, which starts containers with `serve`.
    #[arg(value_parser = ["serve"])]
    pub command: Option<String>,
    /// Model directory (default: /opt/ml/model when it exists, else the demo model).
    #[arg(long, env = "GPT2_MODEL_DIR")]
    pub model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (default: $SAGEMAKER_BIND_TO_PORT, else 8080).
    #[arg(long)]
    pub port: Option<u16>,
    /// Requests admitted at once (running and waiting); more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_capacity: u64,
    /// Per-request deadline in seconds, from admission to answer.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline_secs: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may still run, in seconds.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Largest num_return_sequences a request may ask for.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_num_return_sequences: u64,
    /// Largest num_beams a request may ask for.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_num_beams: u64,
    /// How the linear layers' weights are stored: f32 (exact) or q8_0 (8-bit, faster, small
    /// logit drift).
    #[arg(long, default_value = "f32", value_parser = parse_weight_format)]
    pub dtype: WeightFormat,
    /// How the KV caches store keys and values: f32 (exact) or f16 (half the cache memory, small
    /// logit drift).
    #[arg(long, default_value = "f32", value_parser = parse_kv_format)]
    pub kv_dtype: KvFormat,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_weight_format(value: &str) -> Result<WeightFormat, String> {
    value.parse()
}

fn parse_kv_format(value: &str) -> Result<KvFormat, String> {
    value.parse()
}

impl ServerArgs {
    /// `--port`, else `$SAGEMAKER_BIND_TO_PORT`, else 8080.
    pub fn port(&self) -> Result<u16, String> {
        if let Some(port) = self.port {
            return Ok(port);
        }
        match std::env::var(SAGEMAKER_PORT_ENV) {
            Ok(value) if value.trim().is_empty() => Ok(8080),
            Ok(value) => value
                .trim()
                .parse()
                .map_err(|_| format!("{SAGEMAKER_PORT_ENV}={value:?} is not a port number")),
            Err(_) => Ok(8080),
        }
    }

    /// The model to load: `--model` (or `$GPT2_MODEL_DIR`), which must be an existing directory,
    /// else [`ModelSource::resolve`]'s default.
    pub fn model_source(&self) -> Result<ModelSource, String> {
        if let Some(dir) = &self.model {
            if !dir.exists() {
                return Err(format!(
                    "model directory {0} does not exist; download a checkpoint with: \
                     gpt2 download openai-community/gpt2 --to {0}",
                    dir.display()
                ));
            }
            if !dir.is_dir() {
                return Err(format!("--model {}: not a directory", dir.display()));
            }
        }
        Ok(ModelSource::resolve(self.model.as_deref()))
    }

    /// The per-request limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_num_return_sequences: self.max_num_return_sequences as usize,
            max_num_beams: self.max_num_beams as usize,
        }
    }

    /// The queue and deadline settings.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            queue_capacity: self.queue_capacity as usize,
            deadline: Duration::from_secs(self.deadline_secs),
        }
    }
}

/// Structured logs on stderr; `RUST_LOG` filters them (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
