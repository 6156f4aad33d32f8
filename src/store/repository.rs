//! Loading and saving event-sourced aggregates: snapshot plus newer events in,
//! new events appended at the loaded version out (optimistic concurrency).

use super::Conn;
use diesel::prelude::*;

use super::event_store::{self, EventMetadata, NewEvent, RecordedEvent};
use super::schema::snapshots;
use super::sql::Sql;
use super::{now_ms, Db, Session};
use crate::aggregate::{decode_event, decode_event_text, encode_event, Aggregate};
use crate::error::StoreError;
use diesel::sql_types::{BigInt, Integer, Text};

/// An aggregate as loaded.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state: the snapshot plus every later event, folded.
    pub state: A,
    /// The stream version the state includes (0: no events yet).
    pub version: i64,
    /// Events read from the store (after the snapshot, if one was used).
    pub events_read: usize,
    /// Whether a snapshot was the starting point.
    pub from_snapshot: bool,
}

/// Loads the aggregate `id` from its snapshot (when it has the aggregate's
/// current snapshot version) and the events after it.
///
/// # Errors
/// [`StoreError::Corrupt`] for a stored event that cannot be decoded.
pub fn load<A: Aggregate>(conn: &mut Conn, id: &str) -> Result<Loaded<A>, StoreError> {
    let stream = A::stream_id(id);
    let snapshot: Option<(i64, i32, String)> = snapshots::table
        .find(&stream)
        .select((
            snapshots::stream_version,
            snapshots::snapshot_version,
            snapshots::state,
        ))
        .first(conn)
        .optional()?;
    let (mut state, version, from_snapshot) = match snapshot {
        Some((version, layout, state))
            if u32::try_from(layout).ok() == Some(A::SNAPSHOT_VERSION) =>
        {
            match serde_json::from_str::<A>(&state) {
                Ok(state) => (state, version, true),
                Err(_) => (A::default(), 0, false),
            }
        }
        _ => (A::default(), 0, false),
    };
    let events = event_store::load(conn, &stream, version)?;
    let mut loaded_version = version;
    for recorded in &events {
        state.apply(&decode_recorded::<A>(recorded)?);
        loaded_version = recorded.stream_version;
    }
    Ok(Loaded {
        state,
        version: loaded_version,
        events_read: events.len(),
        from_snapshot,
    })
}

/// Decodes a stored event of aggregate `A`, upcasting older schema versions.
///
/// # Errors
/// [`StoreError::Corrupt`] when it cannot be read.
pub fn decode_recorded<A: Aggregate>(recorded: &RecordedEvent) -> Result<A::Event, StoreError> {
    let version = u32::try_from(recorded.schema_version).unwrap_or(0);
    decode_event_text::<A>(&recorded.event_name, version, &recorded.payload)
        .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", recorded.event_id)))
}

/// Appends `events` (decided on the state loaded at `expected_version`) and
/// writes a snapshot of `state_after` when the stream crosses a multiple of
/// `snapshot_every` (0: never). Run inside a write transaction.
///
/// # Errors
/// [`StoreError::VersionConflict`] when the stream moved on since it was loaded.
pub fn save<A: Aggregate>(
    conn: &mut Conn,
    id: &str,
    expected_version: i64,
    state_after: &A,
    events: &[A::Event],
    metadata: &EventMetadata,
    snapshot_every: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    event_store::expect_version(conn, &A::stream_id(id), expected_version)?;
    save_after(
        conn,
        id,
        expected_version,
        state_after,
        events,
        metadata,
        snapshot_every,
    )
}

