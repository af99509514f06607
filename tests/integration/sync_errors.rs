//! Which failures of a tenant database are retried soon and which wait for a person
//! ([`SyncError::is_retryable`]), judged on errors a real PostgreSQL server reports:
//! raised with a chosen SQLSTATE, provoked for real, or with no SQLSTATE at all.
//!
//! The errors are wrapped as the engine wraps a tenant server's errors that are not
//! TLS failures: in [`SyncError::Target`] (what the crate's own `SyncError::target` does
//! for them; that constructor is not public).

use std::time::Duration;

use external_db_sync::sync::SyncError;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::harness::binary::free_address;
use crate::harness::fixtures::tenant_database;
use crate::harness::postgres::{server, short_id};
use crate::harness::wait;

/// SQLSTATEs a later attempt can get past with nobody changing anything: connection
/// exceptions (class 08), insufficient resources (class 53), shutdowns and session
/// timeouts (57P01-57P03, 57P05), serialization failures, deadlocks, lock and statement
/// timeouts, idle-in-transaction timeouts.
const RETRYABLE: [(&str, &str); 18] = [
    ("08000", "connection_exception"),
    ("08001", "sqlclient_unable_to_establish_sqlconnection"),
    ("08003", "connection_does_not_exist"),
    ("08004", "sqlserver_rejected_establishment_of_sqlconnection"),
    ("08006", "connection_failure"),
    ("53000", "insufficient_resources"),
    ("53100", "disk_full"),
    ("53200", "out_of_memory"),
    ("53300", "too_many_connections"),
    ("57P01", "admin_shutdown"),
    ("57P02", "crash_shutdown"),
    ("57P03", "cannot_connect_now"),
    ("57P05", "idle_session_timeout"),
    ("40001", "serialization_failure"),
    ("40P01", "deadlock_detected"),
    ("55P03", "lock_not_available"),
    ("57014", "query_canceled"),
    ("25P03", "idle_in_transaction_session_timeout"),
];

/// SQLSTATEs that need someone to change the database, its privileges or the
/// configuration: the same attempt would fail the same way.
const PERMANENT: [(&str, &str); 13] = [
    ("57P04", "database_dropped"),
    ("42501", "insufficient_privilege"),
    ("42P01", "undefined_table"),
    ("42703", "undefined_column"),
    ("42804", "datatype_mismatch"),
    ("23505", "unique_violation"),
    ("23502", "not_null_violation"),
    ("22P02", "invalid_text_representation"),
    ("25006", "read_only_sql_transaction"),
    ("28000", "invalid_authorization_specification"),
    ("28P01", "invalid_password"),
    ("3D000", "invalid_catalog_name"),
    ("P0001", "raise_exception"),
];

/// A plain client on `url`, as the engine's sessions are.
async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The error a statement gets when it raises `sqlstate`. Raised at `ERROR` level, so the
/// session stays usable whatever the class.
async fn raised(client: &Client, sqlstate: &str) -> tokio_postgres::Error {
    client
        .batch_execute(&format!(
            "do $$ begin raise exception 'provoked' using errcode = '{sqlstate}'; end $$"
        ))
        .await
        .unwrap_err()
}

/// The SQLSTATE of `error`, if the server reported one.
fn sqlstate(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(SqlState::code)
}

/// Asserts that `error` carries `expected_sqlstate` (so that the test judges the error
/// it means to) and is classified `retryable`.
fn assert_classified(error: tokio_postgres::Error, expected_sqlstate: &str, retryable: bool) {
    assert_eq!(sqlstate(&error), Some(expected_sqlstate), "{error:?}");
    let error = SyncError::Target(error);
    let expected = if retryable { "retryable" } else { "permanent" };
    assert_eq!(
        error.is_retryable(),
        retryable,
        "{expected_sqlstate} should be {expected}: {error}"
    );
}

/// Every SQLSTATE of [`RETRYABLE`] and [`PERMANENT`], raised by the server.
#[tokio::test]
async fn server_errors_are_retryable_or_permanent_by_their_sqlstate() {
    let (url, _tenant) = tenant_database().await;
    let client = connect(&url).await;

    for (codes, retryable) in [(&RETRYABLE[..], true), (&PERMANENT[..], false)] {
        for (code, _name) in codes {
            assert_classified(raised(&client, code).await, code, retryable);
        }
    }
}

