//! 8-bit weights for the decode step: ggml's q8_0 scheme (blocks of 32 int8 values sharing one
//! scale, the scale rounded to f16), dequantized on the fly and multiplied with f32 activations.
//!
//! Like the f32 kernel, each block of weight rows is streamed once per step and used for every
//! activation row while in L1, so a step reads about 1.1 bytes per weight instead of 4. The
//! activations are not quantized, so the only error is the weights' rounding.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Values per block sharing one scale.
pub(crate) const BLOCK: usize = 32;
/// Weight rows processed together.
const ROW_BLOCK: usize = 4;

/// A weight matrix `(n, k)` in q8_0: `quants[j·k + i]` times `scales[j·k/32 + i/32]`.
#[derive(Debug, Clone)]
pub(crate) struct Q8Matrix {
    n: usize,
    k: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes `(n, k)` f32 rows; `k` must be a multiple of [`BLOCK`].
    pub(crate) fn quantize(weights: &[f32], n: usize, k: usize) -> Self {
        assert!(k % BLOCK == 0 && weights.len() == n * k);
        let mut quants = vec![0i8; n * k];
        let mut scales = vec![0.0f32; n * k / BLOCK];
        quants
            .par_chunks_mut(BLOCK)
            .zip(scales.par_iter_mut())
            .zip(weights.par_chunks(BLOCK))
            .for_each(|((q, scale), w)| {
                let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = half::f16::from_f32(max / 127.0).to_f32();
                *scale = d;
                let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
                for (q, v) in q.iter_mut().zip(w) {
                    *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                }
            });
        Self {
            n,
            k,
            quants,
            scales,
        }
    }

    /// Back to f32, `(n, k)`.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        self.quants
            .iter()
            .enumerate()
            .map(|(i, &q)| f32::from(q) * self.scales[i / BLOCK])
            .collect()
    }

    /// `(n, k)`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `(rows, k)` activations times this matrix transposed, plus `bias`: `(rows, n)`.
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        crate::kernels::by_column_ranges(rows, n, |start, end, tile, width| {
            let quants = &self.quants[start * k..end * k];
            let scales = &self.scales[start * k / BLOCK..end * k / BLOCK];
            dot_rows_dispatch(x, rows, k, quants, scales, &bias[start..end], tile, width);
        })
    }
}

/// Portable version: `out[r][j] = Σ x[r][i] · q[j][i] · d[j][i/32] + bias[j]`.
#[allow(clippy::too_many_arguments)]
fn dot_rows_portable(
    x: &[f32],
    rows: usize,
    k: usize,
    q: &[i8],
    d: &[f32],
    bias: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let blocks = k / BLOCK;
    for j in 0..bias.len() {
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let mut sum = 0.0f32;
            for b in 0..blocks {
                let mut partial = [0.0f32; 8];
                for (i, (xv, qv)) in xr[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .zip(&q[j * k + b * BLOCK..j * k + (b + 1) * BLOCK])
                    .enumerate()
                {
                    partial[i % 8] += xv * f32::from(*qv);
                }
                sum += partial.iter().sum::<f32>() * d[j * blocks + b];
            }
            out[r * stride + j] = sum + bias[j];
        }
    }
}

