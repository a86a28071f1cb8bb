//! What the gpt2-rs kernels share: which instruction set to run (detected once at run time,
//! optionally pinned with the `GPT2_ISA` environment variable) and branch-free math that LLVM
//! vectorizes.
//!
//! Binaries are built for baseline x86-64; each kernel family compiles its body for every
//! [`Isa`] and asks [`Isa::active`] which one to run, so one binary is fast on any CPU.
//!
//! ```
//! use gpt2_simd::{exp, Isa};
//!
//! let isa = Isa::active(); // the widest the CPU has, or what GPT2_ISA pins
//! assert!(isa.is_supported());
//! assert!(Isa::available().contains(&Isa::Portable));
//! assert!((exp(1.0) - std::f32::consts::E).abs() < 1e-6);
//! ```

#[cfg(target_arch = "x86_64")]
pub mod amx;
mod isa;
mod math;

pub use isa::{Isa, IsaError, ISA_ENV};
pub use math::exp;
