//! What this machine can do at best, for `benches/compare/run.py`'s floors: the CPU model (with its
//! family and model numbers, `cpu_signature`) and the instruction sets that matter, the read
//! bandwidth from memory with 1 and N threads, and the arithmetic peak of N threads (f32 FMA; int8
//! dot products where AVX-512 VNNI exists; bf16 dot products where AVX-512 BF16 exists, and on AMX
//! tiles where the CPU has them and Linux grants them). Prints one JSON object on stdout and takes
//! a few seconds.
//!
//! ```sh
//! cargo run --release -p gpt2-benches --bin machine_probe -- --threads 2 --buffer-mib 1024
//! ```
//!
//! `--peaks-only` skips the read bandwidth (its fields are `null`, `read_passes` 0) and takes
//! about a second: `run.py` runs it around each level of its client sweep, so that a level's
//! share of the peak is taken against the machine of that minute.
//!
//! - *Read bandwidth*: every thread sums its share of a buffer much larger than the last-level
//!   cache (1 GiB by default) with the widest SIMD loads the CPU has (AVX-512, AVX2, else plain
//!   64-bit loads); best of a few passes. GB/s are 10⁹ bytes per second.
//! - *Peaks*: every thread runs 12 independent chains of `vfmadd` (f32), `vpdpbusd` (u8 × i8 into
//!   i32) or `vdpbf16ps` (bf16 pairs into f32) on registers, so nothing but the arithmetic units
//!   bounds them. A multiply-add counts as 2 operations (GFLOP/s and int8 GOPS alike). The AMX
//!   peak runs 6 independent tile sums of `tdpbf16ps` (16 × 32 by 32 × 16 each), what the bf16
//!   kernel runs at `GPT2_ISA=amx`.
//!
//! Instruction sets are detected at run time (`is_x86_feature_detected!`); nothing here needs
//! `-C target-cpu=native`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Passes over the buffer per thread count: at least the first, more while the second has not
/// run out (the best pass is reported: on a shared machine most passes lose time to other work).
const READ_PASSES: (usize, usize) = (3, 12);
const READ_BUDGET: Duration = Duration::from_millis(600);
/// How long one peak measurement runs (after a short calibration).
const PEAK_TARGET: Duration = Duration::from_millis(150);
/// Independent accumulator chains per thread in the peak loops (enough to cover the latency of
/// two pipelined units: 2 × 4-5 cycles).
const CHAINS: u64 = 12;

struct Options {
    threads: usize,
    buffer_mib: usize,
    peaks_only: bool,
}

fn usage() -> ! {
    eprintln!("usage: machine_probe [--threads N] [--buffer-mib M] [--peaks-only]");
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut options = Options {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        buffer_mib: 1024,
        peaks_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| -> usize {
            match args.next().and_then(|v| v.parse().ok()) {
                Some(v) if v > 0 => v,
                _ => usage(),
            }
        };
        match arg.as_str() {
            "--threads" => options.threads = value(&mut args),
            "--buffer-mib" => options.buffer_mib = value(&mut args),
            "--peaks-only" => options.peaks_only = true,
            _ => usage(),
        }
    }
    options
}

