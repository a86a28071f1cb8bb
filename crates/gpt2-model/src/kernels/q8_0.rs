//! 8-bit weights for the decode step: ggml's q8_0 scheme. Weights are int8 in blocks of 32 along
//! the input dimension, each block sharing an f16 scale; activations are quantized the same way
//! (per row, blocks of 32, f32 scale) just before each matmul, so that the dot products run in
//! integer arithmetic: exact 32-bit sums per block, then one float multiply-add per block.
//!
//! The weights are repacked at load time for AVX-512 VNNI: one 64-byte vector holds 4 consecutive
//! input values of 16 consecutive outputs, so `vpdpbusd` advances 16 outputs by 4 inputs in one
//! instruction and each weight byte is read once per step for all activation rows. The portable
//! path walks the same layout with the same operation order, so both give identical bits. CPUs
//! without VNNI (AVX2 servers before AVX-512, Skylake-X's AVX-512 without VNNI) run an AVX2 body
//! on the same layout: `vpmaddubsw` and `vpmaddwd` give the same exact int32 sums per 4 inputs,
//! then the same float operations, so it gives identical bits too.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::write_lanes;
use super::{by_column_ranges, Epilogue, HeldWeight, Isa};

/// Values per block sharing one scale.
pub(crate) const BLOCK: usize = 32;
/// Outputs interleaved in one vector (its 32-bit lanes).
const LANES: usize = 16;
/// Inputs per lane per `vpdpbusd`.
const QUAD: usize = 4;
/// Offset making the int8 weights unsigned, as `vpdpbusd` wants one unsigned operand.
const OFFSET: i32 = 128;

/// A weight matrix `(n, k)` in q8_0, repacked for the integer kernels.
#[derive(Debug, Clone)]
pub(crate) struct Q8Matrix {
    n: usize,
    k: usize,
    /// `(n/16 rounded up, k/4, 16, 4)`: `weight + 128`; padded outputs are zero weights.
    quants: Vec<u8>,
    /// `(n/16 rounded up, k/32, 16)`: each block's scale, f16.
    scales: Vec<half::f16>,
}

impl Q8Matrix {
    /// Quantizes `(n, k)` f32 rows; `k` must be a multiple of [`BLOCK`].
    pub(crate) fn quantize(weights: &[f32], n: usize, k: usize) -> Self {
        Self::quantize_with(Isa::active(), weights, n, k)
    }

    /// [`Self::quantize`] with the rounding compiled for `isa` (every level gives the same bits).
    pub(crate) fn quantize_with(isa: Isa, weights: &[f32], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && weights.len() == n * k);
        let groups = n.div_ceil(LANES);
        let blocks = k / BLOCK;
        let mut quants = vec![OFFSET as u8; groups * k * LANES];
        let mut scales = vec![half::f16::ZERO; groups * blocks * LANES];
        quants
            .par_chunks_mut(k * LANES)
            .zip(scales.par_chunks_mut(blocks * LANES))
            .enumerate()
            .for_each(|(group, (quants, scales))| {
                quantize_group(isa, weights, n, k, group, quants, scales)
            });
        Self {
            n,
            k,
            quants,
            scales,
        }
    }

    /// The weight a `(j, i)` entry stands for.
    fn weight(&self, j: usize, i: usize) -> f32 {
        let (group, lane) = (j / LANES, j % LANES);
        let q = self.quants[((group * self.k / QUAD + i / QUAD) * LANES + lane) * QUAD + i % QUAD];
        let scale = self.scales[(group * self.k / BLOCK + i / BLOCK) * LANES + lane];
        (i32::from(q) - OFFSET) as f32 * scale.to_f32()
    }

    /// Back to f32, `(n, k)`.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        (0..self.n)
            .flat_map(|j| (0..self.k).map(move |i| (j, i)))
            .map(|(j, i)| self.weight(j, i))
            .collect()
    }

    /// `(n, k)`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `(rows, k)` activations times this matrix transposed, plus `bias`: `(rows, n)`. The
    /// activations are quantized to q8_0 first.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        self.matmul_with(Isa::active(), x, rows, bias)
    }

    /// [`Self::matmul`] on the kernels compiled for `isa` (every level gives the same bits).
    #[cfg(test)]
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        self.matmul_body(isa, Body::best(isa), x, rows, bias, Epilogue::Plain)
    }

    /// [`Self::matmul`] with the activations quantized for `isa` and the integer body `body`.
    fn matmul_body(
        &self,
        isa: Isa,
        body: Body,
        x: &[f32],
        rows: usize,
        bias: &[f32],
        epilogue: Epilogue,
    ) -> Vec<f32> {
        assert!(
            x.len() == rows * self.k && bias.len() == self.n,
            "q8_0 matmul: {} inputs for {rows} rows of {}, {} biases for {} outputs",
            x.len(),
            self.k,
            bias.len(),
            self.n
        );
        let activations = QuantizedRows::new(isa, x, rows, self.k);
        by_column_ranges(rows, self.n, |start, end, tile, width| {
            tile_with(
                body,
                self,
                &activations,
                start,
                end,
                &bias[start..end],
                tile,
                width,
            );
            epilogue.apply(tile);
        })
    }
}

/// The integer matmul bodies; [`Body::best`] picks one for an [`Isa`] and the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Portable,
    /// `vpmaddubsw` and `vpmaddwd`, two 8-lane halves per 16 outputs.
    Avx2,
    /// `vpdpbusd` (AVX-512 VNNI).
    Vnni,
}

