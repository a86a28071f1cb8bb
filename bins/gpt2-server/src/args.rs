use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use gpt2_engine::{EngineConfig, KvFormat, Limits, ModelSource, WeightFormat};
use gpt2_hub::{HubOptions, ModelSpec};

/// Environment variable SageMaker sets to the port a container must listen on.
pub const SAGEMAKER_PORT_ENV: &str = "SAGEMAKER_BIND_TO_PORT";
/// SageMaker's model-server timeout in seconds (set by the SageMaker Python SDK and by users in a
/// model's `Environment`): the default of `--deadline-secs`.
pub const SAGEMAKER_TIMEOUT_ENV: &str = "SAGEMAKER_MODEL_SERVER_TIMEOUT";
/// SageMaker's number of model-server worker processes: ignored (one inference worker batches
/// every request), logged when set.
pub const SAGEMAKER_WORKERS_ENV: &str = "SAGEMAKER_MODEL_SERVER_WORKERS";

/// Port when neither `--port`, `$SAGEMAKER_BIND_TO_PORT` nor `$GPT2_PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 8080;
/// Deadline when neither `--deadline-secs`, `$GPT2_DEADLINE_SECS` nor
/// `$SAGEMAKER_MODEL_SERVER_TIMEOUT` says otherwise: SageMaker's own invocation timeout.
pub const DEFAULT_DEADLINE_SECS: u64 = 60;
/// Largest `--queue-capacity`.
pub const MAX_QUEUE_CAPACITY: u64 = 65_536;
/// Largest `--deadline-secs` (and `$SAGEMAKER_MODEL_SERVER_TIMEOUT`): one day.
pub const MAX_DEADLINE_SECS: u64 = 86_400;
/// Largest `--shutdown-grace-secs`: one hour.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 3_600;
/// Largest `--max-num-return-sequences` and `--max-num-beams`.
pub const MAX_REQUEST_LIMIT: u64 = 1_024;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

const AFTER_HELP: &str = "\
Every option also reads the environment variable shown with it; the option wins when both are \
given, and an empty variable counts as unset.

Other environment variables:
  SAGEMAKER_BIND_TO_PORT          Port, when --port is not given (wins over GPT2_PORT)
  SAGEMAKER_MODEL_SERVER_TIMEOUT  Deadline in seconds, when neither --deadline-secs nor
                                  GPT2_DEADLINE_SECS is given
  SAGEMAKER_MODEL_SERVER_WORKERS  Ignored (logged): one inference worker batches every request
  RAYON_NUM_THREADS               Compute threads (default: all cores)
  GPT2_ISA                        Kernel instruction set: portable, avx2, avx512 or amx
  RUST_LOG                        Log filter (default: info)";

