//! The inference thread's loop: continuous batching under two budgets.
//!
//! Each round runs one decode step over the pending tokens of every running request, so each
//! weight is read once per step for all of them. While requests decode, the prompts being
//! prefilled run their next chunks inside that step's pass (`Gpt2Model::forward_mixed`), in
//! arrival order, with a token budget sized by measurement so that they add at most
//! `max_prefill_stall_percent` (50 by default) of a step's time ([`ChunkSizer`]) and never more
//! than `prefill_chunk_tokens`: a burst of short prompts starts together, a long one takes the
//! whole budget until it is in. While nothing decodes, the prompts' chunks share a pass of their
//! own, at least 256 tokens in all. Requests join the batch in arrival order while their rows
//! fit under `max_batch_rows`; finished ones leave at once.

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

/// Prompt tokens per pass (all prompts' chunks together) while no request is decoding: nothing
/// waits on the chunks then but requests that may arrive meanwhile, and longer chunks prefill
/// faster.
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
            stats,
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
        let chunk_tokens = step(pipeline, stats, &mut running, &mut prefilling);
        let elapsed = stepped.elapsed();
        sizer.record_step(rows, chunk_tokens, elapsed);
        metrics::histogram!("gpt2_decode_step_duration_seconds").record(elapsed.as_secs_f64());
    }
}

/// One round's prefill work: plans the next chunks of the prompts being prefilled, then of
/// waiting requests, in arrival order within the round's token budget and the batch's row
/// budget. While requests decode the chunks run in the step's pass, `beside_step_tokens` in all;
/// while none does, they run now in one pass of their own, [`IDLE_PREFILL_CHUNK_TOKENS`] or
/// more in all, and the finished prompts join `running`. Returns the prompt tokens the running
/// requests wait for this round.
fn prefill_round<'p>(
    pipeline: &'p Pipeline,
    stats: &EngineStats,
    schedule: &Schedule,
    beside_step_tokens: usize,
    waiting: &mut VecDeque<Job>,
    prefilling: &mut Vec<Prefilling>,
    running: &mut Vec<Running<'p>>,
) -> usize {
    let now = Instant::now();
    prefilling.retain(|p| still_wanted(&p.job, now));
    let decoding = !running.is_empty();
    let tokens = match decoding {
        true => beside_step_tokens,
        false => schedule.prefill_chunk_tokens.max(IDLE_PREFILL_CHUNK_TOKENS),
    };
    let mut budget = tokens;
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
        // A request alone always runs, whatever its rows.
        if rows > 0 && rows + next.params.decode_rows() > schedule.max_batch_rows {
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
    if decoding {
        // The chunks run in the decode step's own pass (see `step`).
        return tokens - budget;
    }
    // Nothing decodes: the chunks share a pass of their own.
    run_planned(pipeline, stats, prefilling, &[], &mut []);
    join_finished(pipeline, prefilling, running);
    0
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
    stats: &EngineStats,
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
    let (stepped, chunk_tokens) = run_planned(pipeline, stats, prefilling, &tokens, &mut caches);
    let stepped = stepped
        .map(Ok)
        .unwrap_or_else(|| pipeline.model().forward_step(&tokens, &mut caches));
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
    join_finished(pipeline, prefilling, running);
    chunk_tokens
}

/// Runs the planned chunks of `prefilling` in one pass with the decode step of `tokens` over
/// `caches` (none: the chunks on their own). Returns the step's logits when that pass ran, and
/// the chunks' tokens. When it failed, the prompts that had a chunk in it fail (the pass cannot
/// tell which one did) and leave `prefilling`; the caller retries the step without them (a
/// failed pass committed no cache position, so the retry rewrites the same ones).
fn run_planned(
    pipeline: &Pipeline,
    stats: &EngineStats,
    prefilling: &mut Vec<Prefilling>,
    tokens: &[u32],
    caches: &mut [&mut gpt2_model::KvCache],
) -> (Option<Vec<f32>>, usize) {
    let planned: usize = prefilling.iter().map(|p| p.planned).sum();
    if planned == 0 {
        return (None, 0);
    }
    let prompts = prefilling.iter().filter(|p| p.planned > 0).count();
    stats
        .max_prefills_per_pass
        .fetch_max(prompts as u64, Ordering::Relaxed);
    let clock = Instant::now();
    let mut prefills: Vec<&mut Prefill> = prefilling
        .iter_mut()
        .filter(|p| p.planned > 0)
        .map(|p| &mut p.prefill)
        .collect();
    let ran = Prefill::run_chunks_beside(&mut prefills, pipeline.model(), tokens, caches);
    let elapsed = clock.elapsed();
    let result = match ran {
        Ok(logits) => {
            for p in prefilling.iter_mut().filter(|p| p.planned > 0) {
                p.spent += elapsed;
            }
            (Some(logits), planned)
        }
        Err(e) => {
            tracing::error!("a pass of prompt chunks failed: {e}");
            let e = Arc::new(e);
            prefilling.retain(|p| {
                if p.planned > 0 {
                    p.job
                        .send(WorkerMessage::Failed(EngineError::DecodeStep(e.clone())));
                }
                p.planned == 0
            });
            (None, 0)
        }
    };
    prefilling.iter_mut().for_each(|p| p.planned = 0);
    result
}

/// Moves every prompt whose last chunk ran into the batch, in arrival order.
fn join_finished<'p>(
    pipeline: &'p Pipeline,
    prefilling: &mut Vec<Prefilling>,
    running: &mut Vec<Running<'p>>,
) {
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
}
