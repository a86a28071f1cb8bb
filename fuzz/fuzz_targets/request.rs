//! Request parsing and validation: arbitrary bytes as a request body.
//!
//! Invariants checked on every input (a failed assertion is a crash):
//! - `parse_json` and `GenerationRequest::from_json` never panic;
//! - `parse_json` agrees with serde_json's own parser: it accepts exactly the same documents, with
//!   the same value, except that it refuses a duplicate key;
//! - an accepted request rebuilt through `GenerationRequest::builder` from its own fields is the
//!   same request (the builder and the JSON path validate alike), and so is the request parsed
//!   back from its own serialization (`serde_json::to_vec`);
//! - `to_params` never panics for any prompt length, and what it accepts stays within the model's
//!   `n_positions`, leaves room after the prompt, and is accepted by `Generator::new`.

#![no_main]

use gpt2_generation::Generator;
use gpt2_schema::{parse_json, GenerationRequest, Limits, RequestError};
use libfuzzer_sys::fuzz_target;

const N_POSITIONS: usize = 1024;
const VOCAB: usize = 50257;
const EOS: u32 = 50256;

fuzz_target!(|data: &[u8]| {
    check_parser(data);

    let limits = Limits::default();
    let request = match GenerationRequest::from_json(data, &limits) {
        Ok(request) => request,
        Err(err) => {
            // Every refusal is one of the two kinds, and a validation error names a field.
            assert_eq!(err.field().is_some(), err.kind() == "validation_error");
            return;
        }
    };

    assert!(!request.input().is_empty());
    assert!(request.num_return_sequences() <= limits.max_num_return_sequences);
    assert!(request.num_beams() <= limits.max_num_beams);

    // The builder validates exactly as the JSON path does: the request's own fields rebuild it.
    let mut builder = GenerationRequest::builder(request.input())
        .mode(request.mode())
        .top_p(request.top_p())
        .top_k(request.top_k())
        .temperature(request.temperature())
        .num_beams(request.num_beams())
        .no_repeat_ngram_size(request.no_repeat_ngram_size())
        .num_return_sequences(request.num_return_sequences())
        .stream(request.stream())
        .stop(request.stop().to_vec())
        .repetition_penalty(request.repetition_penalty())
        .presence_penalty(request.presence_penalty())
        .frequency_penalty(request.frequency_penalty())
        .logit_bias(request.logit_bias().iter().copied())
        .min_new_tokens(request.min_new_tokens())
        .ignore_eos(request.ignore_eos())
        .top_logprobs(request.top_logprobs())
        .prompt_logprobs(request.prompt_logprobs())
        .return_full_text(request.return_full_text())
        .details(request.details());
    // max_length and max_new_tokens exclude each other.
    builder = match request.max_new_tokens() {
        Some(new) => builder.max_new_tokens(new),
        None => builder.max_length(request.max_length()),
    };
    if let Some(seed) = request.seed() {
        builder = builder.seed(seed);
    }
    let rebuilt = builder.build_with(&limits);
    assert_eq!(rebuilt.as_ref(), Ok(&request), "builder round trip");

    // The serialized request is itself a valid body for the same request.
    let json = serde_json::to_vec(&request).expect("a request serializes");
    let reparsed = GenerationRequest::from_json(&json, &limits);
    assert_eq!(
        reparsed.as_ref(),
        Ok(&request),
        "serialization round trip through {}",
        String::from_utf8_lossy(&json)
    );

    for prompt_len in [0, 1, 2, 7, 100, 1023, 1024, 1025, usize::MAX] {
        let Ok(params) = request.to_params(prompt_len, N_POSITIONS, Some(EOS)) else {
            continue;
        };
        assert!(params.max_length > prompt_len, "{prompt_len}: {params:?}");
        assert!(params.max_length <= N_POSITIONS, "{prompt_len}: {params:?}");
        assert_eq!(params.num_return_sequences, request.num_return_sequences());
        assert_eq!(params.seed, request.seed());
        if (1..=7).contains(&prompt_len) {
            // What the schema accepts, the generator accepts.
            let prompt = vec![EOS; prompt_len];
            if let Err(err) = Generator::new(&prompt, params.clone(), VOCAB) {
                panic!("{prompt_len}: {params:?} accepted by the schema, refused by the generator: {err}");
            }
        }
    }
});

/// `parse_json` against serde_json's parser.
fn check_parser(data: &[u8]) {
    let strict = parse_json(data);
    let plain = serde_json::from_slice::<serde_json::Value>(data);
    match (strict, plain) {
        (Ok(strict), Ok(plain)) => assert_eq!(strict, plain),
        (Ok(strict), Err(err)) => {
            panic!("parse_json accepted {strict:?}, serde_json refused: {err}")
        }
        (Err(RequestError::MalformedJson(message)), Ok(_)) => assert!(
            message.contains("duplicate key"),
            "parse_json refused a document serde_json accepts: {message}"
        ),
        (Err(RequestError::MalformedJson(_)), Err(_)) => {}
        (Err(other), _) => panic!("parse_json returned a non-JSON error: {other:?}"),
    }
}
