//! The `booking` context of MyEvents: `booking [--config config/booking.toml]`.

use std::path::PathBuf;
use std::process::ExitCode;

#[actix::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(herald::DEFAULT_LOG_FILTER),
    )
    .init();
    let mut args = std::env::args().skip(1);
    let config = match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => PathBuf::from("config/booking.toml"),
        (Some("--config"), Some(path), None) => PathBuf::from(path),
        _ => {
            eprintln!("usage: booking [--config PATH]");
            return ExitCode::from(64);
        }
    };
    let settings = match herald::Settings::load(&config) {
        Ok(settings) => settings,
        Err(error) => {
            log::error!("{}: {error}", config.display());
            return ExitCode::from(78);
        }
    };
    match herald::contexts::booking::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("booking stopped: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
    }
}
