//! Helpers shared by this crate's integration tests.

use candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, KvCache, LogitsFor};

/// A cache holding `prompt` for `rows` sequences (the prompt repeated), ready to decode.
pub fn prefilled(model: &Gpt2Model, prompt: &[u32], rows: usize) -> KvCache {
    let mut cache = model.new_cache_with_capacity(64);
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((rows, 1))
        .unwrap();
    model.forward(&input, &mut cache, LogitsFor::Last).unwrap();
    cache
}
