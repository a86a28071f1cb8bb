//! The bf16 matmul on Intel AMX tiles ([`Isa::Amx`](super::Isa::Amx)): `tdpbf16ps` multiplies
//! a 16-row × 32-input block of activations by a 32-input × 16-output block of weights into 16 ×
//! 16 f32 sums, where `vdpbf16ps` advances 16 outputs of one row by 2 inputs.
//!
//! No repacking: [`Bf16Matrix`](super::bf16::Bf16Matrix)'s layout, a group of 16 outputs as
//! `(k/2, 16)` words of 2 bf16, is the tile instruction's second operand as it stands (16 words
//! of pair `p` form its row `p`), and the activation rows rounded to bf16 pairs, `(rows, k/2)`,
//! are its first operand with a row stride of `k/2` words. The products are exact in f32, as in
//! the other bodies; the tile unit adds them in its own order, so its sums differ from
//! `vdpbf16ps`'s in the last bits.
//!
//! Two tile layouts, by the number of rows:
//!
//! - up to 16 rows (single requests, [`wide_products`]): `tmm0`–`tmm3` the sums of a task's 4
//!   groups of 16 outputs, `tmm4` the activations of 32 inputs, `tmm5` and `tmm6` the weights,
//!   alternating so that one loads while the other multiplies;
//! - more (batched decode steps, prefill, [`tall_products`]): `tmm0`–`tmm2` the sums of up to 3
//!   blocks of 16 rows for one group, `tmm7` and `tmm3` (alternating) the group's weights, loaded
//!   once for all the blocks, and the activations in `tmm4`, `tmm5` and `tmm6` (the last block,
//!   which may be shorter). Against the first layout run 16 rows at a time, a (3072, 768)
//!   matmul of 48 rows went from 0.44 to 0.41 ms and a 512-row prefill's shapes from 514–820 to
//!   577–892 GFLOP/s. That is still a quarter of the probe's tile peak (3348 GFLOP/s): the
//!   activation tiles come from L2 (a 48-row pass of 768 inputs is 73 KB, L1 holds 48), about
//!   4 KB of loads per 3 products.
//!
//! Measured on a 2-core Xeon with AMX (probe: `vdpbf16ps` 143–172 GFLOP/s on both cores, f32
//! FMA 265–297, tiles 3348–4358): see `docs/performance-xeon.md` for the decode and prefill
//! figures.

use std::arch::asm;

use gpt2_simd::amx::TileConfig;

use super::write_lanes;

/// Outputs per tile row, and rows per tile.
const LANES: usize = 16;
/// Word pairs (32 bf16 inputs) per tile step.
const STEP_PAIRS: usize = 16;
/// Groups of 16 outputs whose sums stay in tiles at once (`tmm0`–`tmm3`).
const GROUPS: usize = 4;

/// Sums and activations of `rows` rows (1 to 16): `tmm0`–`tmm4`; two weight tiles of 16 pairs:
/// `tmm5`, `tmm6`.
fn config(rows: usize) -> TileConfig {
    TileConfig::new(&[
        (rows, 64),
        (rows, 64),
        (rows, 64),
        (rows, 64),
        (rows, 64),
        (16, 64),
        (16, 64),
    ])
}

/// Whether [`tile`] can run a matrix of `k` inputs: whole tile steps of 32 inputs (every
/// GPT-2 size: 768, 1024, 1280, 1600, and 4 times those).
pub(super) fn fits(k: usize) -> bool {
    k.is_multiple_of(2 * STEP_PAIRS)
}

