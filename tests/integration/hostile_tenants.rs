//! Tenant databases that try to steer or overwhelm the service: catalog functions and
//! operators shadowed through `search_path`, and bookkeeping tables altered into
//! nonsense. Each either syncs untouched or fails alone, permanently.

use external_db_sync::sync::{sync_tenancy, TenancySync};

use crate::harness::binary::{peak_rss_bytes, serve_logging_to, PEAK_RSS_BOUND};
use crate::harness::fixtures::{
    delete_user, email, rename_user, sequence_all, tenancy, tenant_database, user,
};
use crate::harness::postgres::{migrated_pool, pool, server, short_id};
use crate::harness::sync::{
    attach_config, engine, expected_users, external_users, recorded_error, sync, sync_ok,
    two_tenancies_with_users, wait_until_equal,
};

/// Objects in `public` standing in for every catalog function and operator the service
/// uses, each answering something harmful (ten million rows, 50 MB values, a lock that
/// is no lock, an `=` that is always true), and a `search_path` that puts `public`
/// before `pg_catalog` for every new session.
const SHADOW_THE_CATALOG: &str = r#"
create function public.pg_advisory_xact_lock(bigint) returns setof bigint
    language sql as 'select pg_catalog.generate_series(1, 10000000)';
create function public.aclexplode(aclitem[])
    returns table(grantor oid, grantee oid, privilege_type integer, is_grantable boolean)
    language sql as 'select 0::oid, 0::oid, 42, true';
create function public.set_config(text, text, boolean) returns text
    language sql as $$select pg_catalog.repeat('x', 50000000)$$;
create function public.current_setting(text) returns text
    language sql as $$select pg_catalog.repeat('x', 50000000)$$;
create function public.has_table_privilege(text, text) returns boolean
    language sql as 'select true';
create function public.current_schema() returns name
    language sql as $$select 'pg_catalog'::name$$;
create function public.current_database() returns name
    language sql as $$select 'postgres'::name$$;
create function public.quote_ident(text) returns text
    language sql as $$select 'pg_catalog'::text$$;
create function public.to_regclass(text) returns regclass
    language sql as $$select 'pg_catalog.pg_class'::regclass$$;
create function public.unnest(anyarray) returns setof anyelement
    language sql as 'select $1[1] from pg_catalog.generate_series(1, 10000000)';
create function public.now() returns timestamp with time zone
    language sql as $$select timestamptz '2000-01-01 00:00:00+00'$$;
create function public.pg_control_system()
    returns table(pg_control_version integer, catalog_version_no integer,
                  system_identifier bigint, pg_control_last_modified timestamptz)
    language sql as 'select 1, 1, 1::bigint, null::timestamptz';
create function public.always(uuid, uuid) returns boolean language sql as 'select true';
create operator public.= (leftarg = uuid, rightarg = uuid, function = public.always);
create function public.always(text, text) returns boolean language sql as 'select true';
create operator public.= (leftarg = text, rightarg = text, function = public.always);
create function public.always(name, name) returns boolean language sql as 'select true';
create operator public.= (leftarg = name, rightarg = name, function = public.always);
do $$ begin
    execute pg_catalog.format('alter database %I set search_path = public, pg_catalog',
                              pg_catalog.current_database());
end $$;
"#;

