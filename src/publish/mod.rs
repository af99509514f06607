//! Publishing claimed sync requests (DESIGN.md §5): in-process ([`direct`], the default)
//! or through Upstash QStash ([`qstash`]), which calls `/sync-engine` back.
//!
//! The poller drives every publisher the same way, through [`Publisher`]: it takes a free
//! slot, claims up to [`Publisher::batch_limit`] requests for it, publishes them in a
//! task of their own, and settles each request by its own result: deleted when it went
//! out, given back to the queue with backoff when not.

pub mod direct;
pub mod qstash;

use futures::future::BoxFuture;

use crate::db::queue::{Claimant, ClaimedRequest, MalformedRequest};
use crate::db::sync_status::SyncedTenancy;

/// Why one request was not published. The message is recorded in
/// `"OutgoingRequest"."lastError"`, so it never contains secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    pub reason: FailureReason,
    pub message: String,
}

impl PublishError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The kind of a [`PublishError`], a label of the failed-requests metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The queued message is not a sync request this service can read.
    MalformedRequest,
    /// A direct sync could not read or write the internal database.
    InternalDatabase,
    /// QStash could not be reached, or its answer not read.
    QstashUnreachable,
    /// QStash refused the call or the message.
    QstashRefused,
    /// QStash answered something this service does not understand.
    QstashUnexpectedAnswer,
    /// The publisher gave no result for the request.
    NoResult,
    /// The process was stopping and the publish did not end within the grace period: it
    /// was dropped, and the request given back.
    Stopping,
}

impl FailureReason {
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::MalformedRequest => "malformed_request",
            FailureReason::InternalDatabase => "internal_database",
            FailureReason::QstashUnreachable => "qstash_unreachable",
            FailureReason::QstashRefused => "qstash_refused",
            FailureReason::QstashUnexpectedAnswer => "qstash_unexpected_answer",
            FailureReason::NoResult => "no_result",
            FailureReason::Stopping => "stopping",
        }
    }
}

impl From<MalformedRequest> for PublishError {
    fn from(error: MalformedRequest) -> Self {
        PublishError::new(FailureReason::MalformedRequest, error.to_string())
    }
}

/// A request that went out. A direct publish is the sync itself: it returns the
/// statuses of the databases it brought up to date, for the poller to record with the
/// request's completion (one statement for both).
#[derive(Debug, Default)]
pub struct Published {
    pub synced: Option<SyncedTenancy>,
    /// The sync queued a retry request for when a failing database comes due (or moved
    /// one earlier): the poller's loop should read when that is.
    pub queued_retry: bool,
}

/// The result of publishing one request.
pub type PublishResult = Result<Published, PublishError>;

/// Where claimed requests go.
pub trait Publisher: Send + Sync + 'static {
    /// Most requests one [`Publisher::publish`] call takes: 1 when a publish is a whole
    /// sync (so that each settles the moment it ends), a batch when it is one call.
    fn batch_limit(&self) -> usize;

    /// Who the poller claims for: the syncs themselves, run in this process (the claim
    /// then reserves the due failing databases of their tenancies), or a hand-over.
    fn claimant(&self) -> Claimant;

    /// Publishes `requests` (at most [`Publisher::batch_limit`]); one result per
    /// request, in their order.
    fn publish<'a>(&'a self, requests: &'a [ClaimedRequest]) -> BoxFuture<'a, Vec<PublishResult>>;
}