impl Body {
    fn best(isa: Isa) -> Body {
        Body::pick(isa, isa.is_supported(), isa.has_vnni())
    }

    /// [`Body::best`] for a CPU that `supported`s `isa` and has VNNI or not: AVX-512 without
    /// VNNI (Skylake-X) runs the AVX2 body.
    fn pick(isa: Isa, supported: bool, vnni: bool) -> Body {
        match isa {
            Isa::Portable => Body::Portable,
            _ if !supported => Body::Portable,
            Isa::Avx512 | Isa::Amx if vnni => Body::Vnni,
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => Body::Avx2,
        }
    }

    /// Every body this CPU can run, for the tests.
    #[cfg(test)]
    fn available() -> Vec<Body> {
        let mut bodies = vec![Body::Portable];
        if Isa::Avx2.is_supported() {
            bodies.push(Body::Avx2);
        }
        if Isa::Avx512.has_vnni() {
            bodies.push(Body::Vnni);
        }
        bodies
    }
}

/// Quantizes the 16 outputs of `group` into their repacked vectors and scales.
fn quantize_group(
    isa: Isa,
    weights: &[f32],
    n: usize,
    k: usize,
    group: usize,
    quants: &mut [u8],
    scales: &mut [half::f16],
) {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe {
            quantize_group_avx512(weights, n, k, group, quants, scales)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe {
            quantize_group_avx2(weights, n, k, group, quants, scales)
        },
        _ => quantize_group_body(weights, n, k, group, quants, scales),
    }
}

/// [`quantize_group_avx512`] for AVX2 CPUs: the same code, with SSE4.1's `roundps` for the
/// rounding (the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_group_avx2(
    weights: &[f32],
    n: usize,
    k: usize,
    group: usize,
    quants: &mut [u8],
    scales: &mut [half::f16],
) {
    quantize_group_body(weights, n, k, group, quants, scales)
}

/// [`quantize_group_body`] with rounding in vector instructions instead of calls to `roundf`
/// (the same values): quantizing at load took ~0.5 s of startup otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn quantize_group_avx512(
    weights: &[f32],
    n: usize,
    k: usize,
    group: usize,
    quants: &mut [u8],
    scales: &mut [half::f16],
) {
    quantize_group_body(weights, n, k, group, quants, scales)
}

#[inline(always)]
fn quantize_group_body(
    weights: &[f32],
    n: usize,
    k: usize,
    group: usize,
    quants: &mut [u8],
    scales: &mut [half::f16],
) {
    for lane in 0..LANES.min(n - group * LANES) {
        let row = &weights[(group * LANES + lane) * k..][..k];
        for (block, values) in row.chunks_exact(BLOCK).enumerate() {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = half::f16::from_f32(max / 127.0);
            scales[block * LANES + lane] = scale;
            let scale = scale.to_f32();
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            // The block's 32 values first (a loop LLVM vectorizes), then its 8 quads to their
            // places: with `f32::round` (a libm call per value) and the scattered byte stores in
            // one loop, quantizing took half of a q8_0 server's 1.7–2.0 s start on a 2-core Xeon.
            let mut block_quants = [0u8; BLOCK];
            for (q, v) in block_quants.iter_mut().zip(values) {
                let rounded = round_half_away(v * inverse).clamp(-127.0, 127.0) as i32;
                *q = (rounded + OFFSET) as u8;
            }
            for (quad, bytes) in block_quants.chunks_exact(QUAD).enumerate() {
                let at = ((block * BLOCK / QUAD + quad) * LANES + lane) * QUAD;
                quants[at..at + QUAD].copy_from_slice(bytes);
            }
        }
    }
}

/// `f32::round` (half-way cases away from zero) as truncation plus a step: `x - trunc(x)` is
/// exact, so the result is the same bits, and both halves vectorize.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let whole = x.trunc();
    if (x - whole).abs() >= 0.5 {
        whole + 1.0f32.copysign(x)
    } else {
        whole
    }
}

