//! The inference thread's loop: continuous batching under two budgets.
//!
//! Each round runs one decode step over the pending tokens of every running request, so each
//! weight is read once per step for all of them. While requests decode, the prompts being
//! prefilled run their next chunks inside that step's pass (`Gpt2Model::forward_mixed`), in
//! arrival order, with a token budget sized by measurement so that they add at most
//! `max_prefill_stall_percent` (50 by default) of a step's time ([`ChunkSizer`]) and never more
//! than `prefill_chunk_tokens`: a burst of short prompts starts together, a long one takes the
//! whole budget until it is in. While nothing decodes, prompts are prefilled on their own in
//! chunks of at least 256 tokens, a few short ones per round. Requests join the batch in arrival
//! order while their rows fit under `max_batch_rows`; finished ones leave at once.

use std::collections::VecDeque;

use rayon::prelude::*;
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
    /// Prompt tokens planned for the coming decode step's pass (0: none).
    planned: usize,
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
    let mut prefilling: Vec<Prefilling> = Vec::new();
    let mut sizer = ChunkSizer::new(schedule.prefill_chunk_tokens, schedule.max_prefill_stall);
    let mut queue_open = true;
    loop {
        // Take what arrived; sleep on the queue only when there is nothing else to do.
        if running.is_empty() && prefilling.is_empty() && waiting.is_empty() {
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

        let decoding_rows: usize = running
            .iter()
            .map(|r| r.decoding.pending_tokens().len())
            .sum();
        let stalled = prefill_round(
            pipeline,
            schedule,
            sizer.next_chunk(decoding_rows),
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
        let beside = prefilling.iter().filter(|p| p.planned > 0).count();
        stats
            .max_prefills_per_step
            .fetch_max(beside as u64, Ordering::Relaxed);
        let chunk_tokens = step(pipeline, &mut running, &mut prefilling);
        let elapsed = stepped.elapsed();
        sizer.record_step(rows, chunk_tokens, elapsed);
        metrics::histogram!("gpt2_decode_step_duration_seconds").record(elapsed.as_secs_f64());
    }
}

/// One round's prefill work, in arrival order within the round's token budget and the batch's
/// row budget. While requests decode it only plans the chunks of the step's pass: the prompts
/// being prefilled first, then waiting requests, `beside_step_tokens` in all. Returns the prompt
/// tokens the running requests wait for this round.
fn prefill_round<'p>(
    pipeline: &'p Pipeline,
    schedule: &Schedule,
    beside_step_tokens: usize,
    waiting: &mut VecDeque<Job>,
    prefilling: &mut Vec<Prefilling>,
    running: &mut Vec<Running<'p>>,
) -> usize {
    let now = Instant::now();
    prefilling.retain(|p| still_wanted(&p.job, now));
    if running.is_empty() {
        prefill_alone(pipeline, schedule, waiting, prefilling, running);
        return 0;
    }
    let mut budget = beside_step_tokens;
    for current in prefilling.iter_mut() {
        current.planned = plan_chunk(&mut current.prefill, &mut budget);
    }
    let mut rows: usize = running
        .iter()
        .map(|r| r.decoding.pending_tokens().len())
        .chain(prefilling.iter().map(|p| p.job.params.decode_rows()))
        .sum();
    while budget > 0 {
        let Some(next) = waiting.front() else {
            break;
        };
        if rows + next.params.decode_rows() > schedule.max_batch_rows {
            break;
        }
        let Some(job) = waiting.pop_front() else {
            break;
        };
        rows += job.params.decode_rows();
        if let Some(mut started) = begin(pipeline, job, schedule) {
            started.planned = plan_chunk(&mut started.prefill, &mut budget);
            prefilling.push(started);
        }
    }
    beside_step_tokens - budget
}

/// Sizes a prefill's next chunk to what is left of `budget` and takes it from there.
fn plan_chunk(prefill: &mut Prefill, budget: &mut usize) -> usize {
    let tokens = prefill.remaining_tokens().min(*budget);
    if tokens > 0 {
        prefill.set_chunk_tokens(tokens);
    }
    *budget -= tokens;
    tokens
}

