//! `ordered`: a context for the scale-out tests. It applies `numbered`
//! events (a key and that key's sequence number) exactly once, recording
//! each with the instance that applied it, in the order applied. Run several
//! instances of it on one PostgreSQL database with `runtime.partitions` set,
//! and the table `ordered_seen` shows per-key order, the spread over
//! instances and exactly-once application. Serves the admin API.

use std::borrow::Cow;
use std::process::ExitCode;
use std::sync::Arc;

use diesel::RunQueryDsl;
use herald::prelude::*;
use herald::store::{projection::Projections, Backend, Db, DbOptions};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
struct Numbered {
    key: String,
    seq: i64,
}

impl Event for Numbered {
    const NAME: &'static str = "numbered";

    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

fn table(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "CREATE TABLE IF NOT EXISTS ordered_seen (position INTEGER PRIMARY KEY AUTOINCREMENT, \
             key TEXT NOT NULL, seq BIGINT NOT NULL, instance TEXT NOT NULL)"
        }
        Backend::Postgres => {
            "CREATE TABLE IF NOT EXISTS ordered_seen (position BIGSERIAL PRIMARY KEY, \
             key TEXT NOT NULL, seq BIGINT NOT NULL, instance TEXT NOT NULL)"
        }
    }
}

async fn run(settings: Settings) -> herald::Result<()> {
    let url = settings
        .database
        .url
        .as_ref()
        .map(|u| herald::config::ExposeSecret::expose_secret(u).to_owned())
        .unwrap_or_else(|| "data/ordered.db".into());
    let options = DbOptions::from_settings(&settings);
    let db = tokio::task::spawn_blocking(move || Db::open_with(&url, &options))
        .await
        .map_err(|e| Error::Context {
            context: "ordered".into(),
            reason: e.to_string(),
        })??;
    let create = table(db.backend());
    db.write(move |c| {
        diesel::sql_query(create).execute(c)?;
        Ok(())
    })
    .await?;
    let instance: Arc<str> = Arc::from(
        settings
            .runtime
            .instance
            .clone()
            .unwrap_or_else(|| format!("pid-{}", std::process::id())),
    );
    let broker = AmqpBroker::connect(&AmqpOptions::from_settings(&settings)).await?;
    let admin_settings = settings.admin.clone();
    let context = ContextBuilder::new(settings)
        .store(db)
        .apply_once(move |event: Numbered, _meta, conn| {
            herald::store::sql::Sql::new(
                "INSERT INTO ordered_seen (key, seq, instance) VALUES (?, ?, ?)",
            )
            .bind::<diesel::sql_types::Text, _>(&event.key)
            .bind::<diesel::sql_types::BigInt, _>(event.seq)
            .bind::<diesel::sql_types::Text, _>(&*instance)
            .execute(conn)
            .map_err(HandlerError::from_error)?;
            Ok(())
        })
        .start(&broker)
        .await?;
    let admin = herald::admin::Admin {
        context: context.handle(),
        projections: Arc::new(Projections::default()),
    };
    let (_, admin) = herald::admin::serve(admin, &admin_settings).map_err(|e| Error::Context {
        context: "ordered".into(),
        reason: format!("admin API: {e}"),
    })?;
    let result = context.run_until(shutdown_signal()).await;
    admin.stop(true).await;
    let _ = broker.close().await;
    result
}

fn main() -> ExitCode {
    herald::cli::init_logging();
    let settings = match herald::cli::settings("ordered") {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    herald::cli::exit(
        "ordered",
        herald::actix::System::new().block_on(run(settings)),
    )
}
