//! The generation controls beyond the contract, end to end on the demo model: stop strings
//! (cut across token boundaries, never half-streamed), `return_full_text`, token-id prompts,
//! prompt log-probabilities, and the engine answering exactly as the pipeline does.

use gpt2_engine::{
    Engine, EngineConfig, FinishReason, GenerationEvent, GenerationRequest, Mode, Pipeline,
};

fn greedy(input: &str) -> gpt2_engine::GenerationRequestBuilder {
    GenerationRequest::builder(input)
        .mode(Mode::Greedy)
        .max_new_tokens(40)
        .num_return_sequences(1)
}

/// The streamed deltas of each sequence, and the ends.
fn stream(
    pipeline: &Pipeline,
    request: &GenerationRequest,
) -> (Vec<String>, Vec<gpt2_engine::SequenceEnd>) {
    let mut deltas = vec![String::new(); request.num_return_sequences()];
    let mut ends = Vec::new();
    for event in pipeline.stream(request).unwrap() {
        match event.unwrap() {
            GenerationEvent::Token(token) => {
                assert!(ends
                    .iter()
                    .all(|e: &gpt2_engine::SequenceEnd| e.index != token.index));
                deltas[token.index].push_str(&token.text);
            }
            GenerationEvent::End(end) => ends.push(end),
            GenerationEvent::Prompt(_) => panic!("not asked for"),
        }
    }
    ends.sort_by_key(|e| e.index);
    (deltas, ends)
}

#[test]
fn a_stop_string_spanning_tokens_cuts_the_text_and_is_never_streamed() {
    let pipeline = Pipeline::demo();
    let prompt = "The quick brown fox";
    let plain = pipeline
        .generate(&greedy(prompt).build().unwrap())
        .unwrap()
        .remove(0);
    let continuation = &plain[prompt.len()..];
    let chars: Vec<(usize, char)> = continuation.char_indices().collect();
    assert!(
        chars.len() > 20,
        "the demo model writes text: {continuation:?}"
    );
    // Six characters from the middle: they span more than one token of the demo's noise.
    let (from, to) = (chars[8].0, chars[14].0);
    let stop = continuation[from..to].to_string();
    let cut = &continuation[..continuation.find(&stop).unwrap()];

    let request = greedy(prompt).stop(vec![stop.clone()]).build().unwrap();
    let (deltas, ends) = stream(&pipeline, &request);
    assert_eq!(ends[0].finish_reason, FinishReason::Stop);
    assert_eq!(ends[0].text, format!("{prompt}{cut}"));
    assert_eq!(deltas[0], cut, "the deltas add up to the cut text");
    assert!(!deltas[0].contains(&stop));
    assert!(
        ends[0].generated_tokens < 40,
        "generation stopped early: {}",
        ends[0].generated_tokens
    );
    assert_eq!(pipeline.generate(&request).unwrap(), [ends[0].text.clone()]);
}

#[test]
fn stop_strings_end_each_sampled_sequence_on_its_own_and_beams_at_the_end() {
    let pipeline = Pipeline::demo();
    let sampled = |stop: Vec<String>| {
        GenerationRequest::builder("Once upon a time")
            .mode(Mode::Sample)
            .seed(7)
            .max_new_tokens(30)
            .num_return_sequences(4)
            .stop(stop)
            .build()
            .unwrap()
    };
    let plain = pipeline.generate(&sampled(vec![])).unwrap();
    let stop = "e".to_string();
    let (deltas, ends) = stream(&pipeline, &sampled(vec![stop.clone()]));
    assert!(ends.iter().any(|e| e.finish_reason == FinishReason::Stop));
    for (i, end) in ends.iter().enumerate() {
        let continuation = &plain[i]["Once upon a time".len()..];
        match continuation.find(&stop) {
            Some(at) => {
                assert_eq!(end.finish_reason, FinishReason::Stop);
                assert_eq!(deltas[i], &continuation[..at]);
            }
            None => assert_eq!(deltas[i], continuation),
        }
        assert_eq!(end.text, format!("Once upon a time{}", deltas[i]));
    }

    let beam = |stop: Vec<String>| {
        GenerationRequest::builder("Once upon a time")
            .mode(Mode::Beam)
            .max_new_tokens(20)
            .num_return_sequences(2)
            .stop(stop)
            .build()
            .unwrap()
    };
    let plain = pipeline.generate(&beam(vec![])).unwrap();
    let continuation = &plain[0]["Once upon a time".len()..];
    let stop: String = continuation.chars().skip(3).take(3).collect();
    let cut = pipeline.generate(&beam(vec![stop.clone()])).unwrap();
    assert_eq!(
        cut[0],
        format!(
            "Once upon a time{}",
            &continuation[..continuation.find(&stop).unwrap()]
        )
    );
}