fn main() {
    let options = parse_options();
    let started = Instant::now();
    let threads = options.threads;

    let (read_1, read_n, passes) = if options.peaks_only {
        (None, None, 0)
    } else {
        let words = options.buffer_mib * (1 << 20) / 8;
        let buffer = filled_buffer(words, threads);
        let bytes = (words * 8) as f64;
        let (read_1, _) = best_of(|| bytes / timed_read(&buffer, 1) / 1e9);
        let (read_n, passes) = best_of(|| bytes / timed_read(&buffer, threads) / 1e9);
        (Some(read_1), Some(read_n), passes)
    };

    let f32_isa = kernels::f32_isa();
    let fma_1 = peak(1, kernels::fma_flops_per_iter(), kernels::fma);
    let fma_n = peak(threads, kernels::fma_flops_per_iter(), kernels::fma);
    let int8 =
        kernels::has_vnni().then(|| peak(threads, kernels::VNNI_OPS_PER_ITER, kernels::vnni));
    let bf16 =
        kernels::has_bf16().then(|| peak(threads, kernels::BF16_FLOPS_PER_ITER, kernels::bf16));
    let amx_bf16 = kernels::has_amx_bf16()
        .then(|| peak(threads, kernels::AMX_BF16_FLOPS_PER_ITER, kernels::amx_bf16));

    let (model, signature, cpuinfo_flags) = cpuinfo();
    let mut out = String::from("{");
    out += &format!("\"cpu_model\":{},", json_string(&model));
    out += &format!(
        "\"cpu_signature\":{},",
        signature.map_or_else(|| "null".to_string(), |s| json_string(&s))
    );
    out += &format!(
        "\"logical_cpus\":{},\"threads\":{threads},",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out += "\"features\":{";
    out += &kernels::features()
        .iter()
        .map(|(name, on)| format!("{}:{on}", json_string(name)))
        .collect::<Vec<_>>()
        .join(",");
    out += "},\"cpuinfo_flags\":[";
    out += &cpuinfo_flags
        .iter()
        .map(|f| json_string(f))
        .collect::<Vec<_>>()
        .join(",");
    out += "],";
    out += &format!(
        "\"buffer_mib\":{},\"read_passes\":{passes},",
        options.buffer_mib
    );
    let gbs = |x: Option<f64>| x.map_or_else(|| "null".to_string(), |x| format!("{x:.2}"));
    out += &format!(
        "\"read_gbs_1_thread\":{},\"read_gbs\":{},",
        gbs(read_1),
        gbs(read_n)
    );
    out += &format!("\"f32_isa\":{},", json_string(f32_isa));
    out += &format!("\"f32_fma_gflops_1_thread\":{fma_1:.1},\"f32_fma_gflops\":{fma_n:.1},");
    out += &format!("\"int8_vnni_gops\":{},", json_number(int8));
    out += &format!("\"bf16_dot_gflops\":{},", json_number(bf16));
    out += &format!("\"amx_bf16_gflops\":{},", json_number(amx_bf16));
    out += &format!("\"probe_s\":{:.2}", started.elapsed().as_secs_f64());
    out += "}";
    println!("{out}");
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out + "\""
}

fn json_number(x: Option<f64>) -> String {
    x.map_or_else(|| "null".to_string(), |x| format!("{x:.1}"))
}

/// The model name, the family and model numbers (x86: "AMD EPYC" names Zen 4, family 25, and
/// Zen 5, family 26, alike) and the SIMD-related flags the kernel reports (`/proc/cpuinfo`, Linux).
fn cpuinfo() -> (String, Option<String>, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name")
        .or_else(|| field("Model"))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let signature = field("cpu family")
        .zip(field("model"))
        .map(|(family, number)| format!("family {family}, model {number}"));
    let interesting = ["avx", "fma", "amx", "f16c", "sve", "asimd"];
    let flags = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|f| interesting.iter().any(|p| f.starts_with(p)))
        .map(str::to_string)
        .collect();
    (model, signature, flags)
}

/// The highest of `measure`'s results over [`READ_PASSES`] and [`READ_BUDGET`], and the passes.
fn best_of(mut measure: impl FnMut() -> f64) -> (f64, usize) {
    let started = Instant::now();
    let (min, max) = READ_PASSES;
    let mut best = 0.0f64;
    let mut passes = 0;
    while passes < min || (passes < max && started.elapsed() < READ_BUDGET) {
        best = best.max(measure());
        passes += 1;
    }
    (best, passes)
}

/// A buffer of `words` u64, every page written (by `threads` threads, so the pages are spread
/// the way the readers will use them).
fn filled_buffer(words: usize, threads: usize) -> Vec<u64> {
    let mut buffer: Vec<u64> = Vec::with_capacity(words);
    let chunk = words.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in buffer.spare_capacity_mut().chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                for (i, w) in part.iter_mut().enumerate() {
                    w.write((t * chunk + i) as u64);
                }
            });
        }
    });
    // SAFETY: the threads above wrote all `words` elements of the spare capacity (the chunks
    // cover it exactly), and `words` is the capacity.
    unsafe { buffer.set_len(words) };
    buffer
}

