//! Layer norm over the last dimension, with the arithmetic of `candle_nn::ops::layer_norm` (the
//! same sums in the same order, so the same bits), without a parallel pass for a few rows.
//!
//! candle's op splits every call over the rayon pool, one task per row. A decode step calls it
//! 25 times on 1 to 5 rows of 768 (about a microsecond of work per row): each call was a
//! fork-join that woke the pool's other thread only to have it spin in `sched_yield` until the
//! next one.

use rayon::prelude::*;

/// Rows per parallel task: below this many rows the whole call runs on the caller's thread.
const TASK_ROWS: usize = 16;

/// `(x − mean) / sqrt(var + eps) · weight + bias` for each row of `dim` values of `xs`.
///
/// Panics unless `xs` holds whole rows and `weight` and `bias` hold `dim` values each.
pub(crate) fn layer_norm(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    assert!(
        dim > 0 && bias.len() == dim && xs.len().is_multiple_of(dim),
        "layer norm: {} values in rows of {dim}, {} biases",
        xs.len(),
        bias.len()
    );
    let mut out = vec![0.0f32; xs.len()];
    let row = |(src, dst): (&[f32], &mut [f32])| normalize_row(src, dst, weight, bias, eps);
    if xs.len() / dim < 2 * TASK_ROWS {
        xs.chunks(dim).zip(out.chunks_mut(dim)).for_each(row);
    } else {
        xs.par_chunks(dim)
            .zip(out.par_chunks_mut(dim))
            .with_min_len(TASK_ROWS)
            .for_each(row);
    }
    out
}

/// One row, in candle's order: both sums in one sequential pass, `var = E[x²] − mean²`.
fn normalize_row(src: &[f32], dst: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let (mut sum, mut sum2) = (0f32, 0f32);
    for &v in src {
        sum += v;
        sum2 += v * v;
    }
    let dim = src.len() as f32;
    let mean = sum / dim;
    let var = sum2 / dim - mean * mean;
    let inv_std = (var + eps).sqrt().recip();
    for ((d, &s), (&w, &b)) in dst.iter_mut().zip(src).zip(weight.iter().zip(bias)) {
        *d = (s - mean) * inv_std * w + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;
    use candle_core::{Device, Tensor};

    #[test]
    fn gives_the_bits_of_candles_layer_norm_serial_and_parallel() {
        let mut seed = 11u32;
        let dim = 768;
        let weight = values(&mut seed, dim, 1.0);
        let bias = values(&mut seed, dim, 0.5);
        for rows in [1, 3, 31, 32, 100] {
            let xs: Vec<f32> = values(&mut seed, rows * dim, 2.0)
                .into_iter()
                .map(|v| v + 0.3)
                .collect();
            let ours = layer_norm(&xs, &weight, &bias, 1e-5);
            let device = Device::Cpu;
            let theirs = candle_nn::ops::layer_norm(
                &Tensor::from_vec(xs, (rows, dim), &device).unwrap(),
                &Tensor::new(weight.as_slice(), &device).unwrap(),
                &Tensor::new(bias.as_slice(), &device).unwrap(),
                1e-5,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ours), bits(&theirs), "{rows} rows");
        }
    }

    #[test]
    #[should_panic(expected = "layer norm")]
    fn partial_rows_are_refused() {
        layer_norm(&[1.0; 5], &[1.0; 4], &[0.0; 4], 1e-5);
    }
}
