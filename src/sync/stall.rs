//! A tenant database that stops answering in the middle of a sync.
//!
//! The server's own timeouts (statement, lock, idle in transaction) end a slow statement
//! with an error, but only a server that runs can send it. A frozen server, a stopped
//! process, or a middlebox that takes the bytes and passes nothing on, answers nothing
//! at all, and TCP keeps the connection up: the sync would wait for ever, holding a
//! worker. So every tenant connection's stream is [`Watched`]: while the session is in
//! use by a sync, a connection on which nothing moved either way for longer than the
//! limit (the statement timeout and a grace period) fails with a timeout, and every
//! request waiting on it with it. A kept session waiting for its next sync is silent by
//! right and is not watched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Beyond the statement timeout, how long a server may take to answer that it ended a
/// statement, before its silence counts as a stall: as long as the timeout itself, at
/// most this.
const MAX_GRACE: Duration = Duration::from_secs(10);

/// How long a session in use may hear nothing from a server whose statements end after
/// `statement_timeout`.
pub fn limit(statement_timeout: Duration) -> Duration {
    statement_timeout + statement_timeout.min(MAX_GRACE)
}

/// Whether a session is in use, and when anything last moved on its connection.
#[derive(Debug, Clone)]
pub struct StallWatch(Arc<WatchState>);

#[derive(Debug)]
struct WatchState {
    limit: Duration,
    started: Instant,
    /// Milliseconds after `started` of the last byte read or written.
    last_activity_ms: AtomicU64,
    in_use: AtomicBool,
}

impl StallWatch {
    /// A watch for a new session, in use from now: `limit` of silence is a stall.
    pub fn new(limit: Duration) -> Self {
        Self(Arc::new(WatchState {
            limit,
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            in_use: AtomicBool::new(true),
        }))
    }

    /// A sync takes the session (the silence while it was kept does not count) or gives
    /// it back.
    pub fn set_in_use(&self, in_use: bool) {
        self.touch();
        self.0.in_use.store(in_use, Ordering::SeqCst);
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_activity_ms.fetch_max(elapsed, Ordering::SeqCst);
    }

    /// When the connection counts as stalled, if the session is in use.
    fn deadline(&self) -> Option<Instant> {
        if !self.0.in_use.load(Ordering::SeqCst) {
            return None;
        }
        let last = Duration::from_millis(self.0.last_activity_ms.load(Ordering::SeqCst));
        Some(self.0.started + last + self.0.limit)
    }

    fn stalled(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the tenant database sent nothing for {} s while a sync waited for it",
                self.0.limit.as_secs()
            ),
        )
    }
}

/// A connection's stream under a [`StallWatch`].
pub struct Watched<S> {
    inner: S,
    watch: StallWatch,
    timer: Pin<Box<Sleep>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, watch: StallWatch) -> Self {
        Self {
            inner,
            watch,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.watch.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                // The connection's task polls its reads again whenever the client sends a
                // request, so a session taken into use gets its timer here.
                let Some(deadline) = this.watch.deadline() else {
                    return Poll::Pending;
                };
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(this.watch.stalled()));
                }
                this.timer.as_mut().reset(deadline);
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.watch.stalled())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.touch();
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_session_in_use_fails_after_the_limit_of_silence_and_an_idle_one_waits() {
        let (client, mut server) = tokio::io::duplex(64);
        let watch = StallWatch::new(Duration::from_secs(5));
        let mut watched = Watched::new(client, watch.clone());

        // In use: the server answers, then goes silent.
        watched.write_all(b"ask").await.unwrap();
        let mut asked = [0u8; 3];
        server.read_exact(&mut asked).await.unwrap();
        server.write_all(b"ok").await.unwrap();
        let mut answer = [0u8; 2];
        watched.read_exact(&mut answer).await.unwrap();
        let started = Instant::now();
        let mut more = [0u8; 1];
        let error = watched.read(&mut more).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        // Given back (kept), the same silence is no stall: the read is still waiting
        // long after the limit, and gets what the server sends.
        let (client, mut server) = tokio::io::duplex(64);
        let watch = StallWatch::new(Duration::from_secs(5));
        let mut watched = Watched::new(client, watch.clone());
        watch.set_in_use(false);
        let read = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            watched.read_exact(&mut byte).await.map(|_| byte[0])
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!read.is_finished());
        server.write_all(b"n").await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b'n');
    }
}
