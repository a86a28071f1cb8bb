//! A decode step and prefill chunks run in one pass (`Gpt2Model::forward_mixed`) give exactly
//! the bits of the separate calls, in every weight and KV storage format.

use candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, KvCache, LogitsFor, PromptChunk, WeightFormat};

mod support;

use support::{demo_in_every_storage, prefilled};

/// One chunk per `(past, tokens, logits)` of `plan`, each continuing its cache in `caches`.
fn prompt_chunks<'a>(
    plan: &'a [(Vec<u32>, Tensor, LogitsFor)],
    caches: &'a mut [KvCache],
) -> Vec<PromptChunk<'a>> {
    plan.iter()
        .zip(caches.iter_mut())
        .map(|((_, tokens, logits_for), cache)| PromptChunk {
            tokens,
            cache,
            logits_for: *logits_for,
        })
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_mixed_pass_gives_the_bits_of_separate_calls() {
    for (storage, model) in demo_in_every_storage() {
        let tokens = [7u32, 8, 9, 10];
        for (chunk, logits_for) in [
            (vec![5u32, 17, 300, 2, 9, 1000, 44], LogitsFor::Last),
            (vec![5u32, 17, 300, 2, 9, 1000, 44], LogitsFor::All),
            (vec![5u32, 17, 300, 2, 9, 1000, 44], LogitsFor::None),
            (vec![3u32], LogitsFor::Last),
        ] {
            let chunk = Tensor::new(chunk.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let label = format!("{storage}, {chunk:?}, {logits_for:?}");
            // Separately: the step over two caches (1 and 3 rows), then the chunk continuing
            // a third cache; then one more step over all three.
            let (mut a, mut b) = (
                prefilled(&model, &[1, 2, 3], 1),
                prefilled(&model, &[4, 5], 3),
            );
            let mut c = prefilled(&model, &[6, 6, 6, 6], 1);
            let step = model.forward_step(&tokens, &mut [&mut a, &mut b]).unwrap();
            let chunk_logits = model.forward(&chunk, &mut c, logits_for).unwrap();
            let then = model.forward_step(&[1, 2, 3, 4, 5], &mut [&mut a, &mut b, &mut c]);
            // Together.
            let (mut a2, mut b2) = (
                prefilled(&model, &[1, 2, 3], 1),
                prefilled(&model, &[4, 5], 3),
            );
            let mut c2 = prefilled(&model, &[6, 6, 6, 6], 1);
            let (step2, chunk_logits2) = model
                .forward_mixed(
                    (&tokens, &mut [&mut a2, &mut b2]),
                    &mut [PromptChunk {
                        tokens: &chunk,
                        cache: &mut c2,
                        logits_for,
                    }],
                )
                .unwrap();
            assert_eq!(chunk_logits2.len(), 1, "{label}");
            let chunk_logits2 = &chunk_logits2[0];
            let then2 = model.forward_step(&[1, 2, 3, 4, 5], &mut [&mut a2, &mut b2, &mut c2]);
            assert!(step == step2, "{label}: step logits differ");
            assert_eq!(chunk_logits.dims(), chunk_logits2.dims(), "{label}");
            assert!(
                values(&chunk_logits) == values(chunk_logits2),
                "{label}: chunk logits differ"
            );
            // The caches the two passes left behind decode alike.
            assert!(
                then.unwrap() == then2.unwrap(),
                "{label}: the caches differ"
            );
            assert_eq!(c2.seq_len(), c.seq_len(), "{label}");
        }
    }
}

#[test]
fn several_chunks_beside_a_step_give_the_bits_of_separate_calls() {
    for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Bf16] {
        let model = Gpt2Model::demo().with_weight_format(format).unwrap();
        let chunk = |ids: &[u32]| {
            Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        };
        // A new prompt (its last chunk), a long prompt's middle chunk, a fresh prompt scored at
        // every position, and a one-token last chunk: logits for 1, 0, all and 1 positions.
        let plan = [
            (vec![], chunk(&[11, 12, 13]), LogitsFor::Last),
            (
                vec![6u32, 6, 6],
                chunk(&[1, 2, 3, 4, 5, 6, 7, 8]),
                LogitsFor::None,
            ),
            (vec![], chunk(&[40, 41]), LogitsFor::All),
            (vec![9u32, 10], chunk(&[99]), LogitsFor::Last),
        ];
        let start = |past: &Vec<u32>| {
            if past.is_empty() {
                model.new_cache_with_capacity(64)
            } else {
                prefilled(&model, past, 1)
            }
        };
        let tokens = [7u32, 8, 9, 10];
        let mut a = prefilled(&model, &[1, 2, 3], 1);
        let mut b = prefilled(&model, &[4, 5], 3);
        let step = model.forward_step(&tokens, &mut [&mut a, &mut b]).unwrap();
        let mut alone_caches: Vec<KvCache> = plan.iter().map(|(past, _, _)| start(past)).collect();
        let alone: Vec<Tensor> = plan
            .iter()
            .zip(alone_caches.iter_mut())
            .map(|((_, ids, which), cache)| model.forward(ids, cache, *which).unwrap())
            .collect();

        let mut a2 = prefilled(&model, &[1, 2, 3], 1);
        let mut b2 = prefilled(&model, &[4, 5], 3);
        let mut caches: Vec<KvCache> = plan.iter().map(|(past, _, _)| start(past)).collect();
        let mut chunks = prompt_chunks(&plan, &mut caches);
        let (step2, together) = model
            .forward_mixed((&tokens, &mut [&mut a2, &mut b2]), &mut chunks)
            .unwrap();
        drop(chunks);
        assert!(step == step2, "{format:?}: step logits differ");
        assert_eq!(together.len(), alone.len(), "{format:?}");
        for (i, (x, y)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(x.dims(), y.dims(), "{format:?}: chunk {i}");
            assert!(
                values(x) == values(y),
                "{format:?}: chunk {i} logits differ"
            );
        }
        // The caches continue alike.
        let next = |caches: &mut Vec<KvCache>| {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            model.forward_step(&[1, 2, 3, 4], &mut refs).unwrap()
        };
        assert!(
            next(&mut alone_caches) == next(&mut caches),
            "{format:?}: the caches differ"
        );

        // The same chunks with no decode step: a pass of prompts on their own.
        let mut alone_caches: Vec<KvCache> = plan.iter().map(|(past, _, _)| start(past)).collect();
        for ((_, ids, which), cache) in plan.iter().zip(alone_caches.iter_mut()) {
            model.forward(ids, cache, *which).unwrap();
        }
        let mut caches: Vec<KvCache> = plan.iter().map(|(past, _, _)| start(past)).collect();
        let mut chunks = prompt_chunks(&plan, &mut caches);
        let (none, on_their_own) = model.forward_mixed((&[], &mut []), &mut chunks).unwrap();
        drop(chunks);
        assert!(none.is_empty(), "{format:?}");
        for (i, (x, y)) in alone.iter().zip(&on_their_own).enumerate() {
            assert!(
                values(x) == values(y),
                "{format:?}: chunk {i} on its own differs"
            );
        }
        assert!(
            next(&mut alone_caches) == next(&mut caches),
            "{format:?}: the caches differ after a pass of chunks alone"
        );
    }
}

