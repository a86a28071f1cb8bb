//! The inference worker: one thread owns the pipeline; requests reach it through a bounded
//! admission count and a channel, and their events come back on a channel of their own, so a
//! caller can stream them ([`Engine::stream`]) or wait for the whole answer ([`Engine::generate`],
//! built on the stream) without blocking the async runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_core::Stream;
use gpt2_schema::GenerationRequest;
use tokio::sync::{mpsc as channel, OwnedSemaphorePermit, Semaphore};

use crate::events::{Collector, GenerationEvent};
use crate::prepare::Preparer;
use crate::{EngineError, GenerationOutput, Pipeline};

/// How the worker admits and bounds requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests admitted at once, the running one included; more are refused at once.
    pub queue_capacity: usize,
    /// Longest a request may take from admission to answer (SageMaker's default is 60 s).
    pub deadline: Duration,
    /// Bytes of KV cache the admitted requests may reserve together (`usize::MAX`: no bound).
    /// Each request reserves what its sequences can grow to at admission; one that can never fit
    /// is refused with a field error, one that cannot fit now waits (within its deadline).
    pub kv_budget_bytes: usize,
    /// Most prompt tokens prefilled in one decode step's pass while other requests decode
    /// (default 64). Below this cap the chunks are sized by measurement, so that each adds at
    /// most [`Self::max_prefill_stall_percent`] of a step's time to the running streams' step
    /// (chunks of any size compute exactly the bits of a one-shot prefill); while none decodes,
    /// a round prefills at least 256 prompt tokens.
    pub prefill_chunk_tokens: usize,
    /// How much the prompt chunks inside one decode step may lengthen it, in percent of the
    /// step's own time (default 50, at least 1): the step's prompt tokens are sized by
    /// measurement to stay within it.
    /// Larger values prefill long prompts sooner and make the running streams' gaps longer.
    pub max_prefill_stall_percent: u32,
    /// Most sequence rows (sequences or beams) in one decode step (default 48: the knee past which
    /// a 124M step is compute-bound and more rows lower throughput, measured in
    /// docs/performance.md). A request whose rows would go beyond waits, in arrival order, until
    /// running ones finish; one request alone always runs whatever its size.
    pub max_batch_rows: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            deadline: Duration::from_secs(60),
            kv_budget_bytes: usize::MAX,
            prefill_chunk_tokens: 64,
            max_prefill_stall_percent: 50,
            max_batch_rows: 48,
        }
    }
}

/// The KV budget is counted in KiB, so that any machine's memory fits a semaphore's permits.
const KV_BUDGET_UNIT: usize = 1024;

/// Why a submitted request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Every place in the queue is taken; retry later.
    #[error("the server is busy: {capacity} requests are already queued or running")]
    QueueFull { capacity: usize },
    /// The deadline passed before the answer was ready; the work was stopped.
    #[error("the request did not finish within its deadline of {0:?}")]
    DeadlineExceeded(Duration),
    /// The engine is shutting down or its worker stopped.
    #[error("the inference worker is not running")]
    WorkerGone,
    /// The request itself failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// An answer with its timings.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The texts and token counts.
    pub output: GenerationOutput,
    /// Time spent waiting for the worker.
    pub queued: Duration,
    /// Time spent generating.
    pub generation: Duration,
    /// From admission to the first event (the first token, or a beam search's first sequence).
    pub first_token: Option<Duration>,
}

/// What the worker tells a request's stream.
pub(crate) enum WorkerMessage {
    /// The worker took the request: its prefill starts now.
    Started {
        queued: Duration,
        prompt_tokens: usize,
    },
    /// The events of one prefill or step, sent together so that a sequence's last token and its
    /// end arrive at once.
    Events(Vec<GenerationEvent>),
    Finished,
    Failed(EngineError),
}

pub(crate) struct Job {
    pub(crate) request: GenerationRequest,
    /// The prompt's ids and the generation parameters, prepared before admission.
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: gpt2_generation::GenerationParams,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) deadline: Instant,
    pub(crate) admitted: Instant,
    events: channel::UnboundedSender<WorkerMessage>,
}

impl Job {
    /// Sends to the request's stream; a stream that is gone was cancelled by its drop already.
    pub(crate) fn send(&self, message: WorkerMessage) {
        let _ = self.events.send(message);
    }
}

