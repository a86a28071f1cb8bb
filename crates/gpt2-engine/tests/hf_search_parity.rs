//! Greedy and beam search produce exactly HF `generate()`'s tokens on the golden set
//! (`fixtures/generation/search_goldens.json`, written by `tools/generation_goldens.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use gpt2_engine::{generate_ids, GenerationParams, Strategy};
use gpt2_generation::BeamParams;
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

#[test]
fn greedy_and_beam_equal_hf_generate() {
    let text = std::fs::read_to_string(fixtures().join("generation/search_goldens.json")).unwrap();
    let goldens: Value = serde_json::from_str(&text).unwrap();
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
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
        };
        let eos = params.eos_token_id.unwrap();
        let outputs = generate_ids(model, &prompt, params, || false).unwrap();
        let expected = case["outputs"].as_array().unwrap();
        assert_eq!(
            outputs.len(),
            expected.len(),
            "case {index}: number of sequences"
        );
        for (rank, (ours, theirs)) in outputs.iter().zip(expected).enumerate() {
            let ended_by_eos = ours.contains(&eos);
            let ours_text: Vec<u32> = ours.iter().copied().take_while(|&t| t != eos).collect();
            assert_eq!(
                ours_text,
                ids(&theirs["generated"]),
                "case {index} ({case}) sequence {rank}"
            );
            assert_eq!(
                ended_by_eos,
                theirs["ended_by_eos"].as_bool().unwrap(),
                "case {index} rank {rank}"
            );
            eos_endings += usize::from(ended_by_eos);
        }
    }
    assert!(checkpoints.len() >= 2);
    assert!(eos_endings >= 5, "the golden set exercises early EOS");
    println!(
        "{} cases over {} checkpoints identical to HF ({eos_endings} sequences ended by EOS)",
        cases.len(),
        checkpoints.len()
    );
}
