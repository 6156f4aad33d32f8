//! Target 4, start and idle memory of each context binary: spawned on a
//! fresh (empty) database, so a start includes creating its tables.
//!
//! - start to ready: from spawn to the last of its start lines (context
//!   consuming, REST API and admin API listening), as read from its stderr;
//! - idle RSS: `VmRSS` of `/proc/<pid>/status` once it is ready, its REST
//!   API has answered a GET and its admin API `/ready` says 200. The kernel's
//!   kB are KiB; the target's 20 MB is read as 20 MiB (20,480 kB).

use std::path::Path;
use std::time::Duration;

use crate::amqp::{median, BenchResult, Vhost};
use crate::process::{Binary, Kind};
use crate::table::{int, mib, ms, Row};

const TARGET_READY: Duration = Duration::from_millis(300);
const TARGET_RSS_KIB: u64 = 20 * 1024;

/// A GET each context answers without side effects.
fn probe(kind: Kind) -> &'static str {
    match kind {
        Kind::Events => "/events",
        Kind::Booking => "/bookings/000000000000000000000000",
    }
}

/// `starts` starts of `kind`: start-to-ready and idle RSS of each.
async fn starts(
    kind: Kind,
    vhost: &Vhost,
    dir: &Path,
    starts: usize,
) -> BenchResult<(Vec<Duration>, Vec<u64>)> {
    let (mut ready, mut rss) = (Vec::new(), Vec::new());
    for start in 1..=starts {
        let dir = dir.join(format!("{}-{start}", kind.name()));
        std::fs::create_dir_all(&dir)?;
        let binary = Binary::start(kind, &vhost.url, &dir).await?;
        let answered = binary.api.get(probe(kind)).await?.status;
        if !matches!(answered, 200 | 404) {
            return Err(format!("GET {}: HTTP {answered}", probe(kind)).into());
        }
        binary
            .admin
            .get("/ready")
            .await?
            .expect(200, "GET /ready")?;
        let kib = binary.rss_kib()?;
        println!(
            "start {start}     : {} ready in {}, idle RSS {}",
            kind.name(),
            ms(binary.start_to_ready),
            mib(kib)
        );
        ready.push(binary.start_to_ready);
        rss.push(kib);
        binary.stop().await?;
    }
    Ok((ready, rss))
}

/// The rows of start to ready and idle RSS, per context.
pub async fn measure(vhost: &Vhost, dir: &Path, count: usize) -> Vec<Row> {
    let mut ready_rows = Vec::new();
    let mut rss_rows = Vec::new();
    for kind in [Kind::Events, Kind::Booking] {
        let ready_figure = format!("4d start to ready: {} (fresh database)", kind.name());
        let rss_figure = format!("4c idle RSS: {}", kind.name());
        let ready_target = format!("≤ {:.0} ms", TARGET_READY.as_secs_f64() * 1000.0);
        let rss_target = format!(
            "≤ {} ({} kB)",
            mib(TARGET_RSS_KIB),
            int(TARGET_RSS_KIB as f64)
        );
        match starts(kind, vhost, dir, count).await {
            Ok((ready, rss)) => {
                let (ready, rss) = (median(ready), median(rss));
                ready_rows.push(Row::new(
                    ready_figure,
                    ms(ready),
                    "-",
                    ready_target,
                    ready <= TARGET_READY,
                ));
                rss_rows.push(Row::new(
                    rss_figure,
                    format!("{} ({} kB)", mib(rss), int(rss as f64)),
                    "-",
                    rss_target,
                    rss <= TARGET_RSS_KIB,
                ));
            }
            Err(error) => {
                let error = error.to_string();
                ready_rows.push(Row::failed(ready_figure, ready_target, &error));
                rss_rows.push(Row::failed(rss_figure, rss_target, &error));
            }
        }
    }
    rss_rows.extend(ready_rows);
    rss_rows
}