/// Outputs `start..start + bias.len()` (`start` a multiple of 16) of every row into `tile`
/// (row stride `width`), with the bias added. `weights` is the matrix's packed pairs, `(groups,
/// half, 16)`; `activations` the rows' pairs, `(rows, half)`.
///
/// # Safety
///
/// The CPU must support AMX-TILE and AMX-BF16 and the process must hold the tile state
/// ([`Isa::Amx`](super::Isa::Amx)`.is_supported()`).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    weights: &[u32],
    half: usize,
    activations: &[u32],
    rows: usize,
    start: usize,
    bias: &[f32],
    tile: &mut [f32],
    width: usize,
) {
    let end = start + bias.len();
    let first_group = start / LANES;
    let groups = end.div_ceil(LANES) - first_group;
    assert!(
        start.is_multiple_of(LANES)
            && half.is_multiple_of(STEP_PAIRS)
            && activations.len() >= rows * half
            && weights.len() >= (first_group + groups) * half * LANES
            && tile.len() >= rows * width,
        "bf16 AMX tile: outputs {start}..{end}, {rows} rows of {half} pairs out of range"
    );
    let mut sums = Sums([[[0.0; LANES]; LANES]; GROUPS]);
    if rows > LANES {
        // More than 16 rows: passes of up to 48, each over the task's groups one at a time, the
        // group's weights loaded once per pass.
        for r0 in (0..rows).step_by(TALL_ROWS) {
            let pass = (rows - r0).min(TALL_ROWS);
            let blocks = pass.div_ceil(LANES);
            let last = pass - (blocks - 1) * LANES;
            // Sums: full blocks, then the last; weights in `tmm3` and `tmm7`; activations: two full
            // tiles and the last.
            let mut shapes = [(0, 0); 8];
            for (b, shape) in shapes.iter_mut().enumerate().take(blocks) {
                *shape = (if b + 1 == blocks { last } else { LANES }, 64);
            }
            shapes[3] = (STEP_PAIRS, 64);
            shapes[4] = (LANES, 64);
            shapes[5] = (LANES, 64);
            shapes[6] = (last, 64);
            shapes[7] = (STEP_PAIRS, 64);
            // SAFETY: AMX as the caller guarantees.
            unsafe { TileConfig::new(&shapes).load() };
            let x = &activations[r0 * half..][..pass * half];
            for g in 0..groups {
                let w = &weights[(first_group + g) * half * LANES..][..half * LANES];
                // SAFETY: AMX as above; `x` holds `pass` rows of `half` pairs, `w` one group of
                // `half` pairs of 16 words (sliced above), what `tall_products` reads.
                unsafe {
                    match blocks {
                        3 => tall_products::<3>(w, x, half, &mut sums),
                        2 => tall_products::<2>(w, x, half, &mut sums),
                        _ => tall_products::<1>(w, x, half, &mut sums),
                    }
                }
                let first = (first_group + g) * LANES;
                for (b, block) in sums.0.iter().enumerate().take(blocks) {
                    let height = if b + 1 == blocks { last } else { LANES };
                    for (row, lanes) in block.iter().enumerate().take(height) {
                        write_lanes(lanes, first, r0 + b * LANES + row, start, bias, tile, width);
                    }
                }
            }
        }
        // SAFETY: AMX as the caller guarantees.
        unsafe { TileConfig::release() };
        return;
    }
    let mut configured = 0;
    for r0 in (0..rows).step_by(LANES) {
        let height = (rows - r0).min(LANES);
        if height != configured {
            // SAFETY: the caller guarantees AMX.
            unsafe { config(height).load() };
            configured = height;
        }
        let x = &activations[r0 * half..][..height * half];
        for g in (0..groups).step_by(GROUPS) {
            let count = (groups - g).min(GROUPS);
            let w = &weights[(first_group + g) * half * LANES..][..count * half * LANES];
            // SAFETY: AMX as above; `x` holds `height` rows of `half` pairs and `w` `count`
            // groups of `half` pairs of 16 words (sliced above), what `wide_products` reads.
            unsafe {
                match count {
                    4 => wide_products::<4>(w, x, half, &mut sums),
                    3 => wide_products::<3>(w, x, half, &mut sums),
                    2 => wide_products::<2>(w, x, half, &mut sums),
                    _ => wide_products::<1>(w, x, half, &mut sums),
                }
            }
            for (c, group) in sums.0.iter().enumerate().take(count) {
                let first = (first_group + g + c) * LANES;
                for (row, lanes) in group.iter().enumerate().take(height) {
                    write_lanes(lanes, first, r0 + row, start, bias, tile, width);
                }
            }
        }
    }
    // SAFETY: AMX as above.
    unsafe { TileConfig::release() };
}

