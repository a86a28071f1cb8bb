//! `POST /v1/completions`' body, read into one engine request per prompt.
//!
//! Every field is type-checked here under its OpenAI name; the ranges the native contract also
//! has (top_p, penalties, logit_bias, n against `--max-num-return-sequences`, max_tokens against
//! `n_positions`) are checked by `GenerationRequest`'s own validation, whose errors name the
//! native field: [`param_of`] maps it back.

use gpt2_engine::gpt2_schema::parse_json;
use gpt2_engine::gpt2_tokenizer::Gpt2Tokenizer;
use gpt2_engine::{GenerationRequest, Limits, Mode, RequestError};
use serde_json::{Map, Value};

use super::OpenAiError;

/// The default of `max_tokens`, as OpenAI's legacy completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// Largest `logprobs`, as OpenAI.
pub const MAX_LOGPROBS: usize = 5;
/// Most `stop` strings, as OpenAI.
pub const MAX_STOP: usize = 4;

/// What the handler needs to read a body.
pub struct Context<'a> {
    pub model_id: &'a str,
    pub limits: &'a Limits,
    pub tokenizer: &'a Gpt2Tokenizer,
    /// Most prompts one request may list (each takes a queue place).
    pub max_prompts: usize,
}

/// A validated completion request.
pub struct CompletionRequest {
    /// One engine request per prompt, in order.
    pub requests: Vec<GenerationRequest>,
    /// What each prompt's choices start with when `echo` is on (empty otherwise).
    pub echo_texts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `logprobs`: the alternatives per token, when the answer carries log-probabilities.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// The engine mode, for the log and the metrics.
    pub mode: Mode,
}

/// A prompt: text, or token ids.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(param: &str, message: impl Into<String>) -> OpenAiError {
    OpenAiError::invalid(Some(param), message)
}

/// An integer (integral floats such as `16.0` accepted, as the native contract does).
fn integer(param: &str, value: &Value) -> Result<i128, OpenAiError> {
    if let Some(n) = value.as_i64() {
        return Ok(i128::from(n));
    }
    if let Some(n) = value.as_u64() {
        return Ok(i128::from(n));
    }
    match value.as_f64() {
        Some(f) if f.fract() == 0.0 => Ok(f as i128),
        _ => Err(invalid(
            param,
            format!("`{param}` must be an integer, got {}", short(value)),
        )),
    }
}

fn bounded(param: &str, value: &Value, min: i128, max: i128) -> Result<usize, OpenAiError> {
    let n = integer(param, value)?;
    if n < min || n > max {
        return Err(invalid(
            param,
            format!("`{param}` must be between {min} and {max}, got {n}"),
        ));
    }
    usize::try_from(n).map_err(|_| invalid(param, format!("`{param}` is too large: {n}")))
}

fn number(param: &str, value: &Value) -> Result<f64, OpenAiError> {
    value.as_f64().ok_or_else(|| {
        invalid(
            param,
            format!("`{param}` must be a number, got {}", describe(value)),
        )
    })
}

fn boolean(param: &str, value: &Value) -> Result<bool, OpenAiError> {
    value.as_bool().ok_or_else(|| {
        invalid(
            param,
            format!("`{param}` must be a boolean, got {}", describe(value)),
        )
    })
}

/// A value for a message: short JSON, or its kind when long.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 40 {
        text
    } else {
        describe(value).to_string()
    }
}

/// The OpenAI parameter behind a native field name.
pub fn param_of(field: &str) -> &str {
    match field {
        "input" => "prompt",
        "max_new_tokens" | "max_length" => "max_tokens",
        "num_return_sequences" => "n",
        "top_logprobs" => "logprobs",
        "min_new_tokens" => "min_tokens",
        "prompt_logprobs" | "return_full_text" => "echo",
        "mode" => "temperature",
        other => other,
    }
}

/// A native validation error, under the OpenAI parameter's name.
pub fn from_request_error(error: RequestError) -> OpenAiError {
    match error {
        RequestError::InvalidField { field, reason } => {
            let param = param_of(field);
            invalid(param, format!("Invalid value for `{param}`: {reason}"))
        }
        RequestError::MalformedJson(message) => {
            OpenAiError::invalid(None, format!("malformed JSON body: {message}"))
        }
    }
}

