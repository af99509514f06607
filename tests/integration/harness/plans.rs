//! How a session planned a statement it prepared: `pg_prepared_statements` counts, per
//! prepared statement, the calls planned for their values and those run on the plan kept
//! for any values (PostgreSQL 14 and newer).

use sqlx::PgConnection;

/// The calls of the statement `session` prepared whose text matches `pattern` (a regular
/// expression): (run on the kept plan, planned for their values). `None` on a server too
/// old to count them.
pub async fn of_statement(session: &mut PgConnection, pattern: &str) -> Option<(i64, i64)> {
    let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
        .fetch_one(&mut *session)
        .await
        .unwrap();
    if version < 140000 {
        eprintln!("PostgreSQL {version} does not count plans per prepared statement");
        return None;
    }
    let counted: (i64, i64) = sqlx::query_as(
        "select generic_plans, custom_plans from pg_prepared_statements \
         where statement ~ $1 and statement not like '%pg_prepared_statements%'",
    )
    .bind(pattern)
    .fetch_one(&mut *session)
    .await
    .unwrap();
    Some(counted)
}
