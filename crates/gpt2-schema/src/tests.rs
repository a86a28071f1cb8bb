use super::*;

fn parse(body: &str) -> Result<GenerationRequest, RequestError> {
    GenerationRequest::from_json(body.as_bytes(), &Limits::default())
}

fn field_of(body: &str) -> &'static str {
    parse(body).unwrap_err().field().unwrap_or("<none>")
}

#[test]
fn defaults_are_the_contracts() {
    let request = parse(r#"{"input": "This is an input text"}"#).unwrap();
    assert_eq!(
        request,
        GenerationRequest {
            input: "This is an input text".into(),
            ..GenerationRequest::defaults()
        }
    );
    assert_eq!(request.max_length, 100);
    assert_eq!(request.mode, Mode::SampleTopP);
    assert_eq!(
        (request.top_p, request.top_k, request.temperature),
        (0.92, 50, 0.7)
    );
    assert_eq!(
        (
            request.num_beams,
            request.no_repeat_ngram_size,
            request.num_return_sequences
        ),
        (5, 2, 3)
    );
    assert_eq!(request.seed, None);
}

#[test]
fn every_field_is_read_and_unknown_fields_are_ignored() {
    let request = parse(
        r#"{"input":"x","max_new_tokens":7,"mode":"beam","top_p":0.5,"top_k":0,
            "temperature":1.5,"num_beams":4,"no_repeat_ngram_size":3,"num_return_sequences":2,
            "seed":123,"extra":{"anything":[1,2]}}"#,
    )
    .unwrap();
    assert_eq!(request.max_new_tokens, Some(7));
    assert_eq!(request.mode, Mode::Beam);
    assert_eq!(
        (request.top_p, request.top_k, request.temperature),
        (0.5, 0, 1.5)
    );
    assert_eq!(
        (
            request.num_beams,
            request.no_repeat_ngram_size,
            request.num_return_sequences
        ),
        (4, 3, 2)
    );
    assert_eq!(request.seed, Some(123));
}

