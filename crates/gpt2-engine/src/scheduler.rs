//! The inference thread's loop: continuous batching under two budgets.
//!
//! Each round runs one decode step over the pending tokens of every running request, so each
//! weight is read once per step for all of them. While requests decode, the prompt being
//! prefilled runs one chunk inside that step's pass (`Gpt2Model::forward_mixed`), sized by
//! measurement so that it adds at most `max_prefill_stall_percent` (50 by default) of a step's
//! time ([`ChunkSizer`]) and never more than `prefill_chunk_tokens`. While nothing decodes,
//! prompts are prefilled on their own in chunks of at least 256 tokens, a few short ones per
//! round. Requests join the batch in arrival order while their rows fit under `max_batch_rows`;
//! finished ones leave at once.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::chunk_sizer::ChunkSizer;
use crate::events::EventBuilder;
use crate::run::Prefill;
use crate::worker::{EngineStats, Job, WorkerMessage};
use crate::{Decoding, EngineConfig, EngineError, Pipeline};

/// Prefills started per round at most while nothing decodes (while requests decode, one prompt at
/// a time runs beside the steps): each reads every weight once, as a decode step does.
const PREFILLS_PER_ROUND: usize = 2;

/// Prompt tokens per chunk while no request is decoding: nothing waits on the chunks then but
/// requests that may arrive meanwhile, and longer chunks prefill faster.
const IDLE_PREFILL_CHUNK_TOKENS: usize = 256;

/// The budgets of the loop, from [`EngineConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    prefill_chunk_tokens: usize,
    max_prefill_stall: f64,
    max_batch_rows: usize,
}

impl Schedule {
    pub(crate) fn from_config(config: &EngineConfig) -> Self {
        Self {
            prefill_chunk_tokens: config.prefill_chunk_tokens.max(1),
            max_prefill_stall: f64::from(config.max_prefill_stall_percent.max(1)) / 100.0,
            max_batch_rows: config.max_batch_rows.max(1),
        }
    }
}

/// A request whose sequences are in the running batch.
struct Running<'p> {
    job: Job,
    decoding: Decoding,
    events: EventBuilder<'p>,
}

/// A request whose prompt is being prefilled, chunk by chunk.
struct Prefilling {
    job: Job,
    prefill: Prefill,
    /// Time spent in its chunks so far.
    spent: Duration,
}

impl Running<'_> {
    /// Sends the events of the request's last advance and, when it is done, its sequences' ends
    /// and the end of its stream; keeps it in `still_running` otherwise.
    fn publish(self, still_running: &mut Vec<Self>) {
        let Running {
            job,
            mut decoding,
            mut events,
        } = self;
        let mut out = Vec::new();
        let mut result = events
            .on_emitted(decoding.emitted(), &mut out)
            .and_then(|stopped| decoding.end_sequences(&stopped));
        let done = decoding.is_done();
        let mut decoding = Some(decoding);
        if done && result.is_ok() {
            if let Some(finished) = decoding.take() {
                let eos = finished.eos_token_id();
                result = events.on_outputs(finished.into_outputs(), eos, &mut out);
            }
        }
        if !out.is_empty() {
            job.send(WorkerMessage::Events(out));
        }
        match (result, decoding) {
            (Err(e), _) => job.send(WorkerMessage::Failed(e)),
            (Ok(()), Some(decoding)) if !done => still_running.push(Running {
                job,
                decoding,
                events,
            }),
            (Ok(()), _) => job.send(WorkerMessage::Finished),
        }
    }
}

/// Whether a job should still be served; tells its stream when its deadline passed.
fn still_wanted(job: &Job, now: Instant) -> bool {
    if job.cancelled.load(Ordering::Relaxed) {
        return false; // its client is gone: the place was already freed
    }
    if now >= job.deadline {
        job.send(WorkerMessage::Failed(EngineError::DeadlineExceeded));
        return false;
    }
    true
}

