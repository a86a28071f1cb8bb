//! The bf16 matmul on Intel AMX tiles ([`Isa::Amx`](super::Isa::Amx)): `tdpbf16ps` multiplies
//! a 16-row × 32-input block of activations by a 32-input × 16-output block of weights into 16 ×
//! 16 f32 sums, where `vdpbf16ps` advances 16 outputs of one row by 2 inputs.
//!
//! No repacking: [`Bf16Matrix`](super::bf16::Bf16Matrix)'s layout, a group of 16 outputs as
//! `(k/2, 16)` words of 2 bf16, is the tile instruction's second operand as it stands (16 words
//! of pair `p` form its row `p`), and the activation rows rounded to bf16 pairs, `(rows, k/2)`,
//! are its first operand with a row stride of `k/2` words. The products are exact in f32, as in
//! the other bodies; the tile unit adds each pair low input first, `vdpbf16ps` high first, so
//! the two differ in the last bits of a sum.
//!
//! Tiles, for a task's up to 4 groups of 16 outputs and up to 16 rows at a time: `tmm0`–`tmm3`
//! the sums of each group, `tmm4` the activations of 32 inputs, `tmm5` and `tmm6` the weights,
//! alternating so that one loads while the other multiplies.
//!
//! Measured on a 2-core Sapphire Rapids Xeon (probe: `vdpbf16ps` 154 GFLOP/s on both cores,
//! f32 FMA 275): see `docs/performance-bf16.md` for the decode and prefill figures.

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
            // groups of `half` pairs of 16 words (sliced above), what `products` reads.
            unsafe {
                match count {
                    4 => products::<4>(w, x, half, &mut sums),
                    3 => products::<3>(w, x, half, &mut sums),
                    2 => products::<2>(w, x, half, &mut sums),
                    _ => products::<1>(w, x, half, &mut sums),
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
unsafe fn products<const G: usize>(w: &[u32], x: &[u32], half: usize, sums: &mut Sums) {
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
        let out = sums.0.as_mut_ptr();
        let s = w_stride;
        asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) out, s = in(reg) s, options(nostack));
        if G > 1 {
            asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) out.add(1), s = in(reg) s, options(nostack));
        }
        if G > 2 {
            asm!("tilestored [{p} + {s} * 1], tmm2", p = in(reg) out.add(2), s = in(reg) s, options(nostack));
        }
        if G > 3 {
            asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) out.add(3), s = in(reg) s, options(nostack));
        }
    }
}
