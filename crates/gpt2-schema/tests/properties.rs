//! Properties of request validation, over JSON objects built from arbitrary values for the
//! contract's fields (valid ones, values at and beyond the limits, wrong types, nulls, absent
//! fields, unknown fields):
//! - a body either validates or is refused with an error naming the field at fault, and never
//!   panics;
//! - a valid request round-trips: its own serialization (`serde_json::to_vec`) parses back to the
//!   same request, and so does the builder fed its fields;
//! - what validation accepts, `to_params` and `Generator::new` accept;
//! - a duplicated key is always refused, whatever the key.

use gpt2_generation::Generator;
use gpt2_schema::{GenerationRequest, Limits, Mode, RequestError};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const FIELDS: [&str; 12] = [
    "input",
    "mode",
    "max_length",
    "max_new_tokens",
    "top_p",
    "top_k",
    "temperature",
    "num_beams",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "seed",
    "stream",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES=<n> runs more (or fewer) cases.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1024),
        // Failures print their minimal case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Integers around the interesting bounds of the integer fields.
fn integer() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-2i64..20).prop_map(Value::from),
        1 => prop_oneof![
            Just(json!(u32::MAX)),
            Just(json!(u64::from(u32::MAX) + 1)),
            Just(json!(u64::MAX)),
            Just(json!(i64::MIN)),
            Just(json!(-1)),
            Just(json!(1e300)),
            Just(json!(-1e300)),
            Just(json!(18_446_744_073_709_551_616.0)),
        ],
        1 => (-2i64..20).prop_map(|n| json!(n as f64)),
        1 => (-20.0f64..20.0).prop_map(Value::from),
    ]
}

/// Numbers for the float fields: in and around (0, 1], tiny, huge, negative, integers.
fn float() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0.0f64..=1.2).prop_map(Value::from),
        2 => (0.0f64..50.0).prop_map(Value::from),
        1 => any::<f32>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => prop_oneof![
            Just(json!(0)),
            Just(json!(1)),
            Just(json!(1e-45)),
            Just(json!(7e-46)),
            Just(json!(f64::MIN_POSITIVE)),
            Just(json!(3.4028235e38)),
            Just(json!(3.5e38)),
            Just(json!(-0.5)),
        ],
    ]
}

fn mode() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(Mode::ALL.map(|(name, _)| name).to_vec()).prop_map(Value::from),
        1 => prop_oneof![Just(json!("Greedy")), Just(json!("")), Just(json!("beam "))],
    ]
}

fn input() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => "\\PC{1,12}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => Just(json!("a<|endoftext|>b")),
    ]
}

/// A value for `field`: mostly plausible, sometimes null or of any type at all.
fn value_for(field: &'static str) -> BoxedStrategy<Value> {
    let plausible = match field {
        "input" => input().boxed(),
        "mode" => mode().boxed(),
        "top_p" | "temperature" => float().boxed(),
        "stream" => any::<bool>().prop_map(Value::from).boxed(),
        _ => integer().boxed(),
    };
    prop_oneof![8 => plausible, 1 => Just(Value::Null), 1 => any_json()].boxed()
}

/// A JSON object: each field of the contract absent or set, plus unknown fields.
fn body() -> impl Strategy<Value = Map<String, Value>> {
    let fields: Vec<BoxedStrategy<Option<Value>>> = FIELDS
        .iter()
        .map(|&field| {
            let absent_weight = if field == "input" { 1 } else { 4 };
            prop_oneof![absent_weight => Just(None), 3 => value_for(field).prop_map(Some)].boxed()
        })
        .collect();
    (
        fields,
        prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..2),
    )
        .prop_map(|(values, unknown)| {
            let mut object: Map<String, Value> = unknown
                .into_iter()
                .filter(|(k, _)| !FIELDS.contains(&k.as_str()))
                .collect();
            for (field, value) in FIELDS.iter().zip(values) {
                if let Some(value) = value {
                    object.insert((*field).to_string(), value);
                }
            }
            object
        })
}