#[derive(Debug, Parser)]
#[command(
    name = "gpt2-server",
    version,
    about = "Serve the GPT-2 API over HTTP (SageMaker-compatible)",
    after_help = AFTER_HELP
)]
pub struct ServerArgs {
    /// Accepted for SageMaker, which starts containers with `serve`.
    #[arg(value_parser = ["serve"])]
    pub command: Option<String>,
    /// Model directory, or Hugging Face repository id (org/name) fetched through the Hugging Face
    /// cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) [default:
    /// /opt/ml/model when it exists, else the demo model]. An existing directory wins and never
    /// touches the network.
    #[arg(long, env = "GPT2_MODEL_DIR", value_name = "DIR|ORG/NAME")]
    pub model: Option<PathBuf>,
    /// Branch, tag or commit of a repository id --model.
    #[arg(
        long,
        env = "GPT2_REVISION",
        value_name = "REV",
        default_value = "main"
    )]
    pub revision: String,
    /// The model id of the OpenAI-compatible routes (`/v1/models`, the `model` field of
    /// `/v1/completions`) [default: the last path component of --model, else `gpt2-demo` for the
    /// demo model].
    #[arg(long, env = "GPT2_SERVED_MODEL_NAME", value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(
        long,
        env = "GPT2_HOST",
        value_name = "ADDR",
        default_value = "0.0.0.0"
    )]
    pub host: IpAddr,
    /// Port to listen on [default: $SAGEMAKER_BIND_TO_PORT, else $GPT2_PORT, else 8080].
    #[arg(long, env = "GPT2_PORT", value_name = "N")]
    pub port: Option<u16>,
    /// Requests admitted at once (running and waiting); more get 503 with Retry-After.
    #[arg(
        long,
        env = "GPT2_QUEUE_CAPACITY",
        value_name = "N",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..=MAX_QUEUE_CAPACITY)
    )]
    pub queue_capacity: u64,
    /// Per-request deadline in seconds, from admission to answer, at most 86400
    /// [default: $SAGEMAKER_MODEL_SERVER_TIMEOUT, else 60].
    #[arg(
        long,
        env = "GPT2_DEADLINE_SECS",
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=MAX_DEADLINE_SECS)
    )]
    pub deadline_secs: Option<u64>,
    /// On SIGTERM/SIGINT, how long in-flight requests may still run, in seconds (at most 3600).
    #[arg(
        long,
        env = "GPT2_SHUTDOWN_GRACE_SECS",
        value_name = "SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=MAX_SHUTDOWN_GRACE_SECS)
    )]
    pub shutdown_grace_secs: u64,
    /// Connections served at once (at most 65536); past it, only GET /ping is answered, on a small
    /// overflow pool, and other requests get 503.
    #[arg(
        long,
        env = "GPT2_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u64).range(1..=MAX_QUEUE_CAPACITY)
    )]
    pub max_connections: u64,
    /// Longest wait for a request's headers, in seconds (1-3600), an idle keep-alive connection's
    /// wait for its next request included: slow and idle clients are closed after it.
    #[arg(
        long,
        env = "GPT2_HEADER_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=MAX_SHUTDOWN_GRACE_SECS)
    )]
    pub header_timeout_secs: u64,
    /// Longest wait between two pieces of a request body, in seconds (1-3600); then 408.
    #[arg(
        long,
        env = "GPT2_BODY_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=MAX_SHUTDOWN_GRACE_SECS)
    )]
    pub body_timeout_secs: u64,
    /// MiB that the request bodies being received may hold together (6-1048576, default 256); a
    /// body past it is read and discarded, then answered 503 with Retry-After.
    #[arg(
        long,
        env = "GPT2_BODY_BUDGET_MB",
        value_name = "MIB",
        default_value_t = (crate::routes::DEFAULT_BODY_BUDGET_BYTES >> 20) as u64,
        value_parser = clap::value_parser!(u64).range(6..=(1 << 20))
    )]
    pub body_budget_mb: u64,
    /// Serve a client that shuts down its write side after sending its request (off by
    /// default: the end of input then means the client is gone, and its generation stops).
    #[arg(long, env = "GPT2_SERVE_HALF_CLOSED")]
    pub serve_half_closed: bool,
    /// MiB of KV cache the admitted requests may reserve together (default: 80% of the memory
    /// available after loading the model, the container's limit included). A request that can
    /// never fit gets 422; one that cannot fit now waits, within its deadline.
    #[arg(
        long,
        env = "GPT2_KV_BUDGET_MB",
        value_name = "MIB",
        value_parser = clap::value_parser!(u64).range(1..=(1 << 30))
    )]
    pub kv_budget_mb: Option<u64>,
    /// Most prompt tokens prefilled in one decode step while others decode (1-8192): a longer
    /// prompt is prefilled in chunks of at most this size, sized below it by measurement.
    #[arg(
        long,
        env = "GPT2_PREFILL_CHUNK_TOKENS",
        value_name = "TOKENS",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..=8192)
    )]
    pub prefill_chunk_tokens: u64,
    /// How much one prompt chunk may lengthen the running streams' decode step, in percent of the
    /// step's own time (1-10000): chunks are sized by measurement to stay within it; more
    /// prefills long prompts sooner and makes the streams' gaps longer.
    #[arg(
        long,
        env = "GPT2_MAX_PREFILL_STALL_PERCENT",
        value_name = "PERCENT",
        default_value_t = 50,
        value_parser = clap::value_parser!(u64).range(1..=10000)
    )]
    pub max_prefill_stall_percent: u64,
    /// Most sequence rows (sequences or beams) in one decode step (1-4096); requests beyond wait
    /// in arrival order.
    #[arg(
        long,
        env = "GPT2_MAX_BATCH_ROWS",
        value_name = "ROWS",
        default_value_t = 48,
        value_parser = clap::value_parser!(u64).range(1..=4096)
    )]
    pub max_batch_rows: u64,
    /// Largest num_return_sequences a request may ask for.
    #[arg(
        long,
        env = "GPT2_MAX_NUM_RETURN_SEQUENCES",
        value_name = "N",
        default_value_t = 16,
        value_parser = clap::value_parser!(u64).range(1..=MAX_REQUEST_LIMIT)
    )]
    pub max_num_return_sequences: u64,
    /// Largest num_beams a request may ask for.
    #[arg(
        long,
        env = "GPT2_MAX_NUM_BEAMS",
        value_name = "N",
        default_value_t = 16,
        value_parser = clap::value_parser!(u64).range(1..=MAX_REQUEST_LIMIT)
    )]
    pub max_num_beams: u64,
    /// How the linear layers' weights are stored: f32 (exact), bf16 (half the bytes, smaller
    /// logit drift) or q8_0 (8-bit, fastest, small logit drift).
    #[arg(long, env = "GPT2_DTYPE", default_value = "f32", value_parser = parse_weight_format)]
    pub dtype: WeightFormat,
    /// How the KV caches store keys and values: f32 (exact) or f16 (half the cache memory, small
    /// logit drift).
    #[arg(long, env = "GPT2_KV_DTYPE", default_value = "f32", value_parser = parse_kv_format)]
    pub kv_dtype: KvFormat,
    /// Log format.
    #[arg(long, env = "GPT2_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Accept `Authorization: Bearer KEY` or `x-api-key: KEY` (repeatable; the variable takes a
    /// comma-separated list). With neither this nor --sigv4-credentials, no credential is asked.
    #[arg(
        long = "api-key",
        env = "GPT2_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Accept requests signed with AWS Signature Version 4 by these credentials, given as
    /// ACCESS_KEY_ID:SECRET (repeatable; the variable takes a comma-separated list).
    #[arg(
        long = "sigv4-credentials",
        env = "GPT2_SIGV4_CREDENTIALS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub sigv4_credentials: Vec<String>,
    /// Require SigV4 signatures scoped to this region and the sagemaker service (default: any).
    #[arg(long, env = "GPT2_SIGV4_REGION")]
    pub sigv4_region: Option<String>,
    /// The host clients sign, when a proxy rewrites the Host header (default: the Host header).
    #[arg(long, env = "GPT2_SIGV4_HOST")]
    pub sigv4_host: Option<String>,
    /// The port after `--port`, `$SAGEMAKER_BIND_TO_PORT` and `$GPT2_PORT` are weighed.
    #[arg(skip)]
    resolved_port: u16,
    /// The deadline after `--deadline-secs` (or `$GPT2_DEADLINE_SECS`) and
    /// `$SAGEMAKER_MODEL_SERVER_TIMEOUT` are weighed.
    #[arg(skip)]
    resolved_deadline_secs: u64,
}

