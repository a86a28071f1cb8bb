//! Load time, memory and prefill / decode-step times of one weight format on a checkpoint:
//!
//! ```sh
//! cargo run --release -p gpt2-model --example weight_formats -- DIR FORMAT [after]
//! ```
//!
//! `FORMAT` is f32, bf16 or q8_0; `after` loads f32 and converts afterwards (what
//! `Gpt2Model::load(..).with_weight_format(..)` does) instead of converting while loading. Prints
//! one JSON line: load seconds, resident memory after loading and its peak (`VmRSS`, `VmHWM`),
//! the median time of a 512-token prefill and of decode steps of 1 and 3 rows after a 5-token
//! prompt.

use std::time::Instant;

use gpt2_model::candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, LogitsFor, WeightFormat};

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    gpt2_model::return_freed_memory_to_os();
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: weight_formats DIR FORMAT [after]");
    let format: WeightFormat = args.get(2).map_or("f32", String::as_str).parse().unwrap();
    let after = args.get(3).is_some_and(|a| a == "after");
    let started = Instant::now();
    let model = if after {
        Gpt2Model::load(dir, &Device::Cpu)
            .unwrap()
            .with_weight_format(format)
            .unwrap()
    } else {
        Gpt2Model::load_with_weight_format(dir, &Device::Cpu, format).unwrap()
    };
    let load_s = started.elapsed().as_secs_f64();
    let (rss_mb, peak_mb) = (status_kb("VmRSS:") / 1024, status_kb("VmHWM:") / 1024);
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut prefill = Vec::new();
    for _ in 0..3 {
        let mut cache = model.new_cache_with_capacity(512);
        let t = Instant::now();
        model.forward(&input, &mut cache, LogitsFor::Last).unwrap();
        prefill.push(t.elapsed().as_secs_f64());
    }
    // Decode steps after a 5-token prompt, as `gpt2 bench`'s requests: 1 and 3 rows.
    let short = Tensor::new(&[[1212u32, 318, 281, 5128, 2420]], &Device::Cpu).unwrap();
    let mut steps = [Vec::new(), Vec::new()];
    for (times, rows) in steps.iter_mut().zip([1usize, 3]) {
        for _ in 0..2 {
            let mut cache = model.new_cache_with_capacity(100);
            model.forward(&short, &mut cache, LogitsFor::Last).unwrap();
            cache.reorder(&vec![0; rows]).unwrap();
            for step in 0..48u32 {
                let tokens: Vec<u32> = (0..rows as u32).map(|r| (step * 31 + r) % vocab).collect();
                let t = Instant::now();
                model.forward_step(&tokens, &mut [&mut cache]).unwrap();
                times.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let [one, three] = steps;
    println!(
        "{{\"format\":\"{format:?}\",\"convert\":\"{}\",\"load_s\":{load_s:.3},\"rss_mb\":{rss_mb},\"peak_rss_mb\":{peak_mb},\"prefill_512_s\":{:.3},\"step_ms_1_row\":{:.2},\"step_ms_3_rows\":{:.2},\"isa\":\"{}\"}}",
        if after { "after" } else { "while loading" },
        median(prefill),
        1e3 * median(one),
        1e3 * median(three),
        gpt2_model::Isa::active()
    );
}