fn rebuild(
    request: &GenerationRequest,
    limits: &Limits,
) -> Result<GenerationRequest, RequestError> {
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
    builder = match request.max_new_tokens() {
        Some(new) => builder.max_new_tokens(new),
        None => builder.max_length(request.max_length()),
    };
    if let Some(seed) = request.seed() {
        builder = builder.seed(seed);
    }
    builder.build_with(limits)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_body_validates_or_names_the_field_at_fault(object in body()) {
        let limits = Limits::default();
        let bytes = serde_json::to_vec(&object).unwrap();
        let result = GenerationRequest::from_json(&bytes, &limits);
        // The object itself validates alike (the same request, or an error naming the same field:
        // the reasons may quote a number one f64 ulp apart, as serde_json's default float parsing
        // is not correctly rounded).
        let direct = GenerationRequest::from_object(&object, &limits);
        prop_assert_eq!(
            result.as_ref().map_err(RequestError::field),
            direct.as_ref().map_err(RequestError::field)
        );
        let Err(err) = result else { return Ok(()) };
        let field = err.field();
        prop_assert!(field.is_some(), "an object is well-formed JSON: {:?}", err);
        let field = field.unwrap();
        prop_assert!(FIELDS.contains(&field), "{}", field);
        prop_assert_eq!(err.kind(), "validation_error");
        // The field at fault is one the body set, except the required input and the one
        // cross-field rule (num_return_sequences, 3 by default, must not exceed num_beams).
        let set = object.get(field).is_some_and(|v| !v.is_null());
        let beam_rule = field == "num_return_sequences"
            && object.get("mode") == Some(&json!("beam"));
        prop_assert!(set || field == "input" || beam_rule, "{} in {:?}", err, object);
        prop_assert!(err.to_string().contains(field), "{}", err);
    }

    #[test]
    fn a_valid_request_round_trips_through_its_serialization(object in body()) {
        let limits = Limits::default();
        let Ok(request) = GenerationRequest::from_object(&object, &limits) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&request).unwrap();
        let reparsed = GenerationRequest::from_json(&bytes, &limits);
        prop_assert_eq!(
            reparsed.as_ref(), Ok(&request), "through {}", String::from_utf8_lossy(&bytes)
        );
        prop_assert_eq!(rebuild(&request, &limits), Ok(request));
    }

    #[test]
    fn what_validation_accepts_the_generator_accepts(
        object in body(),
        prompt_len in 1usize..8,
    ) {
        let Ok(request) = GenerationRequest::from_object(&object, &Limits::default()) else {
            return Ok(());
        };
        match request.to_params(prompt_len, 1024, Some(50256)) {
            Ok(params) => {
                prop_assert!(params.max_length > prompt_len && params.max_length <= 1024);
                let prompt = vec![0u32; prompt_len];
                let generator = Generator::new(&prompt, params.clone(), 50257);
                prop_assert!(generator.is_ok(), "{:?}: {:?}", params, generator.err());
            }
            Err(err) => {
                let field = err.field();
                prop_assert!(
                    field == Some("max_length") || field == Some("max_new_tokens"),
                    "{:?}", err
                );
            }
        }
    }

    #[test]
    fn a_duplicated_key_is_always_refused(
        object in body(),
        which in any::<prop::sample::Index>(),
        again in any_json(),
    ) {
        prop_assume!(!object.is_empty());
        let key = object.keys().nth(which.index(object.len())).unwrap().clone();
        let mut text = serde_json::to_string(&object).unwrap();
        text.pop(); // the closing brace
        text.push_str(&format!(",{}:{}}}", Value::from(key.as_str()), again));
        let result = GenerationRequest::from_json(text.as_bytes(), &Limits::default());
        prop_assert!(
            matches!(&result, Err(RequestError::MalformedJson(m)) if m.contains("duplicate key")),
            "{} gave {:?}", text, result
        );
    }
}
