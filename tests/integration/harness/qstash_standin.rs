//! A QStash stand-in: an HTTP server that speaks QStash's publishing API
//! (`POST /v2/publish/{destination}`, `POST /v2/batch`, bearer token, per-message answers)
//! and then delivers every accepted message as QStash does: `POST` to the destination
//! with the body as published, `Upstash-Signature` (see [`super::qstash`]),
//! `Upstash-Message-Id` and `Upstash-Retried`, retrying non-2xx answers with exponential
//! backoff (milliseconds here instead of QStash's seconds) up to `Upstash-Retries`, and
//! stopping early on `489` with `Upstash-NonRetryable-Error: true`.
//!
//! Tests can make it refuse publishes (answer 500, or read the request and hang up
//! without an answer), answer particular messages as QStash answers a message it refused
//! (`{"error": …}` in its place in a batch answer, the rest of the batch still accepted)
//! or a message to a URL group (one answer per endpoint, an array in its place), and
//! read what it delivered. Deliveries can be routed to another host than the
//! destination names (`deliver_to`), as a public URL reaches the service through a
//! proxy; the signature still names the destination.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::qstash::{claims, sign};

pub const TOKEN: &str = "qstash_test_token_5d1e";

/// One delivery attempt the stand-in made.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub destination: String,
    pub retried: u32,
    pub status: u16,
}

struct Inner {
    signing_key: String,
    /// Base URLs that replace scheme, host and port of destinations when delivering: the
    /// n-th copy of a message goes to the n-th (modulo their number); none: as addressed.
    deliver_to: Mutex<Vec<String>>,
    /// Publishes still to refuse with 500.
    failing_publishes: AtomicU32,
    /// Every accepted message is delivered twice, at the same time: QStash delivers at
    /// least once.
    deliver_twice: std::sync::atomic::AtomicBool,
    /// Connections still to hang up on once their request arrived.
    dropping_connections: Arc<AtomicU32>,
    /// Messages answered otherwise than accepted: the first rule whose fragment the
    /// message's body contains applies.
    answers: Mutex<Vec<(String, MessageAnswer)>>,
    published: Mutex<Vec<Value>>,
    deliveries: Mutex<Vec<Delivery>>,
    client: reqwest::Client,
}

/// How the stand-in answers a message, instead of accepting it.
#[derive(Debug, Clone)]
pub enum MessageAnswer {
    /// QStash refused the message: `{"error": reason}`, and nothing is delivered.
    Refused(String),
    /// As QStash answers a message to a URL group: an array with one answer per
    /// endpoint, `{"messageId": …, "url": …}` for an endpoint the message was accepted
    /// for (and delivered to; every endpoint here stands for the message's
    /// destination), `{"error": reason}` for one given as `Some(reason)`.
    UrlGroup(Vec<Option<String>>),
}

/// A running stand-in. It stops with the test's runtime.
#[derive(Clone)]
pub struct QstashStandIn {
    pub url: String,
    inner: Arc<Inner>,
}

#[derive(Deserialize)]
struct BatchMessage {
    destination: String,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
    #[serde(default)]
    body: String,
}

impl QstashStandIn {
    /// Starts on a free port. Deliveries go where the destinations say until
    /// [`QstashStandIn::deliver_to`] says otherwise.
    pub async fn start(signing_key: &str) -> QstashStandIn {
        let inner = Arc::new(Inner {
            signing_key: signing_key.to_owned(),
            deliver_to: Mutex::new(Vec::new()),
            failing_publishes: AtomicU32::new(0),
            deliver_twice: std::sync::atomic::AtomicBool::new(false),
            dropping_connections: Arc::new(AtomicU32::new(0)),
            answers: Mutex::new(Vec::new()),
            published: Mutex::new(Vec::new()),
            deliveries: Mutex::new(Vec::new()),
            client: reqwest::Client::new(),
        });
        let router = Router::new()
            .route("/v2/batch", post(batch))
            .route("/v2/publish/{*destination}", post(publish))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = HangingUp {
            listener,
            remaining: inner.dropping_connections.clone(),
        };
        tokio::spawn(async move { axum::serve(listener, router).await });
        QstashStandIn { url, inner }
    }

