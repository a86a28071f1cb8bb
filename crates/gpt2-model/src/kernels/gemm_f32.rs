//! The f32 matmul of every row count: activation rows times an f32 weight matrix, stored `(out,
//! in)` and packed per call, or packed once at load ([`gemm_prepacked_with`], `panel_f32.rs`).
//!
//! A prompt of M tokens multiplies an `(M, k)` activation by every weight matrix, M up to 1024
//! (typically 64 or 512 per chunk), and a decode step its few rows. Prefill is compute-bound, so
//! this is a classic packed-panel GEMM built around a register tile; it replaces candle's `gemm`
//! because it is faster here (table below) and because **each output's arithmetic is fixed**: for
//! every `r`, `j`
//!
//! ```text
//! acc = 0.0; for kk in 0..k { acc = fma(x[r][kk], w[j][kk], acc) }; y[r][j] = acc + bias[j]
//! ```
//!
//! one FMA chain in the order of `kk`, whatever M, the tiling, the thread count or the instruction
//! set. A row's result therefore does not depend on which other rows share the call, so a prompt
//! prefilled in chunks of any size gives exactly the bits of a one-shot prefill, and pinning
//! `GPT2_ISA` changes no bit. (gemm splits `k` into blocks and sums partial products in an order
//! that depends on the shape and the microkernel.)
//!
//! How:
//!
//! - `x` is packed once per call into panels of `MR` rows, k-major (`panel[kk · MR + i]`), zero
//!   past the last row. Weights stored `(n, k)` (an f32 LM head in a q8_0 or bf16 model) are packed by each parallel
//!   task, the `NR`-column panel it works on (`panel[kk · NR + j]`, zero past `n`), with 16 × 16
//!   (AVX-512) or 8 × 8 (AVX2) register transposes into a per-thread buffer; the blocks' weights
//!   were packed at load in panels of 32 (`PANEL`), which the 16-column AVX2 and portable tiles
//!   read in halves (row stride 32). With up to 6 rows (a decode step) the AVX-512 tile reads
//!   two panels side by side. A one-row step through the prepacked panels streams the weights as
//!   fast as the dot-product kernel did (28.3 against 28.0 GB/s), and more rows are cheaper
//!   (5 rows 28.5 against 25.6, 16 rows 19.2 against 16.9, 32 rows 11.8 against 9.7;
//!   `panel_f32_decode_throughput`, 2-vCPU EPYC).
//! - The register tile keeps its `MR × NR` accumulators over all of `k` (no k-blocking: that is
//!   what keeps each output a single chain; a 32-column panel of GPT-2 xl's `k` = 6400 is 800 KB
//!   and sits in L2). Per `kk`: `NR / 16` panel loads, `MR` broadcasts, `MR · NR / 16` FMAs.
//!   Rows past the last full tile run a tile of fewer rows (a const-generic body per row count),
//!   so no arithmetic is wasted on padding; the last panel of a width that is not a multiple of
//!   `NR` computes its padded columns into a stack buffer and copies the real ones.
//! - Parallelism is over column panels (rayon's pool); each task writes its columns of every
//!   output row straight into the result through row slices split off it, so there is no
//!   scatter pass and no `unsafe` on the output. While a panel computes, the weights of the next
//!   one are prefetched into L2 (`prefetcht1`), spread over the tile's FMAs.
//!
//! Throughput, `gemm_f32_throughput` on the 2-vCPU AMD EPYC Zen 4 KVM guest (2 rayon threads;
//! f32 FMA peak ≈ 232 GFLOP/s), best of 15 interleaved runs, GFLOP/s. "candle" is
//! `x.matmul(&w.t())` (candle 0.11's gemm, AVX2 microkernel, no bias), "+ bias" adds the
//! `broadcast_add` the model runs after it (this kernel's figures include the bias):
//!
//! | `x` · `w`ᵀ | AVX-512 (12 × 32) | AVX2 (6 × 16) | candle | candle + bias |
//! | --- | --- | --- | --- | --- |
//! | (512 × 768) · (2304 × 768)ᵀ, QKV | 211.6 | 196.6 | 202.3 | 198.2 |
//! | (512 × 768) · (3072 × 768)ᵀ, MLP up | 213.9 | 208.5 | 202.3 | 200.4 |
//! | (512 × 3072) · (768 × 3072)ᵀ, MLP down | 212.0 | 196.9 | 195.5 | 196.3 |
//! | (64 × 768) · (2304 × 768)ᵀ | 200.8 | 181.7 | 153.6 | 153.6 |
//! | (64 × 768) · (3072 × 768)ᵀ | 201.2 | 182.7 | 153.3 | 158.3 |
//! | (64 × 3072) · (768 × 3072)ᵀ | 183.3 | 167.5 | 127.5 | 130.6 |
//!
//! With the weights out of cache (`GEMM_COLD=8`) the AVX-512 figures were 210–212 at M = 512
//! and 164–188 at M = 64, candle's 196–202 and 125–143. The noise between runs is ±3 %: another
//! process shares the two vCPUs. The portable path is there for correctness: without hardware
//! FMA each `mul_add` is a libm call.
//!
//! Choices measured on that machine:
//!
//! - AVX-512 tile 12 × 32 (24 zmm accumulators): it, 8 × 32 and 14 × 32 all ran within noise
//!   of each other (±2 %) on every shape above; 12 follows the design and amortises each tile's
//!   fixed cost over the most rows. Hot in L1 the tile runs at 117 GFLOP/s per thread, the peak.
//! - AVX2 tile 6 × 16 (12 ymm accumulators, 2 panel vectors, 1 broadcast: 15 of 16 registers).
//!   4 × 24 and 3 × 32 need all 16 or more, LLVM spilled an accumulator to the stack, and they
//!   ran at half speed.
//! - Packing with masked stores (`vmovups zmm{k}`) took two thirds of the packing time on Zen 4;
//!   full and half widths use plain stores.
//! - The packed `x` is kept for the next call ([`X_PANELS`]) and the output is zeroed in
//!   parallel on huge pages when large ([`super::zeroed_output`]): a fresh 4 KiB page costs ~1.6 µs to
//!   fault in on this guest, which for a 512-row MLP projection came to 10–20 % of the call.
//! - Prefetching the next panel's weights gained 5–8 % at M = 64 with weights out of cache (eight
//!   rotating copies), nothing measurable at M = 512.

use std::cell::RefCell;
use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::Isa;

/// Column panels per parallel task. Three measured the same as two; one was 4–9 % slower (twice
/// the tasks, and the prefetch of a task's last panel lands in another thread's cache more
/// often).
const TASK_PANELS: usize = 2;

