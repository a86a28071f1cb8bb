//! `gpt2`: tokenize and generate from the command line, with the same schema and engine as the
//! HTTP service, so that both give the same answer.

// The argument structs' doc comments are the `--help` text, where a bare URL reads best.
#![allow(rustdoc::bare_urls)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gpt2_engine::{
    EngineError, GenerationEvent, GenerationRequest, KvFormat, ModelSource, Pipeline, WeightFormat,
};
use gpt2_tokenizer::Gpt2Tokenizer;
use serde_json::{Map, Value};

#[derive(Parser)]
#[command(name = "gpt2", version, about = "Generate text with GPT-2 checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        /// Model directory or Hugging Face repository id (org/name) whose tokenizer to use
        /// (default: the embedded GPT-2 tokenizer).
        #[arg(long, value_name = "DIR|ORG/NAME")]
        model: Option<PathBuf>,
        /// Branch, tag or commit of a repository id --model.
        #[arg(long, default_value = "main")]
        revision: String,
        /// The text to tokenize.
        text: String,
    },
    /// Generate text: the request's fields come from --request (the HTTP body) and/or flags.
    Generate(GenerateArgs),
    /// Download a checkpoint from the Hugging Face Hub into the Hugging Face cache (HF_HOME,
    /// HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured) and print its files; with
    /// --to, also copy them into a model directory.
    Download {
        /// Repository, e.g. openai-community/gpt2, openai-community/gpt2-xl, distilbert/distilgpt2.
        #[arg(default_value = "openai-community/gpt2")]
        repo: String,
        /// Also copy the files into this directory.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Base URL of the hub (default: $HF_ENDPOINT, else https://huggingface.co).
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Time a request: load the model once, run the request --warmup + --runs times, print one
    /// JSON line with the run times (model loading excluded).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A file holding the JSON request body, or - for standard input.
    #[arg(long)]
    request: String,
    /// Timed runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    #[command(flatten)]
    storage: StorageArgs,
}

/// Which model to load.
#[derive(Args)]
struct ModelArgs {
    /// Model directory, or Hugging Face repository id (org/name) fetched through the Hugging Face
    /// cache (default: /opt/ml/model when it exists, else the demo model). An existing directory
    /// wins and never touches the network.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    model: Option<PathBuf>,
    /// Branch, tag or commit of a repository id --model.
    #[arg(long, default_value = "main")]
    revision: String,
}

impl ModelArgs {
    /// What --model names, checked without touching the network (a usage error otherwise).
    fn spec(&self) -> Result<Option<gpt2_hub::ModelSpec>, Failure> {
        self.model
            .as_deref()
            .map(gpt2_hub::ModelSpec::parse)
            .transpose()
            .map_err(hub_failure)
    }

    /// The model directory of a spec: the directory, or the repository's snapshot in the cache.
    fn resolve(&self, spec: Option<&gpt2_hub::ModelSpec>) -> Result<Option<PathBuf>, Failure> {
        let Some(spec) = spec else { return Ok(None) };
        let mut options = gpt2_hub::HubOptions::from_env();
        options.revision = self.revision.clone();
        spec.resolve(&options).map(Some).map_err(hub_failure)
    }
}

/// A hub error: a usage error for a bad --model value, else a runtime error.
fn hub_failure(error: gpt2_hub::HubError) -> Failure {
    if error.is_usage() {
        Failure::usage(error.to_string())
    } else {
        Failure::runtime(error.to_string())
    }
}

/// How the model stores its weights and caches.
#[derive(Args, Clone, Copy)]
struct StorageArgs {
    /// Weight storage: f32 (exact), bf16 (half the bytes, smaller drift) or q8_0 (8-bit, fastest).
    #[arg(long, default_value = "f32", value_parser = parse_weight_format)]
    dtype: WeightFormat,
    /// KV cache storage: f32 (exact) or f16 (half the cache memory, small logit drift).
    #[arg(long, default_value = "f32", value_parser = parse_kv_format)]
    kv_dtype: KvFormat,
}

fn parse_weight_format(value: &str) -> Result<WeightFormat, String> {
    value.parse()
}

