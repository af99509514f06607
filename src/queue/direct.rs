//! `SYNC_QUEUE=direct`: a published request is a sync run right here, in-process. No
//! HTTP hop and no outside service; the poller waits for the runs it started.

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use uuid::Uuid;

use super::{tenancy_of, PublishError};
use crate::db::queue::ClaimedRequest;
use crate::error::error_chain;
use crate::sync::{sync_tenancy, SyncEngine, TenancySync};

pub struct DirectPublisher {
    engine: Arc<SyncEngine>,
    /// Tenancies synced at the same time.
    concurrency: usize,
}

impl DirectPublisher {
    pub fn new(engine: Arc<SyncEngine>, concurrency: usize) -> Self {
        Self {
            engine,
            concurrency: concurrency.max(1),
        }
    }

    /// Syncs each request's tenancy. A sync counts as published unless a database
    /// failed in a way a retry can fix: then the request goes back to the queue, as a
    /// 5xx answer would make QStash retry.
    pub async fn publish(&self, requests: &[ClaimedRequest]) -> Vec<Result<(), PublishError>> {
        // Owned items: a stream of futures that borrow their items trips the compiler's
        // `Send` inference for the handlers that await it.
        let tenancies: Vec<Result<Uuid, PublishError>> = requests.iter().map(tenancy_of).collect();
        stream::iter(tenancies)
            .map(|tenancy| self.sync(tenancy))
            .buffered(self.concurrency)
            .collect()
            .await
    }

    async fn sync(&self, tenancy: Result<Uuid, PublishError>) -> Result<(), PublishError> {
        let tenancy_id = tenancy?;
        match sync_tenancy(&self.engine, tenancy_id).await {
            Ok(TenancySync::Synced(report)) if report.has_retryable_failure() => {
                let failed: Vec<&str> = report
                    .databases
                    .iter()
                    .filter(
                        |database| matches!(&database.result, Err(error) if error.is_retryable()),
                    )
                    .map(|database| database.database_id.as_str())
                    .collect();
                Err(PublishError(format!(
                    "sync of tenancy {tenancy_id} failed for database(s) {} (see \"ExternalDbSyncStatus\")",
                    failed.join(", ")
                )))
            }
            Ok(_) => Ok(()),
            Err(error) => Err(PublishError(format!(
                "sync of tenancy {tenancy_id}: {}",
                error_chain(&error)
            ))),
        }
    }
}
