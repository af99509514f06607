//! Connections kept warm between the statements of the busiest loops
//! (`db::warm`), behind a proxy: a settled connection is used again at once, without a
//! round trip of its own; one whose link failed, one that went cold and one dropped
//! mid-statement go back to the pool; and keeping one never takes the pool's last
//! connection from anyone else, nor holds up the pool's closing.

use std::time::{Duration, Instant};

use external_db_sync::db::warm::{WarmConnection, WarmConnections, SWEEP_EVERY};
use external_db_sync::db::PING_IDLE_AFTER;
use sqlx::PgPool;

use crate::harness::wait;
use crate::internal_pool::{back_in_the_pool, service_through_proxy, until_arrived};
use crate::proxy::{Direction, Proxy};

/// A migrated internal database, a pool on it, the proxy, and warm connections on the
/// service's pool of `max_connections` through the proxy.
async fn warm_through_proxy(max_connections: u32) -> (PgPool, Proxy, WarmConnections) {
    let (direct, proxy, service) = service_through_proxy(max_connections).await;
    (direct, proxy, WarmConnections::new(service))
}

/// The backend's process id, on `connection`, settled.
async fn backend_of(mut connection: WarmConnection) -> Result<i32, sqlx::Error> {
    let pid = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *connection)
        .await;
    connection.settle(pid)
}

/// A settled connection is kept, and the next statement goes out on it at once: with
/// the server's answers held, it still reaches the server (a connection given back to
/// the pool is pinged, and the next statement waits for that ping's answer).
#[tokio::test]
async fn a_settled_connection_is_used_again_without_a_round_trip_of_its_own() {
    let (direct, proxy, warm) = warm_through_proxy(4).await;
    sqlx::query("create table arrived (n int)")
        .execute(&direct)
        .await
        .unwrap();
    let insert = |warm: WarmConnections| async move {
        let mut connection = warm.take().await?;
        let inserted = sqlx::query("insert into arrived values (1)")
            .execute(&mut *connection)
            .await;
        connection.settle(inserted)
    };
    let first = backend_of(warm.take().await.unwrap()).await.unwrap();
    // Once more, so that the session has the insert prepared (preparing waits).
    insert(warm.clone()).await.unwrap();
    assert_eq!(warm.kept(), 1);
    assert_eq!(warm.pool().num_idle(), 0, "kept out of the pool");

    proxy.hold(Direction::ToClient);
    let inserting = tokio::spawn(insert(warm.clone()));
    until_arrived(&direct, 2).await;
    proxy.resume();
    inserting.await.unwrap().unwrap();

    let again = backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(again, first, "the same session throughout");
    assert_eq!(proxy.accepted(), 1);
}

/// An error the server answered leaves the session sound: the connection is kept.
#[tokio::test]
async fn a_connection_whose_statement_the_server_refused_is_kept() {
    let (_direct, proxy, warm) = warm_through_proxy(4).await;
    let first = backend_of(warm.take().await.unwrap()).await.unwrap();

    let mut connection = warm.take().await.unwrap();
    let refused = sqlx::query("select 1 / 0").execute(&mut *connection).await;
    let refused = connection.settle(refused);
    assert!(
        matches!(refused, Err(sqlx::Error::Database(_))),
        "{refused:?}"
    );
    assert_eq!(warm.kept(), 1);

    assert_eq!(backend_of(warm.take().await.unwrap()).await.unwrap(), first);
    assert_eq!(proxy.accepted(), 1);
}

/// A link that failed under a statement may have left the session anywhere: the
/// connection goes back to the pool (which closes it), and the next statement runs on
/// a new one.
#[tokio::test]
async fn a_connection_whose_link_failed_is_not_kept() {
    let (_direct, proxy, warm) = warm_through_proxy(4).await;
    backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(warm.kept(), 1);

    proxy.cut();
    let failed = backend_of(warm.take().await.unwrap()).await;
    assert!(failed.is_err(), "the statement failed with the link");
    assert!(
        !matches!(failed, Err(sqlx::Error::Database(_))),
        "{failed:?}"
    );
    assert_eq!(warm.kept(), 0);

    backend_of(warm.take().await.unwrap())
        .await
        .expect("a new connection answers");
    assert_eq!(proxy.accepted(), 2, "the failed connection was replaced");
}

