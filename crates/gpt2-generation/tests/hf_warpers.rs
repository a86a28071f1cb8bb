//! The processed next-token distribution equals HF's warpers (temperature → top-k → top-p →
//! softmax) to 1e-6, on the rows and parameters of `fixtures/generation/warper_goldens.*`
//! (written by `tools/generation_goldens.py`); draws fit it; seeds behave.

use std::path::Path;

use gpt2_generation::{sequence_rng, Candidates, SamplingParams};
use safetensors::SafeTensors;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/generation")
        .join(name)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Goldens {
    vocab: usize,
    rows: Vec<Vec<f32>>,
    params: Vec<SamplingParams>,
    /// `probs[param][row]`, a full distribution over the vocabulary.
    probs: Vec<Vec<Vec<f32>>>,
}

fn goldens() -> Goldens {
    let bytes = std::fs::read(fixture("warper_goldens.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let logits = tensors.tensor("logits").unwrap();
    let (n_rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    let rows: Vec<Vec<f32>> = f32s(logits.data())
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("warper_goldens.json")).unwrap())
            .unwrap();
    let params: Vec<SamplingParams> = json["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| SamplingParams {
            temperature: p["temperature"].as_f64().unwrap() as f32,
            top_k: p["top_k"].as_u64().unwrap() as usize,
            top_p: p["top_p"].as_f64().unwrap() as f32,
        })
        .collect();
    let probs_flat = f32s(tensors.tensor("probs").unwrap().data());
    let probs = probs_flat
        .chunks(n_rows * vocab)
        .map(|per_param| per_param.chunks(vocab).map(<[f32]>::to_vec).collect())
        .collect();
    Goldens {
        vocab,
        rows,
        params,
        probs,
    }
}

/// The golden row whose logits are rounded to halves, so that many tokens tie.
const TIES_ROW: usize = 3;

fn distribution(candidates: &Candidates, vocab: usize) -> Vec<f64> {
    let mut full = vec![0.0; vocab];
    for (&(id, _), p) in candidates.tokens.iter().zip(candidates.probabilities()) {
        full[id as usize] = p;
    }
    full
}

#[test]
fn processed_distribution_equals_hf_warpers() {
    let g = goldens();
    assert!(g.params.len() >= 5 && g.rows.len() >= 3);
    let mut worst = 0.0f64;
    for (pi, params) in g.params.iter().enumerate() {
        for (ri, row) in g.rows.iter().enumerate() {
            let ours = distribution(&Candidates::from_logits(row, params), g.vocab);
            let hf = &g.probs[pi][ri];
            let kept_hf = hf.iter().filter(|&&p| p > 0.0).count();
            let kept_ours = ours.iter().filter(|&&p| p > 0.0).count();
            assert_eq!(kept_ours, kept_hf, "{params:?} row {ri}: kept set size");
            if ri == TIES_ROW {
                // Which of several exactly tied tokens top-p keeps at its boundary is decided by
                // torch's unstable sort, so compare (logit, probability) pairs of kept tokens.
                let kept = |probs: &dyn Fn(usize) -> f64| {
                    let mut pairs: Vec<(f32, f64)> = (0..g.vocab)
                        .filter(|&i| probs(i) > 0.0)
                        .map(|i| (row[i], probs(i)))
                        .collect();
                    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
                    pairs
                };
                let (ours_kept, hf_kept) = (kept(&|i| ours[i]), kept(&|i| f64::from(hf[i])));
                for ((lo, po), (lh, ph)) in ours_kept.iter().zip(&hf_kept) {
                    assert_eq!(lo, lh, "{params:?} ties row: kept logits differ");
                    assert!((po - ph).abs() <= 1e-6, "{params:?} ties row: {po} vs {ph}");
                    worst = worst.max((po - ph).abs());
                }
                continue;
            }
            for (id, (&o, &h)) in ours.iter().zip(hf).enumerate() {
                let diff = (o - f64::from(h)).abs();
                assert!(
                    diff <= 1e-6,
                    "{params:?} row {ri} token {id}: ours {o} HF {h}"
                );
                worst = worst.max(diff);
            }
        }
    }
    println!("max abs probability difference against HF warpers: {worst:e}");
}

/// Pearson's chi-square statistic of `draws` against `expected` probabilities, bins with an
/// expected count below 5 pooled together.
fn chi_square(counts: &[usize], expected: &[f64], n: usize) -> (f64, usize) {
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_exp > 0.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp.max(1e-9);
        bins += 1;
    }
    (stat, bins.saturating_sub(1))
}

#[test]
fn ten_thousand_draws_fit_the_distribution() {
    let g = goldens();
    // (1, 50, 0.92) on the first row and (0.7, 50, 0.92) on the flat row: dozens of tokens.
    for (pi, ri) in [(0usize, 0usize), (2, 1), (5, 0)] {
        let params = g.params[pi];
        let candidates = Candidates::from_logits(&g.rows[ri], &params);
        let mut rng = sequence_rng(2024, pi);
        let n = 10_000;
        let mut counts = vec![0usize; g.vocab];
        for _ in 0..n {
            counts[candidates.draw(&mut rng).unwrap() as usize] += 1;
        }
        let expected: Vec<f64> = g.probs[pi][ri].iter().map(|&p| f64::from(p)).collect();
        for (id, &c) in counts.iter().enumerate() {
            assert!(c == 0 || expected[id] > 0.0, "drew filtered token {id}");
        }
        let (stat, dof) = chi_square(&counts, &expected, n);
        // Critical value at p = 0.001: Wilson–Hilferty approximation of the chi-square quantile.
        let k = dof as f64;
        let z = 3.09;
        let critical = k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3);
        assert!(dof >= 5, "{params:?}: too few bins ({dof})");
        assert!(
            stat < critical,
            "{params:?}: chi-square {stat:.1} ≥ {critical:.1} with {dof} dof"
        );
    }
}

#[test]
fn same_seed_same_draws_different_seed_different_draws() {
    let g = goldens();
    let params = g.params[0];
    let candidates = Candidates::from_logits(&g.rows[1], &params);
    let draws = |seed: u64, index: usize| -> Vec<u32> {
        let mut rng = sequence_rng(seed, index);
        (0..64)
            .map(|_| candidates.draw(&mut rng).unwrap())
            .collect()
    };
    assert_eq!(draws(1, 0), draws(1, 0));
    assert_ne!(draws(1, 0), draws(2, 0));
    assert_ne!(
        draws(1, 0),
        draws(1, 1),
        "each returned sequence has its own stream"
    );
}
