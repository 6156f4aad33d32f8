//! What every context binary does around its `run`: logging, the
//! `[--config PATH]` argument, loading settings, and the exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::{Error, Settings};

/// The log filter binaries use when `RUST_LOG` is unset: INFO, without lapin's
/// per-message dump of returned (unroutable) messages (herald reports them
/// itself) and without its tracing span lines.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin::returned_messages=error,tracing::span=warn";

/// env_logger with `RUST_LOG`, else [`DEFAULT_LOG_FILTER`].
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER))
        .init();
}

/// The settings of context `name` from `[--config PATH]` (default
/// `config/<name>.toml`) and the environment.
///
/// # Errors
/// The exit code to stop with: 64 for bad arguments, 78 for a bad config
/// (the key is named in the log).
pub fn settings(name: &str) -> Result<Settings, ExitCode> {
    let mut args = std::env::args().skip(1);
    let path = match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => PathBuf::from(format!("config/{name}.toml")),
        (Some("--config"), Some(path), None) => PathBuf::from(path),
        _ => {
            log::error!("usage: {name} [--config PATH]");
            return Err(ExitCode::from(64));
        }
    };
    load(&path)
}

/// Loads `path`; a failure is logged and becomes exit code 78.
///
/// # Errors
/// Exit code 78 (EX_CONFIG).
pub fn load(path: &Path) -> Result<Settings, ExitCode> {
    Settings::load(path).map_err(|error| {
        log::error!("{}: {error}", path.display());
        ExitCode::from(78)
    })
}

/// The exit code for how context `name` ended; an error is logged.
pub fn exit(name: &str, result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{name} stopped: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
    }
}