    /// Delivers to `base` (e.g. the app's address) instead of the destination's host.
    pub fn deliver_to(&self, base: &str) {
        self.deliver_copies_to(&[base]);
    }

    /// Delivers the n-th copy of each message to the n-th of `bases` (e.g. the first
    /// copy to one replica, the second to another; see
    /// [`QstashStandIn::deliver_each_twice`]).
    pub fn deliver_copies_to(&self, bases: &[&str]) {
        *self.inner.deliver_to.lock().unwrap() = bases
            .iter()
            .map(|base| base.trim_end_matches('/').to_owned())
            .collect();
    }

    /// The next `count` publish calls are answered 500 and publish nothing.
    pub fn fail_publishes(&self, count: u32) {
        self.inner.failing_publishes.store(count, Ordering::SeqCst);
    }

    /// Publishes still to be refused of those [`QstashStandIn::fail_publishes`] asked for.
    #[allow(dead_code)] // used by the fault tests, which include this file
    pub fn publishes_still_failing(&self) -> u32 {
        self.inner.failing_publishes.load(Ordering::SeqCst)
    }

    /// From now on, every accepted message is delivered twice, both deliveries at once
    /// (each with its own retries), as QStash's at-least-once delivery may do.
    #[allow(dead_code)] // used by the fault tests, which include this file
    pub fn deliver_each_twice(&self) {
        self.inner.deliver_twice.store(true, Ordering::SeqCst);
    }

    /// The next `count` connections are closed without an answer once a request
    /// arrived on them, as a crashed or overloaded front end would.
    pub fn drop_connections(&self, count: u32) {
        self.inner
            .dropping_connections
            .store(count, Ordering::SeqCst);
    }

    /// From now on, every message whose body contains `fragment` (a tenancy id, say) is
    /// answered with `answer`, until [`QstashStandIn::accept_all`].
    pub fn answer_messages(&self, fragment: &str, answer: MessageAnswer) {
        self.inner
            .answers
            .lock()
            .unwrap()
            .push((fragment.to_owned(), answer));
    }

    /// Every message is accepted again.
    pub fn accept_all(&self) {
        self.inner.answers.lock().unwrap().clear();
    }

    /// Every message accepted so far, as published.
    pub fn published(&self) -> Vec<Value> {
        self.inner.published.lock().unwrap().clone()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.deliveries.lock().unwrap().clone()
    }
}

/// Accepts connections for the server, except the ones it is told to hang up on: those
/// are read until a request arrived and then closed.
struct HangingUp {
    listener: tokio::net::TcpListener,
    remaining: Arc<AtomicU32>,
}

impl axum::serve::Listener for HangingUp {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((mut stream, address)) = self.listener.accept().await else {
                continue;
            };
            let hang_up = self
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            if !hang_up {
                return (stream, address);
            }
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                // Dropped here: closed without a byte of answer.
            });
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value == format!("Bearer {TOKEN}"))
}

fn refusal(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    if !authorized(headers) {
        let body = Json(json!({ "error": "Unauthorized" }));
        return Some((StatusCode::UNAUTHORIZED, body).into_response());
    }
    let failing =
        inner
            .failing_publishes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            });
    if failing.is_ok() {
        let body = Json(json!({ "error": "internal server error" }));
        return Some((StatusCode::INTERNAL_SERVER_ERROR, body).into_response());
    }
    None
}

async fn batch(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refusal) = refusal(&inner, &headers) {
        return refusal;
    }
    let Ok(messages) = serde_json::from_slice::<Vec<BatchMessage>>(&body) else {
        let body = Json(json!({ "error": "invalid request body" }));
        return (StatusCode::BAD_REQUEST, body).into_response();
    };
    let answers: Vec<Value> = messages
        .into_iter()
        .map(|message| accept(&inner, message))
        .collect();
    Json(answers).into_response()
}

