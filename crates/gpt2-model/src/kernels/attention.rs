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
    let d = q.len();
    assert!(
        d > 0
            && out.len() == d
            && keys.len() == values.len()
            && !keys.is_empty()
            && keys.len().is_multiple_of(d),
        "decode attention: head of {d}, {} keys, {} values, output of {}",
        keys.len(),
        values.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.is_supported() && d.is_multiple_of(16) && d / 16 <= MAX_VECTORS => {
            // SAFETY: the CPU has the features; the lengths were checked above.
            unsafe { attend_avx512(q, keys, values, scale, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if Isa::Avx2.is_supported() => {
            // SAFETY: the CPU has the features this function is compiled for.
            unsafe { attend_avx2(q, keys, values, scale, out) }
        }
        _ => attend_portable(q, keys, values, scale, out),
    }
}

/// [`attend_portable`] with AVX-512 intrinsics for head sizes that are whole vectors (GPT-2's
/// 64): the query and the output stay in registers, and four keys are scored at a time so that
/// their dependent adds overlap. Fused multiply-adds make it differ from the portable path in the
/// last bits, the same for every row of a batch.
///
/// # Safety
/// The CPU supports AVX-512 F; `q.len()` is a multiple of 16 of at most `16 · MAX_VECTORS`,
/// `out.len() == q.len()`, and `keys` and `values` hold the same whole number of positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let vectors = d / 16;
    let positions = keys.len() / d;
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
    let key = |p: usize, c: usize| load(keys, p * d + c * 16);
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
    let bytes = d * std::mem::size_of::<T>();
    let line_at = |from: &[T], offset: usize| from.as_ptr().cast::<i8>().wrapping_add(offset);
    for line in (0..positions.min(FAR_AHEAD) * bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(line_at(keys, line));
        _mm_prefetch::<_MM_HINT_T1>(line_at(values, line));
    }
    let prefetch = |p: usize| {
        for line in (0..bytes).step_by(64) {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(line_at(values, p * bytes + line));
            if p + AHEAD < positions {
                _mm_prefetch::<_MM_HINT_T0>(line_at(keys, (p + AHEAD) * bytes + line));
            }
            if p + FAR_AHEAD < positions {
                _mm_prefetch::<_MM_HINT_T1>(line_at(keys, (p + FAR_AHEAD) * bytes + line));
            }
        }
    };
    let mut scores = vec![0.0f32; positions];
    let mut p = 0;
    while p + 4 <= positions {
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
    let total = softmax_numerators(&mut scores);
    let mut acc = [_mm512_setzero_ps(); MAX_VECTORS];
    for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
        // SAFETY: `c · 16 + 16 ≤ d = out.len()`.
        *acc = unsafe { _mm512_loadu_ps(out.as_ptr().add(c * 16)) };
    }
    for (p, score) in scores.iter().enumerate() {
        let weight = _mm512_set1_ps(score / total);
        for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
            *acc = _mm512_fmadd_ps(weight, load(values, p * d + c * 16), *acc);
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
fn attend_avx2<T: KvElement>(q: &[f32], keys: &[T], values: &[T], scale: f32, out: &mut [f32]) {
    attend_portable(q, keys, values, scale, out)
}

/// The reference body, in plain loops that LLVM vectorizes at the caller's target features.
#[inline(always)]
fn attend_portable<T: KvElement>(q: &[f32], keys: &[T], values: &[T], scale: f32, out: &mut [f32]) {
    let d = q.len();
    // Plain loops rather than iterator adapters: those are separate functions that LLVM may not
    // inline, and then they run without the caller's vector width.
    let mut scores = vec![0.0f32; keys.len() / d];
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *score = dot(q, key) * scale;
    }
    let total = softmax_numerators(&mut scores);
    for (score, value) in scores.iter().zip(values.chunks_exact(d)) {
        let weight = score / total;
        for (o, v) in out.iter_mut().zip(value) {
            *o += weight * v.to_f32();
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

    /// A 16-client decode step's attention, as `Attention::attend_rows` runs it: 48 rows × 12
    /// heads of 64 over 12 layers, each (row, head) reading its own f32 cache of 1 to 99
    /// positions out of 100 (195 MB per step at 55, out of cache). Prints the step's time and
    /// the bytes read per second.
    ///
    /// `cargo test --release -p gpt2-model --lib decode_attention_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn decode_attention_throughput() {
        use rayon::prelude::*;
        let (rows, heads, d, capacity, layers) = (48, 12, 64, 100, 12);
        let layer_len = rows * heads * capacity * d;
        let keys = values(&mut 3u32, layer_len * layers, 1.0);
        let vals = values(&mut 4u32, layer_len * layers, 1.0);
        let q = values(&mut 5u32, rows * 3 * heads * d, 1.0);
        for positions in [1, 8, 24, 55, 99] {
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for layer in 0..layers {
                    let mut out = vec![0.0f32; rows * heads * d];
                    out.par_chunks_mut(d).with_min_len(4).enumerate().for_each(
                        |(task, head_out)| {
                            let (b, h) = (task / heads, task % heads);
                            let q = &q[b * 3 * heads * d + h * d..][..d];
                            let base = layer * layer_len + (b * heads + h) * capacity * d;
                            let span = base..base + positions * d;
                            attend(q, &keys[span.clone()], &vals[span], 0.125, head_out);
                        },
                    );
                    std::hint::black_box(out);
                }
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let bytes = 2 * rows * heads * layers * positions * d * 4;
            println!(
                "{positions} positions: {:.2} ms per step, {:.1} MB, {:.1} GB/s",
                median * 1e3,
                bytes as f64 / 1e6,
                bytes as f64 / median / 1e9
            );
        }
    }
}