fn token_id(param: &str, value: &Value) -> Result<u32, OpenAiError> {
    let id = integer(param, value).map_err(|_| {
        invalid(
            param,
            format!(
                "`{param}` must be a string, a list of strings, a list of token ids or a list of \
                 lists of token ids; got an item {}",
                short(value)
            ),
        )
    })?;
    u32::try_from(id).map_err(|_| invalid(param, format!("token id {id} is out of range")))
}

fn id_list(items: &[Value]) -> Result<Vec<u32>, OpenAiError> {
    if items.is_empty() {
        return Err(invalid("prompt", "a token-id prompt must not be empty"));
    }
    items.iter().map(|item| token_id("prompt", item)).collect()
}

fn prompts(value: Option<&Value>) -> Result<Vec<Prompt>, OpenAiError> {
    let shape = "`prompt` must be a string, a list of strings, a list of token ids or a list of \
                 lists of token ids";
    let Some(value) = value else {
        return Err(invalid("prompt", "`prompt` is required"));
    };
    let prompts = match value {
        Value::String(text) => vec![Prompt::Text(text.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(invalid("prompt", "`prompt` must not be an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|item| Prompt::Text(item.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Prompt::Ids(id_list(items)?)]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|item| id_list(item.as_array().map_or(&[][..], Vec::as_slice)).map(Prompt::Ids))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(invalid(
                "prompt",
                format!("{shape}, got {}", describe(other)),
            ))
        }
    };
    if prompts
        .iter()
        .any(|p| matches!(p, Prompt::Text(text) if text.is_empty()))
    {
        return Err(invalid("prompt", "`prompt` must not be empty"));
    }
    Ok(prompts)
}

fn stop(value: &Value) -> Result<Vec<String>, OpenAiError> {
    let stop = match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    invalid(
                        "stop",
                        format!("`stop` must hold strings only, got {}", describe(item)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(invalid(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings, got {}",
                    describe(other)
                ),
            ))
        }
    };
    if stop.len() > MAX_STOP {
        return Err(invalid(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOP} strings, got {}",
                stop.len()
            ),
        ));
    }
    Ok(stop)
}

fn logit_bias(value: &Value) -> Result<Vec<(u32, f32)>, OpenAiError> {
    let Value::Object(entries) = value else {
        return Err(invalid(
            "logit_bias",
            format!(
                "`logit_bias` must be an object mapping token ids to biases, got {}",
                describe(value)
            ),
        ));
    };
    entries
        .iter()
        .map(|(key, bias)| {
            let id = key.parse::<u32>().map_err(|_| {
                invalid(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids, got {key:?}"),
                )
            })?;
            let bias = number("logit_bias", bias)?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(invalid(
                    "logit_bias",
                    format!("`logit_bias` values must be in [-100, 100], got {bias}"),
                ));
            }
            Ok((id, bias as f32))
        })
        .collect()
}

/// Parses and validates a body; the engine checks what needs the tokenized prompt later.
pub fn parse(body: &[u8], context: &Context<'_>) -> Result<CompletionRequest, OpenAiError> {
    let value = parse_json(body).map_err(from_request_error)?;
    let Value::Object(object) = value else {
        return Err(OpenAiError::invalid(
            None,
            format!("the body must be a JSON object, got {}", describe(&value)),
        ));
    };
    read(&object, context)
}

