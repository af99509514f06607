//! The randomized soak test (behind a flag, not in CI): several writers make every kind
//! of change the triggers capture while two `serve` processes run their loops and a
//! cron caller hits both; afterwards every tenant database must equal its source and
//! no change may be after its watermarks (tombstones may be pruned meanwhile).
//!
//! ```text
//! SOAK_SECONDS=60 SOAK_SEED=7 cargo test --test integration soak -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use sqlx::PgPool;
use tokio::process::Child;
use uuid::Uuid;

use crate::harness::app::{CRON_SECRET, PREFIX};
use crate::harness::binary::serve_logging_to;
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{
    attach, expected_channels, expected_users, external_channels, external_users,
    has_changes_after, watermark,
};
use crate::harness::{fixtures, wait};

const TENANCIES: usize = 6;
const WRITERS: u64 = 4;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|raw| {
            raw.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number"))
        })
        .unwrap_or(default)
}

/// A user a writer owns (no other writer touches it), with its channels.
struct OwnedUser {
    tenancy: Uuid,
    id: Uuid,
    channels: Vec<Uuid>,
}

/// One writer's rows, and the ids of its users that are deleted and may come back.
struct Writer {
    pool: PgPool,
    rng: StdRng,
    tenancies: Vec<Uuid>,
    users: Vec<OwnedUser>,
    deleted: Vec<(Uuid, Uuid)>,
    changes: u64,
}

impl Writer {
    /// Runs `sql` with the ids, then the text if any, as its parameters.
    async fn execute(&self, sql: &str, ids: &[Uuid], text: Option<&str>) {
        let mut query = sqlx::query(sql);
        for id in ids {
            query = query.bind(id);
        }
        if let Some(text) = text {
            query = query.bind(text);
        }
        query.execute(&self.pool).await.unwrap();
    }

    async fn insert_user(&mut self, tenancy: Uuid, id: Uuid) {
        let channel = Uuid::new_v4();
        let mut transaction = self.pool.begin().await.unwrap();
        sqlx::query(
            r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName", "serverMetadata")
               values ($1, $2, 'new', jsonb_build_object('n', 1))"#,
        )
        .bind(tenancy)
        .bind(id)
        .execute(&mut *transaction)
        .await
        .unwrap();
        sqlx::query(
            r#"insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "isPrimary", "value")
               values ($1, $2, $3, 'EMAIL', true, $3::text || '@example.com')"#,
        )
        .bind(tenancy)
        .bind(id)
        .bind(channel)
        .execute(&mut *transaction)
        .await
        .unwrap();
        transaction.commit().await.unwrap();
        self.users.push(OwnedUser {
            tenancy,
            id,
            channels: vec![channel],
        });
    }

    /// One random change, in a transaction of its own.
    async fn change(&mut self) {
        self.changes += 1;
        let step = self.changes.to_string();
        if self.users.is_empty() || self.rng.random_bool(0.15) {
            if !self.deleted.is_empty() && self.rng.random_bool(0.3) {
                let (tenancy, id) = self.deleted.swap_remove(0);
                return self.insert_user(tenancy, id).await;
            }
            let tenancy = self.tenancies[self.rng.random_range(0..self.tenancies.len())];
            return self.insert_user(tenancy, Uuid::new_v4()).await;
        }
        let index = self.rng.random_range(0..self.users.len());
        let user = &self.users[index];
        let (tenancy, id) = (user.tenancy, user.id);
        let channel = (!user.channels.is_empty())
            .then(|| user.channels[self.rng.random_range(0..user.channels.len())]);
        match (self.rng.random_range(0..8), channel) {
            (0, _) => {
                self.execute(
                    r#"update "ProjectUser" set "displayName" = $2,
                           "serverMetadata" = jsonb_build_object('step', $2)
                       where "projectUserId" = $1"#,
                    &[id],
                    Some(&step),
                )
                .await;
            }
            (1, _) => {
                self.execute(
                    r#"delete from "ProjectUser" where "projectUserId" = $1"#,
                    &[id],
                    None,
                )
                .await;
                self.users.swap_remove(index);
                self.deleted.push((tenancy, id));
            }
            (2, _) => {
                let new = Uuid::new_v4();
                self.execute(
                    r#"insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
                       values ($1, $2, $3, 'EMAIL', $4)"#,
                    &[tenancy, id, new],
                    Some(&step),
                )
                .await;
                self.users[index].channels.push(new);
            }
            (3, Some(channel)) => {
                self.execute(
                    r#"update "ContactChannel" set "value" = $2, "isVerified" = not "isVerified"
                       where "id" = $1"#,
                    &[channel],
                    Some(&step),
                )
                .await;
            }
            (4, Some(channel)) => {
                self.execute(
                    r#"delete from "ContactChannel" where "id" = $1"#,
                    &[channel],
                    None,
                )
                .await;
                self.users[index].channels.retain(|kept| *kept != channel);
            }
            (5, Some(channel)) => {
                let new = Uuid::new_v4();
                self.execute(
                    r#"update "ContactChannel" set "id" = $2, "value" = $3 where "id" = $1"#,
                    &[channel, new],
                    Some(&step),
                )
                .await;
                let channels = &mut self.users[index].channels;
                channels.retain(|kept| *kept != channel);
                channels.push(new);
            }
            (6, _) => {
                // Several users in one transaction.
                let ids: Vec<Uuid> = self.users.iter().take(5).map(|user| user.id).collect();
                sqlx::query(
                    r#"update "ProjectUser" set "profileImageUrl" = $2
                       where "projectUserId" = any($1)"#,
                )
                .bind(ids)
                .bind(&step)
                .execute(&self.pool)
                .await
                .unwrap();
            }
            _ => {
                self.execute(
                    r#"update "ProjectUser" set "clientMetadata" = jsonb_build_object('c', $2)
                       where "projectUserId" = $1"#,
                    &[id],
                    Some(&step),
                )
                .await;
            }
        }
    }
}