/// AVX-512: each block of 32 int8 weights becomes two f32 vectors (times the block's scale) and
/// feeds one FMA per activation row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows_avx512(
    x: &[f32],
    rows: usize,
    k: usize,
    q: &[i8],
    d: &[f32],
    bias: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let n = bias.len();
    let blocks = k / BLOCK;
    assert!(x.len() >= rows * k && q.len() >= n * k && d.len() >= n * blocks);
    let mut j = 0;
    while j + ROW_BLOCK <= n {
        let mut r = 0;
        while r < rows {
            let group = 4.min(rows - r);
            let mut acc = [[_mm512_setzero_ps(); ROW_BLOCK]; 4];
            for b in 0..blocks {
                let mut w = [[_mm512_setzero_ps(); 2]; ROW_BLOCK];
                for (row, w_row) in w.iter_mut().enumerate() {
                    let base = q.as_ptr().add((j + row) * k + b * BLOCK);
                    let scale = _mm512_set1_ps(*d.get_unchecked((j + row) * blocks + b));
                    let low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        base as *const __m128i,
                    )));
                    let high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        base.add(16) as *const __m128i,
                    )));
                    w_row[0] = _mm512_mul_ps(low, scale);
                    w_row[1] = _mm512_mul_ps(high, scale);
                }
                for g in 0..group {
                    let xp = x.as_ptr().add((r + g) * k + b * BLOCK);
                    let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                    for (row, w_row) in w.iter().enumerate() {
                        acc[g][row] = _mm512_fmadd_ps(x0, w_row[0], acc[g][row]);
                        acc[g][row] = _mm512_fmadd_ps(x1, w_row[1], acc[g][row]);
                    }
                }
            }
            for g in 0..group {
                for row in 0..ROW_BLOCK {
                    out[(r + g) * stride + j + row] =
                        _mm512_reduce_add_ps(acc[g][row]) + bias[j + row];
                }
            }
            r += group;
        }
        j += ROW_BLOCK;
    }
    if j < n {
        dot_rows_portable(
            x,
            rows,
            k,
            &q[j * k..],
            &d[j * blocks..],
            &bias[j..],
            &mut out[j..],
            stride,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn dot_rows_dispatch(
    x: &[f32],
    rows: usize,
    k: usize,
    q: &[i8],
    d: &[f32],
    bias: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let avx512 = *AVX512.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("fma")
        });
        if avx512 {
            // SAFETY: the CPU has the features this function is compiled for.
            return unsafe { dot_rows_avx512(x, rows, k, q, d, bias, out, stride) };
        }
    }
    dot_rows_portable(x, rows, k, q, d, bias, out, stride)
}

/// `x · Wᵀ + b` with `W` in q8_0, as a candle op on `(x, b)`.
pub(crate) struct Q8Linear<'a>(pub(crate) &'a Q8Matrix);

impl CustomOp2 for Q8Linear<'_> {
    fn name(&self) -> &'static str {
        "q8-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = x_layout.shape().dims2()?;
        if k != self.0.k || b_layout.shape().dims1()? != self.0.n {
            candle_core::bail!(
                "q8-linear: input {:?} for a ({}, {}) matrix",
                x_layout.shape(),
                self.0.n,
                self.0.k
            );
        }
        let (Some((xs, xe)), Some((bs, be))) =
            (x_layout.contiguous_offsets(), b_layout.contiguous_offsets())
        else {
            candle_core::bail!("q8-linear needs contiguous inputs");
        };
        let (CpuStorage::F32(x), CpuStorage::F32(b)) = (x, b) else {
            candle_core::bail!("q8-linear is f32 only");
        };
        let y = self.0.matmul(&x[xs..xe], rows, &b[bs..be]);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.n))))
    }
}

/// `x · Wᵀ + b` for `x`: `(rows, k)`.
pub(crate) fn q8_linear(x: &Tensor, w: &Q8Matrix, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(bias, &Q8Linear(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_dequantized_reference() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (rows, n, k) in [(1, 4, 32), (3, 70, 96), (9, 131, 64)] {
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let q = Q8Matrix::quantize(&w, n, k);
            let dq = q.dequantize();
            for (a, b) in dq.iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 0.5 / 127.0 + 1e-3,
                    "rounding within half a step"
                );
            }
            let y = q.matmul(&x, rows, &bias);
            let mut portable = vec![0.0f32; rows * n];
            dot_rows_portable(&x, rows, k, &q.quants, &q.scales, &bias, &mut portable, n);
            for r in 0..rows {
                for j in 0..n {
                    let reference: f32 =
                        (0..k).map(|i| x[r * k + i] * dq[j * k + i]).sum::<f32>() + bias[j];
                    assert!(
                        (y[r * n + j] - reference).abs() < 1e-4,
                        "({rows},{n},{k}) [{r},{j}]"
                    );
                    assert!((portable[r * n + j] - reference).abs() < 1e-4);
                }
            }
        }
    }
}