#[tokio::test]
async fn a_tenant_shadowing_every_catalog_function_cannot_steer_the_service() {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let tenancy_id = tenancy(&internal).await;
    let (url, tenant) = tenant_database().await;
    let reader = format!("hostile_reader_{}", short_id());
    sqlx::raw_sql(&format!("create role {reader}; {SHADOW_THE_CATALOG}"))
        .execute(&tenant)
        .await
        .unwrap();
    // New sessions (the service's among them) start with the hostile search_path.
    let tenant = pool(&url).await;
    let path: String = sqlx::query_scalar("select pg_catalog.current_setting('search_path')")
        .fetch_one(&tenant)
        .await
        .unwrap();
    assert_eq!(path, "public, pg_catalog");
    attach_config(
        &internal,
        tenancy_id,
        serde_json::json!({"main": {
            "type": "postgres", "connectionString": url, "readRoles": [reader]}}),
    )
    .await;
    let mut users = Vec::new();
    for n in 0..20 {
        let id = user(&internal, tenancy_id, &format!("user {n}")).await;
        email(
            &internal,
            tenancy_id,
            id,
            &format!("user{n}@example.com"),
            true,
        )
        .await;
        users.push(id);
    }

    let log = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, _address) = serve_logging_to(&database_url, &[], &log).await;
    wait_until_equal(&internal, tenancy_id, &tenant).await;
    // Later changes go through the kept sessions and the pipelined writes.
    rename_user(&internal, users[0], "renamed").await;
    delete_user(&internal, users[1]).await;
    wait_until_equal(&internal, tenancy_id, &tenant).await;
    let peak = peak_rss_bytes(child.id().unwrap());
    child.kill().await.unwrap();

    assert!(
        peak < PEAK_RSS_BOUND,
        "the service peaked at {} MiB",
        peak / 1024 / 1024
    );
    // The tenant's functions were not the ones that ran: the watermarks carry the real
    // time, and the read role got exactly SELECT.
    let stamped_in_2000: i64 = sqlx::query_scalar(
        "select pg_catalog.count(*) from _stack_sync_metadata \
         where updated_at operator(pg_catalog.<) timestamp '2001-01-01'",
    )
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert_eq!(stamped_in_2000, 0);
    let can_read: bool = sqlx::query_scalar(
        "select pg_catalog.has_table_privilege($1::text, 'users', 'SELECT') \
            and not pg_catalog.has_table_privilege($1::text, 'users', 'INSERT')",
    )
    .bind(&reader)
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert!(can_read);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn a_bookkeeping_table_altered_into_nonsense_fails_only_its_own_database() {
    let pool = migrated_pool().await;
    let [(first, first_tenant), (second, second_tenant)] = two_tenancies_with_users(&pool).await;
    let third = tenancy(&pool).await;
    let (third_url, third_tenant) = tenant_database().await;
    attach_config(
        &pool,
        third,
        serde_json::json!({"main": {"type": "postgres", "connectionString": third_url}}),
    )
    .await;
    user(&pool, third, "carol").await;
    let setup = engine(&pool);
    for tenancy_id in [first, second, third] {
        sync_ok(&pool, &setup, tenancy_id).await;
    }

    // The first tenant nulls its watermarks; the second turns them into megabyte-long
    // text. Neither may be read as anything, nor retried as if it could pass by itself.
    sqlx::raw_sql(
        "alter table _stack_sync_metadata alter column last_synced_sequence_id drop not null; \
         update _stack_sync_metadata set last_synced_sequence_id = null",
    )
    .execute(&first_tenant)
    .await
    .unwrap();
    sqlx::raw_sql(
        "alter table _stack_sync_metadata alter column last_synced_sequence_id type text \
         using pg_catalog.repeat('9', 1000000)",
    )
    .execute(&second_tenant)
    .await
    .unwrap();
    for tenancy_id in [first, second, third] {
        user(&pool, tenancy_id, "newcomer").await;
    }

    // A new engine knows nothing of these databases, as after a restart.
    let fresh = engine(&pool);
    for (tenancy_id, fragment) in [(first, "_stack_sync_metadata"), (second, "SQLSTATE 22003")] {
        let report = sync(&pool, &fresh, tenancy_id).await;
        let error = report.databases[0].result.as_ref().unwrap_err();
        assert!(!error.is_retryable(), "{error}");
        assert!(error.to_string().contains(fragment), "{error}");
        let (recorded, retryable, failures) = recorded_error(&pool, tenancy_id, "main").await;
        assert!(recorded.unwrap().contains(fragment));
        assert_eq!((retryable, failures), (Some(false), 1));
    }
    sync_ok(&pool, &fresh, third).await;
    assert_eq!(
        external_users(&third_tenant).await,
        expected_users(&pool, third).await
    );
}