/// Row tiles of at most this many rows pack `x` with plain copies (see [`drive`]).
const FEW_ROWS: usize = 6;

/// Floats per 64-byte cache line: packed panels start on a line.
const LINE_FLOATS: usize = 16;

/// The widest tile of any kernel, for the spill buffer of [`tile`].
const MAX_MR: usize = 16;
const MAX_NR: usize = 32;

/// The packed panels of `x` from the last call, reused by the next so that a prefill does not
/// fault in fresh pages for them at every matmul (2.6 ms for a 512 × 3072 input on the guest
/// measured, a fifth of that matmul). One buffer for the process, the largest seen: 6.3 MB for a
/// 512-row chunk through GPT-2 small's MLP down projection. A call that finds it taken (another
/// thread's matmul) allocates its own.
static X_PANELS: Mutex<Vec<f32>> = Mutex::new(Vec::new());

thread_local! {
    /// Each worker's packed weight panel, kept between tasks and calls (`NR · k` floats: 393 KB
    /// for `k` = 3072).
    static W_PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a 64-byte-aligned slice of `len` floats of this thread's weight-panel buffer.
fn with_panel_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    W_PANEL.with_borrow_mut(|buffer| {
        if buffer.len() < len + LINE_FLOATS {
            *buffer = vec![0.0; len + LINE_FLOATS];
        }
        let offset = buffer.as_ptr().align_offset(64) % LINE_FLOATS;
        f(&mut buffer[offset..offset + len])
    })
}

/// One register-tile kernel and the packing it reads: `MR` rows × `NR` columns.
trait Microkernel: Copy + Send + Sync {
    /// Rows of a tile: the width of a packed panel of `x`.
    const MR: usize;
    /// Columns of a tile: the width of a packed panel of `w`.
    const NR: usize;

    /// Packs `count ≤ width` rows of `src` (each `k` long) k-major into `dst`:
    /// `dst[kk · width + i] = src[i · k + kk]`, zeros for `count ≤ i < width`.
    fn pack(self, src: &[f32], count: usize, k: usize, dst: &mut [f32], width: usize) {
        pack_portable(src, count, k, dst, width);
    }

    /// `*out[i].add(j) = bias[j] + Σ_kk a[kk · MR + i] · b[kk · ldb + j]` for `i < rows`,
    /// `j < NR`, each sum one FMA chain from 0 in the order of `kk`. Prefetches the lines of
    /// `prefetch` into L2 on the way, spread over the loop.
    ///
    /// # Safety
    /// `1 ≤ rows ≤ MR`, `out` holds `rows` pointers to `NR` writable floats each, `a` holds
    /// `MR · k` floats, `b` `(k − 1) · ldb + NR` with `ldb ≥ NR`, and `bias` `NR` ([`tile`]
    /// checks all of it).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_raw(
        self,
        rows: usize,
        a: &[f32],
        b: &[f32],
        ldb: usize,
        k: usize,
        bias: &[f32],
        out: &[*mut f32],
        prefetch: &[f32],
    );

    /// Whether [`Self::tile_pair_raw`] has a body (for every `rows ≤ FEW_ROWS`).
    const PAIRS: bool = false;

    /// [`Self::tile_raw`] over two panels side by side (`b`, then `b2`: `2 · NR` columns, each
    /// output the same FMA chain), for `rows ≤ FEW_ROWS`, reading the rows of `x` where they are
    /// (`x[i · k + kk]`, row-major, not packed); `false` (nothing done) where the kernel has no
    /// such body. Two weight streams and twice the independent chains: a decode step's one row
    /// through one panel ran about 5% below the dot-product kernel it replaced.
    ///
    /// # Safety
    /// As [`Self::tile_raw`], with `x` holding `rows · k` floats in place of `a`, `b2` as `b`,
    /// `bias` of `2 · NR` and `2 · NR` writable floats at each output pointer.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_pair_raw(
        self,
        _rows: usize,
        _x: &[f32],
        _panels: [&[f32]; 2],
        _ldb: usize,
        _k: usize,
        _bias: &[f32],
        _out: &[*mut f32],
    ) -> bool {
        false
    }
}

/// Panics unless packing `count` rows of `k` from `src` into `dst` at `width` stays in bounds.
fn check_pack(src: &[f32], count: usize, k: usize, dst: &[f32], width: usize) {
    assert!(
        count <= width && src.len() >= count * k && dst.len() >= width * k,
        "f32 gemm pack: {count} rows of {k} from {} floats into {} at width {width}",
        src.len(),
        dst.len()
    );
}

/// [`Microkernel::pack`] in plain code.
fn pack_portable(src: &[f32], count: usize, k: usize, dst: &mut [f32], width: usize) {
    check_pack(src, count, k, dst, width);
    if k == 0 {
        return;
    }
    for (i, row) in src.chunks_exact(k).take(count).enumerate() {
        for (kk, &v) in row.iter().enumerate() {
            dst[kk * width + i] = v;
        }
    }
    if count < width {
        for kk in 0..k {
            dst[kk * width + count..(kk + 1) * width].fill(0.0);
        }
    }
}

/// Rows `0..rows` of `out`, columns `col..col + NR`, get the tile `a` · `b` + `bias` (`b`'s
/// rows at stride `ldb`). A row shorter than `col + NR` (the last panel of a width that is not a
/// multiple of `NR`) gets the columns it has, through a spill buffer on the stack.
#[allow(clippy::too_many_arguments)]
fn tile<K: Microkernel>(
    kernel: K,
    rows: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    k: usize,
    bias: &[f32],
    out: &mut [&mut [f32]],
    col: usize,
    prefetch: &[f32],
) {
    assert!(
        (1..=K::MR).contains(&rows)
            && K::MR <= MAX_MR
            && K::NR <= MAX_NR
            && a.len() >= K::MR * k
            && ldb >= K::NR
            && b.len() >= k.saturating_sub(1) * ldb + K::NR
            && bias.len() >= K::NR
            && out.len() >= rows
            && out[..rows].iter().all(|row| row.len() >= col),
        "f32 gemm tile: {rows} rows of {}, k {k}, panels of {} and {} floats (stride {ldb}), {} \
         bias, {} output rows from column {col}",
        K::MR,
        a.len(),
        b.len(),
        bias.len(),
        out.len()
    );
    let mut pointers = [std::ptr::null_mut::<f32>(); MAX_MR];
    if out[..rows].iter().all(|row| row.len() >= col + K::NR) {
        for (pointer, row) in pointers.iter_mut().zip(&mut out[..rows]) {
            *pointer = row[col..].as_mut_ptr();
        }
        // SAFETY: checked above: `1 ≤ rows ≤ MR`, `NR` floats after each pointer, and the
        // lengths of the panels and the bias.
        unsafe { kernel.tile_raw(rows, a, b, ldb, k, bias, &pointers[..rows], prefetch) };
    } else {
        let mut spill = [[0.0f32; MAX_NR]; MAX_MR];
        for (pointer, row) in pointers.iter_mut().zip(spill.iter_mut()) {
            *pointer = row.as_mut_ptr();
        }
        // SAFETY: as above, into the spill rows of `MAX_NR ≥ NR` floats.
        unsafe { kernel.tile_raw(rows, a, b, ldb, k, bias, &pointers[..rows], prefetch) };
        for (row, computed) in out.iter_mut().zip(&spill).take(rows) {
            let row = &mut row[col..];
            let len = row.len();
            row.copy_from_slice(&computed[..len]);
        }
    }
}

