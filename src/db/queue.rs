//! The queue of sync requests (`"OutgoingRequest"`): what a request says, queueing one,
//! and the poller's claim, completion and release.
//!
//! A request's `"qstashOptions"` is its message: `{"url": <path>, "body": {"tenancyId":
//! <uuid>}}`, where the path is [`SYNC_ENGINE_PATH`]. The queue owns that shape: the
//! sequencer and the sync engine queue requests through this module, publishers read
//! them through [`ClaimedRequest`], and the HTTP layer serves the path.

use std::sync::LazyLock;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::sync_status::{
    not_due_databases, pruned_through_columns, reserve_due_databases, statuses_failing,
    DatabaseStates, SuccessColumns, SyncedTenancy, CLEAR_CONFIGURATION_PROBLEM, RECORD_SUCCESSES,
    SYNCED,
};

/// Where a sync request is delivered: QStash calls `PUBLIC_URL` followed by this path
/// (the `/sync-engine` webhook), and a signature's `sub` claim names it.
pub const SYNC_ENGINE_PATH: &str = "/api/latest/internal/external-db-sync/sync-engine";

/// Prefix of the deduplication key of a tenancy's sync request; the key is this
/// followed by the tenancy id, so a tenancy has at most one pending request.
pub const SYNC_REQUEST_KEY_PREFIX: &str = "external-db-sync:";

/// Queues a sync of `tenancy_id` unless one is already pending. Returns whether a new
/// request was queued. A pending request that is relied on instead stays locked until
/// the caller's transaction ends, so no poller consumes it before the caller's changes
/// are visible (see [`super::sequencing::sequence_batch`]).
pub async fn enqueue_sync(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        r#"
        insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
        values (
            $1::text || $2::text,
            jsonb_build_object('url', $3::text, 'body', jsonb_build_object('tenancyId', $2)))
        on conflict ("deduplicationKey") where "startedFulfillingAt" is null
            do update set "attempts" = "OutgoingRequest"."attempts" where false
        "#,
    )
    .bind(SYNC_REQUEST_KEY_PREFIX)
    .bind(tenancy_id)
    .bind(SYNC_ENGINE_PATH)
    .execute(executor)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// A request the poller claimed: it holds the lease until it completes or releases it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRequest {
    pub id: Uuid,
    #[sqlx(rename = "deduplicationKey")]
    pub deduplication_key: String,
    /// `{"url": <path>, "body": {...}}`: where and what to publish.
    #[sqlx(rename = "qstashOptions")]
    pub qstash_options: serde_json::Value,
    /// Publish attempts so far, this one included.
    pub attempts: i32,
    /// The claim's timestamp, moved on each time the lease is renewed ([`renew`]): the
    /// lease, and the token that proves it is still ours.
    #[sqlx(rename = "startedFulfillingAt")]
    pub claimed_at: chrono::NaiveDateTime,
    /// Seconds from the request being queued to this claim, on the internal database's
    /// clock.
    #[sqlx(rename = "queuedSeconds")]
    pub queued_seconds: f64,
    /// The tenancy's `config.dbSync.externalDatabases` as of the claim (JSON `null`
    /// when absent), or `None` when the body names no existing tenancy in the canonical
    /// spelling. Read by the claim itself, so that a sync started right after it need
    /// not read it again.
    #[sqlx(rename = "externalDatabases")]
    pub external_databases: Option<serde_json::Value>,
    /// The highest sequence id among the tenancy's user changes (live users and their
    /// tombstones), read after the request was locked, so it covers every sequencer
    /// batch that relied on this request; `None` when there is none.
    #[sqlx(rename = "latestUserChange")]
    pub latest_user_change: Option<i64>,
    /// The same for contact channels.
    #[sqlx(rename = "latestChannelChange")]
    pub latest_channel_change: Option<i64>,
    /// Which databases to leave alone and how far tombstones are pruned, as of the
    /// claim (which reserved the due failing databases for this request).
    #[sqlx(flatten)]
    pub databases: DatabaseStates,
    /// Whether, as the claim found the queue, a due request waited behind its
    /// tenancy's request in flight (the same in every request of one claim): whoever
    /// holds that one should look again when it ends.
    #[sqlx(rename = "heldBack")]
    pub held_back: bool,
    /// Whether, as of the claim, the tenancy had a status that a success changes (a
    /// database failing or waiting for its next attempt): this sync's successes are then
    /// written at once, not lazily ([`crate::lazy_statuses`]).
    #[sqlx(rename = "statusesFailing")]
    pub statuses_failing: bool,
}