fn parse_kv_format(value: &str) -> Result<KvFormat, String> {
    value.parse()
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A file holding the JSON request body, or - for standard input; prints the JSON response.
    #[arg(long)]
    request: Option<String>,
    /// Print the JSON array the HTTP service would answer instead of readable text.
    #[arg(long)]
    json: bool,
    /// Print tokens as they are generated: with one sequence, its text as it grows; with several
    /// (or in beam mode), one JSON event per line (`{"index","id","text","logprob"}` per token,
    /// `{"index","finish_reason","text","generated_tokens"}` when a sequence ends).
    #[arg(long, conflicts_with = "json")]
    stream: bool,
    #[command(flatten)]
    storage: StorageArgs,
    /// The prompt.
    #[arg(long)]
    input: Option<String>,
    /// sample-top-p, sample-top-k, sample, beam or greedy.
    #[arg(long)]
    mode: Option<String>,
    /// Total length in tokens, prompt included.
    #[arg(long)]
    max_length: Option<i64>,
    /// Tokens to generate after the prompt (overrides --max-length).
    #[arg(long)]
    max_new_tokens: Option<i64>,
    /// Nucleus mass in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Top-k cut (0 disables it).
    #[arg(long)]
    top_k: Option<i64>,
    /// Sampling temperature (mode sample).
    #[arg(long)]
    temperature: Option<f64>,
    /// Number of beams (mode beam).
    #[arg(long)]
    num_beams: Option<i64>,
    /// No-repeat n-gram size (mode beam).
    #[arg(long)]
    no_repeat_ngram_size: Option<i64>,
    /// Number of sequences to return.
    #[arg(long)]
    num_return_sequences: Option<i64>,
    /// Sampling seed (-1 for random).
    #[arg(long)]
    seed: Option<i64>,
}

/// A failure, with the exit code it deserves: 2 for the user's input, 1 for everything else.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Request(e) => Failure::usage(e.to_string()),
            other => Failure::runtime(other.to_string()),
        }
    }
}

fn main() -> ExitCode {
    gpt2_engine::return_freed_memory_to_os();
    let cli = Cli::parse();
    if let Err(e) = gpt2_engine::Isa::from_env() {
        eprintln!("gpt2: error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Tokenize {
            model,
            revision,
            text,
        } => tokenize(ModelArgs { model, revision }, &text),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => time_request(args),
        Command::Download {
            repo,
            to,
            revision,
            endpoint,
        } => download(&repo, to.as_deref(), revision, endpoint),
    };
    match result {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`gpt2 ... | head`) is not worth a panic.
            let _ = stdout
                .write_all(output.as_bytes())
                .and_then(|_| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(failure) => {
            let line = failure.message.replace('\n', " ");
            eprintln!("gpt2: error: {line}");
            ExitCode::from(failure.code)
        }
    }
}

/// `gpt2 download`: fills the Hugging Face cache (what `--model org/name` then reads), prints the
/// files, in the snapshot or in `--to`.
fn download(
    repo: &str,
    to: Option<&std::path::Path>,
    revision: String,
    endpoint: Option<String>,
) -> Result<String, Failure> {
    if !gpt2_hub::is_repo_id(repo) {
        return Err(Failure::usage(format!(
            "{repo:?} is not a Hugging Face repository id (org/name, e.g. openai-community/gpt2)"
        )));
    }
    let mut options = gpt2_hub::HubOptions::from_env();
    options.revision = revision;
    if let Some(endpoint) = endpoint {
        options.endpoint = endpoint;
    }
    let snapshot = gpt2_hub::fetch_model(repo, &options).map_err(hub_failure)?;
    let files = match to {
        Some(dest) => gpt2_hub::copy_snapshot(&snapshot, dest).map_err(hub_failure)?,
        None => snapshot
            .files
            .iter()
            .map(|file| snapshot.dir.join(file))
            .collect(),
    };
    let mut out = String::new();
    for file in files {
        out.push_str(&format!("{}\n", file.display()));
    }
    Ok(out)
}

fn tokenize(model: ModelArgs, text: &str) -> Result<String, Failure> {
    let spec = model.spec()?;
    let tokenizer = match model.resolve(spec.as_ref())? {
        Some(dir) => Gpt2Tokenizer::from_model_dir(dir),
        None => Gpt2Tokenizer::embedded(),
    }
    .map_err(|e| Failure::runtime(e.to_string()))?;
    let ids = tokenizer
        .encode(text)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(format!("{}\n", Value::from(ids)))
}

/// Reads a JSON object from a file, or from standard input for `-`.
fn read_request_file(source: &str) -> Result<Map<String, Value>, Failure> {
    let mut body = Vec::new();
    let read = if source == "-" {
        std::io::stdin().read_to_end(&mut body).map(|_| ())
    } else {
        std::fs::read(source).map(|bytes| body = bytes)
    };
    read.map_err(|e| Failure::usage(format!("--request {source}: {e}")))?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Failure::usage(
            "malformed JSON body: the body must be a JSON object",
        )),
        Err(e) => Err(Failure::usage(format!("malformed JSON body: {e}"))),
    }
}