fn parse_weight_format(value: &str) -> Result<WeightFormat, String> {
    value.parse()
}

fn parse_kv_format(value: &str) -> Result<KvFormat, String> {
    value.parse()
}

/// Why the command line and environment were refused.
#[derive(Debug)]
pub enum UsageError {
    /// A command-line error, `--help` or `--version`: clap prints it (and exits 0 for the last
    /// two).
    Clap(clap::Error),
    /// A bad environment variable: one line that names it.
    Env(String),
}

impl ServerArgs {
    /// Parses the command line and the environment; on a usage error prints it and exits 2 (0
    /// for `--help` and `--version`).
    pub fn parse_or_exit() -> Self {
        match Self::try_parse_with_env(std::env::args_os()) {
            Ok(args) => args,
            Err(UsageError::Clap(error)) => error.exit(),
            Err(UsageError::Env(line)) => {
                eprintln!("error: {line}");
                std::process::exit(2);
            }
        }
    }

    /// Parses `argv` (program name first) and the process environment: every option's `GPT2_*`
    /// variable (the option wins; an empty variable counts as unset), then the SageMaker
    /// variables that set the port and the deadline.
    pub fn try_parse_with_env<I, T>(argv: I) -> Result<Self, UsageError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let mut command = Self::command().mut_args(|arg| {
            // Templated manifests often write `value: ""`: unset, not an invalid value.
            if arg.get_env().is_some_and(is_blank) {
                arg.env(None::<&'static str>)
            } else {
                arg
            }
        });
        let matches = command
            .try_get_matches_from_mut(&argv)
            .map_err(|error| env_error(&command, &argv, error))?;
        let mut args = Self::from_arg_matches(&matches)
            .map_err(|error| UsageError::Clap(error.format(&mut command)))?;
        let port_on_command_line = matches.value_source("port") == Some(ValueSource::CommandLine);
        args.resolved_port = args.resolve_port(port_on_command_line)?;
        args.resolved_deadline_secs = args.resolve_deadline_secs()?;
        Ok(args)
    }