/// The inference thread's loop; returns when every engine handle is gone and nothing runs.
pub(crate) fn serve_jobs(
    pipeline: &Pipeline,
    queue: &mpsc::Receiver<Job>,
    stats: &EngineStats,
    schedule: &Schedule,
) {
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut prefilling: Option<Prefilling> = None;
    let mut sizer = ChunkSizer::new(schedule.prefill_chunk_tokens, schedule.max_prefill_stall);
    let mut queue_open = true;
    loop {
        // Take what arrived; sleep on the queue only when there is nothing else to do.
        if running.is_empty() && prefilling.is_none() && waiting.is_empty() {
            if !queue_open {
                return;
            }
            match queue.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return, // every handle is gone and nothing runs
            }
        }
        while queue_open {
            match queue.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => queue_open = false,
            }
        }
        let now = Instant::now();
        waiting.retain(|job| still_wanted(job, now));
        metrics::gauge!("gpt2_waiting_requests").set(waiting.len() as f64);

        let stalled = prefill_round(
            pipeline,
            schedule,
            sizer.next_chunk(),
            &mut waiting,
            &mut prefilling,
            &mut running,
        );
        stats
            .max_prefill_stall_tokens
            .fetch_max(stalled as u64, Ordering::Relaxed);

        let now = Instant::now();
        running.retain(|r| still_wanted(&r.job, now));
        if running.is_empty() {
            metrics::gauge!("gpt2_running_requests").set(0.0);
            metrics::gauge!("gpt2_running_sequences").set(0.0);
            continue;
        }
        let rows: usize = running
            .iter()
            .map(|r| r.decoding.pending_tokens().len())
            .sum();
        stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        stats.decode_rows.fetch_add(rows as u64, Ordering::Relaxed);
        metrics::gauge!("gpt2_running_requests").set(running.len() as f64);
        metrics::gauge!("gpt2_running_sequences").set(rows as f64);
        metrics::histogram!("gpt2_decode_batch_rows").record(rows as f64);
        let stepped = Instant::now();
        let chunk_tokens = step(pipeline, &mut running, &mut prefilling);
        let elapsed = stepped.elapsed();
        sizer.record_step(chunk_tokens, elapsed);
        metrics::histogram!("gpt2_decode_step_duration_seconds").record(elapsed.as_secs_f64());
    }
}

/// One round's prefill work: continues the prompt being prefilled and starts waiting requests,
/// in arrival order, within the round's token budget and the batch's row budget. While requests
/// decode it only sets up the next chunk, of `beside_step_tokens`, for the step's pass. Returns
/// the prompt tokens the running requests wait for this round.
fn prefill_round<'p>(
    pipeline: &'p Pipeline,
    schedule: &Schedule,
    beside_step_tokens: usize,
    waiting: &mut VecDeque<Job>,
    prefilling: &mut Option<Prefilling>,
    running: &mut Vec<Running<'p>>,
) -> usize {
    let decoding_before = !running.is_empty();
    let chunk_tokens = if decoding_before {
        beside_step_tokens
    } else {
        schedule.prefill_chunk_tokens.max(IDLE_PREFILL_CHUNK_TOKENS)
    };
    let mut budget = chunk_tokens;
    let mut started = 0;
    let mut stalled = 0;
    loop {
        if prefilling.is_none() {
            let Some(next) = waiting.front() else {
                return stalled;
            };
            let running_rows: usize = running
                .iter()
                .map(|r| r.decoding.pending_tokens().len())
                .sum();
            let fits = running.is_empty()
                || running_rows + next.params.decode_rows() <= schedule.max_batch_rows;
            // A chunk or prompt longer than what is left of the budget waits for the next round,
            // unless the round has done nothing yet (so a long chunk always makes progress).
            let affordable =
                next.prompt.len().min(chunk_tokens) <= budget || budget == chunk_tokens;
            if !fits || !affordable || started == PREFILLS_PER_ROUND {
                return stalled;
            }
            let Some(job) = waiting.pop_front() else {
                return stalled;
            };
            started += 1;
            *prefilling = begin(pipeline, job, schedule);
            continue;
        }
        let Some(current) = prefilling.as_mut() else {
            return stalled;
        };
        if !still_wanted(&current.job, Instant::now()) {
            *prefilling = None;
            continue;
        }
        current.prefill.set_chunk_tokens(chunk_tokens);
        let chunk = current.prefill.next_chunk_tokens();
        if chunk > budget && budget < chunk_tokens {
            return stalled;
        }
        if decoding_before {
            // The chunk runs in the decode step's own pass (see `step`).
            return stalled + chunk;
        }

        let clock = Instant::now();
        let ran = current.prefill.run_chunk(pipeline.model());
        current.spent += clock.elapsed();
        budget = budget.saturating_sub(chunk);
        if decoding_before {
            stalled += chunk;
        }
        if let Err(e) = ran {
            if let Some(failed) = prefilling.take() {
                failed.job.send(WorkerMessage::Failed(e));
            }
            continue;
        }
        if current.prefill.is_done() {
            if let Some(done) = prefilling.take() {
                if let Some(request) = finish(pipeline, done) {
                    request.publish(running);
                }
            }
        }
        if budget == 0 {
            return stalled;
        }
    }
}

