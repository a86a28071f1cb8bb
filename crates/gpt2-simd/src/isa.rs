//! Which instruction set the kernels run: detected once, or pinned by `GPT2_ISA`.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that pins the kernels to one instruction set: `portable`, `avx2`,
/// `avx512` or `amx`. Unset or empty means the widest the CPU has.
pub const ISA_ENV: &str = "GPT2_ISA";

/// An instruction-set level the kernels are compiled for; each level includes the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Baseline code for the target (SSE2 on x86-64): runs everywhere.
    Portable,
    /// AVX2 with FMA and F16C (x86-64 since Haswell / Zen 1).
    Avx2,
    /// AVX-512 F, BW and DQ on top of [`Isa::Avx2`] (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4).
    /// Kernels that also need VNNI ask [`Isa::has_vnni`], BF16 [`Isa::has_avx512_bf16`].
    Avx512,
    /// [`Isa::Avx512`] with AVX-512 BF16 plus Intel AMX's tile registers and BF16 tile products
    /// (Sapphire Rapids and later), where Linux lets this process use them: the bf16 weight
    /// kernel multiplies 16 × 32 by 32 × 16 blocks per instruction. Every other kernel runs its
    /// AVX-512 body at this level.
    Amx,
}

/// A `GPT2_ISA` value that is unknown or that this CPU cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsaError {
    value: String,
    reason: &'static str,
}

impl fmt::Display for IsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ISA_ENV}={:?}: {} (this CPU supports: {})",
            self.value,
            self.reason,
            Isa::available()
                .iter()
                .map(|isa| isa.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl std::error::Error for IsaError {}

impl Isa {
    /// Every level, narrowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// The name `GPT2_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run code compiled for this level. Cheap: the standard library
    /// caches the CPUID answers, so safe wrappers check it before every call into a SIMD body.
    #[inline]
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => {
                Isa::Avx512.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512bf16")
                    && crate::amx::bf16_tiles_granted()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether this level is AVX-512 (or above) and the CPU has its VNNI extension
    /// (`vpdpbusd`), which the q8_0 kernel needs.
    #[inline]
    pub fn has_vnni(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self >= Isa::Avx512
                && self.is_supported()
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether this level is AVX-512 (or above) and the CPU has its BF16 extension (`vdpbf16ps`,
    /// `vcvtne2ps2bf16`), which the bf16 weight kernel uses (Zen 4, Cooper Lake, Sapphire Rapids).
    /// A `GPT2_ISA` pin below `avx512` makes this false, so the bf16 kernel falls back to
    /// widening its weights to f32.
    #[inline]
    pub fn has_avx512_bf16(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self >= Isa::Avx512
                && self.is_supported()
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The widest level this CPU supports.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Portable)
    }

    /// The levels this CPU supports, narrowest first: what a test or a bench can compare.
    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// The level `GPT2_ISA` pins: `None` when it is unset or empty, an error when its value is
    /// unknown or the CPU cannot run it. Binaries call this at start to report a bad value.
    pub fn from_env() -> Result<Option<Isa>, IsaError> {
        match std::env::var(ISA_ENV) {
            Ok(value) if !value.trim().is_empty() => value.parse().map(Some),
            _ => Ok(None),
        }
    }

    /// The level the kernels run, fixed at the first call: `GPT2_ISA` when it names a level this
    /// CPU supports, else [`Isa::detect`]'s (a bad `GPT2_ISA` is reported by
    /// [`Isa::from_env`], which the binaries check at start).
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| match Isa::from_env() {
            Ok(Some(isa)) => isa,
            _ => Isa::detect(),
        })
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = IsaError;

    /// Parses a level name and checks that this CPU supports it.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let isa = match value.trim().to_ascii_lowercase().as_str() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            "amx" => Isa::Amx,
            _ => {
                return Err(IsaError {
                    value: value.to_string(),
                    reason: "unknown instruction set (expected portable, avx2, avx512 or amx)",
                })
            }
        };
        if !isa.is_supported() {
            return Err(IsaError {
                value: value.to_string(),
                reason: "this CPU does not support it",
            });
        }
        Ok(isa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_detection_picks_a_supported_one() {
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(Isa::detect().is_supported());
        assert_eq!(Isa::available().last(), Some(&Isa::detect()));
        // Each level includes the ones below it.
        for isa in Isa::available() {
            assert!(Isa::ALL
                .iter()
                .filter(|&&l| l <= isa)
                .all(|l| l.is_supported()));
        }
        assert!(!Isa::Portable.has_vnni() && !Isa::Avx2.has_vnni());
        assert!(!Isa::Portable.has_avx512_bf16() && !Isa::Avx2.has_avx512_bf16());
        if Isa::Amx.is_supported() {
            assert!(Isa::Amx.has_vnni() == Isa::Avx512.has_vnni() && Isa::Amx.has_avx512_bf16());
        }
        if Isa::Avx512.has_avx512_bf16() {
            assert!(Isa::Avx512.is_supported());
        }
    }

    #[test]
    fn names_parse_back_and_bad_values_are_explained() {
        for isa in Isa::available() {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
            assert_eq!(isa.to_string().to_uppercase().parse::<Isa>(), Ok(isa));
        }
        let err = "sse9".parse::<Isa>().unwrap_err().to_string();
        assert!(
            err.contains("GPT2_ISA=\"sse9\"") && err.contains("portable"),
            "{err}"
        );
        if !Isa::Avx512.is_supported() {
            let err = "avx512".parse::<Isa>().unwrap_err().to_string();
            assert!(err.contains("does not support"), "{err}");
        }
    }
}
