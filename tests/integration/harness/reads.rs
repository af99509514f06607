//! What one session read of some tables within its transaction: the backend's own counts
//! (`pg_stat_xact_user_tables`), which include its earlier statements' until they are
//! sent to the statistics, so they are read before and after the statement being
//! measured, in one transaction.

use sqlx::PgConnection;

/// What was read of one table between two [`counts`].
#[derive(Debug)]
pub struct TableReads {
    pub table: String,
    /// Sequential scans: the table read whole.
    pub whole: i64,
    /// Rows those sequential scans read.
    pub read_whole: i64,
    pub by_index: i64,
    pub fetched_by_index: i64,
}

impl TableReads {
    /// Every scan, sequential or by index.
    pub fn scans(&self) -> i64 {
        self.whole + self.by_index
    }

    /// Every row read, by sequential scans or through indexes.
    pub fn rows(&self) -> i64 {
        self.read_whole + self.fetched_by_index
    }
}

/// This backend's counts of reads of `tables` in the transaction so far, in name order.
pub async fn counts(session: &mut PgConnection, tables: &[&str]) -> Vec<TableReads> {
    let tables: Vec<String> = tables.iter().map(|table| table.to_string()).collect();
    let counted: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        r#"select relname::text, seq_scan, seq_tup_read, coalesce(idx_scan, 0),
                  coalesce(idx_tup_fetch, 0)
           from pg_stat_xact_user_tables
           where relname = any($1)
           order by relname"#,
    )
    .bind(&tables)
    .fetch_all(&mut *session)
    .await
    .unwrap();
    assert_eq!(counted.len(), tables.len(), "no such tables: {tables:?}");
    (counted.into_iter())
        .map(
            |(table, whole, read_whole, by_index, fetched_by_index)| TableReads {
                table,
                whole,
                read_whole,
                by_index,
                fetched_by_index,
            },
        )
        .collect()
}

/// What was read of the tables of `before` ([`counts`]) since, in the same transaction.
pub async fn since(session: &mut PgConnection, before: Vec<TableReads>) -> Vec<TableReads> {
    let tables: Vec<&str> = before.iter().map(|read| read.table.as_str()).collect();
    let after = counts(session, &tables).await;
    (after.into_iter().zip(before))
        .map(|(after, before)| TableReads {
            whole: after.whole - before.whole,
            read_whole: after.read_whole - before.read_whole,
            by_index: after.by_index - before.by_index,
            fetched_by_index: after.fetched_by_index - before.fetched_by_index,
            table: after.table,
        })
        .collect()
}
