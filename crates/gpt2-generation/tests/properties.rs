//! Properties of the [`Generator`] state machine, driven by a synthetic "model": a deterministic
//! pseudo-random function from a row's whole context (prompt and tokens so far) to its logits,
//! over small vocabularies. The harness follows each `Step` as an engine does (row `i` of the
//! next batch continues row `parent_rows[i]` with `tokens[i]`), so a row's logits depend on its
//! own tokens only, as the model's rows do (that the model's rows do not depend on their batch
//! is tested where the model is: `rows_do_not_depend_on_their_batch_in_any_storage` in
//! crates/gpt2-model/tests/weight_format.rs, `batched_decode_equals_each_sequence_alone_and_forked_caches`
//! in crates/gpt2-model/tests/hf_parity.rs, and the worker's
//! `concurrent_requests_share_steps_and_keep_their_lone_outputs`).
//!
//! Properties: outputs have `num_return_sequences` entries, each within the length bounds; an
//! EOS ends a sequence; beam search with `no_repeat_ngram_size = n` never repeats an n-gram; the
//! same seed gives the same outputs; `emitted()` streams exactly `into_outputs()`; a sequence's
//! output does not depend on the other sequences of its request nor on other requests sharing
//! its batches.

use gpt2_generation::{
    BeamParams, Emitted, FinishReason, GenerationParams, Generator, SamplingParams,
    Strategy as Decoding,
};
use proptest::prelude::*;

