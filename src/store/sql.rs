//! Statements of fixed SQL that a connection prepares once and keeps.
//!
//! diesel keeps a prepared statement per connection only for queries it can
//! tell apart without their values. It never keeps an `UPDATE`, an upsert
//! (`ON CONFLICT ... DO UPDATE`) or a `sql_query`: those are parsed and
//! planned by the database on every use, which on the database writer costs
//! more than running them. [`Sql`] is a statement whose text is fixed at
//! compile time; diesel keeps it prepared, keyed by that text, and only binds
//! new values on each use.
//!
//! The text is written once with `?` placeholders; each backend's query
//! builder renders them as it needs (`?` for SQLite, `$1`, `$2` ... for
//! PostgreSQL), so the same statement runs on a [`Conn`](crate::store::Conn)
//! of either backend.
//!
//! ```
//! use diesel::sql_types::{BigInt, Text};
//! use diesel::RunQueryDsl;
//! use herald::store::sql::Sql;
//!
//! # fn add(conn: &mut herald::store::Conn, id: &str, seats: i64) -> diesel::QueryResult<usize> {
//! Sql::new("UPDATE events SET seats = seats + ? WHERE id = ?")
//!     .bind::<BigInt, _>(seats)
//!     .bind::<Text, _>(id)
//!     .execute(conn)
//! # }
//! ```
//!
//! Rows come back as with `sql_query`: `.load::<T>()` or `.get_result::<T>()`
//! for a `T` that derives `QueryableByName`. Many rows go in few statements
//! with [`execute_rows`].

use std::marker::PhantomData;

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::Error as DieselError;
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::{QueryResult, RunQueryDsl};

/// A statement of fixed SQL with `?` placeholders, and the values bound to
/// them so far. Run it with diesel's [`RunQueryDsl`] (`execute`, `load`,
/// `get_result`) on any connection whose backend takes the bound types.
///
/// The text must hold exactly one `?` per bound value and no other `?`
/// (none in a string literal): running it otherwise is an error, never a
/// wrong statement.
#[derive(Debug, Clone)]
#[must_use = "a statement does nothing until it is run"]
pub struct Sql<B = ()> {
    text: &'static str,
    binds: B,
}

impl Sql {
    /// A statement with the text `text` and nothing bound yet.
    pub fn new(text: &'static str) -> Self {
        Sql { text, binds: () }
    }
}

impl<B> Sql<B> {
    /// The same statement with `value` bound, as SQL type `ST`, to the next
    /// `?`.
    pub fn bind<ST, V>(self, value: V) -> Sql<Bound<B, ST, V>> {
        Sql {
            text: self.text,
            binds: Bound {
                before: self.binds,
                value,
                sql_type: PhantomData,
            },
        }
    }
}

/// The values bound to a [`Sql`] so far: `()`, then one [`Bound`] per value.
pub trait Binds<DB: Backend>: sealed::Sealed {
    /// Writes the text up to each bound value's `?` and binds the value, in
    /// order, taking the pieces of text between placeholders from `pieces`.
    #[doc(hidden)]
    fn walk<'b>(
        &'b self,
        out: &mut AstPass<'_, 'b, DB>,
        pieces: &mut std::str::Split<'static, char>,
    ) -> QueryResult<()>;
}

/// A value bound to a [`Sql`], after the values in `before`.
#[derive(Debug, Clone)]
pub struct Bound<Before, ST, V> {
    before: Before,
    value: V,
    sql_type: PhantomData<fn() -> ST>,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl<B, ST, V> Sealed for super::Bound<B, ST, V> {}
}

impl<DB: Backend> Binds<DB> for () {
    fn walk<'b>(
        &'b self,
        _: &mut AstPass<'_, 'b, DB>,
        _: &mut std::str::Split<'static, char>,
    ) -> QueryResult<()> {
        Ok(())
    }
}

impl<B, ST, V, DB> Binds<DB> for Bound<B, ST, V>
where
    DB: Backend + HasSqlType<ST>,
    B: Binds<DB>,
    V: ToSql<ST, DB>,
{
    fn walk<'b>(
        &'b self,
        out: &mut AstPass<'_, 'b, DB>,
        pieces: &mut std::str::Split<'static, char>,
    ) -> QueryResult<()> {
        self.before.walk(out, pieces)?;
        let piece = pieces.next().ok_or_else(|| mismatch(MORE_VALUES))?;
        out.push_sql(piece);
        // Writes the backend's placeholder (`?`, `$n`).
        out.push_bind_param::<ST, V>(&self.value)
    }
}

const MORE_VALUES: &str = "more values bound than the text has `?`";

fn mismatch(what: &str) -> DieselError {
    DieselError::QueryBuilderError(what.into())
}

