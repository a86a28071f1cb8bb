//! Greedy and beam search produce exactly HF `generate()`'s tokens on the golden sets
//! (`fixtures/generation/search_goldens.json` and, with `repetition_penalty`,
//! `fixtures/generation/repetition_goldens.json`; both written by `tools/generation_goldens.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use gpt2_engine::{generate_ids, GenerationParams, Strategy};
use gpt2_generation::{BeamParams, LogitsProcessing};
use gpt2_model::Gpt2Model;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Runs the cases of a golden file that `select` keeps through [`generate_ids`], with the logits
/// processing `processing` picks for each, and asserts HF's token ids. Returns (the cases run,
/// checkpoints, sequences ended by EOS).
fn check_goldens(
    file: &str,
    select: impl Fn(&Value) -> bool,
    processing: impl Fn(&Value) -> LogitsProcessing,
) -> (Vec<Value>, usize, usize) {
    let text = std::fs::read_to_string(fixtures().join("generation").join(file)).unwrap();
    let goldens: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Value> = goldens["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|case| select(case))
        .cloned()
        .collect();
    let mut models: HashMap<String, Gpt2Model> = HashMap::new();
    let (mut eos_endings, mut checkpoints) = (0, std::collections::BTreeSet::new());
    for (index, case) in cases.iter().enumerate() {
        let checkpoint = case["checkpoint"].as_str().unwrap().to_string();
        checkpoints.insert(checkpoint.clone());
        let model = models.entry(checkpoint.clone()).or_insert_with(|| {
            Gpt2Model::load(fixtures().join("models").join(&checkpoint), &Device::Cpu).unwrap()
        });
        let prompt = ids(&case["prompt"]);
        let num_beams = case["num_beams"].as_u64().unwrap() as usize;
        let strategy = match case["mode"].as_str().unwrap() {
            "greedy" => Strategy::Greedy,
            "beam" => Strategy::Beam(BeamParams {
                num_beams,
                no_repeat_ngram_size: case["no_repeat_ngram_size"].as_u64().unwrap() as usize,
            }),
            other => panic!("unknown mode {other}"),
        };
        let params = GenerationParams {
            strategy,
            max_length: case["max_length"].as_u64().unwrap() as usize,
            num_return_sequences: case["num_return_sequences"].as_u64().unwrap() as usize,
            eos_token_id: model.config().eos_token_id,
            seed: None,
            processing: processing(case),
            top_logprobs: 0,
        };
        let eos = params.eos_token_id.unwrap();
        let outputs = generate_ids(model, &prompt, params, || false).unwrap();
        let expected = case["outputs"].as_array().unwrap();
        assert_eq!(
            outputs.len(),
            expected.len(),
            "{file} case {index}: number of sequences"
        );
        for (rank, (ours, theirs)) in outputs.iter().zip(expected).enumerate() {
            let ended_by_eos = ours.contains(&eos);
            let ours_text: Vec<u32> = ours.iter().copied().take_while(|&t| t != eos).collect();
            assert_eq!(
                ours_text,
                ids(&theirs["generated"]),
                "{file} case {index} ({case}) sequence {rank}"
            );
            assert_eq!(
                ended_by_eos,
                theirs["ended_by_eos"].as_bool().unwrap(),
                "{file} case {index} rank {rank}"
            );
            eos_endings += usize::from(ended_by_eos);
        }
    }
    (cases, checkpoints.len(), eos_endings)
}

#[test]
fn greedy_and_beam_equal_hf_generate() {
    let (cases, checkpoints, eos_endings) = check_goldens(
        "search_goldens.json",
        |_| true,
        |_| LogitsProcessing::default(),
    );
    assert!(cases.len() >= 40, "{} cases", cases.len());
    assert!(checkpoints >= 2);
    assert!(eos_endings >= 5, "the golden set exercises early EOS");
    println!(
        "{} cases over {checkpoints} checkpoints identical to HF ({eos_endings} sequences ended by EOS)",
        cases.len(),
    );
}

/// The logits processing of a repetition golden case.
fn repetition_processing(case: &Value) -> LogitsProcessing {
    LogitsProcessing {
        repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
        min_new_tokens: case["min_new_tokens"].as_u64().unwrap() as usize,
        ..LogitsProcessing::default()
    }
}

/// `repetition_penalty` (HF's `RepetitionPenaltyLogitsProcessor`, over prompt + generated tokens,
/// on the raw logits in greedy and on the log-softmax in beam search, except with one beam, which HF
/// runs as greedy search), alone and combined with
/// no_repeat_ngram_size and min_new_tokens, gives exactly HF `generate()`'s tokens
/// (`fixtures/generation/repetition_goldens.json`).
#[test]
fn repetition_penalty_equals_hf_generate() {
    let (cases, checkpoints, eos_endings) =
        check_goldens("repetition_goldens.json", |_| true, repetition_processing);
    assert!(cases.len() >= 60, "{} cases", cases.len());
    assert!(checkpoints >= 2);
    let count = |pred: &dyn Fn(&Value) -> bool| cases.iter().filter(|c| pred(c)).count();
    let changed = count(&|c| c["changed_by_penalty"].as_bool().unwrap());
    // The penalty must matter: most cases differ from the same request without it, in both
    // modes, on both sides of 1.
    assert!(changed * 2 > cases.len(), "{changed} cases changed");
    for mode in ["greedy", "beam"] {
        for below_one in [false, true] {
            let n = count(&|c| {
                c["changed_by_penalty"].as_bool().unwrap()
                    && c["mode"] == mode
                    && (c["repetition_penalty"].as_f64().unwrap() < 1.0) == below_one
            });
            assert!(
                n >= 1,
                "no {mode} case with penalty below 1 = {below_one} changed"
            );
        }
    }
    assert!(count(&|c| c["no_repeat_ngram_size"].as_u64().unwrap() > 0) >= 5);
    assert!(count(&|c| c["min_new_tokens"].as_u64().unwrap() > 0) >= 5);
    assert!(eos_endings >= 5, "the golden set exercises early EOS");
    println!(
        "{} repetition-penalty cases over {checkpoints} checkpoints identical to HF \
         ({changed} changed by the penalty, {eos_endings} sequences ended by EOS)",
        cases.len(),
    );
}
