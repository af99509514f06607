//! The guard on the synced tables (`_stack_sync_outside_change`): writes from outside the
//! service take the mapping's watermark back; the service's own do not; a guard that was
//! disabled or dropped is put back, and what happened while it was gone is repaired.

use crate::harness::fixtures::{email, user};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, engine, sync_ok, tenancy_with_database, watermark,
};

#[tokio::test]
async fn writes_from_outside_take_the_watermark_back_and_the_services_own_do_not() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let owner = user(&pool, tenancy, "owner").await;
    email(&pool, tenancy, owner, "owner@example.com", true).await;
    sync_ok(&pool, &engine(&pool), tenancy).await;
    let users = watermark(&tenant, "users").await;
    assert!(users > 0);

    // A session that says it is the service's: let through.
    sqlx::raw_sql(
        "set external_db_sync.writer = 'on'; \
         update users set display_name = display_name; \
         reset external_db_sync.writer;",
    )
    .execute(&tenant)
    .await
    .unwrap();
    assert_eq!(watermark(&tenant, "users").await, users);

    // Anyone else's: the watermark of that table goes back, the other one's stays.
    let channels = watermark(&tenant, "contact_channels").await;
    sqlx::raw_sql("update users set display_name = 'edited by hand'")
        .execute(&tenant)
        .await
        .unwrap();
    assert_eq!(watermark(&tenant, "users").await, -1);
    assert_eq!(watermark(&tenant, "contact_channels").await, channels);

    let report = sync_ok(&pool, &engine(&pool), tenancy).await;
    let synced = report.databases[0].result.as_ref().unwrap();
    let repair = synced.mappings[0].repair.as_ref().expect("users repaired");
    assert!(
        repair
            .reason
            .starts_with("the users watermark went back from"),
        "{}",
        repair.reason
    );
    assert!(synced.mappings[1].repair.is_none());
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    assert_eq!(watermark(&tenant, "users").await, users);
}

#[tokio::test]
async fn a_disabled_guard_is_put_back_and_what_it_missed_repaired() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    for n in 0..5 {
        let id = user(&pool, tenancy, &format!("user {n}")).await;
        email(&pool, tenancy, id, &format!("user{n}@example.com"), true).await;
    }
    sync_ok(&pool, &engine(&pool), tenancy).await;

    // The owner disables the guard, then empties the table: nothing takes the
    // watermark back.
    sqlx::raw_sql(
        "alter table contact_channels disable trigger _stack_sync_outside_change; \
         delete from contact_channels;",
    )
    .execute(&tenant)
    .await
    .unwrap();
    assert!(watermark(&tenant, "contact_channels").await > 0);

    // The next sync prepares the schema (a new engine knows nothing of the database),
    // finds the guard disabled: it is enabled again, and the table repaired.
    user(&pool, tenancy, "later").await;
    let report = sync_ok(&pool, &engine(&pool), tenancy).await;
    let synced = report.databases[0].result.as_ref().unwrap();
    assert!(synced.mappings[1].repair.is_some(), "{synced:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    let enabled: String = sqlx::query_scalar(
        "select tgenabled::text from pg_trigger \
         where tgname = '_stack_sync_outside_change' and tgrelid = 'contact_channels'::regclass",
    )
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert_eq!(enabled, "O");
}