/// Plain code: `f32::mul_add` is a fused multiply-add on every target (a libm call where the
/// CPU lacks FMA), so it gives the SIMD paths' bits exactly.
#[derive(Clone, Copy)]
struct Portable;

impl Microkernel for Portable {
    const MR: usize = 4;
    const NR: usize = 16;

    unsafe fn tile_raw(
        self,
        rows: usize,
        a: &[f32],
        b: &[f32],
        ldb: usize,
        k: usize,
        bias: &[f32],
        out: &[*mut f32],
        _prefetch: &[f32],
    ) {
        const MR: usize = Portable::MR;
        const NR: usize = Portable::NR;
        let mut acc = [[0.0f32; NR]; MR];
        for (kk, av) in a.chunks_exact(MR).take(k).enumerate() {
            let bv = &b[kk * ldb..kk * ldb + NR];
            for (row, &x) in acc.iter_mut().zip(av) {
                for (c, &w) in row.iter_mut().zip(bv) {
                    *c = x.mul_add(w, *c);
                }
            }
        }
        for (&pointer, row) in out.iter().zip(&acc).take(rows) {
            for (j, (&c, &b)) in row.iter().zip(&bias[..NR]).enumerate() {
                // SAFETY: the caller gave `NR` writable floats at each pointer.
                unsafe { *pointer.add(j) = c + b };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{check_pack, Isa, Microkernel};

    /// Issues the prefetches of [`Microkernel::tile_raw`]: the lines of one slice, spread evenly
    /// over the `k` steps of a tile (`burst` lines every `every` steps).
    struct Prefetcher {
        next: *const f32,
        end: *const f32,
        every: usize,
        burst: usize,
        countdown: usize,
    }

    impl Prefetcher {
        #[inline(always)]
        fn new(lines_of: &[f32], k: usize) -> Self {
            let lines = lines_of.len().div_ceil(16);
            let every = k
                .checked_div(lines)
                .map_or(usize::MAX, |every| every.max(1));
            Prefetcher {
                next: lines_of.as_ptr(),
                end: lines_of.as_ptr().wrapping_add(lines_of.len()),
                every,
                burst: lines.div_ceil(k.max(1)),
                countdown: every,
            }
        }

        /// Called once per `k` step.
        #[inline(always)]
        fn step(&mut self) {
            self.countdown -= 1;
            if self.countdown == 0 {
                self.countdown = self.every;
                for _ in 0..self.burst {
                    if self.next < self.end {
                        // SAFETY: a prefetch never faults, whatever the address; SSE is
                        // baseline on x86-64.
                        unsafe { _mm_prefetch::<_MM_HINT_T1>(self.next.cast()) };
                        self.next = self.next.wrapping_add(16);
                    }
                }
            }
        }
    }

    /// Transposes 16 rows of 16 floats: lane `r` of `out[c]` is lane `c` of `r[r]`.
    #[target_feature(enable = "avx512f")]
    pub(in crate::kernels) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Within each 128-bit lane: interleave pairs of rows...
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // ... then quads: 128-bit lane `l` of `u[4q + e]` holds rows `4q..4q + 4` of column
        // `4l + e`...
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            u[4 * q] = _mm512_shuffle_ps::<0x44>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 2] = _mm512_shuffle_ps::<0x44>(t[4 * q + 1], t[4 * q + 3]);
            u[4 * q + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * q + 1], t[4 * q + 3]);
        }
        // ... and gather lane `l` of the four quads into column `4l + e`.
        let mut out = [_mm512_setzero_ps(); 16];
        for e in 0..4 {
            let even_low = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
            let odd_low = _mm512_shuffle_f32x4::<0xDD>(u[e], u[4 + e]);
            let even_high = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
            let odd_high = _mm512_shuffle_f32x4::<0xDD>(u[8 + e], u[12 + e]);
            out[e] = _mm512_shuffle_f32x4::<0x88>(even_low, even_high);
            out[8 + e] = _mm512_shuffle_f32x4::<0xDD>(even_low, even_high);
            out[4 + e] = _mm512_shuffle_f32x4::<0x88>(odd_low, odd_high);
            out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(odd_low, odd_high);
        }
        out
    }

    /// Packs `count ≤ width ≤ 16` rows of `src` (row stride `k`) k-major: `width` floats at
    /// `dst + kk · ld` for each `kk < k`, zeros past `count`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `src` holds `count` rows of `k` floats at stride `k`; `dst` has
    /// `width` writable floats at each `dst + kk · ld`, `kk < k`.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack16(
        src: *const f32,
        count: usize,
        k: usize,
        dst: *mut f32,
        ld: usize,
        width: usize,
    ) {
        let mask = ((1u32 << width) - 1) as __mmask16;
        let full = k / 16 * 16;
        let mut kk = 0;
        while kk < full {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (i, row) in rows.iter_mut().enumerate() {
                if i < count {
                    // SAFETY: row `i < count`, floats `kk..kk + 16 ≤ k`.
                    *row = unsafe { _mm512_loadu_ps(src.add(i * k + kk)) };
                }
            }
            // Masked stores took two thirds of the packing time on Zen 4; full and half
            // widths (the weight panels, 8-row input panels) store plainly.
            for (c, column) in transpose16(rows).into_iter().enumerate() {
                let to = dst.wrapping_add((kk + c) * ld);
                // SAFETY: `kk + c < k`; each store writes `width` floats.
                unsafe {
                    match width {
                        16 => _mm512_storeu_ps(to, column),
                        8 => _mm256_storeu_ps(to, _mm512_castps512_ps256(column)),
                        _ => _mm512_mask_storeu_ps(to, mask, column),
                    }
                }
            }
            kk += 16;
        }
        for kk in full..k {
            for i in 0..width {
                // SAFETY: `kk < k`, `i < width`, and only rows below `count` are read.
                unsafe {
                    *dst.add(kk * ld + i) = if i < count { *src.add(i * k + kk) } else { 0.0 };
                }
            }
        }
    }

    /// Proof that the CPU runs AVX-512F: only [`Avx512::new`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(());

    impl Avx512 {
        pub(super) fn new() -> Option<Self> {
            Isa::Avx512.is_supported().then_some(Avx512(()))
        }
    }

    /// Rows per AVX-512 tile.
    const MR_512: usize = 12;

    /// The AVX-512 tile for `R ≤ 12` rows: 2 zmm accumulators per row, 32 columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds `12 · k` floats, `b` `k` rows of 32 at stride `ldb`,
    /// `bias` 32, and `out` `R` pointers to 32 writable floats each.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const R: usize>(
        a: *const f32,
        b: *const f32,
        ldb: usize,
        k: usize,
        bias: *const f32,
        out: &[*mut f32],
        prefetch: &[f32],
    ) {
        let mut prefetcher = Prefetcher::new(prefetch, k);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for kk in 0..k {
            prefetcher.step();
            // SAFETY: `kk < k`: inside both panels.
            unsafe {
                let b0 = _mm512_loadu_ps(b.add(kk * ldb));
                let b1 = _mm512_loadu_ps(b.add(kk * ldb + 16));
                let ak = a.add(kk * MR_512);
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ak.add(i));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                }
            }
        }
        // SAFETY: 32 bias floats, and 32 writable floats at each of the `R` output pointers.
        unsafe {
            let bias0 = _mm512_loadu_ps(bias);
            let bias1 = _mm512_loadu_ps(bias.add(16));
            for (&to, row) in out[..R].iter().zip(&acc) {
                _mm512_storeu_ps(to, _mm512_add_ps(row[0], bias0));
                _mm512_storeu_ps(to.add(16), _mm512_add_ps(row[1], bias1));
            }
        }
    }

    /// [`tile_avx512`] over two panels at once (64 columns, 4 zmm accumulators per row; 6 rows
    /// use 24 of the 32 registers for them), with the `R` rows of `x` read in place (row `i` at
    /// `x + i · k`).
    ///
    /// # Safety
    /// As [`tile_avx512`], with `x` holding `R · k` floats in place of `a`, `b2` as `b`, 64 bias
    /// floats and 64 writable floats per output.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_pair_avx512<const R: usize>(
        x: *const f32,
        [b, b2]: [*const f32; 2],
        ldb: usize,
        k: usize,
        bias: *const f32,
        out: &[*mut f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for kk in 0..k {
            // SAFETY: `kk < k`: inside both panels.
            unsafe {
                let w = [
                    _mm512_loadu_ps(b.add(kk * ldb)),
                    _mm512_loadu_ps(b.add(kk * ldb + 16)),
                    _mm512_loadu_ps(b2.add(kk * ldb)),
                    _mm512_loadu_ps(b2.add(kk * ldb + 16)),
                ];
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*x.add(i * k + kk));
                    for (acc, w) in row.iter_mut().zip(w) {
                        *acc = _mm512_fmadd_ps(x, w, *acc);
                    }
                }
            }
        }
        // SAFETY: 64 bias floats, and 64 writable floats at each of the `R` output pointers.
        unsafe {
            for (&to, row) in out[..R].iter().zip(&acc) {
                for (v, acc) in row.iter().enumerate() {
                    let bias = _mm512_loadu_ps(bias.add(16 * v));
                    _mm512_storeu_ps(to.add(16 * v), _mm512_add_ps(*acc, bias));
                }
            }
        }
    }

    impl Microkernel for Avx512 {
        const MR: usize = MR_512;
        const NR: usize = 32;

        const PAIRS: bool = true;

        unsafe fn tile_pair_raw(
            self,
            rows: usize,
            x: &[f32],
            [b, b2]: [&[f32]; 2],
            ldb: usize,
            k: usize,
            bias: &[f32],
            out: &[*mut f32],
        ) -> bool {
            let (a, panels, bias) = (x.as_ptr(), [b.as_ptr(), b2.as_ptr()], bias.as_ptr());
            // SAFETY: `self` exists, so the CPU has AVX-512F; the caller vouches for the lengths,
            // and `rows` picks the body that writes exactly the rows given.
            unsafe {
                match rows {
                    1 => tile_pair_avx512::<1>(a, panels, ldb, k, bias, out),
                    2 => tile_pair_avx512::<2>(a, panels, ldb, k, bias, out),
                    3 => tile_pair_avx512::<3>(a, panels, ldb, k, bias, out),
                    4 => tile_pair_avx512::<4>(a, panels, ldb, k, bias, out),
                    5 => tile_pair_avx512::<5>(a, panels, ldb, k, bias, out),
                    6 => tile_pair_avx512::<6>(a, panels, ldb, k, bias, out),
                    _ => return false,
                }
            }
            true
        }

        fn pack(self, src: &[f32], count: usize, k: usize, dst: &mut [f32], width: usize) {
            check_pack(src, count, k, dst, width);
            for start in (0..width).step_by(16) {
                let rows = count.saturating_sub(start).min(16);
                // SAFETY: `self` exists, so the CPU has AVX-512F. `check_pack` showed that `src`
                // holds the `count ≥ start + rows` rows read and `dst` `width · k` floats, so
                // columns `start..start + min(16, width − start)` of every packed row are in it.
                unsafe {
                    pack16(
                        src.as_ptr().wrapping_add(start * k),
                        rows,
                        k,
                        dst.as_mut_ptr().add(start),
                        width,
                        (width - start).min(16),
                    )
                }
            }
        }

        unsafe fn tile_raw(
            self,
            rows: usize,
            a: &[f32],
            b: &[f32],
            ldb: usize,
            k: usize,
            bias: &[f32],
            out: &[*mut f32],
            prefetch: &[f32],
        ) {
            let (a, b, bias) = (a.as_ptr(), b.as_ptr(), bias.as_ptr());
            // SAFETY: `self` exists, so the CPU has AVX-512F; the caller vouches for the lengths,
            // and `rows` picks the body that writes exactly the rows given.
            unsafe {
                match rows {
                    1 => tile_avx512::<1>(a, b, ldb, k, bias, out, prefetch),
                    2 => tile_avx512::<2>(a, b, ldb, k, bias, out, prefetch),
                    3 => tile_avx512::<3>(a, b, ldb, k, bias, out, prefetch),
                    4 => tile_avx512::<4>(a, b, ldb, k, bias, out, prefetch),
                    5 => tile_avx512::<5>(a, b, ldb, k, bias, out, prefetch),
                    6 => tile_avx512::<6>(a, b, ldb, k, bias, out, prefetch),
                    7 => tile_avx512::<7>(a, b, ldb, k, bias, out, prefetch),
                    8 => tile_avx512::<8>(a, b, ldb, k, bias, out, prefetch),
                    9 => tile_avx512::<9>(a, b, ldb, k, bias, out, prefetch),
                    10 => tile_avx512::<10>(a, b, ldb, k, bias, out, prefetch),
                    11 => tile_avx512::<11>(a, b, ldb, k, bias, out, prefetch),
                    _ => tile_avx512::<12>(a, b, ldb, k, bias, out, prefetch),
                }
            }
        }
    }

    /// Transposes 8 rows of 8 floats: lane `r` of `out[c]` is lane `c` of `r[r]`.
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // 128-bit lane `l` of `u[4q + e]` holds rows `4q..4q + 4` of column `4l + e`.
        let mut u = [_mm256_setzero_ps(); 8];
        for q in 0..2 {
            u[4 * q] = _mm256_shuffle_ps::<0x44>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 1] = _mm256_shuffle_ps::<0xEE>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 2] = _mm256_shuffle_ps::<0x44>(t[4 * q + 1], t[4 * q + 3]);
            u[4 * q + 3] = _mm256_shuffle_ps::<0xEE>(t[4 * q + 1], t[4 * q + 3]);
        }
        let mut out = [_mm256_setzero_ps(); 8];
        for e in 0..4 {
            out[e] = _mm256_permute2f128_ps::<0x20>(u[e], u[4 + e]);
            out[4 + e] = _mm256_permute2f128_ps::<0x31>(u[e], u[4 + e]);
        }
        out
    }

    /// [`pack16`] for AVX2: `count ≤ width ≤ 8`.
    ///
    /// # Safety
    /// The CPU has AVX2; `src` holds `count` rows of `k` floats at stride `k`; `dst` has
    /// `width` writable floats at each `dst + kk · ld`, `kk < k`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack8(
        src: *const f32,
        count: usize,
        k: usize,
        dst: *mut f32,
        ld: usize,
        width: usize,
    ) {
        let lanes: [i32; 8] = std::array::from_fn(|i| if i < width { -1 } else { 0 });
        // SAFETY: `lanes` holds 8 integers.
        let mask = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
        let full = k / 8 * 8;
        let mut kk = 0;
        while kk < full {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, row) in rows.iter_mut().enumerate() {
                if i < count {
                    // SAFETY: row `i < count`, floats `kk..kk + 8 ≤ k`.
                    *row = unsafe { _mm256_loadu_ps(src.add(i * k + kk)) };
                }
            }
            for (c, column) in transpose8(rows).into_iter().enumerate() {
                let to = dst.wrapping_add((kk + c) * ld);
                // SAFETY: `kk + c < k`; each store writes `width` floats.
                unsafe {
                    if width == 8 {
                        _mm256_storeu_ps(to, column);
                    } else {
                        _mm256_maskstore_ps(to, mask, column);
                    }
                }
            }
            kk += 8;
        }
        for kk in full..k {
            for i in 0..width {
                // SAFETY: `kk < k`, `i < width`, and only rows below `count` are read.
                unsafe {
                    *dst.add(kk * ld + i) = if i < count { *src.add(i * k + kk) } else { 0.0 };
                }
            }
        }
    }

    /// Proof that the CPU runs AVX2 and FMA: only [`Avx2::new`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(());

    impl Avx2 {
        pub(super) fn new() -> Option<Self> {
            Isa::Avx2.is_supported().then_some(Avx2(()))
        }
    }

    /// Rows per AVX2 tile.
    const MR_2: usize = 6;

    /// The AVX2 tile for `R ≤ 6` rows: 2 ymm accumulators per row, 16 columns (12 accumulators,
    /// 2 panel vectors and a broadcast: 15 of the 16 ymm registers).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` holds `6 · k` floats, `b` `k` rows of 16 at stride `ldb`,
    /// `bias` 16, and `out` `R` pointers to 16 writable floats each.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize>(
        a: *const f32,
        b: *const f32,
        ldb: usize,
        k: usize,
        bias: *const f32,
        out: &[*mut f32],
        prefetch: &[f32],
    ) {
        let mut prefetcher = Prefetcher::new(prefetch, k);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            prefetcher.step();
            // SAFETY: `kk < k`: inside both panels.
            unsafe {
                let b0 = _mm256_loadu_ps(b.add(kk * ldb));
                let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
                let ak = a.add(kk * MR_2);
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*ak.add(i));
                    row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(x, b1, row[1]);
                }
            }
        }
        // SAFETY: 16 bias floats, and 16 writable floats at each of the `R` output pointers.
        unsafe {
            let bias0 = _mm256_loadu_ps(bias);
            let bias1 = _mm256_loadu_ps(bias.add(8));
            for (&to, row) in out[..R].iter().zip(&acc) {
                _mm256_storeu_ps(to, _mm256_add_ps(row[0], bias0));
                _mm256_storeu_ps(to.add(8), _mm256_add_ps(row[1], bias1));
            }
        }
    }

    impl Microkernel for Avx2 {
        const MR: usize = MR_2;
        const NR: usize = 16;

        fn pack(self, src: &[f32], count: usize, k: usize, dst: &mut [f32], width: usize) {
            check_pack(src, count, k, dst, width);
            for start in (0..width).step_by(8) {
                let rows = count.saturating_sub(start).min(8);
                // SAFETY: `self` exists, so the CPU has AVX2; bounds as in `Avx512::pack`.
                unsafe {
                    pack8(
                        src.as_ptr().wrapping_add(start * k),
                        rows,
                        k,
                        dst.as_mut_ptr().add(start),
                        width,
                        (width - start).min(8),
                    )
                }
            }
        }

        unsafe fn tile_raw(
            self,
            rows: usize,
            a: &[f32],
            b: &[f32],
            ldb: usize,
            k: usize,
            bias: &[f32],
            out: &[*mut f32],
            prefetch: &[f32],
        ) {
            let (a, b, bias) = (a.as_ptr(), b.as_ptr(), bias.as_ptr());
            // SAFETY: `self` exists, so the CPU has AVX2 and FMA; the caller vouches for the
            // lengths, and `rows` picks the body that writes exactly the rows given.
            unsafe {
                match rows {
                    1 => tile_avx2::<1>(a, b, ldb, k, bias, out, prefetch),
                    2 => tile_avx2::<2>(a, b, ldb, k, bias, out, prefetch),
                    3 => tile_avx2::<3>(a, b, ldb, k, bias, out, prefetch),
                    4 => tile_avx2::<4>(a, b, ldb, k, bias, out, prefetch),
                    5 => tile_avx2::<5>(a, b, ldb, k, bias, out, prefetch),
                    _ => tile_avx2::<6>(a, b, ldb, k, bias, out, prefetch),
                }
            }
        }
    }
}