/// Seconds for `threads` threads, started together, to each sum their share of `buffer`.
fn timed_read(buffer: &[u64], threads: usize) -> f64 {
    let chunk = buffer.len().div_ceil(threads);
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = buffer
            .chunks(chunk)
            .map(|part| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    black_box(kernels::sum(black_box(part)));
                    (started, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        span(
            handles
                .into_iter()
                .map(|h| h.join().expect("a reader thread panicked")),
        )
    })
}

/// Seconds from the first thread's start to the last one's end (each thread times itself: the
/// spawning thread may be descheduled while they run).
fn span(times: impl Iterator<Item = (Instant, Instant)>) -> f64 {
    let (first, last) = times
        .reduce(|(s0, e0), (s1, e1)| (s0.min(s1), e0.max(e1)))
        .expect("at least one thread");
    (last - first).as_secs_f64()
}

/// Operations per second (in units of 10⁹) of `threads` threads each running `kernel(iters)`,
/// `ops_per_iter` operations per iteration; `iters` is calibrated to take about
/// [`PEAK_TARGET`].
fn peak(threads: usize, ops_per_iter: u64, kernel: fn(u64) -> f32) -> f64 {
    let run = |iters: u64| {
        let barrier = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let started = Instant::now();
                        black_box(kernel(black_box(iters)));
                        (started, Instant::now())
                    })
                })
                .collect();
            barrier.wait();
            span(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a compute thread panicked")),
            )
        })
    };
    let calibration = 1 << 16;
    let t = run(calibration).max(1e-6);
    let iters = ((PEAK_TARGET.as_secs_f64() / t) * calibration as f64).max(1.0) as u64;
    let best = (0..2).map(|_| run(iters)).fold(f64::INFINITY, f64::min);
    (threads as u64 * iters * ops_per_iter) as f64 / best / 1e9
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::CHAINS;
    use std::arch::x86_64::*;

    pub const VNNI_OPS_PER_ITER: u64 = CHAINS * 64 * 2;
    pub const BF16_FLOPS_PER_ITER: u64 = CHAINS * 32 * 2;
    /// 6 `tdpbf16ps` of 16 × 16 sums over 32 inputs.
    pub const AMX_BF16_FLOPS_PER_ITER: u64 = 6 * 16 * 16 * 32 * 2;

    pub fn features() -> Vec<(&'static str, bool)> {
        vec![
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
            ("avxvnni", is_x86_feature_detected!("avxvnni")),
        ]
    }

    fn has_avx512() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub fn has_vnni() -> bool {
        has_avx512() && is_x86_feature_detected!("avx512vnni")
    }

    pub fn has_bf16() -> bool {
        has_avx512() && is_x86_feature_detected!("avx512bf16")
    }

    /// AMX tiles with BF16, granted to this process (asks Linux once).
    pub fn has_amx_bf16() -> bool {
        gpt2_model::Isa::Amx.is_supported()
    }

    pub fn amx_bf16(iters: u64) -> f32 {
        use std::arch::asm;
        assert!(has_amx_bf16());
        let config = gpt2_simd::amx::TileConfig::new(&[(16, 64); 8]);
        // 1e-3 in bf16 in every input; the sums stay small.
        let operand = [0x3a83_3a83u32; 256];
        let mut sums = [0.0f32; 256];
        // SAFETY: AMX-TILE and AMX-BF16 with the tile state granted (asserted above); the loads
        // read 16 rows of 64 bytes of `operand`, the store writes 16 rows of 64 bytes of `sums`.
        unsafe {
            config.load();
            asm!(
                "tileloadd tmm6, [{p} + {s} * 1]",
                "tileloadd tmm7, [{p} + {s} * 1]",
                p = in(reg) operand.as_ptr(),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
            for _ in 0..iters {
                asm!(
                    "tdpbf16ps tmm0, tmm6, tmm7",
                    "tdpbf16ps tmm1, tmm6, tmm7",
                    "tdpbf16ps tmm2, tmm6, tmm7",
                    "tdpbf16ps tmm3, tmm6, tmm7",
                    "tdpbf16ps tmm4, tmm6, tmm7",
                    "tdpbf16ps tmm5, tmm6, tmm7",
                    options(nostack, nomem)
                );
            }
            asm!(
                "tilestored [{p} + {s} * 1], tmm0",
                p = in(reg) sums.as_mut_ptr(),
                s = in(reg) 64usize,
                options(nostack)
            );
            gpt2_simd::amx::TileConfig::release();
        }
        sums.iter().sum()
    }

    pub fn f32_isa() -> &'static str {
        if has_avx512() {
            "avx512f"
        } else if has_avx2() {
            "avx2+fma"
        } else {
            "portable"
        }
    }

    pub fn sum(data: &[u64]) -> u64 {
        if has_avx512() {
            // SAFETY: AVX-512F was detected at run time.
            unsafe { sum_avx512(data) }
        } else if has_avx2() {
            // SAFETY: AVX2 was detected at run time.
            unsafe { sum_avx2(data) }
        } else {
            super::portable::sum(data)
        }
    }

    #[target_feature(enable = "avx512f")]
    fn sum_avx512(data: &[u64]) -> u64 {
        let blocks = data.chunks_exact(32);
        let rest = super::portable::sum(blocks.remainder());
        let mut acc = [_mm512_setzero_si512(); 4];
        for block in blocks {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` holds 32 u64, so the 8 at `8 * j` (j < 4) are in bounds;
                // the load is unaligned.
                let v = unsafe { _mm512_loadu_si512(block.as_ptr().add(8 * j).cast()) };
                *a = _mm512_add_epi64(*a, v);
            }
        }
        let total = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        (_mm512_reduce_add_epi64(total) as u64).wrapping_add(rest)
    }

    #[target_feature(enable = "avx2")]
    fn sum_avx2(data: &[u64]) -> u64 {
        let blocks = data.chunks_exact(16);
        let rest = super::portable::sum(blocks.remainder());
        let mut acc = [_mm256_setzero_si256(); 4];
        for block in blocks {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` holds 16 u64, so the 4 at `4 * j` (j < 4) are in bounds;
                // the load is unaligned.
                let v = unsafe { _mm256_loadu_si256(block.as_ptr().add(4 * j).cast()) };
                *a = _mm256_add_epi64(*a, v);
            }
        }
        let total = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        let mut lanes = [0u64; 4];
        // SAFETY: `lanes` is 32 bytes, the size of one __m256i; the store is unaligned.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
        lanes.iter().fold(rest, |s, &x| s.wrapping_add(x))
    }

    pub fn fma_flops_per_iter() -> u64 {
        let lanes = if has_avx512() {
            16
        } else if has_avx2() {
            8
        } else {
            super::portable::LANES
        };
        CHAINS * lanes * 2
    }

    pub fn fma(iters: u64) -> f32 {
        if has_avx512() {
            // SAFETY: AVX-512F was detected at run time.
            unsafe { fma_avx512(iters) }
        } else if has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { fma_avx2(iters) }
        } else {
            super::portable::fma(iters)
        }
    }

    /// Runs `$op` on 12 named accumulators `iters` times (named, not an array, so that they
    /// stay in registers). The starting values go through `black_box`, so that the compiler can
    /// neither merge the (otherwise identical) chains nor fold them.
    macro_rules! chains {
        ($iters:expr, $init:expr, |$a:ident| $op:expr) => {
            chains!(@ $iters, $init, |$a| $op, a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11)
        };
        (@ $iters:expr, $init:expr, |$a:ident| $op:expr, $($acc:ident)*) => {{
            $(let mut $acc = std::hint::black_box($init);)*
            for _ in 0..$iters {
                $($acc = { let $a = $acc; $op };)*
            }
            [$($acc),*]
        }};
    }

    #[target_feature(enable = "avx512f")]
    fn fma_avx512(iters: u64) -> f32 {
        // a ← a·m + c converges to c / (1 − m) and never overflows.
        let m = std::hint::black_box(_mm512_set1_ps(0.999_9));
        let c = std::hint::black_box(_mm512_set1_ps(1e-4));
        let acc = chains!(iters, _mm512_set1_ps(1.0), |a| _mm512_fmadd_ps(a, m, c));
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    fn fma_avx2(iters: u64) -> f32 {
        let m = std::hint::black_box(_mm256_set1_ps(0.999_9));
        let c = std::hint::black_box(_mm256_set1_ps(1e-4));
        let acc = chains!(iters, _mm256_set1_ps(1.0), |a| _mm256_fmadd_ps(a, m, c));
        let mut lanes = [0f32; 8];
        let total = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        // SAFETY: `lanes` is 32 bytes, the size of one __m256; the store is unaligned.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        lanes.iter().sum()
    }

    pub fn vnni(iters: u64) -> f32 {
        assert!(has_vnni());
        // SAFETY: AVX-512F and AVX-512 VNNI were detected at run time (asserted above).
        unsafe { vnni_avx512(iters) }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    fn vnni_avx512(iters: u64) -> f32 {
        // Each vpdpbusd: 64 u8 × i8 products, summed in fours into 16 i32 lanes (wrapping).
        let x = std::hint::black_box(_mm512_set1_epi8(3));
        let y = std::hint::black_box(_mm512_set1_epi8(-2));
        let acc = chains!(iters, _mm512_setzero_si512(), |a| _mm512_dpbusd_epi32(
            a, x, y
        ));
        acc.iter().map(|&a| _mm512_reduce_add_epi32(a) as f32).sum()
    }

    pub fn bf16(iters: u64) -> f32 {
        assert!(has_bf16());
        // SAFETY: AVX-512F and AVX-512 BF16 were detected at run time (asserted above).
        unsafe { bf16_avx512(iters) }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    fn bf16_avx512(iters: u64) -> f32 {
        // Each vdpbf16ps: 32 bf16 products, summed in pairs into 16 f32 lanes.
        let x = std::hint::black_box(_mm512_cvtne2ps_pbh(
            _mm512_set1_ps(1e-3),
            _mm512_set1_ps(1e-3),
        ));
        let acc = chains!(iters, _mm512_setzero_ps(), |a| _mm512_dpbf16_ps(a, x, x));
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
}

/// Plain Rust versions, for CPUs without AVX2 and other architectures.
mod portable {
    use super::CHAINS;

    pub const LANES: u64 = 8;

    pub fn sum(data: &[u64]) -> u64 {
        let blocks = data.chunks_exact(8);
        let rest = blocks
            .remainder()
            .iter()
            .fold(0u64, |s, &x| s.wrapping_add(x));
        let mut acc = [0u64; 8];
        for block in blocks {
            for (a, &x) in acc.iter_mut().zip(block) {
                *a = a.wrapping_add(x);
            }
        }
        acc.iter().fold(rest, |s, &x| s.wrapping_add(x))
    }

    /// Multiply-adds (a multiply then an add where the target has no FMA) on `CHAINS × LANES`
    /// independent lanes.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub fn fma(iters: u64) -> f32 {
        let mut acc = [[1f32; LANES as usize]; CHAINS as usize];
        for _ in 0..iters {
            for chain in &mut acc {
                for a in chain.iter_mut() {
                    *a = *a * 0.999_9 + 1e-4;
                }
            }
        }
        acc.iter().flatten().sum()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    pub const VNNI_OPS_PER_ITER: u64 = 0;
    pub const BF16_FLOPS_PER_ITER: u64 = 0;
    pub const AMX_BF16_FLOPS_PER_ITER: u64 = 0;

    pub fn features() -> Vec<(&'static str, bool)> {
        Vec::new()
    }
    pub fn has_vnni() -> bool {
        false
    }
    pub fn has_bf16() -> bool {
        false
    }
    pub fn has_amx_bf16() -> bool {
        false
    }
    pub fn f32_isa() -> &'static str {
        "portable"
    }
    pub fn sum(data: &[u64]) -> u64 {
        super::portable::sum(data)
    }
    pub fn fma_flops_per_iter() -> u64 {
        super::CHAINS * super::portable::LANES * 2
    }
    pub fn fma(iters: u64) -> f32 {
        super::portable::fma(iters)
    }
    pub fn vnni(_: u64) -> f32 {
        unreachable!("no VNNI off x86-64")
    }
    pub fn bf16(_: u64) -> f32 {
        unreachable!("no BF16 off x86-64")
    }
    pub fn amx_bf16(_: u64) -> f32 {
        unreachable!("no AMX off x86-64")
    }
}