#[test]
fn return_full_text_false_leaves_the_prompt_out() {
    let pipeline = Pipeline::demo();
    let full = pipeline
        .generate(&greedy("Hello there").build().unwrap())
        .unwrap();
    let bare = pipeline
        .generate(
            &greedy("Hello there")
                .return_full_text(false)
                .build()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(format!("Hello there{}", bare[0]), full[0]);
}

#[test]
fn a_token_id_prompt_answers_as_its_text_does() {
    let pipeline = Pipeline::demo();
    let ids = pipeline.tokenizer().encode("Hello there").unwrap();
    let by_text = pipeline
        .generate(&greedy("Hello there").build().unwrap())
        .unwrap();
    let by_ids = pipeline
        .generate(&greedy("").input_ids(ids).build().unwrap())
        .unwrap();
    assert_eq!(by_ids, by_text);
    let outside = greedy("").input_ids(vec![60_000]).build().unwrap();
    let err = pipeline.generate(&outside).unwrap_err().to_string();
    assert!(err.contains("input") && err.contains("60000"), "{err}");
}

#[test]
fn prompt_logprobs_score_every_prompt_token_after_the_first() {
    let pipeline = Pipeline::demo();
    let request = greedy("one two three four")
        .prompt_logprobs(true)
        .top_logprobs(2)
        .build()
        .unwrap();
    let output = pipeline.run(&request, || false).unwrap();
    let prompt = output.prompt.expect("asked for");
    assert_eq!(prompt.len(), output.prompt_tokens);
    assert_eq!(prompt[0].logprob, None);
    for token in &prompt[1..] {
        let logprob = token.logprob.unwrap();
        assert!(logprob <= 0.0);
        assert_eq!(token.top_logprobs.len(), 2);
        assert!(token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob);
        assert!(token.top_logprobs[0].logprob >= logprob);
    }
    // The generated tokens carry their alternatives, the chosen greedy token first.
    let tokens = &output.sequences[0].tokens;
    assert_eq!(tokens.len(), 40);
    for token in tokens {
        assert_eq!(token.top_logprobs[0].id, token.id);
        assert_eq!(token.top_logprobs[0].logprob, token.logprob);
    }
}

#[test]
fn a_logit_bias_forces_a_token_and_ignore_eos_runs_to_the_length() {
    let pipeline = Pipeline::demo();
    let request = greedy("Hi").logit_bias([(995, 100.0)]).build().unwrap();
    let output = pipeline.run(&request, || false).unwrap();
    assert!(output.sequences[0]
        .end
        .token_ids
        .iter()
        .all(|&id| id == 995));
    let eos = greedy("Hi")
        .logit_bias([(50256, 100.0)])
        .ignore_eos(true)
        .build()
        .unwrap();
    let output = pipeline.run(&eos, || false).unwrap();
    assert_eq!(output.sequences[0].end.generated_tokens, 40);
    assert_eq!(output.sequences[0].end.finish_reason, FinishReason::Length);
    let min = greedy("Hi")
        .logit_bias([(50256, 100.0)])
        .min_new_tokens(5)
        .build()
        .unwrap();
    let output = pipeline.run(&min, || false).unwrap();
    assert_eq!(output.sequences[0].end.generated_tokens, 6);
    assert_eq!(output.sequences[0].end.finish_reason, FinishReason::Eos);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_answers_controls_exactly_as_the_pipeline() {
    let (engine, _thread) = Engine::start(Pipeline::demo(), EngineConfig::default()).unwrap();
    let pipeline = Pipeline::demo();
    let requests = [
        GenerationRequest::builder("A B C")
            .mode(Mode::Sample)
            .seed(3)
            .max_new_tokens(25)
            .stop(vec!["a".into(), "o".into()])
            .repetition_penalty(1.4)
            .build()
            .unwrap(),
        greedy("x y")
            .frequency_penalty(1.0)
            .presence_penalty(0.5)
            .return_full_text(false)
            .build()
            .unwrap(),
        greedy("scored")
            .prompt_logprobs(true)
            .top_logprobs(3)
            .build()
            .unwrap(),
    ];
    for request in requests {
        let lone = pipeline.run(&request, || false).unwrap();
        let completed = engine.generate(request).await.unwrap();
        assert_eq!(completed.output, lone);
    }
}