impl<B: Binds<DB>, DB: Backend> QueryFragment<DB> for Sql<B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        let mut pieces = self.text.split('?');
        self.binds.walk(&mut out, &mut pieces)?;
        // What follows the last placeholder (the whole text if none).
        let last = pieces.next().ok_or_else(|| mismatch(MORE_VALUES))?;
        out.push_sql(last);
        if pieces.next().is_some() {
            return Err(mismatch("the text has more `?` than values bound"));
        }
        Ok(())
    }
}

/// Kept by its text: diesel's cache key for a query without a static id is
/// its SQL and bind types, and `walk_ast` never marks it unsafe to cache.
impl<B> QueryId for Sql<B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// Rows are read by name, as with `sql_query`.
impl<B> Query for Sql<B> {
    type SqlType = Untyped;
}

impl<B, C> RunQueryDsl<C> for Sql<B> {}

/// One statement of many rows: `head`, then each row's text, joined by
/// commas (`INSERT INTO t (a, b) VALUES ` then `(?, ?)` per row).
///
/// Each row is a [`Sql`] with its values bound. SQLite runs a multi-row
/// statement as one: its per-statement work (cursors, the statement
/// journal, diesel's cache lookup) is paid once for all its rows, not once
/// per row. Its text depends on how many rows it holds, and the connection
/// keeps one prepared statement per text: [`execute_rows`] keeps that set
/// small.
#[derive(Debug)]
#[must_use = "a statement does nothing until it is run"]
pub struct Rows<'r, B> {
    head: &'static str,
    rows: &'r [Sql<B>],
}

impl<'r, B> Rows<'r, B> {
    /// `head` followed by `rows`.
    pub fn new(head: &'static str, rows: &'r [Sql<B>]) -> Self {
        Rows { head, rows }
    }
}

impl<B: Binds<DB>, DB: Backend> QueryFragment<DB> for Rows<'_, B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        if self.rows.is_empty() {
            return Err(mismatch("a statement of rows needs at least one row"));
        }
        out.push_sql(self.head);
        for (n, row) in self.rows.iter().enumerate() {
            if n > 0 {
                out.push_sql(", ");
            }
            row.walk_ast(out.reborrow())?;
        }
        Ok(())
    }
}

/// Kept by its text, as [`Sql`] is.
impl<B> QueryId for Rows<'_, B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<B> Query for Rows<'_, B> {
    type SqlType = Untyped;
}

impl<B, C> RunQueryDsl<C> for Rows<'_, B> {}

/// Most rows [`execute_rows`] puts in one statement.
pub const MAX_ROWS: usize = 64;

