//! Partition leases: which instance of a partitioned context holds which
//! partition, and until when (ADR 0009).
//!
//! Every instance runs [`round`] every third of a lease: it says it is alive,
//! renews the leases it holds, learns how many instances are alive, and takes
//! free or expired partitions up to its fair share. Giving a partition back
//! is the caller's decision ([`release`] after it drained the partition), so
//! a partition is never taken while its old owner still consumes it. Times
//! come from the database's clock: instances on machines whose clocks differ
//! still agree on when a lease ran out.
//!
//! A round runs statement by statement on a pooled connection, never
//! queued behind the writer's batches. Rounds of several instances may
//! interleave: a partition is only ever taken by a conditional upsert that
//! succeeds when it is free or its lease ran out, which one instance wins.

use std::collections::BTreeSet;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text};

use super::Conn;
use crate::error::StoreError;

/// Instances not seen for this many leases are forgotten.
const FORGET_AFTER_LEASES: i64 = 10;

/// Who asks, for which context, and on what terms.
#[derive(Debug, Clone)]
pub(crate) struct Terms {
    pub(crate) context: String,
    pub(crate) instance: String,
    /// This process among those that ever ran as `instance`: fresh per start.
    pub(crate) incarnation: String,
    pub(crate) partitions: u16,
    pub(crate) lease_ms: i64,
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// This process speaks for its instance.
    Held(Round),
    /// Another process started under this instance's name since this one's
    /// last round (the name is configured twice): this one must stop, and
    /// took nothing.
    Displaced,
}

/// The leases one round leaves this instance with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Round {
    /// The partitions this instance holds now (renewed or newly taken).
    pub(crate) held: BTreeSet<u16>,
    /// Instances alive (this one included).
    pub(crate) live: usize,
    /// How many partitions this instance should hold: `ceil(partitions / live)`.
    pub(crate) share: usize,
}

#[derive(QueryableByName)]
struct Number {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Lease {
    #[diesel(sql_type = Integer)]
    partition_no: i32,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
}

/// The database's clock in milliseconds since the Unix epoch.
fn now(conn: &mut Conn) -> Result<i64, StoreError> {
    let sql = match conn {
        Conn::Sqlite(_) => {
            "SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS BIGINT) AS n"
        }
        Conn::Postgres(_) => {
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS n"
        }
    };
    Ok(diesel::sql_query(sql).get_result::<Number>(conn)?.n)
}

/// One round for `terms`; see the module documentation. `first` is this
/// process's first round: it takes the instance's name over from an
/// earlier process (one killed and started again still finds its former
/// self's row), where a later round that finds another process's mark
/// reports [`Outcome::Displaced`]. So of two processes configured with one
/// name, the one started last runs and the other stops at its next round.
///
/// # Errors
/// A database error.
pub(crate) fn round(conn: &mut Conn, terms: &Terms, first: bool) -> Result<Outcome, StoreError> {
    let now = now(conn)?;
    let context = terms.context.as_str();
    // Says it is alive and marks the row as this process's, in one
    // statement: the row is left alone (no row changed) when a later round
    // finds another process's mark on it.
    let marked = diesel::sql_query(
        "INSERT INTO herald_instances (context, instance, seen_at, incarnation) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (context, instance) DO UPDATE \
         SET seen_at = excluded.seen_at, incarnation = excluded.incarnation \
         WHERE $5 OR herald_instances.incarnation = excluded.incarnation",
    )
    .bind::<Text, _>(context)
    .bind::<Text, _>(&terms.instance)
    .bind::<BigInt, _>(now)
    .bind::<Text, _>(&terms.incarnation)
    .bind::<Bool, _>(first)
    .execute(conn)?;
    if marked == 0 {
        return Ok(Outcome::Displaced);
    }
    diesel::sql_query("DELETE FROM herald_instances WHERE context = $1 AND seen_at < $2")
        .bind::<Text, _>(context)
        .bind::<BigInt, _>(now - FORGET_AFTER_LEASES * terms.lease_ms)
        .execute(conn)?;
    let live = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM herald_instances WHERE context = $1 AND seen_at > $2",
    )
    .bind::<Text, _>(context)
    .bind::<BigInt, _>(now - terms.lease_ms)
    .get_result::<Number>(conn)?
    .n;
    let live = usize::try_from(live).unwrap_or(1).max(1);
    let until = now + terms.lease_ms;
    diesel::sql_query(
        "UPDATE herald_partition_leases SET expires_at = $1 \
         WHERE context = $2 AND owner = $3 AND partition_no < $4",
    )
    .bind::<BigInt, _>(until)
    .bind::<Text, _>(context)
    .bind::<Text, _>(&terms.instance)
    .bind::<Integer, _>(i32::from(terms.partitions))
    .execute(conn)?;
    let leases: Vec<Lease> = diesel::sql_query(
        "SELECT partition_no, owner, expires_at FROM herald_partition_leases WHERE context = $1",
    )
    .bind::<Text, _>(context)
    .load(conn)?;
    let mut held = BTreeSet::new();
    let mut taken = BTreeSet::new();
    for lease in &leases {
        let Ok(partition) = u16::try_from(lease.partition_no) else {
            continue;
        };
        if partition >= terms.partitions {
            continue;
        }
        if lease.owner == terms.instance {
            held.insert(partition);
        } else if lease.expires_at > now {
            taken.insert(partition);
        }
    }
    let share = usize::from(terms.partitions).div_ceil(live);
    // Free or expired partitions, starting at a place of this instance's own
    // so that instances starting together do not all reach for partition 0.
    let start = crate::fnv::fnv1a(terms.instance.as_bytes()) % u64::from(terms.partitions.max(1));
    let start = u16::try_from(start).unwrap_or(0);
    let candidates = (0..terms.partitions)
        .map(|i| (start + i) % terms.partitions)
        .filter(|p| !held.contains(p) && !taken.contains(p))
        .collect::<Vec<u16>>();
    for partition in candidates {
        if held.len() >= share {
            break;
        }
        let got = diesel::sql_query(
            "INSERT INTO herald_partition_leases (context, partition_no, owner, expires_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (context, partition_no) DO UPDATE \
             SET owner = excluded.owner, expires_at = excluded.expires_at \
             WHERE herald_partition_leases.expires_at <= $5",
        )
        .bind::<Text, _>(context)
        .bind::<Integer, _>(i32::from(partition))
        .bind::<Text, _>(&terms.instance)
        .bind::<BigInt, _>(until)
        .bind::<BigInt, _>(now)
        .execute(conn)?;
        if got == 1 {
            held.insert(partition);
        }
    }
    Ok(Outcome::Held(Round { held, live, share }))
}