/// A request whose message is not one this service queues (edited by hand, or written
/// by another release). The message is recorded as the request's last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedRequest(&'static str);

impl ClaimedRequest {
    /// The tenancy the request is for, from its body.
    pub fn tenancy_id(&self) -> Result<Uuid, MalformedRequest> {
        self.qstash_options["body"]["tenancyId"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .ok_or(MalformedRequest(
                "the request's body has no tenancyId that is a uuid",
            ))
    }

    /// The path the request is delivered to (under `PUBLIC_URL`).
    pub fn path(&self) -> Result<&str, MalformedRequest> {
        self.qstash_options["url"]
            .as_str()
            .filter(|path| path.starts_with('/'))
            .ok_or(MalformedRequest("the request has no url path"))
    }

    /// The body to deliver, as JSON text.
    pub fn body(&self) -> String {
        self.qstash_options["body"].to_string()
    }
}

/// Who claims requests, which decides whether the claim reserves failing databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimant {
    /// Syncs each claimed tenancy itself, in this process (`direct` mode).
    Syncer,
    /// Hands the requests on (to QStash); their syncs run when they are delivered.
    Publisher,
}

/// Whether the fusebox has the poller switched on (it is until first written).
const POLLER_ENABLED: &str =
    r#"coalesce((select "pollerEnabled" from "ExternalDbSyncMetadata"), true)"#;

/// The request in flight for the key of the row aliased `request`, if any: claimed, and
/// its lease (`lease`, a parameter in seconds) not run out. A pending request waits while
/// there is one ([`claim`]).
fn flight_of_request(lease: &str) -> String {
    format!(
        r#"select from "OutgoingRequest" as flight
           where flight."deduplicationKey" = request."deduplicationKey"
             and {in_flight}"#,
        in_flight = lease_running("flight", lease),
    )
}

/// Whether the request aliased `request` is in flight: claimed, and its lease (`lease`,
/// a parameter in seconds) not run out.
fn lease_running(request: &str, lease: &str) -> String {
    format!(
        r#"{request}."startedFulfillingAt"
                 >= current_timestamp - make_interval(secs => {lease})"#
    )
}

/// Whether the key of the row aliased `request` is among the claim's `in_flight` keys.
const KEY_IN_FLIGHT: &str =
    r#"select from in_flight where in_flight."deduplicationKey" = request."deduplicationKey""#;

/// Whether a due request waits because its tenancy has a request in flight, found by
/// `in_flight` over the row aliased `request` (a [`flight_of_request`], or a look-up of
/// keys read once). As of the statement's snapshot: in a claim, the requests it claims
/// are not yet in flight.
fn held_back(in_flight: &str) -> String {
    format!(
        r#"exists (
               select from "OutgoingRequest" as request
               where "startedFulfillingAt" is null
                 and "nextAttemptAt" <= current_timestamp::timestamp(3)
                 and exists ({in_flight}))"#
    )
}

/// Text that PostgreSQL always accepts as a `uuid`.
const UUID_PATTERN: &str = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// Claims up to `limit` requests that are due: pending ones whose `"nextAttemptAt"` has
/// come, and in-flight ones whose lease was neither taken nor renewed ([`renew`]) for
/// `lease` (their poller died).
/// Claims nothing while the fusebox has the poller switched off.
/// Rows another poller is claiming right now are skipped, not waited for. Expired
/// claims come first (they have waited longest), then pending requests by
/// `"nextAttemptAt"`, each kind found by one read that stops at the limit.
///
/// The statement reads the queue a fixed number of times, however many requests it
/// looks at: the keys in flight once, and each claimed message with its row. Read per
/// request instead, its reads were sequential scans whenever the planner took the queue
/// for small, each over every page the queue's churn leaves until autovacuum (a claim of
/// four requests read about twelve times the queue under `cost`).
///
/// A claimed request no longer counts as pending, so a change that lands while it is in
/// flight queues a new request: no wake-up is lost. That new request waits until the
/// one in flight is settled: a second sync of the same tenancy meanwhile would only
/// queue behind the first one's locks and hold a sync slot doing nothing.
///
/// When the claimer syncs the claimed tenancies itself ([`Claimant::Syncer`]), the claim
/// reserves their failing databases that are due for those syncs; when it hands the
/// requests on ([`Claimant::Publisher`]), it reserves nothing: the sync that a delivery
/// runs later reserves what is due then, and a reservation made here would keep it from
/// attempting those databases.
///
/// Most of its length is the one statement's text, kept whole so that it reads as SQL.
pub async fn claim(
    executor: impl PgExecutor<'_>,
    limit: u32,
    lease: std::time::Duration,
    claimant: Claimant,
) -> Result<Vec<ClaimedRequest>, sqlx::Error> {
    claim_completing(executor, limit, lease, claimant, &[]).await
}

