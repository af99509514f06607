//! Reading a tenancy's changes for the sync engine, one batch at a time.
//!
//! A change is a sequence id: the current one of a live row, or that of a tombstone in
//! `"DeletedRow"`. A batch is the first `limit` changes after the watermark, in sequence
//! order, read in one statement and so from one snapshot. For every row the batch
//! touches it returns the row's *current* state: the live row if it exists now, or a
//! delete if it does not. Several changes of one row therefore collapse into one write,
//! and a row created, updated and deleted between two syncs never reaches the tenant.
//!
//! Because the sequencer commits sequence ids in order (DESIGN.md §4), every change up
//! to the batch's highest id is visible when the batch is read, so that id is a safe
//! watermark.

use std::sync::LazyLock;

use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgExecutor, Row};
use uuid::Uuid;

use crate::mapping::{Batch, Mapping, Upserts};

/// The next batch of `mapping` for `tenancy_id` after `watermark`, or `None` when
/// nothing is left.
pub async fn next_batch(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    tenancy_id: Uuid,
    watermark: i64,
    limit: u32,
) -> Result<Option<Batch>, sqlx::Error> {
    let rows = sqlx::query(batch_query(mapping))
        .bind(tenancy_id)
        .bind(watermark)
        .bind(i64::from(limit))
        .fetch_all(executor)
        .await?;
    collect_batch(mapping, &rows)
}

/// The statement [`next_batch`] runs (`$1` tenancy, `$2` watermark, `$3` limit), for
/// whoever wants to see its plan.
pub fn batch_query(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => &USERS_BATCH,
        Mapping::ContactChannels => &CONTACT_CHANNELS_BATCH,
    }
}

/// The next batch of `mapping` for each `(tenancy, watermark)` of `after`, in that
/// order, read in one statement and so from one snapshot: the same batches as
/// [`next_batch`] of each, at one round trip for all of them. `None` where nothing is
/// left. Each batch has at most `limit` changes; what the answer holds in all is their
/// sum, so the caller keeps `after` short and the batches small.
pub async fn next_batches(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    after: &[(Uuid, i64)],
    limit: u32,
) -> Result<Vec<Option<Batch>>, sqlx::Error> {
    let sql: &'static str = match mapping {
        Mapping::Users => &USERS_BATCHES,
        Mapping::ContactChannels => &CONTACT_CHANNELS_BATCHES,
    };
    let (tenancies, watermarks): (Vec<Uuid>, Vec<i64>) = after.iter().copied().unzip();
    let rows = sqlx::query(sql)
        .bind(tenancies)
        .bind(watermarks)
        .bind(i64::from(limit))
        .bind(i64::try_from(after.len()).unwrap_or(i64::MAX))
        .fetch_all(executor)
        .await?;
    let mut batches = Vec::with_capacity(after.len());
    let mut rest = rows.as_slice();
    for position in 1..=after.len() as i64 {
        let mut ends = 0;
        while let Some(row) = rest.get(ends) {
            if row.try_get::<i64, _>("batch_position")? != position {
                break;
            }
            ends += 1;
        }
        let (these, others) = rest.split_at(ends);
        rest = others;
        batches.push(collect_batch(mapping, these)?);
    }
    Ok(batches)
}

/// [`BatchQuery::sql`] for many tenancies at once: `$1` their ids, `$2` their watermarks
/// (in the same order), `$3` the limit of each batch, `$4` how many tenancies `$1` holds.
/// Each row also has `batch_position`, the 1-based position of its tenancy in `$1`;
/// rows come in that order.
///
/// `limit $4` changes no answer (it is the arrays' length); it is there for the plan
/// cache. Planned for the values bound, the statement is planned anew at every read
/// (0.43 ms here, seven times its execution): PostgreSQL keeps a plan for any values
/// only if it looks no costlier than the plans for the values, and a plan for any array
/// estimates 10 tenancies where the reads ask one to three. Under a limit it cannot
/// see, the planner estimates a tenth of the rows, so the plan for any values estimates
/// one tenancy, and the session keeps it after its first five reads.
fn batches_sql(one: &str) -> String {
    let each = one
        .replace("(select $1::uuid)", "asked.tenancy_id")
        .replace("$1", "asked.tenancy_id")
        .replace("$2", "asked.watermark");
    format!(
        r#"
select asked.position as batch_position, batch.*
from (select * from unnest($1::uuid[], $2::int8[]) with ordinality
          as asked(tenancy_id, watermark, position)
      limit $4) as asked
cross join lateral ({each}) as batch
order by asked.position"#
    )
}

