//! `SYNC_QUEUE=direct`: a published request is a sync run right here, in-process. No
//! HTTP hop and no outside service. One request per publish, so that each settles the
//! moment its sync ends, whatever the others do.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{FailureReason, PublishError, PublishResult, Published, Publisher};
use crate::db::queue::{Claimant, ClaimedRequest};
use crate::error::error_chain;
use crate::sync::{sync_claimed_tenancy, sync_tenancy, ClaimedTenancy, SyncEngine, TenancySync};

pub struct DirectPublisher {
    engine: Arc<SyncEngine>,
}

impl DirectPublisher {
    pub fn new(engine: Arc<SyncEngine>) -> Self {
        Self { engine }
    }

    /// Syncs the request's tenancy, with what its claim read. A sync counts as
    /// published even if some of its databases failed: each failure is recorded with
    /// the database's next attempt, and a retry request is queued for then (see
    /// [`crate::db::sync_status::schedule_retry`]). Only a failure to read the internal
    /// database sends the request back to the queue. How many run at once is the
    /// poller's business.
    ///
    /// On success, the statuses of the databases synced are returned, not yet
    /// recorded: the poller records them with the request's completion.
    async fn sync(&self, request: &ClaimedRequest) -> PublishResult {
        let tenancy_id = request.tenancy_id()?;
        let synced = match &request.external_databases {
            Some(config) => {
                let claimed = ClaimedTenancy {
                    external_databases: Some(config.clone()),
                    latest_changes: [request.latest_user_change, request.latest_channel_change],
                    databases: request.databases.clone(),
                };
                sync_claimed_tenancy(&self.engine, tenancy_id, claimed).await
            }
            // The claim reads the tenancy only for an id in the canonical spelling; for
            // any other (or a tenancy that is gone), look the parsed id up.
            None => sync_tenancy(&self.engine, tenancy_id).await,
        };
        match synced {
            Ok(TenancySync::Synced(report)) => Ok(Published {
                queued_retry: report.queues_retry(),
                synced: report.unrecorded,
            }),
            Ok(_) => Ok(Published::default()),
            Err(error) => Err(PublishError::new(
                FailureReason::InternalDatabase,
                format!("sync of tenancy {tenancy_id}: {}", error_chain(&error)),
            )),
        }
    }
}

impl Publisher for DirectPublisher {
    fn batch_limit(&self) -> usize {
        1
    }

    fn claimant(&self) -> Claimant {
        Claimant::Syncer
    }

    fn publish<'a>(&'a self, requests: &'a [ClaimedRequest]) -> BoxFuture<'a, Vec<PublishResult>> {
        async move {
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(self.sync(request).await);
            }
            results
        }
        .boxed()
    }
}