/// [`claim`], which first deletes the requests `completed` (published, their syncs
/// ended, their statuses written or kept for later: see [`crate::completions`]) in the
/// same statement: the claim no longer counts them in flight, so it may claim the
/// requests they held back, and they cost no statement of their own.
pub async fn claim_completing(
    executor: impl PgExecutor<'_>,
    limit: u32,
    lease: std::time::Duration,
    claimant: Claimant,
    completed: &[Uuid],
) -> Result<Vec<ClaimedRequest>, sqlx::Error> {
    static CLAIM: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
        with completed as (
            -- Read only when there are some (the test is a one-time filter): a claim
            -- that carries none reads the queue no more than before.
            {completed} and $6 > 0
        ), switched_on as (
            select {POLLER_ENABLED} as "on"
        ), in_flight as (
            -- The keys of the requests in flight, read once (for the pending requests,
            -- then for "heldBack"), not once for each pending request looked at. The
            -- statement's snapshot still has the completed ones: they are left out.
            select "deduplicationKey" from "OutgoingRequest" as flight
            where {lease_running}
              and flight."id" <> all ($5::uuid[])
        ), expired as (
            select "id", "qstashOptions" from "OutgoingRequest"
            where "startedFulfillingAt" < current_timestamp - make_interval(secs => $2)
              and "id" <> all ($5::uuid[])
              and (select "on" from switched_on)
            order by "startedFulfillingAt"
            limit $1
            for update skip locked
        ), pending as (
            select "id", "qstashOptions" from "OutgoingRequest" as request
            -- At the column's precision: a row made due "now" is rounded to the
            -- millisecond, up to half of one later than now.
            where "startedFulfillingAt" is null
              and "nextAttemptAt" <= current_timestamp::timestamp(3)
              and (select "on" from switched_on)
              and not exists ({key_in_flight})
            order by "nextAttemptAt"
            limit $1
            for update skip locked
        ), due as (
            -- Only a well-formed tenancy id is cast: a malformed body must fail its
            -- own publish, never the claim of every request. The message comes with
            -- the claimed row, not from a second read of the queue for each one.
            select claimable."id", case
                when claimable."qstashOptions" #>> '{{body,tenancyId}}' ~* $3
                then (claimable."qstashOptions" #>> '{{body,tenancyId}}')::uuid
            end as tenancy_id
            from (select "id", "qstashOptions" from expired
                  union all
                  select "id", "qstashOptions" from pending
                  limit $1) as claimable
        ), {reserved}
        update "OutgoingRequest" as request
        set "startedFulfillingAt" = clock_timestamp(), "attempts" = request."attempts" + 1
        from due
        where request."id" = due."id"
        returning request."id", request."deduplicationKey", request."qstashOptions",
                  request."attempts", request."startedFulfillingAt",
                  extract(epoch from (request."startedFulfillingAt" - request."createdAt"))
                      ::float8 as "queuedSeconds",
                  (select coalesce(tenancy."config" -> 'dbSync' -> 'externalDatabases',
                                   'null'::jsonb)
                   from "Tenancy" as tenancy
                   where tenancy."id" = due.tenancy_id) as "externalDatabases",
                  -- Each mapping's latest change (live rows and tombstones), read by a
                  -- volatile function, so from a snapshot taken after this request was
                  -- locked (migration 9): the statement's own snapshot predates the
                  -- lock, and would miss a sequencer batch that relied on the request
                  -- and committed in between.
                  external_db_sync_latest_change(due.tenancy_id, 'ProjectUser')
                      as "latestUserChange",
                  external_db_sync_latest_change(due.tenancy_id, 'ContactChannel')
                      as "latestChannelChange",
                  {} as "notDueDatabases",
                  {pruned},
                  {held_back} as "heldBack",
                  {failing} as "statusesFailing"
        "#,
            not_due_databases(
                "due.tenancy_id",
                r#"request."id" = (select first."id" from due as first
                                   where first.tenancy_id = due.tenancy_id
                                   order by first."id" limit 1)"#
            ),
            pruned = pruned_through_columns("due.tenancy_id"),
            lease_running = lease_running("flight", "$2"),
            key_in_flight = KEY_IN_FLIGHT,
            held_back = held_back(KEY_IN_FLIGHT),
            failing = statuses_failing("due.tenancy_id"),
            reserved = reserve_due_databases(
                "(select tenancy_id as tenancy from due where $4) as claimed"
            ),
            completed = requests_deleted("$5", "$6"),
        )
    });
    sqlx::query_as(&CLAIM)
        .bind(i64::from(limit))
        .bind(lease.as_secs_f64())
        .bind(UUID_PATTERN)
        .bind(claimant == Claimant::Syncer)
        .bind(completed)
        .bind(completed.len() as i64)
        .fetch_all(executor)
        .await
}