/// `y = x · wᵀ + bias`. `x`: `(rows, k)` row-major, `w`: `(n, k)` row-major (PyTorch Linear /
/// "(out, in)" layout), `bias`: `n`. Returns `(rows, n)` row-major. Each output is one FMA chain
/// over `k` in order, plus its bias (see the module doc), on the level [`Isa::active`] picks.
pub(crate) fn gemm(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    gemm_with(Isa::active(), x, rows, w, n, k, bias)
}

/// [`gemm`] on the kernel compiled for `isa`, or the portable one if the CPU lacks it. Every
/// level gives the same bits.
pub(crate) fn gemm_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    assert!(
        n.checked_mul(k) == Some(w.len()),
        "f32 gemm: {n}×{k} weights ({} floats)",
        w.len(),
    );
    run_with(isa, x, rows, &PackEachCall { w, n, k }, n, k, bias)
}

/// [`gemm_with`] over weights already in panels of [`PANEL`] columns, k-major: panel `p` holds
/// `w[p · PANEL + j][kk]` at `panels[(p · k + kk) · PANEL + j]`, zeros past `n`. Gives
/// [`gemm_with`]'s bits, without packing the weights at every call: what lets one kernel serve
/// a decode step of one row as well as a 512-row prefill.
pub(crate) fn gemm_prepacked_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    panels: &[f32],
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    assert!(
        n.div_ceil(PANEL).checked_mul(PANEL * k) == Some(panels.len()),
        "f32 gemm: {n}×{k} weights in panels of {PANEL} ({} floats)",
        panels.len(),
    );
    run_with(isa, x, rows, &Prepacked { panels, k }, n, k, bias)
}

