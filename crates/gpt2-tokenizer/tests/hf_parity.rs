//! Token ids and decoded text equal HF's on the committed corpus of hard strings
//! (`fixtures/tokenizer/goldens.json`, written by `tools/tokenizer_goldens.py`).

use std::path::Path;

use gpt2_tokenizer::Gpt2Tokenizer;
use serde_json::Value;

fn goldens() -> Vec<(String, Vec<u32>, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer/goldens.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let ids = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect();
            (
                case["text"].as_str().unwrap().to_string(),
                ids,
                case["decoded_skip_special"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check(tokenizer: &Gpt2Tokenizer) -> usize {
    let cases = goldens();
    assert!(cases.len() >= 200, "the corpus has {} strings", cases.len());
    for (text, ids, decoded) in &cases {
        assert_eq!(&tokenizer.encode(text).unwrap(), ids, "encoding {text:?}");
        assert_eq!(
            &tokenizer.decode(ids).unwrap(),
            decoded,
            "decoding {text:?}"
        );
        let mut incremental = tokenizer.incremental_decoder();
        let mut streamed = String::new();
        for &id in ids {
            if let Some(piece) = incremental.push(id).unwrap() {
                streamed.push_str(&piece);
            }
        }
        streamed.push_str(&incremental.finish().unwrap());
        assert_eq!(&streamed, decoded, "streaming {text:?}");
    }
    cases.len()
}

#[test]
fn embedded_tokenizer_matches_hf_on_the_corpus() {
    let n = check(&Gpt2Tokenizer::embedded().unwrap());
    println!("embedded tokenizer: {n} strings equal to HF");
}

#[test]
fn vocab_and_merges_tokenizer_matches_hf_on_the_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gpt2-tokenizer");
    let tokenizer =
        Gpt2Tokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))
            .unwrap();
    check(&tokenizer);
}
