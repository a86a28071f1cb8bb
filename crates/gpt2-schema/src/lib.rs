//! The "GPT-2 API" contract: the JSON request body, its defaults, and its validation.
//!
//! Every number a user sets is checked here, once, and comes out as a typed
//! [`GenerationRequest`]; the limits that need the prompt's token count and the model's
//! `n_positions` are checked by [`GenerationRequest::to_params`]. Errors name the field and the
//! reason. No model, no text processing.
//!
//! ```
//! use gpt2_schema::{GenerationRequest, Limits, Mode};
//!
//! let request = GenerationRequest::from_json(br#"{"input": "Hello", "mode": "greedy"}"#, &Limits::default()).unwrap();
//! assert_eq!(request.mode(), Mode::Greedy);
//! assert_eq!(request.num_return_sequences(), 3);
//! let params = request.to_params(1, 1024, Some(50256)).unwrap();
//! assert_eq!(params.max_length, 100);
//!
//! let err = GenerationRequest::from_json(br#"{"input": "Hi", "top_p": 1.5}"#, &Limits::default()).unwrap_err();
//! assert_eq!(err.field(), Some("top_p"));
//! ```

use gpt2_generation::{BeamParams, GenerationParams, LogitsProcessing, SamplingParams, Strategy};
use serde::Serialize;
use serde_json::{Map, Value};

/// The generation modes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Sampling with top-k then top-p (temperature 1).
    SampleTopP,
    /// Sampling with top-k only (temperature 1).
    SampleTopK,
    /// Sampling with temperature, top-k and top-p.
    Sample,
    /// Beam search with no-repeat-n-gram.
    Beam,
    /// Argmax at every step.
    Greedy,
}

impl Mode {
    /// Every mode, by its contract name.
    pub const ALL: [(&'static str, Mode); 5] = [
        ("sample-top-p", Mode::SampleTopP),
        ("sample-top-k", Mode::SampleTopK),
        ("sample", Mode::Sample),
        ("beam", Mode::Beam),
        ("greedy", Mode::Greedy),
    ];

    /// The contract name of the mode.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("", |(n, _)| n)
    }

    /// Parses a contract name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// Per-request compute limits set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `num_return_sequences` accepted (default 16).
    pub max_num_return_sequences: usize,
    /// Largest `num_beams` accepted (default 16).
    pub max_num_beams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_num_return_sequences: 16,
            max_num_beams: 16,
        }
    }
}

/// A validated request with every default filled in: made only by [`GenerationRequest::from_json`],
/// [`GenerationRequest::from_object`] or [`GenerationRequest::builder`], which all validate it the
/// same way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationRequest {
    /// The prompt (non-empty).
    input: String,
    /// Total length in tokens, prompt included (default 100).
    // Left out of the serialization at its default, so that a request with `max_new_tokens`
    // (which excludes `max_length`) serializes to a body that validates.
    #[serde(skip_serializing_if = "is_default_max_length")]
    max_length: usize,
    /// Tokens to generate after the prompt, instead of `max_length`.
    max_new_tokens: Option<usize>,
    /// How tokens are chosen (default `sample-top-p`).
    mode: Mode,
    /// Nucleus mass, in (0, 1] (default 0.92).
    top_p: f32,
    /// Top-k cut, 0 disables it (default 50).
    top_k: usize,
    /// Positive temperature (default 0.7), used by mode `sample`.
    temperature: f32,
    /// Beams, at least 1 (default 5), used by mode `beam`.
    num_beams: usize,
    /// No-repeat n-gram size, 0 disables it (default 2), used by mode `beam`.
    no_repeat_ngram_size: usize,
    /// Sequences returned, at least 1 (default 3).
    num_return_sequences: usize,
    /// Sampling seed; `None` (absent, null or -1) draws a random one.
    seed: Option<u64>,
    /// Whether the caller asked for the answer as a stream of events (`"stream": true`).
    stream: bool,
    /// The prompt as token ids instead of `input` (set by [`GenerationRequestBuilder::input_ids`]
    /// only: the JSON body's `input` is text, so it is not serialized either).
    #[serde(skip)]
    input_ids: Option<Vec<u32>>,
    /// Strings that end a sequence; the text ends before the first one found (default none).
    stop: Vec<String>,
    /// HF's repetition penalty, 1.0 is off (default).
    repetition_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2]; 0 is off (default).
    presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]; 0 is off (default).
    frequency_penalty: f32,
    /// `(token id, bias)` added to the logits, bias in [-100, 100] (default none); serialized as
    /// the JSON body's object of id strings to biases.
    #[serde(serialize_with = "serialize_logit_bias")]
    logit_bias: Vec<(u32, f32)>,
    /// The end-of-text token cannot end a sequence before this many new tokens (default 0).
    min_new_tokens: usize,
    /// Generation does not stop at the end-of-text token (default false).
    ignore_eos: bool,
    /// The most likely alternatives reported with each generated token, 0 to 20 (default 0).
    top_logprobs: usize,
    /// Whether the prompt's tokens get their log-probabilities too (default false).
    prompt_logprobs: bool,
    /// Whether each answer string starts with the prompt (default true, as the contract says).
    return_full_text: bool,
    /// Whether the answer is objects with the finish reason and tokens instead of strings
    /// (default false).
    details: bool,
}

