//! Publishing claimed sync requests (DESIGN.md §5): in-process ([`direct`], the default)
//! or through Upstash QStash ([`qstash`]), which calls `/sync-engine` back.
//!
//! A publisher reports one result per request, so the poller deletes exactly the ones
//! that went out and gives the others back to the queue with backoff.

pub mod direct;
pub mod qstash;

use uuid::Uuid;

use crate::db::queue::ClaimedRequest;

/// Why one request was not published. The message is recorded in
/// `"OutgoingRequest"."lastError"`, so it never contains secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PublishError(pub String);

/// Where claimed requests go. The poller drives the two differently: a direct publish
/// is a whole sync, run in its own task; a QStash publish is one HTTP call per batch.
pub enum Publisher {
    Direct(direct::DirectPublisher),
    Qstash(qstash::QstashPublisher),
}

/// The tenancy a request is for, from its `qstashOptions.body`.
fn tenancy_of(request: &ClaimedRequest) -> Result<Uuid, PublishError> {
    request.qstash_options["body"]["tenancyId"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            PublishError("the request's body has no tenancyId that is a uuid".to_owned())
        })
}