/// Activation rows in q8_0: per block of 32, int8 values and an f32 scale.
struct QuantizedRows {
    rows: usize,
    /// `(rows, k/4)`: four consecutive int8 values, little-endian, as one word to broadcast.
    quads: Vec<i32>,
    /// `(rows, k/32)`: each block's scale.
    scales: Vec<f32>,
    /// `(rows, k/32)`: `-128 · Σ values`, cancelling the weights' offset in the integer sum.
    corrections: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `k` (a multiple of [`BLOCK`]) with the code compiled for `isa`.
    fn new(isa: Isa, x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && x.len() >= rows * k);
        match isa {
            // SAFETY: the CPU has the features this function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe { Self::new_avx512(x, rows, k) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => unsafe { Self::new_avx2(x, rows, k) },
            _ => Self::build(x, rows, k),
        }
    }

    /// [`Self::new_avx512`] in AVX2, four vectors of 8 per block, with the same rounding and so
    /// the same values as [`Self::build`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn new_avx2(x: &[f32], rows: usize, k: usize) -> Self {
        use std::arch::x86_64::*;
        let blocks = rows * k / BLOCK;
        assert!(k.is_multiple_of(BLOCK) && x.len() >= rows * k);
        let mut quads = vec![0i32; rows * k / QUAD];
        let mut scales = vec![0.0f32; blocks];
        let mut corrections = vec![0i32; blocks];
        let sign = _mm256_set1_ps(-0.0);
        let almost_half = _mm256_set1_ps(0.499_999_97);
        let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        // `vpackssdw` and `vpacksswb` work within 128-bit lanes: this puts the words back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..blocks {
            let from = x[b * BLOCK..][..BLOCK].as_ptr();
            // SAFETY: `from` starts a block of 32 floats.
            let values = unsafe { [0, 8, 16, 24].map(|offset| _mm256_loadu_ps(from.add(offset))) };
            let abs = values.map(|v| _mm256_andnot_ps(sign, v));
            let max = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
            let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
            let max = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps::<1>(max, max)));
            let scale = max / 127.0;
            let inverse = _mm256_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
            let q = values.map(|v| {
                let t = _mm256_mul_ps(v, inverse);
                let nudge = _mm256_or_ps(_mm256_and_ps(t, sign), almost_half);
                let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
                    _mm256_add_ps(t, nudge),
                );
                _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, low), high))
            });
            // Within ±127, so the saturating packs are exact.
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                ),
                order,
            );
            let to = quads[b * BLOCK / QUAD..][..BLOCK / QUAD].as_mut_ptr();
            // SAFETY: `to` starts eight words (32 bytes) of `quads`.
            unsafe { _mm256_storeu_si256(to.cast::<__m256i>(), bytes) };
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum));
            scales[b] = scale;
            corrections[b] = -OFFSET * _mm_cvtsi128_si32(sum);
        }
        Self {
            rows,
            quads,
            scales,
            corrections,
        }
    }

    /// [`Self::build`] in AVX-512 intrinsics, one block of 32 per iteration, with the same
    /// values: the maximum is exact whatever the order, and rounding half away from zero is done
    /// as `trunc(t + copysign(0.5 − ulp, t))`, which equals `f32::round` for these magnitudes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    fn new_avx512(x: &[f32], rows: usize, k: usize) -> Self {
        use std::arch::x86_64::*;
        let blocks = rows * k / BLOCK;
        assert!(k.is_multiple_of(BLOCK) && x.len() >= rows * k);
        let mut quads = vec![0i32; rows * k / QUAD];
        let mut scales = vec![0.0f32; blocks];
        let mut corrections = vec![0i32; blocks];
        let sign = _mm512_set1_ps(-0.0);
        let almost_half = _mm512_set1_ps(0.499_999_97);
        let (low, high) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        for b in 0..blocks {
            let from = x[b * BLOCK..][..BLOCK].as_ptr();
            // SAFETY: `from` starts a block of 32 floats.
            let values = unsafe { [_mm512_loadu_ps(from), _mm512_loadu_ps(from.add(16))] };
            let max = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_abs_ps(values[0]),
                _mm512_abs_ps(values[1]),
            ));
            let scale = max / 127.0;
            let inverse = _mm512_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
            let mut sum = _mm512_setzero_si512();
            for (half, v) in values.iter().enumerate() {
                let t = _mm512_mul_ps(*v, inverse);
                let nudge = _mm512_or_ps(_mm512_and_ps(t, sign), almost_half);
                let rounded = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
                    _mm512_add_ps(t, nudge),
                );
                let q = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(rounded, low), high));
                sum = _mm512_add_epi32(sum, q);
                let to = quads[b * BLOCK / QUAD + half * 4..][..4].as_mut_ptr();
                // SAFETY: `to` starts four words (16 bytes) of `quads`.
                unsafe { _mm_storeu_si128(to.cast::<__m128i>(), _mm512_cvtepi32_epi8(q)) };
            }
            scales[b] = scale;
            corrections[b] = -OFFSET * _mm512_reduce_add_epi32(sum);
        }
        Self {
            rows,
            quads,
            scales,
            corrections,
        }
    }

    #[inline(always)]
    fn build(x: &[f32], rows: usize, k: usize) -> Self {
        let blocks = rows * k / BLOCK;
        let mut quads = Vec::with_capacity(rows * k / QUAD);
        let mut scales = Vec::with_capacity(blocks);
        let mut corrections = Vec::with_capacity(blocks);
        for values in x[..rows * k].chunks_exact(BLOCK) {
            // Lane-wise maxima and a fixed-size block, so that LLVM vectorizes each step; max is
            // exact, so the order does not change the scale.
            let mut lane_max = [0.0f32; LANES];
            for (i, v) in values.iter().enumerate() {
                lane_max[i % LANES] = lane_max[i % LANES].max(v.abs());
            }
            let max = lane_max.iter().fold(0.0f32, |m, v| m.max(*v));
            let scale = max / 127.0;
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let mut block = [0i8; BLOCK];
            for (q, v) in block.iter_mut().zip(values) {
                *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
            }
            let sum: i32 = block.iter().map(|&q| i32::from(q)).sum();
            for four in block.chunks_exact(QUAD) {
                quads.push(i32::from_le_bytes([
                    four[0] as u8,
                    four[1] as u8,
                    four[2] as u8,
                    four[3] as u8,
                ]));
            }
            scales.push(scale);
            corrections.push(-OFFSET * sum);
        }
        Self {
            rows,
            quads,
            scales,
            corrections,
        }
    }
}

