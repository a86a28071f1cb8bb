//! The decode-step matmul of an f32 weight matrix stored `(out, in)`: an LM head that a q8_0 or
//! bf16 model keeps in f32 because its shape does not fit that format (f32 models store every
//! layer and the LM head in the GEMM's panels instead, `panel_f32.rs`).
//!
//! During decoding each sequence contributes one row, so a step multiplies a handful of rows by
//! every weight matrix. gemm is shaped for large M and reaches a fraction of memory bandwidth
//! there; this kernel streams each weight row once and dots it with every activation row while it
//! sits in L1, so a step reads the weights exactly once for the whole batch.
//!
//! The arithmetic is written over fixed-width lane arrays, which LLVM turns into SIMD without
//! reassociating floats; the same body is compiled for AVX-512, AVX2+FMA and baseline x86-64, and
//! the level to run is picked at run time ([`Isa`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use super::{by_column_ranges, Isa};

/// Lanes per accumulator: one AVX-512 register, two AVX2 registers.
const LANES: usize = 16;
/// Weight rows processed together, so each activation load feeds several FMAs.
const ROW_BLOCK: usize = 4;

#[inline(always)]
fn multiply_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `out[r][j] = x[r] · w[j] + bias[j]` for the weight rows `w` of one task.
#[inline(always)]
fn dot_rows<const FMA: bool>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let n = bias.len();
    let full_lanes = k / LANES * LANES;
    let mut j = 0;
    while j < n {
        let block = ROW_BLOCK.min(n - j);
        if block == ROW_BLOCK {
            let w0 = &w[j * k..(j + 1) * k];
            let w1 = &w[(j + 1) * k..(j + 2) * k];
            let w2 = &w[(j + 2) * k..(j + 3) * k];
            let w3 = &w[(j + 3) * k..(j + 4) * k];
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let mut acc = [[0.0f32; LANES]; ROW_BLOCK];
                let mut i = 0;
                while i < full_lanes {
                    let xs = &xr[i..i + LANES];
                    for l in 0..LANES {
                        acc[0][l] = multiply_add::<FMA>(xs[l], w0[i + l], acc[0][l]);
                        acc[1][l] = multiply_add::<FMA>(xs[l], w1[i + l], acc[1][l]);
                        acc[2][l] = multiply_add::<FMA>(xs[l], w2[i + l], acc[2][l]);
                        acc[3][l] = multiply_add::<FMA>(xs[l], w3[i + l], acc[3][l]);
                    }
                    i += LANES;
                }
                let mut sums = [0.0f32; ROW_BLOCK];
                for (b, sum) in sums.iter_mut().enumerate() {
                    *sum = acc[b].iter().sum();
                }
                for i in full_lanes..k {
                    sums[0] = multiply_add::<FMA>(xr[i], w0[i], sums[0]);
                    sums[1] = multiply_add::<FMA>(xr[i], w1[i], sums[1]);
                    sums[2] = multiply_add::<FMA>(xr[i], w2[i], sums[2]);
                    sums[3] = multiply_add::<FMA>(xr[i], w3[i], sums[3]);
                }
                for (b, sum) in sums.iter().enumerate() {
                    out[r * out_stride + j + b] = sum + bias[j + b];
                }
            }
        } else {
            for jj in j..j + block {
                let wj = &w[jj * k..(jj + 1) * k];
                for r in 0..rows {
                    let xr = &x[r * k..(r + 1) * k];
                    let mut acc = [0.0f32; LANES];
                    let mut i = 0;
                    while i < full_lanes {
                        for l in 0..LANES {
                            acc[l] = multiply_add::<FMA>(xr[i + l], wj[i + l], acc[l]);
                        }
                        i += LANES;
                    }
                    let mut sum: f32 = acc.iter().sum();
                    for i in full_lanes..k {
                        sum = multiply_add::<FMA>(xr[i], wj[i], sum);
                    }
                    out[r * out_stride + jj] = sum + bias[jj];
                }
            }
        }
        j += block;
    }
}