async fn serve(database_url: &str, name: &str) -> (Child, String) {
    let log = std::env::temp_dir().join(format!("external-db-sync-soak-{name}.log"));
    let (child, address) = serve_logging_to(database_url, &[("SYNC_BATCH_SIZE", "50")], &log).await;
    println!("soak: serve {name} on {address}, log {}", log.display());
    (child, address)
}

/// Whether every tenant database equals its source and no change is after its watermarks.
async fn all_caught_up(internal: &PgPool, tenants: &[(Uuid, PgPool)]) -> bool {
    for (tenancy, tenant) in tenants {
        let caught_up = external_users(tenant).await == expected_users(internal, *tenancy).await
            && external_channels(tenant).await == expected_channels(internal, *tenancy).await
            && !has_changes_after(
                internal,
                *tenancy,
                "ProjectUser",
                watermark(tenant, "users").await,
            )
            .await
            && !has_changes_after(
                internal,
                *tenancy,
                "ContactChannel",
                watermark(tenant, "contact_channels").await,
            )
            .await;
        if !caught_up {
            return false;
        }
    }
    true
}

#[tokio::test]
#[ignore = "soak test: SOAK_SECONDS=60 cargo test --test integration soak -- --ignored"]
async fn soak_mixed_writers_two_serve_processes_and_cron_end_equal() {
    let seconds = setting("SOAK_SECONDS", 60);
    let seed = setting("SOAK_SEED", rand::random::<u16>().into());
    println!("soak: {seconds} s, seed {seed}");
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let mut tenants = Vec::new();
    for _ in 0..TENANCIES {
        let tenancy = fixtures::tenancy(&internal).await;
        let (url, tenant) = fixtures::tenant_database().await;
        attach(&internal, tenancy, &[("main", &url)]).await;
        tenants.push((tenancy, tenant));
    }
    let tenancies: Vec<Uuid> = tenants.iter().map(|(tenancy, _)| *tenancy).collect();
    let (_first, first_address) = serve(&database_url, "first").await;
    let (_second, second_address) = serve(&database_url, "second").await;

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let writers: Vec<_> = (0..WRITERS)
        .map(|number| {
            let mut writer = Writer {
                pool: internal.clone(),
                rng: StdRng::seed_from_u64(seed * 100 + number),
                tenancies: tenancies.clone(),
                users: Vec::new(),
                deleted: Vec::new(),
                changes: 0,
            };
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    writer.change().await;
                }
                writer.changes
            })
        })
        .collect();
    let cron = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut calls = 0u64;
        while Instant::now() < deadline {
            for address in [&first_address, &second_address] {
                for route in ["sequencer", "poller"] {
                    let response = client
                        .request(
                            Method::GET,
                            format!("http://{address}{PREFIX}/{route}?maxDurationMs=0"),
                        )
                        .bearer_auth(CRON_SECRET)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "{route} on {address}");
                    calls += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        calls
    });
    let mut changes = 0;
    for writer in writers {
        changes += writer.await.unwrap();
    }
    let calls = cron.await.unwrap();
    println!(
        "soak: {changes} changes ({:.0}/s), {calls} cron calls",
        changes as f64 / seconds.max(1) as f64
    );

    let settling = Instant::now();
    wait::until(
        "every tenant database equal to its source, watermarks at the latest change",
        Duration::from_secs(120),
        || async { all_caught_up(&internal, &tenants).await.then_some(()) },
    )
    .await;
    println!(
        "soak: caught up {:?} after the writers stopped",
        settling.elapsed()
    );
    assert_eq!(fixtures::flagged_rows(&internal).await, 0);
}
