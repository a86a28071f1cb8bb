//! The inference worker: one thread owns the pipeline; requests reach it through a bounded
//! admission count and a channel, and wait for their answer without blocking the async runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpt2_schema::GenerationRequest;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{EngineError, GenerationOutput, Pipeline};

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
    pipeline_info: Arc<PipelineInfo>,
}

/// What handlers may want to know about the model without reaching into the worker.
#[derive(Debug, Clone)]
pub struct PipelineInfo {
    /// Whether the model is the demo model.
    pub is_demo: bool,
    /// The model's position limit.
    pub n_positions: usize,
}

impl Engine {
    /// Moves `pipeline` onto a new worker thread and returns the handle and the thread. The
    /// thread ends when every handle is dropped.
    pub fn start(
        pipeline: Pipeline,
        config: EngineConfig,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let pipeline_info = Arc::new(PipelineInfo {
            is_demo: *pipeline.source() == crate::ModelSource::Demo,
            n_positions: pipeline.model().config().n_positions,
        });
        let thread = std::thread::Builder::new()
            .name("gpt2-inference".into())
            .spawn(move || serve_jobs(&pipeline, &queue))?;
        let engine = Self {
            jobs,
            admission: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            config,
            pipeline_info,
        };
        Ok((engine, thread))
    }

    /// The admission and deadline settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &PipelineInfo {
        &self.pipeline_info
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
            Ok(Ok(Err(EngineError::Cancelled))) | Err(_) => {
                Err(SubmitError::DeadlineExceeded(self.config.deadline))
            }
            Ok(Ok(Err(e))) => Err(SubmitError::Engine(e)),
            Ok(Err(_)) => Err(SubmitError::WorkerGone),
        }
    }
}

fn serve_jobs(pipeline: &Pipeline, queue: &mpsc::Receiver<Job>) {
    for job in queue {
        if job.cancelled.load(Ordering::Relaxed) {
            continue; // its client is gone: the place was already freed
        }
        let started = Instant::now();
        if started >= job.deadline {
            let _ = job.reply.send(Err(EngineError::Cancelled));
            continue;
        }
        let cancelled = &job.cancelled;
        let deadline = job.deadline;
        let result = pipeline.run(&job.request, || {
            cancelled.load(Ordering::Relaxed) || Instant::now() >= deadline
        });
        let finished = Instant::now();
        let _ = job.reply.send(result.map(|output| Completed {
            output,
            queued: started - job.admitted,
            generation: finished - started,
        }));
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