#[test]
fn seed_null_and_minus_one_mean_random() {
    assert_eq!(parse(r#"{"input":"x","seed":null}"#).unwrap().seed, None);
    assert_eq!(parse(r#"{"input":"x","seed":-1}"#).unwrap().seed, None);
    assert_eq!(parse(r#"{"input":"x","seed":0}"#).unwrap().seed, Some(0));
    assert_eq!(
        parse(r#"{"input":"x","seed":18446744073709551615}"#)
            .unwrap()
            .seed,
        Some(u64::MAX)
    );
    assert_eq!(field_of(r#"{"input":"x","seed":-2}"#), "seed");
    assert_eq!(field_of(r#"{"input":"x","seed":"7"}"#), "seed");
}

#[test]
fn integral_floats_are_integers_and_fractions_are_not() {
    assert_eq!(
        parse(r#"{"input":"x","max_length":50.0}"#)
            .unwrap()
            .max_length,
        50
    );
    assert_eq!(field_of(r#"{"input":"x","max_length":50.5}"#), "max_length");
    assert_eq!(field_of(r#"{"input":"x","top_k":"50"}"#), "top_k");
}

#[test]
fn bad_inputs_name_their_field() {
    for (body, field) in [
        (r#"{}"#, "input"),
        (r#"{"input": null}"#, "input"),
        (r#"{"input": 5}"#, "input"),
        (r#"{"input": ["a"]}"#, "input"),
        (r#"{"input": ""}"#, "input"),
        (r#"{"input":"x","mode":"nucleus"}"#, "mode"),
        (r#"{"input":"x","mode":3}"#, "mode"),
        (r#"{"input":"x","top_p":0}"#, "top_p"),
        (r#"{"input":"x","top_p":1.01}"#, "top_p"),
        (r#"{"input":"x","top_p":"high"}"#, "top_p"),
        (r#"{"input":"x","top_k":-1}"#, "top_k"),
        (r#"{"input":"x","temperature":0}"#, "temperature"),
        (r#"{"input":"x","temperature":-0.5}"#, "temperature"),
        (r#"{"input":"x","num_beams":0}"#, "num_beams"),
        (r#"{"input":"x","num_beams":17}"#, "num_beams"),
        (
            r#"{"input":"x","num_return_sequences":0}"#,
            "num_return_sequences",
        ),
        (
            r#"{"input":"x","num_return_sequences":17}"#,
            "num_return_sequences",
        ),
        (
            r#"{"input":"x","mode":"beam","num_beams":2,"num_return_sequences":3}"#,
            "num_return_sequences",
        ),
        (
            r#"{"input":"x","no_repeat_ngram_size":-1}"#,
            "no_repeat_ngram_size",
        ),
        (r#"{"input":"x","max_length":0}"#, "max_length"),
        (r#"{"input":"x","max_length":true}"#, "max_length"),
        (r#"{"input":"x","max_new_tokens":0}"#, "max_new_tokens"),
    ] {
        let err = parse(body).unwrap_err();
        assert_eq!(err.field(), Some(field), "{body}: {err}");
        assert_eq!(err.kind(), "validation_error");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn unknown_mode_lists_the_valid_ones() {
    let err = parse(r#"{"input":"x","mode":"nucleus"}"#)
        .unwrap_err()
        .to_string();
    for (name, _) in Mode::ALL {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn malformed_bodies_are_json_errors() {
    for body in ["", "{", "[1,2]", "\"text\"", "{\"input\": \"x\",}"] {
        let err = parse(body).unwrap_err();
        assert_eq!(err.kind(), "malformed_json", "{body}");
        assert_eq!(err.field(), None);
    }
}

#[test]
fn limits_are_configurable() {
    let limits = Limits {
        max_num_return_sequences: 2,
        max_num_beams: 3,
    };
    let ok = GenerationRequest::from_json(
        br#"{"input":"x","num_return_sequences":2,"num_beams":3}"#,
        &limits,
    );
    assert!(ok.is_ok());
    let err = GenerationRequest::from_json(br#"{"input":"x","num_return_sequences":3}"#, &limits)
        .unwrap_err();
    assert!(err.to_string().contains("at most 2"), "{err}");
}

#[test]
fn length_limits_need_the_prompt_and_the_model() {
    let request = parse(r#"{"input":"x","max_length":10}"#).unwrap();
    assert_eq!(request.to_params(9, 1024, None).unwrap().max_length, 10);
    assert_eq!(
        request.to_params(10, 1024, None).unwrap_err().field(),
        Some("max_length")
    );
    assert_eq!(
        request.to_params(3, 8, None).unwrap_err().field(),
        Some("max_length")
    );

    let request = parse(r#"{"input":"x","max_new_tokens":20}"#).unwrap();
    assert_eq!(request.to_params(10, 1024, None).unwrap().max_length, 30);
    assert_eq!(
        request.to_params(10, 25, None).unwrap_err().field(),
        Some("max_new_tokens")
    );
}

#[test]
fn modes_map_to_their_parameters() {
    let strategy = |mode: &str| {
        parse(&format!(
            r#"{{"input":"x","mode":"{mode}","top_p":0.5,"top_k":7,"temperature":0.3}}"#
        ))
        .unwrap()
        .to_params(1, 1024, Some(50256))
        .unwrap()
        .strategy
    };
    assert_eq!(strategy("greedy"), Strategy::Greedy);
    assert_eq!(
        strategy("sample-top-p"),
        Strategy::Sample(SamplingParams {
            temperature: 1.0,
            top_k: 7,
            top_p: 0.5
        })
    );
    assert_eq!(
        strategy("sample-top-k"),
        Strategy::Sample(SamplingParams {
            temperature: 1.0,
            top_k: 7,
            top_p: 1.0
        })
    );
    assert_eq!(
        strategy("sample"),
        Strategy::Sample(SamplingParams {
            temperature: 0.3,
            top_k: 7,
            top_p: 0.5
        })
    );
    assert_eq!(
        strategy("beam"),
        Strategy::Beam(BeamParams {
            num_beams: 5,
            no_repeat_ngram_size: 2
        })
    );
}

#[test]
fn the_builder_validates_like_the_json_path() {
    let built = GenerationRequest::builder("Hello")
        .mode(Mode::Beam)
        .num_beams(4)
        .num_return_sequences(2)
        .max_new_tokens(7)
        .seed(9)
        .top_p(0.5)
        .top_k(3)
        .temperature(1.5)
        .no_repeat_ngram_size(3)
        .build()
        .unwrap();
    let parsed = parse(
        r#"{"input": "Hello", "mode": "beam", "num_beams": 4, "num_return_sequences": 2,
            "max_new_tokens": 7, "seed": 9, "top_p": 0.5, "top_k": 3, "temperature": 1.5,
            "no_repeat_ngram_size": 3}"#,
    )
    .unwrap();
    assert_eq!(built, parsed);
    assert_eq!(built.input(), "Hello");
    assert_eq!(built.mode(), Mode::Beam);
    assert_eq!(built.max_new_tokens(), Some(7));
    assert_eq!(built.seed(), Some(9));
    assert!(!built.stream());
    for (builder, field) in [
        (GenerationRequest::builder(""), "input"),
        (
            GenerationRequest::builder("x").temperature(0.0),
            "temperature",
        ),
        (GenerationRequest::builder("x").top_p(0.0), "top_p"),
        (GenerationRequest::builder("x").max_length(0), "max_length"),
        (
            GenerationRequest::builder("x")
                .mode(Mode::Beam)
                .num_beams(2)
                .num_return_sequences(3),
            "num_return_sequences",
        ),
        (GenerationRequest::builder("x").num_beams(17), "num_beams"),
    ] {
        assert_eq!(builder.build().unwrap_err().field(), Some(field));
    }
    let tight = Limits {
        max_num_return_sequences: 2,
        max_num_beams: 2,
    };
    let err = GenerationRequest::builder("x")
        .num_return_sequences(3)
        .build_with(&tight);
    assert_eq!(err.unwrap_err().field(), Some("num_return_sequences"));
}

#[test]
fn stream_is_a_boolean() {
    assert!(parse(r#"{"input": "x", "stream": true}"#).unwrap().stream());
    assert!(!parse(r#"{"input": "x", "stream": null}"#).unwrap().stream());
    assert_eq!(field_of(r#"{"input": "x", "stream": "yes"}"#), "stream");
}

#[test]
fn duplicate_keys_are_refused_at_any_depth() {
    for body in [
        r#"{"input": "x", "num_return_sequences": 1000000, "num_return_sequences": 1}"#,
        r#"{"input": "x", "input": "y"}"#,
        r#"{"input": "x", "extra": {"a": 1, "a": 2}}"#,
        r#"{"input": "x", "extra": [{"b": 1, "b": 1}]}"#,
    ] {
        let err = parse(body).unwrap_err();
        assert_eq!(err.kind(), "malformed_json", "{body}");
        assert!(err.to_string().contains("duplicate key"), "{err}");
    }
    // The same key in different objects is fine, and trailing garbage is still refused.
    assert!(parse(r#"{"input": "x", "a": {"k": 1}, "b": {"k": 1}}"#).is_ok());
    assert_eq!(
        parse(r#"{"input": "x"} {}"#).unwrap_err().kind(),
        "malformed_json"
    );
}

#[test]
fn integers_beyond_64_bits_are_out_of_range_not_fractional() {
    let err = parse(r#"{"input": "x", "max_length": 18446744073709551616}"#).unwrap_err();
    assert_eq!(err.field(), Some("max_length"));
    assert!(err.to_string().contains("must be at most"), "{err}");
    let err = parse(r#"{"input": "x", "seed": 1e300}"#).unwrap_err();
    assert!(err.to_string().contains("64 bits"), "{err}");
    let err = parse(r#"{"input": "x", "top_k": 2.5}"#).unwrap_err();
    assert!(err.to_string().contains("must be an integer"), "{err}");
}

#[test]
fn a_top_p_below_the_smallest_float32_is_refused_and_tiny_ones_are_served() {
    let err = parse(r#"{"input": "x", "top_p": 1e-46}"#).unwrap_err();
    assert_eq!(err.field(), Some("top_p"));
    let tiny = parse(r#"{"input": "x", "top_p": 1e-40}"#).unwrap();
    assert!(tiny.top_p() > 0.0);
}

#[test]
fn max_length_and_max_new_tokens_together_are_refused() {
    assert_eq!(
        field_of(r#"{"input":"x","max_length":20,"max_new_tokens":7}"#),
        "max_new_tokens"
    );
    // null means absent, as for every field.
    assert!(parse(r#"{"input":"x","max_length":null,"max_new_tokens":7}"#).is_ok());
}

#[test]
fn controls_are_off_by_default_and_leave_the_parameters_as_before() {
    let request = parse(r#"{"input": "x", "mode": "greedy"}"#).unwrap();
    assert!(request.stop().is_empty());
    assert!(request.return_full_text() && !request.details() && !request.ignore_eos());
    let params = request.to_params(1, 1024, Some(50256)).unwrap();
    assert!(params.processing.is_off());
    assert_eq!((params.top_logprobs, params.eos_token_id), (0, Some(50256)));
}

#[test]
fn controls_are_read_and_reach_the_parameters() {
    let request = parse(
        r#"{"input": "x", "stop": ["\n\n", "END"], "repetition_penalty": 1.3,
            "presence_penalty": -0.5, "frequency_penalty": 2, "logit_bias": {"50256": -100, "7": 2.5},
            "min_new_tokens": 3, "ignore_eos": true, "top_logprobs": 5, "prompt_logprobs": true,
            "return_full_text": false, "details": true}"#,
    )
    .unwrap();
    assert_eq!(request.stop(), ["\n\n", "END"]);
    assert!(request.prompt_logprobs() && !request.return_full_text() && request.details());
    let params = request.to_params(1, 1024, Some(50256)).unwrap();
    let mut bias = params.processing.logit_bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, [(7, 2.5), (50256, -100.0)]);
    assert_eq!(params.processing.repetition_penalty, 1.3);
    assert_eq!(
        (
            params.processing.presence_penalty,
            params.processing.frequency_penalty
        ),
        (-0.5, 2.0)
    );
    assert_eq!(params.processing.min_new_tokens, 3);
    assert_eq!(params.top_logprobs, 5);
    assert_eq!(params.eos_token_id, None, "ignore_eos drops the stop token");
    assert_eq!(
        parse(r#"{"input": "x", "stop": "END"}"#).unwrap().stop(),
        ["END"]
    );
}

#[test]
fn bad_controls_name_their_field() {
    for (body, field) in [
        (r#"{"input":"x","stop":7}"#, "stop"),
        (r#"{"input":"x","stop":[""]}"#, "stop"),
        (r#"{"input":"x","stop":["a",1]}"#, "stop"),
        (
            r#"{"input":"x","repetition_penalty":0}"#,
            "repetition_penalty",
        ),
        (
            r#"{"input":"x","repetition_penalty":1e300}"#,
            "repetition_penalty",
        ),
        (
            r#"{"input":"x","presence_penalty":2.5}"#,
            "presence_penalty",
        ),
        (
            r#"{"input":"x","frequency_penalty":"1"}"#,
            "frequency_penalty",
        ),
        (r#"{"input":"x","logit_bias":[1]}"#, "logit_bias"),
        (r#"{"input":"x","logit_bias":{"a":1}}"#, "logit_bias"),
        (r#"{"input":"x","logit_bias":{"07":1}}"#, "logit_bias"),
        (r#"{"input":"x","logit_bias":{"+7":1}}"#, "logit_bias"),
        (r#"{"input":"x","logit_bias":{"1":101}}"#, "logit_bias"),
        (r#"{"input":"x","min_new_tokens":-1}"#, "min_new_tokens"),
        (r#"{"input":"x","ignore_eos":1}"#, "ignore_eos"),
        (r#"{"input":"x","top_logprobs":21}"#, "top_logprobs"),
        (
            r#"{"input":"x","return_full_text":"no"}"#,
            "return_full_text",
        ),
        (
            r#"{"input":"x","details":null,"prompt_logprobs":0}"#,
            "prompt_logprobs",
        ),
    ] {
        assert_eq!(field_of(body), field, "{body}");
    }
    let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| format!("s{i}")).collect();
    let body = serde_json::json!({"input": "x", "stop": many}).to_string();
    assert_eq!(field_of(&body), "stop");
}

#[test]
fn the_builder_takes_token_ids_and_every_control() {
    let request = GenerationRequest::builder("")
        .input_ids(vec![15496, 11])
        .stop(vec!["\n".into()])
        .logit_bias([(3, -1.0)])
        .details(true)
        .build()
        .unwrap();
    assert_eq!(request.input_ids(), Some(&[15496, 11][..]));
    assert_eq!(request.input(), "");
    assert_eq!(request.logit_bias(), [(3, -1.0)]);
    let err = GenerationRequest::builder("x")
        .input_ids(vec![])
        .build()
        .unwrap_err();
    assert_eq!(err.field(), Some("input"));
}