/// A "model": logits as a pseudo-random function of the context.
#[derive(Debug, Clone, Copy)]
struct Model {
    seed: u64,
    vocab: usize,
    /// Logits are spread over `[0, spread)`: small means flat distributions, large peaked ones.
    spread: f32,
    /// Added to the EOS logit, to make sequences end early (or never).
    eos_bias: f32,
    eos: Option<u32>,
    /// Logits are rounded to this many levels, so that ties happen (0: no rounding).
    levels: u32,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Model {
    fn logits(&self, context: &[u32], out: &mut Vec<f32>) {
        let h = context
            .iter()
            .fold(self.seed, |h, &t| mix(h ^ u64::from(t)));
        for token in 0..self.vocab {
            let unit = (mix(h ^ (token as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 40) as f32
                / (1u64 << 24) as f32;
            let unit = if self.levels > 0 {
                (unit * self.levels as f32).floor() / self.levels as f32
            } else {
                unit
            };
            let mut logit = unit * self.spread;
            if Some(token as u32) == self.eos {
                logit += self.eos_bias;
            }
            out.push(logit);
        }
    }

    fn batch(&self, contexts: &[Vec<u32>]) -> Vec<f32> {
        let mut out = Vec::with_capacity(contexts.len() * self.vocab);
        for context in contexts {
            self.logits(context, &mut out);
        }
        out
    }
}

/// One request being generated: its generator and the context of each row it asked for.
struct Running {
    generator: Generator,
    contexts: Vec<Vec<u32>>,
    emitted: Vec<Vec<Emitted>>,
    max_length: usize,
    vocab: usize,
    done: bool,
}

impl Running {
    fn new(prompt: &[u32], params: &GenerationParams, vocab: usize) -> Self {
        Self {
            generator: Generator::new(prompt, params.clone(), vocab).unwrap(),
            contexts: vec![prompt.to_vec()],
            emitted: Vec::new(),
            max_length: params.max_length,
            vocab,
            done: false,
        }
    }

    /// Feeds the logits of the rows asked for; follows the step it answers.
    fn advance(&mut self, logits: &[f32]) {
        let step = self.generator.advance(logits).unwrap();
        self.emitted.push(self.generator.emitted().to_vec());
        let Some(step) = step else {
            self.done = true;
            self.contexts.clear();
            return;
        };
        assert!(!step.tokens.is_empty());
        assert_eq!(step.parent_rows.len(), step.tokens.len());
        self.contexts = step
            .parent_rows
            .iter()
            .zip(&step.tokens)
            .map(|(&parent, &token)| {
                assert!((parent as usize) < self.contexts.len(), "{step:?}");
                assert!((token as usize) < self.vocab, "{step:?}");
                let mut context = self.contexts[parent as usize].clone();
                context.push(token);
                // A row is never run at a position its request's KV cache has no room for.
                assert!(context.len() < self.max_length, "{context:?}");
                context
            })
            .collect();
    }

    fn finish(self) -> Outcome {
        assert!(self.done);
        Outcome {
            outputs: self.generator.into_outputs(),
            emitted: self.emitted,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    outputs: Vec<Vec<u32>>,
    emitted: Vec<Vec<Emitted>>,
}

/// Runs one request alone against `model`.
fn generate(model: &Model, prompt: &[u32], params: &GenerationParams) -> Outcome {
    let mut running = Running::new(prompt, params, model.vocab);
    let mut steps = 0;
    while !running.done {
        let logits = model.batch(&running.contexts);
        running.advance(&logits);
        steps += 1;
        assert!(steps <= params.max_length, "generation must end");
    }
    running.finish()
}

#[derive(Debug, Clone)]
struct Case {
    model: Model,
    prompt: Vec<u32>,
    params: GenerationParams,
}

impl Case {
    fn max_new(&self) -> usize {
        self.params.max_length - self.prompt.len()
    }

    /// Whether no-repeat-n-gram can ban every token of some beam's step. A sequence bans at
    /// most one token per earlier n-gram, so that needs a vocabulary of at most max_length + 1
    /// tokens (never the case for GPT-2: 50,257 tokens, 1,024 positions). Then every candidate
    /// scores −∞, below the −1e9 of the placeholder hypotheses, and beam search (HF's as well)
    /// can return a placeholder (the prompt alone: an empty output) or continue a beam after an
    /// EOS. The length and EOS properties hold outside that case.
    fn bans_can_exhaust_the_vocabulary(&self) -> bool {
        matches!(self.params.strategy, Decoding::Beam(b) if b.no_repeat_ngram_size > 0)
            && self.model.vocab <= self.params.max_length + 1
    }
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (0.05f32..4.0, 0usize..12, 0.05f32..=1.0, any::<bool>()).prop_map(
        |(temperature, top_k, top_p, no_top_p)| SamplingParams {
            temperature,
            top_k,
            top_p: if no_top_p { 1.0 } else { top_p },
        },
    )
}

/// `(strategy, num_return_sequences)`.
fn strategy() -> BoxedStrategy<(Decoding, usize)> {
    prop_oneof![
        (1usize..=4).prop_map(|n| (Decoding::Greedy, n)),
        (sampling(), 1usize..=5).prop_map(|(s, n)| (Decoding::Sample(s), n)),
        beam(0usize..=3),
    ]
    .boxed()
}

fn beam(ngram: impl Strategy<Value = usize> + 'static) -> BoxedStrategy<(Decoding, usize)> {
    (1usize..=4, ngram)
        .prop_flat_map(|(num_beams, no_repeat_ngram_size)| {
            (
                Just(BeamParams {
                    num_beams,
                    no_repeat_ngram_size,
                }),
                1..=num_beams,
            )
        })
        .prop_map(|(b, n)| (Decoding::Beam(b), n))
        .boxed()
}

fn model(vocab: usize) -> impl Strategy<Value = Model> {
    (
        any::<u64>(),
        prop_oneof![Just(0.5f32), Just(3.0f32), Just(12.0f32)],
        prop_oneof![Just(-20.0f32), -2.0f32..4.0],
        prop::option::weighted(0.8, 0..vocab as u32),
        prop_oneof![Just(0u32), Just(4u32)],
    )
        .prop_map(move |(seed, spread, eos_bias, eos, levels)| Model {
            seed,
            vocab,
            spread,
            eos_bias,
            eos,
            levels,
        })
}

/// A request: vocabulary of `min_vocab` to 64 tokens, prompt of 1 to 6, 1 to 12 new tokens.
fn case_with(
    strategy: BoxedStrategy<(Decoding, usize)>,
    min_vocab: usize,
) -> impl Strategy<Value = Case> {
    (min_vocab..=64).prop_flat_map(move |vocab| {
        (
            model(vocab),
            prop::collection::vec(0..vocab as u32, 1..=6),
            1usize..=12,
            strategy.clone(),
            any::<u64>(),
        )
            .prop_map(|(model, prompt, max_new, (strategy, n), seed)| {
                let params = GenerationParams {
                    strategy,
                    max_length: prompt.len() + max_new,
                    num_return_sequences: n,
                    eos_token_id: model.eos,
                    seed: Some(seed),
                    processing: Default::default(),
                    top_logprobs: 0,
                };
                Case {
                    params,
                    model,
                    prompt,
                }
            })
    })
}

fn case() -> impl Strategy<Value = Case> {
    case_with(strategy(), 8)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES=<n> runs more (or fewer) cases.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(512),
        // Failures print their minimal case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Whether the n-gram of size `n` ending at `end` (exclusive) occurs earlier in `tokens`.
fn repeats_earlier(tokens: &[u32], end: usize, n: usize) -> bool {
    let gram = &tokens[end - n..end];
    (n..end).any(|earlier_end| &tokens[earlier_end - n..earlier_end] == gram)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn lengths_stay_within_bounds_and_eos_ends_a_sequence(case in case()) {
        let outcome = generate(&case.model, &case.prompt, &case.params);
        let eos = case.params.eos_token_id;
        prop_assert_eq!(outcome.outputs.len(), case.params.num_return_sequences);
        for output in &outcome.outputs {
            prop_assert!(output.len() <= case.max_new(), "{:?}", outcome.outputs);
            prop_assert!(output.iter().all(|&t| (t as usize) < case.model.vocab));
            if case.bans_can_exhaust_the_vocabulary() {
                continue;
            }
            prop_assert!(!output.is_empty(), "{:?}", outcome.outputs);
            if let Some(eos) = eos {
                // An EOS only as the last token: nothing follows it.
                let body = &output[..output.len() - 1];
                prop_assert!(!body.contains(&eos), "EOS inside {:?}", output);
            }
            if FinishReason::of(output, eos) == FinishReason::Length {
                prop_assert_eq!(output.len(), case.max_new(), "{:?}", output);
            }
        }
    }

    #[test]
    fn without_eos_every_output_has_exactly_max_length(case in case()) {
        let params = GenerationParams { eos_token_id: None, ..case.params.clone() };
        let outcome = generate(&case.model, &case.prompt, &params);
        for output in &outcome.outputs {
            if case.bans_can_exhaust_the_vocabulary() {
                // A placeholder (the prompt alone) can win; nothing is ever longer.
                prop_assert!(output.len() <= case.max_new());
                continue;
            }
            prop_assert_eq!(output.len(), case.max_new(), "{:?}", outcome.outputs);
        }
    }

    #[test]
    fn emitted_tokens_are_the_outputs(case in case()) {
        let outcome = generate(&case.model, &case.prompt, &case.params);
        let eos = case.params.eos_token_id;
        if let Decoding::Beam(_) = case.params.strategy {
            // Beam search's sequences are only known at the end.
            prop_assert!(outcome.emitted.iter().all(Vec::is_empty));
            return Ok(());
        }
        let n = case.params.num_return_sequences;
        let mut streamed = vec![Vec::new(); n];
        let mut ended = vec![None; n];
        for step in &outcome.emitted {
            let mut seen = vec![false; n];
            for e in step {
                prop_assert!(e.index < n);
                prop_assert!(!seen[e.index], "twice in one step: {:?}", step);
                seen[e.index] = true;
                prop_assert!(ended[e.index].is_none(), "after the end of {}: {:?}", e.index, e);
                prop_assert!(e.logprob.is_finite() && e.logprob <= 0.0, "{:?}", e);
                streamed[e.index].push(e.token);
                ended[e.index] = e.finished;
            }
        }
        prop_assert_eq!(&streamed, &outcome.outputs);
        for (output, reason) in outcome.outputs.iter().zip(&ended) {
            prop_assert_eq!(*reason, Some(FinishReason::of(output, eos)));
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_sampling_stays_within_top_k(case in case()) {
        let outcome = generate(&case.model, &case.prompt, &case.params);
        // Sampling's top-k cut compares the logits divided by the temperature.
        let (k, temperature) = match case.params.strategy {
            Decoding::Greedy => (1, 1.0),
            Decoding::Sample(s) if s.top_k > 0 => (s.top_k, s.temperature),
            _ => return Ok(()),
        };
        for output in &outcome.outputs {
            let mut context = case.prompt.clone();
            for &token in output {
                let mut logits = Vec::new();
                case.model.logits(&context, &mut logits);
                if temperature != 1.0 {
                    logits.iter_mut().for_each(|l| *l /= temperature);
                }
                let mut sorted = logits.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let kth = sorted[k.min(sorted.len()) - 1];
                prop_assert!(logits[token as usize] >= kth, "{} below the top {}", token, k);
                if case.params.strategy == Decoding::Greedy {
                    // The first of the highest (torch's argmax); sampling with top_k = 1 keeps
                    // every token tied at the highest value.
                    prop_assert_eq!(logits.iter().position(|&l| l == kth), Some(token as usize));
                }
                context.push(token);
            }
        }
    }

    #[test]
    fn beam_search_never_repeats_an_ngram(
        // At least 20 tokens: more than max_length + 1, so that bans never exhaust them.
        case in case_with(beam(1usize..=3), 20),
    ) {
        let Decoding::Beam(beam) = case.params.strategy else { unreachable!() };
        let n = beam.no_repeat_ngram_size;
        assert!(!case.bans_can_exhaust_the_vocabulary());
        let outcome = generate(&case.model, &case.prompt, &case.params);
        for output in &outcome.outputs {
            let tokens = [case.prompt.as_slice(), output].concat();
            for end in case.prompt.len() + 1..=tokens.len() {
                if end >= n {
                    prop_assert!(
                        !repeats_earlier(&tokens, end, n),
                        "{}-gram {:?} repeated in {:?} (prompt {:?})",
                        n, &tokens[end - n..end], tokens, case.prompt
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_outputs(case in case()) {
        let first = generate(&case.model, &case.prompt, &case.params);
        let second = generate(&case.model, &case.prompt, &case.params);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn a_sampled_sequence_does_not_depend_on_the_other_sequences_of_its_request(
        case in case(),
        other_n in 1usize..=6,
    ) {
        // Sequence i draws from the stream of (seed, i) and sees the logits of its own context:
        // asking for more or fewer sequences changes none of the others.
        let Decoding::Sample(_) = case.params.strategy else { return Ok(()) };
        let alone = generate(&case.model, &case.prompt, &case.params);
        let other = GenerationParams { num_return_sequences: other_n, ..case.params.clone() };
        let with_others = generate(&case.model, &case.prompt, &other);
        let common = other_n.min(case.params.num_return_sequences);
        prop_assert_eq!(&alone.outputs[..common], &with_others.outputs[..common]);
    }

    #[test]
    fn beam_outputs_for_fewer_sequences_are_the_best_of_more(case in case_with(beam(0usize..=3), 8)) {
        let Decoding::Beam(beam) = case.params.strategy else { unreachable!() };
        let all = GenerationParams { num_return_sequences: beam.num_beams, ..case.params.clone() };
        let best = generate(&case.model, &case.prompt, &case.params);
        let every = generate(&case.model, &case.prompt, &all);
        prop_assert_eq!(&best.outputs[..], &every.outputs[..case.params.num_return_sequences]);
    }

    #[test]
    fn a_request_does_not_depend_on_the_requests_sharing_its_batches(
        a in case(),
        b in case(),
        b_first in any::<Vec<bool>>(),
    ) {
        // Both requests run on one model (a's), their rows concatenated into one batch per step,
        // in an order that changes from step to step, as the engine's worker batches them.
        let model = a.model;
        let b_prompt: Vec<u32> = b.prompt.iter().map(|&t| t % model.vocab as u32).collect();
        let b_params = GenerationParams { eos_token_id: model.eos, ..b.params.clone() };
        let alone_a = generate(&model, &a.prompt, &a.params);
        let alone_b = generate(&model, &b_prompt, &b_params);

        let mut runs = [
            Running::new(&a.prompt, &a.params, model.vocab),
            Running::new(&b_prompt, &b_params, model.vocab),
        ];
        let mut step = 0;
        while runs.iter().any(|r| !r.done) {
            let order = if b_first.get(step).copied().unwrap_or(false) { [1, 0] } else { [0, 1] };
            // One batch: the rows of every running request, in `order`.
            let mut batch_contexts = Vec::new();
            let mut spans = [(0, 0); 2];
            for &r in &order {
                let start = batch_contexts.len();
                batch_contexts.extend(runs[r].contexts.iter().cloned());
                spans[r] = (start, batch_contexts.len());
            }
            let logits = model.batch(&batch_contexts);
            for &r in &order {
                if runs[r].done {
                    continue;
                }
                let (start, end) = spans[r];
                runs[r].advance(&logits[start * model.vocab..end * model.vocab]);
            }
            step += 1;
            prop_assert!(step <= a.params.max_length + b_params.max_length);
        }
        let [run_a, run_b] = runs;
        prop_assert_eq!(run_a.finish(), alone_a);
        prop_assert_eq!(run_b.finish(), alone_b);
    }
}

/// Found by these properties: after the one-row prefill, when fewer than `num_beams` tokens of
/// that row can continue (a vocabulary smaller than `num_beams`, or the others banned by the
/// prompt's n-grams), beam search filled the missing beams from the placeholder beams 1.. (which
/// HF runs as rows of their own) and its `Step` named parent row 1 of a batch of one; the engine's
/// `KvCache::reorder` then refused it. Every first-step parent is now row 0.
#[test]
fn beam_search_first_step_continues_row_zero_even_when_few_tokens_are_allowed() {
    let beams = |no_repeat_ngram_size, eos_token_id| GenerationParams {
        strategy: Decoding::Beam(BeamParams {
            num_beams: 4,
            no_repeat_ngram_size,
        }),
        max_length: 7,
        num_return_sequences: 1,
        eos_token_id,
        seed: None,
        processing: Default::default(),
        top_logprobs: 0,
    };
    // 5 of 8 tokens banned by the prompt's unigrams: 3 left for 4 beams.
    let mut banned = Generator::new(&[0, 1, 2, 3, 4], beams(1, None), 8).unwrap();
    // A vocabulary of 3 tokens for 4 beams.
    let mut small = Generator::new(&[1], beams(0, None), 3).unwrap();
    let steps: Vec<_> = [(&mut banned, 8), (&mut small, 3)]
        .into_iter()
        .map(|(generator, vocab)| generator.advance(&vec![0.0; vocab]).unwrap().unwrap())
        .collect();
    for step in &steps {
        assert!(step.parent_rows.iter().all(|&row| row == 0), "{steps:?}");
    }
}
