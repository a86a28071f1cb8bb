//! bf16 weights and their matmul: half the bytes of f32 per decode step, with 8 significant bits
//! per weight (relative rounding error ≤ 2⁻⁹) instead of q8_0's per-block 8-bit grid.
//!
//! Weights are rounded to bf16 (round to nearest, ties to even) at load and packed for AVX-512
//! BF16's `vdpbf16ps`: one 64-byte vector holds 2 consecutive inputs of 16 consecutive outputs
//! (a 32-bit lane per output: input `2p` in its low half, `2p + 1` in its high half), so one
//! instruction advances 16 outputs by 2 inputs with f32 accumulation, and no horizontal sum is
//! needed at the end. `vdpbf16ps` wants both operands in bf16, so **activations are rounded to
//! bf16 too** (once per matmul, with `vcvtne2ps2bf16` where the CPU has it): every product is then
//! exact in f32 and only the f32 sums round. Every path does the same, so pinning `GPT2_ISA`
//! changes no more than the order of float additions:
//!
//! - AMX (Sapphire Rapids and later, [`Isa::Amx`]): `tdpbf16ps` on tiles (`bf16_amx.rs`), which
//!   reads this layout as it stands;
//! - AVX-512 BF16 (Zen 4, Cooper Lake, Sapphire Rapids): `vdpbf16ps`;
//! - AVX-512F and AVX2: the bf16 weights widened to f32 (a shift left by 16) and two FMAs per
//!   pair, in the order `vdpbf16ps` documents (high input, then low);
//! - portable: the same, one output at a time.
//!
//! Rounding follows `vcvtne2ps2bf16`: nearest-even, NaN kept quiet, and f32 denormals flushed to
//! zero (the instruction treats them as zero), so that every path sees the same bf16 values.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::write_lanes;
use super::{by_column_ranges, Epilogue, HeldWeight, Isa};

/// Outputs interleaved in one packed vector (its 32-bit lanes).
const LANES: usize = 16;

/// f32 → bf16 bits as `vcvtne2ps2bf16` rounds: nearest, ties to even; NaN stays a quiet NaN;
/// denormals become signed zeros.
#[inline(always)]
pub(crate) fn round_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7f80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounded = bits + 0x7fff + ((bits >> 16) & 1);
    (rounded >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub(crate) fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// How a source matrix handed to [`Bf16Matrix::pack`] is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `(n, k)` row-major: each output's inputs contiguous (the LM head, `wte`).
    OutIn,
    /// `(k, n)` row-major: the checkpoint layout of GPT-2's `Conv1D`.
    InOut,
}

/// A weight matrix `(n, k)`, `k` even, in bf16, packed for the kernels.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Matrix {
    n: usize,
    k: usize,
    /// `(n/16 rounded up, k/2, 16)`: per output lane, inputs `2p` (low half) and `2p + 1` (high
    /// half); padded outputs are zeros. In huge-page-backed memory.
    pairs: Vec<u32>,
}

impl Bf16Matrix {
    /// Rounds and packs an `(n, k)` matrix given in `layout`; `k` must be even.
    pub(crate) fn pack(source: &[f32], n: usize, k: usize, layout: Source) -> Self {
        assert!(
            k.is_multiple_of(2) && source.len() == n * k,
            "bf16 pack: {} values for ({n}, {k}), k must be even",
            source.len()
        );
        let half = k / 2;
        let groups = n.div_ceil(LANES);
        let mut pairs = crate::memory::huge_page_vec::<u32>(groups * half * LANES);
        pairs.resize(groups * half * LANES, 0);
        pairs
            .par_chunks_mut(half * LANES)
            .enumerate()
            .for_each(|(group, out)| {
                let first = group * LANES;
                let lanes = LANES.min(n - first);
                match layout {
                    Source::InOut => {
                        // Both inputs of a pair are contiguous runs of 16 outputs here.
                        for p in 0..half {
                            let low = &source[2 * p * n + first..][..lanes];
                            let high = &source[(2 * p + 1) * n + first..][..lanes];
                            let to = &mut out[p * LANES..][..lanes];
                            for ((to, l), h) in to.iter_mut().zip(low).zip(high) {
                                *to = u32::from(round_bf16(*l)) | u32::from(round_bf16(*h)) << 16;
                            }
                        }
                    }
                    Source::OutIn => {
                        for lane in 0..lanes {
                            let row = &source[(first + lane) * k..][..k];
                            for (p, pair) in row.chunks_exact(2).enumerate() {
                                out[p * LANES + lane] = u32::from(round_bf16(pair[0]))
                                    | u32::from(round_bf16(pair[1])) << 16;
                            }
                        }
                    }
                }
            });
        Self { n, k, pairs }
    }

