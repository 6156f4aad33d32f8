//! The `booking` context of MyEvents: `booking [--config config/booking.toml]`.

use std::process::ExitCode;

#[actix::main]
async fn main() -> ExitCode {
    herald::cli::init_logging();
    let settings = match herald::cli::settings("booking") {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    herald::cli::exit("booking", myevents::booking::run(settings).await)
}