/// Tells a job's stream that it started and plans its prefill; `None` (after telling the stream
/// why) when its parameters are refused.
fn begin(pipeline: &Pipeline, mut job: Job, schedule: &Schedule) -> Option<Prefilling> {
    let prompt = std::mem::take(&mut job.prompt);
    job.send(WorkerMessage::Started {
        queued: Instant::now() - job.admitted,
        prompt_tokens: prompt.len(),
    });
    match Prefill::new(
        pipeline.model(),
        &prompt,
        job.params.clone(),
        job.request.prompt_logprobs(),
        schedule.prefill_chunk_tokens,
    ) {
        Ok(prefill) => Some(Prefilling {
            job,
            prefill,
            spent: Duration::ZERO,
        }),
        Err(e) => {
            job.send(WorkerMessage::Failed(e));
            None
        }
    }
}

/// Turns a finished prefill into a running request with its first tokens chosen.
fn finish(pipeline: &Pipeline, done: Prefilling) -> Option<Running<'_>> {
    let Prefilling {
        job,
        prefill,
        spent,
    } = done;
    metrics::histogram!("gpt2_prefill_duration_seconds").record(spent.as_secs_f64());
    // The prompt's ids are needed again only to list its scores.
    let prompt = job
        .request
        .prompt_logprobs()
        .then(|| prefill.prompt().to_vec());
    let built = prefill.finish().and_then(|mut decoding| {
        let shape = crate::prepare::answer_shape(pipeline.tokenizer(), &job.request, &job.params)?;
        let events = EventBuilder::new(
            pipeline.tokenizer(),
            shape,
            job.request.num_return_sequences(),
        );
        let mut out = Vec::new();
        if let (Some(prompt), Some(scores)) = (&prompt, decoding.take_prompt_scores()) {
            events.on_prompt(prompt, &scores, &mut out)?;
        }
        Ok((decoding, events, out))
    });
    match built {
        Ok((decoding, events, out)) => {
            if !out.is_empty() {
                job.send(WorkerMessage::Events(out));
            }
            Some(Running {
                job,
                decoding,
                events,
            })
        }
        Err(e) => {
            job.send(WorkerMessage::Failed(e));
            None
        }
    }
}

/// One decode step over every running request, publishing their events; a prompt being
/// prefilled runs its next chunk in the same pass over the weights ([`Prefill::run_chunk_beside`]),
/// then joins the batch once its last chunk ran. Returns the chunk's tokens (0: none ran).
fn step<'p>(
    pipeline: &'p Pipeline,
    running: &mut Vec<Running<'p>>,
    prefilling: &mut Option<Prefilling>,
) -> usize {
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
    let mut stepped = None;
    let mut chunk_tokens = 0;
    if let Some(current) = prefilling
        .as_mut()
        .filter(|p| p.prefill.next_chunk_tokens() > 0)
    {
        let clock = Instant::now();
        let chunk = current.prefill.next_chunk_tokens();
        let ran = current
            .prefill
            .run_chunk_beside(pipeline.model(), &tokens, &mut caches);
        current.spent += clock.elapsed();
        match ran {
            Ok(logits) => {
                chunk_tokens = chunk;
                stepped = Some(Ok(logits));
            }
            Err(e) => {
                // The chunk may be what failed: it fails alone, and the step runs without it (a
                // failed pass committed no cache position, so the retry rewrites the same ones).
                tracing::error!("prefill chunk beside a decode step failed: {e}");
                if let Some(failed) = prefilling.take() {
                    failed
                        .job
                        .send(WorkerMessage::Failed(EngineError::Model(e)));
                }
            }
        }
    }
    let stepped = stepped.unwrap_or_else(|| pipeline.model().forward_step(&tokens, &mut caches));
    let logits = match stepped {
        Ok(logits) => logits,
        Err(e) => {
            tracing::error!("decode step failed: {e}");
            let e = Arc::new(e);
            for r in running.drain(..) {
                r.job
                    .send(WorkerMessage::Failed(EngineError::DecodeStep(e.clone())));
            }
            return chunk_tokens;
        }
    };
    let mut offset = 0;
    let mut still_running = Vec::with_capacity(running.len());
    for (mut request, count) in running.drain(..).zip(counts) {
        let rows = &logits[offset * vocab..(offset + count) * vocab];
        offset += count;
        match request.decoding.advance(rows) {
            Err(e) => request.job.send(WorkerMessage::Failed(e)),
            Ok(()) => request.publish(&mut still_running),
        }
    }
    *running = still_running;
    if prefilling.as_ref().is_some_and(|p| p.prefill.is_done()) {
        if let Some(request) = prefilling.take().and_then(|done| finish(pipeline, done)) {
            request.publish(running);
        }
    }
    chunk_tokens
}