fn is_default_max_length(max_length: &usize) -> bool {
    *max_length == GenerationRequest::defaults().max_length
}

fn serialize_logit_bias<S: serde::Serializer>(
    biases: &[(u32, f32)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(biases.iter().map(|(token, bias)| (token.to_string(), bias)))
}

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `logit_bias` entries one request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most alternatives `top_logprobs` may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenerationRequest {
    /// The contract's defaults, with an empty input (not a valid request by itself).
    fn defaults() -> Self {
        Self {
            input: String::new(),
            max_length: 100,
            max_new_tokens: None,
            mode: Mode::SampleTopP,
            top_p: 0.92,
            top_k: 50,
            temperature: 0.7,
            num_beams: 5,
            no_repeat_ngram_size: 2,
            num_return_sequences: 3,
            seed: None,
            stream: false,
            input_ids: None,
            stop: Vec::new(),
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_new_tokens: 0,
            ignore_eos: false,
            top_logprobs: 0,
            prompt_logprobs: false,
            return_full_text: true,
            details: false,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The body is not JSON, or not a JSON object.
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    /// A field has the wrong type or an out-of-range value.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl RequestError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// The offending field, for validation errors.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            Self::MalformedJson(_) => None,
        }
    }

    /// A short machine-readable kind: `malformed_json` or `validation_error`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidField { .. } => "validation_error",
        }
    }
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