    /// `(n, k)`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The bytes the packed weights take.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.pairs.len() * 4
    }

    /// Row `j` (output `j`'s `k` weights) as f32, appended to `out`.
    pub(crate) fn row_into(&self, j: usize, out: &mut Vec<f32>) {
        assert!(j < self.n, "bf16 row {j} of {}", self.n);
        let (group, lane) = (j / LANES, j % LANES);
        let half = self.k / 2;
        let pairs = &self.pairs[group * half * LANES..][..half * LANES];
        out.reserve(self.k);
        for p in 0..half {
            let pair = pairs[p * LANES + lane];
            out.push(widen(pair as u16));
            out.push(widen((pair >> 16) as u16));
        }
    }

    /// Back to f32, `(n, k)`.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for j in 0..self.n {
            self.row_into(j, &mut out);
        }
        out
    }

    /// The rows `ids` (an embedding lookup), `(ids.len(), k)`.
    pub(crate) fn gather(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            self.row_into(id as usize, &mut out);
        }
        out
    }

    /// `(rows, k)` activations times this matrix transposed, plus `bias`: `(rows, n)`. The
    /// activations are rounded to bf16 first.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        self.matmul_with(Isa::active(), x, rows, bias)
    }

    /// [`Self::matmul`] on the kernels `isa` allows (`vdpbf16ps` where the CPU has it at
    /// [`Isa::Avx512`], widening and FMA otherwise).
    #[cfg(test)]
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        self.matmul_body(Body::best(isa), x, rows, bias, Epilogue::Plain)
    }

    fn matmul_body(
        &self,
        body: Body,
        x: &[f32],
        rows: usize,
        bias: &[f32],
        epilogue: Epilogue,
    ) -> Vec<f32> {
        assert!(
            x.len() == rows * self.k && bias.len() == self.n,
            "bf16 matmul: {} inputs for {rows} rows of {}, {} biases for {} outputs",
            x.len(),
            self.k,
            bias.len(),
            self.n
        );
        #[cfg(target_arch = "x86_64")]
        let body = if body == Body::Amx && !super::bf16_amx::fits(self.k) {
            Body::Avx512Bf16
        } else {
            body
        };
        let activations = Bf16Rows::new(body, x, rows, self.k);
        by_column_ranges(rows, self.n, |start, end, tile, width| {
            tile_with(
                body,
                self,
                &activations,
                start,
                &bias[start..end],
                tile,
                width,
            );
            epilogue.apply(tile);
        })
    }
}

/// The kernel bodies; [`Body::best`] picks one for an [`Isa`] and the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Portable,
    /// Widen and FMA, 8 lanes.
    Avx2,
    /// Widen and FMA, 16 lanes.
    Avx512,
    /// `vdpbf16ps`.
    Avx512Bf16,
    /// `tdpbf16ps` on AMX tiles, for `k` a multiple of 32 ([`Body::Avx512Bf16`] otherwise).
    Amx,
}

impl Body {
    fn best(isa: Isa) -> Body {
        if isa == Isa::Amx && isa.is_supported() {
            Body::Amx
        } else if isa.has_avx512_bf16() {
            Body::Avx512Bf16
        } else if isa == Isa::Avx512 && isa.is_supported() {
            Body::Avx512
        } else if isa >= Isa::Avx2 && isa.is_supported() {
            Body::Avx2
        } else {
            Body::Portable
        }
    }

