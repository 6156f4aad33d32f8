//! An event-sourced aggregate, a projection and a REST command in one context.
//! `cargo run --example event_sourced`, then `curl -i -d 50 localhost:8383/accounts/ann`
//! (201), `-d -80` (409: not enough), `curl localhost:8383/accounts/ann` (the read
//! model). The outbox relay publishes each `balanceChanged`; the context hears it back.
//! `DATABASE_URL=postgres://user:password@host/db` keeps it in PostgreSQL instead of
//! `data/wallet.db`: the SQL below runs on either backend.

use actix_web::web::{self, Data, Path};
use actix_web::{http::StatusCode, HttpResponse};
use diesel::{connection::SimpleConnection, prelude::*, sql_types::*};
use herald::aggregate::Aggregate;
use herald::error::StoreError;
use herald::http::{self as h, ApiError, CommandRequest};
use herald::prelude::*;
use herald::store::projection::{Projection, Projections};
use herald::store::repository::{decode_recorded, ExecuteOptions, Executed};
use herald::store::{event_store::RecordedEvent, outbox, sql::Sql, Db};
use serde::{Deserialize, Serialize};

/// The fact: stored in the account's stream, published through the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
struct BalanceChanged {
    account: String,
    amount: i64,
}

impl Event for BalanceChanged {
    const NAME: &'static str = "balanceChanged";
    fn partition_key(&self) -> std::borrow::Cow<'_, str> {
        self.account.as_str().into()
    }
}

/// Stored events are an adjacently tagged enum: the tag is the stored name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", content = "payload")]
enum AccountEvent {
    #[serde(rename = "balanceChanged")]
    Changed(BalanceChanged),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("not enough money on the account")]
struct Overdrawn;

/// The aggregate's state, folded from its events.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Account {
    balance: i64,
}

impl Aggregate for Account {
    const KIND: &'static str = "account";
    type Command = BalanceChanged; // the change asked for: `handle` decides
    type Event = AccountEvent;
    type Error = Overdrawn;
    fn handle(&self, asked: BalanceChanged) -> Result<Vec<AccountEvent>, Overdrawn> {
        if self.balance + asked.amount < 0 {
            return Err(Overdrawn);
        }
        Ok(vec![AccountEvent::Changed(asked)])
    }
    fn apply(&mut self, AccountEvent::Changed(changed): &AccountEvent) {
        self.balance += changed.amount;
    }
}

diesel::table! { balances (account) { account -> Text, balance -> BigInt, } }
const TABLE: &str =
    "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)";
// `Sql` renders `?` as each backend numbers its parameters; PostgreSQL wants
// the existing row's column qualified beside `excluded`.
const UPSERT: &str = "INSERT INTO balances VALUES (?, ?) \
    ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance";

/// The read model: one row per account, caught up in each append's transaction.
struct Balances;

impl Projection for Balances {
    fn name(&self) -> &'static str {
        "balances"
    }
    fn reset(&self, c: &mut Conn) -> Result<(), StoreError> {
        Ok(c.batch_execute("DELETE FROM balances")?)
    }
    fn apply(&self, c: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError> {
        let AccountEvent::Changed(changed) = decode_recorded::<Account>(event)?;
        let upsert = Sql::new(UPSERT).bind::<Text, _>(&changed.account);
        upsert.bind::<BigInt, _>(changed.amount).execute(c)?;
        Ok(())
    }
}

type Answer = Result<HttpResponse, ApiError>;

/// `POST /accounts/{id}` (an amount, optional `Idempotency-Key`): decide;
/// events, outbox rows, projection and the remembered answer in one transaction.
async fn change(db: Data<Db>, id: Path<String>, request: CommandRequest) -> Answer {
    let (amount, keyed) = request.parse::<i64>()?;
    let account = id.to_string();
    let asked = BalanceChanged { account, amount };
    let effects = |c: &mut Conn, done: &Executed<Account>| {
        for AccountEvent::Changed(changed) in &done.events {
            outbox::append(c, changed, "wallet", None)?;
        }
        Projections::default()
            .with(Balances)
            .catch_up_with(c, &done.recorded)?;
        Ok(h::stored(StatusCode::CREATED, &done.state))
    };
    let options = ExecuteOptions {
        max_attempts: 10, // another writer appended first: decide again
        ..Default::default()
    };
    let conflict = |refused: Overdrawn| ApiError::conflict(refused.to_string());
    let answer = h::execute::<Account, _>(&db, &id, asked, &options, keyed, effects, conflict);
    Ok(h::replay(&answer.await?))
}

/// `GET /accounts/{id}`: the read model; a GET right after the 201 sees it.
async fn balance(db: Data<Db>, id: Path<String>) -> Answer {
    let id = id.into_inner();
    let query = balances::table.find(id).select(balances::balance);
    let balance: i64 = db.read(move |c| Ok(query.first(c)?)).await?; // no row: 404
    Ok(h::json(StatusCode::OK, &Account { balance }))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    herald::cli::init_logging();
    let settings = Settings::for_context("wallet");
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "data/wallet.db".into());
    let db = Db::open(&url)?; // runs migrations, blocks: before the system
    actix::System::new().block_on(async move {
        db.write(|c| Ok(c.batch_execute(TABLE)?)).await?;
        let broker = AmqpBroker::connect(&AmqpOptions::from_settings(&settings)).await?;
        let context = ContextBuilder::new(settings)
            .store(db.clone()) // its outbox relay publishes what commands commit
            .handle(|changed: BalanceChanged, _| async move {
                herald::log::info!("heard {changed:?}");
                Ok(())
            })
            .start(&broker)
            .await?;
        let db = web::Data::new(db);
        let routes = move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(db.clone());
            cfg.route("/accounts/{id}", web::post().to(change));
            cfg.route("/accounts/{id}", h::get().to(balance));
        };
        let addr = ([127, 0, 0, 1], 8383).into();
        let (_, http) = h::serve("wallet", "REST", addr, context.metrics(), routes)?;
        context.run_until(shutdown_signal()).await?;
        http.stop(true).await;
        Ok(())
    })
}
