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

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::sync::mapping::{Batch, ContactChannelRow, Mapping, Upserts, UserRow};

/// The next batch of `mapping` for `tenancy_id` after `watermark`, or `None` when
/// nothing is left.
pub async fn next_batch(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    tenancy_id: Uuid,
    watermark: i64,
    limit: u32,
) -> Result<Option<Batch>, sqlx::Error> {
    let limit = i64::from(limit);
    match mapping {
        Mapping::Users => {
            let touched: Vec<TouchedUser> = sqlx::query_as(&USERS_BATCH)
                .bind(tenancy_id)
                .bind(watermark)
                .bind(limit)
                .fetch_all(executor)
                .await?;
            Ok(collect(touched, Upserts::Users))
        }
        Mapping::ContactChannels => {
            let touched: Vec<TouchedChannel> = sqlx::query_as(&CONTACT_CHANNELS_BATCH)
                .bind(tenancy_id)
                .bind(watermark)
                .bind(limit)
                .fetch_all(executor)
                .await?;
            Ok(collect(touched, Upserts::ContactChannels))
        }
    }
}

/// Result rows of the batch queries: the bookkeeping columns, `present`, and the
/// mapped columns, which are null when the row no longer exists.
#[derive(sqlx::FromRow)]
struct TouchedUser {
    id: Uuid,
    last_sequence_id: i64,
    batch_changes: i64,
    present: bool,
    display_name: Option<String>,
    profile_image_url: Option<String>,
    primary_email: Option<String>,
    primary_email_verified: Option<bool>,
    signed_up_at: Option<chrono::NaiveDateTime>,
    client_metadata: Option<String>,
    client_read_only_metadata: Option<String>,
    server_metadata: Option<String>,
    is_anonymous: Option<bool>,
}

#[derive(sqlx::FromRow)]
struct TouchedChannel {
    id: Uuid,
    last_sequence_id: i64,
    batch_changes: i64,
    present: bool,
    user_id: Option<Uuid>,
    #[sqlx(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
    is_primary: Option<bool>,
    is_verified: Option<bool>,
    used_for_auth: Option<bool>,
    created_at: Option<chrono::NaiveDateTime>,
}

/// What one result row means for the batch.
trait TouchedRow {
    type Row;
    fn id(&self) -> Uuid;
    fn last_sequence_id(&self) -> i64;
    /// Changes in the whole batch (the same on every row).
    fn batch_changes(&self) -> i64;
    /// The row to upsert, or `None` if it is gone (or, defensively, incomplete).
    fn into_row(self) -> Option<Self::Row>;
}

impl TouchedRow for TouchedUser {
    type Row = UserRow;
    fn id(&self) -> Uuid {
        self.id
    }
    fn last_sequence_id(&self) -> i64 {
        self.last_sequence_id
    }
    fn batch_changes(&self) -> i64 {
        self.batch_changes
    }
    fn into_row(self) -> Option<UserRow> {
        if !self.present {
            return None;
        }
        Some(UserRow {
            id: self.id,
            display_name: self.display_name,
            profile_image_url: self.profile_image_url,
            primary_email: self.primary_email,
            primary_email_verified: self.primary_email_verified?,
            signed_up_at: self.signed_up_at?,
            client_metadata: self.client_metadata?,
            client_read_only_metadata: self.client_read_only_metadata?,
            server_metadata: self.server_metadata?,
            is_anonymous: self.is_anonymous?,
        })
    }
}

impl TouchedRow for TouchedChannel {
    type Row = ContactChannelRow;
    fn id(&self) -> Uuid {
        self.id
    }
    fn last_sequence_id(&self) -> i64 {
        self.last_sequence_id
    }
    fn batch_changes(&self) -> i64 {
        self.batch_changes
    }
    fn into_row(self) -> Option<ContactChannelRow> {
        if !self.present {
            return None;
        }
        Some(ContactChannelRow {
            id: self.id,
            user_id: self.user_id?,
            kind: self.kind?,
            value: self.value?,
            is_primary: self.is_primary?,
            is_verified: self.is_verified?,
            used_for_auth: self.used_for_auth?,
            created_at: self.created_at?,
        })
    }
}

fn collect<T: TouchedRow>(
    touched: Vec<T>,
    wrap: impl FnOnce(Vec<T::Row>) -> Upserts,
) -> Option<Batch> {
    let last_sequence_id = touched.iter().map(T::last_sequence_id).max()?;
    let changes = touched.first().map_or(0, T::batch_changes);
    let mut upserts = Vec::with_capacity(touched.len());
    let mut deletes = Vec::new();
    for row in touched {
        let id = row.id();
        match row.into_row() {
            Some(row) => upserts.push(row),
            None => deletes.push(id),
        }
    }
    Some(Batch {
        upserts: wrap(upserts),
        deletes,
        changes: u64::try_from(changes).unwrap_or(0),
        last_sequence_id,
    })
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

/// The part both batch queries share. `$1` tenancy, `$2` watermark, `$3` limit.
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
    touched.sequence_id as last_sequence_id,
    (select changes from cutoff) as batch_changes
    {rest}
"#
        )
    }
}

static USERS_BATCH: LazyLock<String> = LazyLock::new(|| {
    BatchQuery {
        table: "ProjectUser",
        alias: "u",
        id_column: r#"u."projectUserId""#,
        primary_key_field: "projectUserId",
        columns: USER_COLUMNS,
        current_row: r#"left join "ProjectUser" u
        on u."tenancyId" = $1 and u."projectUserId" = gone.id"#,
        present: r#"u."projectUserId" is not null"#,
        rest: r#",
    email."value" as primary_email,
    coalesce(email."isVerified", false) as primary_email_verified
from touched
left join lateral (
    select c."value", c."isVerified"
    from "ContactChannel" c
    where c."tenancyId" = $1 and c."projectUserId" = touched.id
      and c."type" = 'EMAIL' and c."isPrimary"
    limit 1
) as email on touched.present"#,
    }
    .sql()
});

static CONTACT_CHANNELS_BATCH: LazyLock<String> = LazyLock::new(|| {
    BatchQuery {
        table: "ContactChannel",
        alias: "c",
        id_column: r#"c."id""#,
        primary_key_field: "id",
        columns: CHANNEL_COLUMNS,
        // Channel ids are unique in practice, though the primary key does not say so.
        current_row: r#"left join lateral (
        select * from "ContactChannel" c
        where c."tenancyId" = $1 and c."id" = gone.id
        order by c."sequenceId" desc nulls last
        limit 1
    ) as c on true"#,
        present: r#"c."id" is not null"#,
        rest: "\nfrom touched",
    }
    .sql()
});
