//! GPT-2's activation, `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, vectorized.
//!
//! libm's `tanhf` is a scalar call per element and cost about a tenth of a q8_0 decode step. This
//! version is branch-free (Cephes' `tanhf` and `expf` polynomials, both branches evaluated and one
//! selected), so LLVM vectorizes it; it stays within a few float ulps of `tanhf`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use gpt2_simd::exp;
use rayon::prelude::*;

use super::Isa;

/// Elements per parallel task, for prefill-sized inputs.
const TASK_ELEMENTS: usize = 1 << 16;

/// `tanh(x)` (Cephes `tanhf`: an odd polynomial below 0.625, `1 − 2/(e^{2|x|} + 1)` above).
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let z = x.abs();
    let s = x * x;
    let small =
        ((((-5.704_988_7e-3 * s + 2.063_909e-2) * s - 5.373_971_6e-2) * s + 1.333_144_2e-1) * s
            - 3.333_328e-1)
            * s
            * x
            + x;
    // Clamping keeps e^{2|x|} finite; 2/(e^88 + 1) is already far below one ulp of 1.
    let large = 1.0 - 2.0 / (exp(2.0 * z.min(44.0)) + 1.0);
    if z < 0.625 {
        small
    } else {
        large.copysign(x)
    }
}

#[inline(always)]
fn gelu_tanh_body(values: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for v in values {
        let x = *v;
        *v = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn gelu_tanh_avx512(values: &mut [f32]) {
    gelu_tanh_body(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn gelu_tanh_avx2(values: &mut [f32]) {
    gelu_tanh_body(values)
}

/// `gelu_new` in place, on one thread, with the body compiled for `isa`.
fn gelu_tanh_serial_with(isa: Isa, values: &mut [f32]) {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe { gelu_tanh_avx512(values) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe { gelu_tanh_avx2(values) },
        _ => gelu_tanh_body(values),
    }
}

pub(crate) fn gelu_tanh_serial(values: &mut [f32]) {
    gelu_tanh_serial_with(Isa::active(), values)
}

/// Applies `gelu_new` in place.
pub(crate) fn gelu_tanh_in_place(values: &mut [f32]) {
    if values.len() <= TASK_ELEMENTS {
        gelu_tanh_serial(values)
    } else {
        values
            .par_chunks_mut(TASK_ELEMENTS)
            .for_each(gelu_tanh_serial)
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu-tanh needs a contiguous f32 tensor");
        };
        let mut out = values[start..end].to_vec();
        gelu_tanh_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// [`GeluTanh`] over the tensor's own storage.
struct GeluTanhInPlace;

impl candle_core::InplaceOp1 for GeluTanhInPlace {
    fn name(&self) -> &'static str {
        "gelu-tanh-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu-tanh needs a contiguous f32 tensor");
        };
        gelu_tanh_in_place(&mut values[start..end]);
        Ok(())
    }
}

/// [`gelu_tanh`] of a tensor nothing else shares, computed in its own storage: a 512-token
/// prefill's MLP activations are 6 MB per layer, and copying them into fresh pages first (one
/// thread, a page fault per 4 KiB) took 3 of the 4 ms of the activation (2-vCPU EPYC).
pub(crate) fn gelu_tanh_owned(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != candle_core::DType::F32 || !xs.device().is_cpu() || !xs.is_contiguous() {
        return gelu_tanh(&xs);
    }
    xs.inplace_op1(&GeluTanhInPlace)?;
    Ok(xs)
}

/// `gelu_new` of an f32 tensor on the CPU; other tensors go to candle's own `gelu`.
pub(crate) fn gelu_tanh(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != candle_core::DType::F32 || !xs.device().is_cpu() {
        return xs.gelu();
    }
    xs.contiguous()?.apply_op1_no_bwd(&GeluTanh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: f32) -> f32 {
        let x = f64::from(x);
        (0.5 * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()))
            as f32
    }

    #[test]
    fn matches_the_exact_formula_to_float_precision() {
        let inputs: Vec<f32> = (-40_000..=40_000)
            .map(|i| i as f32 * 3e-4)
            .chain([-1e4, -100.0, -12.0, 12.0, 100.0, 1e4, 0.0, -0.0])
            .collect();
        for isa in Isa::available() {
            let mut got = inputs.clone();
            gelu_tanh_serial_with(isa, &mut got);
            for (x, got) in inputs.iter().zip(&got) {
                let want = reference(*x);
                // tanh near ±1 is only known to an ulp of 1, which 0.5·x scales.
                let tolerance = f32::EPSILON * (x.abs() + 4.0 * want.abs());
                assert!(
                    (got - want).abs() <= tolerance,
                    "{isa}: gelu({x}) = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn large_inputs_take_the_parallel_path_with_the_same_values() {
        let inputs: Vec<f32> = (0..3 * TASK_ELEMENTS + 17)
            .map(|i| (i % 2000) as f32 * 1e-2 - 10.0)
            .collect();
        let mut parallel = inputs.clone();
        gelu_tanh_in_place(&mut parallel);
        let mut serial = inputs;
        gelu_tanh_serial(&mut serial);
        assert_eq!(parallel, serial);
    }
}