/// Parses a JSON body, refusing duplicate keys: serde_json would keep the last one silently, so
/// `{"num_return_sequences": 1000000, "num_return_sequences": 1}` would pass a proxy that checked
/// the first and reach us as the second.
pub fn parse_json(body: &[u8]) -> Result<Value, RequestError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde::Deserialize::deserialize(&mut deserializer)
        .and_then(|StrictValue(value)| deserializer.end().map(|()| value))
        .map_err(|e| RequestError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// A JSON value whose objects have distinct keys.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// An integer field. Integral floats such as `50.0` are accepted (JSON has one number type, and
/// clients in JavaScript or with numpy often send them); `50.5` is not.
fn integer(field: &'static str, value: &Value) -> Result<i128, RequestError> {
    if let Some(n) = value.as_i64() {
        return Ok(i128::from(n));
    }
    if let Some(n) = value.as_u64() {
        return Ok(i128::from(n));
    }
    if let Some(f) = value.as_f64() {
        // Integral floats (2^64 arrives as one) keep their magnitude, so that the range checks
        // say "out of range" rather than "not an integer"; `as` saturates beyond i128.
        if f.fract() == 0.0 {
            return Ok(f as i128);
        }
        return Err(RequestError::invalid(
            field,
            format!("must be an integer, got {value}"),
        ));
    }
    Err(RequestError::invalid(
        field,
        format!("must be an integer, got {}", describe(value)),
    ))
}

fn bounded_integer(
    field: &'static str,
    value: &Value,
    min: i128,
    max: i128,
) -> Result<usize, RequestError> {
    let n = integer(field, value)?;
    if n < min {
        return Err(RequestError::invalid(
            field,
            format!("must be at least {min}, got {n}"),
        ));
    }
    if n > max {
        return Err(RequestError::invalid(
            field,
            format!("must be at most {max}, got {n}"),
        ));
    }
    usize::try_from(n).map_err(|_| RequestError::invalid(field, format!("is too large: {n}")))
}

fn number(field: &'static str, value: &Value) -> Result<f64, RequestError> {
    value.as_f64().ok_or_else(|| {
        RequestError::invalid(field, format!("must be a number, got {}", describe(value)))
    })
}

impl GenerationRequest {
    /// Parses and validates a request body.
    pub fn from_json(body: &[u8], limits: &Limits) -> Result<Self, RequestError> {
        let value = parse_json(body)?;
        let Value::Object(object) = value else {
            return Err(RequestError::MalformedJson(format!(
                "the body must be a JSON object, got {}",
                describe(&value)
            )));
        };
        Self::from_object(&object, limits)
    }

    // The validated fields, read-only.

    /// The prompt (non-empty).
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Total length in tokens, prompt included (default 100).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokens to generate after the prompt, instead of `max_length` (giving both is refused).
    pub fn max_new_tokens(&self) -> Option<usize> {
        self.max_new_tokens
    }

    /// How tokens are chosen (default `sample-top-p`).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Nucleus mass, in (0, 1] (default 0.92).
    pub fn top_p(&self) -> f32 {
        self.top_p
    }

    /// Top-k cut, 0 disables it (default 50).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Positive temperature (default 0.7), used by mode `sample`.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Beams, at least 1 (default 5), used by mode `beam`.
    pub fn num_beams(&self) -> usize {
        self.num_beams
    }

    /// No-repeat n-gram size, 0 disables it (default 2), used by mode `beam`.
    pub fn no_repeat_ngram_size(&self) -> usize {
        self.no_repeat_ngram_size
    }

    /// Sequences returned, at least 1 (default 3).
    pub fn num_return_sequences(&self) -> usize {
        self.num_return_sequences
    }

    /// Sampling seed; `None` (absent, null or -1) draws a random one.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// Whether the caller asked for a stream of events (`"stream": true`; default false).
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// The prompt as token ids, when it was given that way (then [`GenerationRequest::input`]
    /// is empty).
    pub fn input_ids(&self) -> Option<&[u32]> {
        self.input_ids.as_deref()
    }

    /// Strings that end a sequence; its text ends before the first one found (default none).
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    /// HF's repetition penalty; 1.0 (default) is off.
    pub fn repetition_penalty(&self) -> f32 {
        self.repetition_penalty
    }

    /// OpenAI's presence penalty; 0 (default) is off.
    pub fn presence_penalty(&self) -> f32 {
        self.presence_penalty
    }

    /// OpenAI's frequency penalty; 0 (default) is off.
    pub fn frequency_penalty(&self) -> f32 {
        self.frequency_penalty
    }

    /// `(token id, bias)` pairs added to the logits (default none).
    pub fn logit_bias(&self) -> &[(u32, f32)] {
        &self.logit_bias
    }

    /// New tokens before the end-of-text token may end a sequence (default 0).
    pub fn min_new_tokens(&self) -> usize {
        self.min_new_tokens
    }

    /// Whether generation ignores the end-of-text token (default false).
    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }

    /// Alternatives reported with each generated token (default 0).
    pub fn top_logprobs(&self) -> usize {
        self.top_logprobs
    }

    /// Whether the prompt's tokens get log-probabilities (default false).
    pub fn prompt_logprobs(&self) -> bool {
        self.prompt_logprobs
    }

    /// Whether each answer string starts with the prompt (default true).
    pub fn return_full_text(&self) -> bool {
        self.return_full_text
    }

    /// Whether the answer is detailed objects instead of strings (default false).
    pub fn details(&self) -> bool {
        self.details
    }

    /// Starts a request for `input` with every other field at the contract's default; the
    /// builder's [`GenerationRequestBuilder::build`] validates exactly as the JSON path does.
    pub fn builder(input: impl Into<String>) -> GenerationRequestBuilder {
        GenerationRequestBuilder::new(input.into())
    }

    /// Validates a parsed JSON object. Unknown fields are ignored; `null` means "use the default".
    pub fn from_object(object: &Map<String, Value>, limits: &Limits) -> Result<Self, RequestError> {
        Self::from_object_with_ids(object, limits, None)
    }

    fn from_object_with_ids(
        object: &Map<String, Value>,
        limits: &Limits,
        input_ids: Option<Vec<u32>>,
    ) -> Result<Self, RequestError> {
        let mut request = Self::defaults();
        let present = |name: &str| object.get(name).filter(|v| !v.is_null());

        request.input = match object.get("input") {
            _ if input_ids.is_some() => {
                if input_ids.as_ref().is_some_and(Vec::is_empty) {
                    return Err(RequestError::invalid("input", "must not be empty"));
                }
                request.input_ids = input_ids;
                String::new()
            }
            None | Some(Value::Null) => return Err(RequestError::invalid("input", "is required")),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(RequestError::invalid("input", "must not be empty"))
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(RequestError::invalid(
                    "input",
                    format!("must be a string, got {}", describe(other)),
                ))
            }
        };
        if let Some(v) = present("mode") {
            let name = v.as_str().ok_or_else(|| {
                RequestError::invalid("mode", format!("must be a string, got {}", describe(v)))
            })?;
            request.mode = Mode::from_name(name).ok_or_else(|| {
                let valid: Vec<&str> = Mode::ALL.iter().map(|(n, _)| *n).collect();
                RequestError::invalid(
                    "mode",
                    format!("unknown mode {name:?}; valid modes: {}", valid.join(", ")),
                )
            })?;
        }
        if let Some(v) = present("max_length") {
            request.max_length = bounded_integer("max_length", v, 1, i128::from(u32::MAX))?;
        }
        if let Some(v) = present("max_new_tokens") {
            request.max_new_tokens = Some(bounded_integer(
                "max_new_tokens",
                v,
                1,
                i128::from(u32::MAX),
            )?);
            if present("max_length").is_some() {
                return Err(RequestError::invalid(
                    "max_new_tokens",
                    "cannot be given with max_length: give the total length (max_length) or the new tokens (max_new_tokens)",
                ));
            }
        }
        if let Some(v) = present("top_p") {
            let p = number("top_p", v)?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(RequestError::invalid(
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
            if p as f32 == 0.0 {
                return Err(RequestError::invalid(
                    "top_p",
                    format!("is too small to compute with (below 1.4e-45, the smallest float32), got {p}"),
                ));
            }
            request.top_p = p as f32;
        }
        if let Some(v) = present("top_k") {
            request.top_k = bounded_integer("top_k", v, 0, i128::from(u32::MAX))?;
        }
        if let Some(v) = present("temperature") {
            let t = number("temperature", v)?;
            if !(t > 0.0 && (t as f32).is_finite() && (t as f32) > 0.0) {
                return Err(RequestError::invalid(
                    "temperature",
                    format!("must be a positive number, got {t}"),
                ));
            }
            request.temperature = t as f32;
        }
        if let Some(v) = present("num_beams") {
            request.num_beams = bounded_integer("num_beams", v, 1, limits.max_num_beams as i128)?;
        }
        if let Some(v) = present("no_repeat_ngram_size") {
            request.no_repeat_ngram_size =
                bounded_integer("no_repeat_ngram_size", v, 0, i128::from(u32::MAX))?;
        }
        if let Some(v) = present("num_return_sequences") {
            request.num_return_sequences = bounded_integer(
                "num_return_sequences",
                v,
                1,
                limits.max_num_return_sequences as i128,
            )?;
        }
        if request.mode == Mode::Beam && request.num_return_sequences > request.num_beams {
            return Err(RequestError::invalid(
                "num_return_sequences",
                format!(
                    "must not exceed num_beams ({}) in beam mode, got {}",
                    request.num_beams, request.num_return_sequences
                ),
            ));
        }
        if let Some(v) = present("stream") {
            request.stream = v.as_bool().ok_or_else(|| {
                RequestError::invalid("stream", format!("must be a boolean, got {}", describe(v)))
            })?;
        }
        request.read_controls(&present)?;
        if let Some(v) = present("seed") {
            let seed = integer("seed", v)?;
            request.seed = match seed {
                -1 => None,
                s if s < 0 => {
                    return Err(RequestError::invalid(
                        "seed",
                        format!("must be -1 (random) or a non-negative integer, got {s}"),
                    ))
                }
                s => Some(u64::try_from(s).map_err(|_| {
                    RequestError::invalid("seed", format!("must fit in 64 bits, got {s}"))
                })?),
            };
        }
        Ok(request)
    }

    /// Reads the controls beyond the contract's fields (all off when absent).
    fn read_controls<'v>(
        &mut self,
        present: &impl Fn(&str) -> Option<&'v Value>,
    ) -> Result<(), RequestError> {
        let boolean = |field: &'static str, v: &Value| {
            v.as_bool().ok_or_else(|| {
                RequestError::invalid(field, format!("must be a boolean, got {}", describe(v)))
            })
        };
        let ranged = |field: &'static str, v: &Value, min: f64, max: f64| {
            let x = number(field, v)?;
            if !(min..=max).contains(&x) {
                return Err(RequestError::invalid(
                    field,
                    format!("must be in [{min}, {max}], got {x}"),
                ));
            }
            Ok(x as f32)
        };
        if let Some(v) = present("stop") {
            self.stop = match v {
                Value::String(s) => vec![s.clone()],
                Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str().map(str::to_string).ok_or_else(|| {
                            RequestError::invalid(
                                "stop",
                                format!("must hold strings only, got {}", describe(item)),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                other => {
                    return Err(RequestError::invalid(
                        "stop",
                        format!(
                            "must be a string or a list of strings, got {}",
                            describe(other)
                        ),
                    ))
                }
            };
            if self.stop.len() > MAX_STOP_STRINGS {
                return Err(RequestError::invalid(
                    "stop",
                    format!(
                        "may hold at most {MAX_STOP_STRINGS} strings, got {}",
                        self.stop.len()
                    ),
                ));
            }
            if let Some(bad) = self
                .stop
                .iter()
                .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
            {
                return Err(RequestError::invalid(
                    "stop",
                    format!(
                        "strings must be 1 to {MAX_STOP_BYTES} bytes long, got one of {}",
                        bad.len()
                    ),
                ));
            }
        }
        if let Some(v) = present("repetition_penalty") {
            let p = number("repetition_penalty", v)?;
            if !(p > 0.0 && (p as f32).is_finite() && (p as f32) > 0.0) {
                return Err(RequestError::invalid(
                    "repetition_penalty",
                    format!("must be a positive number, got {p}"),
                ));
            }
            self.repetition_penalty = p as f32;
        }
        if let Some(v) = present("presence_penalty") {
            self.presence_penalty = ranged("presence_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = present("frequency_penalty") {
            self.frequency_penalty = ranged("frequency_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = present("logit_bias") {
            let Value::Object(entries) = v else {
                return Err(RequestError::invalid(
                    "logit_bias",
                    format!(
                        "must be an object mapping token ids to biases, got {}",
                        describe(v)
                    ),
                ));
            };
            if entries.len() > MAX_LOGIT_BIAS {
                return Err(RequestError::invalid(
                    "logit_bias",
                    format!(
                        "may hold at most {MAX_LOGIT_BIAS} entries, got {}",
                        entries.len()
                    ),
                ));
            }
            self.logit_bias = entries
                .iter()
                .map(|(key, bias)| {
                    // Canonical decimal only ("7", not "07" or "+7"), so that no two keys name the
                    // same token.
                    let token = key
                        .parse::<u32>()
                        .ok()
                        .filter(|token| token.to_string() == *key)
                        .ok_or_else(|| {
                            RequestError::invalid(
                                "logit_bias",
                                format!(
                                    "keys must be token ids (integers as strings, such as \"50256\"), got {key:?}"
                                ),
                            )
                        })?;
                    Ok((token, ranged("logit_bias", bias, -100.0, 100.0)?))
                })
                .collect::<Result<_, RequestError>>()?;
        }
        if let Some(v) = present("min_new_tokens") {
            self.min_new_tokens = bounded_integer("min_new_tokens", v, 0, i128::from(u32::MAX))?;
        }
        if let Some(v) = present("ignore_eos") {
            self.ignore_eos = boolean("ignore_eos", v)?;
        }
        if let Some(v) = present("top_logprobs") {
            self.top_logprobs = bounded_integer("top_logprobs", v, 0, MAX_TOP_LOGPROBS as i128)?;
        }
        if let Some(v) = present("prompt_logprobs") {
            self.prompt_logprobs = boolean("prompt_logprobs", v)?;
        }
        if let Some(v) = present("return_full_text") {
            self.return_full_text = boolean("return_full_text", v)?;
        }
        if let Some(v) = present("details") {
            self.details = boolean("details", v)?;
        }
        Ok(())
    }

    /// The generation parameters for a prompt of `prompt_len` tokens on a model with
    /// `n_positions` positions; checks the length limits, naming the field that sets them.
    pub fn to_params(
        &self,
        prompt_len: usize,
        n_positions: usize,
        eos_token_id: Option<u32>,
    ) -> Result<GenerationParams, RequestError> {
        let (field, max_length) = match self.max_new_tokens {
            Some(new) => ("max_new_tokens", prompt_len.saturating_add(new)),
            None => ("max_length", self.max_length),
        };
        if field == "max_length" && max_length <= prompt_len {
            return Err(RequestError::invalid(
                "max_length",
                format!(
                    "must exceed the prompt's token count ({prompt_len}) because it counts the prompt, got {max_length}"
                ),
            ));
        }
        if max_length > n_positions {
            return Err(RequestError::invalid(
                field,
                format!(
                    "the total length ({max_length} tokens, prompt {prompt_len}) exceeds the model's n_positions ({n_positions})"
                ),
            ));
        }
        let strategy = match self.mode {
            Mode::Greedy => Strategy::Greedy,
            Mode::SampleTopP => Strategy::Sample(SamplingParams {
                temperature: 1.0,
                top_k: self.top_k,
                top_p: self.top_p,
            }),
            Mode::SampleTopK => Strategy::Sample(SamplingParams {
                temperature: 1.0,
                top_k: self.top_k,
                top_p: 1.0,
            }),
            Mode::Sample => Strategy::Sample(SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            }),
            Mode::Beam => Strategy::Beam(BeamParams {
                num_beams: self.num_beams,
                no_repeat_ngram_size: self.no_repeat_ngram_size,
            }),
        };
        Ok(GenerationParams {
            strategy,
            max_length,
            num_return_sequences: self.num_return_sequences,
            eos_token_id: if self.ignore_eos { None } else { eos_token_id },
            seed: self.seed,
            processing: LogitsProcessing {
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logit_bias: self.logit_bias.clone(),
                min_new_tokens: self.min_new_tokens,
            },
            top_logprobs: self.top_logprobs,
        })
    }
}

/// Builds a [`GenerationRequest`] from Rust values, with the contract's defaults for what it does
/// not set (see [`GenerationRequest`]'s fields) and the JSON path's validation, field names and
/// messages.
///
/// ```
/// use gpt2_schema::{GenerationRequest, Mode};
///
/// let request = GenerationRequest::builder("Hello").mode(Mode::Greedy).max_length(40).build()?;
/// assert_eq!((request.mode(), request.max_length(), request.num_return_sequences()), (Mode::Greedy, 40, 3));
///
/// let err = GenerationRequest::builder("Hello").top_p(1.5).build().unwrap_err();
/// assert_eq!(err.field(), Some("top_p"));
/// # Ok::<(), gpt2_schema::RequestError>(())
/// ```
#[derive(Debug, Clone)]
pub struct GenerationRequestBuilder {
    fields: Map<String, Value>,
    input_ids: Option<Vec<u32>>,
}

macro_rules! builder_setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.fields.insert(stringify!($name).into(), serde_json::json!(value));
                self
            }
        )*
    };
}

