//! What the logs may hold: at `RUST_LOG=trace`, no user's data and no secret; a tenant's
//! notice as one escaped line; in a file, no terminal colour codes.

use std::time::Duration;

use serde_json::json;

use crate::harness::app::CRON_SECRET;
use crate::harness::binary::serve_logging_to;
use crate::harness::fixtures::{email, rename_user, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::attach;
use crate::harness::{fixtures, wait};

/// Waits until the tenant's `users` holds a row whose display name is `name`.
async fn wait_for_display_name(tenant: &sqlx::PgPool, name: &str) {
    wait::until(
        &format!("a user named {name} in the tenant database"),
        Duration::from_secs(30),
        || async move {
            let names: Vec<Option<String>> = sqlx::query_scalar("select display_name from users")
                .fetch_all(tenant)
                .await
                .ok()?;
            names
                .iter()
                .any(|n| n.as_deref() == Some(name))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_trace_log_of_a_full_sync_holds_no_user_data_secret_or_colour_code_and_notices_stay_one_line(
) {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let tenancy = fixtures::tenancy(&internal).await;
    let (url, tenant) = tenant_database().await;
    attach(&internal, tenancy, &[("main", &url)]).await;
    let ada = user(&internal, tenancy, "first-name-value").await;
    sqlx::query(r#"update "ProjectUser" set "serverMetadata" = $2 where "projectUserId" = $1"#)
        .bind(ada)
        .bind(json!({"plan": "s3cret-plan-value"}))
        .execute(&internal)
        .await
        .unwrap();
    email(&internal, tenancy, ada, "secret-ada@example.com", true).await;

    let log_path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, _address) =
        serve_logging_to(&database_url, &[("RUST_LOG", "trace")], &log_path).await;
    wait_for_display_name(&tenant, "first-name-value").await;

    // The tenant's own trigger answers every write with a notice that tries to forge a
    // log line.
    sqlx::raw_sql(
        r#"create function shout() returns trigger language plpgsql as $$
           begin
               raise notice E'tenant says hi\nERROR forged: the service is down';
               return new;
           end $$;
           create trigger shout before update on users for each row execute function shout();"#,
    )
    .execute(&tenant)
    .await
    .unwrap();
    rename_user(&internal, ada, "second-name-value").await;
    wait_for_display_name(&tenant, "second-name-value").await;
    let log = wait::until(
        "the tenant's notice in the log",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&log_path).unwrap();
            log.contains("tenant database notice").then_some(log)
        },
    )
    .await;
    child.kill().await.unwrap();

    for secret in [
        "secret-ada@example.com",
        "s3cret-plan-value",
        "second-name-value",
        CRON_SECRET,
    ] {
        assert!(!log.contains(secret), "the log holds {secret}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file holds terminal colour codes"
    );
    let notice = log
        .lines()
        .find(|line| line.contains("tenant database notice"))
        .unwrap();
    assert!(
        notice.contains(r"tenant says hi\nERROR forged: the service is down"),
        "{notice}"
    );
    assert!(
        !log.lines().any(|line| line.starts_with("ERROR forged")),
        "a notice forged a line of its own"
    );
}

/// Warnings are for what an operator should look at. The first sync of a new database
/// creates its tables, which were missing, and warns of nothing; the same table dropped
/// behind the service's back later takes a watermark back, and that is warned about.
#[tokio::test]
async fn a_new_databases_first_sync_warns_of_nothing_and_a_dropped_table_is_warned_about() {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let tenancy = fixtures::tenancy(&internal).await;
    let (url, tenant) = tenant_database().await;
    attach(&internal, tenancy, &[("main", &url)]).await;
    let ada = user(&internal, tenancy, "first sync").await;

    let log_path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, _address) =
        serve_logging_to(&database_url, &[("RUST_LOG", "info")], &log_path).await;
    wait_for_display_name(&tenant, "first sync").await;
    let read_log = || std::fs::read_to_string(&log_path).unwrap();
    let warnings = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("WARN"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(warnings(&read_log()), Vec::<String>::new());

    sqlx::raw_sql("drop table users")
        .execute(&tenant)
        .await
        .unwrap();
    rename_user(&internal, ada, "after the drop").await;
    wait_for_display_name(&tenant, "after the drop").await;
    child.kill().await.unwrap();
    let warned = warnings(&read_log());
    assert!(
        warned.iter().any(|line| line.contains("created again")
            && line.contains("users")
            && !line.contains("contact_channels")),
        "{warned:?}"
    );
}
