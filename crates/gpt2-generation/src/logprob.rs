//! Log-probabilities under the model's distribution: `log_softmax` of the raw logits, with the
//! normaliser summed in f64 over vectorized f32 exponentials (libm's scalar f64 `exp` cost 2–3 ms
//! of a 5-beam step).

use gpt2_simd::{exp, Isa};

/// `(max, ln Σ e^(l − max))` of the non-NaN logits; `None` when none is finite.
pub(crate) fn log_normaliser(logits: &[f32]) -> Option<(f32, f64)> {
    log_normaliser_with(Isa::active(), logits)
}

/// [`log_normaliser`] with the body compiled for `isa` (every level gives the same values).
pub(crate) fn log_normaliser_with(isa: Isa, logits: &[f32]) -> Option<(f32, f64)> {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe { log_normaliser_avx512(logits) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe { log_normaliser_avx2(logits) },
        _ => log_normaliser_body(logits),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn log_normaliser_avx512(logits: &[f32]) -> Option<(f32, f64)> {
    log_normaliser_body(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn log_normaliser_avx2(logits: &[f32]) -> Option<(f32, f64)> {
    log_normaliser_body(logits)
}

#[inline(always)]
fn log_normaliser_body(logits: &[f32]) -> Option<(f32, f64)> {
    const LANES: usize = 16;
    // Lane-wise maxima (`max` ignores NaN), so that the pass vectorizes: one `max` after
    // another over the row ran one logit at a time, ~40% of this function. The maximum is exact
    // whatever the order (up to the sign of a zero maximum, which changes no `l − max`).
    let max = crate::sampling::row_max(logits);
    if max == f32::NEG_INFINITY || max.is_infinite() {
        return None;
    }
    let chunks = logits.chunks_exact(LANES);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&l| f64::from(exp(l - max)))
        .sum();
    let mut partial = [0.0f64; LANES];
    for chunk in chunks {
        for (sum, &l) in partial.iter_mut().zip(chunk) {
            *sum += f64::from(exp(l - max));
        }
    }
    Some((max, (partial.iter().sum::<f64>() + tail).ln()))
}

/// The natural log of `token`'s probability under the model's distribution (the softmax of the
/// raw `logits`, before any temperature or truncation): what streamed tokens report.
/// `−∞` for a token with no probability or outside `logits`.
///
/// Computed for every generated token, so the normaliser is summed in f32 lanes (half the work
/// of the f64 sums beam search needs for HF parity: it was ~3% of a q8_0 step in f64); the result
/// is within ~1e-6 of the f64 computation.
pub fn token_logprob(logits: &[f32], token: u32) -> f32 {
    token_logprob_with(Isa::active(), logits, token)
}

fn token_logprob_with(isa: Isa, logits: &[f32], token: u32) -> f32 {
    let Some(&logit) = logits.get(token as usize) else {
        return f32::NEG_INFINITY;
    };
    match log_normaliser_f32(isa, logits) {
        Some((max, log_sum)) if !logit.is_nan() => logit - max - log_sum,
        _ => f32::NEG_INFINITY,
    }
}

/// The `n` most likely tokens under the model's distribution with their log-probabilities
/// (computed as [`token_logprob`] computes them), most likely first; ties go to the lower id.
/// Empty when no logit is finite.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let Some((max, log_sum)) = log_normaliser_f32(Isa::active(), logits) else {
        return Vec::new();
    };
    crate::beam::top_indices(logits, n)
        .into_iter()
        .filter(|&i| logits[i] != f32::NEG_INFINITY && !logits[i].is_nan())
        .map(|i| (i as u32, logits[i] - max - log_sum))
        .collect()
}

/// `(max, ln Σ e^(l − max))` in f32 lanes, with the body compiled for `isa`.
fn log_normaliser_f32(isa: Isa, logits: &[f32]) -> Option<(f32, f32)> {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe {
            log_normaliser_f32_avx512(logits)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe { log_normaliser_f32_avx2(logits) },
        _ => log_normaliser_f32_body(logits),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn log_normaliser_f32_avx512(logits: &[f32]) -> Option<(f32, f32)> {
    log_normaliser_f32_body(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn log_normaliser_f32_avx2(logits: &[f32]) -> Option<(f32, f32)> {
    log_normaliser_f32_body(logits)
}

/// `(max, ln Σ e^(l − max))` in f32 lanes; `None` when no logit is finite.
#[inline(always)]
fn log_normaliser_f32_body(logits: &[f32]) -> Option<(f32, f32)> {
    const LANES: usize = 16;
    let chunks = logits.chunks_exact(LANES);
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for chunk in chunks.clone() {
        for (m, &l) in lane_max.iter_mut().zip(chunk) {
            // `max` ignores NaN, as the f64 path's filter does.
            *m = m.max(l);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lane_max)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    if max.is_infinite() || max.is_nan() {
        return None;
    }
    let mut partial = [0.0f32; LANES];
    for chunk in chunks.clone() {
        for (sum, &l) in partial.iter_mut().zip(chunk) {
            *sum += exp(l - max);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&l| exp(l - max)).sum();
    Some((max, (partial.iter().sum::<f32>() + tail).ln()))
}

/// `log_softmax(logits)` in f32, within an ulp of the f64 computation.
#[cfg(test)]
pub(crate) fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    log_softmax_into(logits, &mut out);
    out
}

/// `log_softmax(logits)` into `out` (replacing what it held), within an ulp of the f64
/// computation.
pub(crate) fn log_softmax_into(logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    match log_normaliser(logits) {
        None => out.resize(logits.len(), f32::NEG_INFINITY),
        Some((max, log_sum)) => {
            let max = f64::from(max);
            out.extend(
                logits
                    .iter()
                    .map(|&l| (f64::from(l) - max - log_sum) as f32),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        let mut seed = 11u32;
        (0..50_257)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 60.0
            })
            .chain([f32::NEG_INFINITY, -1e30])
            .collect()
    }

    fn f64_log_softmax(logits: &[f32]) -> Vec<f32> {
        let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let log_sum = logits
            .iter()
            .map(|&l| (f64::from(l) - max).exp())
            .sum::<f64>()
            .ln();
        logits
            .iter()
            .map(|&l| (f64::from(l) - max - log_sum) as f32)
            .collect()
    }

    #[test]
    fn log_softmax_is_within_an_ulp_of_the_f64_computation_on_every_instruction_set() {
        let logits = logits();
        let want = f64_log_softmax(&logits);
        for isa in Isa::available() {
            let (max, log_sum) = log_normaliser_with(isa, &logits).unwrap();
            for (&l, &want) in logits.iter().zip(&want) {
                let got = (f64::from(l) - f64::from(max) - log_sum) as f32;
                let ulp = (want.abs() * f32::EPSILON).max(f32::MIN_POSITIVE);
                assert!(
                    (got - want).abs() <= ulp || got == want,
                    "{isa}: {got} vs {want}"
                );
            }
        }
        assert_eq!(log_softmax(&logits), {
            let (max, log_sum) = log_normaliser(&logits).unwrap();
            logits
                .iter()
                .map(|&l| (f64::from(l) - f64::from(max) - log_sum) as f32)
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn token_logprob_is_within_a_millionth_of_the_f64_computation_on_every_instruction_set() {
        let logits = logits();
        let want = f64_log_softmax(&logits);
        for isa in Isa::available() {
            for token in (0..logits.len() as u32)
                .step_by(997)
                .chain([50_257, 50_258])
            {
                let got = token_logprob_with(isa, &logits, token);
                let want = want[token as usize];
                let close = (got - want).abs() <= 1e-6 * want.abs().max(1.0);
                assert!(close || got == want, "{isa} [{token}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_with_token_logprob_values() {
        let logits = [1.0, 3.0, f32::NEG_INFINITY, 3.0, 2.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 3, 4],
            "ties go to the lower id"
        );
        for (token, logprob) in &top {
            assert_eq!(*logprob, token_logprob(&logits, *token));
        }
        assert_eq!(top_logprobs(&logits, 9).len(), 4, "−∞ is never listed");
        assert!(top_logprobs(&logits, 0).is_empty());
        assert!(top_logprobs(&[f32::NEG_INFINITY; 3], 2).is_empty());
    }

    #[test]
    fn token_logprob_is_the_log_softmax_entry_and_handles_degenerate_rows() {
        let logits = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        let all = f64_log_softmax(&logits);
        for token in 0..3 {
            assert!((token_logprob(&logits, token) - all[token as usize]).abs() < 1e-6);
        }
        assert_eq!(token_logprob(&logits, 3), f32::NEG_INFINITY);
        assert_eq!(token_logprob(&logits, 9), f32::NEG_INFINITY);
        assert_eq!(token_logprob(&[f32::NEG_INFINITY; 3], 0), f32::NEG_INFINITY);
        assert_eq!(token_logprob(&[f32::NAN, 0.0], 0), f32::NEG_INFINITY);
        let certain = token_logprob(&[0.0, -200.0], 0);
        assert!(certain <= 0.0 && certain > -1e-6, "{certain}");
    }
}
