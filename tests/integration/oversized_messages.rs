//! Tenant servers that answer with more than the service will buffer: a 200 MB error or
//! notice raised by a trigger, a flood of small notices, the rows of one answer adding
//! up. The connection fails on the message's header (`SYNC_MAX_TENANT_MESSAGE_BYTES`),
//! the database fails alone and permanently as `message_too_large`, `serve`'s memory
//! stays flat, and the database heals once the tenant takes its trigger away.

use std::time::Duration;

use external_db_sync::sync::verify::{verify_tenancy, DatabaseComparison};
use external_db_sync::sync::{SyncEngine, SyncError};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::binary::{peak_rss_bytes, serve_logging_to};
use crate::harness::fixtures::{rename_user, tenancy, user};
use crate::harness::postgres::{migrated_pool, pool, server};
use crate::harness::sync::{
    attach, engine, engine_with, recorded_error, sync, sync_ok, test_settings,
    two_tenancies_with_users, wait_until_equal, PrivateTargets,
};
use crate::harness::tls::tls_server;
use crate::harness::wait;

/// How much `serve`'s peak memory may grow while a tenant attacks it.
const GROWTH_BOUND: u64 = 64 * 1024 * 1024;

const RAISE_A_200_MB_ERROR: &str =
    "raise exception '%', pg_catalog.repeat('x', 200 * 1024 * 1024);";
const RAISE_A_200_MB_NOTICE: &str = "raise notice '%', pg_catalog.repeat('x', 200 * 1024 * 1024);";
const RAISE_100_000_NOTICES: &str =
    "for n in 1..100000 loop raise notice 'notice number %', n; end loop;";

/// Installs a trigger that runs `body` on every write of a user into `tenant`.
async fn install_hostile_trigger(tenant: &PgPool, body: &str) {
    sqlx::raw_sql(&format!(
        "create function hostile() returns trigger language plpgsql as $$ \
         begin {body} return new; end $$; \
         create trigger hostile before insert or update on users \
         for each row execute function hostile();"
    ))
    .execute(tenant)
    .await
    .unwrap();
}

async fn drop_hostile_trigger(tenant: &PgPool) {
    sqlx::raw_sql("drop trigger hostile on users; drop function hostile()")
        .execute(tenant)
        .await
        .unwrap();
}

