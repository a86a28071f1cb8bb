//! The inference worker: one thread owns the pipeline; requests reach it through a bounded
//! admission count and a channel, and wait for their answer without blocking the async runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpt2_schema::GenerationRequest;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{Decoding, EngineError, GenerationOutput, Pipeline};

/// How the worker admits and bounds requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests admitted at once, the running one included; more are refused at once.
    pub queue_capacity: usize,
    /// Longest a request may take from admission to answer (SageMaker's default is 60 s).
    pub deadline: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            deadline: Duration::from_secs(60),
        }
    }
}

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
}

struct Job {
    request: GenerationRequest,
    cancelled: Arc<AtomicBool>,
    deadline: Instant,
    admitted: Instant,
    reply: oneshot::Sender<Result<Completed, EngineError>>,
}

/// Sets the flag when dropped: a handler dropped mid-request (its client went away, or its
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
}

impl Engine {
    /// Moves `pipeline` onto a new worker thread and returns the handle and the thread. The
    /// thread ends when every handle is dropped.
    pub fn start(
        pipeline: Pipeline,
        config: EngineConfig,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveWhileHeld(alive.clone());
        let thread = std::thread::Builder::new()
            .name("gpt2-inference".into())
            .spawn(move || {
                let _alive = guard;
                serve_jobs(&pipeline, &queue, &worker_stats)
            })?;
        let engine = Self {
            jobs,
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

    /// Queues a request and waits for its answer. Refused at once with
    /// [`SubmitError::QueueFull`] when the queue is full. Dropping the returned future (the
    /// client went away) frees the place and stops the generation.
    pub async fn generate(&self, request: GenerationRequest) -> Result<Completed, SubmitError> {
        let _permit: OwnedSemaphorePermit =
            self.admission
                .clone()
                .try_acquire_owned()
                .map_err(|_| SubmitError::QueueFull {
                    capacity: self.config.queue_capacity,
                })?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancelled.clone());
        let admitted = Instant::now();
        let deadline = admitted + self.config.deadline;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                request,
                cancelled,
                deadline,
                admitted,
                reply,
            })
            .map_err(|_| SubmitError::WorkerGone)?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(Ok(completed))) => Ok(completed),
            Ok(Ok(Err(EngineError::DeadlineExceeded))) | Err(_) => {
                Err(SubmitError::DeadlineExceeded(self.config.deadline))
            }
            Ok(Ok(Err(e))) => Err(SubmitError::Engine(e)),
            Ok(Err(_)) => Err(SubmitError::WorkerGone),
        }
    }
}

/// Requests admitted into the running batch per decode step: each admission runs a prefill,
/// and the sequences already decoding wait for it.
const ADMISSIONS_PER_STEP: usize = 2;

/// A request whose sequences are in the running batch.
struct Running {
    job: Job,
    decoding: Decoding,
    prompt_tokens: usize,
    started: Instant,
}

/// Continuous batching: every decode step runs the pending tokens of all running requests
/// together, so each weight is read once per step for all of them; new requests join between
/// steps (after their own prefill) and finished ones leave at once.
fn serve_jobs(pipeline: &Pipeline, queue: &mpsc::Receiver<Job>, stats: &EngineStats) {
    let mut running: Vec<Running> = Vec::new();
    let mut queue_open = true;
    loop {
        let mut admitted = 0;
        while queue_open && admitted < ADMISSIONS_PER_STEP {
            let job = if running.is_empty() && admitted == 0 {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => return, // every handle is gone and nothing runs
                }
            } else {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        queue_open = false;
                        break;
                    }
                }
            };
            if job.cancelled.load(Ordering::Relaxed) {
                continue; // its client is gone: the place was already freed
            }
            let started = Instant::now();
            if started >= job.deadline {
                let _ = job.reply.send(Err(EngineError::DeadlineExceeded));
                continue;
            }
            admitted += 1;
            let start = pipeline.prepare(&job.request).and_then(|(prompt, params)| {
                Decoding::start(pipeline.model(), &prompt, params).map(|d| (prompt.len(), d))
            });
            match start {
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
                Ok((prompt_tokens, decoding)) => {
                    let request = Running {
                        job,
                        decoding,
                        prompt_tokens,
                        started,
                    };
                    if request.decoding.is_done() {
                        finish(pipeline, request);
                    } else {
                        running.push(request);
                    }
                }
            }
        }
        if running.is_empty() {
            if queue_open {
                continue;
            }
            return;
        }
        let now = Instant::now();
        let mut live = Vec::with_capacity(running.len());
        for r in running.drain(..) {
            if r.job.cancelled.load(Ordering::Relaxed) {
                continue; // the client went away: stop its generation
            }
            if now >= r.job.deadline {
                let _ = r.job.reply.send(Err(EngineError::DeadlineExceeded));
                continue;
            }
            live.push(r);
        }
        running = live;
        if running.is_empty() {
            continue;
        }
        let rows: usize = running
            .iter()
            .map(|r| r.decoding.pending_tokens().len())
            .sum();
        stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        stats.decode_rows.fetch_add(rows as u64, Ordering::Relaxed);
        step(pipeline, &mut running);
    }
}

/// One decode step for every running request; answers those that finish or fail.
fn step(pipeline: &Pipeline, running: &mut Vec<Running>) {
    let vocab = pipeline.model().config().vocab_size;
    let tokens: Vec<u32> = running
        .iter()
        .flat_map(|r| r.decoding.pending_tokens().iter().copied())
        .collect();
    let counts: Vec<usize> = running
        .iter()
        .map(|r| r.decoding.pending_tokens().len())
        .collect();
    let mut caches: Vec<&mut gpt2_model::KvCache> =
        running.iter_mut().map(|r| r.decoding.cache_mut()).collect();
    let logits = match pipeline.model().forward_step(&tokens, &mut caches) {
        Ok(logits) => logits,
        Err(e) => {
            tracing::error!("decode step failed: {e}");
            let e = Arc::new(e);
            for r in running.drain(..) {
                let _ = r.job.reply.send(Err(EngineError::DecodeStep(e.clone())));
            }
            return;
        }
    };
    let mut offset = 0;
    let mut still_running = Vec::with_capacity(running.len());
    for (mut request, count) in running.drain(..).zip(counts) {
        let rows = &logits[offset * vocab..(offset + count) * vocab];
        offset += count;
        match request.decoding.advance(rows) {
            Err(e) => {
                let _ = request.job.reply.send(Err(e));
            }
            Ok(()) if request.decoding.is_done() => finish(pipeline, request),
            Ok(()) => still_running.push(request),
        }
    }
    *running = still_running;
}

fn finish(pipeline: &Pipeline, request: Running) {
    let Running {
        job,
        decoding,
        prompt_tokens,
        started,
    } = request;
    let outputs = decoding.into_outputs();
    let result = pipeline
        .finish(&job.request, prompt_tokens, &outputs)
        .map(|output| Completed {
            output,
            queued: started - job.admitted,
            generation: started.elapsed(),
        });
    let _ = job.reply.send(result);
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
}
