//! The demo context: `demo [--config config/demo.toml] [--ping-every 1s]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn usage(problem: &str) -> ExitCode {
    eprintln!("demo: {problem}\nusage: demo [--config PATH] [--ping-every DURATION]");
    ExitCode::from(64)
}

#[actix::main]
async fn main() -> ExitCode {
    herald::cli::init_logging();
    let mut config = PathBuf::from("config/demo.toml");
    let mut ping_every: Option<Duration> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(path)) => config = path.into(),
            ("--ping-every", Some(every)) => {
                match humantime_serde::re::humantime::parse_duration(&every) {
                    Ok(every) if !every.is_zero() => ping_every = Some(every),
                    _ => return usage(&format!("--ping-every: not a duration: {every:?}")),
                }
            }
            (other, _) => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    let settings = match herald::cli::load(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    herald::cli::exit("demo", myevents::demo::run(settings, ping_every).await)
}
