//! f32 weights stored the way the GEMM reads them, so that one kernel serves every row count.
//!
//! The f32 linear layers used to run two kernels: the streaming dot products of
//! `matmul_f32.rs` for decode steps and the packed-panel GEMM of `gemm_f32.rs` for prefills,
//! which packs each weight panel afresh at every call. Their arithmetic differs, so a prompt's
//! chunk could not share a decode step's pass over the weights, and each pass that held both
//! read every weight twice. Stored once in the GEMM's panel layout at load, the weights need no
//! packing, and a step of one row, a step of 64 and a 512-token chunk all run the same tile,
//! whose every output is one FMA chain in the order of `k` (see `gemm_f32.rs`): a row's bits
//! never depend on the rows beside it.
//!
//! For the blocks' layers the layout is the checkpoint's own `(in, out)` order cut into column
//! panels, so loading is a copy of 128-byte runs (no transpose). The LM head is `(out, in)` (the
//! token embeddings when tied): its panels are transposed at load, and the embedding lookups
//! gather their rows from them.

use super::gemm_f32::{gemm_prepacked_with, PANEL};
use super::{Epilogue, HeldWeight, Isa};

/// An f32 matrix `(n, k)` (output `j` = row `j`) in panels of [`PANEL`] outputs, k-major: panel
/// `p` holds weight `(p · PANEL + j, kk)` at `(p · k + kk) · PANEL + j`, zeros past `n`.
#[derive(Debug, Clone)]
pub(crate) struct PanelMatrix {
    n: usize,
    k: usize,
    /// The panels start at `offset`, on a 64-byte line, so that no load of the tile straddles
    /// two lines.
    storage: Vec<f32>,
    offset: usize,
}

/// Floats in a 64-byte line.
const LINE_FLOATS: usize = 16;

impl PanelMatrix {
    /// From the checkpoint's `(in, out)` = `(k, n)` row-major layout, into huge-page memory.
    pub(crate) fn from_in_out(data: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(data.len(), k * n, "f32 panels: ({k}, {n}) matrix");
        let len = n.div_ceil(PANEL) * PANEL * k;
        let mut storage = crate::memory::huge_page_vec::<f32>(len + LINE_FLOATS);
        let offset = storage.as_ptr().align_offset(64) % LINE_FLOATS;
        storage.extend(std::iter::repeat_n(0.0, offset));
        for j0 in (0..n).step_by(PANEL) {
            let count = PANEL.min(n - j0);
            for row in data.chunks_exact(n.max(1)) {
                storage.extend_from_slice(&row[j0..j0 + count]);
                storage.extend(std::iter::repeat_n(0.0, PANEL - count));
            }
        }
        Self {
            n,
            k,
            storage,
            offset,
        }
    }

    /// From the `(out, in)` = `(n, k)` row-major layout (the token embeddings, which are the
    /// tied LM head), into huge-page memory. The panels are transposed by the pool's threads, each
    /// straight into its place: one thread took 0.3 s for GPT-2's 154 MB table.
    pub(crate) fn from_out_in(data: &[f32], n: usize, k: usize) -> Self {
        use rayon::prelude::*;
        assert_eq!(data.len(), n * k, "f32 panels: ({n}, {k}) matrix");
        let len = n.div_ceil(PANEL) * PANEL * k;
        let mut storage = crate::memory::huge_page_vec::<f32>(len + LINE_FLOATS);
        let offset = storage.as_ptr().align_offset(64) % LINE_FLOATS;
        storage.extend(std::iter::repeat_n(0.0, offset));
        if len > 0 {
            storage.spare_capacity_mut()[..len]
                .par_chunks_mut(k * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    let j0 = p * PANEL;
                    for (kk, line) in panel.chunks_exact_mut(PANEL).enumerate() {
                        for (within, slot) in line.iter_mut().enumerate() {
                            let j = j0 + within;
                            slot.write(if j < n { data[j * k + kk] } else { 0.0 });
                        }
                    }
                });
            // SAFETY: the loop above wrote every one of the `len` floats after `offset`.
            unsafe { storage.set_len(offset + len) };
        }
        Self {
            n,
            k,
            storage,
            offset,
        }
    }

    /// Rows `ids` of the `(n, k)` matrix, `(ids, k)` row-major: the token embedding lookups of a
    /// tied LM head. Each value is one float of a 128-byte panel row, so a lookup touches `k`
    /// cache lines; a step's few lookups cost nothing beside its pass over the weights.
    pub(crate) fn gather(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(ids.len() * self.k);
        let panels = self.panels();
        for &id in ids {
            let j = id as usize;
            if j >= self.n {
                return Err(format!("row {j} of a matrix of {} rows", self.n));
            }
            let base = j / PANEL * self.k * PANEL + j % PANEL;
            out.extend((0..self.k).map(|kk| panels[base + kk * PANEL]));
        }
        Ok(out)
    }

    /// The panels.
    fn panels(&self) -> &[f32] {
        &self.storage[self.offset..]
    }

    /// `(n, k)`: outputs, inputs.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The matrix `(n, k)` row-major.
    pub(crate) fn to_out_in(&self) -> Vec<f32> {
        let mut data = vec![0.0f32; self.n * self.k];
        for (j, row) in data.chunks_exact_mut(self.k.max(1)).enumerate() {
            let (panel, within) = (j / PANEL, j % PANEL);
            for (kk, w) in row.iter_mut().enumerate() {
                *w = self.panels()[(panel * self.k + kk) * PANEL + within];
            }
        }
        data
    }

    /// `x · Wᵀ + bias` for `x`: `(rows, k)` row-major; `(rows, n)`.
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        self.matmul_with(Isa::active(), x, rows, bias)
    }

    /// [`Self::matmul`] on the kernel compiled for `isa` (the portable one if the CPU lacks
    /// it); every level gives the same bits.
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], rows: usize, bias: &[f32]) -> Vec<f32> {
        gemm_prepacked_with(isa, x, rows, self.panels(), self.n, self.k, bias)
    }
}