    /// `--port`, else `$SAGEMAKER_BIND_TO_PORT`, else `$GPT2_PORT`, else 8080. SageMaker's
    /// variable wins over `GPT2_PORT` because it is the platform's requirement (the image
    /// promises, by its `accept-bind-to-port` label, to listen there), while `GPT2_PORT` is a
    /// default an image or a manifest may carry.
    fn resolve_port(&self, on_command_line: bool) -> Result<u16, UsageError> {
        if let (true, Some(port)) = (on_command_line, self.port) {
            return Ok(port);
        }
        if let Some(value) = env_value(OsStr::new(SAGEMAKER_PORT_ENV)) {
            return value.trim().parse().map_err(|_| {
                UsageError::Env(format!(
                    "invalid value '{value}' for {SAGEMAKER_PORT_ENV}: not a port number (0-65535)"
                ))
            });
        }
        Ok(self.port.unwrap_or(DEFAULT_PORT))
    }

    /// `--deadline-secs` (or `$GPT2_DEADLINE_SECS`), else `$SAGEMAKER_MODEL_SERVER_TIMEOUT`,
    /// else 60.
    fn resolve_deadline_secs(&self) -> Result<u64, UsageError> {
        if let Some(secs) = self.deadline_secs {
            return Ok(secs);
        }
        let Some(value) = env_value(OsStr::new(SAGEMAKER_TIMEOUT_ENV)) else {
            return Ok(DEFAULT_DEADLINE_SECS);
        };
        match value.trim().parse::<u64>() {
            Ok(secs) if (1..=MAX_DEADLINE_SECS).contains(&secs) => Ok(secs),
            _ => Err(UsageError::Env(format!(
                "invalid value '{value}' for {SAGEMAKER_TIMEOUT_ENV}: not a number of seconds \
                 in 1..={MAX_DEADLINE_SECS}"
            ))),
        }
    }

    /// The port to listen on.
    pub fn port(&self) -> u16 {
        self.resolved_port
    }

    /// The per-request deadline in seconds.
    pub fn deadline_secs(&self) -> u64 {
        self.resolved_deadline_secs
    }

    /// What `--model` (or `$GPT2_MODEL_DIR`) names, checked without touching the network: an
    /// existing directory, or a repository id; `None` without `--model`.
    pub fn model_spec(&self) -> Result<Option<ModelSpec>, String> {
        self.model
            .as_deref()
            .map(ModelSpec::parse)
            .transpose()
            .map_err(|e| e.to_string())
    }

    /// Where a repository id `--model` comes from: the environment's Hugging Face settings and
    /// `--revision`; progress bars only on a terminal with text logs.
    pub fn hub_options(&self) -> HubOptions {
        let mut options = HubOptions::from_env();
        options.revision = self.revision.clone();
        options.progress = self.log_format == LogFormat::Text
            && std::io::IsTerminal::is_terminal(&std::io::stderr());
        options
    }

    /// The model to load (blocking: a repository id may be downloaded): `spec` resolved (see
    /// [`ServerArgs::model_spec`]), else [`ModelSource::resolve`]'s default.
    pub fn model_source(
        spec: Option<&ModelSpec>,
        options: &HubOptions,
    ) -> Result<ModelSource, String> {
        let dir = spec
            .map(|spec| spec.resolve(options))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(ModelSource::resolve(dir.as_deref()))
    }

    /// The per-request limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_num_return_sequences: self.max_num_return_sequences as usize,
            max_num_beams: self.max_num_beams as usize,
        }
    }

    /// The bounds on connections and their timeouts.
    pub fn connection_limits(&self) -> crate::serve::ConnectionLimits {
        crate::serve::ConnectionLimits {
            max_connections: self.max_connections as usize,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            serve_half_closed: self.serve_half_closed,
        }
    }

    /// The budget of the request bodies being received.
    pub fn body_budget(&self) -> crate::body_budget::BodyBudget {
        crate::body_budget::BodyBudget::new((self.body_budget_mb as usize) << 20)
    }

    /// Who may call the service.
    pub fn auth_config(&self) -> Result<crate::auth::AuthConfig, String> {
        crate::auth::AuthConfig::new(
            &self.api_keys,
            &self.sigv4_credentials,
            self.sigv4_region.clone(),
            self.sigv4_host.clone(),
        )
    }

    /// The queue and deadline settings.
    /// The queue, deadline and KV-budget settings; the budget defaults to `default_kv_budget`
    /// (measured once the model is loaded).
    pub fn engine_config(&self, default_kv_budget: Option<usize>) -> EngineConfig {
        let kv_budget_bytes = match self.kv_budget_mb {
            Some(mib) => usize::try_from(mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1 << 20),
            None => default_kv_budget.unwrap_or(usize::MAX),
        };
        EngineConfig {
            queue_capacity: self.queue_capacity as usize,
            deadline: Duration::from_secs(self.deadline_secs()),
            kv_budget_bytes,
            prefill_chunk_tokens: self.prefill_chunk_tokens as usize,
            max_prefill_stall_percent: self.max_prefill_stall_percent as u32,
            max_batch_rows: self.max_batch_rows as usize,
        }
    }
}