/// The request object: the --request body, then every flag given on top of it.
fn request_object(args: &GenerateArgs) -> Result<Map<String, Value>, Failure> {
    let mut object = match &args.request {
        None => Map::new(),
        Some(source) => read_request_file(source)?,
    };
    let mut set = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            object.insert(name.to_string(), value);
        }
    };
    set("input", args.input.clone().map(Value::from));
    set("mode", args.mode.clone().map(Value::from));
    set("max_length", args.max_length.map(Value::from));
    set("max_new_tokens", args.max_new_tokens.map(Value::from));
    set("top_p", args.top_p.map(Value::from));
    set("top_k", args.top_k.map(Value::from));
    set("temperature", args.temperature.map(Value::from));
    set("num_beams", args.num_beams.map(Value::from));
    set(
        "no_repeat_ngram_size",
        args.no_repeat_ngram_size.map(Value::from),
    );
    set(
        "num_return_sequences",
        args.num_return_sequences.map(Value::from),
    );
    set("seed", args.seed.map(Value::from));
    Ok(object)
}

/// Checks --model and validates the request (neither needs the network or the model, so a bad
/// one fails fast), then fetches the model when it is a repository id, and loads it.
fn prepare(
    model: &ModelArgs,
    storage: StorageArgs,
    object: &Map<String, Value>,
) -> Result<(Pipeline, GenerationRequest), Failure> {
    let spec = model.spec()?;
    let limits = gpt2_engine::Limits::default();
    let request = GenerationRequest::from_object(object, &limits)
        .map_err(|e| Failure::usage(e.to_string()))?;
    let dir = model.resolve(spec.as_ref())?;
    let source = ModelSource::resolve(dir.as_deref());
    if source == ModelSource::Demo {
        eprintln!(
            "gpt2: warning: using the DEMO model (random weights: its text is noise, not GPT-2); pass --model <DIR|ORG/NAME>"
        );
    }
    Ok((
        Pipeline::from_source_with_format(&source, storage.dtype)?.with_kv_format(storage.kv_dtype),
        request,
    ))
}

fn time_request(args: BenchArgs) -> Result<String, Failure> {
    let object = read_request_file(&args.request)?;
    let (pipeline, request) = prepare(&args.model, args.storage, &object)?;
    for _ in 0..args.warmup {
        pipeline.run(&request, || false)?;
    }
    let mut runs = Vec::new();
    let mut generated_tokens = 0;
    for _ in 0..args.runs {
        let started = std::time::Instant::now();
        let output = pipeline.run(&request, || false)?;
        runs.push(started.elapsed().as_secs_f64());
        generated_tokens = output.generated_tokens;
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let line = serde_json::json!({
        "engine": "gpt2-rs",
        "runs": runs,
        "median_s": median,
        "generated_tokens": generated_tokens,
        "tokens_per_s": generated_tokens as f64 / median,
    });
    Ok(format!("{line}\n"))
}

fn generate(args: GenerateArgs) -> Result<String, Failure> {
    let object = request_object(&args)?;
    let (pipeline, request) = prepare(&args.model, args.storage, &object)?;
    if args.stream {
        return stream(&pipeline, &request);
    }
    let texts = pipeline.generate(&request)?;
    if args.json || args.request.is_some() {
        return Ok(format!("{}\n", Value::from(texts)));
    }
    let mut out = String::new();
    for (index, text) in texts.iter().enumerate() {
        if texts.len() > 1 {
            out.push_str(&format!("=== sequence {} ===\n", index + 1));
        }
        out.push_str(text);
        out.push('\n');
    }
    Ok(out)
}

/// `generate --stream`: writes each event to stdout as it comes.
fn stream(pipeline: &Pipeline, request: &GenerationRequest) -> Result<String, Failure> {
    let events = pipeline.stream(request)?;
    let plain = request.num_return_sequences() == 1 && request.mode() != gpt2_engine::Mode::Beam;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`gpt2 generate --stream | head`) ends the generation quietly.
    let mut write = |text: &str| {
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
    };
    if plain && write(request.input()).is_err() {
        return Ok(String::new());
    }
    for event in events {
        let line = match (event?, plain) {
            (GenerationEvent::Token(token), true) => token.text,
            (GenerationEvent::End(_), true) => "\n".to_string(),
            // The plain text already starts with the prompt.
            (GenerationEvent::Prompt(_), true) => continue,
            (event, false) => format!("{}\n", serde_json::to_string(&event).unwrap_or_default()),
        };
        if write(&line).is_err() {
            break;
        }
    }
    Ok(String::new())
}