/// The sums of [`GROUPS`] tiles, 64-byte rows as `tilestored` writes them.
#[repr(C, align(64))]
struct Sums([[[f32; LANES]; LANES]; GROUPS]);

/// `sums[c] = x · group c of w` for `G` groups, over all `half` pairs.
///
/// # Safety
///
/// AMX as in [`tile`], tiles configured for `x`'s rows; `w` holds `G` groups of `half` pairs of
/// 16 words and `x` the configured number of rows of `half` pairs.
#[inline(always)]
unsafe fn wide_products<const G: usize>(w: &[u32], x: &[u32], half: usize, sums: &mut Sums) {
    let x_stride = half * 4;
    let w_stride = LANES * 4;
    let group_words = half * LANES;
    // SAFETY: each load reads the configured rows of 64 bytes at the given stride inside `x` or
    // `w`, the stores write whole `Sums` tiles; the caller guarantees AMX.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for step in 0..half / STEP_PAIRS {
            let xp = x.as_ptr().add(step * STEP_PAIRS);
            asm!("tileloadd tmm4, [{p} + {s} * 1]", p = in(reg) xp, s = in(reg) x_stride, options(nostack, readonly));
            for c in 0..G {
                let wp = w.as_ptr().add(c * group_words + step * STEP_PAIRS * LANES);
                match c {
                    0 => {
                        asm!("tileloadd tmm5, [{p} + {s} * 1]", "tdpbf16ps tmm0, tmm4, tmm5", p = in(reg) wp, s = in(reg) w_stride, options(nostack, readonly))
                    }
                    1 => {
                        asm!("tileloadd tmm6, [{p} + {s} * 1]", "tdpbf16ps tmm1, tmm4, tmm6", p = in(reg) wp, s = in(reg) w_stride, options(nostack, readonly))
                    }
                    2 => {
                        asm!("tileloadd tmm5, [{p} + {s} * 1]", "tdpbf16ps tmm2, tmm4, tmm5", p = in(reg) wp, s = in(reg) w_stride, options(nostack, readonly))
                    }
                    _ => {
                        asm!("tileloadd tmm6, [{p} + {s} * 1]", "tdpbf16ps tmm3, tmm4, tmm6", p = in(reg) wp, s = in(reg) w_stride, options(nostack, readonly))
                    }
                }
            }
        }
        store_sums::<G>(sums);
    }
}

/// Rows per pass of [`tall_products`]: 3 blocks of 16 (the fourth sum tile holds weights).
const TALL_ROWS: usize = 3 * LANES;

/// One tile step of [`tall_products`]: the weights of pair `step` into `$w` (`tmm3` or `tmm7`),
/// then each block's activations times them into its sums.
macro_rules! tall_step {
    ($blocks:expr, $w:literal, $wp:expr, $x:expr, $block:expr, $x_stride:expr) => {{
        let w_stride = LANES * 4;
        asm!(
            concat!("tileloadd ", $w, ", [{p} + {s} * 1]"),
            p = in(reg) $wp, s = in(reg) w_stride, options(nostack, readonly)
        );
        // Blocks past `$blocks` are never read (`wrapping_add`: no pointer past `x` is formed).
        let (x0, x1, x2) = ($x, $x.wrapping_add($block), $x.wrapping_add(2 * $block));
        let s = $x_stride;
        match $blocks {
            1 => asm!(
                "tileloadd tmm6, [{p0} + {s} * 1]", concat!("tdpbf16ps tmm0, tmm6, ", $w),
                p0 = in(reg) x0, s = in(reg) s, options(nostack, readonly)
            ),
            2 => asm!(
                "tileloadd tmm4, [{p0} + {s} * 1]", concat!("tdpbf16ps tmm0, tmm4, ", $w),
                "tileloadd tmm6, [{p1} + {s} * 1]", concat!("tdpbf16ps tmm1, tmm6, ", $w),
                p0 = in(reg) x0, p1 = in(reg) x1, s = in(reg) s, options(nostack, readonly)
            ),
            _ => asm!(
                "tileloadd tmm4, [{p0} + {s} * 1]", concat!("tdpbf16ps tmm0, tmm4, ", $w),
                "tileloadd tmm5, [{p1} + {s} * 1]", concat!("tdpbf16ps tmm1, tmm5, ", $w),
                "tileloadd tmm6, [{p2} + {s} * 1]", concat!("tdpbf16ps tmm2, tmm6, ", $w),
                p0 = in(reg) x0, p1 = in(reg) x1, p2 = in(reg) x2, s = in(reg) s,
                options(nostack, readonly)
            ),
        }
    }};
}

