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
            let touched: Vec<TouchedUser> = sqlx::query_as(USERS_BATCH)
                .bind(tenancy_id)
                .bind(watermark)
                .bind(limit)
                .fetch_all(executor)
                .await?;
            Ok(collect(touched, Upserts::Users))
        }
        Mapping::ContactChannels => {
            let touched: Vec<TouchedChannel> = sqlx::query_as(CONTACT_CHANNELS_BATCH)
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
    changes: i64,
    present: bool,
    display_name: Option<String>,
    profile_image_url: Option<String>,
    primary_email: Option<String>,
    primary_email_verified: Option<bool>,
    signed_up_at: Option<chrono::NaiveDateTime>,
    client_metadata: Option<serde_json::Value>,
    client_read_only_metadata: Option<serde_json::Value>,
    server_metadata: Option<serde_json::Value>,
    is_anonymous: Option<bool>,
}

#[derive(sqlx::FromRow)]
struct TouchedChannel {
    id: Uuid,
    last_sequence_id: i64,
    changes: i64,
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
    fn changes(&self) -> i64;
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
    fn changes(&self) -> i64 {
        self.changes
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
    fn changes(&self) -> i64 {
        self.changes
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
    let changes = touched.iter().map(T::changes).sum::<i64>();
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

/// `$1` tenancy, `$2` watermark, `$3` limit. Each branch of the union is limited on
/// its own first, so both use their (tenancy, sequence) index.
const USERS_BATCH: &str = r#"
with changes as (
    (select "projectUserId" as id, "sequenceId" as sequence_id
     from "ProjectUser"
     where "tenancyId" = $1 and "sequenceId" > $2
     order by "sequenceId" limit $3)
    union all
    (select ("primaryKey" ->> 'projectUserId')::uuid, "sequenceId"
     from "DeletedRow"
     where "tenancyId" = $1 and "tableName" = 'ProjectUser' and "sequenceId" > $2
     order by "sequenceId" limit $3)
    order by sequence_id
    limit $3
), touched as (
    select id, max(sequence_id) as last_sequence_id, count(*) as changes
    from changes
    group by id
)
select
    touched.id,
    touched.last_sequence_id,
    touched.changes,
    u."projectUserId" is not null as present,
    u."displayName" as display_name,
    u."profileImageUrl" as profile_image_url,
    email."value" as primary_email,
    coalesce(email."isVerified", false) as primary_email_verified,
    coalesce(u."signedUpAt", u."createdAt") as signed_up_at,
    coalesce(u."clientMetadata", '{}') as client_metadata,
    coalesce(u."clientReadOnlyMetadata", '{}') as client_read_only_metadata,
    coalesce(u."serverMetadata", '{}') as server_metadata,
    u."isAnonymous" as is_anonymous
from touched
left join "ProjectUser" u
    on u."tenancyId" = $1 and u."projectUserId" = touched.id
left join lateral (
    select c."value", c."isVerified"
    from "ContactChannel" c
    where c."tenancyId" = $1 and c."projectUserId" = touched.id
      and c."type" = 'EMAIL' and c."isPrimary"
    limit 1
) email on true
order by touched.last_sequence_id
"#;

const CONTACT_CHANNELS_BATCH: &str = r#"
with changes as (
    (select "id", "sequenceId" as sequence_id
     from "ContactChannel"
     where "tenancyId" = $1 and "sequenceId" > $2
     order by "sequenceId" limit $3)
    union all
    (select ("primaryKey" ->> 'id')::uuid, "sequenceId"
     from "DeletedRow"
     where "tenancyId" = $1 and "tableName" = 'ContactChannel' and "sequenceId" > $2
     order by "sequenceId" limit $3)
    order by sequence_id
    limit $3
), touched as (
    select id, max(sequence_id) as last_sequence_id, count(*) as changes
    from changes
    group by id
)
select
    touched.id,
    touched.last_sequence_id,
    touched.changes,
    c."id" is not null as present,
    c."projectUserId" as user_id,
    c."type" as "type",
    c."value" as "value",
    coalesce(c."isPrimary", false) as is_primary,
    c."isVerified" as is_verified,
    coalesce(c."usedForAuth", false) as used_for_auth,
    c."createdAt" as created_at
from touched
left join lateral (
    select * from "ContactChannel" c
    where c."tenancyId" = $1 and c."id" = touched.id
    order by c."sequenceId" desc nulls last
    limit 1
) c on true
order by touched.last_sequence_id
"#;
