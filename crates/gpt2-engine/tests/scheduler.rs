//! The worker's budgets, through the public engine: long prompts prefilled in chunks between
//! decode steps (without changing any answer), a burst of prompts started together beside a
//! step, and the row budget of a decode step.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use futures_core::Stream;
use gpt2_engine::{
    Engine, EngineConfig, EngineStream, GenerationEvent, GenerationRequest, Mode, Pipeline,
    SubmitError,
};

async fn next_event(stream: &mut EngineStream) -> Option<Result<GenerationEvent, SubmitError>> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Submits `requests` at once and checks that each is answered as the pipeline answers it alone.
async fn answers_as_alone(engine: &Engine, requests: Vec<GenerationRequest>) {
    let pipeline = Pipeline::demo();
    let lone: Vec<Vec<String>> = requests
        .iter()
        .map(|r| pipeline.generate(r).unwrap())
        .collect();
    let handles: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.generate(r).await })
        })
        .collect();
    for (handle, expected) in handles.into_iter().zip(&lone) {
        let completed = handle.await.unwrap().unwrap();
        assert_eq!(&completed.output.texts, expected);
    }
}

/// An engine with 64-token prompt chunks, and a stream of `request` on it that is decoding (its
/// first token came).
async fn engine_with_a_running_stream(
    request: GenerationRequest,
) -> (Engine, std::thread::JoinHandle<()>, EngineStream) {
    let config = EngineConfig {
        prefill_chunk_tokens: 64,
        ..EngineConfig::default()
    };
    let (engine, thread) = Engine::start(Pipeline::demo(), config).unwrap();
    let mut running = engine.stream(request).await.unwrap();
    assert!(matches!(
        next_event(&mut running).await,
        Some(Ok(GenerationEvent::Token(_)))
    ));
    (engine, thread, running)
}

/// The most prompt tokens a running stream waited for at once.
fn max_stall(engine: &Engine) -> u64 {
    engine
        .stats()
        .max_prefill_stall_tokens
        .load(Ordering::Relaxed)
}

fn long_prompt() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_prefilled_between_the_steps_of_running_streams() {
    // Long enough to be still decoding however slowly the long request is admitted (a stream
    // that ended first would leave the prefill nothing to stall).
    let short = GenerationRequest::builder("Once")
        .mode(Mode::Greedy)
        .max_new_tokens(1000)
        .num_return_sequences(1)
        .build()
        .unwrap();
    let (engine, _thread, mut running) = engine_with_a_running_stream(short).await;
    let long = GenerationRequest::builder(long_prompt())
        .mode(Mode::Greedy)
        .max_new_tokens(5)
        .num_return_sequences(1)
        .build()
        .unwrap();
    let prompt_tokens = Pipeline::demo()
        .tokenizer()
        .encode(&long_prompt())
        .unwrap()
        .len();
    assert!(prompt_tokens >= 600, "{prompt_tokens}");
    let mut waiting = engine.stream(long).await.unwrap();
    assert!(matches!(
        next_event(&mut waiting).await,
        Some(Ok(GenerationEvent::Token(_)))
    ));
    // The running stream waited for one chunk of at most 64 tokens at a time (sized below that
    // cap by measurement), not for the whole prompt.
    let stall = max_stall(&engine);
    assert!(
        (1..=64).contains(&stall),
        "the running stream waited for {stall} prompt tokens at once ({prompt_tokens} in all)"
    );
    // And it is still decoding.
    assert!(matches!(
        next_event(&mut running).await,
        Some(Ok(GenerationEvent::Token(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_and_a_row_budget_change_no_answer() {
    let config = EngineConfig {
        prefill_chunk_tokens: 64,
        max_batch_rows: 4,
        ..EngineConfig::default()
    };
    let (engine, _thread) = Engine::start(Pipeline::demo(), config).unwrap();
    let requests: Vec<GenerationRequest> = (0..5u64)
        .map(|i| {
            let input = if i == 2 {
                long_prompt()
            } else {
                format!("Request {i}")
            };
            GenerationRequest::builder(input)
                .mode(Mode::Sample)
                .seed(i)
                .max_new_tokens(12)
                .num_return_sequences(3)
                .build()
                .unwrap()
        })
        .collect();
    answers_as_alone(&engine, requests).await;
    let stats = engine.stats();
    let steps = stats.decode_steps.load(Ordering::Relaxed);
    let rows = stats.decode_rows.load(Ordering::Relaxed);
    // Each request has 3 rows and the budget is 4: one request decodes at a time.
    assert!(rows <= steps * 3, "{rows} rows in {steps} steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_prompts_starts_together_beside_the_running_steps() {
    // 16 rows decoding keep each step long enough for the burst to queue up behind one.
    let busy = GenerationRequest::builder("Once")
        .mode(Mode::Sample)
        .seed(1)
        .max_new_tokens(1000)
        .num_return_sequences(16)
        .build()
        .unwrap();
    let (engine, _thread, mut running) = engine_with_a_running_stream(busy).await;
    // Short prompts and one longer than the chunk budget, which takes several steps.
    let requests: Vec<GenerationRequest> = (0..8u64)
        .map(|i| {
            let input = match i {
                3 => long_prompt(),
                _ => format!("Request number {i} is"),
            };
            GenerationRequest::builder(input)
                .mode(Mode::Sample)
                .seed(i)
                .max_new_tokens(6)
                .num_return_sequences(2)
                .build()
                .unwrap()
        })
        .collect();
    answers_as_alone(&engine, requests).await;
    let together = engine.stats().max_prefills_per_pass.load(Ordering::Relaxed);
    assert!(
        together >= 2,
        "at most {together} prompt(s) ran in one step's pass"
    );
    // The running stream waited for at most one budget of prompt tokens per step.
    let stall = max_stall(&engine);
    assert!((1..=64).contains(&stall), "{stall}");
    assert!(matches!(
        next_event(&mut running).await,
        Some(Ok(GenerationEvent::Token(_)))
    ));
}