static USERS_BATCHES: LazyLock<String> = LazyLock::new(|| batches_sql(&USERS_BATCH));
static CONTACT_CHANNELS_BATCHES: LazyLock<String> =
    LazyLock::new(|| batches_sql(&CONTACT_CHANNELS_BATCH));

/// [`collect`] with the row type of `mapping`.
fn collect_batch(mapping: Mapping, rows: &[PgRow]) -> Result<Option<Batch>, sqlx::Error> {
    match mapping {
        Mapping::Users => collect(rows, Upserts::Users),
        Mapping::ContactChannels => collect(rows, Upserts::ContactChannels),
    }
}

/// Turns the rows of a batch query into a [`Batch`]: each row has the bookkeeping
/// columns (`id`, `present`, and the batch's `batch_changes` and
/// `batch_last_sequence_id`) and, when `present`, the mapped columns that `R` is read
/// from.
///
/// The batch's last id is that of its last change, not the highest id among the rows
/// it writes: a tombstone of a row that exists again is not written (the live row is),
/// yet the watermark must pass it.
fn collect<R>(
    rows: &[PgRow],
    wrap: impl FnOnce(Vec<R>) -> Upserts,
) -> Result<Option<Batch>, sqlx::Error>
where
    R: for<'r> FromRow<'r, PgRow>,
{
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let changes: i64 = first.try_get("batch_changes")?;
    let last_sequence_id: i64 = first.try_get("batch_last_sequence_id")?;
    let mut upserts = Vec::with_capacity(rows.len());
    let mut deletes = Vec::new();
    for row in rows {
        if row.try_get::<bool, _>("present")? {
            upserts.push(R::from_row(row)?);
        } else {
            deletes.push(row.try_get("id")?);
        }
    }
    Ok(Some(Batch {
        upserts: wrap(upserts),
        deletes,
        changes: u64::try_from(changes).unwrap_or(0),
        last_sequence_id,
    }))
}

/// The `users` columns, computed from a `"ProjectUser"` row `u` (all but the primary
/// e-mail, which comes from a look-up). Metadata is passed on as JSON text: the engine
/// never parses row contents.
const USER_COLUMNS: &str = r#"
    u."displayName" as display_name,
    u."profileImageUrl" as profile_image_url,
    coalesce(u."signedUpAt", u."createdAt") as signed_up_at,
    coalesce(u."clientMetadata", '{}')::text as client_metadata,
    coalesce(u."clientReadOnlyMetadata", '{}')::text as client_read_only_metadata,
    coalesce(u."serverMetadata", '{}')::text as server_metadata,
    u."isAnonymous" as is_anonymous"#;

/// The `contact_channels` columns, computed from a `"ContactChannel"` row `c`.
const CHANNEL_COLUMNS: &str = r#"
    c."projectUserId" as user_id,
    c."type" as "type",
    c."value" as "value",
    coalesce(c."isPrimary", false) as is_primary,
    c."isVerified" as is_verified,
    coalesce(c."usedForAuth", false) as used_for_auth,
    c."createdAt" as created_at"#;

/// The part both batch queries share. `$1` tenancy, `$2` watermark, `$3` limit; `$T`
/// the tenancy where a single row is looked up (see [`one_tenancy`]).
///
/// - `live`: rows whose current sequence id is after the watermark, read with their
///   values in the same index scan that finds them;
/// - `tombstones`: deletions after the watermark;
/// - `cutoff`: the batch is the first `$3` changes of both, in sequence order;
/// - `touched`: each live row of the batch as it is, and each id that only has
///   tombstones in the batch, with its current row in case it was created again since.
///
/// Each branch is limited on its own before the union, so both use their index.
struct BatchQuery {
    /// The source table, also its `"DeletedRow"."tableName"`.
    table: &'static str,
    /// The alias the column expressions use for the source table.
    alias: &'static str,
    /// The source's id column, qualified by the alias.
    id_column: &'static str,
    /// The id's field in `"DeletedRow"."primaryKey"`.
    primary_key_field: &'static str,
    /// The mapped columns, computed from the aliased source row.
    columns: &'static str,
    /// Joins the current source row (aliased) to a `gone` id.
    current_row: &'static str,
    /// Whether that join found a row.
    present: &'static str,
    /// Extra output columns, then `from touched` and any joins they need.
    rest: &'static str,
}

