//! Waking the outbox relays of a context's other instances (PostgreSQL).
//!
//! A partitioned context's relay publishes the rows of the partitions its
//! instance holds (ADR 0009) and is woken by its own writer's commits. A row
//! another instance wrote for one of those partitions (a REST command that
//! reached that instance) would wait for the relay's `outbox.poll_interval`.
//!
//! So once [`Db::share_outbox`](super::Db::share_outbox) was called on a
//! PostgreSQL database, the writer follows a committed batch that appended
//! outbox rows (or made parked or unrouted rows pending again) with
//! `SELECT pg_notify('herald_outbox', <token>)`, a statement of its own: a
//! failure is logged and fails nothing (the rows are found at the poll
//! interval then), and PostgreSQL's lock on its notification queue, taken
//! at the commit of a transaction that notified, is never held together
//! with the write lock. (A unit rolled back alone may still have its batch
//! announced: a wake-up that finds nothing costs one read.) A
//! thread of the `Db` listens on a connection of its own and wakes the relay
//! when an announcement with another `Db`'s token arrives (its own commits
//! wake it already). The channel is the database's, as the outbox is.
//!
//! diesel reads notifications without blocking, so the listener looks every
//! [`LOOK_EVERY`]: a row reaches the relay that publishes it within about
//! that, not within the poll interval. A listener that lost its connection
//! connects again every [`RECONNECT_EVERY`] and wakes its relay once it
//! listens again (rows announced meanwhile were missed); until then the
//! poll interval is the bound, as without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sql_types::Text;
use diesel::RunQueryDsl;
use tokio::sync::Notify;

use super::conn::Connector;
use super::sql::Sql;
use super::{Backend, Conn};
use crate::error::StoreError;

const TARGET: &str = "herald::store";

/// The notification channel.
const CHANNEL: &str = "herald_outbox";

/// How often the listener reads the notifications that arrived.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// How long a listener without a connection waits before it tries again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// What the writer needs to announce its batches.
#[derive(Debug)]
pub(crate) struct Announcer {
    on: AtomicBool,
    /// Tells this `Db`'s announcements from the others'.
    token: String,
}

impl Announcer {
    /// Whether batches are announced (see [`Peers::share`]).
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Announces on `conn`, outside any transaction: delivered at once.
    pub(crate) fn announce(&self, conn: &mut Conn) -> Result<(), StoreError> {
        if let Conn::Postgres(c) = conn {
            Sql::new("SELECT pg_notify(?, ?)")
                .bind::<Text, _>(CHANNEL)
                .bind::<Text, _>(&self.token)
                .execute(c)?;
        }
        Ok(())
    }
}