/// Columns per prepacked weight panel: the AVX-512 tile's width; the 16-column tiles read each
/// panel in two halves.
pub(crate) const PANEL: usize = 32;

/// Checks the shapes common to both entry points and runs the kernel `isa` names.
fn run_with<S: PanelSource>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    source: &S,
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    assert!(
        rows.checked_mul(k) == Some(x.len()) && bias.len() == n,
        "f32 gemm: {rows}×{k} input ({} floats), {} biases for {n} outputs",
        x.len(),
        bias.len()
    );
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    if k == 0 {
        return bias.repeat(rows);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx => match x86::Avx512::new() {
            Some(kernel) => drive(kernel, x, rows, source, n, k, bias),
            None => drive(Portable, x, rows, source, n, k, bias),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match x86::Avx2::new() {
            Some(kernel) => drive(kernel, x, rows, source, n, k, bias),
            None => drive(Portable, x, rows, source, n, k, bias),
        },
        _ => drive(Portable, x, rows, source, n, k, bias),
    }
}

/// Where a tile's weights come from: an `NR`-column panel, k-major.
trait PanelSource: Sync {
    /// Runs `f` on the panel of the `count ≤ NR` columns from `j0` (a multiple of `NR`): its
    /// floats, their row stride, and the weights worth prefetching while it computes.
    fn with_panel<K: Microkernel>(
        &self,
        kernel: K,
        j0: usize,
        count: usize,
        f: impl FnOnce(&[f32], usize, &[f32]),
    );