impl BatchQuery {
    fn sql(&self) -> String {
        let BatchQuery {
            table,
            alias,
            id_column,
            primary_key_field,
            columns,
            current_row,
            present,
            rest,
        } = self;
        format!(
            r#"
with live as (
    select {id_column} as id, {alias}."sequenceId" as sequence_id, {columns}
    from "{table}" {alias}
    where {alias}."tenancyId" = $1 and {alias}."sequenceId" > $2
    order by {alias}."sequenceId"
    limit $3
), tombstones as (
    select ("primaryKey" ->> '{primary_key_field}')::uuid as id, "sequenceId" as sequence_id
    from "DeletedRow"
    where "tenancyId" = $1 and "tableName" = '{table}' and "sequenceId" > $2
    order by "sequenceId"
    limit $3
), cutoff as (
    select max(sequence_id) as last_sequence_id, count(*) as changes
    from (select sequence_id from live
          union all
          select sequence_id from tombstones
          order by sequence_id
          limit $3) as first_changes
), batch_live as (
    select * from live where sequence_id <= (select last_sequence_id from cutoff)
), touched as (
    select batch_live.*, true as present from batch_live
    union all
    select gone.id, gone.sequence_id, {columns}, {present}
    from (
        select id, max(sequence_id) as sequence_id
        from tombstones
        where sequence_id <= (select last_sequence_id from cutoff)
          and id not in (select id from batch_live)
        group by id
    ) as gone
    {current_row}
)
select
    touched.*,
    (select last_sequence_id from cutoff) as batch_last_sequence_id,
    (select changes from cutoff) as batch_changes
    {rest}
"#
        )
    }
}

/// [`BatchQuery::sql`] for the tenancy in `$1`.
///
/// The look-ups of single rows (a user's primary e-mail, the current row of a deleted
/// id) name the tenancy as `(select $1::uuid)`, a value the planner does not see, not
/// as `$1`. Right after a large import, the statistics do not know the new tenancy and
/// estimate it at a row or two; given the value, the planner then finds one index on
/// the tenancy as good as the key, and a look-up by the tenancy alone, filtered, read
/// every channel of the tenancy for every user of the batch (minutes for a batch of a
/// million-user import). Not knowing the value, it estimates an average tenancy, and
/// only the key is worth taking.
fn one_tenancy(query: BatchQuery) -> String {
    query.sql().replace("$T", "(select $1::uuid)")
}

static USERS_BATCH: LazyLock<String> = LazyLock::new(|| {
    one_tenancy(BatchQuery {
        table: "ProjectUser",
        alias: "u",
        id_column: r#"u."projectUserId""#,
        primary_key_field: "projectUserId",
        columns: USER_COLUMNS,
        current_row: r#"left join "ProjectUser" u
        on u."tenancyId" = $T and u."projectUserId" = gone.id"#,
        present: r#"u."projectUserId" is not null"#,
        rest: r#",
    email."value" as primary_email,
    coalesce(email."isVerified", false) as primary_email_verified
from touched
left join lateral (
    select c."value", c."isVerified"
    from "ContactChannel" c
    where c."tenancyId" = $T and c."projectUserId" = touched.id
      and c."type" = 'EMAIL' and c."isPrimary"
    limit 1
) as email on touched.present"#,
    })
});

static CONTACT_CHANNELS_BATCH: LazyLock<String> = LazyLock::new(|| {
    one_tenancy(BatchQuery {
        table: "ContactChannel",
        alias: "c",
        id_column: r#"c."id""#,
        primary_key_field: "id",
        columns: CHANNEL_COLUMNS,
        // Channel ids are unique in practice, though the primary key does not say so.
        current_row: r#"left join lateral (
        select * from "ContactChannel" c
        where c."tenancyId" = $T and c."id" = gone.id
        order by c."sequenceId" desc nulls last
        limit 1
    ) as c on true"#,
        present: r#"c."id" is not null"#,
        rest: "\nfrom touched",
    })
});

