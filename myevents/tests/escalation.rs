//! Supervision escalation and start-up failures, through the demo binary.

use std::path::PathBuf;
use std::process::Stdio;

use herald::transport::Publisher;
use herald::{BrokerError, Envelope};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents::demo::Pinged;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::time::timeout;

/// A config file in a folder of its own, removed on drop.
struct TempConfig {
    dir: tempfile::TempDir,
}

impl TempConfig {
    fn new(contents: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("demo.toml"), contents).unwrap();
        TempConfig { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("demo.toml")
    }
}

fn demo(config: &TempConfig) -> tokio::process::Child {
    Command::new(env!("CARGO_BIN_EXE_demo"))
        .arg("--config")
        .arg(config.path())
        .env("RUST_LOG", "info")
        .env_remove("AMQP_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the demo binary starts")
}

async fn stderr_of(child: &mut tokio::process::Child) -> String {
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .await
        .unwrap();
    text
}

#[actix_rt::test]
async fn a_handler_that_always_panics_escalates_and_the_process_exits_non_zero() {
    let vhost = TestVhost::new();
    let config = TempConfig::new(&format!(
        r#"
[context]
name = "demo"
[broker]
url = "{}"
[runtime]
max_restarts = 3
restart_window = "60s"
restart_backoff_min = "10ms"
restart_backoff_max = "50ms"
[retry]
max_attempts = 100
delays = ["20ms"]
"#,
        vhost.url
    ));
    let mut child = demo(&config);
    let broker = vhost.broker().await;
    let poison = Envelope::new(&Pinged {
        key: "k".into(),
        seq: 1,
        fail: Some("panic".into()),
    })
    .unwrap()
    .to_message();
    // Routable once the binary has bound its queue.
    let published = eventually(LIVENESS, || {
        let (broker, poison) = (broker.clone(), poison.clone());
        async move {
            match broker.publish(poison).await {
                Ok(()) => true,
                Err(BrokerError::Unroutable { .. }) => false,
                Err(other) => panic!("publish failed: {other}"),
            }
        }
    })
    .await;
    assert!(published, "the demo context never bound its queue");

    let stderr = timeout(LIVENESS, stderr_of(&mut child)).await.unwrap();
    let status = timeout(LIVENESS, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(70), "exit status; stderr:\n{stderr}");
    assert!(
        stderr.contains("restarts=4 window_s=60 escalating"),
        "{stderr}"
    );
    assert!(
        stderr.contains("context=demo stopped"),
        "ordered shutdown ran:\n{stderr}"
    );
    // The poison message was retried, not lost: it comes back to the queue.
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("demo").await.unwrap() == 1
        })
        .await
    );
}

#[actix_rt::test]
async fn a_bad_config_value_fails_at_start_naming_the_key() {
    let config = TempConfig::new("[context]\nname = \"demo\"\n[runtime]\nshards = \"many\"\n");
    let mut child = demo(&config);
    let stderr = timeout(LIVENESS, stderr_of(&mut child)).await.unwrap();
    let status = timeout(LIVENESS, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("runtime.shards"), "{stderr}");
}
