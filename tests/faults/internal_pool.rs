//! The service's pool of connections to the internal database, behind a proxy: a
//! statement in steady use is sent at once, without a round trip of its own first, and a
//! connection dropped while it sat idle is replaced, not handed out.

use std::time::Duration;

use external_db_sync::db::{self, DatabaseSettings, PING_IDLE_AFTER};
use sqlx::PgPool;

use crate::harness::postgres::{pool, server};
use crate::harness::wait;
use crate::proxy::{Direction, Proxy};

/// A migrated internal database, a pool on it, the proxy, and the service's pool of
/// `max_connections` to it through the proxy ([`db::connect`]), nothing opened yet.
pub(crate) async fn service_through_proxy(max_connections: u32) -> (PgPool, Proxy, PgPool) {
    let url = server().migrated_database().await;
    let direct = pool(&url).await;
    let (proxy, proxied) = Proxy::in_front_of(&url).await;
    let settings = DatabaseSettings {
        connect_options: proxied.parse().unwrap(),
        max_connections,
    };
    let service = db::connect(&settings).await.unwrap();
    (direct, proxy, service)
}

/// [`service_through_proxy`] with one connection, opened and back in the pool.
async fn pool_through_proxy() -> (PgPool, Proxy, PgPool) {
    let (direct, proxy, service) = service_through_proxy(1).await;
    sqlx::query("select 1").execute(&service).await.unwrap();
    back_in_the_pool(&service, 1).await;
    (direct, proxy, service)
}

/// Waits until `idle` of the pool's connections are idle in it: sqlx pings a connection
/// as it comes back, and only then is it idle.
pub(crate) async fn back_in_the_pool(service: &PgPool, idle: usize) {
    wait::until(
        "the connection back in the pool",
        Duration::from_secs(10),
        || async { (service.num_idle() == idle).then_some(()) },
    )
    .await;
}

/// With the server's answers held, a statement on a connection just used still reaches
/// the server: the pool sent it without waiting for an answer to a ping first (which
/// cost a round trip per statement).
#[tokio::test]
async fn a_connection_in_use_is_not_pinged_before_a_statement() {
    let (direct, proxy, service) = pool_through_proxy().await;
    sqlx::query("create table arrived (n int)")
        .execute(&direct)
        .await
        .unwrap();
    // Once first, so that the session has it prepared (preparing waits for answers).
    sqlx::query("insert into arrived values (1)")
        .execute(&service)
        .await
        .unwrap();
    back_in_the_pool(&service, 1).await;

    proxy.hold(Direction::ToClient);
    let inserting = tokio::spawn(async move {
        sqlx::query("insert into arrived values (1)")
            .execute(&service)
            .await
    });
    until_arrived(&direct, 2).await;
    proxy.resume();
    inserting.await.unwrap().unwrap();
}

/// Waits until the table `arrived` holds `rows` rows, as `direct` sees it.
pub(crate) async fn until_arrived(direct: &PgPool, rows: i64) {
    wait::until(
        "the insert at the server",
        Duration::from_secs(10),
        || async {
            let count: i64 = sqlx::query_scalar("select count(*) from arrived")
                .fetch_one(direct)
                .await
                .unwrap();
            (count == rows).then_some(())
        },
    )
    .await;
}

/// A connection that the network dropped while it sat idle is pinged before it is
/// handed out, found dead and replaced: the next statement succeeds on a new one.
#[tokio::test]
async fn a_connection_dropped_while_idle_is_replaced() {
    let (_direct, proxy, service) = pool_through_proxy().await;
    assert_eq!(proxy.accepted(), 1);

    proxy.cut();
    // What the behaviour is about: the connection idle for as long as the pool waits
    // before it pings one.
    tokio::time::sleep(PING_IDLE_AFTER + Duration::from_millis(100)).await;
    let answer: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&service)
        .await
        .expect("a new connection answers");
    assert_eq!(answer, 1);
    assert_eq!(proxy.accepted(), 2, "the dropped connection was replaced");
}