/// The same classification for errors the server reports of its own accord: timeouts
/// and lock waits are retryable; missing objects, bad data, missing privileges and a
/// missing database are not.
#[tokio::test]
async fn errors_provoked_for_real_are_classified_by_their_sqlstate() {
    let (url, _tenant) = tenant_database().await;
    let client = connect(&url).await;
    client
        .batch_execute("create table t (id int primary key); insert into t values (1)")
        .await
        .unwrap();

    let timed_out = client
        .batch_execute("set statement_timeout = 50; select pg_sleep(30)")
        .await
        .unwrap_err();
    assert_classified(timed_out, "57014", true);
    client
        .batch_execute("reset statement_timeout")
        .await
        .unwrap();

    // Another session holds a lock the statement would wait for.
    let holder = connect(&url).await;
    holder
        .batch_execute("begin; lock table t in access exclusive mode")
        .await
        .unwrap();
    let locked_out = client
        .batch_execute("set lock_timeout = 50; lock table t in access share mode")
        .await
        .unwrap_err();
    assert_classified(locked_out, "55P03", true);
    holder.batch_execute("rollback").await.unwrap();
    client.batch_execute("reset lock_timeout").await.unwrap();

    let undefined = client
        .batch_execute("select * from no_such_table")
        .await
        .unwrap_err();
    assert_classified(undefined, "42P01", false);
    let duplicate = client
        .batch_execute("insert into t values (1)")
        .await
        .unwrap_err();
    assert_classified(duplicate, "23505", false);
    let bad_input = client
        .batch_execute("select 'not a number'::int")
        .await
        .unwrap_err();
    assert_classified(bad_input, "22P02", false);

    let role = format!("eds_unprivileged_{}", short_id());
    server()
        .admin_execute(&format!(r#"create role "{role}""#))
        .await;
    let denied = client
        .batch_execute(&format!(r#"set role "{role}"; select * from t"#))
        .await
        .unwrap_err();
    assert_classified(denied, "42501", false);

    let missing_database = url.rsplit_once('/').unwrap().0.to_owned() + "/eds_no_such_database";
    let missing = tokio_postgres::connect(&missing_database, tokio_postgres::NoTls)
        .await
        .err()
        .expect("no such database");
    assert_classified(missing, "3D000", false);
}

/// A role's connection limit reached: refused at connect with 53300, which passes once
/// other sessions end.
#[tokio::test]
async fn a_refused_connection_for_too_many_sessions_is_retryable() {
    let (url, _tenant) = tenant_database().await;
    let role = format!("eds_limited_{}", short_id());
    server()
        .admin_execute(&format!(r#"create role "{role}" login connection limit 0"#))
        .await;
    let as_role = url.replacen("postgres@", &format!("{role}@"), 1);

    let refused = tokio_postgres::connect(&as_role, tokio_postgres::NoTls)
        .await
        .err()
        .expect("the role may not connect");

    assert_classified(refused, "53300", true);
}

/// Failures without a SQLSTATE are the connection's own: a server that refuses
/// connections, or a session the server ended. Both may pass by themselves.
#[tokio::test]
async fn connection_failures_without_a_sqlstate_are_retryable() {
    let nobody_listens = format!("postgres://sync@{}/gone", free_address());
    let refused = tokio_postgres::connect(&nobody_listens, tokio_postgres::NoTls)
        .await
        .err()
        .expect("nothing listens there");
    assert_eq!(sqlstate(&refused), None, "{refused:?}");
    assert!(SyncError::Target(refused).is_retryable());

    let (url, tenant) = tenant_database().await;
    let client = connect(&url).await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    sqlx::query("select pg_terminate_backend($1)")
        .bind(pid)
        .execute(&tenant)
        .await
        .unwrap();
    let client = &client;
    let ended = wait::until(
        "the ended session to fail",
        Duration::from_secs(10),
        || async move { client.batch_execute("select 1").await.err() },
    )
    .await;
    // The server says why (57P01) when its goodbye arrives before the next statement,
    // and nothing when the connection is simply gone; retryable either way.
    assert!(
        matches!(sqlstate(&ended), None | Some("57P01")),
        "{ended:?}"
    );
    assert!(SyncError::Target(ended).is_retryable());
}