/// `COPY … TO STDOUT (FORMAT binary)` of [`current_rows`]. Run it after
/// [`plan_bulk_read`] in the same transaction.
///
/// `COPY` takes no parameters; the tenancy id is a [`Uuid`], formatted here, never text
/// from elsewhere.
pub fn copy_current_rows(mapping: Mapping, tenancy_id: Uuid) -> String {
    format!(
        "copy ({}) to stdout (format binary)",
        current_rows(mapping, tenancy_id)
    )
}

/// Every numbered row of `mapping` for `tenancy_id`, as it is now, in the columns and
/// types of the mapping's external table (each cast, so that the binary data fits those
/// columns whatever types the application gave its own). Rows the sequencer has not
/// numbered yet are left out: they will get a sequence id after any this statement's
/// snapshot holds.
///
/// A user's primary e-mail comes from a join with the tenancy's channels (at most one
/// primary channel per user and type: DESIGN.md §3, and the unique index of migration 1),
/// which reads the 100,000 users of a tenancy in less than half the time a look-up per
/// user takes. Right after a bulk import the planner's statistics may put the tenancy at
/// a row, and a join planned on that as a nested loop once ran for minutes: the read
/// runs after [`plan_bulk_read`].
pub fn current_rows(mapping: Mapping, tenancy_id: Uuid) -> String {
    match mapping {
        Mapping::Users => format!(
            r#"select u."projectUserId"::uuid, u."displayName"::text, u."profileImageUrl"::text,
       email."value"::text, coalesce(email."isVerified", false)::boolean,
       coalesce(u."signedUpAt", u."createdAt")::timestamp,
       coalesce(u."clientMetadata", '{{}}')::jsonb,
       coalesce(u."clientReadOnlyMetadata", '{{}}')::jsonb,
       coalesce(u."serverMetadata", '{{}}')::jsonb, u."isAnonymous"::boolean
from "ProjectUser" u
left join "ContactChannel" email
    on email."tenancyId" = '{tenancy_id}' and email."projectUserId" = u."projectUserId"
   and email."type" = 'EMAIL' and email."isPrimary"
where u."tenancyId" = '{tenancy_id}' and u."sequenceId" is not null"#
        ),
        // Channel ids are unique in practice, though the primary key does not say so;
        // two live channels with one id fail the copy as they fail a batch's upsert.
        Mapping::ContactChannels => format!(
            r#"select c."id"::uuid, c."projectUserId"::uuid, c."type"::text, c."value"::text,
       coalesce(c."isPrimary", false)::boolean, c."isVerified"::boolean,
       coalesce(c."usedForAuth", false)::boolean, c."createdAt"::timestamp
from "ContactChannel" c
where c."tenancyId" = '{tenancy_id}' and c."sequenceId" is not null"#
        ),
    }
}

/// For the rest of the current transaction, joins are planned without nested loops:
/// a read of a whole tenancy ([`current_rows`]) then joins by hash or by merge whatever
/// the statistics say, and never loops over a table once per row it was told is the
/// only one.
pub async fn plan_bulk_read(executor: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_catalog.set_config('enable_nestloop', 'off', true)")
        .execute(executor)
        .await?;
    Ok(())
}

/// The latest change of `mapping` for `tenancy_id` (a live row's or a tombstone's
/// sequence id), or `None` when it has none.
pub async fn latest_change(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    tenancy_id: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("select external_db_sync_latest_change($1, $2)")
        .bind(tenancy_id)
        .bind(mapping.source_table())
        .fetch_one(executor)
        .await
}

