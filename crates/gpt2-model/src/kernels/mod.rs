//! The hand-written CPU kernels of a decode step, one file per family, each with its portable
//! reference beside its SIMD versions:
//!
//! | file | what |
//! | --- | --- |
//! | `matmul_f32.rs` | a few activation rows times an f32 weight matrix `(out, in)` (an LM head kept in f32 by a q8_0 or bf16 model) |
//! | `gemm_f32.rs` | activation rows times an f32 weight matrix, packed panels, any row count |
//! | `panel_f32.rs` | f32 weights (layers and LM head) stored in the GEMM's panels: one kernel for every row count |
//! | `q8_0.rs` | q8_0 weights (ggml's 8-bit blocks) and their integer matmul |
//! | `bf16.rs` | bf16 weights and their matmul (`vdpbf16ps`, or widening and FMA) |
//! | `bf16_amx.rs` | the bf16 matmul on Intel AMX tiles (`tdpbf16ps`) |
//! | `attention.rs` | one query per head over its cached keys and values (a decode step) |
//! | `causal_attention.rs` | a prefill chunk's queries per head, each to its own position |
//! | `activation.rs` | `gelu_new` without libm |
//! | `layer_norm.rs` | layer norm with candle's arithmetic, on the caller's thread for a few rows |
//!
//! Every family follows one pattern: a safe `*_with(isa, …)` entry point checks the slice
//! lengths its SIMD bodies rely on and runs the body compiled for that [`Isa`] (falling back to
//! the portable one when the CPU lacks it); the plain entry point passes [`Isa::active`], which
//! `GPT2_ISA` can pin. Tests call `*_with` for every level the CPU has and compare each with a
//! plain reference, so no path goes untested on a wide machine.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_amx;
pub(crate) mod causal_attention;
pub(crate) mod gemm_f32;
pub(crate) mod layer_norm;
pub(crate) mod matmul_f32;
pub(crate) mod panel_f32;
pub(crate) mod q8_0;

use candle_core::{CpuStorage, Layout};
pub(crate) use gpt2_simd::Isa;
use rayon::prelude::*;

/// Output columns per parallel task: large enough to amortise scheduling, small enough to
/// spread a 768-wide projection over two cores.
const TASK_COLUMNS: usize = 64;

/// Splits the `n` output columns of a `(rows, n)` result into ranges computed in parallel: each
/// task fills a `(rows, width)` tile for columns `start..end` (row stride `width`), and the tiles
/// are copied into place, by the pool's threads when the result is large (serially, the zeroing
/// and the copy of a 512-row prefill's outputs left a quarter of the two threads idle in a bf16
/// prefill).
pub(crate) fn by_column_ranges(
    rows: usize,
    n: usize,
    compute: impl Fn(usize, usize, &mut [f32], usize) + Sync,
) -> Vec<f32> {
    let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(TASK_COLUMNS))
        .into_par_iter()
        .map(|task| {
            let start = task * TASK_COLUMNS;
            let end = (start + TASK_COLUMNS).min(n);
            let width = end - start;
            let mut tile = vec![0.0f32; rows * width];
            compute(start, end, &mut tile, width);
            (start, tile)
        })
        .collect();
    let mut y = zeroed_output(rows * n);
    let place = |r: usize, row: &mut [f32]| {
        for (start, tile) in &tiles {
            let width = tile.len() / rows.max(1);
            row[*start..*start + width].copy_from_slice(&tile[r * width..(r + 1) * width]);
        }
    };
    if y.len() >= LARGE_OUTPUT {
        y.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(r, row)| place(r, row));
    } else {
        for (r, row) in y.chunks_mut(n.max(1)).enumerate() {
            place(r, row);
        }
    }
    y
}

/// Writes the outputs of a tile that a group of 16 lanes (outputs `first..first + 16`) holds for
/// `row`, with the bias added: a tile covers outputs `start..start + bias.len()`, row stride
/// `width`. Shared by the bf16 and q8_0 tile bodies.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_lanes(
    lanes: &[f32; 16],
    first: usize,
    row: usize,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    let end = start + bias.len();
    if first >= start && first + 16 <= end {
        // The whole group: one vector add and store where the caller's features allow (lane by
        // lane with bounds checks, the stores were 9% of a 512-row prefill tile's samples).
        let out = &mut tile[row * width + first - start..][..16];
        for ((out, value), bias) in out.iter_mut().zip(lanes).zip(&bias[first - start..]) {
            *out = value + bias;
        }
        return;
    }
    for (lane, value) in lanes.iter().enumerate() {
        let column = first + lane;
        if column >= start && column < end {
            tile[row * width + column - start] = value + bias[column - start];
        }
    }
}