/// Sets the flag when dropped: a stream dropped mid-request (its client went away, or its
/// deadline fired) stops its generation at the next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A handle to the inference worker; cheap to clone and share between request handlers.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    preparer: Preparer,
    /// KV-cache bytes per sequence per position, in the model's cache format.
    kv_bytes_per_position: usize,
    kv_budget: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    alive: Arc<AtomicBool>,
}

/// Clears the flag when the worker thread ends, normally or by a panic.
struct AliveWhileHeld(Arc<AtomicBool>);

impl Drop for AliveWhileHeld {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Counters the worker keeps, for metrics and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Decode steps run.
    pub decode_steps: std::sync::atomic::AtomicU64,
    /// Sequence rows summed over decode steps (rows / steps is the mean batch).
    pub decode_rows: std::sync::atomic::AtomicU64,
    /// The most prompt tokens prefilled between two decode steps while other requests were
    /// decoding: how long a running stream waited for prefill work, in tokens (bounded by
    /// [`EngineConfig::prefill_chunk_tokens`]).
    pub max_prefill_stall_tokens: std::sync::atomic::AtomicU64,
    /// The most prompts whose chunks ran in one pass, beside a decode step or on their own
    /// (waiting prompts start together within the round's token budget).
    pub max_prefills_per_pass: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// Moves `pipeline` onto a new worker thread and returns the handle and the thread. The
    /// thread ends when every handle is dropped.
    pub fn start(
        pipeline: Pipeline,
        config: EngineConfig,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let schedule = crate::scheduler::Schedule::from_config(&config);
        let preparer = Preparer::new(pipeline.tokenizer(), pipeline.model().config());
        let kv_bytes_per_position = pipeline.model().kv_cache_bytes(1, 1);
        let kv_budget_units = (config.kv_budget_bytes / KV_BUDGET_UNIT).min(Semaphore::MAX_PERMITS);
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveWhileHeld(alive.clone());
        let thread = std::thread::Builder::new()
            .name("gpt2-inference".into())
            .spawn(move || {
                let _alive = guard;
                crate::scheduler::serve_jobs(&pipeline, &queue, &worker_stats, &schedule)
            })?;
        let engine = Self {
            jobs,
            preparer,
            kv_bytes_per_position,
            kv_budget: Arc::new(Semaphore::new(kv_budget_units)),
            admission: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            config,
            stats,
            alive,
        };
        Ok((engine, thread))
    }

    /// The admission and deadline settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The served model's tokenizer (a copy the caller's side uses; the worker has its own).
    pub fn tokenizer(&self) -> &gpt2_tokenizer::Gpt2Tokenizer {
        self.preparer.tokenizer()
    }

    /// The served model's configuration (vocabulary, `n_positions`, end-of-text token).
    pub fn model_config(&self) -> &gpt2_model::Gpt2Config {
        self.preparer.config()
    }