    /// Every body this CPU can run, for the tests.
    #[cfg(test)]
    fn available() -> Vec<Body> {
        let mut bodies = vec![Body::Portable];
        if Isa::Avx2.is_supported() {
            bodies.push(Body::Avx2);
        }
        if Isa::Avx512.is_supported() {
            bodies.push(Body::Avx512);
        }
        if Isa::Avx512.has_avx512_bf16() {
            bodies.push(Body::Avx512Bf16);
        }
        if Isa::Amx.is_supported() {
            bodies.push(Body::Amx);
        }
        bodies
    }
}

/// Rows per block of [`Bf16Rows::interleaved`]: the tallest row group `vdpbf16ps` runs.
const TALL: usize = 8;

/// Activation rows rounded to bf16, in the forms the bodies read.
struct Bf16Rows {
    rows: usize,
    /// `(rows, k/2)`: inputs `2p` (low half) and `2p + 1` (high half).
    pairs: Vec<u32>,
    /// For `vdpbf16ps` only, else empty: `pairs` in blocks of [`TALL`] rows, each block
    /// `(k/2, height)` with `height` its row count (8, or what is left in the last block; one row
    /// is `pairs`' own layout). A row group's pair `p` is then one pointer plus constants: with
    /// `(rows, k/2)` rows, 8 rows needed 8 base registers and the loop reloaded them from the
    /// stack (512-row prefill shapes: 300–370 GFLOP/s, spills in the inner loop).
    interleaved: Vec<u32>,
    /// `(rows, k)`: the same values widened to f32, for the FMA bodies.
    values: Vec<f32>,
}

impl Bf16Rows {
    fn new(body: Body, x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(2) && x.len() >= rows * k);
        let x = &x[..rows * k];
        let mut pairs = vec![0u32; rows * k / 2];
        match body {
            // SAFETY: `Body::Avx512Bf16` and `Body::Amx` are only chosen when the CPU has AVX-512
            // BF16.
            #[cfg(target_arch = "x86_64")]
            Body::Avx512Bf16 | Body::Amx => unsafe { round_pairs_avx512bf16(x, &mut pairs) },
            _ => round_pairs(x, &mut pairs),
        }
        let half = k / 2;
        let mut interleaved = Vec::new();
        if body == Body::Avx512Bf16 {
            interleaved = vec![0u32; rows * half];
            for (r, row) in pairs.chunks_exact(half.max(1)).enumerate().take(rows) {
                let height = block_height(rows, r);
                let block = &mut interleaved[r / TALL * TALL * half..][..height * half];
                for (p, &pair) in row.iter().enumerate() {
                    block[p * height + r % TALL] = pair;
                }
            }
        }
        let values = if matches!(body, Body::Avx512Bf16 | Body::Amx) {
            Vec::new()
        } else {
            pairs
                .iter()
                .flat_map(|&p| [widen(p as u16), widen((p >> 16) as u16)])
                .collect()
        };
        Self {
            rows,
            pairs,
            interleaved,
            values,
        }
    }
}

/// Rows in the block of [`Bf16Rows::interleaved`] that holds row `r` of `rows`.
fn block_height(rows: usize, r: usize) -> usize {
    (rows - r / TALL * TALL).min(TALL)
}

/// Rounds `x` (an even length) into `pairs` (half of it).
fn round_pairs(x: &[f32], pairs: &mut [u32]) {
    for (to, from) in pairs.iter_mut().zip(x.chunks_exact(2)) {
        *to = u32::from(round_bf16(from[0])) | u32::from(round_bf16(from[1])) << 16;
    }
}

/// [`round_pairs`] with `vcvtne2ps2bf16`, 32 values per instruction (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn round_pairs_avx512bf16(x: &[f32], pairs: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(x.len() == 2 * pairs.len());
    let vectors = x.len() / 32;
    for v in 0..vectors {
        let from = x[v * 32..][..32].as_ptr();
        let to = pairs[v * 16..][..16].as_mut_ptr();
        // SAFETY: `from` starts 32 floats of `x` and `to` 16 words of `pairs` (sliced above);
        // `__m512bh` and `__m512i` are both 64 bytes of plain bits.
        unsafe {
            // The second operand fills the low 16 bf16 values, the first the high 16.
            let bf = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(from.add(16)), _mm512_loadu_ps(from));
            _mm512_storeu_si512(to.cast(), std::mem::transmute::<__m512bh, __m512i>(bf));
        }
    }
    round_pairs(&x[vectors * 32..], &mut pairs[vectors * 16..]);
}

