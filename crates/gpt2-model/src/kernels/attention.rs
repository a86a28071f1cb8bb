//! Decode attention: one query of one head against that head's cached keys and values.
//!
//! `softmax(q · Kᵀ · scale) · V` for a single query row, the shape of every decode step (a prefill
//! goes through candle's batched matmuls instead). Keys and values are read in the cache's
//! element type, f32 or f16, and converted in registers.

use crate::cache::KvElement;
use crate::KvFormat;

use super::Isa;

/// Head sizes up to this many 16-float vectors keep the query and the output in registers.
#[cfg(target_arch = "x86_64")]
const MAX_VECTORS: usize = 8;

/// How many positions ahead of the one being scored its keys are prefetched into L1.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 8;

/// How many positions ahead of the one being scored its keys are prefetched into L2.
#[cfg(target_arch = "x86_64")]
const FAR_AHEAD: usize = 32;

/// Asks the first [`FAR_AHEAD`] positions of one head's `keys` and `values` (`d` per position)
/// into L2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_start<T: KvElement>(keys: &[T], values: &[T], d: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let bytes = std::mem::size_of_val(keys).min(FAR_AHEAD * d * std::mem::size_of::<T>());
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(keys.as_ptr().cast::<i8>().wrapping_add(line));
            _mm_prefetch::<_MM_HINT_T1>(values.as_ptr().cast::<i8>().wrapping_add(line));
        }
    }
}

/// Adds `softmax(q · keysᵀ · scale) · values` to `out`: `q` and `out` are one head
/// (`head_dim` floats), `keys` and `values` hold the same number of positions of `head_dim`.
pub(crate) fn attend<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scale: f32,
    out: &mut [f32],
) {
    attend_with(Isa::active(), q, keys, values, scale, out)
}

/// [`attend`] on the body compiled for `isa` (the portable one if the CPU lacks it).
///
/// Panics unless `out` is as long as `q`, and `keys` and `values` hold the same whole, non-zero
/// number of positions: what the SIMD body reads through raw pointers.
pub(crate) fn attend_with<T: KvElement>(
    isa: Isa,
    q: &[f32],
    keys: &[T],
    values: &[T],
    scale: f32,
    out: &mut [f32],
) {
    attend_runs_with(isa, q, &[(keys, values)], scale, out)
}

