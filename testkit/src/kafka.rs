//! The test Kafka-protocol broker: tansu, built and started by
//! `scripts/services-kafka.sh` (`make services-kafka`, which `make test`
//! runs).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Where the test broker listens. `make test` starts it.
pub fn url() -> String {
    std::env::var("HERALD_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// The script that starts the broker (idempotently).
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/services-kafka.sh")
}

/// The broker's data directory, as the script has it.
fn data_dir() -> PathBuf {
    std::env::var_os("HERALD_TANSU_DATA")
        .map_or_else(|| "/var/lib/herald-tansu".into(), PathBuf::from)
}

/// Kills the broker the script started (`kill -9`, its pid file) and starts
/// it again with the script, keeping its log; returns once it answers.
/// Every client of the shared broker sees the restart: a test that calls
/// this must be the only one using the broker meanwhile.
///
/// # Panics
/// When the broker was not started by the script, does not die, or does
/// not come back.
pub async fn restart_broker() {
    let pid_file = data_dir().join("tansu.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the broker was not started by {}",
            pid_file.display(),
            script().display()
        )
    });
    let pid = pid.trim();
    let killed = Command::new("kill")
        .args(["-9", pid])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {pid}");
    // Until the process is gone its port still answers, and the script
    // would find the dying broker running.
    let gone = crate::eventually(Duration::from_secs(30), || async {
        !PathBuf::from(format!("/proc/{pid}")).exists()
    })
    .await;
    assert!(gone, "the broker {pid} still runs 30 s after kill -9");
    let script = script();
    let started = tokio::task::spawn_blocking(move || {
        Command::new(&script)
            // The script sets a large log aside before a start; not this one.
            .env("HERALD_TANSU_KEEP_LOG", "1")
            .status()
    })
    .await
    .expect("the script's thread")
    .expect("run services-kafka.sh");
    assert!(started.success(), "services-kafka.sh restarts the broker");
}