impl GenerationRequestBuilder {
    fn new(input: String) -> Self {
        let mut fields = Map::new();
        fields.insert("input".into(), Value::String(input));
        Self {
            fields,
            input_ids: None,
        }
    }

    builder_setters! {
        /// Total length in tokens, prompt included (default 100).
        max_length: usize,
        /// Tokens to generate after the prompt, instead of `max_length`.
        max_new_tokens: usize,
        /// Nucleus mass, in (0, 1] (default 0.92).
        top_p: f32,
        /// Top-k cut, 0 disables it (default 50).
        top_k: usize,
        /// Positive temperature (default 0.7), used by mode `sample`.
        temperature: f32,
        /// Beams (default 5), used by mode `beam`.
        num_beams: usize,
        /// No-repeat n-gram size, 0 disables it (default 2), used by mode `beam`.
        no_repeat_ngram_size: usize,
        /// Sequences returned (default 3).
        num_return_sequences: usize,
        /// Sampling seed (default: a random one).
        seed: u64,
        /// Marks the request as streamed (default false); informational for library callers,
        /// who choose between `generate` and `stream` themselves.
        stream: bool,
        /// Strings that end a sequence (default none); its text ends before the first found.
        stop: Vec<String>,
        /// HF's repetition penalty (default 1.0, off).
        repetition_penalty: f32,
        /// OpenAI's presence penalty in [-2, 2] (default 0, off).
        presence_penalty: f32,
        /// OpenAI's frequency penalty in [-2, 2] (default 0, off).
        frequency_penalty: f32,
        /// New tokens before the end-of-text token may end a sequence (default 0).
        min_new_tokens: usize,
        /// Keeps generating past the end-of-text token (default false).
        ignore_eos: bool,
        /// Alternatives reported with each generated token, 0 to 20 (default 0).
        top_logprobs: usize,
        /// Log-probabilities of the prompt's tokens too (default false).
        prompt_logprobs: bool,
        /// Whether each answer string starts with the prompt (default true).
        return_full_text: bool,
        /// Detailed answers instead of strings (default false).
        details: bool,
    }