/// The f32 slices of a linear op's `(x, w, b)`, after checking their shapes: `(x, rows, w, n, k,
/// b)` for `x` `(rows, k)`, `w` `(n, k)` and `b` `(n)`, all contiguous. `name` prefixes errors.
pub(crate) fn linear_inputs<'a>(
    name: &str,
    (x, x_layout): (&'a CpuStorage, &Layout),
    (w, w_layout): (&'a CpuStorage, &Layout),
    (b, b_layout): (&'a CpuStorage, &Layout),
) -> candle_core::Result<LinearInputs<'a>> {
    let (rows, k) = x_layout.shape().dims2()?;
    let (n, wk) = w_layout.shape().dims2()?;
    if wk != k || b_layout.shape().dims1()? != n {
        candle_core::bail!(
            "{name}: shapes {:?} {:?} {:?}",
            x_layout.shape(),
            w_layout.shape(),
            b_layout.shape()
        );
    }
    let contiguous = |layout: &Layout| layout.contiguous_offsets();
    let (Some((xs, xe)), Some((ws, we)), Some((bs, be))) = (
        contiguous(x_layout),
        contiguous(w_layout),
        contiguous(b_layout),
    ) else {
        candle_core::bail!("{name} needs contiguous inputs");
    };
    let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (x, w, b) else {
        candle_core::bail!("{name} is f32 only");
    };
    Ok((&x[xs..xe], rows, &w[ws..we], n, k, &b[bs..be]))
}

/// The f32 slices of `(x, b)` for an op whose `(n, k)` weight it holds itself (bf16, q8_0,
/// prepacked f32): `(x, rows, b)` for `x` `(rows, k)` and `b` `(n)`, both contiguous, after
/// checking their shapes. `name` prefixes errors.
pub(crate) fn held_weight_inputs<'a>(
    name: &str,
    (n, k): (usize, usize),
    (x, x_layout): (&'a CpuStorage, &Layout),
    (b, b_layout): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], usize, &'a [f32])> {
    let (rows, x_k) = x_layout.shape().dims2()?;
    if x_k != k || b_layout.shape().dims1()? != n {
        candle_core::bail!(
            "{name}: input {:?} and bias {:?} for a ({n}, {k}) matrix",
            x_layout.shape(),
            b_layout.shape()
        );
    }
    let (Some((xs, xe)), Some((bs, be))) =
        (x_layout.contiguous_offsets(), b_layout.contiguous_offsets())
    else {
        candle_core::bail!("{name} needs contiguous inputs");
    };
    let (CpuStorage::F32(x), CpuStorage::F32(b)) = (x, b) else {
        candle_core::bail!("{name} is f32 only");
    };
    Ok((&x[xs..xe], rows, &b[bs..be]))
}

/// What a matmul applies to its outputs, element by element, after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// Nothing.
    Plain,
    /// GPT-2's `gelu_new` ([`activation`]): the MLP's up projection.
    GeluTanh,
}

impl Epilogue {
    /// Applies this to `values` on the calling thread.
    pub(crate) fn apply(self, values: &mut [f32]) {
        match self {
            Epilogue::Plain => {}
            Epilogue::GeluTanh => activation::gelu_tanh_serial(values),
        }
    }
}

/// A weight matrix `(n, k)` that its kernel multiplies in its own storage: f32 panels, q8_0 or
/// bf16.
pub(crate) trait HeldWeight: Sync {
    /// The candle op's name, which prefixes its errors.
    const NAME: &'static str;

    /// `(n, k)`.
    fn shape(&self) -> (usize, usize);

    /// `(rows, k)` activations times this matrix transposed, plus `bias`, then `epilogue`:
    /// `(rows, n)`.
    fn matmul(&self, x: &[f32], rows: usize, bias: &[f32], epilogue: Epilogue) -> Vec<f32>;
}