/// A kept connection unused for [`PING_IDLE_AFTER`] goes back to the pool by itself,
/// to be pinged there before it is handed out again.
#[tokio::test]
async fn a_connection_that_went_cold_goes_back_to_the_pool() {
    let (_direct, _proxy, warm) = warm_through_proxy(4).await;
    let settled_at = Instant::now();
    backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(warm.kept(), 1);

    wait::until(
        "the kept connection given back",
        PING_IDLE_AFTER + SWEEP_EVERY * 2 + Duration::from_secs(5),
        || async { (warm.kept() == 0).then_some(()) },
    )
    .await;
    assert!(settled_at.elapsed() >= PING_IDLE_AFTER, "kept while warm");
    back_in_the_pool(warm.pool(), 1).await;
}

/// A connection whose statement was dropped half-way (its future cancelled) is never
/// kept: it goes back to the pool, which waits for the session to be ready again.
#[tokio::test]
async fn a_connection_dropped_unsettled_goes_back_to_the_pool() {
    let (_direct, _proxy, warm) = warm_through_proxy(4).await;
    let mut connection = warm.take().await.unwrap();
    let sleeping = sqlx::query("select pg_sleep(1)").execute(&mut *connection);
    let cancelled = tokio::time::timeout(Duration::from_millis(100), sleeping).await;
    assert!(cancelled.is_err(), "the statement was still running");
    drop(connection);

    assert_eq!(warm.kept(), 0);
    back_in_the_pool(warm.pool(), 1).await;
    // The session is usable again: the pool's ping waited out the statement.
    backend_of(warm.take().await.unwrap()).await.unwrap();
}

/// Keeping a connection never leaves the pool without one for everybody else: the
/// pool's last connection goes back to it.
#[tokio::test]
async fn the_pools_last_connection_is_not_kept() {
    let (_direct, _proxy, warm) = warm_through_proxy(2).await;
    let elsewhere = warm.pool().acquire().await.unwrap();

    backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(warm.kept(), 0, "the pool had no other connection to give");
    back_in_the_pool(warm.pool(), 1).await;

    drop(elsewhere);
    back_in_the_pool(warm.pool(), 2).await;
    backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(warm.kept(), 1, "kept once the pool can spare it");
}

/// Connections kept while the pool could spare them go back to it once it cannot: the
/// next take uses one and gives the others back.
#[tokio::test]
async fn kept_connections_go_back_when_the_pool_runs_out() {
    let (_direct, _proxy, warm) = warm_through_proxy(3).await;
    let (one, two) = (warm.take().await.unwrap(), warm.take().await.unwrap());
    backend_of(one).await.unwrap();
    backend_of(two).await.unwrap();
    assert_eq!(warm.kept(), 2);
    let elsewhere = warm.pool().acquire().await.unwrap();
    assert_eq!(warm.pool().num_idle(), 0, "the pool is out of connections");

    let taken = warm.take().await.unwrap();
    assert_eq!(warm.kept(), 0, "the other kept connection went back");
    back_in_the_pool(warm.pool(), 1).await;
    backend_of(taken).await.unwrap();
    drop(elsewhere);
}

/// Closing the pool waits for every connection out of it: the kept ones go back at
/// once, not when they go cold.
#[tokio::test]
async fn closing_the_pool_takes_the_kept_connections_back_at_once() {
    let (_direct, _proxy, warm) = warm_through_proxy(4).await;
    backend_of(warm.take().await.unwrap()).await.unwrap();
    assert_eq!(warm.kept(), 1);

    let closing = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), warm.pool().close())
        .await
        .expect("the pool closed");
    assert!(
        closing.elapsed() < PING_IDLE_AFTER,
        "closed in {:?}, before the kept connection went cold",
        closing.elapsed()
    );
    assert_eq!(warm.kept(), 0);
}