/// `sums[b] = block b of x · w` for `B` (1 to 3) blocks of 16 rows (the last one possibly
/// shorter) and one group of `w`, over all `half` pairs. The weights alternate between `tmm7`
/// and `tmm3`, so that the next step's load need not wait for the products reading the last
/// one (48 rows of (3072, 768): 0.43 ms with `tmm7` alone, 0.41 alternating).
///
/// # Safety
///
/// AMX as in [`tile`], tiles configured by [`tile`] for these blocks; `w` holds `half` pairs of
/// 16 words and `x` the configured rows of `half` pairs.
#[inline(always)]
unsafe fn tall_products<const B: usize>(w: &[u32], x: &[u32], half: usize, sums: &mut Sums) {
    let x_stride = half * 4;
    let block = LANES * half;
    let steps = half / STEP_PAIRS;
    let weights_at = |step: usize| w.as_ptr().wrapping_add(step * STEP_PAIRS * LANES);
    let x_at = |step: usize| x.as_ptr().wrapping_add(step * STEP_PAIRS);
    // SAFETY: each load reads the configured rows of 64 bytes at the given stride inside `x` or
    // `w` (steps below `half / 16`), the stores write whole `Sums` tiles; the caller guarantees
    // AMX.
    unsafe {
        // Only the configured sum tiles: an unconfigured one is an illegal operand.
        asm!("tilezero tmm0", options(nostack, nomem));
        if B > 1 {
            asm!("tilezero tmm1", options(nostack, nomem));
        }
        if B > 2 {
            asm!("tilezero tmm2", options(nostack, nomem));
        }
        let mut step = 0;
        while step + 1 < steps {
            tall_step!(B, "tmm7", weights_at(step), x_at(step), block, x_stride);
            tall_step!(
                B,
                "tmm3",
                weights_at(step + 1),
                x_at(step + 1),
                block,
                x_stride
            );
            step += 2;
        }
        if step < steps {
            tall_step!(B, "tmm7", weights_at(step), x_at(step), block, x_stride);
        }
        store_sums::<B>(sums);
    }
}

/// Stores `tmm0`..`tmm{N-1}` into `sums`.
///
/// # Safety
///
/// AMX as in [`tile`]; each tile configured with at most 16 rows of 64 bytes.
#[inline(always)]
unsafe fn store_sums<const N: usize>(sums: &mut Sums) {
    let out = sums.0.as_mut_ptr();
    let s = LANES * 4;
    // SAFETY: each store writes at most 16 rows of 64 bytes into its own `Sums` tile; the caller
    // guarantees AMX.
    unsafe {
        asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) out, s = in(reg) s, options(nostack));
        if N > 1 {
            asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) out.add(1), s = in(reg) s, options(nostack));
        }
        if N > 2 {
            asm!("tilestored [{p} + {s} * 1], tmm2", p = in(reg) out.add(2), s = in(reg) s, options(nostack));
        }
        if N > 3 {
            asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) out.add(3), s = in(reg) s, options(nostack));
        }
    }
}
