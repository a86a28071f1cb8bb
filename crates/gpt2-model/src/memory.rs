//! Weight buffers backed by transparent huge pages.
//!
//! A decode step streams every weight once; with 4 KiB pages that is one TLB miss per 4 KiB,
//! which costs a quarter of the memory bandwidth on the machines measured (22 GB/s with huge
//! pages against 15 GB/s without, on 2 threads). The kernel only backs memory with huge pages
//! where `madvise(MADV_HUGEPAGE)` asks, so weights are copied into buffers that ask first.

use candle_core::{Device, Storage, Tensor};

const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// Pins glibc's mmap threshold at 32 MiB: allocations of that size or more get their own mapping,
/// returned to the OS when freed. By default glibc raises the threshold to the size of the largest
/// block freed so far, so one freed 150 MB buffer (an embedding table while converting weights)
/// would make every later block of that size stay in the process's resident memory. Call once at
/// start; a no-op elsewhere than glibc. Freed blocks under the threshold stay in the allocator's
/// arenas until [`trim_freed_memory`] (the server calls it every 10 s).
///
/// 32 MiB rather than the 1 MiB of earlier rounds: a 512-token prefill allocates and frees
/// 1.5–6.3 MB activations for every matmul and element-wise op, and with their own mappings each
/// came back as fresh pages, zeroed by the kernel on first touch: `clear_page_erms` and the fault
/// path were about a tenth of the prefill's CPU samples. Reusing arena memory took a 512-token
/// f32 prefill from 0.68 to 0.60 s and a bf16 one from 0.49 to 0.45 s (2-vCPU EPYC); a decode
/// step of 48 rows frees its 9.6 MB of logits every step too.
///
/// It also lets each allocator arena keep up to 32 MiB free at the top of its heap (the same size
/// as the mmap threshold: whatever the arena hands out, it may keep). Setting the mmap threshold
/// pins glibc's trim threshold at 128 KiB, so the sub-MiB buffers of every decode step (logits,
/// the LM head's tiles, activations) were handed back to the OS when dropped and page-faulted in
/// again at the next step: ~640 faults per 5-beam step (124M q8_0), 4–15% of its time. At 4 MiB,
/// a prefill's 3–6 MB activations still went back at every free at the top and came in again as
/// fresh pages at the next layer: 32 MiB took a 512-token request (`gpt2 bench`, 2-vCPU EPYC,
/// 4 interleaved rounds) from 0.43 to 0.35 s in bf16, 0.50 to 0.40 s in q8_0 and 0.54 to 0.49 s
/// in f32. The server's trim every 10 s ([`trim_freed_memory`]) still returns all of it.
pub fn return_freed_memory_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Returns the free memory of every allocator arena to the OS now (glibc's `malloc_trim`).
/// Blocks under the mmap threshold (request bodies arrive in chunks of a few hundred KiB) stay in
/// the arenas after they are freed: 300 stalled 6 MiB bodies left 1.8 GB resident for good. A
/// server calls this now and then; a no-op elsewhere than glibc.
pub fn trim_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An empty vector with room for `len` values whose pages the kernel is asked to back with
/// huge pages. Must be filled before anything else touches it.
pub(crate) fn huge_page_vec<T>(len: usize) -> Vec<T> {
    let vec: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        let start = vec.as_ptr() as usize;
        let end = start + len * std::mem::size_of::<T>();
        let aligned_start = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let aligned_end = end / HUGE_PAGE * HUGE_PAGE;
        if aligned_end > aligned_start {
            // SAFETY: the range lies inside this vector's allocation; MADV_HUGEPAGE only changes
            // how the kernel backs it, never its contents. Failure is harmless (smaller pages).
            unsafe {
                libc::madvise(
                    aligned_start as *mut libc::c_void,
                    aligned_end - aligned_start,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    vec
}

/// A `(rows, cols)` f32 matrix copied into huge-page-backed memory, as `(cols, rows)` when
/// `transpose` is set.
pub(crate) fn huge_page_tensor(
    source: &[f32],
    rows: usize,
    cols: usize,
    transpose: bool,
) -> candle_core::Result<Tensor> {
    if source.len() != rows * cols {
        candle_core::bail!("{} values for a ({rows}, {cols}) matrix", source.len());
    }
    let mut data = huge_page_vec::<f32>(rows * cols);
    if transpose {
        data.resize(rows * cols, 0.0);
        transpose_into(source, rows, cols, &mut data);
        Tensor::from_vec(data, (cols, rows), &Device::Cpu)
    } else {
        data.extend_from_slice(source);
        Tensor::from_vec(data, (rows, cols), &Device::Cpu)
    }
}

/// Output rows per task of [`transpose_into`]: 32 output rows fill 32 cache-line streams while
/// each input row gives up two lines.
const TRANSPOSE_BLOCK: usize = 32;

/// Writes `source`, `(rows, cols)` row-major, into `out` as `(cols, rows)` row-major, in blocks
/// of output rows on the pool's threads. Element by element, the scattered stores made the
/// transposes of a q8_0 load 12% of a `weight_formats` run's samples on a 2-core Xeon (`perf
/// record`): 0.5 s of its 1.9 s load.
pub(crate) fn transpose_into(source: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    assert!(
        source.len() == rows * cols && out.len() == source.len(),
        "transpose of ({rows}, {cols}): {} values into {}",
        source.len(),
        out.len()
    );
    if rows == 0 {
        return;
    }
    out.par_chunks_mut(TRANSPOSE_BLOCK * rows)
        .enumerate()
        .for_each(|(block, chunk)| {
            let first = block * TRANSPOSE_BLOCK;
            let width = chunk.len() / rows;
            for (r, row) in source.chunks_exact(cols).enumerate() {
                for (c, &value) in row[first..first + width].iter().enumerate() {
                    chunk[c * rows + r] = value;
                }
            }
        });
}

/// A copy of a 2-D f32 CPU tensor in huge-page-backed memory, transposed when asked.
/// Tensors on other devices are returned as they are (transposed when asked).
pub(crate) fn to_huge_pages(tensor: &Tensor, transpose: bool) -> candle_core::Result<Tensor> {
    let (rows, cols) = tensor.dims2()?;
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        drop(storage);
        return if transpose {
            tensor.t()?.contiguous()
        } else {
            Ok(tensor)
        };
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor has contiguous offsets");
    };
    huge_page_tensor(&cpu.as_slice::<f32>()?[start..end], rows, cols, transpose)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_into_swaps_rows_and_columns_across_blocks() {
        for (rows, cols) in [(3, 5), (40, 70), (1, 33), (65, 32), (0, 4)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut out = vec![0.0; data.len()];
            transpose_into(&data, rows, cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r], data[r * cols + c], "({rows}, {cols})");
                }
            }
        }
    }

    #[test]
    fn copies_and_transposes_exactly() {
        let t = Tensor::arange(0f32, 6.0 * 70.0, &Device::Cpu)
            .unwrap()
            .reshape((6, 70))
            .unwrap();
        let copy = to_huge_pages(&t, false).unwrap();
        assert_eq!(copy.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let transposed = to_huge_pages(&t, true).unwrap();
        assert_eq!(
            transposed.to_vec2::<f32>().unwrap(),
            t.t().unwrap().to_vec2::<f32>().unwrap()
        );
    }
}