    /// Whether the inference worker is running (false after it died, for health checks).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// The worker's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.config.queue_capacity.max(1) - self.admission.available_permits()
    }

    /// Bytes of KV cache the admitted requests have reserved against the budget.
    pub fn kv_reserved_bytes(&self) -> usize {
        let total = (self.config.kv_budget_bytes / KV_BUDGET_UNIT).min(Semaphore::MAX_PERMITS);
        (total - self.kv_budget.available_permits()).saturating_mul(KV_BUDGET_UNIT)
    }

    /// Prepares a request (tokenizes its prompt and checks the limits that need it, on Tokio's
    /// blocking pool), queues it and returns the stream of its events. Refused at once with the
    /// request's own error (before admission, so even when the queue is full), or with
    /// [`SubmitError::QueueFull`] when every place is taken. The stream ends after the last
    /// sequence's [`GenerationEvent::End`], or with one error (a passed deadline, a failed step,
    /// a stopped worker). Dropping it (the client went away) frees the place and stops the
    /// generation at the next step. Must run inside a Tokio runtime.
    pub async fn stream(&self, request: GenerationRequest) -> Result<EngineStream, SubmitError> {
        let preparer = self.preparer.clone();
        let (request, prompt, params) = tokio::task::spawn_blocking(move || {
            let (prompt, params) = preparer.prepare(&request)?;
            Ok::<_, EngineError>((request, prompt, params))
        })
        .await
        .map_err(|_| SubmitError::WorkerGone)??;
        let kv_units = self.kv_units(&params)?;
        let permit =
            self.admission
                .clone()
                .try_acquire_owned()
                .map_err(|_| SubmitError::QueueFull {
                    capacity: self.config.queue_capacity,
                })?;
        let admitted = Instant::now();
        let deadline = admitted + self.config.deadline;
        // Waits while the running requests hold the memory this one needs, within its deadline.
        let reservation = tokio::time::timeout_at(
            deadline.into(),
            self.kv_budget.clone().acquire_many_owned(kv_units),
        )
        .await
        .map_err(|_| SubmitError::DeadlineExceeded(self.config.deadline))?
        .map_err(|_| SubmitError::WorkerGone)?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let (events, receiver) = channel::unbounded_channel();
        self.jobs
            .send(Job {
                request,
                prompt,
                params,
                cancelled: cancelled.clone(),
                deadline,
                admitted,
                events,
            })
            .map_err(|_| SubmitError::WorkerGone)?;
        Ok(EngineStream {
            receiver,
            deadline,
            deadline_timer: None,
            deadline_length: self.config.deadline,
            admitted,
            started: None,
            first_event: None,
            ready: std::collections::VecDeque::new(),
            prompt_tokens: 0,
            ended: false,
            _cancel_on_drop: CancelOnDrop(cancelled),
            _permit: permit,
            _kv_reservation: reservation,
        })
    }

    /// The KV budget units `params` reserves: every sequence it runs at once (beams, sampled
    /// sequences; greedy runs one) at its full length. A request that can never fit the budget
    /// is refused here, naming the limit.
    fn kv_units(&self, params: &gpt2_generation::GenerationParams) -> Result<u32, SubmitError> {
        let rows = params.decode_rows();
        let bytes = self
            .kv_bytes_per_position
            .saturating_mul(rows)
            .saturating_mul(params.max_length);
        let units = bytes.div_ceil(KV_BUDGET_UNIT);
        let budget = self.config.kv_budget_bytes;
        if budget != usize::MAX && bytes > budget {
            let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
            return Err(SubmitError::Engine(EngineError::Request(
                gpt2_schema::RequestError::InvalidField {
                    field: "max_length",
                    reason: format!(
                        "{rows} sequence(s) of {} tokens need {:.1} MiB of KV cache, more than the \
                         server's whole KV budget of {:.1} MiB (--kv-budget-mb): ask for a shorter \
                         max_length or fewer sequences",
                        params.max_length,
                        mib(bytes),
                        mib(budget)
                    ),
                },
            )));
        }
        u32::try_from(units).map_err(|_| SubmitError::QueueFull {
            capacity: self.config.queue_capacity,
        })
    }

    /// Queues a request and waits for its whole answer: [`Engine::stream`], collected.
    pub async fn generate(&self, request: GenerationRequest) -> Result<Completed, SubmitError> {
        let mut collector = Collector::new(request.num_return_sequences());
        let mut stream = self.stream(request).await?;
        while let Some(event) = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await
        {
            collector.push(event?);
        }
        let timings = stream.timings();
        Ok(Completed {
            output: collector.finish(stream.prompt_tokens),
            queued: timings.queued,
            generation: timings.generation,
            first_token: timings.first_token,
        })
    }
}

/// Where a request's time went, as its stream saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimings {
    /// From admission to the start of its prefill.
    pub queued: Duration,
    /// From the start of its prefill to now (or to its end, once the stream has ended).
    pub generation: Duration,
    /// From admission to its first event.
    pub first_token: Option<Duration>,
}

/// The events of one request, from [`Engine::stream`]: a [`Stream`] of
/// `Result<GenerationEvent, SubmitError>`.
pub struct EngineStream {
    receiver: channel::UnboundedReceiver<WorkerMessage>,
    deadline: Instant,
    /// Made at the first poll, so that the stream can be created outside a Tokio runtime.
    deadline_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    deadline_length: Duration,
    admitted: Instant,
    started: Option<Instant>,
    first_event: Option<Instant>,
    /// Events received and not yet yielded.
    ready: std::collections::VecDeque<GenerationEvent>,
    prompt_tokens: usize,
    ended: bool,
    _cancel_on_drop: CancelOnDrop,
    _permit: OwnedSemaphorePermit,
    /// The request's KV memory, returned to the budget when the stream is dropped.
    _kv_reservation: OwnedSemaphorePermit,
}