/// `x · Wᵀ + b` for `x`: `(rows, k)`, then `epilogue`: `(rows, n)`. The tensor takes the
/// kernel's vector as it is.
pub(crate) fn held_linear<W: HeldWeight>(
    x: &candle_core::Tensor,
    w: &W,
    bias: &candle_core::Tensor,
    epilogue: Epilogue,
) -> candle_core::Result<candle_core::Tensor> {
    let (values, rows) = held_matmul(x, w, bias, epilogue)?;
    candle_core::Tensor::from_vec(values, (rows, w.shape().0), x.device())
}

/// [`held_linear`]'s values, `(rows, n)` row-major, without a tensor around them: a 48-row
/// step's logits are 9.6 MB, and their copy out of a tensor took 0.8 ms of a 71 ms 16-client
/// f32 step.
pub(crate) fn held_linear_values<W: HeldWeight>(
    x: &candle_core::Tensor,
    w: &W,
    bias: &candle_core::Tensor,
) -> candle_core::Result<Vec<f32>> {
    Ok(held_matmul(x, w, bias, Epilogue::Plain)?.0)
}

/// The kernel's `(rows, n)` values for `x · Wᵀ + b` and `epilogue`, and `rows`, after checking
/// the shapes (errors name the weight's kernel).
fn held_matmul<W: HeldWeight>(
    x: &candle_core::Tensor,
    w: &W,
    bias: &candle_core::Tensor,
    epilogue: Epilogue,
) -> candle_core::Result<(Vec<f32>, usize)> {
    use candle_core::Storage::Cpu;
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (b_storage, b_layout) = bias.storage_and_layout();
    let (Cpu(x), Cpu(b)) = (&*x_storage, &*b_storage) else {
        candle_core::bail!("{} runs on the CPU", W::NAME);
    };
    let (x, rows, b) = held_weight_inputs(W::NAME, w.shape(), (x, x_layout), (b, b_layout))?;
    Ok((w.matmul(x, rows, b, epilogue), rows))
}

/// What [`linear_inputs`] returns.
pub(crate) type LinearInputs<'a> = (&'a [f32], usize, &'a [f32], usize, usize, &'a [f32]);

/// Outputs at least this large (floats) are zeroed and filled in parallel, on huge pages.
const LARGE_OUTPUT: usize = 1 << 18;

/// A zeroed `(rows, n)` output. Large ones are zeroed by the pool's threads on memory that asks
/// for huge pages, which halves the page faults when the memory is a fresh mapping: 0.2–0.6 ms
/// less of ~9.5 ms for a 512 × 2304 output when every block of 1 MiB or more was mapped afresh
/// (see `memory::return_freed_memory_to_os`).
pub(crate) fn zeroed_output(len: usize) -> Vec<f32> {
    if len < LARGE_OUTPUT {
        return vec![0.0; len];
    }
    let mut y = crate::memory::huge_page_vec::<f32>(len);
    y.par_extend(rayon::iter::repeat_n(0.0f32, len));
    y
}

/// Deterministic inputs for the kernel tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// `count` values spread uniformly over `[−amplitude, amplitude)` by a fixed LCG.
    pub(crate) fn values(seed: &mut u32, count: usize, amplitude: f32) -> Vec<f32> {
        (0..count)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((*seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * amplitude
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::bf16::{Bf16Matrix, Source};
    use super::panel_f32::PanelMatrix;
    use super::q8_0::Q8Matrix;
    use super::test_support::values;
    use super::*;

    /// Every held weight's matmul with GELU in its epilogue gives the bits of the matmul and then
    /// GELU over its whole output, at row counts that make partial tiles.
    #[test]
    fn a_gelu_epilogue_gives_the_bits_of_gelu_after_the_matmul() {
        fn check<W: HeldWeight>(w: &W, seed: &mut u32) {
            let (n, k) = w.shape();
            let bias = values(seed, n, 0.5);
            for rows in [1, 3, 5, 7, 16] {
                let x = values(seed, rows * k, 2.0);
                let mut want = w.matmul(&x, rows, &bias, Epilogue::Plain);
                activation::gelu_tanh_in_place(&mut want);
                let got = w.matmul(&x, rows, &bias, Epilogue::GeluTanh);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} at {rows} rows", W::NAME);
            }
        }
        let mut seed = 11u32;
        let (n, k) = (200, 96);
        let w = values(&mut seed, n * k, 0.5);
        check(&Q8Matrix::quantize(&w, n, k), &mut seed);
        check(&Bf16Matrix::pack(&w, n, k, Source::OutIn), &mut seed);
        check(&PanelMatrix::from_out_in(&w, n, k), &mut seed);
    }
}