/// A `Db`'s side of the announcements: the writer's [`Announcer`] and the
/// listener thread, stopped and joined when the last handle of the `Db` drops.
#[derive(Debug)]
pub(crate) struct Peers {
    announcer: Arc<Announcer>,
    connector: Connector,
    listener: Mutex<Option<Listener>>,
    /// Whether the listener listens now.
    listening: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Listener {
    /// Dropped to stop the thread at once.
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Peers {
    pub(crate) fn new(connector: Connector) -> Peers {
        // The listener only reads: a connection that died without a word
        // (a middlebox's idle timeout) is noticed by keepalives within about
        // a minute, and a connect to an unreachable server gives up after
        // ten seconds (dropping the last `Db` waits for the listener).
        let connector = match connector.backend() {
            Backend::Postgres => connector.with_defaults(&[
                ("connect_timeout", "10"),
                ("keepalives_idle", "30"),
                ("keepalives_interval", "10"),
                ("keepalives_count", "3"),
            ]),
            Backend::Sqlite => connector,
        };
        Peers {
            connector,
            announcer: Arc::new(Announcer {
                on: AtomicBool::new(false),
                token: uuid::Uuid::new_v4().simple().to_string(),
            }),
            listener: Mutex::new(None),
            listening: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether other instances' announcements reach this `Db` now: `None`
    /// before [`Peers::share`] (or on SQLite), `false` while the listener
    /// has no connection.
    pub(crate) fn listening(&self) -> Option<bool> {
        let started = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        started.then(|| self.listening.load(Ordering::Relaxed))
    }

    /// Connections of their own, as the listener's: with keepalives and a
    /// connect timeout on PostgreSQL.
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    pub(crate) fn announcer(&self) -> Arc<Announcer> {
        self.announcer.clone()
    }

    /// Announces this `Db`'s batches from now on and starts the listener,
    /// which wakes `relay` on the others'. Once; PostgreSQL only.
    pub(crate) fn share(&self, relay: &Arc<Notify>) {
        let mut listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if listener.is_some() {
            return;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let token = self.announcer.token.clone();
        let connector = self.connector.clone();
        let relay = Arc::downgrade(relay);
        let listening = self.listening.clone();
        let spawned = std::thread::Builder::new()
            .name("herald-outbox-listener".into())
            .spawn(move || {
                let ears = Ears {
                    connector: &connector,
                    token: &token,
                    relay: &relay,
                    listening: &listening,
                };
                ears.listen(|| {
                    matches!(
                        stopped.recv_timeout(LOOK_EVERY),
                        Err(RecvTimeoutError::Timeout)
                    )
                });
            });
        match spawned {
            Ok(thread) => *listener = Some(Listener { stop, thread }),
            Err(e) => {
                // The relay still polls: rows of other instances go out within
                // its poll interval.
                log::error!(target: TARGET, "cannot start the outbox listener: {e}");
            }
        }
        self.announcer.on.store(true, Ordering::Relaxed);
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Listener { stop, thread }) = listener {
            drop(stop);
            // Its connection is closed before the process can exit (as the writer's).
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// What the listener thread works with.
struct Ears<'a> {
    connector: &'a Connector,
    token: &'a str,
    relay: &'a Weak<Notify>,
    listening: &'a AtomicBool,
}

impl Ears<'_> {
    /// The listener's loop: `wait` sleeps [`LOOK_EVERY`] and says whether to
    /// go on; it ends when the `Db` is dropped.
    fn listen(&self, mut wait: impl FnMut() -> bool) {
        let mut failing = false;
        loop {
            match connect_listening(self.connector) {
                Ok(mut conn) => {
                    self.listening.store(true, Ordering::Relaxed);
                    if failing {
                        log::info!(target: TARGET, "the outbox listener listens again");
                    }
                    // Rows may have been announced while nobody listened.
                    if !wake(self.relay) {
                        return;
                    }
                    let read = self.read(&mut conn, &mut wait);
                    self.listening.store(false, Ordering::Relaxed);
                    match read {
                        Ok(()) => return,
                        Err(error) => {
                            log::warn!(
                                target: TARGET,
                                "the outbox listener lost its connection: {error} \
                                 (rows of other instances wait for outbox.poll_interval meanwhile)"
                            );
                            failing = true;
                        }
                    }
                }
                Err(error) => {
                    if !failing {
                        log::warn!(
                            target: TARGET,
                            "the outbox listener cannot listen: {error} (trying again every {RECONNECT_EVERY:?})"
                        );
                        failing = true;
                    }
                }
            }
            // Waits RECONNECT_EVERY in steps, stopping at once when asked to.
            let steps = RECONNECT_EVERY.as_millis() / LOOK_EVERY.as_millis().max(1);
            for _ in 0..steps {
                if !wait() {
                    return;
                }
            }
        }
    }

    /// Reads the notifications as they come until `wait` says stop (`Ok`)
    /// or the connection fails.
    fn read(
        &self,
        conn: &mut PgConnection,
        wait: &mut impl FnMut() -> bool,
    ) -> Result<(), StoreError> {
        while wait() {
            let mut theirs = false;
            for notification in conn.notifications_iter() {
                theirs |= notification?.payload != self.token;
            }
            if theirs && !wake(self.relay) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// A new connection that listens on the channel.
fn connect_listening(connector: &Connector) -> Result<PgConnection, StoreError> {
    match connector.connect()? {
        Conn::Postgres(mut conn) => {
            conn.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            Ok(conn)
        }
        Conn::Sqlite(_) => Err(StoreError::Pool("announcements need PostgreSQL".to_owned())),
    }
}

/// Wakes the relay; `false` once the `Db` is gone.
fn wake(relay: &Weak<Notify>) -> bool {
    relay.upgrade().map(|n| n.notify_one()).is_some()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::event::{new_id, Envelope, Metadata};
    use crate::store::testing::TempDb;
    use crate::store::{outbox, Backend, Db};

    /// Generous: the listener looks every 10 ms.
    const WITHIN: Duration = Duration::from_secs(30);

    /// A second `Db` on the same database, as another instance would open it.
    fn another(t: &TempDb) -> Db {
        Db::open(&t.url()).expect("open the database again")
    }

    async fn woken(db: &Db) -> bool {
        tokio::time::timeout(WITHIN, db.committed()).await.is_ok()
    }

    #[tokio::test]
    async fn a_commit_that_appends_outbox_rows_wakes_the_other_instances_relays() {
        let t = TempDb::new(Backend::Postgres);
        let other = another(&t);
        t.db.share_outbox();
        other.share_outbox();
        // Its listener wakes it once when it listens: from then on only an
        // announcement does (nothing is written through `other`).
        assert!(woken(&other).await, "the listener never listened");
        assert_eq!(other.outbox_listening(), Some(true));
        let envelope = Envelope {
            meta: Metadata {
                id: Some(new_id()),
                name: "noted".into(),
                schema_version: 1,
                correlation_id: None,
                causation_id: None,
                producer: None,
                occurred_at: None,
            },
            payload: b"{}".to_vec(),
        };
        t.db.write(move |c| outbox::append_envelope(c, &envelope, "key-1"))
            .await
            .expect("append a row");
        assert!(woken(&other).await, "the other instance was not woken");
        drop(other);
    }

    #[tokio::test]
    async fn nothing_listens_on_sqlite_or_before_the_outbox_is_shared() {
        let postgres = TempDb::new(Backend::Postgres);
        assert_eq!(postgres.db.outbox_listening(), None);
        let sqlite = TempDb::new(Backend::Sqlite);
        sqlite.db.share_outbox();
        assert_eq!(sqlite.db.outbox_listening(), None);
    }
}
