//! The `events` context of MyEvents: `events [--config config/events.toml]`.

use std::process::ExitCode;

#[actix::main]
async fn main() -> ExitCode {
    herald::cli::init_logging();
    let settings = match herald::cli::settings("events") {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    herald::cli::exit("events", myevents::events::run(settings).await)
}
