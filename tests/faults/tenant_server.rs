//! A tenant database's server killed with SIGKILL in the middle of a run of batches,
//! then started again on the same port and data.

use std::time::{Duration, Instant};

use crate::harness::fixtures::{tenancy, user};
use crate::harness::postgres::{pool, server, ClusterSetup, RestartableServer, Server};
use crate::harness::sync::{attach, latest_change, wait_until_equal, watermark};
use crate::harness::wait;
use crate::tenant_link::serve;

/// A tenancy whose only database (`main`) is on a tenant server of its own, which a test
/// may kill: the internal database's URL and pool, the server, the tenant database's
/// URL, and the tenancy.
pub struct OwnTenantServer {
    pub internal_url: String,
    pub internal: sqlx::PgPool,
    pub tenant_server: RestartableServer,
    pub tenant_url: String,
    pub tenancy: uuid::Uuid,
}

pub async fn tenancy_on_its_own_tenant_server() -> OwnTenantServer {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let tenant_server = RestartableServer::start(&ClusterSetup::default());
    let tenant_url = Server::without_template(tenant_server.base_url())
        .empty_database("tenant")
        .await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &tenant_url)]).await;
    OwnTenantServer {
        internal_url,
        internal,
        tenant_server,
        tenant_url,
        tenancy,
    }
}

#[tokio::test]
async fn a_tenant_server_killed_mid_batch_is_caught_up_after_its_restart() {
    let OwnTenantServer {
        internal_url,
        internal,
        tenant_server,
        tenant_url,
        tenancy,
    } = tenancy_on_its_own_tenant_server().await;
    user(&internal, tenancy, "first").await;
    // Small batches, each slowed down by the tenant: the run of batches takes seconds.
    let app = serve(&internal_url, &[("SYNC_BATCH_SIZE", "20")]).await;
    let tenant = pool(&tenant_url).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    sqlx::raw_sql(
        "create function slow_down() returns trigger language plpgsql as $$
         begin perform pg_sleep(0.01); return null; end $$;
         create trigger slow_down after insert or update on users
             for each statement execute function slow_down();",
    )
    .execute(&tenant)
    .await
    .unwrap();
    let started_at = watermark(&tenant, "users").await;
    crate::harness::fixtures::users(&internal, tenancy, 2_000, "bulk ").await;
    let reached = wait::until(
        "the batches to be under way",
        Duration::from_secs(30),
        || async {
            let now = watermark(&tenant, "users").await;
            (now > started_at).then_some(now)
        },
    )
    .await;
    tenant.close().await;
    tenant_server.kill();
    let killed_at = Instant::now();
    let numbered_through = latest_change(&internal, tenancy, "ProjectUser").await;
    assert!(
        reached < numbered_through,
        "killed before the last batch: {reached} < {numbered_through}"
    );
    // Down for a moment: the service records failures and keeps its place.
    wait::until(
        "a failed attempt while the server is down",
        Duration::from_secs(30),
        || async {
            let failures: i32 = sqlx::query_scalar(
                r#"select "consecutiveFailures" from "ExternalDbSyncStatus"
                   where "tenancyId" = $1 and "databaseId" = 'main'"#,
            )
            .bind(tenancy)
            .fetch_one(&internal)
            .await
            .unwrap();
            (failures > 0).then_some(())
        },
    )
    .await;
    tenant_server.restart();

    let tenant = pool(&tenant_url).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    assert_eq!(
        watermark(&tenant, "users").await,
        latest_change(&internal, tenancy, "ProjectUser").await,
        "caught up through the latest change"
    );
    println!(
        "equal {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    app.stop().await.unwrap();
}