/// Gives `partition` back (after its deliveries were drained and its channel
/// closed), if this instance still holds it.
///
/// # Errors
/// A database error.
pub(crate) fn release(conn: &mut Conn, terms: &Terms, partition: u16) -> Result<(), StoreError> {
    diesel::sql_query(
        "DELETE FROM herald_partition_leases \
         WHERE context = $1 AND owner = $2 AND partition_no = $3",
    )
    .bind::<Text, _>(&terms.context)
    .bind::<Text, _>(&terms.instance)
    .bind::<Integer, _>(i32::from(partition))
    .execute(conn)?;
    Ok(())
}

/// Leaves: gives back every lease and forgets the instance, so the others
/// take its partitions at their next round instead of after the lease.
///
/// # Errors
/// A database error.
pub(crate) fn leave(conn: &mut Conn, terms: &Terms) -> Result<(), StoreError> {
    diesel::sql_query("DELETE FROM herald_partition_leases WHERE context = $1 AND owner = $2")
        .bind::<Text, _>(&terms.context)
        .bind::<Text, _>(&terms.instance)
        .execute(conn)?;
    diesel::sql_query("DELETE FROM herald_instances WHERE context = $1 AND instance = $2")
        .bind::<Text, _>(&terms.context)
        .bind::<Text, _>(&terms.instance)
        .execute(conn)?;
    Ok(())
}

