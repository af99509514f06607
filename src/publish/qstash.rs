//! `SYNC_QUEUE=qstash`: requests are published to Upstash QStash with one call to
//! `POST {QSTASH_URL}/v2/batch`; QStash then delivers each to `/sync-engine`, signed,
//! retrying failed deliveries itself.
//!
//! Each message carries a flow-control key per tenancy with `parallelism=1`, so one
//! busy tenancy cannot occupy more than one delivery slot and starve the others, and a
//! deduplication id (the request's id), so a publish that is retried after its answer
//! was lost, or taken over from a poller that died after publishing, is not delivered
//! twice. Every message of the batch answer is checked on its own.

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use url::Url;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{FailureReason, PublishError, PublishResult, Published, Publisher};
use crate::db::queue::{Claimant, ClaimedRequest};

/// How long one batch publish may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

pub struct QstashPublisher {
    client: reqwest::Client,
    batch_url: Url,
    token: SecretString,
    /// `PUBLIC_URL` without a trailing slash; request paths are appended.
    public_url: String,
    /// Delivery retries QStash makes before giving up (`Upstash-Retries`).
    retries: u32,
}

#[derive(Serialize)]
struct Message {
    destination: String,
    headers: serde_json::Map<String, Value>,
    body: String,
}

impl QstashPublisher {
    pub fn new(base_url: &Url, token: SecretString, public_url: &Url, retries: u32) -> Self {
        let batch_url = base_url
            .join("v2/batch")
            .expect("appending a relative path to an http(s) URL cannot fail");
        Self {
            client: reqwest::Client::builder()
                .timeout(PUBLISH_TIMEOUT)
                .build()
                .expect("a reqwest client with a timeout builds"),
            batch_url,
            token,
            public_url: public_url.as_str().trim_end_matches('/').to_owned(),
            retries,
        }
    }

    async fn publish_batch(&self, requests: &[ClaimedRequest]) -> Vec<Result<(), PublishError>> {
        let mut results: Vec<Result<(), PublishError>> = vec![Ok(()); requests.len()];
        let mut messages = Vec::new();
        let mut sent = Vec::new();
        for (index, request) in requests.iter().enumerate() {
            match self.message(request) {
                Ok(message) => {
                    messages.push(message);
                    sent.push(index);
                }
                Err(error) => results[index] = Err(error),
            }
        }
        if messages.is_empty() {
            return results;
        }
        match self.send(&messages).await {
            Ok(answers) if answers.len() == sent.len() => {
                for (index, answer) in sent.into_iter().zip(answers) {
                    results[index] = check_answer(&answer);
                }
            }
            Ok(answers) => {
                let error = PublishError::new(
                    FailureReason::QstashUnexpectedAnswer,
                    format!(
                        "QStash answered {} results for {} messages",
                        answers.len(),
                        sent.len()
                    ),
                );
                for index in sent {
                    results[index] = Err(error.clone());
                }
            }
            Err(error) => {
                for index in sent {
                    results[index] = Err(error.clone());
                }
            }
        }
        results
    }

    fn message(&self, request: &ClaimedRequest) -> Result<Message, PublishError> {
        let tenancy_id = request.tenancy_id()?;
        let path = request.path()?;
        let header = |value: String| Value::String(value);
        let headers = serde_json::Map::from_iter([
            (
                "Content-Type".to_owned(),
                header("application/json".to_owned()),
            ),
            (
                "Upstash-Flow-Control-Key".to_owned(),
                header(format!("external-db-sync-{tenancy_id}")),
            ),
            (
                "Upstash-Flow-Control-Value".to_owned(),
                header("parallelism=1".to_owned()),
            ),
            (
                "Upstash-Retries".to_owned(),
                header(self.retries.to_string()),
            ),
            (
                "Upstash-Deduplication-Id".to_owned(),
                header(request.id.to_string()),
            ),
        ]);
        Ok(Message {
            destination: format!("{}{path}", self.public_url),
            headers,
            body: request.body(),
        })
    }

    async fn send(&self, messages: &[Message]) -> Result<Vec<Value>, PublishError> {
        let response = self
            .client
            .post(self.batch_url.clone())
            .bearer_auth(self.token.expose_secret())
            .json(messages)
            .send()
            .await
            .map_err(|error| {
                PublishError::new(
                    FailureReason::QstashUnreachable,
                    format!("cannot reach QStash: {}", describe(error)),
                )
            })?;
        let status = response.status();
        let text = response.text().await.map_err(|error| {
            PublishError::new(
                FailureReason::QstashUnreachable,
                format!("reading QStash's answer: {}", describe(error)),
            )
        })?;
        if status != StatusCode::OK
            && status != StatusCode::CREATED
            && status != StatusCode::ACCEPTED
        {
            return Err(PublishError::new(
                FailureReason::QstashRefused,
                format!(
                    "QStash answered {status}: {}",
                    text.chars().take(200).collect::<String>()
                ),
            ));
        }
        serde_json::from_str::<Vec<Value>>(&text).map_err(|_| {
            PublishError::new(
                FailureReason::QstashUnexpectedAnswer,
                "QStash's answer is not a JSON array",
            )
        })
    }
}

impl Publisher for QstashPublisher {
    /// What the poller claims at once goes out in one call.
    fn batch_limit(&self) -> usize {
        usize::MAX
    }

    /// The sync runs when QStash delivers the message, in whichever process answers.
    fn claimant(&self) -> Claimant {
        Claimant::Publisher
    }

    fn publish<'a>(&'a self, requests: &'a [ClaimedRequest]) -> BoxFuture<'a, Vec<PublishResult>> {
        async move {
            let results = self.publish_batch(requests).await;
            results
                .into_iter()
                .map(|result| result.map(|()| Published::default()))
                .collect()
        }
        .boxed()
    }
}

/// One element of a batch answer: `{"messageId": …}` or `{"error": …}` (or, for URL
/// groups, an array of those).
fn check_answer(answer: &Value) -> Result<(), PublishError> {
    match answer {
        Value::Array(parts) => parts.iter().try_for_each(check_answer),
        Value::Object(fields) if fields.contains_key("messageId") => Ok(()),
        Value::Object(fields) => Err(PublishError::new(
            FailureReason::QstashRefused,
            format!(
                "QStash refused the message: {}",
                fields
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            ),
        )),
        _ => Err(PublishError::new(
            FailureReason::QstashUnexpectedAnswer,
            "QStash's answer has an unexpected shape",
        )),
    }
}

/// A reqwest error without the URL it names: the message goes into a database column
/// and should say what failed, briefly.
fn describe(error: reqwest::Error) -> String {
    crate::error::error_chain(&error.without_url())
}
