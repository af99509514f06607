//! Which database a session is connected to, however it was reached.

/// A database's identity: the cluster's system identifier (unique per `initdb`) and the
/// database's oid in that cluster. Two sessions see the same identity only if they are
/// connected to the same database, whatever host name, address, port or socket path
/// each used to get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseIdentity {
    pub system_identifier: i64,
    pub database_oid: i64,
}

/// The query that reads a [`DatabaseIdentity`]: two columns, both schema-qualified so
/// that no object of the connected database can answer in their place, whatever its
/// `search_path`.
pub const IDENTITY_COLUMNS: &str = "(select system_identifier \
       from pg_catalog.pg_control_system()) as system_identifier, \
     (select oid::pg_catalog.int8 from pg_catalog.pg_database \
       where datname OPERATOR(pg_catalog.=) pg_catalog.current_database()) as database_oid";

/// The identity of the database behind `executor`.
pub async fn read(executor: impl sqlx::PgExecutor<'_>) -> Result<DatabaseIdentity, sqlx::Error> {
    let (system_identifier, database_oid) = sqlx::query_as(&format!("select {IDENTITY_COLUMNS}"))
        .fetch_one(executor)
        .await?;
    Ok(DatabaseIdentity {
        system_identifier,
        database_oid,
    })
}
