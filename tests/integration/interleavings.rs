//! A property: any interleaving of inserts, updates, deletes and re-creations of a few
//! users and their contact channels, with sequencer batches and syncs of any sizes in
//! between (two engines, as two processes would, one after the other or at the same
//! time), ends with the tenant database equal to the source once everything is
//! sequenced and synced.
//!
//! Each case is a new tenancy and tenant database on the shared server. The number of
//! cases is `PROPTEST_CASES` (default 24); a failing case is shrunk to a short one.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::PgPool;
use uuid::Uuid;

use external_db_sync::sequencer::{self, SequencerSettings};
use external_db_sync::sync::policy::PrivateTargets;
use external_db_sync::sync::SyncEngine;

use crate::harness::fixtures::{sequence_all, tenancy, tenant_database};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine_with, sync_only, test_settings,
};

const USERS: usize = 3;
const CHANNELS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    /// Inserts the user, or renames it if it exists.
    WriteUser {
        user: usize,
        name: u8,
    },
    DeleteUser {
        user: usize,
    },
    /// Inserts the channel for `user` (if that user exists), or changes it: its
    /// verification, its value, whether it is primary, and its owner (a key change).
    WriteChannel {
        channel: usize,
        user: usize,
        primary: bool,
        value: u8,
    },
    DeleteChannel {
        channel: usize,
    },
    /// One sequencer batch of this size.
    Sequence {
        batch_size: u32,
    },
    /// One sync of the tenancy by one of the two engines.
    Sync {
        engine: usize,
    },
    /// Both engines sync the tenancy at the same time.
    SyncTogether,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..USERS, any::<u8>()).prop_map(|(user, name)| Step::WriteUser { user, name }),
        1 => (0..USERS).prop_map(|user| Step::DeleteUser { user }),
        3 => (0..CHANNELS, 0..USERS, any::<bool>(), any::<u8>()).prop_map(
            |(channel, user, primary, value)| Step::WriteChannel { channel, user, primary, value }
        ),
        1 => (0..CHANNELS).prop_map(|channel| Step::DeleteChannel { channel }),
        2 => (1u32..4).prop_map(|batch_size| Step::Sequence { batch_size }),
        2 => (0usize..2).prop_map(|engine| Step::Sync { engine }),
        1 => Just(Step::SyncTogether),
    ]
}

/// Two engines of different batch sizes and budgets: small enough that a few changes
/// take several batches (upserts and staged ones) and runs, and an initial copy happens.
fn engines(pool: &PgPool, sizes: [(u32, u32); 2]) -> [SyncEngine; 2] {
    sizes.map(|(batch_size, max_batches_per_run)| {
        let mut settings = test_settings();
        settings.batch_size = batch_size;
        // After a full batch the next ones go staged, a little larger: several of
        // them within a run too.
        settings.staged_batch_size = batch_size + 1;
        settings.max_batches_per_run = max_batches_per_run;
        engine_with(pool, settings, PrivateTargets::Allowed)
    })
}

struct Case {
    pool: PgPool,
    tenancy: Uuid,
    users: [Uuid; USERS],
    channels: [Uuid; CHANNELS],
}