fn read(
    object: &Map<String, Value>,
    context: &Context<'_>,
) -> Result<CompletionRequest, OpenAiError> {
    let get = |name: &str| object.get(name).filter(|v| !v.is_null());

    match get("model") {
        None => return Err(invalid("model", "`model` is required")),
        Some(Value::String(model)) if model == context.model_id => {}
        Some(Value::String(model)) => return Err(OpenAiError::model_not_found(model)),
        Some(other) => {
            return Err(invalid(
                "model",
                format!("`model` must be a string, got {}", describe(other)),
            ))
        }
    }
    let prompts = prompts(get("prompt"))?;
    if prompts.len() > context.max_prompts {
        return Err(invalid(
            "prompt",
            format!(
                "`prompt` may list at most {} prompts (the server's queue capacity), got {}",
                context.max_prompts,
                prompts.len()
            ),
        ));
    }
    if let Some(v) = get("user") {
        if !v.is_string() {
            return Err(invalid(
                "user",
                format!("`user` must be a string, got {}", describe(v)),
            ));
        }
    }
    if let Some(v) = get("suffix") {
        match v {
            Value::String(s) if s.is_empty() => {}
            Value::String(_) => {
                return Err(invalid(
                    "suffix",
                    "`suffix` is not supported: GPT-2 generates left to right and cannot insert \
                     text before a suffix",
                ))
            }
            other => {
                return Err(invalid(
                    "suffix",
                    format!("`suffix` must be a string, got {}", describe(other)),
                ))
            }
        }
    }
    let n = match get("n") {
        Some(v) => bounded("n", v, 1, i128::from(u32::MAX))?,
        None => 1,
    };
    if let Some(v) = get("best_of") {
        let best_of = bounded("best_of", v, 1, i128::from(u32::MAX))?;
        if best_of != n {
            return Err(invalid(
                "best_of",
                format!(
                    "`best_of` is not supported unless it equals `n` ({n}): the server returns \
                     every sequence it generates; got {best_of}"
                ),
            ));
        }
    }
    let max_tokens = match get("max_tokens") {
        Some(v) => bounded("max_tokens", v, 1, i128::from(u32::MAX))?,
        None => DEFAULT_MAX_TOKENS,
    };
    let temperature = match get("temperature") {
        Some(v) => {
            let t = number("temperature", v)?;
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid(
                    "temperature",
                    format!("`temperature` must be between 0 and 2, got {t}"),
                ));
            }
            t
        }
        None => 1.0,
    };
    let top_p = match get("top_p") {
        Some(v) => {
            let p = number("top_p", v)?;
            if !(p > 0.0 && p <= 1.0) || p as f32 == 0.0 {
                return Err(invalid(
                    "top_p",
                    format!("`top_p` must be greater than 0 and at most 1, got {p}"),
                ));
            }
            p
        }
        None => 1.0,
    };
    let top_k = match get("top_k") {
        Some(v) => {
            let k = integer("top_k", v)?;
            match k {
                -1 | 0 => 0,
                k if k < -1 => {
                    return Err(invalid(
                        "top_k",
                        format!("`top_k` must be -1 or 0 (off) or a positive integer, got {k}"),
                    ))
                }
                _ => bounded("top_k", v, 1, i128::from(u32::MAX))?,
            }
        }
        None => 0,
    };
    let num_beams = match get("num_beams") {
        Some(v) => bounded("num_beams", v, 1, i128::from(u32::MAX))?,
        None => 1,
    };
    let no_repeat_ngram_size = match get("no_repeat_ngram_size") {
        Some(v) => bounded("no_repeat_ngram_size", v, 0, i128::from(u32::MAX))?,
        None => 0,
    };
    let min_tokens = match get("min_tokens") {
        Some(v) => bounded("min_tokens", v, 0, i128::from(u32::MAX))?,
        None => 0,
    };
    let logprobs = match get("logprobs") {
        Some(v) if v.is_boolean() => {
            return Err(invalid(
                "logprobs",
                format!("`logprobs` must be an integer from 0 to {MAX_LOGPROBS}, got {v}"),
            ))
        }
        Some(v) => Some(bounded("logprobs", v, 0, MAX_LOGPROBS as i128)?),
        None => None,
    };
    let echo = get("echo")
        .map(|v| boolean("echo", v))
        .transpose()?
        .unwrap_or(false);
    let stream = get("stream")
        .map(|v| boolean("stream", v))
        .transpose()?
        .unwrap_or(false);
    let include_usage = match get("stream_options") {
        None => false,
        Some(Value::Object(options)) => {
            if !stream {
                return Err(invalid(
                    "stream_options",
                    "`stream_options` is only allowed when `stream` is true",
                ));
            }
            match options.get("include_usage").filter(|v| !v.is_null()) {
                Some(v) => boolean("stream_options.include_usage", v)?,
                None => false,
            }
        }
        Some(other) => {
            return Err(invalid(
                "stream_options",
                format!(
                    "`stream_options` must be an object, got {}",
                    describe(other)
                ),
            ))
        }
    };
    let ignore_eos = get("ignore_eos")
        .map(|v| boolean("ignore_eos", v))
        .transpose()?
        .unwrap_or(false);
    let seed = match get("seed") {
        Some(v) => {
            let seed = integer("seed", v)?;
            if seed < i128::from(i64::MIN) || seed > i128::from(u64::MAX) {
                return Err(invalid(
                    "seed",
                    format!("`seed` must fit in 64 bits, got {seed}"),
                ));
            }
            // A negative seed is as good a seed as its two's-complement bits.
            Some(if seed < 0 {
                seed as i64 as u64
            } else {
                seed as u64
            })
        }
        None => None,
    };
    let stop = get("stop").map(stop).transpose()?;
    let logit_bias = get("logit_bias").map(logit_bias).transpose()?;
    let penalty = |name: &str| -> Result<Option<f64>, OpenAiError> {
        let Some(v) = get(name) else { return Ok(None) };
        let p = number(name, v)?;
        if !(-2.0..=2.0).contains(&p) {
            return Err(invalid(
                name,
                format!("`{name}` must be between -2 and 2, got {p}"),
            ));
        }
        Ok(Some(p))
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    let repetition_penalty = match get("repetition_penalty") {
        Some(v) => {
            let p = number("repetition_penalty", v)?;
            if !(p > 0.0 && (p as f32).is_finite() && (p as f32) > 0.0) {
                return Err(invalid(
                    "repetition_penalty",
                    format!("`repetition_penalty` must be a positive number, got {p}"),
                ));
            }
            Some(p)
        }
        None => None,
    };

    let mode = if num_beams > 1 {
        Mode::Beam
    } else if temperature == 0.0 {
        Mode::Greedy
    } else {
        Mode::Sample
    };
    if mode == Mode::Beam && logprobs.is_some() {
        return Err(invalid(
            "logprobs",
            "`logprobs` is not available with beam search (`num_beams` > 1): its sequences are \
             chosen whole, without per-token log-probabilities",
        ));
    }

    let mut requests = Vec::with_capacity(prompts.len());
    let mut echo_texts = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let (mut builder, echo_text) = match prompt {
            Prompt::Text(text) => (GenerationRequest::builder(text.clone()), text),
            Prompt::Ids(ids) => {
                let text = if echo {
                    context.tokenizer.decode(&ids).map_err(|e| {
                        invalid("prompt", format!("the token ids cannot be decoded: {e}"))
                    })?
                } else {
                    String::new()
                };
                (GenerationRequest::builder("").input_ids(ids), text)
            }
        };
        builder = builder
            .mode(mode)
            .max_new_tokens(max_tokens)
            .num_return_sequences(n)
            .stream(stream)
            .ignore_eos(ignore_eos)
            .min_new_tokens(min_tokens)
            .return_full_text(false)
            .top_logprobs(logprobs.unwrap_or(0))
            .prompt_logprobs(echo && logprobs.is_some());
        match mode {
            Mode::Beam => {
                builder = builder
                    .num_beams(num_beams)
                    .no_repeat_ngram_size(no_repeat_ngram_size)
            }
            Mode::Sample => {
                builder = builder
                    .temperature(temperature as f32)
                    .top_p(top_p as f32)
                    .top_k(top_k)
            }
            _ => builder = builder.top_p(top_p as f32).top_k(top_k),
        }
        if let Some(seed) = seed {
            builder = builder.seed(seed);
        }
        if let Some(stop) = &stop {
            builder = builder.stop(stop.clone());
        }
        if let Some(bias) = &logit_bias {
            builder = builder.logit_bias(bias.iter().copied());
        }
        if let Some(p) = presence_penalty {
            builder = builder.presence_penalty(p as f32);
        }
        if let Some(p) = frequency_penalty {
            builder = builder.frequency_penalty(p as f32);
        }
        if let Some(p) = repetition_penalty {
            builder = builder.repetition_penalty(p as f32);
        }
        requests.push(
            builder
                .build_with(context.limits)
                .map_err(from_request_error)?,
        );
        echo_texts.push(if echo { echo_text } else { String::new() });
    }
    Ok(CompletionRequest {
        requests,
        echo_texts,
        n,
        stream,
        include_usage,
        logprobs,
        echo,
        mode,
    })
}