/// Renews the leases of requests a poller still holds, each named by its id and its
/// claim's token (`"startedFulfillingAt"`, [`ClaimedRequest::claimed_at`]). A request
/// whose token is unchanged gets a fresh `"startedFulfillingAt"`, answered as its new
/// token; one missing from the answer was taken over or settled meanwhile, and is no
/// longer the caller's.
pub async fn renew(
    executor: impl PgExecutor<'_>,
    held: &[(Uuid, chrono::NaiveDateTime)],
) -> Result<Vec<(Uuid, chrono::NaiveDateTime)>, sqlx::Error> {
    let (ids, tokens): (Vec<Uuid>, Vec<chrono::NaiveDateTime>) = held.iter().copied().unzip();
    sqlx::query_as(
        r#"
        update "OutgoingRequest" as request
        set "startedFulfillingAt" = clock_timestamp()
        from unnest($1::uuid[], $2::timestamp[]) as held("id", "token")
        where request."id" = held."id" and request."startedFulfillingAt" = held."token"
        returning request."id", request."startedFulfillingAt"
        "#,
    )
    .bind(ids)
    .bind(tokens)
    .fetch_all(executor)
    .await
}

/// What a poller that claimed nothing learns in one round trip after its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterEmptyClaim {
    /// The fusebox has the poller switched on.
    pub enabled: bool,
    /// How long until the earliest pending request that is not due yet comes due (a
    /// retry, or a request given back with backoff).
    pub next_due_in: Option<std::time::Duration>,
    /// A due request waits because its tenancy has a request in flight (claimed, its
    /// lease not run out): whoever holds that one should look again when it ends.
    pub held_back: bool,
    /// A due pending request that nothing holds back is there, though the claim took
    /// none: the claim skipped it while another transaction held it locked, or its
    /// tenancy's request in flight was settled after the claim's snapshot, and that
    /// settle's end may have come before anyone asked for it. Either way no wake-up
    /// is promised for it, so the caller looks again soon.
    pub claimable: bool,
}

/// What a poller that claimed nothing needs to know, read in one statement: see
/// [`AfterEmptyClaim`]. `lease` is the claim's (a claim older than it holds nothing
/// back). Its snapshot is later than the claim's.
///
/// With the poller switched off only the fusebox is read (the rest is then of no use):
/// a switched-off poller still claims at each queue notification, to notice being
/// switched on, and after each of those empty claims the queue's three reads cost the
/// internal database about 0.4 ms (measured with `cost`'s floor mode), on a primary that
/// an operator may have switched the poller off to relieve.
pub async fn after_empty_claim(
    executor: impl PgExecutor<'_>,
    lease: std::time::Duration,
) -> Result<AfterEmptyClaim, sqlx::Error> {
    // Each read is a subquery of its own under the switch (an init plan, run only when
    // its branch needs it).
    static AFTER_EMPTY_CLAIM: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
        select switch."on",
               case when switch."on" then
                   (select extract(epoch from (min("nextAttemptAt") - current_timestamp))::float8
                    from "OutgoingRequest"
                    where "startedFulfillingAt" is null
                      and "nextAttemptAt" > current_timestamp::timestamp(3))
               end,
               case when switch."on" then {held_back} else false end,
               case when switch."on" then
                   exists (select from "OutgoingRequest" as request
                           where "startedFulfillingAt" is null
                             and "nextAttemptAt" <= current_timestamp::timestamp(3)
                             and not exists ({in_flight}))
                   else false
               end
        from (select {POLLER_ENABLED} as "on") as switch
        "#,
            held_back = held_back(&flight_of_request("$1")),
            in_flight = flight_of_request("$1"),
        )
    });
    let (enabled, seconds, held_back, claimable): (bool, Option<f64>, bool, bool) =
        sqlx::query_as(&AFTER_EMPTY_CLAIM)
            .bind(lease.as_secs_f64())
            .fetch_one(executor)
            .await?;
    let next_due_in = seconds.map(|seconds| std::time::Duration::from_secs_f64(seconds.max(0.0)));
    Ok(AfterEmptyClaim {
        enabled,
        next_due_in,
        held_back,
        claimable,
    })
}