/// Portable version of [`tile_avx512`], in the same order of float operations.
fn tile_portable(
    m: &Q8Matrix,
    a: &QuantizedRows,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    let (quads, blocks) = (m.k / QUAD, m.k / BLOCK);
    for (column, bias) in (start..).zip(bias) {
        let (group, lane) = (column / LANES, column % LANES);
        let weights = &m.quants[group * quads * LANES * QUAD..][..quads * LANES * QUAD];
        let scales = &m.scales[group * blocks * LANES..][..blocks * LANES];
        for r in 0..a.rows {
            let mut acc = 0.0f32;
            for b in 0..blocks {
                let mut sum = a.corrections[r * blocks + b];
                for quad in b * BLOCK / QUAD..(b + 1) * BLOCK / QUAD {
                    let x = a.quads[r * quads + quad].to_le_bytes();
                    let w = &weights[(quad * LANES + lane) * QUAD..][..QUAD];
                    for (w, x) in w.iter().zip(x) {
                        sum += i32::from(*w) * i32::from(x as i8);
                    }
                }
                let scale = scales[b * LANES + lane].to_f32() * a.scales[r * blocks + b];
                acc += sum as f32 * scale;
            }
            tile[r * width + column - start] = acc + bias;
        }
    }
}

/// Outputs `start..start + bias.len()` for every row, `start` a multiple of 16: up to three rows
/// take groups of 16 outputs four at a time; more rows take them two at a time, rows up to six at
/// a time (a lone group four at a time). Six rows hold 12 accumulators and 12 block sums of the
/// 32 registers; a 5-beam step had run 4 rows and then 1, reading its weights twice. 124M q8_0
/// beam request 0.777 → 0.713 s, `q8_0_decode_throughput` at 5 rows 4.06–4.52 → 3.59–4.12 ms
/// (interleaved rounds, 2-vCPU EPYC); 3 rows unchanged.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn tile_avx512(
    m: &Q8Matrix,
    a: &QuantizedRows,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    debug_assert!(start.is_multiple_of(LANES));
    let end = start + bias.len();
    let mut group = start / LANES;
    while group * LANES < end {
        // Up to three rows (greedy, the default request's three sequences), four groups at a
        // time, a whole 64-output task: 12 accumulators, 12 block sums and 4 weight vectors fit
        // the 32 registers, and four weight streams and chains of `vpdpbusd` run side by side.
        // Every matrix of a 124M step, LM head included, 30 alternating rounds in one process,
        // 2-core Xeon, 3 runs (min / median ms): 1 row 7.50 / 8.73 → 7.03 / 8.54, 6.83 / 7.70 →
        // 6.31 / 7.33, 6.85 / 7.89 → 6.48 / 7.91; 3 rows 7.86 / 8.77 → 7.54 / 8.49, 6.75 / 7.94
        // → 6.67 / 7.60, 7.13 / 8.16 → 6.83 / 7.87.
        if (1..=3).contains(&a.rows) && group * LANES + 3 * LANES < end {
            match a.rows {
                3 => store::<3, 4>(m, a, group, 0, start, bias, tile, width),
                2 => store::<2, 4>(m, a, group, 0, start, bias, tile, width),
                _ => store::<1, 4>(m, a, group, 0, start, bias, tile, width),
            };
            group += 4;
            continue;
        }
        let pair = group * LANES + LANES < end;
        let mut r = 0;
        while r < a.rows {
            let take = (a.rows - r).min(6);
            let done = match (pair, take) {
                (true, 6) => store::<6, 2>(m, a, group, r, start, bias, tile, width),
                (true, 5) => store::<5, 2>(m, a, group, r, start, bias, tile, width),
                (true, 4) => store::<4, 2>(m, a, group, r, start, bias, tile, width),
                (true, 3) => store::<3, 2>(m, a, group, r, start, bias, tile, width),
                (true, 2) => store::<2, 2>(m, a, group, r, start, bias, tile, width),
                (true, _) => store::<1, 2>(m, a, group, r, start, bias, tile, width),
                (false, 4..) => store::<4, 1>(m, a, group, r, start, bias, tile, width),
                (false, 3) => store::<3, 1>(m, a, group, r, start, bias, tile, width),
                (false, 2) => store::<2, 1>(m, a, group, r, start, bias, tile, width),
                (false, _) => store::<1, 1>(m, a, group, r, start, bias, tile, width),
            };
            r += done;
        }
        group += if pair { 2 } else { 1 };
    }
}