    /// Whether [`Self::pair`] gives every pair of whole panels.
    const PAIRS: bool = false;

    /// The two whole `NR`-column panels from `j0` side by side, and their row stride, where the
    /// weights are already packed; `None` otherwise.
    fn pair<K: Microkernel>(&self, _kernel: K, _j0: usize) -> Option<([&[f32]; 2], usize)> {
        None
    }
}

/// Weights `(n, k)` row-major, packed panel by panel into each thread's buffer as they are used.
struct PackEachCall<'a> {
    w: &'a [f32],
    n: usize,
    k: usize,
}

impl PanelSource for PackEachCall<'_> {
    fn with_panel<K: Microkernel>(
        &self,
        kernel: K,
        j0: usize,
        count: usize,
        f: impl FnOnce(&[f32], usize, &[f32]),
    ) {
        let (nr, w, n, k) = (K::NR, self.w, self.n, self.k);
        with_panel_buffer(nr * k, |b| {
            kernel.pack(&w[j0 * k..(j0 + count) * k], count, k, b, nr);
            // The next panel's weights (most likely this thread's next panel).
            let upcoming = &w[(j0 + nr).min(n) * k..(j0 + 2 * nr).min(n) * k];
            f(b, nr, upcoming)
        })
    }
}

/// Weights packed once, in panels of [`PANEL`] columns (see [`gemm_prepacked_with`]).
struct Prepacked<'a> {
    panels: &'a [f32],
    k: usize,
}

impl PanelSource for Prepacked<'_> {
    const PAIRS: bool = true;

    fn pair<K: Microkernel>(&self, _kernel: K, j0: usize) -> Option<([&[f32]; 2], usize)> {
        let panel_len = PANEL * self.k;
        let panel_of = |j: usize| {
            let start = j / PANEL * panel_len + j % PANEL;
            // The `NR` columns from `j`, at stride `PANEL`, for all of `k`.
            self.panels.get(start..start + (self.k - 1) * PANEL + K::NR)
        };
        Some(([panel_of(j0)?, panel_of(j0 + K::NR)?], PANEL))
    }

    fn with_panel<K: Microkernel>(
        &self,
        _kernel: K,
        j0: usize,
        _count: usize,
        f: impl FnOnce(&[f32], usize, &[f32]),
    ) {
        let panel_len = PANEL * self.k;
        let (panel, within) = (j0 / PANEL, j0 % PANEL);
        let start = panel * panel_len;
        // The next panel, asked for by the tile that reads this one's first columns.
        let upcoming = match within {
            0 => {
                &self.panels[(start + panel_len).min(self.panels.len())
                    ..(start + 2 * panel_len).min(self.panels.len())]
            }
            _ => &[],
        };
        f(
            &self.panels[start + within..start + panel_len],
            PANEL,
            upcoming,
        )
    }
}