/// While nothing decodes: prefills prompts on their own, in chunks of at least
/// [`IDLE_PREFILL_CHUNK_TOKENS`], one after the other within one such chunk's budget, starting
/// at most [`PREFILLS_PER_ROUND`]. Finished prompts join `running`.
fn prefill_alone<'p>(
    pipeline: &'p Pipeline,
    schedule: &Schedule,
    waiting: &mut VecDeque<Job>,
    prefilling: &mut Vec<Prefilling>,
    running: &mut Vec<Running<'p>>,
) {
    let chunk_tokens = schedule.prefill_chunk_tokens.max(IDLE_PREFILL_CHUNK_TOKENS);
    prefilling.iter_mut().for_each(|p| p.planned = 0);
    let mut budget = chunk_tokens;
    let mut started = 0;
    loop {
        if prefilling.is_empty() {
            let Some(next) = waiting.front() else {
                return;
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
                return;
            }
            let Some(job) = waiting.pop_front() else {
                return;
            };
            started += 1;
            prefilling.extend(begin(pipeline, job, schedule));
            continue;
        }
        let current = &mut prefilling[0];
        current.prefill.set_chunk_tokens(chunk_tokens);
        let chunk = current.prefill.next_chunk_tokens();
        if chunk > budget && budget < chunk_tokens {
            return;
        }
        let clock = Instant::now();
        let ran = current.prefill.run_chunk(pipeline.model());
        current.spent += clock.elapsed();
        budget = budget.saturating_sub(chunk);
        if let Err(e) = ran {
            prefilling.remove(0).job.send(WorkerMessage::Failed(e));
            continue;
        }
        if current.prefill.is_done() {
            if let Some(request) = finish(pipeline, prefilling.remove(0)) {
                request.publish(running);
            }
        }
        if budget == 0 {
            return;
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
            planned: 0,
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
        ..
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

/// One decode step over every running request, publishing their events; the prompts with a
/// planned chunk run it in the same pass over the weights ([`Prefill::run_chunks_beside`]), and
/// those whose last chunk ran join the batch. Returns the chunks' tokens (0: none ran).
fn step<'p>(
    pipeline: &'p Pipeline,
    running: &mut Vec<Running<'p>>,
    prefilling: &mut Vec<Prefilling>,
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
    let planned: usize = prefilling.iter().map(|p| p.planned).sum();
    if planned > 0 {
        let clock = Instant::now();
        let mut prefills: Vec<&mut Prefill> = prefilling
            .iter_mut()
            .filter(|p| p.planned > 0)
            .map(|p| &mut p.prefill)
            .collect();
        let ran = Prefill::run_chunks_beside(&mut prefills, pipeline.model(), &tokens, &mut caches);
        let elapsed = clock.elapsed();
        match ran {
            Ok(logits) => {
                chunk_tokens = planned;
                stepped = Some(Ok(logits));
                for p in prefilling.iter_mut().filter(|p| p.planned > 0) {
                    p.spent += elapsed;
                }
            }
            Err(e) => {
                // The chunks may be what failed: they fail, and the step runs without them (a
                // failed pass committed no cache position, so the retry rewrites the same ones).
                tracing::error!("prefill chunks beside a decode step failed: {e}");
                let e = Arc::new(e);
                prefilling.retain(|p| {
                    if p.planned > 0 {
                        p.job
                            .send(WorkerMessage::Failed(EngineError::DecodeStep(e.clone())));
                    }
                    p.planned == 0
                });
            }
        }
        prefilling.iter_mut().for_each(|p| p.planned = 0);
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
    let mut rows = Vec::with_capacity(counts.len());
    let mut offset = 0;
    for count in counts {
        rows.push(&logits[offset * vocab..(offset + count) * vocab]);
        offset += count;
    }
    // Each request chooses its tokens from its own rows with its own generator, so requests
    // advance side by side on the model's pool: a 16-client step spent 4-5 ms here on one
    // thread (48 rows of top-k sampling over 50,257 logits) while the other idled.
    let advanced: Vec<Result<(), EngineError>> = if running.len() > 1 {
        running
            .par_iter_mut()
            .zip(rows.par_iter())
            .map(|(request, rows)| request.decoding.advance(rows))
            .collect()
    } else {
        running
            .iter_mut()
            .zip(&rows)
            .map(|(request, rows)| request.decoding.advance(rows))
            .collect()
    };
    let mut still_running = Vec::with_capacity(running.len());
    for (request, result) in running.drain(..).zip(advanced) {
        match result {
            Err(e) => request.job.send(WorkerMessage::Failed(e)),
            Ok(()) => request.publish(&mut still_running),
        }
    }
    *running = still_running;
    let mut index = 0;
    while index < prefilling.len() {
        if prefilling[index].prefill.is_done() {
            if let Some(request) = finish(pipeline, prefilling.remove(index)) {
                request.publish(running);
            }
        } else {
            index += 1;
        }
    }
    chunk_tokens
}