/// The only user of the first tenancy of [`two_tenancies_with_users`], and the first of
/// the second.
async fn first_user(pool: &PgPool, tenancy_id: Uuid) -> Uuid {
    sqlx::query_scalar(
        r#"select "projectUserId" from "ProjectUser" where "tenancyId" = $1
           order by "displayName" limit 1"#,
    )
    .bind(tenancy_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits (90 s at most) until the database `main` of `tenancy_id` has failed at least
/// `failures` times in a row, and returns its recorded error.
async fn wait_for_failures(pool: &PgPool, tenancy_id: Uuid, failures: i32) -> (String, bool) {
    wait::until(
        "the hostile database to fail again",
        Duration::from_secs(90),
        || async move {
            let (error, retryable, count) = recorded_error(pool, tenancy_id, "main").await;
            (count >= failures).then(|| (error.unwrap_or_default(), retryable.unwrap_or(true)))
        },
    )
    .await
}

/// What [`attack`] saw.
struct Attacked {
    /// How much `serve`'s peak resident memory grew from before the attack.
    growth: u64,
    /// The hostile database's recorded error after three changes, if it failed.
    recorded: Option<(String, bool)>,
}

/// `serve` syncs two tenancies; the first one's database gets a trigger running
/// `trigger_body` on every user written. Three changes are made to each tenancy, one
/// after the other. When `fails`, the hostile database must fail three times; then the
/// trigger is dropped and it must heal. The other tenancy must be equal throughout.
async fn attack(trigger_body: &str, fails: bool) -> Attacked {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let [(hostile, hostile_db), (other, other_db)] = two_tenancies_with_users(&internal).await;
    let log = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, _address) = serve_logging_to(
        &database_url,
        // A database failed permanently is tried again within a second, so that three
        // attempts and the healing take seconds.
        &[
            ("SYNC_PERMANENT_RETRY_FIRST_MS", "300"),
            ("SYNC_PERMANENT_RETRY_MAX_MS", "1000"),
        ],
        &log,
    )
    .await;
    let pid = child.id().unwrap();
    wait_until_equal(&internal, hostile, &hostile_db).await;
    wait_until_equal(&internal, other, &other_db).await;
    let baseline = peak_rss_bytes(pid);

    install_hostile_trigger(&hostile_db, trigger_body).await;
    let (hostile_user, other_user) = (
        first_user(&internal, hostile).await,
        first_user(&internal, other).await,
    );
    let mut recorded = None;
    for round in 1..=3 {
        rename_user(&internal, hostile_user, &format!("hostile, change {round}")).await;
        rename_user(&internal, other_user, &format!("other, change {round}")).await;
        if fails {
            recorded = Some(wait_for_failures(&internal, hostile, round).await);
        } else {
            wait_until_equal(&internal, hostile, &hostile_db).await;
        }
        wait_until_equal(&internal, other, &other_db).await;
    }
    let growth = peak_rss_bytes(pid).saturating_sub(baseline);

    if fails {
        drop_hostile_trigger(&hostile_db).await;
        wait_until_equal(&internal, hostile, &hostile_db).await;
        wait::until(
            "the hostile database's failure to be cleared",
            Duration::from_secs(30),
            || {
                let internal = &internal;
                async move {
                    let (_, _, failures) = recorded_error(internal, hostile, "main").await;
                    (failures == 0).then_some(())
                }
            },
        )
        .await;
    }
    child.kill().await.unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    Attacked { growth, recorded }
}

fn assert_memory_flat(attacked: &Attacked) {
    assert!(
        attacked.growth < GROWTH_BOUND,
        "serve's peak memory grew by {} MiB",
        attacked.growth / 1024 / 1024
    );
}

fn assert_failed_as_too_large(attacked: &Attacked, kind: &str) {
    let (error, retryable) = attacked.recorded.as_ref().unwrap();
    assert!(error.starts_with("message_too_large: "), "{error}");
    assert!(error.contains(kind), "{error}");
    assert!(error.contains("SYNC_MAX_TENANT_MESSAGE_BYTES"), "{error}");
    assert!(!retryable, "a message too large is permanent");
}

#[tokio::test]
async fn a_200_mb_error_fails_its_database_alone_and_serve_stays_small() {
    let attacked = attack(RAISE_A_200_MB_ERROR, true).await;

    assert_memory_flat(&attacked);
    assert_failed_as_too_large(&attacked, "an error of ");
}

#[tokio::test]
async fn a_200_mb_notice_fails_its_database_alone_and_serve_stays_small() {
    let attacked = attack(RAISE_A_200_MB_NOTICE, true).await;

    assert_memory_flat(&attacked);
    assert_failed_as_too_large(&attacked, "a notice of ");
}

#[tokio::test]
async fn a_hundred_thousand_notices_in_one_statement_hold_no_memory() {
    // Each notice is small, logged or counted and dropped before the next is read: the
    // database syncs, through the flood.
    let attacked = attack(RAISE_100_000_NOTICES, false).await;

    assert_memory_flat(&attacked);
}

/// A tenancy with one user and a database `main` at `url`.
async fn tenancy_at(pool: &PgPool, url: &str) -> Uuid {
    let tenancy_id = tenancy(pool).await;
    attach(pool, tenancy_id, &[("main", url)]).await;
    user(pool, tenancy_id, "first").await;
    tenancy_id
}

#[tokio::test]
async fn a_message_over_the_limit_is_caught_above_tls() {
    let internal = migrated_pool().await;
    let url = tls_server().server.empty_database("tls").await;
    let tenant = pool(&url).await;
    let tenancy_id = tenancy_at(&internal, &format!("{url}?sslmode=require")).await;
    let engine = engine(&internal);
    sync_ok(&internal, &engine, tenancy_id).await;
    install_hostile_trigger(
        &tenant,
        "raise exception '%', pg_catalog.repeat('x', 20 * 1024 * 1024);",
    )
    .await;
    user(&internal, tenancy_id, "second").await;

    let report = sync(&internal, &engine, tenancy_id).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(matches!(error, SyncError::MessageTooLarge(_)), "{error}");
    assert_eq!(error.code(), "message_too_large");
    drop_hostile_trigger(&tenant).await;
    sync_ok(&internal, &engine, tenancy_id).await;
}

#[tokio::test]
async fn the_rows_of_one_answer_add_up_to_the_limit() {
    // Two thousand users: a page of verify's digests is about 130 KB of rows, each row
    // under 100 bytes. Under a limit of 64 KiB the comparison fails on the answer as a
    // whole; under the default it passes.
    let internal = migrated_pool().await;
    let (url, _tenant) = crate::harness::fixtures::tenant_database().await;
    let tenancy_id = tenancy_at(&internal, &url).await;
    crate::harness::fixtures::users(&internal, tenancy_id, 2_000, "user ").await;
    let engine = engine(&internal);
    sync_ok(&internal, &engine, tenancy_id).await;
    let mut settings = test_settings();
    settings.session.max_message_bytes = 64 * 1024;
    let small_limit = engine_with(&internal, settings, PrivateTargets::Allowed);

    let [compared] = verify(&small_limit, tenancy_id).await;
    let [equal] = verify(&engine, tenancy_id).await;

    assert_eq!(compared.code, Some("message_too_large"), "{compared:?}");
    assert!(
        compared
            .error
            .as_deref()
            .unwrap()
            .contains("more than 65536 bytes of rows"),
        "{compared:?}"
    );
    assert!(equal.equal, "{equal:?}");
}

async fn verify(engine: &SyncEngine, tenancy_id: Uuid) -> [DatabaseComparison; 1] {
    verify_tenancy(engine, tenancy_id, None)
        .await
        .unwrap()
        .unwrap()
        .try_into()
        .unwrap()
}
