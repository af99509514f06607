//! What the statements gathered for several askers share (reads of changes in
//! [`crate::sync`], completions of requests in [`crate::completions`]): taking the asks
//! that are ready as one group, and passing a failure to reach the internal database on
//! to every asker.

use tokio::sync::mpsc;

/// Waits for the first ask, lets the other ready tasks run once (asks made at the same
/// moment arrive), and takes everything asked by then, at most `most` in all. `None`
/// once every sender is gone.
pub async fn next_group<T>(asked: &mut mpsc::UnboundedReceiver<T>, most: usize) -> Option<Vec<T>> {
    let first = asked.recv().await?;
    tokio::task::yield_now().await;
    let mut group = vec![first];
    while group.len() < most {
        match asked.try_recv() {
            Ok(more) => group.push(more),
            Err(_) => break,
        }
    }
    Some(group)
}

/// The same failure again, when `error` says that the internal database could not be
/// reached (no connection in time, the pool closed, the connection failed): a statement
/// gathered for several askers passes it to each, since a statement of their own would
/// only wait for it once more. `None` for any other failure.
pub fn unreachable(error: &sqlx::Error) -> Option<sqlx::Error> {
    match error {
        sqlx::Error::PoolTimedOut => Some(sqlx::Error::PoolTimedOut),
        sqlx::Error::PoolClosed => Some(sqlx::Error::PoolClosed),
        sqlx::Error::Io(io) => Some(sqlx::Error::Io(std::io::Error::new(
            io.kind(),
            io.to_string(),
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::unreachable;

    #[test]
    fn only_a_failure_to_reach_the_internal_database_is_passed_on_to_every_asker() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        match unreachable(&sqlx::Error::Io(refused)) {
            Some(sqlx::Error::Io(again)) => {
                assert_eq!(again.kind(), std::io::ErrorKind::ConnectionRefused);
                assert_eq!(again.to_string(), "refused");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            unreachable(&sqlx::Error::PoolTimedOut),
            Some(sqlx::Error::PoolTimedOut)
        ));
        assert!(matches!(
            unreachable(&sqlx::Error::PoolClosed),
            Some(sqlx::Error::PoolClosed)
        ));
        let refused_by_the_statement = sqlx::Error::Protocol("unexpected message".to_owned());
        assert!(unreachable(&refused_by_the_statement).is_none());
    }
}