/// [`attend_with`] over positions held in several runs, `(keys, values)` each, in order: the
/// same bits as over one buffer holding them all.
///
/// Panics unless `out` is as long as `q`, each run's `keys` and `values` hold the same whole
/// number of positions, and the runs hold at least one in all.
fn attend_runs_with<T: KvElement>(
    isa: Isa,
    q: &[f32],
    runs: &[(&[T], &[T])],
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    assert!(
        d > 0
            && out.len() == d
            && runs.iter().any(|(keys, _)| !keys.is_empty())
            && runs
                .iter()
                .all(|(keys, values)| keys.len() == values.len() && keys.len().is_multiple_of(d)),
        "decode attention: head of {d}, runs of {:?} keys and {:?} values, output of {}",
        runs.iter().map(|(keys, _)| keys.len()).collect::<Vec<_>>(),
        runs.iter()
            .map(|(_, values)| values.len())
            .collect::<Vec<_>>(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx
            if isa.is_supported() && d.is_multiple_of(16) && d / 16 <= MAX_VECTORS =>
        {
            // SAFETY: the CPU has the features; the lengths were checked above.
            unsafe { attend_avx512(q, runs, scale, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Amx | Isa::Avx512 | Isa::Avx2 if Isa::Avx2.is_supported() => {
            // SAFETY: the CPU has the features this function is compiled for.
            unsafe { attend_avx2(q, runs, scale, out) }
        }
        _ => attend_portable(q, runs, scale, out),
    }
}

/// [`attend_sharing_with`] on the body compiled for the active [`Isa`].
pub(crate) fn attend_sharing<T: KvElement>(
    queries: &[&[f32]],
    histories: &[(&[T], &[T])],
    shared: usize,
    scale: f32,
    out: &mut [f32],
) {
    attend_sharing_with(Isa::active(), queries, histories, shared, scale, out)
}

/// One head of several rows, each row's keys and values in `histories` (the same number of
/// positions for all), whose first `shared` positions hold the same keys and values in every
/// row: the beams of a beam search after a fork, or the sequences that share a prompt. Adds row
/// `r`'s attention to `out[r·d..(r + 1)·d]`, with the bits [`attend_with`] gives that row alone.
///
/// Every row reads the shared positions from the first row's buffers, which the first row has
/// just brought into cache, and only its own positions from memory.
///
/// Panics unless there is one history per query, `out` holds a head per row, `shared` does not
/// pass the positions, and each history is as [`attend_with`] wants.
pub(crate) fn attend_sharing_with<T: KvElement>(
    isa: Isa,
    queries: &[&[f32]],
    histories: &[(&[T], &[T])],
    shared: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = queries.first().map_or(0, |q| q.len());
    let positions = histories
        .first()
        .map_or(0, |(keys, _)| keys.len() / d.max(1));
    assert!(
        histories.len() == queries.len()
            && out.len() == queries.len() * d
            && shared <= positions
            && histories.iter().all(|(keys, values)| {
                keys.len() == positions * d && values.len() == keys.len()
            }),
        "shared decode attention: {} queries of {d}, {} histories, output of {}, {shared} of \
         {positions} positions shared",
        queries.len(),
        histories.len(),
        out.len()
    );
    let Some(&(first_keys, first_values)) = histories.first() else {
        return;
    };
    let prefix = (&first_keys[..shared * d], &first_values[..shared * d]);
    for ((q, (keys, values)), out) in queries.iter().zip(histories).zip(out.chunks_mut(d)) {
        let own = (&keys[shared * d..], &values[shared * d..]);
        attend_runs_with(isa, q, &[prefix, own], scale, out);
    }
}

/// [`attend_portable`] with AVX-512 intrinsics for head sizes that are whole vectors (GPT-2's
/// 64): the query and the output stay in registers, and four keys are scored at a time so that
/// their dependent adds overlap. Fused multiply-adds make it differ from the portable path in the
/// last bits, the same for every row of a batch.
///
/// The positions come in runs (see [`attend_runs_with`]), each scored and weighted in turn.
///
/// # Safety
/// The CPU supports AVX-512 F; `q.len()` is a multiple of 16 of at most `16 · MAX_VECTORS`,
/// `out.len() == q.len()`, and each run's `keys` and `values` hold the same whole number of
/// positions, at least one in all.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElement>(
    q: &[f32],
    runs: &[(&[T], &[T])],
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let vectors = d / 16;
    let positions: usize = runs.iter().map(|(keys, _)| keys.len() / d).sum();
    let mut query = [_mm512_setzero_ps(); MAX_VECTORS];
    for (c, v) in query.iter_mut().take(vectors).enumerate() {
        // SAFETY: `c · 16 + 16 ≤ d = q.len()`.
        *v = unsafe { _mm512_loadu_ps(q.as_ptr().add(c * 16)) };
    }
    // Sixteen cached values from `at` as f32: a plain load, or a conversion from f16.
    let load = |from: &[T], at: usize| {
        debug_assert!(at + 16 <= from.len());
        let at = from.as_ptr().wrapping_add(at);
        // SAFETY: every caller reads 16 elements inside a position (`at + 16 ≤ len`), of the
        // type the format names.
        unsafe {
            match T::FORMAT {
                KvFormat::F32 => _mm512_loadu_ps(at.cast::<f32>()),
                KvFormat::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(at.cast::<__m256i>())),
            }
        }
    };
    // Fetches position `p`'s values (read after the softmax) and the keys `AHEAD` positions on
    // while the keys are scored: each (row, head) is a short stream of its own (14 KB of keys
    // at 55 positions), too short for the hardware prefetcher to ramp up. A 16-client step's
    // attention (`decode_attention_throughput`, 5 interleaved rounds, 2-vCPU EPYC) went from
    // 13.6–14.3 to 11.6–13.2 ms at 55 positions, 8.0–8.3 to 5.9–6.7 ms at 24; 4 or 16 positions
    // ahead were no better than 8. Huge pages under the test's buffers gained about 10% more,
    // but a request's per-layer buffers (0.9 MB for the default request) are smaller than one.
    //
    // On top of that, the first `FAR_AHEAD` positions' keys and values are asked into L2 at the
    // start, and the keys `FAR_AHEAD` on while scoring: more lines in flight from the first
    // position on. Same test, 3 interleaved rounds: 11.5–11.9 → 8.9–9.8 ms at 55 positions,
    // 6.2–6.8 → 4.9–6.1 at 24, 13.9–16.9 → 13.7–14.4 at 99 (asking for all the values at the
    // start did as well at 55 and worse at 99). With every (row, head) reading buffers that stay
    // in L2, the step took 3.4–3.7 ms at 55: the rest is still waiting on memory.
    //
    // Every run's start is asked for at once: a row that shares its first positions with others
    // reads them where another row has just brought them into cache, and only its own last
    // positions, a short run, from memory.
    let bytes = d * std::mem::size_of::<T>();
    let line_at = |from: &[T], offset: usize| from.as_ptr().cast::<i8>().wrapping_add(offset);
    for &(keys, values) in runs {
        prefetch_start(keys, values, d);
    }
    let mut scores = vec![0.0f32; positions];
    let mut first = 0;
    for &(keys, values) in runs {
        let count = keys.len() / d;
        let key = |p: usize, c: usize| load(keys, p * d + c * 16);
        let prefetch = |p: usize| {
            for line in (0..bytes).step_by(64) {
                // A prefetch never faults, whatever the address.
                _mm_prefetch::<_MM_HINT_T0>(line_at(values, p * bytes + line));
                if p + AHEAD < count {
                    _mm_prefetch::<_MM_HINT_T0>(line_at(keys, (p + AHEAD) * bytes + line));
                }
                if p + FAR_AHEAD < count {
                    _mm_prefetch::<_MM_HINT_T1>(line_at(keys, (p + FAR_AHEAD) * bytes + line));
                }
            }
        };
        let scores = &mut scores[first..first + count];
        first += count;
        let mut p = 0;
        while p + 4 <= count {
            for i in 0..4 {
                prefetch(p + i);
            }
            let mut acc = [_mm512_setzero_ps(); 4];
            for (c, q) in query.iter().take(vectors).enumerate() {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(*q, key(p + i, c), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                scores[p + i] = _mm512_reduce_add_ps(*acc) * scale;
            }
            p += 4;
        }
        for (p, score) in scores.iter_mut().enumerate().skip(p) {
            prefetch(p);
            let mut acc = _mm512_setzero_ps();
            for (c, q) in query.iter().take(vectors).enumerate() {
                acc = _mm512_fmadd_ps(*q, key(p, c), acc);
            }
            *score = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    let total = softmax_numerators(&mut scores);
    let mut acc = [_mm512_setzero_ps(); MAX_VECTORS];
    for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
        // SAFETY: `c · 16 + 16 ≤ d = out.len()`.
        *acc = unsafe { _mm512_loadu_ps(out.as_ptr().add(c * 16)) };
    }
    let mut scores = scores.iter();
    for &(_, values) in runs {
        for (p, score) in scores.by_ref().take(values.len() / d).enumerate() {
            let weight = _mm512_set1_ps(score / total);
            for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
                *acc = _mm512_fmadd_ps(weight, load(values, p * d + c * 16), *acc);
            }
        }
    }
    for (c, acc) in acc.iter().take(vectors).enumerate() {
        // SAFETY: `c · 16 + 16 ≤ d = out.len()`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *acc) };
    }
}

/// The portable body compiled for AVX2 (wider vectors, the same bits: no contraction to FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2<T: KvElement>(q: &[f32], runs: &[(&[T], &[T])], scale: f32, out: &mut [f32]) {
    attend_portable(q, runs, scale, out)
}

/// The reference body, in plain loops that LLVM vectorizes at the caller's target features.
#[inline(always)]
fn attend_portable<T: KvElement>(q: &[f32], runs: &[(&[T], &[T])], scale: f32, out: &mut [f32]) {
    let d = q.len();
    // Plain loops rather than iterator adapters: those are separate functions that LLVM may not
    // inline, and then they run without the caller's vector width.
    let mut scores = Vec::new();
    for &(keys, _) in runs {
        for key in keys.chunks_exact(d) {
            scores.push(dot(q, key) * scale);
        }
    }
    let total = softmax_numerators(&mut scores);
    let mut scores = scores.iter();
    for &(_, values) in runs {
        // Values first: `zip` pulls from its left side first, and a score pulled for an empty
        // run would be lost to the next one.
        for (value, score) in values.chunks_exact(d).zip(scores.by_ref()) {
            let weight = score / total;
            for (o, v) in out.iter_mut().zip(value) {
                *o += weight * v.to_f32();
            }
        }
    }
}

/// Replaces each score by `e^(score − max)` and returns their sum.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for score in scores.iter_mut() {
        *score = gpt2_simd::exp(*score - max);
        total += *score;
    }
    total
}