/// Portable version of the tile bodies, in the same order of float operations.
fn tile_portable(
    m: &Bf16Matrix,
    a: &Bf16Rows,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    let half = m.k / 2;
    for (column, bias) in (start..).zip(bias) {
        let (group, lane) = (column / LANES, column % LANES);
        let weights = &m.pairs[group * half * LANES..][..half * LANES];
        for r in 0..a.rows {
            let x = &a.pairs[r * half..][..half];
            let mut acc = 0.0f32;
            for (p, &x) in x.iter().enumerate() {
                let w = weights[p * LANES + lane];
                // Products of two bf16 values are exact in f32: only the sums round.
                acc += widen((w >> 16) as u16) * widen((x >> 16) as u16);
                acc += widen(w as u16) * widen(x as u16);
            }
            tile[r * width + column - start] = acc + bias;
        }
    }
}

/// Generates one SIMD tile body: outputs `start..start + bias.len()` (`start` a multiple of 16)
/// for every row, two groups of 16 outputs at a time, rows `$tall` (4 or 8) at a time. `$block`
/// computes rows `r..r + RG` of groups `group..group + CG` into `[[[f32; 16]; CG]; RG]`.
/// `vdpbf16ps` runs 8 rows (16 accumulators of its 32 registers): a 512-row prefill's shapes went
/// from 276–324 to 335–384 GFLOP/s against the probe's 447 (with [`Bf16Rows::interleaved`] and
/// whole-vector stores); the FMA bodies stay at 4, as AVX2 has 16 registers. With `vdpbf16ps`, 5
/// to 7 rows left over run as one group too: a 5-beam step ran 4 rows and then 1, whose two
/// accumulator chains wait on their latency (bf16 beam request 1.200 → 1.062 s, 4 interleaved
/// rounds, 2-vCPU EPYC).
#[cfg(target_arch = "x86_64")]
macro_rules! tile_body {
    ($name:ident, $block:ident, $features:literal, $tall:literal) => {
        #[target_feature(enable = $features)]
        fn $name(
            m: &Bf16Matrix,
            a: &Bf16Rows,
            start: usize,
            bias: &[f32],
            tile: &mut [f32],
            width: usize,
        ) {
            assert!(start.is_multiple_of(LANES) && tile.len() >= a.rows * width);
            let end = start + bias.len();
            let mut group = start / LANES;
            while group * LANES < end {
                let pair = group * LANES + LANES < end;
                let mut r = 0;
                while r < a.rows {
                    let take = (a.rows - r).min($tall);
                    macro_rules! run {
                        ($rg:literal, $cg:literal) => {{
                            let sums = $block::<$rg, $cg>(m, a, group, r);
                            for (row, sums) in sums.iter().enumerate() {
                                for (c, lanes) in sums.iter().enumerate() {
                                    let first = (group + c) * LANES;
                                    write_lanes(lanes, first, r + row, start, bias, tile, width);
                                }
                            }
                            $rg
                        }};
                    }
                    // Each arm computes `$rg` rows.
                    r += match (pair, take) {
                        (true, 8) => run!(8, 2),
                        (true, 7) if $tall == 8 => run!(7, 2),
                        (true, 6) if $tall == 8 => run!(6, 2),
                        (true, 5) if $tall == 8 => run!(5, 2),
                        (true, 4..) => run!(4, 2),
                        (true, 3) => run!(3, 2),
                        (true, 2) => run!(2, 2),
                        (true, _) => run!(1, 2),
                        (false, 8) => run!(8, 1),
                        (false, 4..) => run!(4, 1),
                        (false, 3) => run!(3, 1),
                        (false, 2) => run!(2, 1),
                        (false, _) => run!(1, 1),
                    };
                }
                group += if pair { 2 } else { 1 };
            }
        }
    };
}