/// Every lease of `context`: (partition, owner), for operators.
///
/// # Errors
/// A database error.
pub(crate) fn owners(conn: &mut Conn, context: &str) -> Result<Vec<(u16, String)>, StoreError> {
    let now = now(conn)?;
    let leases: Vec<Lease> = diesel::sql_query(
        "SELECT partition_no, owner, expires_at FROM herald_partition_leases \
         WHERE context = $1 ORDER BY partition_no",
    )
    .bind::<Text, _>(context)
    .load(conn)?;
    Ok(leases
        .into_iter()
        .filter(|l| l.expires_at > now)
        .filter_map(|l| Some((u16::try_from(l.partition_no).ok()?, l.owner)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{on_each_backend, TempDb};

    fn terms(instance: &str) -> Terms {
        Terms {
            context: "booking".into(),
            instance: instance.into(),
            incarnation: format!("{instance}-1"),
            partitions: 6,
            lease_ms: 60_000,
        }
    }

    async fn round_of(t: &TempDb, terms: &Terms, first: bool) -> Outcome {
        let terms = terms.clone();
        t.db.write(move |c| round(c, &terms, first)).await.unwrap()
    }

    /// A later round of the one process that runs as `instance`.
    async fn run(t: &TempDb, instance: &str) -> Round {
        match round_of(t, &terms(instance), false).await {
            Outcome::Held(round) => round,
            Outcome::Displaced => panic!("{instance} displaced"),
        }
    }

    fn set(partitions: &[u16]) -> BTreeSet<u16> {
        partitions.iter().copied().collect()
    }

    on_each_backend!(
        #[tokio::test]
        partitions_are_shared_out_and_never_taken_from_a_live_owner
    );
    async fn partitions_are_shared_out_and_never_taken_from_a_live_owner(t: TempDb) {
        // Alone, `a` takes every partition.
        let first = run(&t, "a").await;
        assert_eq!((first.live, first.share), (1, 6));
        assert_eq!(first.held, set(&[0, 1, 2, 3, 4, 5]));

        // `b` joins: its share is 3, but nothing is free, and a live lease is
        // never taken over.
        let b = run(&t, "b").await;
        assert_eq!((b.live, b.share), (2, 3));
        assert!(b.held.is_empty(), "{b:?}");

        // `a` learns its share is 3 and, once drained, gives three back.
        let a = run(&t, "a").await;
        assert_eq!((a.share, a.held.len()), (3, 6));
        let terms_a = terms("a");
        for partition in [3, 4, 5] {
            let terms = terms_a.clone();
            t.db.write(move |c| release(c, &terms, partition))
                .await
                .unwrap();
        }
        let b = run(&t, "b").await;
        assert_eq!(b.held, set(&[3, 4, 5]));
        let a = run(&t, "a").await;
        assert_eq!(a.held, set(&[0, 1, 2]));

        let owners = t.db.read(|c| owners(c, "booking")).await.unwrap();
        let of_b: Vec<u16> = owners
            .iter()
            .filter(|(_, o)| o == "b")
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(of_b, [3, 4, 5]);
    }

    on_each_backend!(
        #[tokio::test]
        an_expired_lease_is_taken_and_its_old_owner_learns_it_lost_it
    );
    async fn an_expired_lease_is_taken_and_its_old_owner_learns_it_lost_it(t: TempDb) {
        run(&t, "a").await;
        // `a` stops renewing (killed): its leases and its liveness run out.
        t.db.write(|c| {
            diesel::sql_query("UPDATE herald_partition_leases SET expires_at = 0").execute(c)?;
            diesel::sql_query("UPDATE herald_instances SET seen_at = 0").execute(c)?;
            Ok(())
        })
        .await
        .unwrap();
        let b = run(&t, "b").await;
        assert_eq!((b.live, b.share), (1, 6));
        assert_eq!(b.held, set(&[0, 1, 2, 3, 4, 5]));
        // `a` comes back: nothing of what it held is its own any more.
        let a = run(&t, "a").await;
        assert!(a.held.is_empty(), "{a:?}");
        assert_eq!((a.live, a.share), (2, 3));
    }

    on_each_backend!(
        #[tokio::test]
        leaving_frees_every_partition_at_once
    );
    async fn leaving_frees_every_partition_at_once(t: TempDb) {
        run(&t, "a").await;
        let b = run(&t, "b").await;
        assert!(b.held.is_empty());
        let terms_a = terms("a");
        t.db.write(move |c| leave(c, &terms_a)).await.unwrap();
        let b = run(&t, "b").await;
        assert_eq!((b.live, b.held.len()), (1, 6));
    }

    on_each_backend!(
        #[tokio::test]
        partitions_beyond_the_configured_count_are_ignored
    );
    async fn partitions_beyond_the_configured_count_are_ignored(t: TempDb) {
        // A lease row of a partition that no longer exists (fewer partitions
        // configured now) is neither renewed nor counted.
        t.db.write(|c| {
            diesel::sql_query(
                "INSERT INTO herald_partition_leases (context, partition_no, owner, expires_at) \
                 VALUES ('booking', 9, 'a', 0)",
            )
            .execute(c)?;
            Ok(())
        })
        .await
        .unwrap();
        let a = run(&t, "a").await;
        assert_eq!(a.held, set(&[0, 1, 2, 3, 4, 5]));
    }

    on_each_backend!(
        #[tokio::test]
        a_second_process_under_one_name_takes_it_over_and_the_first_learns_it
    );
    async fn a_second_process_under_one_name_takes_it_over_and_the_first_learns_it(t: TempDb) {
        let first = terms("a");
        let second = Terms {
            incarnation: "a-2".into(),
            ..terms("a")
        };
        assert!(matches!(round_of(&t, &first, true).await, Outcome::Held(_)));
        // A process started under the same name (or the first one killed and
        // started again) takes the name over at its first round.
        let Outcome::Held(taken) = round_of(&t, &second, true).await else {
            panic!("a first round is never displaced");
        };
        assert_eq!(taken.held, set(&[0, 1, 2, 3, 4, 5]));
        assert_eq!(taken.live, 1, "one name, one instance");
        // The first process, still running, learns it at its next round.
        assert_eq!(round_of(&t, &first, false).await, Outcome::Displaced);
        assert!(matches!(
            round_of(&t, &second, false).await,
            Outcome::Held(_)
        ));
    }
}
