//! Several instances of one context (issue 12, ADR 0009), on the real
//! RabbitMQ and PostgreSQL: three instances of the `ordered` test context
//! share six partitions by lease; 10,000 numbered messages over 100 keys are
//! each applied exactly once and in per-key order, every instance takes at
//! least 20 % of them, and when one instance is killed with `kill -9`
//! halfway the survivors take its partitions over within 15 s; back, it
//! takes its share again.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use herald::transport::{headers, Message, Publisher};
use herald_testkit::{eventually, TestDatabase, TestVhost, LIVENESS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const PARTITIONS: u16 = 6;
const KEYS: i64 = 100;
const PER_KEY: i64 = 100;
/// The bound for the survivors to take a dead instance's partitions.
const TAKEOVER: Duration = Duration::from_secs(15);

/// One running `ordered` process.
struct Instance {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    admin_port: u16,
}

impl Instance {
    async fn start(name: &str, vhost: &TestVhost, database: &TestDatabase) -> Instance {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = dir.path().join("ordered.toml");
        std::fs::write(
            &config,
            format!(
                "[context]\nname = \"ordered\"\n\n[broker]\nurl = '{}'\n\n\
                 [admin]\naddr = \"127.0.0.1:0\"\n\n\
                 [runtime]\ndrain_timeout = \"5s\"\nmailbox_log_interval = \"1s\"\n",
                vhost.url
            ),
        )
        .expect("write the config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ordered"));
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,lapin=warn")
            .env("DATABASE_URL", &database.url)
            .env("HERALD__RUNTIME__PARTITIONS", PARTITIONS.to_string())
            .env("HERALD__RUNTIME__INSTANCE", name)
            .env_remove("AMQP_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start ordered");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let admin_port = || {
            let marker = "admin API listening on http://";
            lines.lock().unwrap().iter().find_map(|line| {
                let (_, addr) = line.split_once(marker)?;
                addr.trim().rsplit_once(':')?.1.parse::<u16>().ok()
            })
        };
        let started = eventually(LIVENESS, || {
            let ready = admin_port().is_some();
            async move { ready }
        })
        .await;
        let log = lines.lock().unwrap().join("\n");
        assert!(started, "{name} did not start:\n{log}");
        let admin_port = admin_port().unwrap_or_default();
        // The folder only held the config, read at start.
        drop(dir);
        Instance {
            name: name.to_owned(),
            child,
            lines,
            admin_port,
        }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// `GET path` on its admin API (loopback, no token): the JSON body.
    async fn admin_get(&self, path: &str) -> serde_json::Value {
        let body = self.admin_text(path).await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// `GET path` on its admin API: the body as text.
    async fn admin_text(&self, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .expect("connect to the admin API");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        body.to_owned()
    }
}

/// What the instances logged, but their mailbox lines.
fn logs<'a>(instances: impl Iterator<Item = &'a Instance>) -> String {
    instances
        .map(|i| {
            let lines: Vec<String> = i
                .log()
                .lines()
                .filter(|l| !l.contains("herald::mailbox"))
                .map(str::to_owned)
                .collect();
            format!("--- {}\n{}", i.name, lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(QueryableByName, Debug)]
struct Seen {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    instance: String,
}

#[derive(QueryableByName)]
struct Owned {
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn seen(db: &herald::store::Db) -> Vec<Seen> {
    db.read(|c| {
        Ok(
            diesel::sql_query("SELECT key, seq, instance FROM ordered_seen ORDER BY position")
                .load::<Seen>(c)?,
        )
    })
    .await
    .unwrap_or_default()
}

async fn applied(db: &herald::store::Db) -> usize {
    db.read(|c| {
        Ok(diesel::sql_query("SELECT COUNT(*) AS n FROM ordered_seen").get_result::<Count>(c)?)
    })
    .await
    .map_or(0, |c| usize::try_from(c.n).unwrap_or(0))
}

/// Unexpired leases by owner.
async fn owners(db: &herald::store::Db) -> BTreeMap<String, i64> {
    db.read(|c| {
        Ok(diesel::sql_query(
            "SELECT owner, COUNT(*) AS n FROM herald_partition_leases \
             WHERE context = 'ordered' \
             AND expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) \
             GROUP BY owner",
        )
        .load::<Owned>(c)?)
    })
    .await
    .map(|rows| rows.into_iter().map(|r| (r.owner, r.n)).collect())
    .unwrap_or_default()
}

fn numbered(key: i64, seq: i64) -> Message {
    let key = format!("k{key}");
    let body = serde_json::json!({ "key": key, "seq": seq });
    let mut message = Message::new("numbered".into(), body.to_string().into_bytes());
    message.message_id = Some(herald::new_id());
    message.persistent = true;
    message.content_type = Some("application/json".into());
    message
        .headers
        .insert(headers::EVENT_NAME.into(), "numbered".into());
    message.headers.insert(headers::PARTITION_KEY.into(), key);
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_partitions_in_key_order_and_survive_a_kill_9_exactly_once() {
    let vhost = TestVhost::new();
    let database = TestDatabase::new();
    let db = herald::store::Db::open(&database.url).expect("open the test database");
    let mut instances = Vec::new();
    for name in ["i1", "i2", "i3"] {
        instances.push(Instance::start(name, &vhost, &database).await);
    }
    // Two partitions each, once the first ones gave back what they took alone.
    let shared = eventually(LIVENESS, || async {
        let owners = owners(&db).await;
        owners.len() == 3 && owners.values().all(|n| *n == 2)
    })
    .await;
    assert!(shared, "partitions not shared out: {:?}", owners(&db).await);

    let broker = vhost.broker().await;
    let publishing = tokio::spawn(async move {
        for seq in 1..=PER_KEY {
            let round: Vec<Message> = (0..KEYS).map(|key| numbered(key, seq)).collect();
            for result in broker.publish_all(round).await {
                result.expect("published");
            }
        }
        broker
    });

    // Halfway: every instance did its share so far; then one dies.
    let half = usize::try_from(KEYS * PER_KEY / 2).unwrap();
    assert!(
        eventually(LIVENESS * 4, || async { applied(&db).await >= half }).await,
        "only {} of {half} applied",
        applied(&db).await
    );
    let before = seen(&db).await;
    let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &before {
        *shares.entry(row.instance.as_str()).or_default() += 1;
    }
    for instance in &instances {
        let share = shares.get(instance.name.as_str()).copied().unwrap_or(0);
        assert!(
            share * 5 >= before.len(),
            "{} applied {share} of {}: {shares:?}; logs:\n{}",
            instance.name,
            before.len(),
            logs(instances.iter())
        );
    }
    let mut dead = instances.pop().expect("three instances");
    dead.kill9().await;
    let killed_at = Instant::now();
    let survivors = ["i1", "i2"];
    let taken_over = eventually(TAKEOVER, || async {
        let owners = owners(&db).await;
        owners.keys().all(|o| survivors.contains(&o.as_str()))
            && owners.values().sum::<i64>() == i64::from(PARTITIONS)
    })
    .await;
    assert!(
        taken_over,
        "the survivors hold {:?} {:?} after the kill",
        owners(&db).await,
        killed_at.elapsed()
    );
    // Operators see it too: a survivor's view and who holds what, once it
    // consumes its whole share (the database names a lease a moment before
    // the instance has started consuming that partition).
    let share = usize::from(PARTITIONS) / survivors.len();
    let settled = eventually(LIVENESS, || async {
        let view = instances[0].admin_get("/partitions").await;
        view["held"].as_array().map_or(0, Vec::len) == share
    })
    .await;
    assert!(settled, "i1 never consumed its {share} partitions");
    let view = instances[0].admin_get("/partitions").await;
    assert_eq!(view["partitions"], PARTITIONS);
    assert_eq!(
        view["owners"].as_array().map(Vec::len),
        Some(usize::from(PARTITIONS))
    );
    let actors = instances[0].admin_get("/actors").await;
    assert_eq!(actors[0]["partitions"], view["held"]);
    let held = view["held"].as_array().map_or(0, Vec::len);
    let metrics = instances[0].admin_text("/metrics").await;
    let gauge = format!("herald_partitions_held{{context=\"ordered\",instance=\"i1\"}} {held}");
    assert!(metrics.contains(&gauge), "no `{gauge}` in:\n{metrics}");

    let broker = publishing.await.expect("publishing ran");
    let all = usize::try_from(KEYS * PER_KEY).unwrap();
    assert!(
        eventually(LIVENESS * 4, || async { applied(&db).await >= all }).await,
        "{} of {all} applied; survivors' logs:\n{}\n{}",
        applied(&db).await,
        instances[0].log(),
        instances[1].log()
    );
    // Every partition queue empty: nothing is still on its way.
    for partition in 0..PARTITIONS {
        let queue = format!("ordered.p{partition}");
        let empty = eventually(LIVENESS, || async {
            broker.queue_depth(&queue).await.is_ok_and(|n| n == 0)
        })
        .await;
        assert!(empty, "{queue} still holds messages");
    }
    let rows = seen(&db).await;
    let pairs: Vec<(String, i64)> = rows.iter().map(|r| (r.key.clone(), r.seq)).collect();
    let expected = (0..KEYS).flat_map(|k| (1..=PER_KEY).map(move |s| (format!("k{k}"), s)));
    let wrong = herald_testkit::not_exactly_once(&pairs, expected);
    assert!(wrong.is_empty(), "not exactly once: {wrong:?}");
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for row in &rows {
        let previous = last.insert(row.key.as_str(), row.seq).unwrap_or(0);
        assert!(
            row.seq > previous,
            "key {} applied {} after {previous}; logs:\n{}",
            row.key,
            row.seq,
            logs(instances.iter().chain([&dead]))
        );
    }
    // The third comes back and takes its share again.
    drop(dead);
    instances.push(Instance::start("i3", &vhost, &database).await);
    let shared = eventually(LIVENESS, || async {
        let owners = owners(&db).await;
        owners.len() == 3 && owners.values().all(|n| *n == 2)
    })
    .await;
    assert!(shared, "not shared out again: {:?}", owners(&db).await);
}

/// Two processes configured with one `runtime.instance`: the one started
/// last takes the name over; the first learns it at its next lease round,
/// stops consuming, and exits non-zero naming the setting, without giving
/// back the leases that are the second's now. The second holds every
/// partition and keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_one_instance_name_stops_the_first_naming_the_setting() {
    let vhost = TestVhost::new();
    let database = TestDatabase::new();
    let mut first = Instance::start("twin", &vhost, &database).await;
    let mut second = Instance::start("twin", &vhost, &database).await;
    let status = tokio::time::timeout(LIVENESS, first.child.wait())
        .await
        .unwrap_or_else(|_| panic!("the first still runs:\n{}", first.log()))
        .expect("wait for the first");
    assert!(!status.success(), "{status}:\n{}", first.log());
    assert!(
        first
            .log()
            .contains("runtime.instance must differ per instance"),
        "{}",
        first.log()
    );
    let all_held = eventually(LIVENESS, || async {
        second.admin_get("/partitions").await["held"]
            .as_array()
            .map(Vec::len)
            == Some(usize::from(PARTITIONS))
    })
    .await;
    assert!(
        all_held,
        "the second holds every partition:\n{}",
        second.log()
    );
    assert!(
        second.child.try_wait().expect("poll the second").is_none(),
        "the second still runs:\n{}",
        second.log()
    );
}