async fn publish(
    State(inner): State<Arc<Inner>>,
    Path(destination): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = refusal(&inner, &headers) {
        return refusal;
    }
    let upstash_headers = headers
        .iter()
        .filter(|(name, _)| {
            name.as_str().starts_with("upstash-") || name.as_str() == "content-type"
        })
        .map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap_or_default())))
        .collect();
    let message = BatchMessage {
        destination,
        headers: upstash_headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let answer = accept(&inner, message);
    let status = if answer.get("error").is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::CREATED
    };
    (status, Json(answer)).into_response()
}

/// Validates one message and answers it: as a test asked, or by accepting it.
fn accept(inner: &Arc<Inner>, message: BatchMessage) -> Value {
    let Ok(destination) = url::Url::parse(&message.destination) else {
        return json!({ "error": "invalid destination url" });
    };
    if !matches!(destination.scheme(), "http" | "https") {
        return json!({ "error": "invalid destination url" });
    }
    let answer = inner
        .answers
        .lock()
        .unwrap()
        .iter()
        .find(|(fragment, _)| message.body.contains(fragment.as_str()))
        .map(|(_, answer)| answer.clone());
    match answer {
        None => json!({ "messageId": enqueue(inner, &message) }),
        Some(MessageAnswer::Refused(reason)) => json!({ "error": reason }),
        Some(MessageAnswer::UrlGroup(endpoints)) => endpoints
            .into_iter()
            .map(|refusal| match refusal {
                None => json!({
                    "messageId": enqueue(inner, &message),
                    "url": message.destination,
                }),
                Some(reason) => json!({ "error": reason }),
            })
            .collect(),
    }
}

/// Records an accepted message and starts delivering it; returns its id.
fn enqueue(inner: &Arc<Inner>, message: &BatchMessage) -> String {
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.as_str())
            .map(str::to_owned)
    };
    let retries: u32 = header("Upstash-Retries")
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let message_id = format!("msg_{}", Uuid::new_v4().simple());
    inner.published.lock().unwrap().push(json!({
        "messageId": message_id,
        "destination": message.destination,
        "headers": message.headers,
        "body": message.body,
    }));
    let content_type = header("Content-Type").unwrap_or_else(|| "text/plain".to_owned());
    let copies = if inner.deliver_twice.load(Ordering::SeqCst) {
        2
    } else {
        1
    };
    for copy in 0..copies {
        tokio::spawn(deliver(
            inner.clone(),
            copy,
            message_id.clone(),
            message.destination.clone(),
            message.body.clone(),
            content_type.clone(),
            retries,
        ));
    }
    message_id
}

/// Delivers until a 2xx answer, a non-retryable 489, or the retries are spent.
async fn deliver(
    inner: Arc<Inner>,
    copy: usize,
    message_id: String,
    destination: String,
    body: String,
    content_type: String,
    retries: u32,
) {
    let parsed = url::Url::parse(&destination).expect("checked when accepted");
    let bases = inner.deliver_to.lock().unwrap().clone();
    let target = if bases.is_empty() {
        destination.clone()
    } else {
        format!(
            "{}{}",
            bases[copy % bases.len()],
            &destination[parsed.origin().ascii_serialization().len()..]
        )
    };
    for retried in 0..=retries {
        let signature = sign(&claims(&destination, body.as_bytes()), &inner.signing_key);
        let answer = inner
            .client
            .post(&target)
            .header("content-type", &content_type)
            .header("user-agent", "Upstash-QStash")
            .header("upstash-signature", signature)
            .header("upstash-message-id", &message_id)
            .header("upstash-retried", retried.to_string())
            .body(body.clone())
            .send()
            .await;
        let (status, non_retryable) = match &answer {
            Ok(response) => (
                response.status().as_u16(),
                response
                    .headers()
                    .get("upstash-nonretryable-error")
                    .is_some_and(|value| value == "true"),
            ),
            Err(_) => (0, false),
        };
        inner.deliveries.lock().unwrap().push(Delivery {
            message_id: message_id.clone(),
            destination: destination.clone(),
            retried,
            status,
        });
        if (200..300).contains(&status) || (status == 489 && non_retryable) {
            return;
        }
        // QStash backs off in seconds; a test cannot wait that long.
        tokio::time::sleep(Duration::from_millis(20 << retried.min(6))).await;
    }
}
