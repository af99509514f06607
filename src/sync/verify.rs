//! `verify`: compares each tenant database with its source, mapping by mapping, in
//! bounded memory.
//!
//! Both sides are read in id order, a page at a time, as ids with a digest of the
//! mapped columns ([`crate::db::verify`], [`super::statements::verify_page`]), and
//! merged: an id only in the source is *missing*, only in the tenant database *extra*,
//! in both with different digests *differing*. Memory holds two pages, whatever the
//! tenancy's size. The tenant database is read on a new session, checked by the target
//! policy like any other; nothing is written.

use std::cmp::Ordering;

use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::database::{SessionSource, Sessions};
use super::engine::SyncEngine;
use super::error::SyncError;
use super::external_database::ExternalDatabase;
use super::sessions::{SessionKey, TenantSession};
use super::statements;
use crate::db;
use crate::db::verify::RowDigest;
use crate::mapping::Mapping;

/// Rows read per page on each side.
const PAGE: i64 = 5_000;
/// Example ids kept per kind of difference.
const EXAMPLES: usize = 10;

/// Every database of a tenancy compared with its source: what `verify --json` prints
/// and `POST …/tenancies/{id}/verify` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenancyComparison {
    pub tenancy_id: Uuid,
    /// Every database equal to its source.
    pub equal: bool,
    pub databases: Vec<DatabaseComparison>,
}

impl TenancyComparison {
    pub fn new(tenancy_id: Uuid, databases: Vec<DatabaseComparison>) -> Self {
        Self {
            tenancy_id,
            equal: databases.iter().all(|database| database.equal),
            databases,
        }
    }
}

/// One database compared with its source.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseComparison {
    pub database_id: String,
    /// Every mapping equal.
    pub equal: bool,
    pub mappings: Vec<MappingComparison>,
    /// Why the database could not be compared (its configuration, its server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
}

/// One mapping's table compared with its source rows.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MappingComparison {
    pub mapping: &'static str,
    pub source_rows: u64,
    pub tenant_rows: u64,
    pub missing: Differences,
    pub extra: Differences,
    pub differing: Differences,
}

/// How many rows differ one way, and up to ten of their ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Differences {
    pub count: u64,
    pub examples: Vec<Uuid>,
}

impl Differences {
    fn add(&mut self, id: Uuid) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(id);
        }
    }
}

impl MappingComparison {
    pub fn is_equal(&self) -> bool {
        self.missing.count == 0 && self.extra.count == 0 && self.differing.count == 0
    }
}

/// Compares every database of `tenancy_id` (or only `only`) with the source; `None`
/// when there is no such tenancy. A database that cannot be compared is reported with
/// its error, and counts as not equal.
pub async fn verify_tenancy(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    only: Option<&str>,
) -> Result<Option<Vec<DatabaseComparison>>, sqlx::Error> {
    let Some(entries) = engine.configured_databases(tenancy_id, only).await? else {
        return Ok(None);
    };
    let mut comparisons = Vec::new();
    for (database_id, entry) in entries {
        let comparison = match entry {
            Ok(database) => compare_database(engine, tenancy_id, &database_id, &database).await,
            Err(error) => Err(error),
        };
        comparisons.push(match comparison {
            Ok(mappings) => DatabaseComparison {
                equal: mappings.iter().all(MappingComparison::is_equal),
                database_id,
                mappings,
                error: None,
                code: None,
            },
            Err(error) => unusable(&database_id, &error),
        });
    }
    Ok(Some(comparisons))
}

fn unusable(database_id: &str, error: &SyncError) -> DatabaseComparison {
    DatabaseComparison {
        database_id: database_id.to_owned(),
        equal: false,
        mappings: Vec::new(),
        error: Some(error.to_string()),
        code: Some(error.code()),
    }
}

async fn compare_database(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    database_id: &str,
    database: &ExternalDatabase,
) -> Result<Vec<MappingComparison>, SyncError> {
    let key = SessionKey {
        tenancy_id,
        fingerprint: database.fingerprint,
    };
    let sessions = Sessions::new(engine, key, database_id, database, SessionSource::New);
    let session = sessions.open().await?;
    let mut mappings = Vec::new();
    for mapping in Mapping::ALL {
        let compared = compare_mapping(engine, &session, tenancy_id, mapping).await;
        mappings.push(compared.map_err(|error| sessions.explain(error))?);
    }
    Ok(mappings)
}

/// Merges the two sides of one mapping, a page of each at a time.
async fn compare_mapping(
    engine: &SyncEngine,
    session: &TenantSession,
    tenancy_id: Uuid,
    mapping: Mapping,
) -> Result<MappingComparison, SyncError> {
    let mut comparison = MappingComparison {
        mapping: mapping.name(),
        ..MappingComparison::default()
    };
    let mut source = Side::default();
    let mut tenant = Side::default();
    loop {
        if source.needs_page() {
            let page =
                db::verify::source_page(&engine.pool, mapping, tenancy_id, source.after, PAGE)
                    .await?;
            source.load(page);
        }
        if tenant.needs_page() {
            tenant.load(tenant_page(session, mapping, tenant.after).await?);
        }
        match (source.peek(), tenant.peek()) {
            (None, None) => break,
            (Some(row), None) => {
                comparison.missing.add(row.id);
                source.advance(&mut comparison.source_rows);
            }
            (None, Some(row)) => {
                comparison.extra.add(row.id);
                tenant.advance(&mut comparison.tenant_rows);
            }
            (Some(left), Some(right)) => match left.id.cmp(&right.id) {
                Ordering::Less => {
                    comparison.missing.add(left.id);
                    source.advance(&mut comparison.source_rows);
                }
                Ordering::Greater => {
                    comparison.extra.add(right.id);
                    tenant.advance(&mut comparison.tenant_rows);
                }
                Ordering::Equal => {
                    if left.digest != right.digest {
                        comparison.differing.add(left.id);
                    }
                    source.advance(&mut comparison.source_rows);
                    tenant.advance(&mut comparison.tenant_rows);
                }
            },
        }
    }
    Ok(comparison)
}

async fn tenant_page(
    session: &TenantSession,
    mapping: Mapping,
    after: Option<Uuid>,
) -> Result<Vec<RowDigest>, SyncError> {
    let params: [&(dyn ToSql + Sync); 2] = [&after, &PAGE];
    let rows = session
        .client()
        .query(statements::verify_page(mapping), &params)
        .await
        .map_err(SyncError::target)?;
    rows.iter()
        .map(|row| {
            Ok(RowDigest {
                id: row.try_get(0).map_err(SyncError::target)?,
                digest: row.try_get(1).map_err(SyncError::target)?,
            })
        })
        .collect()
}

/// One side of the merge: the current page, the position in it, and where the next
/// page starts.
#[derive(Default)]
struct Side {
    page: Vec<RowDigest>,
    position: usize,
    after: Option<Uuid>,
    /// The last page was short: nothing follows.
    done: bool,
}

impl Side {
    fn needs_page(&self) -> bool {
        !self.done && self.position >= self.page.len()
    }

    fn load(&mut self, page: Vec<RowDigest>) {
        self.done = (page.len() as i64) < PAGE;
        if let Some(last) = page.last() {
            self.after = Some(last.id);
        }
        self.page = page;
        self.position = 0;
    }

    fn peek(&self) -> Option<&RowDigest> {
        self.page.get(self.position)
    }

    fn advance(&mut self, counted: &mut u64) {
        self.position += 1;
        *counted += 1;
    }
}
