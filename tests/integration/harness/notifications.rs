//! Telling from a test whether anything was notified on a channel, without waiting in
//! hope: a sentinel sent now arrives after whatever was sent before it.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;

const SENTINEL: &str = "sentinel";

/// A listener on `channel` alone.
pub async fn listener_on(pool: &PgPool, channel: &str) -> PgListener {
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen(channel).await.unwrap();
    listener
}

/// Whether anything committed since the last call notified `channel` (`listener` listens
/// on it alone). Notifications arrive in commit order, so a sentinel sent now arrives
/// after any sent before: what comes first tells.
pub async fn notified(pool: &PgPool, listener: &mut PgListener, channel: &str) -> bool {
    sqlx::query("select pg_notify($1, $2)")
        .bind(channel)
        .bind(SENTINEL)
        .execute(pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("the sentinel arrives")
        .unwrap();
    if first.payload() == SENTINEL {
        return false;
    }
    // Drain up to the sentinel, so that the next call starts clean.
    while listener.recv().await.unwrap().payload() != SENTINEL {}
    true
}