/// [`save`] after a version read in this same transaction (not read again).
fn save_after<A: Aggregate>(
    conn: &mut Conn,
    id: &str,
    expected_version: i64,
    state_after: &A,
    events: &[A::Event],
    metadata: &EventMetadata,
    snapshot_every: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let stream = A::stream_id(id);
    let new: Vec<NewEvent> = events
        .iter()
        .map(|event| {
            let (name, schema_version, payload) =
                encode_event::<A>(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(NewEvent {
                event_id: crate::event::new_id(),
                name,
                schema_version,
                payload: payload.to_string(),
                metadata: metadata.clone(),
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let recorded = event_store::append_after(conn, &stream, expected_version, &new)?;
    let version = expected_version + recorded.len() as i64;
    let every = i64::from(snapshot_every);
    if every > 0 && version / every > expected_version / every {
        write_snapshot(conn, &stream, version, state_after)?;
    }
    Ok(recorded)
}

fn write_snapshot<A: Aggregate>(
    conn: &mut Conn,
    stream: &str,
    version: i64,
    state: &A,
) -> Result<(), StoreError> {
    let state = serde_json::to_string(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let layout = i32::try_from(A::SNAPSHOT_VERSION).unwrap_or(i32::MAX);
    Sql::new(
        "INSERT INTO snapshots (stream_id, stream_version, snapshot_version, state, taken_at) \
         VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE \
         SET stream_version = excluded.stream_version, \
         snapshot_version = excluded.snapshot_version, \
         state = excluded.state, taken_at = excluded.taken_at",
    )
    .bind::<Text, _>(stream)
    .bind::<BigInt, _>(version)
    .bind::<Integer, _>(layout)
    .bind::<Text, _>(&state)
    .bind::<BigInt, _>(now_ms())
    .execute(conn)?;
    Ok(())
}

/// Records a fact heard from another context in aggregate `id`'s stream, as
/// received (name, schema version, payload): older versions stay as they
/// are and are upcast whenever the stream is read. Run inside a write
/// transaction.
///
/// # Errors
/// [`StoreError::Corrupt`] when `A` cannot read the event (nothing is written).
pub fn record<A: Aggregate>(
    conn: &mut Conn,
    id: &str,
    event: NewEvent,
) -> Result<RecordedEvent, StoreError> {
    let payload: serde_json::Value = serde_json::from_str(&event.payload)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", event.name)))?;
    decode_event::<A>(&event.name, event.schema_version, payload)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    event_store::append_next(conn, &A::stream_id(id), &event)
}

/// A command's result, for the caller's effects in the same transaction.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's id.
    pub id: String,
    /// The state after the new events.
    pub state: A,
    /// The stream version after the new events.
    pub version: i64,
    /// The events the command decided.
    pub events: Vec<A::Event>,
    /// The same events as stored (positions, ids).
    pub recorded: Vec<RecordedEvent>,
}

/// Why a command did not go through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused it: a final answer (409, 400...).
    #[error("refused: {0}")]
    Rejected(E),
    /// Other writers kept winning the race: retry later (503), never "refused".
    #[error("the stream kept changing: gave up after {attempts} attempts")]
    Contention {
        /// Attempts made, the first included.
        attempts: u32,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How [`execute`] saves.
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    /// Stored with every event the command appends.
    pub metadata: EventMetadata,
    /// Snapshot every N events per stream (0: never).
    pub snapshot_every: u32,
    /// Attempts on conflict, the first included (0 counts as 1).
    pub max_attempts: u32,
}

/// Runs `command` on aggregate `id` on the database's writer, in one unit:
/// takes the aggregate's state from the writer's cache when it is at the
/// stream's version (else loads it from its snapshot and events), decides,
/// appends, and runs `effects` (read models, outbox rows). The writer runs
/// one unit at a time, so commands on one aggregate in one process never
/// conflict; a conflict with another process (the stream moved on) decides
/// again on fresh state, up to `max_attempts` times.
///
/// # Errors
/// [`CommandError::Rejected`] when the aggregate refuses,
/// [`CommandError::Contention`] when the retries ran out, or a store error.
pub async fn execute<A, T, F>(
    db: &Db,
    id: &str,
    command: A::Command,
    options: &ExecuteOptions,
    effects: F,
) -> Result<T, CommandError<A::Error>>
where
    A: Aggregate,
    T: Send + 'static,
    F: Fn(&mut Conn, &Executed<A>) -> Result<T, StoreError> + Clone + Send + 'static,
{
    execute_unless(db, id, command, options, |_| Ok(None), effects).await
}

/// As [`execute`], but first, in the same unit, asks `settled` whether the
/// command already happened (an idempotency key seen before): an answer is
/// returned as it is and nothing is appended.
///
/// # Errors
/// As [`execute`].
pub async fn execute_unless<A, T, G, F>(
    db: &Db,
    id: &str,
    command: A::Command,
    options: &ExecuteOptions,
    settled: G,
    effects: F,
) -> Result<T, CommandError<A::Error>>
where
    A: Aggregate,
    T: Send + 'static,
    G: Fn(&mut Conn) -> Result<Option<T>, StoreError> + Clone + Send + 'static,
    F: Fn(&mut Conn, &Executed<A>) -> Result<T, StoreError> + Clone + Send + 'static,
{
    let attempts = options.max_attempts.max(1);
    for _ in 0..attempts {
        let (id, command, options) = (id.to_owned(), command.clone(), options.clone());
        let (settled, effects) = (settled.clone(), effects.clone());
        let saved = db
            .submit(move |session: &mut Session<'_>| {
                if let Some(answer) = settled(session.conn)? {
                    return Ok(answer);
                }
                let executed = decide::<A>(session, &id, command, &options)?;
                effects(session.conn, &executed).map_err(CommandError::Store)
            })
            .await;
        match saved {
            // Decide again on fresh state; any other error is final.
            Err(CommandError::Store(StoreError::VersionConflict { .. })) => continue,
            other => return other,
        }
    }
    Err(CommandError::Contention { attempts })
}

/// Decides `command` on aggregate `id` and appends its events, inside the
/// writer's transaction; the new state goes to the cache (kept if the unit commits).
fn decide<A: Aggregate>(
    session: &mut Session<'_>,
    id: &str,
    command: A::Command,
    options: &ExecuteOptions,
) -> Result<Executed<A>, CommandError<A::Error>> {
    let stream = A::stream_id(id);
    let current = event_store::stream_version(session.conn, &stream)?;
    let (state, version) = match session.cache.get::<A>(&stream, current) {
        Some(state) => (state, current),
        None => {
            let loaded = load::<A>(session.conn, id)?;
            (loaded.state, loaded.version)
        }
    };
    let events = state.handle(command).map_err(CommandError::Rejected)?;
    let mut state = state;
    for event in &events {
        state.apply(event);
    }
    let recorded = save_after::<A>(
        session.conn,
        id,
        version,
        &state,
        &events,
        &options.metadata,
        options.snapshot_every,
    )?;
    let version = version + recorded.len() as i64;
    session.cache.put(&stream, version, state.clone());
    Ok(Executed {
        id: id.to_owned(),
        state,
        version,
        events,
        recorded,
    })
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    use super::*;
    use crate::error::CodecError;
    use crate::store::testing::{on_each_backend, TempDb};

    /// Adds amounts up to a limit. `Added` v1 had no `amount` (it meant 1).
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Tally {
        total: u64,
        adds: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "name", content = "payload")]
    enum TallyEvent {
        #[serde(rename = "added")]
        Added { amount: u64 },
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("limit reached")]
    struct LimitReached;

    impl Aggregate for Tally {
        const KIND: &'static str = "tally";
        type Command = u64;
        type Event = TallyEvent;
        type Error = LimitReached;

        fn handle(&self, amount: u64) -> Result<Vec<TallyEvent>, LimitReached> {
            if self.total + amount > 1_000_000 {
                return Err(LimitReached);
            }
            Ok(vec![TallyEvent::Added { amount }])
        }

        fn apply(&mut self, TallyEvent::Added { amount }: &TallyEvent) {
            self.total += amount;
            self.adds += 1;
        }

        fn schema_version(name: &str) -> u32 {
            if name == "added" {
                2
            } else {
                1
            }
        }

        fn upcast(name: &str, from: u32, mut payload: Value) -> Result<Value, CodecError> {
            match (name, from) {
                ("added", 1) => {
                    payload["amount"] = Value::from(1);
                    Ok(payload)
                }
                _ => Err(CodecError::UnknownEvent(name.to_owned())),
            }
        }
    }

    /// The same aggregate after a change of its state layout.
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct TallyV2(Tally);

    impl Aggregate for TallyV2 {
        const KIND: &'static str = "tally";
        const SNAPSHOT_VERSION: u32 = 2;
        type Command = u64;
        type Event = TallyEvent;
        type Error = LimitReached;
        fn handle(&self, amount: u64) -> Result<Vec<TallyEvent>, LimitReached> {
            self.0.handle(amount)
        }
        fn apply(&mut self, event: &TallyEvent) {
            self.0.apply(event);
        }
        fn schema_version(name: &str) -> u32 {
            Tally::schema_version(name)
        }
    }

    async fn add_many(t: &TempDb, id: &'static str, n: u64, snapshot_every: u32) {
        t.db.write(move |c| {
            let mut state = Tally::default();
            for i in 0..n {
                let events = state.handle(i % 7).unwrap();
                let mut after = state.clone();
                events.iter().for_each(|e| after.apply(e));
                save(
                    c,
                    id,
                    i as i64,
                    &after,
                    &events,
                    &EventMetadata::default(),
                    snapshot_every,
                )?;
                state = after;
            }
            Ok(())
        })
        .await
        .unwrap();
    }

    on_each_backend!(
        #[tokio::test]
        a_unique_violation_in_the_effects_fails_at_once_without_retries
    );
    /// Only a version conflict is decided again: a unique violation in the
    /// command's effects (a duplicate outbox id, say) fails at once.
    async fn a_unique_violation_in_the_effects_fails_at_once_without_retries(t: TempDb) {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let runs = Arc::new(AtomicU32::new(0));
        let options = ExecuteOptions {
            max_attempts: 5,
            ..ExecuteOptions::default()
        };
        let counted = runs.clone();
        let result = execute::<Tally, (), _>(&t.db, "t1", 1, &options, move |c, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            let duplicate = || crate::store::event_store::NewEvent {
                event_id: "the-same-id".into(),
                name: "added".into(),
                schema_version: 2,
                payload: r#"{"amount":1}"#.into(),
                metadata: EventMetadata::default(),
            };
            crate::store::event_store::append(c, "other-1", 0, &[duplicate()])?;
            crate::store::event_store::append(c, "other-2", 0, &[duplicate()])?;
            Ok(())
        })
        .await;
        assert!(
            matches!(result, Err(CommandError::Store(StoreError::Conflict(_)))),
            "{result:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "decided once, not retried");
    }

    on_each_backend!(
        #[tokio::test]
        snapshots_bound_the_events_a_load_reads_and_give_the_same_state
    );
    async fn snapshots_bound_the_events_a_load_reads_and_give_the_same_state(t: TempDb) {
        add_many(&t, "with", 10_000, 100).await;
        add_many(&t, "without", 10_000, 0).await;
        let with = t.db.read(|c| load::<Tally>(c, "with")).await.unwrap();
        let without = t.db.read(|c| load::<Tally>(c, "without")).await.unwrap();
        assert_eq!(with.state, without.state);
        assert_eq!((with.version, without.version), (10_000, 10_000));
        assert!(with.from_snapshot && with.events_read <= 100, "{with:?}");
        assert_eq!(
            (without.from_snapshot, without.events_read),
            (false, 10_000)
        );
    }

    on_each_backend!(
        #[tokio::test]
        a_snapshot_of_another_layout_is_ignored
    );
    async fn a_snapshot_of_another_layout_is_ignored(t: TempDb) {
        add_many(&t, "old", 250, 100).await;
        let newer = t.db.read(|c| load::<TallyV2>(c, "old")).await.unwrap();
        let older = t.db.read(|c| load::<Tally>(c, "old")).await.unwrap();
        assert!(
            !newer.from_snapshot,
            "layout 1 snapshot must not feed layout 2"
        );
        assert_eq!(newer.events_read, 250);
        assert_eq!(newer.state.0, older.state);
    }

    on_each_backend!(
        #[tokio::test]
        older_schema_versions_are_upcast_when_loaded
    );
    async fn older_schema_versions_are_upcast_when_loaded(t: TempDb) {
        t.db.write(|c| {
            let old = NewEvent {
                event_id: "e1".into(),
                name: "added".into(),
                schema_version: 1,
                payload: "{}".into(),
                metadata: EventMetadata::default(),
            };
            event_store::append(c, &Tally::stream_id("up"), 0, &[old])
        })
        .await
        .unwrap();
        let loaded = t.db.read(|c| load::<Tally>(c, "up")).await.unwrap();
        assert_eq!(loaded.state, Tally { total: 1, adds: 1 });
    }

    on_each_backend!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        racing_commands_retry_on_conflict_and_all_count
    );
    async fn racing_commands_retry_on_conflict_and_all_count(t: TempDb) {
        let options = ExecuteOptions {
            max_attempts: 100,
            ..ExecuteOptions::default()
        };
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (db, options) = (t.db.clone(), options.clone());
                tokio::spawn(async move {
                    for _ in 0..10 {
                        execute::<Tally, _, _>(&db, "race", 1, &options, |_, e| Ok(e.version))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let loaded = t.db.read(|c| load::<Tally>(c, "race")).await.unwrap();
        assert_eq!(
            loaded.state,
            Tally {
                total: 80,
                adds: 80
            }
        );
    }

    on_each_backend!(
        #[tokio::test]
        the_aggregate_cache_stays_within_its_bound,
        backend
    );
    /// 10,000 aggregates through a cache of 1,000: it never holds more; a
    /// recent one is decided from memory, an evicted one is reloaded and
    /// decided on its full history.
    async fn the_aggregate_cache_stays_within_its_bound(backend: crate::store::Backend) {
        let options = crate::store::DbOptions {
            aggregate_cache: 1_000,
            ..crate::store::DbOptions::default()
        };
        let t = TempDb::with(backend, &options);
        let db = t.db.clone();
        let execute_options = ExecuteOptions::default();
        let ids: Vec<String> = (0..10_000).map(|i| format!("a{i}")).collect();
        for chunk in ids.chunks(500) {
            let commands = chunk
                .iter()
                .map(|id| execute::<Tally, _, _>(&db, id, 1, &execute_options, |_, _| Ok(())));
            for done in futures_util::future::join_all(commands).await {
                done.unwrap();
            }
        }
        let cache = db.writer_stats().cache;
        assert_eq!((cache.entries, cache.capacity), (1_000, 1_000), "{cache:?}");
        let before = db.writer_stats().cache;
        let recent = execute::<Tally, _, _>(&db, "a9999", 2, &execute_options, |_, e| {
            Ok(e.state.clone())
        })
        .await
        .unwrap();
        assert_eq!(recent, Tally { total: 3, adds: 2 });
        let evicted =
            execute::<Tally, _, _>(&db, "a0", 2, &execute_options, |_, e| Ok(e.state.clone()))
                .await
                .unwrap();
        assert_eq!(evicted, Tally { total: 3, adds: 2 });
        let after = db.writer_stats().cache;
        assert_eq!(after.hits - before.hits, 1, "a9999 came from memory");
        assert_eq!(after.misses - before.misses, 1, "a0 was reloaded");
        assert!(after.entries <= 1_000);
    }

    on_each_backend!(
        #[tokio::test]
        a_refused_command_writes_nothing
    );
    async fn a_refused_command_writes_nothing(t: TempDb) {
        let options = ExecuteOptions::default();
        let refused =
            execute::<Tally, _, _>(&t.db, "cap", 2_000_000, &options, |_, _| Ok(())).await;
        assert!(matches!(refused, Err(CommandError::Rejected(LimitReached))));
        let loaded = t.db.read(|c| load::<Tally>(c, "cap")).await.unwrap();
        assert_eq!(loaded.version, 0);
    }
}
