//! What `verify` compares on the internal side: each source row as the tenant's table
//! should hold it, reduced to its id and a digest, in id order, a page at a time.
//!
//! The digest is `md5` of the row's text form (`row(…)::text`) over the mapped columns
//! in table order. The tenant side computes the same expression over its own columns
//! ([`crate::sync::statements::verify_page`]): the values have the same types on both
//! sides (text, boolean, timestamp, uuid, and `jsonb`, whose text form is canonical), so
//! equal rows give equal digests.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::mapping::Mapping;

/// One row of a page: its id and the digest of its mapped columns.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RowDigest {
    pub id: Uuid,
    pub digest: String,
}

/// Up to `limit` source rows of `mapping` for `tenancy_id` with an id after `after`, in
/// id order.
pub async fn source_page(
    executor: impl PgExecutor<'_>,
    mapping: Mapping,
    tenancy_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<RowDigest>, sqlx::Error> {
    let sql = match mapping {
        Mapping::Users => USERS_PAGE,
        Mapping::ContactChannels => CHANNELS_PAGE,
    };
    sqlx::query_as(sql)
        .bind(tenancy_id)
        .bind(after)
        .bind(limit)
        .fetch_all(executor)
        .await
}

/// The `users` columns as the sync writes them (see [`crate::db::changes`]).
const USERS_PAGE: &str = r#"
select u."projectUserId" as id,
       md5(row(u."displayName", u."profileImageUrl", email."value",
               coalesce(email."isVerified", false),
               coalesce(u."signedUpAt", u."createdAt")::timestamp,
               coalesce(u."clientMetadata", '{}')::jsonb,
               coalesce(u."clientReadOnlyMetadata", '{}')::jsonb,
               coalesce(u."serverMetadata", '{}')::jsonb,
               u."isAnonymous")::text) as digest
from "ProjectUser" u
left join lateral (
    select c."value", c."isVerified"
    from "ContactChannel" c
    where c."tenancyId" = $1 and c."projectUserId" = u."projectUserId"
      and c."type" = 'EMAIL' and c."isPrimary"
    limit 1
) as email on true
where u."tenancyId" = $1 and ($2::uuid is null or u."projectUserId" > $2)
order by u."projectUserId"
limit $3
"#;

/// The `contact_channels` columns as the sync writes them.
const CHANNELS_PAGE: &str = r#"
select c."id" as id,
       md5(row(c."projectUserId", c."type"::text, c."value"::text,
               coalesce(c."isPrimary", false), c."isVerified",
               coalesce(c."usedForAuth", false), c."createdAt"::timestamp)::text) as digest
from "ContactChannel" c
where c."tenancyId" = $1 and ($2::uuid is null or c."id" > $2)
order by c."id"
limit $3
"#;