impl HeldWeight for PanelMatrix {
    const NAME: &'static str = "f32-panel-linear";

    fn shape(&self) -> (usize, usize) {
        PanelMatrix::shape(self)
    }

    fn matmul(&self, x: &[f32], rows: usize, bias: &[f32], epilogue: Epilogue) -> Vec<f32> {
        let mut y = PanelMatrix::matmul(self, x, rows, bias);
        // After the GEMM: its tasks write rows of output pieces straight into the result.
        match epilogue {
            Epilogue::Plain => {}
            Epilogue::GeluTanh => super::activation::gelu_tanh_in_place(&mut y),
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm_f32::gemm_with;
    use crate::kernels::test_support::values;

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; data.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = data[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn gathered_rows_are_the_source_rows_and_unknown_rows_are_refused() {
        let mut seed = 5u32;
        for (n, k) in [(1, 1), (33, 5), (100, 64)] {
            let w = values(&mut seed, n * k, 0.5);
            let panels = PanelMatrix::from_out_in(&w, n, k);
            let ids: Vec<u32> = [0, n - 1, n / 2, 0].map(|j| j as u32).to_vec();
            let rows = panels.gather(&ids).expect("rows inside the matrix");
            for (got, &id) in rows.chunks_exact(k).zip(&ids) {
                let id = id as usize;
                assert!(
                    same_bits(got, &w[id * k..(id + 1) * k]),
                    "row {id} of ({n}, {k})"
                );
            }
            let error = panels.gather(&[n as u32]).expect_err("a row past the end");
            assert!(error.contains(&format!("{n} rows")), "{error}");
        }
    }

    #[test]
    fn both_source_layouts_give_the_same_panels_and_back() {
        let mut seed = 3u32;
        for (n, k) in [(1, 1), (31, 5), (32, 7), (33, 64), (100, 37)] {
            let out_in = values(&mut seed, n * k, 1.0);
            let from_out_in = PanelMatrix::from_out_in(&out_in, n, k);
            let from_in_out = PanelMatrix::from_in_out(&transpose(&out_in, n, k), k, n);
            assert!(
                same_bits(from_out_in.panels(), from_in_out.panels()),
                "({n}, {k})"
            );
            assert_eq!(from_in_out.panels().as_ptr().align_offset(64), 0);
            assert_eq!(from_out_in.panels().as_ptr().align_offset(64), 0);
            assert_eq!(from_in_out.shape(), (n, k));
            assert!(same_bits(&from_in_out.to_out_in(), &out_in), "({n}, {k})");
        }
    }

    #[test]
    fn prepacked_weights_give_the_packing_gemms_bits_at_every_row_count() {
        let mut seed = 9u32;
        // Widths of whole pairs of panels (64, 128, 192) take the decode steps' direct path at up
        // to 6 rows (`x` read in place), the others the packed one.
        for (n, k) in [
            (16, 1),
            (70, 37),
            (96, 768),
            (33, 300),
            (64, 1),
            (128, 77),
            (192, 768),
        ] {
            let w = values(&mut seed, n * k, 1.0);
            let bias = values(&mut seed, n, 1.0);
            let panels = PanelMatrix::from_out_in(&w, n, k);
            for rows in [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 40] {
                let x = values(&mut seed, rows * k, 1.0);
                let expected = gemm_with(Isa::Portable, &x, rows, &w, n, k, &bias);
                for isa in Isa::available() {
                    let ours = panels.matmul_with(isa, &x, rows, &bias);
                    assert!(same_bits(&ours, &expected), "{isa} ({rows}, {n}, {k})");
                }
            }
        }
    }

    #[test]
    fn the_candle_op_checks_shapes_and_matches_the_kernel() {
        use crate::kernels::{held_linear, held_linear_values};
        use candle_core::Tensor;
        let device = &candle_core::Device::Cpu;
        let (rows, n, k) = (3, 40, 24);
        let mut seed = 4u32;
        let w = values(&mut seed, n * k, 1.0);
        let x = values(&mut seed, rows * k, 1.0);
        let bias = values(&mut seed, n, 1.0);
        let panels = PanelMatrix::from_out_in(&w, n, k);
        let xt = Tensor::from_slice(&x, (rows, k), device).expect("x");
        let bt = Tensor::from_slice(&bias, n, device).expect("bias");
        let y = held_linear(&xt, &panels, &bt, Epilogue::Plain)
            .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
            .expect("linear");
        assert!(same_bits(&y, &panels.matmul(&x, rows, &bias)));
        let values = held_linear_values(&xt, &panels, &bt).expect("values");
        assert!(same_bits(&values, &y));
        let wrong = Tensor::zeros((rows, k + 1), candle_core::DType::F32, device).expect("x");
        for error in [
            held_linear(&wrong, &panels, &bt, Epilogue::Plain).expect_err("bad width"),
            held_linear_values(&wrong, &panels, &bt).expect_err("bad width"),
        ] {
            assert!(error.to_string().contains("f32-panel-linear"), "{error}");
        }
    }

    /// `cargo test --release -p gpt2-model panel_f32_decode_throughput -- --ignored --nocapture`
    ///
    /// A decode step's shapes (GPT-2 small's four layers, 12 layers' worth of copies so that the
    /// weights come from memory as in a step) through the prepacked panels and through the
    /// streaming dot-product kernel, interleaved; GB/s of weights read, median of 15 rounds.
    #[test]
    #[ignore = "a timing, not a check"]
    fn panel_f32_decode_throughput() {
        use crate::kernels::matmul_f32::small_rows_matmul;
        let shapes = [(2304usize, 768usize), (768, 768), (3072, 768), (768, 3072)];
        let layers = 12;
        let mut seed = 1u32;
        let mut weights = Vec::new();
        for _ in 0..layers {
            for &(n, k) in &shapes {
                let w = values(&mut seed, n * k, 0.5);
                weights.push((
                    PanelMatrix::from_out_in(&w, n, k),
                    w,
                    values(&mut seed, n, 0.5),
                ));
            }
        }
        let bytes: usize = weights.iter().map(|(_, w, _)| w.len() * 4).sum();
        for rows in [1usize, 3, 5, 8, 16, 32] {
            let x = values(&mut seed, rows * 3072, 0.5);
            let (mut panels, mut streaming) = (Vec::new(), Vec::new());
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for (p, _, b) in &weights {
                    let (n, k) = p.shape();
                    std::hint::black_box(p.matmul(&x[..rows * k], rows, &b[..n]));
                }
                panels.push(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for (p, w, b) in &weights {
                    let (n, k) = p.shape();
                    std::hint::black_box(small_rows_matmul(&x[..rows * k], rows, w, n, k, Some(b)));
                }
                streaming.push(t.elapsed().as_secs_f64());
            }
            let median = |times: &mut Vec<f64>| {
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            };
            let (p, s) = (median(&mut panels), median(&mut streaming));
            println!(
                "{rows:>2} rows: panels {:.2} ms ({:.1} GB/s), streaming {:.2} ms ({:.1} GB/s)",
                p * 1e3,
                bytes as f64 / p / 1e9,
                s * 1e3,
                bytes as f64 / s / 1e9
            );
        }
    }
}
