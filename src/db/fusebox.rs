//! The fusebox: the singleton `"ExternalDbSyncMetadata"` row that switches the sequencer
//! and the poller on or off for every replica at once.

use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;

use super::{CHANGES_CHANNEL, REQUESTS_CHANNEL};

/// The two switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Fusebox {
    #[sqlx(rename = "sequencerEnabled")]
    pub sequencer_enabled: bool,
    #[sqlx(rename = "pollerEnabled")]
    pub poller_enabled: bool,
}

/// Reads the switches. A missing row (deleted by hand) reads as both switched on, the
/// state the migration creates.
pub async fn read(executor: impl PgExecutor<'_>) -> Result<Fusebox, sqlx::Error> {
    let row = sqlx::query_as::<_, Fusebox>(
        r#"select "sequencerEnabled", "pollerEnabled" from "ExternalDbSyncMetadata""#,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.unwrap_or(Fusebox {
        sequencer_enabled: true,
        poller_enabled: true,
    }))
}

/// Sets the switches that are given and leaves the others; returns the new state. Each
/// loop that is switched on is woken (at commit), rather than at its next timer: a
/// sleeping loop hears of no change made while it was off.
pub async fn write(
    executor: impl PgExecutor<'_>,
    sequencer_enabled: Option<bool>,
    poller_enabled: Option<bool>,
) -> Result<Fusebox, sqlx::Error> {
    sqlx::query_as::<_, Fusebox>(
        r#"
        with written as (
            insert into "ExternalDbSyncMetadata" ("singleton", "sequencerEnabled", "pollerEnabled")
            values (true, coalesce($1, true), coalesce($2, true))
            on conflict ("singleton") do update set
                "sequencerEnabled" = coalesce($1, "ExternalDbSyncMetadata"."sequencerEnabled"),
                "pollerEnabled" = coalesce($2, "ExternalDbSyncMetadata"."pollerEnabled"),
                "updatedAt" = current_timestamp
            returning "sequencerEnabled", "pollerEnabled"
        ), woken as (
            select pg_notify(wake.channel, '')
            from written, lateral (values
                ($3, "sequencerEnabled"), ($4, "pollerEnabled")) as wake (channel, enabled)
            where wake.enabled
        )
        select "sequencerEnabled", "pollerEnabled", (select count(*) from woken) as woken
        from written
        "#,
    )
    .bind(sequencer_enabled)
    .bind(poller_enabled)
    .bind(CHANGES_CHANNEL)
    .bind(REQUESTS_CHANNEL)
    .fetch_one(executor)
    .await
}