/// The GEMM around one kernel; the caller checked the lengths and that `rows`, `n`, `k` ≥ 1.
fn drive<K: Microkernel, S: PanelSource>(
    kernel: K,
    x: &[f32],
    rows: usize,
    source: &S,
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    let (mr, nr) = (K::MR, K::NR);
    let row_tiles = rows.div_ceil(mr);
    let a_len = mr * k;
    // The pair tile reads a decode step's few rows straight from `x`, so where every task is a
    // pair of whole prepacked panels (all of GPT-2's layers; not its LM head, 50,257 wide)
    // nothing reads them packed and the packing is skipped. It copied them lane by lane at a
    // stride of `MR` floats (147 KB written for one row of `k` = 3072) on the calling thread
    // while the other worker waited: one-row matmuls over a step's layers read their weights at
    // 55–60 GB/s where a plain read of the same matrices got 74–80, and at 81 without it
    // (5.2 → 4.2 ms a pass in a test on the Zen 5; a greedy 124M request 0.746 → 0.647 s,
    // `ab.py`, 6 rounds; 3 and 5 rows gained 1–3%).
    let direct = rows <= FEW_ROWS && K::PAIRS && S::PAIRS && n.is_multiple_of(TASK_PANELS * nr);
    let packed_rows = if direct { 0 } else { row_tiles };

    // `x` in panels of `MR` rows, packed in parallel into the buffer kept from the last call.
    let mut a_buffer =
        std::mem::take(&mut *X_PANELS.lock().unwrap_or_else(PoisonError::into_inner));
    if a_buffer.len() < packed_rows * a_len + LINE_FLOATS {
        a_buffer = vec![0.0; packed_rows * a_len + LINE_FLOATS];
    }
    let offset = a_buffer.as_ptr().align_offset(64) % LINE_FLOATS;
    let a = &mut a_buffer[offset..offset + packed_rows * a_len];
    let pack_rows = |(t, panel): (usize, &mut [f32])| {
        let r0 = t * mr;
        let count = mr.min(rows - r0);
        if count <= FEW_ROWS {
            // A decode step's few rows: copied lane by lane, leaving the lanes past `count`
            // as they were, since the tile for `count` rows never reads them. The register
            // transposes (16 rows each, masked stores) took 4.6% of a greedy f32 run's samples
            // this way, against 0.8% for the streaming kernel they replaced (2-vCPU EPYC).
            for (i, row) in x[r0 * k..(r0 + count) * k].chunks_exact(k).enumerate() {
                for (kk, &value) in row.iter().enumerate() {
                    panel[kk * mr + i] = value;
                }
            }
        } else {
            kernel.pack(&x[r0 * k..(r0 + count) * k], count, k, panel, mr);
        }
    };
    if packed_rows == 1 {
        // A few rows: not worth waking the pool.
        a.chunks_mut(a_len).enumerate().for_each(pack_rows);
    } else {
        a.par_chunks_mut(a_len).enumerate().for_each(pack_rows);
    }
    let a = &*a;

    // Each task owns `TASK_PANELS` panels' columns of every output row.
    let task_columns = TASK_PANELS * nr;
    let mut y = super::zeroed_output(rows * n);
    let mut parts: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(task_columns))
        .map(|_| Vec::with_capacity(rows))
        .collect();
    for row in y.chunks_mut(n) {
        for (part, piece) in parts.iter_mut().zip(row.chunks_mut(task_columns)) {
            part.push(piece);
        }
    }
    parts
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut out)| {
            let start = task * task_columns;
            let panels = (n - start).min(task_columns).div_ceil(nr);
            let mut p = 0;
            while p < panels {
                let j0 = start + p * nr;
                if rows <= FEW_ROWS && p + 1 < panels && n - j0 >= 2 * nr {
                    if let Some((pair, ldb)) = source.pair(kernel, j0) {
                        let mut pointers = [std::ptr::null_mut::<f32>(); FEW_ROWS];
                        for (pointer, row) in pointers.iter_mut().zip(out.iter_mut()) {
                            *pointer = row[p * nr..p * nr + 2 * nr].as_mut_ptr();
                        }
                        // SAFETY: `x` holds the `rows ≤ FEW_ROWS` rows of `k` (checked by
                        // `run_with`); both panels hold `k` rows of `NR` at stride `ldb` (`pair`
                        // sliced them so); the bias and every output row hold the `2 · NR`
                        // columns from `j0` (sliced above).
                        let done = unsafe {
                            kernel.tile_pair_raw(
                                rows,
                                x,
                                pair,
                                ldb,
                                k,
                                &bias[j0..j0 + 2 * nr],
                                &pointers[..rows],
                            )
                        };
                        if done {
                            p += 2;
                            continue;
                        }
                    }
                }
                // Unreachable in direct mode: its tasks are pairs of whole prepacked panels.
                assert!(
                    !direct,
                    "f32 gemm: the pair of panels at column {j0} did not run"
                );
                let count = nr.min(n - j0);
                let mut bias_panel = [0.0f32; MAX_NR];
                bias_panel[..count].copy_from_slice(&bias[j0..j0 + count]);
                source.with_panel(kernel, j0, count, |b, ldb, upcoming| {
                    // The upcoming weights are fetched into L2 while this panel computes, a share
                    // per row tile.
                    let share = upcoming.len().div_ceil(row_tiles * LINE_FLOATS) * LINE_FLOATS;
                    for t in 0..row_tiles {
                        let r0 = t * mr;
                        let tile_rows = mr.min(rows - r0);
                        tile(
                            kernel,
                            tile_rows,
                            &a[t * a_len..(t + 1) * a_len],
                            b,
                            ldb,
                            k,
                            &bias_panel,
                            &mut out[r0..r0 + tile_rows],
                            p * nr,
                            &upcoming[(t * share).min(upcoming.len())
                                ..((t + 1) * share).min(upcoming.len())],
                        );
                    }
                });
                p += 1;
            }
        });

    let mut cached = X_PANELS.lock().unwrap_or_else(PoisonError::into_inner);
    if cached.len() < a_buffer.len() {
        *cached = a_buffer;
    }
    y
}

/// `x · wᵀ + b` as a candle op on `(x, w, b)`: the prefill's f32 linear layers.
pub(crate) struct PrefillGemm;

