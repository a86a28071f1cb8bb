use candle_core::Tensor;
use gpt2_generation::{GenerationParams, Generator};
use gpt2_model::{Gpt2Model, LogitsFor, ModelError};

use crate::EngineError;

fn last_logits(logits: &Tensor) -> Result<Vec<f32>, EngineError> {
    logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| EngineError::Model(ModelError::Candle(e.to_string())))
}

fn to_tensor(tokens: &[u32], rows: usize, model: &Gpt2Model) -> Result<Tensor, EngineError> {
    Tensor::from_slice(tokens, (rows, tokens.len() / rows), model.device())
        .map_err(|e| EngineError::Model(ModelError::Candle(e.to_string())))
}

/// Generates from `prompt` token ids: prefills the prompt once, forks its KV cache into the
/// request's sequences or beams, and runs one decode step at a time until `params` says stop.
/// Returns the generated ids of each returned sequence (prompt excluded, a final EOS included).
///
/// `should_stop` is polled between steps; when it answers true, generation ends with
/// [`EngineError::Cancelled`].
pub fn generate_ids(
    model: &Gpt2Model,
    prompt: &[u32],
    params: GenerationParams,
    mut should_stop: impl FnMut() -> bool,
) -> Result<Vec<Vec<u32>>, EngineError> {
    let max_length = params.max_length;
    let mut generator = Generator::new(prompt, params, model.config().vocab_size)?;
    let mut cache = model.new_cache_with_capacity(max_length);
    let prompt_tensor = to_tensor(prompt, 1, model)?;
    let mut logits = last_logits(&model.forward(&prompt_tensor, &mut cache, LogitsFor::Last)?)?;
    while let Some(step) = generator.advance(&logits)? {
        if should_stop() {
            return Err(EngineError::Cancelled);
        }
        let unchanged = cache.batch_size() == Some(step.parent_rows.len())
            && step
                .parent_rows
                .iter()
                .enumerate()
                .all(|(i, &p)| p as usize == i);
        if !unchanged {
            cache = cache.select(&step.parent_rows)?;
        }
        let tokens = to_tensor(&step.tokens, step.tokens.len(), model)?;
        logits = last_logits(&model.forward(&tokens, &mut cache, LogitsFor::Last)?)?;
    }
    Ok(generator.into_outputs())
}