/// Panics unless groups `group..group + cg` of `m` and rows `r..r + rg` of `a` exist: what the
/// blocks read through raw pointers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn check_block(m: &Bf16Matrix, a: &Bf16Rows, group: usize, r: usize, rg: usize, cg: usize) {
    let half = m.k / 2;
    assert!(
        (group + cg) * half * LANES <= m.pairs.len()
            && r + rg <= a.rows
            && a.pairs.len() == a.rows * half
            && (a.values.is_empty() || a.values.len() == a.rows * m.k)
            && (a.interleaved.is_empty()
                || (a.interleaved.len() == a.rows * half
                    && r % TALL + rg <= block_height(a.rows, r))),
        "bf16 tile: groups {group}+{cg} or rows {r}+{rg} out of range"
    );
}

/// Rows `r..r + RG` times groups `group..group + CG` with `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn block_avx512bf16<const RG: usize, const CG: usize>(
    m: &Bf16Matrix,
    a: &Bf16Rows,
    group: usize,
    r: usize,
) -> [[[f32; LANES]; CG]; RG] {
    use std::arch::x86_64::*;
    check_block(m, a, group, r, RG, CG);
    let half = m.k / 2;
    assert!(
        !a.interleaved.is_empty(),
        "vdpbf16ps reads interleaved rows"
    );
    let weights = m.pairs[group * half * LANES..].as_ptr();
    let height = block_height(a.rows, r);
    let x = a.interleaved[r / TALL * TALL * half + r % TALL..].as_ptr();
    let mut acc = [[_mm512_setzero_ps(); CG]; RG];
    // SAFETY: `check_block` bounds every read: weights of groups `group..group + CG`
    // (`c < CG`, `p < half`), activations of rows `r..r + RG` (`row < RG`) inside their
    // interleaved block; prefetches past the end do not fault. `__m512i` and `__m512bh` are both
    // 64 bytes of plain bits.
    unsafe {
        for p in 0..half {
            let mut w = [_mm512_setzero_si512(); CG];
            for (c, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(weights.add((c * half + p) * LANES).cast());
                if r == 0 {
                    // The first row group asks for the next groups' line into L2, as the f32
                    // and q8_0 kernels do.
                    let next = weights.wrapping_add(((CG + c) * half + p) * LANES);
                    _mm_prefetch::<_MM_HINT_T1>(next.cast());
                }
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*x.add(p * height + row) as i32));
                for (acc, w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_dpbf16_ps(*acc, std::mem::transmute::<__m512i, __m512bh>(*w), xv);
                }
            }
        }
    }
    let mut out = [[[0.0f32; LANES]; CG]; RG];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (out, acc) in out.iter_mut().zip(acc) {
            // SAFETY: `out` has room for the 16 floats stored.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }
    out
}

/// Rows `r..r + RG` times groups `group..group + CG`, the bf16 weights widened to f32 and two
/// FMAs per pair (high input first, as `vdpbf16ps`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn block_avx512<const RG: usize, const CG: usize>(
    m: &Bf16Matrix,
    a: &Bf16Rows,
    group: usize,
    r: usize,
) -> [[[f32; LANES]; CG]; RG] {
    use std::arch::x86_64::*;
    check_block(m, a, group, r, RG, CG);
    assert!(!a.values.is_empty());
    let (half, k) = (m.k / 2, m.k);
    let weights = m.pairs[group * half * LANES..].as_ptr();
    let x = a.values[r * k..].as_ptr();
    let high_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); CG]; RG];
    // SAFETY: as in `block_avx512bf16`; activations are the `RG · k` widened values from `x`.
    unsafe {
        for p in 0..half {
            let mut low = [_mm512_setzero_ps(); CG];
            let mut high = [_mm512_setzero_ps(); CG];
            for c in 0..CG {
                let w = _mm512_loadu_si512(weights.add((c * half + p) * LANES).cast());
                low[c] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                high[c] = _mm512_castsi512_ps(_mm512_and_si512(w, high_mask));
                if r == 0 {
                    let next = weights.wrapping_add(((CG + c) * half + p) * LANES);
                    _mm_prefetch::<_MM_HINT_T1>(next.cast());
                }
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let xl = _mm512_set1_ps(*x.add(row * k + 2 * p));
                let xh = _mm512_set1_ps(*x.add(row * k + 2 * p + 1));
                for c in 0..CG {
                    acc[c] = _mm512_fmadd_ps(high[c], xh, acc[c]);
                    acc[c] = _mm512_fmadd_ps(low[c], xl, acc[c]);
                }
            }
        }
    }
    let mut out = [[[0.0f32; LANES]; CG]; RG];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (out, acc) in out.iter_mut().zip(acc) {
            // SAFETY: `out` has room for the 16 floats stored.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }
    out
}

