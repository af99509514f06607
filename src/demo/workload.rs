//! What the demo writes: its tenancies, each with a tenant database on the embedded
//! server; the initial users; the burst of inserts, updates and deletes; and the probe
//! that measures commit-to-visible latency.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db;
use crate::sync::external_database;

/// One tenancy of the demo and its tenant database.
pub struct DemoTenancy {
    pub id: Uuid,
    /// The tenant database's name on the embedded server.
    pub database: String,
    /// A pool on the tenant database, to count its rows and read the probe.
    pub tenant: PgPool,
    /// Users the burst may update or delete (never the probe).
    users: Mutex<Vec<Uuid>>,
    /// The user whose name the probe changes.
    probe: Uuid,
}

/// The id the demo gives each tenancy's database.
pub const DATABASE_ID: &str = "demo";

/// Creates `count` tenancies, each with a database `demo_tenant_N` on the embedded
/// server (`server_url`: its URL, with the password) configured as its tenant
/// database.
pub async fn create_tenancies(
    pool: &PgPool,
    server_url: &SecretString,
    count: u32,
) -> anyhow::Result<Vec<DemoTenancy>> {
    let mut tenancies = Vec::new();
    for number in 1..=count {
        let database = format!("demo_tenant_{number}");
        sqlx::query(&format!("create database {database}"))
            .execute(pool)
            .await
            .with_context(|| format!("cannot create the tenant database {database}"))?;
        let mut url =
            url::Url::parse(server_url.expose_secret()).context("the embedded database's URL")?;
        url.set_path(&database);
        url.set_query(Some("sslmode=disable"));
        let id = db::tenancy::create(pool, "demo").await?;
        let entry = json!({ "type": "postgres", "connectionString": url.as_str() });
        external_database::parse_entry(DATABASE_ID, &entry)
            .context("the demo's tenant database entry")?;
        db::tenancy::add_database(pool, id, DATABASE_ID, &entry, 1).await?;
        let tenant = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(url.as_str())
            .await
            .with_context(|| format!("cannot connect to {database}"))?;
        tenancies.push(DemoTenancy {
            id,
            database,
            tenant,
            users: Mutex::new(Vec::new()),
            probe: Uuid::nil(),
        });
    }
    Ok(tenancies)
}

/// Writes `users` users to each tenancy, each with a primary email, in one statement
/// per tenancy; returns the rows written (users and contact channels).
pub async fn load(pool: &PgPool, tenancies: &mut [DemoTenancy], users: u32) -> anyhow::Result<u64> {
    let mut rows = 0;
    for tenancy in tenancies.iter_mut() {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            r#"
            with users as (
                insert into "ProjectUser"
                    ("tenancyId", "projectUserId", "displayName", "serverMetadata")
                select $1, gen_random_uuid(), 'Demo user ' || n,
                       jsonb_build_object('plan', (array['free', 'pro', 'team'])[1 + n % 3])
                from generate_series(1, $2) as n
                returning "projectUserId", "displayName"
            )
            insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type",
                                          "isPrimary", "usedForAuth", "isVerified", "value")
            select $1, "projectUserId", gen_random_uuid(), 'EMAIL', true, true,
                   random() < 0.7,
                   replace(lower("displayName"), ' ', '.') || '@example.com'
            from users
            returning "projectUserId"
            "#,
        )
        .bind(tenancy.id)
        .bind(i64::from(users))
        .fetch_all(pool)
        .await
        .context("cannot write the demo's users")?;
        rows += 2 * ids.len() as u64;
        let mut ids = ids.into_iter();
        tenancy.probe = ids.next().unwrap_or_default();
        *tenancy.users.lock().expect("not poisoned") = ids.collect();
    }
    Ok(rows)
}

/// Changes written by the burst.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Written {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

