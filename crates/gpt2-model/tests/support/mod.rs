//! Helpers shared by this crate's integration tests.

use candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, KvCache, KvFormat, LogitsFor, WeightFormat};

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

/// The demo model in every weight format with every KV cache format, each with its label.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn demo_in_every_storage() -> Vec<(String, Gpt2Model)> {
    let mut models = Vec::new();
    for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Bf16] {
        for kv in [KvFormat::F32, KvFormat::F16] {
            let model = Gpt2Model::demo()
                .with_weight_format(format)
                .unwrap()
                .with_kv_format(kv);
            models.push((format!("{format:?} weights, {kv:?} cache"), model));
        }
    }
    models
}