/// Computes rows `r..r + RG` for the `CG` groups of outputs from `group`, and writes those inside
/// `start..start + bias.len()` into `tile`; returns `RG`. Panics unless those groups and rows exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
fn store<const RG: usize, const CG: usize>(
    m: &Q8Matrix,
    a: &QuantizedRows,
    group: usize,
    r: usize,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) -> usize {
    use std::arch::x86_64::*;
    let (quads, blocks) = (m.k / QUAD, m.k / BLOCK);
    assert!(
        (group + CG) * LANES * m.k <= m.quants.len()
            && (group + CG) * LANES * blocks <= m.scales.len()
            && r + RG <= a.rows
            && a.quads.len() == a.rows * quads
            && a.scales.len() == a.rows * blocks
            && a.corrections.len() == a.rows * blocks,
        "q8_0 tile: groups {group}+{CG} or rows {r}+{RG} out of range"
    );
    let weights = m.quants[group * quads * LANES * QUAD..].as_ptr();
    let scales = m.scales[group * blocks * LANES..].as_ptr();
    let x_quads = a.quads[r * quads..].as_ptr();
    let mut acc = [[_mm512_setzero_ps(); CG]; RG];
    // SAFETY: the assertion above bounds every read: weights and scales of groups
    // `group..group + CG` (`c < CG`, `quad < quads`, `b < blocks`), activations of rows
    // `r..r + RG` (`row < RG`); prefetches past the end do not fault.
    unsafe {
        for b in 0..blocks {
            let mut sums = [[_mm512_setzero_si512(); CG]; RG];
            for (row, sums) in sums.iter_mut().enumerate() {
                let correction =
                    _mm512_set1_epi32(*a.corrections.get_unchecked((r + row) * blocks + b));
                *sums = [correction; CG];
            }
            for quad in b * BLOCK / QUAD..(b + 1) * BLOCK / QUAD {
                let mut w = [_mm512_setzero_si512(); CG];
                for (c, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(
                        weights.add((c * quads + quad) * LANES * QUAD) as *const _
                    );
                    if r == 0 && CG < 4 {
                        // The first row group asks for the next groups' line into L2 (as the f32
                        // kernel does); past the matrix's end a prefetch is a no-op. Not for four
                        // groups (1–3 rows): their four streams keep the memory busy on their
                        // own, and the prefetches' fill buffers held the loads back. Zen 5, a
                        // step's layers in a pool thread: 1 row 41 → 49 GB/s, 3 rows 42 → 44;
                        // 5 rows (two groups) lost 23% without them. 124M greedy q8_0 request
                        // 0.299 → 0.270 s (`ab.py`, 6 rounds, faster in all), default ×0.984.
                        let next = weights.wrapping_add(((CG + c) * quads + quad) * LANES * QUAD);
                        _mm_prefetch::<_MM_HINT_T1>(next as *const i8);
                    }
                }
                for (row, sums) in sums.iter_mut().enumerate() {
                    let x = x_quads.add(row * quads + quad);
                    for (sum, w) in sums.iter_mut().zip(&w) {
                        *sum = dpbusd_broadcast(*sum, *w, x);
                    }
                }
            }
            let mut scale = [_mm512_setzero_ps(); CG];
            for (c, scale) in scale.iter_mut().enumerate() {
                *scale = _mm512_cvtph_ps(_mm256_loadu_si256(
                    scales.add((c * blocks + b) * LANES) as *const __m256i
                ));
            }
            for (row, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                let x_scale = _mm512_set1_ps(*a.scales.get_unchecked((r + row) * blocks + b));
                for c in 0..CG {
                    let product = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(sums[c]),
                        _mm512_mul_ps(scale[c], x_scale),
                    );
                    acc[c] = _mm512_add_ps(acc[c], product);
                }
            }
        }
    }
    for (row, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` has room for the 16 floats stored.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *acc) };
            let first = (group + c) * LANES;
            write_lanes(&lanes, first, r + row, start, bias, tile, width);
        }
    }
    RG
}

/// `vpdpbusd` of the unsigned bytes of `w` with the four signed bytes at `x` in every lane, the
/// broadcast folded into the instruction's memory operand.
///
/// Written as `_mm512_dpbusd_epi32(sum, w, _mm512_set1_epi32(*x))`, LLVM hoisted a block's 32
/// broadcasts (4 rows × 8 quads) ahead of their products and spilled half of them to the stack;
/// `perf annotate` of a 48-row step put most of the tile's samples on those broadcasts, spills
/// and reloads. An `asm!` block cannot be reordered that way, and the same instruction gives the
/// same sums. 3 interleaved rounds, 2-vCPU EPYC: `q8_0_throughput`'s (3072, 768) × 16 rows
/// 0.177–0.326 → 0.148–0.192 ms; a 48-row step of the 124M model (16 caches of 3 rows)
/// 52–58 → 46–53 ms. (With this, groups of up to six rows then helped a 5-beam step; at 48
/// rows they measured the same as four.)
///
/// # Safety
/// The CPU has AVX-512 VNNI; `x` points to 4 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dpbusd_broadcast(
    sum: std::arch::x86_64::__m512i,
    w: std::arch::x86_64::__m512i,
    x: *const i32,
) -> std::arch::x86_64::__m512i {
    let mut sum = sum;
    // SAFETY: the caller guarantees the CPU feature and the 4 bytes at `x`.
    unsafe {
        std::arch::asm!(
            "vpdpbusd {sum}, {w}, dword ptr [{x}]{{1to16}}",
            sum = inout(zmm_reg) sum,
            w = in(zmm_reg) w,
            x = in(reg) x,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    sum
}

/// [`tile_avx512`] for CPUs without VNNI: outputs `start..start + bias.len()` for every row,
/// `start` a multiple of 16, each group of 16 outputs as two 8-lane halves; groups two at a time,
/// rows four at a time, as VNNI. Measured on Zen 4 (`q8_0_throughput`, noisy 2-vCPU machine):
/// vs VNNI, 0.89 vs 0.80 ms for the LM head at 1 row (bandwidth-bound), 1.50 vs 0.99 ms at 3 rows,
/// 0.42 vs 0.29 ms for (3072, 768) at 16 rows; the portable body took 12.4, 35 and 11.2 ms.
/// Rows two at a time (fewer spilled accumulators) measured the same within the noise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_avx2(
    m: &Q8Matrix,
    a: &QuantizedRows,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    debug_assert!(start.is_multiple_of(LANES));
    let end = start + bias.len();
    let mut group = start / LANES;
    while group * LANES < end {
        let pair = group * LANES + LANES < end;
        let mut r = 0;
        while r < a.rows {
            let take = (a.rows - r).min(4);
            let done = match (pair, take) {
                (true, 4) => store_avx2::<4, 2>(m, a, group, r, start, bias, tile, width),
                (true, 3) => store_avx2::<3, 2>(m, a, group, r, start, bias, tile, width),
                (true, 2) => store_avx2::<2, 2>(m, a, group, r, start, bias, tile, width),
                (true, _) => store_avx2::<1, 2>(m, a, group, r, start, bias, tile, width),
                (false, 4) => store_avx2::<4, 1>(m, a, group, r, start, bias, tile, width),
                (false, 3) => store_avx2::<3, 1>(m, a, group, r, start, bias, tile, width),
                (false, 2) => store_avx2::<2, 1>(m, a, group, r, start, bias, tile, width),
                (false, _) => store_avx2::<1, 1>(m, a, group, r, start, bias, tile, width),
            };
            r += done;
        }
        group += if pair { 2 } else { 1 };
    }
}

/// [`store`] in AVX2. `vpmaddubsw` wants one unsigned operand and saturates its pair sums at
/// i16, so the stored `weight + 128` cannot go in as is (2 · 255 · 127 overflows): the weights
/// are flipped back to signed (`xor 0x80`), and `|x| · (w · sign x)` goes in instead, whose pair
/// sums stay within 2 · 127 · 127 = 32258 because both quantizers clamp to ±127 (never −128,
/// which `vpsignb` could not negate). `vpmaddwd` with ones then adds the pairs into the same
/// int32 sum of 4 products as `vpdpbusd`, without the offset, so the block sums need no
/// correction and equal the portable ones exactly; the float operations follow the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn store_avx2<const RG: usize, const CG: usize>(
    m: &Q8Matrix,
    a: &QuantizedRows,
    group: usize,
    r: usize,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) -> usize {
    use std::arch::x86_64::*;
    let (quads, blocks) = (m.k / QUAD, m.k / BLOCK);
    assert!(
        (group + CG) * LANES * m.k <= m.quants.len()
            && (group + CG) * LANES * blocks <= m.scales.len()
            && r + RG <= a.rows
            && a.quads.len() == a.rows * quads
            && a.scales.len() == a.rows * blocks,
        "q8_0 tile: groups {group}+{CG} or rows {r}+{RG} out of range"
    );
    let weights = m.quants[group * quads * LANES * QUAD..].as_ptr();
    let scales = m.scales[group * blocks * LANES..].as_ptr();
    let x_quads = a.quads[r * quads..].as_ptr();
    let flip = _mm256_set1_epi8(i8::MIN);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; CG]; RG];
    // SAFETY: the assertion above bounds every read: weights and scales of groups
    // `group..group + CG` (`c < CG`, `quad < quads`, `b < blocks`; each 64-byte vector read as
    // two 32-byte halves, each 16 scales as two 8), activations of rows `r..r + RG`
    // (`row < RG`); prefetches past the end do not fault.
    unsafe {
        for b in 0..blocks {
            let mut sums = [[[_mm256_setzero_si256(); 2]; CG]; RG];
            for quad in b * BLOCK / QUAD..(b + 1) * BLOCK / QUAD {
                let mut w = [[_mm256_setzero_si256(); 2]; CG];
                for (c, w) in w.iter_mut().enumerate() {
                    let from = weights.add((c * quads + quad) * LANES * QUAD);
                    for (h, w) in w.iter_mut().enumerate() {
                        let unsigned = _mm256_loadu_si256(from.add(32 * h) as *const __m256i);
                        *w = _mm256_xor_si256(unsigned, flip);
                    }
                    if r == 0 {
                        // As in `store`: the next groups' line into L2.
                        let next = weights.wrapping_add(((CG + c) * quads + quad) * LANES * QUAD);
                        _mm_prefetch::<_MM_HINT_T1>(next as *const i8);
                    }
                }
                for (row, sums) in sums.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(*x_quads.add(row * quads + quad));
                    let magnitude = _mm256_abs_epi8(x);
                    for (sums, w) in sums.iter_mut().zip(&w) {
                        for (sum, w) in sums.iter_mut().zip(w) {
                            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(*w, x));
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
            }
            let mut scale = [[_mm256_setzero_ps(); 2]; CG];
            for (c, scale) in scale.iter_mut().enumerate() {
                for (h, scale) in scale.iter_mut().enumerate() {
                    *scale = _mm256_cvtph_ps(_mm_loadu_si128(
                        scales.add((c * blocks + b) * LANES + 8 * h) as *const __m128i,
                    ));
                }
            }
            for (row, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                let x_scale = _mm256_set1_ps(*a.scales.get_unchecked((r + row) * blocks + b));
                for c in 0..CG {
                    for h in 0..2 {
                        let product = _mm256_mul_ps(
                            _mm256_cvtepi32_ps(sums[c][h]),
                            _mm256_mul_ps(scale[c][h], x_scale),
                        );
                        acc[c][h] = _mm256_add_ps(acc[c][h], product);
                    }
                }
            }
        }
    }
    for (row, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; LANES];
            for (h, acc) in acc.iter().enumerate() {
                // SAFETY: `lanes[8h..8h + 8]` has room for the 8 floats stored.
                unsafe { _mm256_storeu_ps(lanes[8 * h..].as_mut_ptr(), *acc) };
            }
            let first = (group + c) * LANES;
            write_lanes(&lanes, first, r + row, start, bias, tile, width);
        }
    }
    RG
}

/// One task's outputs `start..end` with `body` (where `start` allows it, else the portable one).
#[allow(clippy::too_many_arguments)]
fn tile_with(
    body: Body,
    m: &Q8Matrix,
    a: &QuantizedRows,
    start: usize,
    end: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    debug_assert_eq!(end - start, bias.len());
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(LANES) {
        match body {
            // SAFETY: `Body::best` and the tests choose a body only where the CPU has its
            // features.
            Body::Vnni => return unsafe { tile_avx512(m, a, start, bias, tile, width) },
            // SAFETY: as above.
            Body::Avx2 => return unsafe { tile_avx2(m, a, start, bias, tile, width) },
            Body::Portable => {}
        }
    }
    tile_portable(m, a, start, bias, tile, width)
}

impl HeldWeight for Q8Matrix {
    const NAME: &'static str = "q8-linear";

    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn matmul(&self, x: &[f32], rows: usize, bias: &[f32], epilogue: Epilogue) -> Vec<f32> {
        // In each task, on the tile it has just computed.
        let isa = Isa::active();
        self.matmul_body(isa, Body::best(isa), x, rows, bias, epilogue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    #[test]
    fn weight_rounding_is_f32_round_bit_for_bit() {
        let mut cases = vec![
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            0.499_999_97,
            -0.499_999_97,
            0.0,
            -0.0,
            127.49,
            1e-30,
            8_388_607.5,
            16_777_216.0,
            f32::INFINITY,
            f32::MIN,
        ];
        cases.extend(values(&mut 21u32, 2000, 130.0));
        for x in cases {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn every_instruction_set_matches_the_quantized_reference_with_identical_bits() {
        let mut seed = 7u32;
        for (rows, n, k) in [
            (1, 4, 32),
            (3, 70, 96),
            (1, 60, 64),
            (2, 200, 128),
            (9, 131, 64),
            (5, 64, 768),
            (2, 17, 32),
            (6, 48, 64),
            (11, 40, 64),
            (16, 35, 32),
            // Many rows: groups of six and their remainders, odd and even block counts.
            (8, 64, 96),
            (20, 70, 96),
            (48, 130, 128),
            (33, 16, 768),
        ] {
            let w = values(&mut seed, n * k, 0.5);
            let x = values(&mut seed, rows * k, 0.5);
            let bias = values(&mut seed, n, 0.5);
            let q = Q8Matrix::quantize_with(Isa::Portable, &w, n, k);
            let dq = q.dequantize();
            for (a, b) in dq.iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 0.5 / 127.0 + 1e-3,
                    "rounding within half a step"
                );
            }
            let activations = QuantizedRows::new(Isa::Portable, &x, rows, k);
            let dx: Vec<f32> = (0..rows * k)
                .map(|i| {
                    let byte = activations.quads[i / QUAD].to_le_bytes()[i % QUAD] as i8;
                    f32::from(byte) * activations.scales[i / BLOCK]
                })
                .collect();
            for (a, b) in dx.iter().zip(&x) {
                assert!(
                    (a - b).abs() <= 0.5 / 127.0 * 0.5 + 1e-6,
                    "activation rounding"
                );
            }
            let portable = q.matmul_with(Isa::Portable, &x, rows, &bias);
            for r in 0..rows {
                for j in 0..n {
                    let reference: f32 =
                        (0..k).map(|i| dx[r * k + i] * dq[j * k + i]).sum::<f32>() + bias[j];
                    let got = portable[r * n + j];
                    assert!((got - reference).abs() < 1e-4, "({rows},{n},{k}) [{r},{j}]");
                }
            }
            for isa in Isa::available() {
                let quantized = Q8Matrix::quantize_with(isa, &w, n, k);
                assert_eq!(quantized.quants, q.quants, "{isa} weight quants");
                assert_eq!(quantized.scales, q.scales, "{isa} weight scales");
                let y = quantized.matmul_with(isa, &x, rows, &bias);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&y),
                    bits(&portable),
                    "{isa} differs from the portable path"
                );
                // Every body under every quantizer, e.g. AVX-512 without VNNI on the AVX2 body.
                for body in Body::available() {
                    let y = quantized.matmul_body(isa, body, &x, rows, &bias, Epilogue::Plain);
                    assert_eq!(bits(&y), bits(&portable), "{isa} {body:?}");
                }
            }
        }
    }

    #[test]
    fn each_level_picks_its_body() {
        assert_eq!(Body::pick(Isa::Portable, true, false), Body::Portable);
        assert_eq!(Body::pick(Isa::Avx2, true, false), Body::Avx2);
        assert_eq!(Body::pick(Isa::Avx2, false, false), Body::Portable);
        // Skylake-X: AVX-512 F/BW/DQ without VNNI.
        assert_eq!(Body::pick(Isa::Avx512, true, false), Body::Avx2);
        assert_eq!(Body::pick(Isa::Avx512, true, true), Body::Vnni);
        assert_eq!(Body::pick(Isa::Avx512, false, false), Body::Portable);
        for isa in Isa::available() {
            assert!(Body::available().contains(&Body::best(isa)), "{isa}");
        }
        if Isa::Avx2.is_supported() {
            assert_eq!(Body::best(Isa::Avx2), Body::Avx2);
        }
    }

    #[test]
    fn full_scale_quants_do_not_saturate_the_pair_sums() {
        // Every block's values of equal magnitude quantize to ±127 throughout: the largest
        // products, and pairs of equal signs, the largest `vpmaddubsw` pair sums (32258).
        let (rows, n, k) = (5, 48, 256);
        let sign = |i: usize, salt: usize| if (i * 7 + salt) % 5 < 3 { 1.0f32 } else { -1.0 };
        let w: Vec<f32> = (0..n * k).map(|i| 0.25 * sign(i / 2, i / k)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| 3.0 * sign(i / 4, 1)).collect();
        let bias = vec![0.0; n];
        let q = Q8Matrix::quantize_with(Isa::Portable, &w, n, k);
        let portable = q.matmul_with(Isa::Portable, &x, rows, &bias);
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
                let got = portable[r * n + j];
                assert!(
                    (got - exact).abs() <= 1e-3 * exact.abs().max(1.0),
                    "[{r},{j}]"
                );
            }
        }
        for isa in Isa::available() {
            for body in Body::available() {
                let y = q.matmul_body(isa, body, &x, rows, &bias, Epilogue::Plain);
                assert_eq!(y, portable, "{isa} {body:?}");
            }
        }
    }

    /// `cargo test --release -p gpt2-model --lib q8_0_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn q8_0_throughput() {
        for (n, k, rows) in [
            (50257, 768, 1),
            (2304, 768, 1),
            (3072, 768, 1),
            (768, 3072, 1),
            (50257, 768, 3),
            (3072, 768, 16),
        ] {
            let w = values(&mut 1u32, n * k, 0.5);
            let x = values(&mut 2u32, rows * k, 0.5);
            let bias = vec![0.0; n];
            let q = Q8Matrix::quantize(&w, n, k);
            for isa in Isa::available() {
                for body in Body::available() {
                    let mut best = f64::MAX;
                    for _ in 0..20 {
                        let t = std::time::Instant::now();
                        std::hint::black_box(q.matmul_body(
                            isa,
                            body,
                            &x,
                            rows,
                            &bias,
                            Epilogue::Plain,
                        ));
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    println!(
                        "({n},{k})x{rows} {isa} {body:?}: {:.3} ms, {:.1} GB/s",
                        best * 1e3,
                        (q.quants.len() + 2 * q.scales.len()) as f64 / best / 1e9
                    );
                }
            }
        }
    }

    /// `cargo test --release -p gpt2-model --lib q8_0_decode_throughput -- --ignored --nocapture`
    ///
    /// A decode step's layer shapes (GPT-2 small's four, 12 layers' worth of copies so that the
    /// weights come from memory as in a step); GB/s of weights and scales read, median of 15.
    #[test]
    #[ignore = "a timing, not a check"]
    fn q8_0_decode_throughput() {
        let shapes = [(2304usize, 768usize), (768, 768), (3072, 768), (768, 3072)];
        let mut seed = 1u32;
        let mut weights = Vec::new();
        for _ in 0..12 {
            for &(n, k) in &shapes {
                let w = values(&mut seed, n * k, 0.5);
                weights.push((Q8Matrix::quantize(&w, n, k), values(&mut seed, n, 0.5)));
            }
        }
        let bytes: usize = weights
            .iter()
            .map(|(q, _)| q.quants.len() + 2 * q.scales.len())
            .sum();
        for rows in [1usize, 3, 5, 16] {
            let x = values(&mut seed, rows * 3072, 0.5);
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for (q, b) in &weights {
                    std::hint::black_box(q.matmul(&x[..rows * q.k], rows, b));
                }
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!(
                "{rows:>2} rows: {:.2} ms ({:.1} GB/s)",
                median * 1e3,
                bytes as f64 / median / 1e9
            );
        }
    }

    #[test]
    fn every_instruction_set_quantizes_activations_alike_with_ties_away_from_zero() {
        let mut seed = 3u32;
        let (rows, k) = (5, 256);
        let mut x = values(&mut seed, rows * k, 0.5);
        // Exact halves after scaling (ties round away from zero), zeros and a zero block.
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = 2.5;
        x[4] = -101.5;
        for v in &mut x[32..64] {
            *v = 0.0;
        }
        let portable = QuantizedRows::build(&x, rows, k);
        assert_eq!(portable.quads[0].to_le_bytes(), [127, 1, 255, 3]);
        assert!(portable.scales[1] == 0.0 && portable.quads[8..16].iter().all(|&q| q == 0));
        for isa in Isa::available() {
            let rows = QuantizedRows::new(isa, &x, rows, k);
            assert_eq!(rows.quads, portable.quads, "{isa}");
            assert_eq!(rows.scales, portable.scales, "{isa}");
            assert_eq!(rows.corrections, portable.corrections, "{isa}");
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let (n, k) = (3, 64);
        let q = Q8Matrix::quantize(&vec![0.0; n * k], n, k);
        let y = q.matmul(&vec![0.0; 2 * k], 2, &[1.0, 2.0, 3.0]);
        assert_eq!(y, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "q8_0 matmul")]
    fn inputs_of_the_wrong_width_are_refused() {
        let q = Q8Matrix::quantize(&[0.0; 2 * 32], 2, 32);
        q.matmul(&[0.0; 31], 1, &[0.0, 0.0]);
    }
}