impl std::fmt::Debug for EngineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStream")
            .field("prompt_tokens", &self.prompt_tokens)
            .field("ready", &self.ready.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl EngineStream {
    /// Tokens in the prompt (0 until the worker has taken the request).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event if it has already arrived, without waiting: a sequence's last token and
    /// its end arrive together, so a caller can merge them.
    pub fn peek_ready(&self) -> Option<&GenerationEvent> {
        self.ready.front()
    }

    /// The request's timings so far.
    pub fn timings(&self) -> StreamTimings {
        let started = self.started.unwrap_or(self.admitted);
        StreamTimings {
            queued: started - self.admitted,
            generation: started.elapsed(),
            first_token: self.first_event.map(|at| at - self.admitted),
        }
    }

    fn end(
        &mut self,
        item: Option<Result<GenerationEvent, SubmitError>>,
    ) -> Poll<Option<Result<GenerationEvent, SubmitError>>> {
        self.ended = true;
        self.receiver.close();
        Poll::Ready(item)
    }
}

impl Stream for EngineStream {
    type Item = Result<GenerationEvent, SubmitError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(event) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(event)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(WorkerMessage::Started {
                    queued,
                    prompt_tokens,
                })) => {
                    this.started = Some(this.admitted + queued);
                    this.prompt_tokens = prompt_tokens;
                }
                Poll::Ready(Some(WorkerMessage::Events(events))) => {
                    // The prompt's scores come before any generated token.
                    if events
                        .iter()
                        .any(|e| !matches!(e, GenerationEvent::Prompt(_)))
                    {
                        this.first_event.get_or_insert_with(Instant::now);
                    }
                    this.ready.extend(events);
                    if let Some(event) = this.ready.pop_front() {
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
                Poll::Ready(Some(WorkerMessage::Finished)) => return this.end(None),
                Poll::Ready(Some(WorkerMessage::Failed(EngineError::DeadlineExceeded))) => {
                    let error = SubmitError::DeadlineExceeded(this.deadline_length);
                    return this.end(Some(Err(error)));
                }
                Poll::Ready(Some(WorkerMessage::Failed(e))) => {
                    return this.end(Some(Err(SubmitError::Engine(e))))
                }
                // The worker dropped the request without finishing it: it stopped (or panicked).
                Poll::Ready(None) => return this.end(Some(Err(SubmitError::WorkerGone))),
                Poll::Pending => break,
            }
        }
        let deadline = this.deadline;
        let timer = this
            .deadline_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if timer.as_mut().poll(cx).is_ready() {
            let error = SubmitError::DeadlineExceeded(this.deadline_length);
            return this.end(Some(Err(error)));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2_schema::Limits;

    fn request(body: &str) -> GenerationRequest {
        GenerationRequest::from_json(body.as_bytes(), &Limits::default()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_like_the_pipeline() {
        let (engine, _thread) = Engine::start(Pipeline::demo(), EngineConfig::default()).unwrap();
        let body = r#"{"input": "Hello", "mode": "greedy", "max_length": 10}"#;
        let completed = engine.generate(request(body)).await.unwrap();
        assert_eq!(
            completed.output.texts,
            Pipeline::demo().generate(&request(body)).unwrap()
        );
        assert_eq!(completed.output.prompt_tokens, 1);
        assert_eq!(engine.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_steps_and_keep_their_lone_outputs() {
        let (engine, _thread) = Engine::start(Pipeline::demo(), EngineConfig::default()).unwrap();
        let bodies = [
            r#"{"input": "One", "seed": 1, "max_length": 40}"#,
            r#"{"input": "Two words", "seed": 2, "mode": "sample", "max_length": 35}"#,
            r#"{"input": "Three little words", "mode": "beam", "num_beams": 4, "max_length": 30}"#,
            r#"{"input": "Four", "mode": "greedy", "max_length": 45}"#,
            r#"{"input": "Five five", "seed": 5, "mode": "sample-top-k", "max_length": 38}"#,
            r#"{"input": "Six", "seed": 6, "num_return_sequences": 1, "max_length": 42}"#,
        ];
        let lone: Vec<Vec<String>> = bodies
            .iter()
            .map(|b| Pipeline::demo().generate(&request(b)).unwrap())
            .collect();
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let engine = engine.clone();
                let req = request(b);
                tokio::spawn(async move { engine.generate(req).await })
            })
            .collect();
        for (handle, expected) in handles.into_iter().zip(&lone) {
            let completed = handle.await.unwrap().unwrap();
            assert_eq!(
                &completed.output.texts, expected,
                "batched output equals the lone run"
            );
        }
        let steps = engine.stats().decode_steps.load(Ordering::Relaxed);
        let rows = engine.stats().decode_rows.load(Ordering::Relaxed);
        // Alone, the six requests need at least 39 + 33 + 29 + 44 + 37 + 41 steps.
        assert!(steps < 200, "requests shared decode steps: {steps} steps");
        assert!(
            rows > steps,
            "steps carried several rows: {rows} rows in {steps} steps"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_queue_refuses_at_once_and_deadline_stops_work() {
        let config = EngineConfig {
            queue_capacity: 1,
            deadline: Duration::from_millis(300),
            ..EngineConfig::default()
        };
        let (engine, _thread) = Engine::start(Pipeline::demo(), config).unwrap();
        // A long beam request occupies the only place until its deadline stops it.
        let long = request(
            r#"{"input": "Hello", "mode": "beam", "num_beams": 16, "num_return_sequences": 1, "max_length": 1024, "no_repeat_ngram_size": 0}"#,
        );
        let first = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.generate(long).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = engine.generate(request(r#"{"input": "Hi"}"#)).await;
        assert!(
            matches!(refused, Err(SubmitError::QueueFull { capacity: 1 })),
            "{refused:?}"
        );
        let started = Instant::now();
        let outcome = first.await.unwrap();
        assert!(
            matches!(outcome, Err(SubmitError::DeadlineExceeded(_))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The place is free again and the worker is usable.
        let ok = engine
            .generate(request(r#"{"input": "Hi", "max_length": 5}"#))
            .await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    async fn next_event(stream: &mut EngineStream) -> Option<Result<GenerationEvent, SubmitError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn streams_concatenate_to_the_plain_answer_in_every_mode() {
        let (engine, _thread) = Engine::start(Pipeline::demo(), EngineConfig::default()).unwrap();
        let pipeline = Pipeline::demo();
        for body in [
            r#"{"input": "Hello", "seed": 4, "max_length": 30}"#,
            r#"{"input": "Hello", "seed": 4, "mode": "sample-top-k", "max_length": 30}"#,
            r#"{"input": "Hello", "seed": 4, "mode": "sample", "temperature": 1.3, "max_length": 30}"#,
            r#"{"input": "Hello", "mode": "greedy", "max_length": 25}"#,
            r#"{"input": "Hello", "mode": "beam", "max_length": 25}"#,
        ] {
            let plain = pipeline.generate(&request(body)).unwrap();
            let mut deltas = vec![String::new(); plain.len()];
            let mut ends = vec![None; plain.len()];
            let mut stream = engine.stream(request(body)).await.unwrap();
            while let Some(event) = next_event(&mut stream).await {
                match event.unwrap() {
                    GenerationEvent::Token(token) => {
                        assert!(
                            ends[token.index].is_none(),
                            "no token after its sequence's end"
                        );
                        assert!(token.logprob <= 0.0);
                        deltas[token.index].push_str(&token.text);
                    }
                    GenerationEvent::End(end) => ends[end.index] = Some(end.text),
                    GenerationEvent::Prompt(_) => panic!("not asked for"),
                }
            }
            assert!(stream.timings().first_token.is_some());
            let ends: Vec<String> = ends.into_iter().map(Option::unwrap).collect();
            assert_eq!(ends, plain, "{body}");
            if !body.contains("beam") {
                let streamed: Vec<String> = deltas.iter().map(|d| format!("Hello{d}")).collect();
                assert_eq!(streamed, plain, "{body}");
            }
            let library: Vec<GenerationEvent> = pipeline
                .stream(&request(body))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let library_ends = library
                .iter()
                .filter(|e| matches!(e, GenerationEvent::End(_)));
            assert_eq!(library_ends.count(), plain.len());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_stream_frees_its_place_and_stops_its_work() {
        let config = EngineConfig {
            queue_capacity: 1,
            deadline: Duration::from_secs(60),
            ..EngineConfig::default()
        };
        let (engine, _thread) = Engine::start(Pipeline::demo(), config).unwrap();
        let long = r#"{"input": "Hi", "seed": 1, "max_length": 1000, "num_return_sequences": 16}"#;
        let mut stream = engine.stream(request(long)).await.unwrap();
        assert!(matches!(next_event(&mut stream).await, Some(Ok(_))));
        assert!(matches!(
            engine.stream(request(r#"{"input": "Hi"}"#)).await,
            Err(SubmitError::QueueFull { .. })
        ));
        let steps_before = engine.stats().decode_steps.load(Ordering::Relaxed);
        drop(stream);
        assert_eq!(engine.in_flight(), 0, "the place is free at once");
        let ok = engine
            .generate(request(r#"{"input": "Hi", "max_length": 5}"#))
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        let steps = engine.stats().decode_steps.load(Ordering::Relaxed) - steps_before;
        assert!(
            steps < 100,
            "the dropped request stopped: {steps} steps ran after the drop"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_prompt_that_cannot_fit_is_refused_before_admission_even_when_the_queue_is_full() {
        let config = EngineConfig {
            queue_capacity: 1,
            deadline: Duration::from_secs(60),
            ..EngineConfig::default()
        };
        let (engine, _thread) = Engine::start(Pipeline::demo(), config).unwrap();
        let long = r#"{"input": "Hi", "seed": 1, "max_length": 1000, "num_return_sequences": 16}"#;
        let _running = engine.stream(request(long)).await.unwrap();
        // 6 MB without spaces: refused by its length alone, without tokenizing it.
        let huge = format!(r#"{{"input": "{}"}}"#, "x".repeat(6 << 20));
        let started = Instant::now();
        match engine.stream(request(&huge)).await {
            Err(SubmitError::Engine(EngineError::Request(e))) => {
                assert_eq!(e.field(), Some("input"));
                assert!(e.to_string().contains("at most 131072 bytes"), "{e}");
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("a 6 MB prompt was admitted"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Short enough in bytes but too many tokens: still a field error, not 503.
        let over = format!(r#"{{"input": "{}"}}"#, "a ".repeat(1100));
        let refused = engine.stream(request(&over)).await;
        assert!(
            matches!(refused, Err(SubmitError::Engine(EngineError::Request(_)))),
            "{refused:?}"
        );
        // A valid request meets the full queue.
        let queued = engine.stream(request(r#"{"input": "Hi"}"#)).await;
        assert!(matches!(queued, Err(SubmitError::QueueFull { .. })));
    }

    #[test]
    fn extreme_values_that_pass_validation_are_served() {
        let pipeline = Pipeline::demo();
        let greedy = pipeline
            .generate(&request(r#"{"input": "Hello", "mode": "greedy", "max_length": 20, "num_return_sequences": 1}"#))
            .unwrap();
        // A temperature that overflows the logits is the greedy limit, not NaN noise.
        let cold = pipeline
            .generate(&request(r#"{"input": "Hello", "mode": "sample", "temperature": 1e-38, "seed": 1, "max_length": 20, "num_return_sequences": 1}"#))
            .unwrap();
        assert_eq!(cold, greedy);
        // The smallest top_p keeps only the most likely token: greedy again.
        let narrow = pipeline
            .generate(&request(r#"{"input": "Hello", "top_p": 1e-40, "seed": 1, "max_length": 20, "num_return_sequences": 1}"#))
            .unwrap();
        assert_eq!(narrow, greedy);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn kv_memory_is_reserved_against_the_budget_at_admission() {
        let model = Pipeline::demo();
        // Room for 2 sequences of 100 tokens, not 3.
        let budget = model.model().kv_cache_bytes(2, 100) + 1024;
        let config = EngineConfig {
            kv_budget_bytes: budget,
            deadline: Duration::from_secs(30),
            ..EngineConfig::default()
        };
        let (engine, _thread) = Engine::start(model, config).unwrap();
        // Three sequences of 100 can never fit: refused at once, naming the limit.
        match engine
            .stream(request(r#"{"input": "Hi", "max_length": 100}"#))
            .await
        {
            Err(SubmitError::Engine(EngineError::Request(e))) => {
                assert_eq!(e.field(), Some("max_length"));
                assert!(e.to_string().contains("--kv-budget-mb"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Two sequences fit; while they run, another two wait for their memory, then run.
        let two = r#"{"input": "Hi", "max_length": 100, "num_return_sequences": 2, "seed": 1}"#;
        let mut first = engine.stream(request(two)).await.unwrap();
        assert!(matches!(next_event(&mut first).await, Some(Ok(_))));
        let waiting =
            tokio::time::timeout(Duration::from_millis(300), engine.stream(request(two))).await;
        assert!(waiting.is_err(), "the second request waited for memory");
        drop(first);
        let mut second = engine.stream(request(two)).await.unwrap();
        assert!(matches!(next_event(&mut second).await, Some(Ok(_))));
        // Greedy runs one sequence whatever num_return_sequences says: it fits beside `second`.
        let greedy =
            r#"{"input": "Hi", "mode": "greedy", "max_length": 100, "num_return_sequences": 3}"#;
        let waiting =
            tokio::time::timeout(Duration::from_millis(300), engine.stream(request(greedy))).await;
        assert!(
            waiting.is_err(),
            "the budget holds two rows and `second` holds both"
        );
        drop(second);
        assert!(engine.generate(request(greedy)).await.is_ok());
    }
}