/// The variable's value, `None` when it is unset or blank (whitespace only). A value that is not
/// Unicode is returned lossily, so that it is refused by the parser rather than ignored.
fn env_value(name: &OsStr) -> Option<String> {
    let value = std::env::var_os(name)?;
    let value = value.to_string_lossy().into_owned();
    (!value.trim().is_empty()).then_some(value)
}

/// Whether the variable is set but empty or whitespace only.
fn is_blank(name: &OsStr) -> bool {
    std::env::var_os(name).is_some_and(|value| value.to_string_lossy().trim().is_empty())
}

/// Clap names the option (`--queue-capacity <N>`) even when the bad value came from its
/// environment variable; this names the variable instead, in one line.
fn env_error(command: &clap::Command, argv: &[OsString], error: clap::Error) -> UsageError {
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return UsageError::Clap(error);
    }
    let Some(ContextValue::String(invalid_arg)) = error.get(ContextKind::InvalidArg) else {
        return UsageError::Clap(error);
    };
    let names_flag = |long: &str| {
        let flag = format!("--{long}");
        invalid_arg == &flag || invalid_arg.starts_with(&format!("{flag} "))
    };
    let Some(arg) = command
        .get_arguments()
        .find(|arg| arg.get_long().is_some_and(names_flag))
    else {
        return UsageError::Clap(error);
    };
    let (Some(long), Some(name)) = (arg.get_long(), arg.get_env()) else {
        return UsageError::Clap(error);
    };
    let flag = format!("--{long}");
    let on_command_line = argv.iter().skip(1).any(|word| {
        word.to_str()
            .is_some_and(|word| word == flag || word.starts_with(&format!("{flag}=")))
    });
    let Some(env_value) = env_value(name) else {
        return UsageError::Clap(error);
    };
    if on_command_line {
        return UsageError::Clap(error);
    }
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => env_value,
    };
    let reason = match (
        std::error::Error::source(&error),
        error.get(ContextKind::ValidValue),
    ) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => {
            format!("possible values: {}", valid.join(", "))
        }
        (None, _) => "not accepted".to_string(),
    };
    UsageError::Env(format!(
        "invalid value '{value}' for {} (the environment variable of {flag}): {reason}",
        name.to_string_lossy()
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_consistent() {
        ServerArgs::command().debug_assert();
    }

    #[test]
    fn every_option_has_an_environment_variable() {
        // Platforms configure containers through the environment: a new option needs a
        // `GPT2_*` variable too (named after the option; `--model` reads `GPT2_MODEL_DIR`).
        for arg in ServerArgs::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let name = arg
                .get_env()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| panic!("--{long} has no environment variable"));
            let stem = long.replace('-', "_").to_uppercase();
            assert!(
                name.starts_with(&format!("GPT2_{stem}")),
                "--{long} reads {name}, expected GPT2_{stem}..."
            );
        }
    }

    #[test]
    fn out_of_range_options_are_usage_errors() {
        for (flag, bad, good) in [
            ("--queue-capacity", "65537", "65536"),
            ("--queue-capacity", "0", "1"),
            ("--deadline-secs", "86401", "86400"),
            ("--deadline-secs", "9223372036854775807", "1"),
            ("--shutdown-grace-secs", "3601", "3600"),
            ("--max-num-return-sequences", "1025", "1024"),
            ("--max-num-beams", "1025", "1024"),
            ("--port", "65536", "65535"),
        ] {
            let error = ServerArgs::try_parse_from(["gpt2-server", flag, bad]).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::ValueValidation, "{flag} {bad}");
            assert_eq!(error.exit_code(), 2);
            ServerArgs::try_parse_from(["gpt2-server", flag, good])
                .unwrap_or_else(|e| panic!("{flag} {good}: {e}"));
        }
    }
}
