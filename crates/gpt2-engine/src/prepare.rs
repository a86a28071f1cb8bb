//! From a validated request to what the model runs: prompt ids and generation parameters, with
//! the limits that need the tokenizer and the model's shape. Needs no model, so the engine runs it
//! on the caller's side before admission: a prompt that cannot fit is refused at once, even when
//! the queue is full, and tokenizing a long one never holds up the inference thread.

use std::sync::Arc;

use gpt2_generation::{GenerationParams, Strategy};
use gpt2_model::Gpt2Config;
use gpt2_schema::{GenerationRequest, RequestError};
use gpt2_tokenizer::Gpt2Tokenizer;

use crate::events::AnswerShape;
use crate::EngineError;

/// Tokenizes the prompt and checks the limits that need it: the prompt's ids and the generation
/// parameters, or the field error.
///
/// A prompt longer than `n_positions` tokens of the longest token's length is refused before it
/// is tokenized: its length alone proves it cannot fit, and a 6 MB prompt took seconds to encode.
pub(crate) fn prepare_request(
    tokenizer: &Gpt2Tokenizer,
    config: &Gpt2Config,
    request: &GenerationRequest,
) -> Result<(Vec<u32>, GenerationParams), EngineError> {
    let input = request.input();
    let max_input_bytes = config
        .n_positions
        .saturating_mul(tokenizer.max_token_bytes());
    if input.len() > max_input_bytes {
        return Err(RequestError::InvalidField {
            field: "input",
            reason: format!(
                "is {} bytes, more than the {} tokens of this model's n_positions can hold \
                 (at most {max_input_bytes} bytes: {} per token)",
                input.len(),
                config.n_positions,
                tokenizer.max_token_bytes()
            ),
        }
        .into());
    }
    let prompt = match request.input_ids() {
        Some(ids) => ids.to_vec(),
        None => tokenizer.encode(input)?,
    };
    if prompt.is_empty() {
        return Err(RequestError::InvalidField {
            field: "input",
            reason: "encodes to no tokens".into(),
        }
        .into());
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= config.vocab_size) {
        return Err(RequestError::InvalidField {
            field: "input",
            reason: format!(
                "encodes to token {bad}, outside this model's vocabulary of {}",
                config.vocab_size
            ),
        }
        .into());
    }
    if let Some(&(bad, _)) = request
        .logit_bias()
        .iter()
        .find(|&&(id, _)| id as usize >= config.vocab_size)
    {
        return Err(RequestError::InvalidField {
            field: "logit_bias",
            reason: format!(
                "token {bad} is outside this model's vocabulary of {}",
                config.vocab_size
            ),
        }
        .into());
    }
    let mut params = request.to_params(prompt.len(), config.n_positions, config.eos_token_id)?;
    // A random seed is drawn here rather than in the generator, so that answers can report it.
    if matches!(params.strategy, Strategy::Sample(_)) && params.seed.is_none() {
        params.seed = Some(gpt2_generation::rand::random());
    }
    Ok((prompt, params))
}

/// What the answer strings of `request` are made of besides the generated text: the prompt as
/// text (decoded when it came as token ids) unless `return_full_text` is off, the stop strings,
/// and the seed.
pub(crate) fn answer_shape(
    tokenizer: &Gpt2Tokenizer,
    request: &GenerationRequest,
    params: &GenerationParams,
) -> Result<AnswerShape, EngineError> {
    let prefix = match (request.return_full_text(), request.input_ids()) {
        (false, _) => String::new(),
        (true, Some(ids)) => tokenizer.decode(ids)?,
        (true, None) => request.input().to_string(),
    };
    Ok(AnswerShape {
        prefix,
        stop: request.stop().to_vec(),
        seed: params.seed,
    })
}

/// [`prepare_request`] with its own copy of the tokenizer and config, cheap to clone and to send
/// to a blocking thread.
#[derive(Debug, Clone)]
pub(crate) struct Preparer {
    tokenizer: Arc<Gpt2Tokenizer>,
    config: Arc<Gpt2Config>,
}

impl Preparer {
    pub(crate) fn new(tokenizer: &Gpt2Tokenizer, config: &Gpt2Config) -> Self {
        Self {
            tokenizer: Arc::new(tokenizer.clone()),
            config: Arc::new(config.clone()),
        }
    }

    pub(crate) fn tokenizer(&self) -> &Gpt2Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub(crate) fn prepare(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Vec<u32>, GenerationParams), EngineError> {
        prepare_request(&self.tokenizer, &self.config, request)
    }
}