impl CustomOp3 for PrefillGemm {
    fn name(&self) -> &'static str {
        "prefill-gemm"
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
        let (x, rows, w, n, k, b) =
            super::linear_inputs("prefill-gemm", (x, x_layout), (w, w_layout), (b, b_layout))?;
        let y = gemm(x, rows, w, n, k, b);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    /// The defining formula, one output at a time.
    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize, bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut acc = 0.0f32;
                for kk in 0..k {
                    acc = x[r * k + kk].mul_add(w[j * k + kk], acc);
                }
                y[r * n + j] = acc + bias[j];
            }
        }
        y
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    #[test]
    fn gemm_f32_every_isa_matches_the_formula_bit_for_bit() {
        let mut seed = 7u32;
        // 37 mixes whole 16-wide packing blocks with a remainder.
        for rows in [1, 5, 12, 13, 17, 64, 100] {
            for n in [1, 16, 31, 32, 33, 100] {
                for k in [1, 7, 37, 64, 768] {
                    let x = values(&mut seed, rows * k, 1.0);
                    let w = values(&mut seed, n * k, 1.0);
                    let b = values(&mut seed, n, 1.0);
                    let expected = reference(&x, rows, &w, n, k, &b);
                    for isa in Isa::available() {
                        let ours = gemm_with(isa, &x, rows, &w, n, k, &b);
                        assert!(same_bits(&ours, &expected), "{isa} ({rows}, {n}, {k})");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_f32_rows_do_not_depend_on_their_neighbours() {
        let (rows, n, k) = (100, 70, 300);
        let mut seed = 11u32;
        let x = values(&mut seed, rows * k, 1.0);
        let w = values(&mut seed, n * k, 1.0);
        let b = values(&mut seed, n, 1.0);
        for isa in Isa::available() {
            let whole = gemm_with(isa, &x, rows, &w, n, k, &b);
            let head = gemm_with(isa, &x[..37 * k], 37, &w, n, k, &b);
            let tail = gemm_with(isa, &x[37 * k..], rows - 37, &w, n, k, &b);
            assert!(same_bits(&whole[..37 * n], &head), "{isa}");
            assert!(same_bits(&whole[37 * n..], &tail), "{isa}");
            let one = gemm_with(isa, &x[58 * k..59 * k], 1, &w, n, k, &b);
            assert!(same_bits(&whole[58 * n..59 * n], &one), "{isa}");
        }
        assert!(same_bits(
            &gemm(&x, rows, &w, n, k, &b),
            &reference(&x, rows, &w, n, k, &b)
        ));
    }

    #[test]
    fn gemm_f32_packing_matches_the_portable_packing() {
        let mut seed = 5u32;
        for (count, width, k) in [
            (5, 12, 37),
            (12, 12, 48),
            (32, 32, 33),
            (17, 32, 16),
            (3, 6, 9),
        ] {
            let src = values(&mut seed, count * k, 1.0);
            let mut expected = vec![f32::NAN; width * k];
            pack_portable(&src, count, k, &mut expected, width);
            let check = |name: &str, pack: &dyn Fn(&mut [f32])| {
                let mut packed = vec![f32::NAN; width * k];
                pack(&mut packed);
                assert!(
                    same_bits(&packed, &expected),
                    "{name} ({count}, {width}, {k})"
                );
            };
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(kernel) = x86::Avx512::new() {
                    check("avx512", &|dst| kernel.pack(&src, count, k, dst, width));
                }
                if let Some(kernel) = x86::Avx2::new() {
                    check("avx2", &|dst| kernel.pack(&src, count, k, dst, width));
                }
            }
            check("portable", &|dst| Portable.pack(&src, count, k, dst, width));
        }
    }

    #[test]
    fn gemm_f32_degenerate_shapes() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let w = [0.5f32, 0.25];
        for isa in Isa::available() {
            assert!(gemm_with(isa, &[], 0, &w, 1, 2, &[1.0]).is_empty());
            assert!(gemm_with(isa, &x, 2, &[], 0, 2, &[]).is_empty());
            assert_eq!(
                gemm_with(isa, &[], 3, &[], 2, 0, &[-0.0, 7.0]),
                [-0.0, 7.0, -0.0, 7.0, -0.0, 7.0]
            );
            assert_eq!(gemm_with(isa, &x, 2, &w, 1, 2, &[1.0]), [2.0, 3.5]);
        }
    }

    #[test]
    #[should_panic(expected = "f32 gemm")]
    fn gemm_f32_refuses_inconsistent_lengths() {
        gemm(&[0.0; 10], 2, &[0.0; 12], 3, 5, &[0.0; 3]);
    }

    /// `cargo test --release -p gpt2-model gemm_f32_throughput -- --ignored --nocapture`
    /// (`GEMM_COLD=8` rotates eight copies of the weights, so that they come from memory.)
    #[test]
    #[ignore = "a timing, not a check"]
    fn gemm_f32_throughput() {
        use candle_core::{Device, Tensor};
        let copies: usize = std::env::var("GEMM_COLD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let isas: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|&isa| isa != Isa::Portable)
            .collect();
        for rows in [512usize, 64] {
            for (n, k) in [(2304usize, 768usize), (3072, 768), (768, 3072)] {
                let x = values(&mut 1u32, rows * k, 0.5);
                let ws: Vec<Vec<f32>> = (0..copies)
                    .map(|c| values(&mut (2 + c as u32), n * k, 0.5))
                    .collect();
                let bias = values(&mut 3u32, n, 0.5);
                let device = &Device::Cpu;
                let xt = Tensor::from_slice(&x, (rows, k), device).expect("x");
                let wts: Vec<Tensor> = ws
                    .iter()
                    .map(|w| Tensor::from_slice(w, (n, k), device).expect("w"))
                    .collect();
                let bt = Tensor::from_slice(&bias, n, device).expect("bias");
                let mut best = vec![f64::MAX; isas.len() + 2];
                let mut turn = 0;
                let mut time = |slot: usize, f: &dyn Fn(usize)| {
                    turn += 1;
                    let t = std::time::Instant::now();
                    f(turn % copies);
                    best[slot] = best[slot].min(t.elapsed().as_secs_f64());
                };
                // Interleaved, so that a noisy neighbour slows every contender alike.
                for _ in 0..15 {
                    for (slot, &isa) in isas.iter().enumerate() {
                        time(slot, &|c| {
                            std::hint::black_box(gemm_with(isa, &x, rows, &ws[c], n, k, &bias));
                        });
                    }
                    time(isas.len(), &|c| {
                        std::hint::black_box(xt.matmul(&wts[c].t().expect("t")).expect("mm"));
                    });
                    time(isas.len() + 1, &|c| {
                        let y = xt.matmul(&wts[c].t().expect("t")).expect("mm");
                        std::hint::black_box(y.broadcast_add(&bt).expect("add"));
                    });
                }
                let flops = 2.0 * (rows * n * k) as f64;
                let names = isas
                    .iter()
                    .map(|isa| isa.name())
                    .chain(["candle", "candle+bias"]);
                let figures: Vec<String> = names
                    .zip(&best)
                    .map(|(name, s)| format!("{name} {:.1}", flops / s / 1e9))
                    .collect();
                println!("({rows}x{k})·({n}x{k})ᵀ GFLOP/s: {}", figures.join(", "));
            }
        }
    }
}