impl Case {
    async fn write_user(&self, user: usize, name: u8) {
        sqlx::query(
            r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
               values ($1, $2, $3)
               on conflict ("tenancyId", "projectUserId")
               do update set "displayName" = excluded."displayName""#,
        )
        .bind(self.tenancy)
        .bind(self.users[user])
        .bind(format!("name {name}"))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn delete_user(&self, user: usize) {
        sqlx::query(r#"delete from "ProjectUser" where "tenancyId" = $1 and "projectUserId" = $2"#)
            .bind(self.tenancy)
            .bind(self.users[user])
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn write_channel(&self, channel: usize, user: usize, primary: bool, value: u8) {
        let mut transaction = self.pool.begin().await.unwrap();
        let (tenancy, channel, user) = (self.tenancy, self.channels[channel], self.users[user]);
        let owner_exists: bool = sqlx::query_scalar(
            r#"select exists (select from "ProjectUser"
                              where "tenancyId" = $1 and "projectUserId" = $2)"#,
        )
        .bind(tenancy)
        .bind(user)
        .fetch_one(&mut *transaction)
        .await
        .unwrap();
        if !owner_exists {
            return;
        }
        if primary {
            // One primary e-mail per user: the others of the owner stop being it.
            sqlx::query(
                r#"update "ContactChannel" set "isPrimary" = null
                   where "tenancyId" = $1 and "projectUserId" = $2 and "type" = 'EMAIL'
                     and "isPrimary" and "id" <> $3"#,
            )
            .bind(tenancy)
            .bind(user)
            .bind(channel)
            .execute(&mut *transaction)
            .await
            .unwrap();
        }
        // Inserted, or changed in place, moved to `user` included (a key change).
        sqlx::query(
            r#"with moved as (
                   update "ContactChannel"
                   set "projectUserId" = $2, "isPrimary" = $4, "value" = $5,
                       "isVerified" = not "isVerified"
                   where "tenancyId" = $1 and "id" = $3
                   returning 1
               )
               insert into "ContactChannel"
                   ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth", "value")
               select $1, $2, $3, 'EMAIL', $4, true, $5
               where not exists (select from moved)"#,
        )
        .bind(tenancy)
        .bind(user)
        .bind(channel)
        .bind(primary.then_some(true))
        .bind(format!("{value}@example.com"))
        .execute(&mut *transaction)
        .await
        .unwrap();
        transaction.commit().await.unwrap();
    }

    async fn delete_channel(&self, channel: usize) {
        sqlx::query(r#"delete from "ContactChannel" where "tenancyId" = $1 and "id" = $2"#)
            .bind(self.tenancy)
            .bind(self.channels[channel])
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

async fn run_case(pool: &PgPool, sizes: [(u32, u32); 2], steps: Vec<Step>) {
    let (url, tenant) = tenant_database().await;
    let case = Case {
        pool: pool.clone(),
        tenancy: tenancy(pool).await,
        users: std::array::from_fn(|_| Uuid::new_v4()),
        channels: std::array::from_fn(|_| Uuid::new_v4()),
    };
    attach(pool, case.tenancy, &[("main", &url)]).await;
    let engines = engines(pool, sizes);
    for step in steps {
        match step {
            Step::WriteUser { user, name } => case.write_user(user, name).await,
            Step::DeleteUser { user } => case.delete_user(user).await,
            Step::WriteChannel {
                channel,
                user,
                primary,
                value,
            } => case.write_channel(channel, user, primary, value).await,
            Step::DeleteChannel { channel } => case.delete_channel(channel).await,
            Step::Sequence { batch_size } => {
                let settings = SequencerSettings {
                    batch_size,
                    idle_interval: std::time::Duration::from_millis(50),
                    ..Default::default()
                };
                sequencer::run_once(pool, &settings).await.unwrap();
            }
            Step::Sync { engine } => {
                sync_only(&engines[engine], case.tenancy).await;
            }
            Step::SyncTogether => {
                tokio::join!(
                    sync_only(&engines[0], case.tenancy),
                    sync_only(&engines[1], case.tenancy)
                );
            }
        }
    }
    // Everything sequenced, then synced until a run finds nothing to apply (a run
    // applies at least one batch while changes remain).
    sequence_all(pool, 1000).await;
    for _ in 0..100 {
        let report = sync_only(&engines[0], case.tenancy).await;
        let synced = match &report.databases[..] {
            [database] => database.result.as_ref().expect("the sync succeeds"),
            other => panic!("one database, not {other:?}"),
        };
        if synced.changes() == 0 && !synced.more_remaining() {
            break;
        }
    }
    assert_tenant_matches_source(pool, case.tenancy, &tenant).await;
    tenant.close().await;
}

#[test]
fn any_interleaving_of_changes_sequencing_and_syncs_ends_equal_to_the_source() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pool = runtime.block_on(migrated_pool());
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let sizes = [(1u32..4, 1u32..4), (1u32..4, 1u32..4)];
    let scenario = (sizes, prop::collection::vec(step(), 1..40));
    runner
        .run(&scenario, |(sizes, steps)| {
            runtime.block_on(run_case(&pool, sizes, steps));
            Ok(())
        })
        .unwrap();
}
