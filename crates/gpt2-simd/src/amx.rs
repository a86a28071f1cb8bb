//! Intel AMX's tiles: whether their BF16 products can run in this process, and the
//! configuration every tile routine loads first.
//!
//! The CPU must have the tile registers (AMX-TILE) and their BF16 products (AMX-BF16), and
//! Linux must grant this process the 8 KiB of extra register state they need: since 5.16 it
//! starts every process without it, and an AMX instruction without the grant is a fatal fault.
//! The grant is asked once, with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, and is
//! then process-wide, for threads that exist and threads created later.

use std::sync::OnceLock;

/// CPUID leaf 7 (sub-leaf 0), EDX: AMX-BF16 is bit 22, AMX-TILE bit 24.
const AMX_BF16_BIT: u32 = 1 << 22;
const AMX_TILE_BIT: u32 = 1 << 24;

/// `arch_prctl` code that asks for an extended state component (`asm/prctl.h`).
#[cfg(target_os = "linux")]
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
/// The tile data state component (XSAVE feature 18).
#[cfg(target_os = "linux")]
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// True once the CPU has AMX-TILE and AMX-BF16 and the kernel has granted the tile state to
/// this process; asked at the first call only.
pub(crate) fn bf16_tiles_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| cpu_has_bf16_tiles() && request_tile_state())
}

fn cpu_has_bf16_tiles() -> bool {
    // Leaf 7 exists when leaf 0 reports it.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    edx & AMX_TILE_BIT != 0 && edx & AMX_BF16_BIT != 0
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    // SAFETY: this arch_prctl only changes which register state the process may use; it reads
    // no memory of ours. It fails (and we use no tiles) on kernels before 5.16, or when a
    // thread's alternate signal stack is too small for the larger signal frame.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// `ldtilecfg`'s 64-byte operand in palette 1 (8 tiles of up to 16 rows of 64 bytes): the rows
/// and bytes per row of each tile a routine uses. Loading one zeroes every tile.
#[repr(C, align(64))]
pub struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tile `t` gets `shapes[t]` as (rows, bytes per row); the rest stay unused. Panics beyond 8
    /// tiles, 16 rows or 64 bytes.
    pub fn new(shapes: &[(usize, usize)]) -> Self {
        assert!(shapes.len() <= 8, "palette 1 has 8 tiles");
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for (tile, &(rows, bytes)) in shapes.iter().enumerate() {
            assert!(
                rows <= 16 && bytes <= 64,
                "tile {tile}: {rows} rows of {bytes} bytes"
            );
            config.rows[tile] = rows as u8;
            config.bytes_per_row[tile] = bytes as u16;
        }
        config
    }

    /// Loads this configuration (`ldtilecfg`), zeroing every tile.
    ///
    /// # Safety
    ///
    /// The CPU must have AMX-TILE and the process the tile state
    /// ([`Isa::Amx`](crate::Isa::Amx)`.is_supported()`).
    #[inline]
    pub unsafe fn load(&self) {
        // SAFETY: the caller guarantees AMX; `self` is a valid palette-1 configuration.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) self, options(nostack, readonly)) };
    }

    /// Returns the tiles to their initial state (`tilerelease`), so that the kernel need not
    /// save 8 KiB of them at each context switch of this thread.
    ///
    /// # Safety
    ///
    /// As [`TileConfig::load`].
    #[inline]
    pub unsafe fn release() {
        // SAFETY: the caller guarantees AMX.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}