/// The same computation as [`dot_rows`] with explicit vector intrinsics, for one instruction set.
/// Written as a macro so the AVX-512 and AVX2 versions cannot drift apart.
///
/// Each block of [`ROW_BLOCK`] weight rows is streamed once per group of up to `$rows` activation
/// rows (6 with AVX-512's 32 registers, 4 with AVX2's 16), every weight vector feeding one FMA per
/// row of the group; while the first group runs, the next block's weights are prefetched so that
/// memory never idles during arithmetic. Six rather than four: a 5-beam step ran a group of 4 and
/// then one of 1, whose 4 FMA chains wait on their latency; the LM head took 5.3 ms for 5 rows
/// against 4.5 for 1, and takes the same time for both with one group (2-vCPU EPYC).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_dot_rows {
    ($name:ident, $group:ident, $features:literal, $rows:literal, $width:expr, $vector:ty, $zero:ident, $load:ident, $fma:ident, $sum:expr) => {
        /// `RG` activation rows from `xr` (row stride `k`) dotted with the four weight rows
        /// from `w0` (row stride `k`).
        ///
        /// # Safety
        /// The CPU has the target features; `xr` points to `RG · k` readable floats and `w0` to
        /// `ROW_BLOCK · k`. `prefetch` may point anywhere (prefetches do not fault).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $group<const RG: usize>(
            xr: *const f32,
            k: usize,
            w0: *const f32,
            prefetch: Option<*const f32>,
        ) -> [[f32; ROW_BLOCK]; RG] {
            use std::arch::x86_64::*;
            let vector_end = k / $width * $width;
            let mut acc: [[$vector; ROW_BLOCK]; RG] = [[$zero(); ROW_BLOCK]; RG];
            let mut i = 0;
            while i < vector_end {
                // SAFETY: `i + width ≤ k`, inside the caller's four weight rows.
                let w = unsafe {
                    [
                        $load(w0.add(i)),
                        $load(w0.add(k + i)),
                        $load(w0.add(2 * k + i)),
                        $load(w0.add(3 * k + i)),
                    ]
                };
                if let Some(next) = prefetch {
                    // One prefetch per 64-byte line of each of the next block's rows, into L2:
                    // prefetching into L1 measured ~10-25% slower (it competes with the loads).
                    if (i * 4) % 64 == 0 {
                        for b in 0..ROW_BLOCK {
                            // A prefetch never faults, whatever the address.
                            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(b * k + i) as *const i8);
                        }
                    }
                }
                for r in 0..RG {
                    // SAFETY: `i + width ≤ k`, inside the caller's `RG` activation rows.
                    let xv = unsafe { $load(xr.add(r * k + i)) };
                    for b in 0..ROW_BLOCK {
                        acc[r][b] = $fma(xv, w[b], acc[r][b]);
                    }
                }
                i += $width;
            }
            let mut sums = [[0.0f32; ROW_BLOCK]; RG];
            for r in 0..RG {
                for b in 0..ROW_BLOCK {
                    let mut sum = $sum(acc[r][b]);
                    for t in vector_end..k {
                        // SAFETY: `t < k`, inside the caller's rows.
                        let (x, w) = unsafe { (*xr.add(r * k + t), *w0.add(b * k + t)) };
                        sum = x.mul_add(w, sum);
                    }
                    sums[r][b] = sum;
                }
            }
            sums
        }

        /// [`dot_rows`] for one instruction set; the caller checked the slices' lengths
        /// ([`check_lengths`]).
        #[target_feature(enable = $features)]
        fn $name(
            x: &[f32],
            rows: usize,
            k: usize,
            w: &[f32],
            bias: &[f32],
            out: &mut [f32],
            stride: usize,
        ) {
            let n = bias.len();
            check_lengths(x, rows, k, w, n, out, stride);
            let mut j = 0;
            while j + ROW_BLOCK <= n {
                let w0 = w[j * k..].as_ptr();
                let next = (j + 2 * ROW_BLOCK <= n).then(|| w0.wrapping_add(ROW_BLOCK * k));
                let mut r = 0;
                while r < rows {
                    let group = rows.min(r + $rows) - r;
                    let xr = x[r * k..].as_ptr();
                    let prefetch = if r == 0 { next } else { None };
                    let mut store = |sums: &[[f32; ROW_BLOCK]]| {
                        for (g, row) in sums.iter().enumerate() {
                            for b in 0..ROW_BLOCK {
                                out[(r + g) * stride + j + b] = row[b] + bias[j + b];
                            }
                        }
                    };
                    // SAFETY: this function has the target features; `check_lengths` showed that
                    // `x` holds the `group ≤ rows − r` rows from `xr` and `w` the `ROW_BLOCK`
                    // rows from `w0` (`j + ROW_BLOCK ≤ n`), `k` floats each.
                    unsafe {
                        match group {
                            6 => store(&$group::<6>(xr, k, w0, prefetch)),
                            5 => store(&$group::<5>(xr, k, w0, prefetch)),
                            4 => store(&$group::<4>(xr, k, w0, prefetch)),
                            3 => store(&$group::<3>(xr, k, w0, prefetch)),
                            2 => store(&$group::<2>(xr, k, w0, prefetch)),
                            _ => store(&$group::<1>(xr, k, w0, prefetch)),
                        }
                    }
                    r += group;
                }
                j += ROW_BLOCK;
            }
            if j < n {
                dot_rows::<true>(x, rows, k, &w[j * k..], &bias[j..], &mut out[j..], stride);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sum_avx2(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` has room for the 8 floats stored.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// Panics unless `x` holds `rows` rows of `k`, `w` holds `n` rows of `k`, and `out` holds `rows`
/// rows of stride `stride` with room for `n` values each: what the SIMD bodies read and write
/// through raw pointers.
fn check_lengths(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &[f32],
    stride: usize,
) {
    assert!(
        x.len() >= rows * k
            && w.len() >= n * k
            && (rows == 0 || (stride >= n && out.len() >= (rows - 1) * stride + n)),
        "f32 matmul: {rows}×{k} input ({}), {n}×{k} weights ({}), output {} at stride {stride}",
        x.len(),
        w.len(),
        out.len()
    );
}

#[cfg(target_arch = "x86_64")]
simd_dot_rows!(
    dot_rows_avx512,
    group_avx512,
    "avx512f,avx2,fma",
    6,
    16,
    std::arch::x86_64::__m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    |v| _mm512_reduce_add_ps(v)
);

#[cfg(target_arch = "x86_64")]
simd_dot_rows!(
    dot_rows_avx2,
    group_avx2,
    "avx2,fma",
    4,
    8,
    std::arch::x86_64::__m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    |v| sum_avx2(v)
);

/// Dispatches one task to the body compiled for `isa`, or the portable one if the CPU lacks it.
#[allow(clippy::too_many_arguments)]
fn dot_rows_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    // The SIMD bodies check the lengths they rely on themselves; the portable one indexes slices.
    match isa {
        // SAFETY: the CPU was checked for the features these functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe {
            dot_rows_avx512(x, rows, k, w, bias, out, stride)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe {
            dot_rows_avx2(x, rows, k, w, bias, out, stride)
        },
        _ => dot_rows::<false>(x, rows, k, w, bias, out, stride),
    }
}

/// `y = x · wᵀ + bias` with `x`: `(rows, k)`, `w`: `(n, k)`, `bias`: `n` (zeros when absent),
/// `y`: `(rows, n)`, all row-major and contiguous.
pub(crate) fn small_rows_matmul(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    small_rows_matmul_with(Isa::active(), x, rows, w, n, k, bias)
}

/// [`small_rows_matmul`] on the kernel compiled for `isa`.
pub(crate) fn small_rows_matmul_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        x.len() >= rows * k && w.len() >= n * k && bias.is_none_or(|b| b.len() >= n),
        "f32 matmul: {rows}×{k} input ({}), {n}×{k} weights ({})",
        x.len(),
        w.len()
    );
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0.0f32; n];
            &zeros
        }
    };
    by_column_ranges(rows, n, |start, end, tile, width| {
        dot_rows_with(
            isa,
            x,
            rows,
            k,
            &w[start * k..end * k],
            &bias[start..end],
            tile,
            width,
        )
    })
}

/// `x · wᵀ + b` as a candle op: a decode step's rows, however many.
pub(crate) struct SmallRowsMatmul;

impl CustomOp3 for SmallRowsMatmul {
    fn name(&self) -> &'static str {
        "small-rows-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, rows, w, n, k, b) = super::linear_inputs(
            "small-rows-matmul",
            (x, x_layout),
            (w, w_layout),
            (b, b_layout),
        )?;
        let y = small_rows_matmul(x, rows, w, n, k, Some(b));
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize, bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += f64::from(x[r * k + i]) * f64::from(w[j * k + i]);
                }
                y[r * n + j] = s as f32 + bias[j];
            }
        }
        y
    }

    #[test]
    fn every_instruction_set_matches_a_plain_matmul_for_awkward_shapes() {
        let mut seed = 1u32;
        for (rows, n, k) in [
            (1, 1, 1),
            (3, 7, 33),
            (16, 130, 768),
            (5, 64, 17),
            (2, 257, 64),
            (7, 9, 8),
        ] {
            let x = values(&mut seed, rows * k, 0.5);
            let w = values(&mut seed, n * k, 0.5);
            let b = values(&mut seed, n, 0.5);
            let expected = reference(&x, rows, &w, n, k, &b);
            for isa in Isa::available() {
                let ours = small_rows_matmul_with(isa, &x, rows, &w, n, k, Some(&b));
                for (o, e) in ours.iter().zip(&expected) {
                    assert!((o - e).abs() < 1e-4, "{isa} ({rows},{n},{k}): {o} vs {e}");
                }
            }
            let unbiased = small_rows_matmul(&x, rows, &w, n, k, None);
            let zeros = vec![0.0; n];
            for (o, e) in unbiased.iter().zip(reference(&x, rows, &w, n, k, &zeros)) {
                assert!((o - e).abs() < 1e-4, "no bias ({rows},{n},{k})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "f32 matmul")]
    fn short_weights_are_refused_before_any_pointer_read() {
        let x = vec![0.0; 2 * 16];
        let w = vec![0.0; 3 * 16];
        small_rows_matmul_with(Isa::detect(), &x, 2, &w, 4, 16, None);
    }
}