#[test]
fn a_mixed_pass_checks_both_inputs() {
    let model = Gpt2Model::demo();
    let mut a = prefilled(&model, &[1, 2, 3], 1);
    let mut c = prefilled(&model, &[6], 1);
    let mut d = prefilled(&model, &[6], 1);
    let chunk = Tensor::new(&[[5u32, 17]], &Device::Cpu).unwrap();
    fn one<'a>(tokens: &'a Tensor, cache: &'a mut KvCache) -> PromptChunk<'a> {
        PromptChunk {
            tokens,
            cache,
            logits_for: LogitsFor::Last,
        }
    }
    let wrong_rows = model.forward_mixed((&[1, 2], &mut [&mut a]), &mut [one(&chunk, &mut c)]);
    assert!(wrong_rows.is_err_and(|e| e.to_string().contains("2 tokens for 1 cached sequences")));
    let bad = Tensor::new(&[[5u32, 1_000_000]], &Device::Cpu).unwrap();
    // The second chunk is bad: nothing moves, the first chunk's cache included.
    let outside = model.forward_mixed(
        (&[1], &mut [&mut a]),
        &mut [one(&chunk, &mut d), one(&bad, &mut c)],
    );
    assert!(outside.is_err_and(|e| e.to_string().contains("outside the vocabulary")));
    let mut two = prefilled(&model, &[6], 2);
    let batch = Tensor::new(&[[5u32], [6]], &Device::Cpu).unwrap();
    let batched = model.forward_mixed((&[1], &mut [&mut a]), &mut [one(&batch, &mut two)]);
    assert!(batched.is_err_and(|e| e.to_string().contains("one sequence")));
    // An empty step needs chunks, and tokens need their caches.
    let nothing = model.forward_mixed((&[], &mut []), &mut []);
    assert!(nothing.is_err_and(|e| e.to_string().contains("0 tokens for 0 cached sequences")));
    let no_cache = model.forward_mixed((&[1], &mut []), &mut [one(&chunk, &mut c)]);
    assert!(no_cache.is_err_and(|e| e.to_string().contains("1 tokens for 0 cached sequences")));
    // No cache moved.
    assert_eq!(
        (a.seq_len(), c.seq_len(), d.seq_len(), two.seq_len()),
        (3, 1, 1, 1)
    );
}
