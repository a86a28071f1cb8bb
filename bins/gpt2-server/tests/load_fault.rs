//! The load-and-fault script (`tools/load_fault.py --quick`) against the built binary: overload,
//! 1,000 malformed requests, slow / idle / stalled clients, a flood past the connection cap,
//! disconnects, SIGTERM under load and the KV budget, all on 127.0.0.1 and bounded in count and
//! time. The script exits non-zero when a check fails; its table names the check.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn quick_load_and_fault_run_passes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/load_fault.py");
    let output = std::env::temp_dir().join(format!("gpt2-load-fault-{}.json", std::process::id()));
    let started = Instant::now();
    let run = Command::new(support::python())
        .arg(script)
        .arg("--quick")
        .arg("--server")
        .arg(env!("CARGO_BIN_EXE_gpt2-server"))
        .arg("--output")
        .arg(&output)
        // The script's own watchdog kills the servers it started and exits 3 past this.
        .args(["--time-limit", "110"])
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .output()
        .expect("python runs tools/load_fault.py (set GPT2_TEST_PYTHON)");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "tools/load_fault.py --quick failed ({:?}) after {elapsed:?}\n{stdout}\n{stderr}",
        run.status
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).expect("the figures file")).unwrap();
    let _ = std::fs::remove_file(&output);
    assert_eq!(figures["ok"], true, "{stdout}");
    assert!(
        figures["checks"].as_array().map_or(0, Vec::len) >= 30,
        "{stdout}"
    );
    assert!(elapsed < Duration::from_secs(120), "{elapsed:?}\n{stdout}");
}
