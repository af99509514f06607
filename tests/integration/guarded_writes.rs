//! The guarded statements a run uses when it writes without holding the mapping's lock
//! from its read on (`statements::guarded_upsert`, `statements::guarded_delete`),
//! run against a real tenant database: they write only while the mapping's watermark is
//! the one the run expects, so a run that another one overtook cannot put an older
//! state over a newer one.

use chrono::NaiveDateTime;
use external_db_sync::mapping::{ContactChannelRow, Mapping, Upserts, UserRow};
use external_db_sync::sync::statements::{self, Columns};
use sqlx::PgPool;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::harness::fixtures::{email, tenancy, tenant_database, user};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{attach, engine, sync_ok, watermark};

/// A client on `url`, as the engine's sessions are: a plain `tokio_postgres` client.
async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Writes as the service's sessions do: the tables' guard lets them through.
    client
        .batch_execute(&format!(
            "set {} = 'on'",
            external_db_sync::sync::schema::WRITER_SETTING
        ))
        .await
        .unwrap();
    client
}

/// A row of `mapping` with id `id` and a text value `value` (the user's display name,
/// the channel's value); a channel belongs to `owner`.
fn row(mapping: Mapping, id: Uuid, owner: Uuid, value: &str) -> Upserts {
    let now: NaiveDateTime = chrono::Utc::now().naive_utc();
    match mapping {
        Mapping::Users => Upserts::Users(vec![UserRow {
            id,
            display_name: Some(value.to_owned()),
            profile_image_url: None,
            primary_email: None,
            primary_email_verified: false,
            signed_up_at: now,
            client_metadata: "{}".to_owned(),
            client_read_only_metadata: "{}".to_owned(),
            server_metadata: "{}".to_owned(),
            is_anonymous: false,
        }]),
        Mapping::ContactChannels => Upserts::ContactChannels(vec![ContactChannelRow {
            id,
            user_id: owner,
            kind: "EMAIL".to_owned(),
            value: value.to_owned(),
            is_primary: false,
            is_verified: false,
            used_for_auth: false,
            created_at: now,
        }]),
    }
}

/// The text value of row `id` of `mapping`'s table (see [`row`]), if the row exists.
async fn stored(tenant: &PgPool, mapping: Mapping, id: Uuid) -> Option<String> {
    let sql = match mapping {
        Mapping::Users => "select display_name from users where id = $1",
        Mapping::ContactChannels => "select value from contact_channels where id = $1",
    };
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_optional(tenant)
        .await
        .unwrap()
}

/// Runs the guarded upsert of `upserts` expecting `watermark`; returns the rows written.
async fn guarded_upsert(
    client: &Client,
    mapping: Mapping,
    upserts: &Upserts,
    watermark: i64,
) -> u64 {
    let columns = Columns::of(upserts);
    let name = mapping.name();
    let mut params = columns.params();
    params.extend([&name as &(dyn ToSql + Sync), &watermark]);
    client
        .execute(statements::guarded_upsert(mapping), &params)
        .await
        .unwrap()
}

/// Runs the guarded delete of `ids` expecting `watermark`; returns the rows deleted.
async fn guarded_delete(client: &Client, mapping: Mapping, ids: &[Uuid], watermark: i64) -> u64 {
    let ids = ids.to_vec();
    let name = mapping.name();
    client
        .execute(
            statements::guarded_delete(mapping),
            &[&ids, &name, &watermark],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn guarded_writes_write_nothing_unless_the_watermark_is_the_expected_one() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let (url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &url)]).await;
    // A first sync creates the tables and sets both mappings' watermarks.
    let owner = user(&pool, tenancy, "owner").await;
    email(&pool, tenancy, owner, "owner@example.com", true).await;
    sync_ok(&pool, &engine(&pool), tenancy).await;
    let client = connect(&url).await;

    for mapping in Mapping::ALL {
        let current = watermark(&tenant, mapping.name()).await;
        assert!(current > 0, "{mapping:?}: the first sync set the watermark");
        let stale = [current - 1, current + 1];
        let id = Uuid::new_v4();

        // A new row: inserted only at the current watermark.
        let first = row(mapping, id, owner, "first");
        for expected in stale {
            assert_eq!(
                guarded_upsert(&client, mapping, &first, expected).await,
                0,
                "{mapping:?}: insert expecting {expected}, the watermark being {current}"
            );
            assert_eq!(stored(&tenant, mapping, id).await, None, "{mapping:?}");
        }
        assert_eq!(guarded_upsert(&client, mapping, &first, current).await, 1);
        assert_eq!(stored(&tenant, mapping, id).await.as_deref(), Some("first"));

        // An existing row: updated only at the current watermark.
        let second = row(mapping, id, owner, "second");
        for expected in stale {
            assert_eq!(
                guarded_upsert(&client, mapping, &second, expected).await,
                0,
                "{mapping:?}: update expecting {expected}, the watermark being {current}"
            );
            assert_eq!(
                stored(&tenant, mapping, id).await.as_deref(),
                Some("first"),
                "{mapping:?}"
            );
        }
        assert_eq!(guarded_upsert(&client, mapping, &second, current).await, 1);
        assert_eq!(
            stored(&tenant, mapping, id).await.as_deref(),
            Some("second")
        );

        // Deleted only at the current watermark.
        for expected in stale {
            assert_eq!(
                guarded_delete(&client, mapping, &[id], expected).await,
                0,
                "{mapping:?}: delete expecting {expected}, the watermark being {current}"
            );
            assert!(stored(&tenant, mapping, id).await.is_some(), "{mapping:?}");
        }
        assert_eq!(guarded_delete(&client, mapping, &[id], current).await, 1);
        assert_eq!(stored(&tenant, mapping, id).await, None, "{mapping:?}");

        // The statements never moved the watermark themselves.
        assert_eq!(watermark(&tenant, mapping.name()).await, current);
    }
}