/// Runs `head` over `rows` ([`Rows`]) in as few statements as it can: as
/// many rows per statement as a power of two up to [`MAX_ROWS`] allows, so a
/// connection keeps at most seven texts prepared per `head` whatever the
/// number of rows. Returns the rows changed, as `execute` does; nothing for
/// no rows.
///
/// # Errors
/// The first statement that fails; the statements before it ran (run it in
/// a transaction).
pub fn execute_rows<'r, B, C>(
    conn: &mut C,
    head: &'static str,
    rows: &'r [Sql<B>],
) -> QueryResult<usize>
where
    C: diesel::Connection,
    Rows<'r, B>: diesel::query_dsl::methods::ExecuteDsl<C>,
{
    let mut changed = 0;
    let mut rest = rows;
    while !rest.is_empty() {
        let take = if rest.len() >= MAX_ROWS {
            MAX_ROWS
        } else {
            // The largest power of two that fits.
            1 << rest.len().ilog2()
        };
        let (these, after) = rest.split_at(take);
        changed += Rows::new(head, these).execute(conn)?;
        rest = after;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};

    use super::*;

    /// Counts statements the connection prepared for its cache, and
    /// statements it ran.
    #[derive(Default)]
    struct Counts {
        cached: usize,
        started: usize,
    }

    struct Counter(Arc<Mutex<Counts>>);

    impl Instrumentation for Counter {
        fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
            let mut counts = self.0.lock().unwrap();
            match event {
                InstrumentationEvent::CacheQuery { .. } => counts.cached += 1,
                InstrumentationEvent::StartQuery { .. } => counts.started += 1,
                _ => {}
            }
        }
    }

    diesel::table! {
        seats (id) {
            id -> Text,
            n -> BigInt,
        }
    }

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = Text)]
        id: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn connection() -> (SqliteConnection, Arc<Mutex<Counts>>) {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute(
            "CREATE TABLE seats (id TEXT PRIMARY KEY NOT NULL, n BIGINT NOT NULL);
             INSERT INTO seats VALUES ('a', 0), ('b', 0);",
        )
        .unwrap();
        let counts = Arc::new(Mutex::new(Counts::default()));
        conn.set_instrumentation(Counter(counts.clone()));
        (conn, counts)
    }

    fn add(conn: &mut SqliteConnection, id: &str, n: i64) -> QueryResult<usize> {
        Sql::new("UPDATE seats SET n = n + ? WHERE id = ?")
            .bind::<BigInt, _>(n)
            .bind::<Text, _>(id)
            .execute(conn)
    }

    #[test]
    fn an_update_is_prepared_once_and_binds_new_values_each_time() {
        let (mut conn, counts) = connection();
        for (id, n) in [("a", 1), ("b", 10), ("a", 2), ("a", 4)] {
            assert_eq!(add(&mut conn, id, n).unwrap(), 1);
        }
        assert_eq!(counts.lock().unwrap().started, 4);
        assert_eq!(counts.lock().unwrap().cached, 1, "prepared once, kept");
        let rows: Vec<Row> = Sql::new("SELECT id, n FROM seats WHERE n > ? ORDER BY id")
            .bind::<BigInt, _>(0)
            .load(&mut conn)
            .unwrap();
        assert_eq!(
            rows,
            vec![
                Row {
                    id: "a".into(),
                    n: 7
                },
                Row {
                    id: "b".into(),
                    n: 10
                },
            ]
        );
    }

    /// Why this module exists: diesel's own update is prepared every time.
    #[test]
    fn diesel_does_not_keep_an_update() {
        let (mut conn, counts) = connection();
        for n in 1..=3 {
            diesel::update(seats::table.find("a"))
                .set(seats::n.eq(seats::n + n))
                .execute(&mut conn)
                .unwrap();
        }
        assert_eq!(counts.lock().unwrap().cached, 0);
    }

    fn seat_rows(ids: &[String]) -> Vec<Sql<impl Binds<diesel::sqlite::Sqlite> + '_>> {
        ids.iter()
            .zip(1i64..)
            .map(|(id, n)| Sql::new("(?, ?)").bind::<Text, _>(id).bind::<BigInt, _>(n))
            .collect()
    }

    #[test]
    fn many_rows_go_in_few_statements_of_few_texts() {
        let (mut conn, counts) = connection();
        let mut inserted = 0;
        // 63 = 32 + 16 + 8 + 4 + 2 + 1; 130 = 64 + 64 + 2; 7 = 4 + 2 + 1.
        for (size, statements) in [(0, 0), (1, 1), (63, 6), (64, 1), (65, 2), (130, 3), (7, 3)] {
            let ids: Vec<String> = (0..size).map(|n| format!("r{inserted}-{n}")).collect();
            let started = counts.lock().unwrap().started;
            let changed = execute_rows(
                &mut conn,
                "INSERT INTO seats (id, n) VALUES ",
                &seat_rows(&ids),
            );
            assert_eq!(changed.unwrap(), size);
            assert_eq!(
                counts.lock().unwrap().started - started,
                statements,
                "{size} rows"
            );
            inserted += size;
        }
        assert!(
            counts.lock().unwrap().cached <= 7,
            "one text per power of two"
        );
        let rows: Vec<Row> = Sql::new("SELECT id, n FROM seats WHERE id LIKE 'r%' ORDER BY rowid")
            .load(&mut conn)
            .unwrap();
        assert_eq!(rows.len(), inserted);
        // In order, each with its own values.
        assert_eq!(
            (&rows[1].id[..], rows[1].n, &rows[63].id[..], rows[63].n),
            ("r1-0", 1, "r1-62", 63)
        );
        assert_eq!(
            (&rows[inserted - 1].id[..], rows[inserted - 1].n),
            ("r323-6", 7)
        );
    }

    #[test]
    fn a_failing_row_is_an_error_and_rows_need_one_row() {
        let (mut conn, _) = connection();
        let ids = vec!["x".to_owned(), "a".to_owned()];
        assert!(matches!(
            execute_rows(
                &mut conn,
                "INSERT INTO seats (id, n) VALUES ",
                &seat_rows(&ids)
            ),
            Err(DieselError::DatabaseError(..))
        ));
        let rows: Vec<Row> = Sql::new("SELECT id, n FROM seats WHERE id = 'x'")
            .load(&mut conn)
            .unwrap();
        assert!(rows.is_empty(), "a statement fails whole: {rows:?}");
        let none = seat_rows(&[]);
        assert!(matches!(
            Rows::new("INSERT INTO seats (id, n) VALUES ", &none).execute(&mut conn),
            Err(DieselError::QueryBuilderError(_))
        ));
    }

    #[test]
    fn placeholders_and_values_must_match() {
        let (mut conn, _) = connection();
        let too_few = Sql::new("UPDATE seats SET n = ? WHERE id = ?")
            .bind::<BigInt, _>(1)
            .execute(&mut conn);
        assert!(matches!(too_few, Err(DieselError::QueryBuilderError(_))));
        let too_many = Sql::new("UPDATE seats SET n = ?")
            .bind::<BigInt, _>(1)
            .bind::<Text, _>("a")
            .execute(&mut conn);
        assert!(matches!(too_many, Err(DieselError::QueryBuilderError(_))));
        let rows: Vec<Row> = Sql::new("SELECT id, n FROM seats WHERE n <> 0")
            .load(&mut conn)
            .unwrap();
        assert!(rows.is_empty(), "nothing ran: {rows:?}");
    }
}