/// Where the batch [`next_batch`] would read (the first `limit` changes of `mapping`
/// for `tenancy_id` after `watermark`) ends: its number of changes and its last sequence
/// id, or `None` when nothing is left. Read in the same snapshot as [`copy_batch`], it
/// tells what that copy holds before its rows arrive.
pub async fn batch_cutoff(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    tenancy_id: Uuid,
    watermark: i64,
    limit: u32,
) -> Result<Option<Cutoff>, sqlx::Error> {
    let sql: &'static str = match mapping {
        Mapping::Users => &USERS_CUTOFF,
        Mapping::ContactChannels => &CONTACT_CHANNELS_CUTOFF,
    };
    let (changes, last_sequence_id): (i64, Option<i64>) = sqlx::query_as(sql)
        .bind(tenancy_id)
        .bind(watermark)
        .bind(i64::from(limit))
        .fetch_one(executor)
        .await?;
    Ok(last_sequence_id.map(|last_sequence_id| Cutoff {
        changes: u64::try_from(changes).unwrap_or(0),
        last_sequence_id,
    }))
}

/// How far a batch reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoff {
    /// Changes (sequence ids) in the batch.
    pub changes: u64,
    /// The batch's last sequence id: the watermark once it is applied.
    pub last_sequence_id: i64,
}

/// Where the batch query's `cutoff` part ends: its rows (`batch_live`) come next.
fn cutoff_end(batch: &str) -> usize {
    batch
        .find("), batch_live as (")
        .expect("the batch query computes its cutoff before its rows")
}

/// The batch query up to its `cutoff`, answering that alone.
fn cutoff_sql(batch: &str) -> String {
    format!(
        "{}) select changes, last_sequence_id from cutoff",
        &batch[..cutoff_end(batch)]
    )
}

/// The batch query with its `cutoff` given instead of computed.
fn with_cutoff(batch: &str, cutoff: Cutoff) -> String {
    let start = batch
        .find("), cutoff as (")
        .expect("the batch query computes its cutoff");
    let end = cutoff_end(batch);
    format!(
        "{}), cutoff as (\n    select {}::int8 as last_sequence_id, {}::int8 as changes\n{}",
        &batch[..start],
        cutoff.last_sequence_id,
        cutoff.changes,
        &batch[end..]
    )
}

static USERS_CUTOFF: LazyLock<String> = LazyLock::new(|| cutoff_sql(&USERS_BATCH));
static CONTACT_CHANNELS_CUTOFF: LazyLock<String> =
    LazyLock::new(|| cutoff_sql(&CONTACT_CHANNELS_BATCH));

/// `COPY … TO STDOUT (FORMAT binary)` of the rows of the batch [`next_batch`] would read
/// after `watermark`, whose `cutoff` [`batch_cutoff`] read in the same snapshot: one row
/// per id the batch touches, in id order, as the staging table of
/// [`crate::sync::statements::create_stage`] takes it: the id, whether the row exists
/// now, then the mapped columns in the external table's types (null where the row is
/// gone). The cutoff is given, not computed again: in that snapshot the same changes end
/// at the same id (a tenth or so of the read of a 20,000-change batch).
///
/// `COPY` takes no parameters: the tenancy id is a [`Uuid`] and the others are numbers,
/// formatted here, never text from elsewhere.
pub fn copy_batch(mapping: Mapping, tenancy_id: Uuid, watermark: i64, cutoff: Cutoff) -> String {
    let (batch, columns): (&str, &str) = match mapping {
        Mapping::Users => (
            &USERS_BATCH,
            r#"b.display_name::text, b.profile_image_url::text, b.primary_email::text,
       b.primary_email_verified::boolean, b.signed_up_at::timestamp,
       b.client_metadata::jsonb, b.client_read_only_metadata::jsonb,
       b.server_metadata::jsonb, b.is_anonymous::boolean"#,
        ),
        Mapping::ContactChannels => (
            &CONTACT_CHANNELS_BATCH,
            r#"b.user_id::uuid, b."type"::text, b."value"::text, b.is_primary::boolean,
       b.is_verified::boolean, b.used_for_auth::boolean, b.created_at::timestamp"#,
        ),
    };
    // The batch's changes, at most this many of each kind, end at its last id.
    let batch = with_cutoff(batch, cutoff)
        .replace("$1", &format!("'{tenancy_id}'::uuid"))
        .replace("$2", &format!("{watermark}::int8"))
        .replace("$3", &format!("{}::int8", cutoff.changes));
    format!(
        "copy (select b.id::uuid, b.present::boolean, {columns} \
         from ({batch}) as b order by b.id) to stdout (format binary)"
    )
}