/// Every database id recorded for a tenancy, in order.
async fn recorded_ids(pool: &sqlx::PgPool, tenancy_id: uuid::Uuid) -> Vec<String> {
    sqlx::query_scalar(
        r#"select "databaseId" from "ExternalDbSyncStatus" where "tenancyId" = $1 order by 1"#,
    )
    .bind(tenancy_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_tenancy_over_a_limit_gets_one_recorded_error_and_the_others_sync() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let (url, _) = tenant_database().await;
    let entry = |url: &str| serde_json::json!({"type": "postgres", "connectionString": url});

    // Twenty thousand databases: refused as a whole, without a session or a status per
    // entry.
    let crowded = tenancy(&pool).await;
    let many: serde_json::Map<String, serde_json::Value> = (0..20_000)
        .map(|n| (format!("db{n}"), entry("postgres://sync@127.0.0.1:1/none")))
        .collect();
    attach_config(&pool, crowded, serde_json::Value::Object(many)).await;
    user(&pool, crowded, "crowded").await;
    sequence_all(&pool, 1000).await;
    let outcome = sync_tenancy(&engine, crowded).await.unwrap();
    let TenancySync::InvalidConfig(error) = outcome else {
        panic!("expected the configuration to be refused, got {outcome:?}");
    };
    assert!(error.to_string().contains("at most 10"), "{error}");
    assert_eq!(recorded_ids(&pool, crowded).await, ["*"]);
    let (recorded, retryable, _) = recorded_error(&pool, crowded, "*").await;
    assert!(recorded.unwrap().contains("SYNC_MAX_DATABASES_PER_TENANCY"));
    assert_eq!(retryable, Some(false));

    // Entries over a limit fail alone, each with its error; the good one syncs.
    let mixed = tenancy(&pool).await;
    let (good_url, good) = tenant_database().await;
    let roles: Vec<String> = (0..33).map(|n| format!("role{n}")).collect();
    let long_url = format!("{url}?application_name={}", "x".repeat(5000));
    attach_config(
        &pool,
        mixed,
        serde_json::json!({
            "good": entry(&good_url),
            "roles": {"type": "postgres", "connectionString": url, "readRoles": roles},
            "long": entry(&long_url),
        }),
    )
    .await;
    user(&pool, mixed, "mixed").await;
    let report = sync(&pool, &engine, mixed).await;
    let errors: Vec<(String, String)> = report
        .databases
        .iter()
        .filter_map(|database| {
            let error = database.result.as_ref().err()?;
            assert!(!error.is_retryable());
            Some((database.database_id.clone(), error.to_string()))
        })
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].0 == "long" && errors[0].1.contains("at most 4096"),
        "{errors:?}"
    );
    assert!(
        errors[1].0 == "roles" && errors[1].1.contains("at most 32"),
        "{errors:?}"
    );
    assert_eq!(
        external_users(&good).await,
        expected_users(&pool, mixed).await
    );

    // The crowded tenancy trims its list: the recorded problem goes with the first
    // success.
    let (trimmed_url, trimmed) = tenant_database().await;
    attach_config(
        &pool,
        crowded,
        serde_json::json!({"main": entry(&trimmed_url)}),
    )
    .await;
    sync_ok(&pool, &engine, crowded).await;
    assert_eq!(recorded_ids(&pool, crowded).await, ["main"]);
    assert_eq!(
        external_users(&trimmed).await,
        expected_users(&pool, crowded).await
    );
}

#[tokio::test]
async fn a_tenant_error_message_is_recorded_short_and_on_one_line() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let tenancy_id = tenancy(&pool).await;
    let (url, tenant) = tenant_database().await;
    attach_config(
        &pool,
        tenancy_id,
        serde_json::json!({"main": {"type": "postgres", "connectionString": url}}),
    )
    .await;
    user(&pool, tenancy_id, "first").await;
    sync_ok(&pool, &engine, tenancy_id).await;
    sqlx::raw_sql(
        r#"create function refuse() returns trigger language plpgsql as $$
           begin
               raise exception '%', pg_catalog.repeat('x', 1000000) || E'\nERROR forged line';
           end $$;
           create trigger refuse before insert on users for each row execute function refuse();"#,
    )
    .execute(&tenant)
    .await
    .unwrap();
    user(&pool, tenancy_id, "second").await;

    let report = sync(&pool, &engine, tenancy_id).await;

    assert!(report.databases[0].result.is_err());
    let (recorded, _, _) = recorded_error(&pool, tenancy_id, "main").await;
    let recorded = recorded.unwrap();
    assert!(recorded.len() < 1000, "{} bytes recorded", recorded.len());
    assert!(!recorded.contains('\n'), "{recorded}");
    assert!(recorded.contains("SQLSTATE P0001"), "{recorded}");
}
