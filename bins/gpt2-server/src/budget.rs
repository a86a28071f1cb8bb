//! The default KV-cache budget: what this machine (or this container) can still hold once the
//! model is loaded.

/// The share of the available memory the KV caches may take by default; the rest is headroom
/// for activations, request buffers and the allocator.
const DEFAULT_SHARE: f64 = 0.8;

/// The bytes the KV caches may take when `--kv-budget-mb` is not given: 80% of the memory
/// available now, the lower of the machine's (`MemAvailable`) and the cgroup's (`memory.max`
/// minus `memory.current`, for containers). `None` when neither can be read.
pub fn default_kv_budget() -> Option<usize> {
    let machine = meminfo_available();
    let container = cgroup_available();
    let available = match (machine, container) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some((available as f64 * DEFAULT_SHARE) as usize)
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn cgroup_available() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max" (no limit) fails to parse
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_is_a_share_of_what_is_available() {
        let budget = default_kv_budget().expect("/proc/meminfo is readable on Linux");
        let available = meminfo_available().unwrap();
        assert!(budget > 0 && (budget as u64) < available);
    }
}
