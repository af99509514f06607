//! The queue of sync requests (`"OutgoingRequest"`), as far as producers see it.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Prefix of the deduplication key of a tenancy's sync request; the key is this
/// followed by the tenancy id, so a tenancy has at most one pending request.
pub const SYNC_REQUEST_KEY_PREFIX: &str = "external-db-sync:";

/// Queues a sync of `tenancy_id` unless one is already pending. Returns whether a new
/// request was queued.
pub async fn enqueue_sync(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    sync_engine_path: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        r#"
        insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
        values (
            $1::text || $2::text,
            jsonb_build_object('url', $3::text, 'body', jsonb_build_object('tenancyId', $2)))
        on conflict ("deduplicationKey") where "startedFulfillingAt" is null do nothing
        "#,
    )
    .bind(SYNC_REQUEST_KEY_PREFIX)
    .bind(tenancy_id)
    .bind(sync_engine_path)
    .execute(executor)
    .await?;
    Ok(inserted.rows_affected() == 1)
}