impl Written {
    pub fn total(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
}

/// Writes inserts, updates and deletes across the tenancies at about `rate` per second
/// until `until`, one small transaction each, as an application would. `written` is
/// kept current for the progress display.
pub async fn burst(
    pool: &PgPool,
    tenancies: &[DemoTenancy],
    rate: u32,
    until: Instant,
    written: &Mutex<Written>,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut next = Instant::now();
    let mut turn = 0usize;
    while Instant::now() < until {
        let tenancy = &tenancies[turn % tenancies.len()];
        turn += 1;
        let roll: f64 = rand::rng().random();
        if roll < 0.25 {
            insert_user(pool, tenancy, turn).await?;
            written.lock().expect("not poisoned").inserts += 1;
        } else if roll < 0.75 {
            if update_user(pool, tenancy, turn).await? {
                written.lock().expect("not poisoned").updates += 1;
            }
        } else if delete_user(pool, tenancy).await? {
            written.lock().expect("not poisoned").deletes += 1;
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(())
}

async fn insert_user(pool: &PgPool, tenancy: &DemoTenancy, turn: usize) -> anyhow::Result<()> {
    let id = Uuid::new_v4();
    sqlx::query(
        r#"
        with user_row as (
            insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
            values ($1, $2, 'Burst user ' || $3::text)
            returning "projectUserId"
        )
        insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type",
                                      "isPrimary", "usedForAuth", "value")
        select $1, "projectUserId", gen_random_uuid(), 'EMAIL', true, true,
               'burst.' || $3::text || '@example.com'
        from user_row
        "#,
    )
    .bind(tenancy.id)
    .bind(id)
    .bind(turn.to_string())
    .execute(pool)
    .await
    .context("cannot insert a user")?;
    tenancy.users.lock().expect("not poisoned").push(id);
    Ok(())
}

/// Renames a user and flips its email's verification; `false` when none is left.
///
/// The user's row is locked before its channel's, in the order a delete of the user
/// takes them (the user, then its channels by the cascade): the burst's writers run
/// concurrently and may pick the same user, and the other order deadlocks. The channel
/// update reads the rename's output, so the rename runs first.
async fn update_user(pool: &PgPool, tenancy: &DemoTenancy, turn: usize) -> anyhow::Result<bool> {
    let Some(id) = pick(tenancy, false) else {
        return Ok(false);
    };
    sqlx::query(
        r#"
        with renamed as (
            update "ProjectUser" set "displayName" = 'Renamed ' || $3::text
            where "tenancyId" = $1 and "projectUserId" = $2
            returning "tenancyId", "projectUserId"
        )
        update "ContactChannel" as channel set "isVerified" = not channel."isVerified"
        from renamed
        where channel."tenancyId" = renamed."tenancyId"
          and channel."projectUserId" = renamed."projectUserId"
        "#,
    )
    .bind(tenancy.id)
    .bind(id)
    .bind(turn.to_string())
    .execute(pool)
    .await
    .context("cannot update a user")?;
    Ok(true)
}

/// Deletes a user (its contact channels go with it); `false` when none is left.
async fn delete_user(pool: &PgPool, tenancy: &DemoTenancy) -> anyhow::Result<bool> {
    let Some(id) = pick(tenancy, true) else {
        return Ok(false);
    };
    sqlx::query(r#"delete from "ProjectUser" where "tenancyId" = $1 and "projectUserId" = $2"#)
        .bind(tenancy.id)
        .bind(id)
        .execute(pool)
        .await
        .context("cannot delete a user")?;
    Ok(true)
}

/// A random user of the tenancy, taken out of its list when `remove`.
fn pick(tenancy: &DemoTenancy, remove: bool) -> Option<Uuid> {
    let mut users = tenancy.users.lock().expect("not poisoned");
    if users.is_empty() {
        return None;
    }
    let index = rand::rng().random_range(0..users.len());
    Some(if remove {
        users.swap_remove(index)
    } else {
        users[index]
    })
}

/// Measures commit-to-visible latency until `until`: renames each tenancy's probe user
/// in turn, and times from the commit until its tenant database shows the new name
/// (read every 2 ms). A change not visible within `timeout` is counted as lost.
pub async fn probe(
    pool: &PgPool,
    tenancies: &[DemoTenancy],
    until: Instant,
    timeout: Duration,
) -> anyhow::Result<Latencies> {
    let mut latencies = Latencies::default();
    let mut turn = 0usize;
    while Instant::now() < until {
        let tenancy = &tenancies[turn % tenancies.len()];
        turn += 1;
        let name = format!("probe {turn}");
        sqlx::query(
            r#"update "ProjectUser" set "displayName" = $3
               where "tenancyId" = $1 and "projectUserId" = $2"#,
        )
        .bind(tenancy.id)
        .bind(tenancy.probe)
        .bind(&name)
        .execute(pool)
        .await
        .context("cannot change the probe user")?;
        let committed = Instant::now();
        if wait_for_name(&tenancy.tenant, tenancy.probe, &name, committed + timeout).await? {
            latencies.samples.push(committed.elapsed());
        } else {
            latencies.lost += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(latencies)
}

async fn wait_for_name(
    tenant: &PgPool,
    user: Uuid,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<bool> {
    while Instant::now() < deadline {
        let shown: Option<String> =
            sqlx::query_scalar("select display_name from users where id = $1")
                .bind(user)
                .fetch_optional(tenant)
                .await
                .context("cannot read the tenant database")?
                .flatten();
        if shown.as_deref() == Some(name) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(false)
}

/// Commit-to-visible times of the probe's changes.
#[derive(Debug, Default)]
pub struct Latencies {
    pub samples: Vec<Duration>,
    /// Changes not visible within the timeout.
    pub lost: u64,
}

impl Latencies {
    /// The `q` quantile (0..=1), nearest rank; `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied()
    }
}

/// Changes one row of the first tenancy's tenant database by hand: the test hook that
/// shows verification catching a database that differs from its source.
pub async fn corrupt_a_row(tenancies: &[DemoTenancy]) -> anyhow::Result<()> {
    let Some(tenancy) = tenancies.first() else {
        return Ok(());
    };
    sqlx::query("update users set display_name = 'changed by hand' where id = $1")
        .bind(tenancy.probe)
        .execute(&tenancy.tenant)
        .await
        .context("cannot change a row of the tenant database")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let latencies = Latencies {
            samples: (1..=100).rev().map(Duration::from_millis).collect(),
            lost: 0,
        };
        assert_eq!(latencies.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(latencies.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(Latencies::default().quantile(0.5), None);
    }
}
