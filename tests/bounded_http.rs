//! A REST listener bounds the time a request's body takes to arrive: a body
//! trickling in byte by byte gets a 408 and its connection is closed.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use herald::config::HttpSettings;
use herald::http::{self as h, ApiError, CommandRequest};
use herald::{ContextBuilder, Event, MemoryBroker, Settings};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Noted {
    key: String,
}

impl Event for Noted {
    const NAME: &'static str = "noted";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

#[derive(Deserialize)]
struct Note {
    text: String,
}

async fn note(command: CommandRequest) -> Result<HttpResponse, ApiError> {
    let (note, _) = command.parse::<Note>()?;
    Ok(h::json(
        actix_web::http::StatusCode::CREATED,
        &serde_json::json!({ "text": note.text }),
    ))
}

/// Sends a head announcing 64 body bytes, then one byte every 200 ms; returns
/// what the server answered and how long after the head it closed.
async fn trickle(port: u16) -> (String, Duration) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /notes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let dribble = tokio::spawn(async move {
        for _ in 0..64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    // Bounded by the test's own patience, not by the server: 64 bytes at
    // 200 ms take 12.8 s, the deadline under test is 1 s.
    let read = tokio::time::timeout(Duration::from_secs(8), reader.read_to_end(&mut answer)).await;
    let elapsed = sent.elapsed();
    dribble.abort();
    assert!(
        read.is_ok(),
        "no answer and no close within 8 s: {:?}",
        String::from_utf8_lossy(&answer)
    );
    (String::from_utf8_lossy(&answer).into_owned(), elapsed)
}

#[actix_rt::test]
async fn a_body_that_trickles_in_gets_408_and_its_connection_closed() {
    let broker = MemoryBroker::new();
    let context = ContextBuilder::new(Settings::for_context("trickled"))
        .handle(|_: Noted, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    let settings = HttpSettings {
        body_timeout: Duration::from_secs(1),
        ..HttpSettings::default()
    };
    let (addr, server) = h::serve_with("trickled", "REST", &settings, context.metrics(), |cfg| {
        cfg.route("/notes", web::post().to(note));
    })
    .unwrap();

    let (answer, elapsed) = trickle(addr.port()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\""), "a JSON error: {answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(elapsed < Duration::from_secs(4), "closed after {elapsed:?}");

    // A body that arrives in time is served as ever.
    let mut stream = TcpStream::connect(("127.0.0.1", addr.port()))
        .await
        .unwrap();
    let body = r#"{"text":"on time"}"#;
    let request = format!(
        "POST /notes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    server.stop(true).await;
    context.shutdown().await.unwrap();
}