/// `x · y` over lane-wise partial sums, which LLVM vectorises without reassociating floats.
#[inline(always)]
fn dot<T: KvElement>(x: &[f32], y: &[T]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        tail += a * b.to_f32();
    }
    for (xs, ys) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += xs[l] * ys[l].to_f32();
        }
    }
    let mut sum = 0.0f32;
    for a in acc {
        sum += a;
    }
    sum + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;
    use half::f16;

    /// Softmax attention in f64 over f32 inputs.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], scale: f32) -> Vec<f32> {
        let d = q.len();
        let scores: Vec<f64> = keys
            .chunks(d)
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
            })
            .map(|s| s * f64::from(scale))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..d)
            .map(|i| {
                weights
                    .iter()
                    .zip(values.chunks(d))
                    .map(|(w, v)| w / total * f64::from(v[i]))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn every_instruction_set_matches_a_reference_for_every_head_size_and_cache_format() {
        let mut seed = 5u32;
        for (d, positions) in [
            (64, 1),
            (64, 7),
            (64, 100),
            (16, 9),
            (128, 33),
            (8, 5),
            (24, 6),
            (144, 3),
        ] {
            let q = values(&mut seed, d, 2.0);
            let keys = values(&mut seed, d * positions, 2.0);
            let vals = values(&mut seed, d * positions, 2.0);
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &keys, &vals, scale);
            // f16 caches: the same result up to the caches' rounding.
            let keys16: Vec<f16> = keys.iter().map(|&v| f16::from_f32(v)).collect();
            let vals16: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
            let rounded = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let want16 = reference(&q, &rounded(&keys16), &rounded(&vals16), scale);
            for isa in Isa::available() {
                let mut got = vec![0.0f32; d];
                attend_with(isa, &q, &keys, &vals, scale, &mut got);
                let mut got16 = vec![0.0f32; d];
                attend_with(isa, &q, &keys16, &vals16, scale, &mut got16);
                for i in 0..d {
                    assert!(
                        (got[i] - want[i]).abs() < 1e-5,
                        "{isa} f32 d={d} n={positions} [{i}]"
                    );
                    assert!(
                        (got16[i] - want16[i]).abs() < 1e-5,
                        "{isa} f16 d={d} n={positions} [{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_sharing_a_prefix_get_the_bits_of_each_row_alone() {
        let mut seed = 9u32;
        for (d, positions, rows, shared) in [
            (64, 1, 2, 0),
            (64, 9, 1, 0),
            (64, 9, 3, 5),
            (64, 55, 5, 40),
            (64, 55, 5, 54),
            (64, 100, 6, 0),
            (16, 12, 4, 7),
            (128, 33, 2, 32),
            (8, 5, 3, 2),
            (24, 6, 2, 3),
        ] {
            let prefix_keys = values(&mut seed, shared * d, 2.0);
            let prefix_vals = values(&mut seed, shared * d, 2.0);
            let queries: Vec<Vec<f32>> = (0..rows).map(|_| values(&mut seed, d, 2.0)).collect();
            let histories: Vec<(Vec<f32>, Vec<f32>)> = (0..rows)
                .map(|_| {
                    let own = (positions - shared) * d;
                    let keys = [prefix_keys.clone(), values(&mut seed, own, 2.0)].concat();
                    let vals = [prefix_vals.clone(), values(&mut seed, own, 2.0)].concat();
                    (keys, vals)
                })
                .collect();
            let halves: Vec<(Vec<f16>, Vec<f16>)> = histories
                .iter()
                .map(|(k, v)| {
                    let half = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect();
                    (half(k), half(v))
                })
                .collect();
            let queries: Vec<&[f32]> = queries.iter().map(|q| q.as_slice()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            for isa in Isa::available() {
                let check = |histories: &[(&[f32], &[f32])], halves: &[(&[f16], &[f16])]| {
                    let start: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.01).collect();
                    let (mut together, mut together16) = (start.clone(), start.clone());
                    attend_sharing_with(isa, &queries, histories, shared, scale, &mut together);
                    attend_sharing_with(isa, &queries, halves, shared, scale, &mut together16);
                    for r in 0..rows {
                        let mut alone = start[r * d..(r + 1) * d].to_vec();
                        let (keys, vals) = histories[r];
                        attend_with(isa, queries[r], keys, vals, scale, &mut alone);
                        let mut alone16 = start[r * d..(r + 1) * d].to_vec();
                        let (keys, vals) = halves[r];
                        attend_with(isa, queries[r], keys, vals, scale, &mut alone16);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        let what = format!("{isa} d={d} n={positions} rows={rows} shared={shared}");
                        assert_eq!(
                            bits(&together[r * d..][..d]),
                            bits(&alone),
                            "{what} f32 row {r}"
                        );
                        assert_eq!(
                            bits(&together16[r * d..][..d]),
                            bits(&alone16),
                            "{what} f16 row {r}"
                        );
                    }
                };
                let histories: Vec<(&[f32], &[f32])> = histories
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                let halves: Vec<(&[f16], &[f16])> = halves
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                check(&histories, &halves);
            }
        }
    }

    #[test]
    #[should_panic(expected = "shared decode attention")]
    fn a_shared_prefix_past_the_positions_is_refused() {
        let mut out = [0.0f32; 16];
        let keys = [0.0f32; 32];
        attend_sharing_with(
            Isa::detect(),
            &[&[0.0; 16]],
            &[(&keys, &keys)],
            3,
            1.0,
            &mut out,
        );
    }

    #[test]
    fn the_output_is_added_to_not_overwritten() {
        let (q, keys, vals) = ([1.0f32; 16], [0.5f32; 32], [2.0f32; 32]);
        for isa in Isa::available() {
            let mut out = [1.0f32; 16];
            attend_with(isa, &q, &keys, &vals, 0.25, &mut out);
            assert!(
                out.iter().all(|&o| (o - 3.0).abs() < 1e-6),
                "{isa}: {out:?}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "decode attention")]
    fn values_shorter_than_keys_are_refused() {
        let mut out = [0.0f32; 16];
        attend_with(
            Isa::detect(),
            &[0.0; 16],
            &[0.0f32; 32],
            &[0.0f32; 16],
            1.0,
            &mut out,
        );
    }

    /// A decode step's attention over 12 layers of 12 heads of 64, f32 caches of 100 positions
    /// holding 1 to 99, out of cache: 16 caches of 3 rows sharing a 5-position prompt (a
    /// 16-client server step, 195 MB of keys and values at 55 positions), and one cache of 5
    /// beams sharing all but their last 5 positions. Each run two ways: a task per (row, head)
    /// through [`attend`], and a task per (cache, head) through [`attend_sharing`] as
    /// `Attention::attend_rows` runs it. Prints each step's time and the bytes a task per row
    /// reads per second.
    ///
    /// `cargo test --release -p gpt2-model --lib decode_attention_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn decode_attention_throughput() {
        use rayon::prelude::*;
        let (heads, d, capacity, layers) = (12, 64, 100, 12);
        for (caches, per_cache, own) in [(16, 3, None), (1, 5, Some(5))] {
            let rows = caches * per_cache;
            let layer_len = rows * heads * capacity * d;
            let keys = values(&mut 3u32, layer_len * layers, 1.0);
            let vals = values(&mut 4u32, layer_len * layers, 1.0);
            let q = values(&mut 5u32, rows * 3 * heads * d, 1.0);
            let span = |layer: usize, b: usize, h: usize, positions: usize| {
                let base = layer * layer_len + (b * heads + h) * capacity * d;
                base..base + positions * d
            };
            for positions in [1usize, 8, 24, 55, 99] {
                // The prompt, or all but the beams' own last positions (the test only times
                // reads: the shared positions are not made equal).
                let shared = own
                    .map_or(5, |own| positions.saturating_sub(own))
                    .min(positions - 1);
                let mut times = [Vec::new(), Vec::new()];
                for _ in 0..9 {
                    for (way, times) in times.iter_mut().enumerate() {
                        let t = std::time::Instant::now();
                        for layer in 0..layers {
                            let mut out = vec![0.0f32; rows * heads * d];
                            if way == 0 {
                                out.par_chunks_mut(d).with_min_len(4).enumerate().for_each(
                                    |(task, head_out)| {
                                        let (b, h) = (task / heads, task % heads);
                                        let q = &q[b * 3 * heads * d + h * d..][..d];
                                        let at = span(layer, b, h, positions);
                                        attend(q, &keys[at.clone()], &vals[at], 0.125, head_out);
                                    },
                                );
                            } else {
                                let parts: Vec<Vec<f32>> = (0..caches * heads)
                                    .into_par_iter()
                                    .map(|task| {
                                        let (c, h) = (task / heads, task % heads);
                                        let rows = c * per_cache..(c + 1) * per_cache;
                                        let queries: Vec<&[f32]> = rows
                                            .clone()
                                            .map(|b| &q[b * 3 * heads * d + h * d..][..d])
                                            .collect();
                                        let histories: Vec<(&[f32], &[f32])> = rows
                                            .map(|b| {
                                                let at = span(layer, b, h, positions);
                                                (&keys[at.clone()], &vals[at])
                                            })
                                            .collect();
                                        let mut part = vec![0.0f32; per_cache * d];
                                        attend_sharing(
                                            &queries, &histories, shared, 0.125, &mut part,
                                        );
                                        part
                                    })
                                    .collect();
                                std::hint::black_box(parts);
                            }
                            std::hint::black_box(out);
                        }
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                let [per_row, per_cache_head] = times.map(|mut times| {
                    times.sort_by(f64::total_cmp);
                    times[times.len() / 2]
                });
                let bytes = 2 * rows * heads * layers * positions * d * 4;
                println!(
                    "{caches} × {per_cache} rows, {positions} positions ({shared} shared): \
                     {:.2} ms per step by row ({:.1} GB/s of {:.1} MB), {:.2} ms by cache",
                    per_row * 1e3,
                    bytes as f64 / per_row / 1e9,
                    bytes as f64 / 1e6,
                    per_cache_head * 1e3,
                );
            }
        }
    }
}