/// Deletes a request whose publish succeeded. The statuses of the databases a direct
/// sync brought up to date, if any, are recorded in the same statement: one round trip
/// and one commit for both.
pub async fn complete(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    synced: Option<&SyncedTenancy>,
) -> Result<(), sqlx::Error> {
    complete_many(executor, &[Completed { id, synced }]).await
}

/// A request whose publish succeeded, with the statuses its direct sync is to record.
#[derive(Debug, Clone, Copy)]
pub struct Completed<'a> {
    pub id: Uuid,
    pub synced: Option<&'a SyncedTenancy>,
}

/// Deletes the requests whose ids are the array `ids`, of `count` elements: a parameter
/// bound to the array's length, which changes no answer and is there for the plan cache
/// (see [`SYNCED`]).
fn requests_deleted(ids: &str, count: &str) -> String {
    format!(
        r#"delete from "OutgoingRequest"
           where "id" in (select * from unnest({ids}::uuid[]) limit {count})"#
    )
}

/// [`complete`] for several requests in one statement: each deleted, and the statuses of
/// every database their syncs brought up to date recorded.
pub async fn complete_many(
    executor: impl PgExecutor<'_>,
    completed: &[Completed<'_>],
) -> Result<(), sqlx::Error> {
    static RECORD_AND_DELETE: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"with synced as ({SYNCED}), cleared as ({CLEAR_CONFIGURATION_PROBLEM}),
                 recorded as ({RECORD_SUCCESSES})
            {}"#,
            requests_deleted("$7", "$8")
        )
    });
    let ids: Vec<Uuid> = completed.iter().map(|completed| completed.id).collect();
    let count = ids.len() as i64;
    let mut successes = SuccessColumns::default();
    for synced in completed.iter().filter_map(|completed| completed.synced) {
        successes.add(synced);
    }
    if successes.is_empty() {
        static DELETE: LazyLock<String> = LazyLock::new(|| requests_deleted("$1", "$2"));
        sqlx::query(&DELETE)
            .bind(ids)
            .bind(count)
            .execute(executor)
            .await?;
    } else {
        successes
            .bind(sqlx::query(&RECORD_AND_DELETE))
            .bind(ids)
            .bind(count)
            .execute(executor)
            .await?;
    }
    Ok(())
}

/// Gives a request whose publish failed back to the queue, due again after `retry_in`,
/// with the error recorded. If a newer pending request for the same key exists (a
/// change landed meanwhile), the two are merged into that one, which keeps the attempt
/// count and the error. Does nothing if the lease was lost to another poller.
pub async fn release(
    pool: &sqlx::PgPool,
    request: &ClaimedRequest,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<(), sqlx::Error> {
    // A new pending row can appear between the check and the update; the unique index
    // then refuses the update, and the second attempt merges.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_release(pool, request, error, retry_in).await {
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() && attempt < 3 => continue,
            other => return other,
        }
    }
}

async fn try_release(
    pool: &sqlx::PgPool,
    request: &ClaimedRequest,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        with ours as (
            select "id", "deduplicationKey", "attempts" from "OutgoingRequest"
            where "id" = $1 and "startedFulfillingAt" = $2
            for update
        ), merged as (
            update "OutgoingRequest" as pending
            set "attempts" = greatest(pending."attempts", ours."attempts"), "lastError" = $3
            from ours
            where pending."deduplicationKey" = ours."deduplicationKey"
              and pending."startedFulfillingAt" is null
            returning pending."id"
        ), dropped as (
            delete from "OutgoingRequest" as request
            using ours
            where request."id" = ours."id" and exists (select 1 from merged)
        )
        update "OutgoingRequest" as request
        set "startedFulfillingAt" = null,
            "nextAttemptAt" = current_timestamp + make_interval(secs => $4),
            "lastError" = $3
        from ours
        where request."id" = ours."id" and not exists (select 1 from merged)
        "#,
    )
    .bind(request.id)
    .bind(request.claimed_at)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}