    /// Adds `bias` to the logit of each token (default none), as OpenAI's `logit_bias`.
    pub fn logit_bias(mut self, biases: impl IntoIterator<Item = (u32, f32)>) -> Self {
        let object: Map<String, Value> = biases
            .into_iter()
            .map(|(token, bias)| (token.to_string(), serde_json::json!(bias)))
            .collect();
        self.fields
            .insert("logit_bias".into(), Value::Object(object));
        self
    }

    /// Gives the prompt as token ids instead of text (the builder's `input` is then ignored);
    /// at least one id, each checked against the model's vocabulary when the request runs.
    pub fn input_ids(mut self, ids: Vec<u32>) -> Self {
        self.input_ids = Some(ids);
        self
    }

    /// How tokens are chosen (default [`Mode::SampleTopP`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.fields
            .insert("mode".into(), Value::String(mode.name().into()));
        self
    }

    /// Validates against the default [`Limits`].
    pub fn build(self) -> Result<GenerationRequest, RequestError> {
        self.build_with(&Limits::default())
    }

    /// Validates against `limits`.
    pub fn build_with(self, limits: &Limits) -> Result<GenerationRequest, RequestError> {
        GenerationRequest::from_object_with_ids(&self.fields, limits, self.input_ids)
    }
}

/// The response body: one string per returned sequence, each the prompt and its continuation.
pub type GenerationResponse = Vec<String>;

#[cfg(test)]
mod tests;