/// [`block_avx512`] in AVX2: each group of 16 outputs as two 8-lane halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2<const RG: usize, const CG: usize>(
    m: &Bf16Matrix,
    a: &Bf16Rows,
    group: usize,
    r: usize,
) -> [[[f32; LANES]; CG]; RG] {
    use std::arch::x86_64::*;
    check_block(m, a, group, r, RG, CG);
    assert!(!a.values.is_empty());
    let (half, k) = (m.k / 2, m.k);
    let weights = m.pairs[group * half * LANES..].as_ptr();
    let x = a.values[r * k..].as_ptr();
    let high_mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[[_mm256_setzero_ps(); 2]; CG]; RG];
    // SAFETY: as in `block_avx512`; each 16-lane vector is read as two 8-lane halves.
    unsafe {
        for p in 0..half {
            let mut low = [[_mm256_setzero_ps(); 2]; CG];
            let mut high = [[_mm256_setzero_ps(); 2]; CG];
            for c in 0..CG {
                for h in 0..2 {
                    let w = _mm256_loadu_si256(weights.add((c * half + p) * LANES + 8 * h).cast());
                    low[c][h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                    high[c][h] = _mm256_castsi256_ps(_mm256_and_si256(w, high_mask));
                }
                if r == 0 {
                    let next = weights.wrapping_add(((CG + c) * half + p) * LANES);
                    _mm_prefetch::<_MM_HINT_T1>(next.cast());
                }
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let xl = _mm256_set1_ps(*x.add(row * k + 2 * p));
                let xh = _mm256_set1_ps(*x.add(row * k + 2 * p + 1));
                for c in 0..CG {
                    for h in 0..2 {
                        acc[c][h] = _mm256_fmadd_ps(high[c][h], xh, acc[c][h]);
                        acc[c][h] = _mm256_fmadd_ps(low[c][h], xl, acc[c][h]);
                    }
                }
            }
        }
    }
    let mut out = [[[0.0f32; LANES]; CG]; RG];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (out, acc) in out.iter_mut().zip(acc) {
            for h in 0..2 {
                // SAFETY: `out[8h..8h + 8]` has room for the 8 floats stored.
                unsafe { _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), acc[h]) };
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
tile_body!(
    tile_avx512bf16,
    block_avx512bf16,
    "avx512f,avx512bw,avx512bf16",
    8
);
#[cfg(target_arch = "x86_64")]
tile_body!(tile_avx512, block_avx512, "avx512f,avx2,fma", 4);
#[cfg(target_arch = "x86_64")]
tile_body!(tile_avx2, block_avx2, "avx2,fma", 4);

/// One task's outputs `start..start + bias.len()` with `body`.
fn tile_with(
    body: Body,
    m: &Bf16Matrix,
    a: &Bf16Rows,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(LANES) {
        match body {
            Body::Amx => {
                // SAFETY: `Body::best` and the tests choose a body only where the CPU has its
                // features (for `Amx`, the tile state granted); `matmul_body` only keeps `Amx`
                // for whole tile steps.
                return unsafe {
                    super::bf16_amx::tile(
                        &m.pairs,
                        m.k / 2,
                        &a.pairs,
                        a.rows,
                        start,
                        bias,
                        tile,
                        width,
                    )
                };
            }
            // SAFETY: as for `Amx`.
            Body::Avx512Bf16 => return unsafe { tile_avx512bf16(m, a, start, bias, tile, width) },
            // SAFETY: as above.
            Body::Avx512 => return unsafe { tile_avx512(m, a, start, bias, tile, width) },
            // SAFETY: as above.
            Body::Avx2 => return unsafe { tile_avx2(m, a, start, bias, tile, width) },
            Body::Portable => {}
        }
    }
    tile_portable(m, a, start, bias, tile, width)
}

impl HeldWeight for Bf16Matrix {
    const NAME: &'static str = "bf16-linear";

    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn matmul(&self, x: &[f32], rows: usize, bias: &[f32], epilogue: Epilogue) -> Vec<f32> {
        // In each task, on the tile it has just computed.
        let isa = Isa::active();
        self.matmul_body(Body::best(isa), x, rows, bias, epilogue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    #[test]
    fn rounding_is_nearest_even_and_matches_the_instruction() {
        assert_eq!(round_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties go to the even 1 + 2⁻⁶.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round_bf16(-2.0), 0xc000);
        assert_eq!(round_bf16(f32::MAX), 0x7f80, "overflows to infinity");
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(round_bf16(-1e-40), 0x8000, "denormals flush to zero");
        assert!(widen(round_bf16(f32::NAN)).is_nan());
        for v in values(&mut 9u32, 1000, 3.0) {
            let rounded = widen(round_bf16(v));
            assert!((rounded - v).abs() <= v.abs() / 256.0, "{v} → {rounded}");
            assert_eq!(round_bf16(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        // The instruction rounds alike, edge cases included.
        let mut x = values(&mut 5u32, 96, 10.0);
        x[..8].copy_from_slice(&[
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
            -1e-40,
            f32::NAN,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
        ]);
        let mut portable = vec![0u32; 48];
        round_pairs(&x, &mut portable);
        for body in Body::available() {
            let rows = Bf16Rows::new(body, &x, 3, 32);
            assert_eq!(rows.pairs, portable, "{body:?}");
        }
    }

    fn reference(m: &Bf16Matrix, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        let (n, k) = m.shape();
        let w = m.dequantize();
        let mut y = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(widen(round_bf16(x[r * k + i]))) * f64::from(w[j * k + i]))
                    .sum();
                y[r * n + j] = s as f32 + bias[j];
            }
        }
        y
    }

    #[test]
    fn every_body_matches_the_portable_reference() {
        let mut seed = 11u32;
        for (rows, n, k) in [
            (1, 4, 2),
            (3, 70, 96),
            (9, 131, 64),
            (5, 64, 768),
            (2, 17, 34),
            (1, 200, 768),
            (17, 33, 40),
            (13, 40, 64),
            (6, 48, 64),
            (7, 40, 32),
            // Whole AMX tile steps (k a multiple of 32) with 16-row tiles and a short last one.
            (17, 70, 64),
            (33, 131, 96),
            (48, 200, 768),
            (16, 64, 3072),
            (80, 40, 64),
            (65, 33, 32),
            (130, 20, 96),
        ] {
            let w = values(&mut seed, n * k, 0.5);
            let x = values(&mut seed, rows * k, 2.0);
            let bias = values(&mut seed, n, 0.5);
            let m = Bf16Matrix::pack(&w, n, k, Source::OutIn);
            // Packing from the transposed layout gives the same matrix.
            let transposed: Vec<f32> = (0..k)
                .flat_map(|i| w.iter().skip(i).step_by(k).copied().collect::<Vec<_>>())
                .collect();
            assert_eq!(
                Bf16Matrix::pack(&transposed, n, k, Source::InOut).pairs,
                m.pairs
            );
            for (a, b) in m.dequantize().iter().zip(&w) {
                assert!((a - b).abs() <= b.abs() / 256.0, "weight rounding");
            }
            let expected = reference(&m, &x, rows, &bias);
            let magnitudes = {
                let w = m.dequantize();
                (0..rows * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        (0..k)
                            .map(|c| (x[r * k + c] * w[j * k + c]).abs())
                            .sum::<f32>()
                    })
                    .collect::<Vec<f32>>()
            };
            let portable = m.matmul_body(Body::Portable, &x, rows, &bias, Epilogue::Plain);
            for (o, e) in portable.iter().zip(&expected) {
                assert!(
                    (o - e).abs() < 1e-4,
                    "portable ({rows},{n},{k}): {o} vs {e}"
                );
            }
            for body in Body::available() {
                let ours = m.matmul_body(body, &x, rows, &bias, Epilogue::Plain);
                for (i, (o, e)) in ours.iter().zip(&portable).enumerate() {
                    assert!(
                        (o - e).abs() < 1e-5 || body == Body::Amx,
                        "{body:?} ({rows},{n},{k}) [{i}]: {o} vs {e}"
                    );
                    // The tile unit adds in its own order, so its bound scales with the sum of
                    // |products| (long sums of large terms drift past 1e-5).
                    assert!(
                        (o - e).abs() <= 1e-6 * magnitudes[i] + 1e-6,
                        "{body:?} ({rows},{n},{k}) [{i}]: {o} vs {e}"
                    );
                }
                if !matches!(body, Body::Avx512Bf16 | Body::Amx) {
                    // Exact products and the same order of additions: the same bits.
                    assert_eq!(ours, portable, "{body:?}");
                }
            }
            for isa in Isa::available() {
                let ours = m.matmul_with(isa, &x, rows, &bias);
                assert_eq!(ours.len(), rows * n, "{isa}");
            }
        }
    }

    #[test]
    fn rows_and_gather_read_back_the_rounded_weights() {
        let (n, k) = (37, 10);
        let w = values(&mut 4u32, n * k, 1.0);
        let m = Bf16Matrix::pack(&w, n, k, Source::OutIn);
        let rows = m.gather(&[36, 0, 17]);
        for (r, &j) in [36usize, 0, 17].iter().enumerate() {
            for i in 0..k {
                assert_eq!(rows[r * k + i], widen(round_bf16(w[j * k + i])));
            }
        }
        assert_eq!(m.bytes(), 3 * 16 * k * 2);
    }

    /// `cargo test --release -p gpt2-model --lib bf16_bandwidth -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn bf16_bandwidth() {
        for (n, k, rows) in [
            (50257, 768, 1),
            (3072, 768, 1),
            (768, 3072, 1),
            (50257, 768, 3),
            (3072, 768, 5),
            (3072, 768, 48),
        ] {
            let w = values(&mut 1u32, n * k, 0.5);
            let x = values(&mut 2u32, rows * k, 0.5);
            let bias = vec![0.0; n];
            let m = Bf16Matrix::pack(&w, n, k, Source::OutIn);
            let time = |f: &dyn Fn()| {
                let mut best = f64::MAX;
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            for body in Body::available() {
                let s = time(&|| {
                    std::hint::black_box(m.matmul_body(body, &x, rows, &bias, Epilogue::Plain));
                });
                println!(
                    "({n},{k})x{rows} {body:?}: {:.3} ms, {:.1} GB/s",
                    s * 1e3,
                    (n * k * 2) as f64 / s / 1e9
                );
            }
            let s = time(&|| {
                std::hint::black_box(crate::kernels::matmul_f32::small_rows_matmul(
                    &x,
                    rows,
                    &w,
                    n,
                    k,
                    Some(&bias),
                ));
            });
            println!(
                "({n},{k})x{rows} f32: {:.3} ms, {:.1} GB/s",
                s * 1e3,
                (n * k * 4) as f64 / s / 1e9
            );
        }
    }

    /// `cargo test --release -p gpt2-model --lib bf16_prefill_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn bf16_prefill_throughput() {
        let rows = 512;
        for (n, k) in [(2304, 768), (768, 768), (3072, 768), (768, 3072)] {
            let w = values(&mut 1u32, n * k, 0.5);
            let x = values(&mut 2u32, rows * k, 0.5);
            let bias = vec![0.0; n];
            let m = Bf16Matrix::pack(&w, n, k, Source::InOut);
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                std::hint::black_box(m.matmul_body(
                    Body::best(Isa::active()),
                    &x,
                    rows,
                    &bias,
                    Epilogue::Plain,
                ));
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!(
                "({n},{k})x{rows}: {:.3} ms, {:.1} GFLOP/s",
                median * 1e3,
                2.0 * (n * k * rows) as f64 / median / 1e9
            );
        }
    }

    #[test]
    #[should_panic(expected = "bf16 matmul")]
    fn inputs_of_the_wrong_width_are_refused() {
        let m = Bf16Matrix::pack(&[0.0; 2 * 4], 2, 4, Source::OutIn);
        m.matmul(&[0.0; 3], 1, &[0.0, 0.0]);
    }
}
