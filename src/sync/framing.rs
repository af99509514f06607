//! A bound on what a tenant server may send, enforced on the bytes before anything
//! buffers them.
//!
//! tokio-postgres reads every backend message whole before anyone sees it: an error a
//! tenant's trigger raises with a 200 MB message is 200 MB of the service's memory, and
//! a query whose rows the tenant controls is held whole as its answer. So every tenant
//! connection's plain-text protocol stream is [`Bounded`]: it follows the backend
//! framing (a one-byte tag and a four-byte length in front of every message) as the
//! bytes go by, and fails the connection, before the body is read, when
//! - one message says it is longer than the limit (`SYNC_MAX_TENANT_MESSAGE_BYTES`); or
//! - the rows of one answer (`DataRow` and `CopyData` messages up to the next
//!   `ReadyForQuery`) add up to more than the same limit, since a query's rows are held
//!   together until it is answered.
//!
//! Notices and notifications are not held: the connection's task logs or drops each
//! before it reads the next, so a stream of them cannot add up (the tests send 100,000).
//!
//! The bound sits where the protocol is plain text: on the socket itself when the
//! connection is not encrypted, and on top of TLS otherwise ([`BoundedTls`]), where the
//! socket's own [`Bounded`] only lets the one-byte answer to the TLS request through
//! and then steps aside for the TLS records (rustls bounds those itself).
//!
//! A connection that tripped the bound remembers why ([`MessageBound::tripped`]): the
//! requests it was serving only see a closed connection, and the sync turns that into
//! a permanent [`super::SyncError::MessageTooLarge`] for the database.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// The default of `SYNC_MAX_TENANT_MESSAGE_BYTES`: a real row of the synced schema fits
/// many times over.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 8 * 1024 * 1024;

/// What tripped the bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    /// One message longer than the limit.
    #[error(
        "the tenant server sent {kind} of {length} bytes, over the limit of {limit} bytes \
         (SYNC_MAX_TENANT_MESSAGE_BYTES)"
    )]
    Message {
        kind: &'static str,
        length: u64,
        limit: u64,
    },
    /// The rows of one answer, together longer than the limit.
    #[error(
        "the tenant server answered one query with more than {limit} bytes of rows \
         (SYNC_MAX_TENANT_MESSAGE_BYTES)"
    )]
    Rows { limit: u64 },
}

/// The limit of one connection, and what tripped it if anything did. Clones share it:
/// the connection's streams trip it, the session asks it.
#[derive(Debug, Clone)]
pub struct MessageBound {
    limit: u64,
    tripped: Arc<OnceLock<TooLarge>>,
}

impl MessageBound {
    /// A bound of `limit` bytes per message and per answer's rows.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            tripped: Arc::default(),
        }
    }

    /// Why the connection was failed, if it was.
    pub fn tripped(&self) -> Option<&TooLarge> {
        self.tripped.get()
    }

    fn trip(&self, too_large: TooLarge) -> io::Error {
        let first = self.tripped.get_or_init(|| too_large);
        io::Error::new(io::ErrorKind::InvalidData, first.clone())
    }
}

/// Where a [`Bounded`] stream is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The server's one-byte answer to the TLS request comes first: `S` starts TLS
    /// (and the stream becomes [`Phase::Opaque`]), anything else is followed by
    /// plain-text messages.
    TlsAnswer,
    /// Backend messages, each a tag, a length and a body.
    Messages,
    /// TLS records: bounded above the TLS layer, not here.
    Opaque,
    /// The bound was tripped; every later read fails the same way.
    Failed,
}

/// The header and body of the message being read.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    header_read: usize,
    body_left: u64,
    /// Bytes of `DataRow` and `CopyData` messages since the last `ReadyForQuery`.
    rows_in_answer: u64,
}

impl Framing {
    /// Follows `bytes`, the next ones of the stream, checking each header as soon as
    /// it is whole.
    fn follow(&mut self, mut bytes: &[u8], limit: u64) -> Result<(), TooLarge> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                self.body_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(self.header.len() - self.header_read);
            self.header[self.header_read..self.header_read + n].copy_from_slice(&bytes[..n]);
            self.header_read += n;
            bytes = &bytes[n..];
            if self.header_read == self.header.len() {
                self.header_read = 0;
                self.begin_message(limit)?;
            }
        }
        Ok(())
    }

    /// Checks the header just read: the length counts itself, not the tag.
    fn begin_message(&mut self, limit: u64) -> Result<(), TooLarge> {
        let tag = self.header[0];
        let length = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        let body = u64::from(length.saturating_sub(4));
        if body > limit {
            return Err(TooLarge::Message {
                kind: message_kind(tag),
                length: body,
                limit,
            });
        }
        match tag {
            b'D' | b'd' => {
                self.rows_in_answer += body;
                if self.rows_in_answer > limit {
                    return Err(TooLarge::Rows { limit });
                }
            }
            b'Z' => self.rows_in_answer = 0,
            _ => {}
        }
        self.body_left = body;
        Ok(())
    }
}

/// What a message with `tag` is, for the error.
fn message_kind(tag: u8) -> &'static str {
    match tag {
        b'E' => "an error",
        b'N' => "a notice",
        b'D' => "a row",
        b'd' => "a COPY frame",
        b'S' => "a parameter status",
        b'R' => "an authentication message",
        b'A' => "a notification",
        b'T' => "a row description",
        _ => "a message",
    }
}

/// A stream of a tenant connection under a [`MessageBound`].
pub struct Bounded<S> {
    inner: S,
    bound: MessageBound,
    phase: Phase,
    framing: Framing,
}

impl<S> Bounded<S> {
    /// A stream that carries backend messages from its first byte.
    pub fn messages(inner: S, bound: MessageBound) -> Self {
        Self::in_phase(inner, bound, Phase::Messages)
    }

    /// The socket of a connection that asks for TLS: the server's answer to the
    /// request comes first.
    pub fn asking_for_tls(inner: S, bound: MessageBound) -> Self {
        Self::in_phase(inner, bound, Phase::TlsAnswer)
    }

    fn in_phase(inner: S, bound: MessageBound, phase: Phase) -> Self {
        Self {
            inner,
            bound,
            phase,
            framing: Framing::default(),
        }
    }

    /// Follows the bytes just read; `Err` when they trip the bound.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.phase == Phase::TlsAnswer {
            let Some((&answer, rest)) = bytes.split_first() else {
                return Ok(());
            };
            if answer == b'S' {
                self.phase = Phase::Opaque;
                return Ok(());
            }
            self.phase = Phase::Messages;
            bytes = rest;
        }
        if self.phase != Phase::Messages {
            return Ok(());
        }
        self.framing
            .follow(bytes, self.bound.limit)
            .map_err(|too_large| {
                self.phase = Phase::Failed;
                self.bound.trip(too_large)
            })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Failed {
            let tripped = this.bound.tripped().cloned();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                tripped.unwrap_or(TooLarge::Rows {
                    limit: this.bound.limit,
                }),
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(error) = this.follow(&buf.filled()[before..]) {
            // Nothing of what tripped the bound reaches the reader.
            buf.set_filled(before);
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Bounded<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose encrypted streams are [`Bounded`] on top, where the protocol
/// is plain text again.
pub struct BoundedTls<T> {
    inner: T,
    bound: MessageBound,
}

impl<T> BoundedTls<T> {
    pub fn new(inner: T, bound: MessageBound) -> Self {
        Self { inner, bound }
    }
}

impl<S, T> TlsConnect<S> for BoundedTls<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = Bounded<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connecting = self.inner.connect(stream);
        let bound = self.bound;
        Box::pin(async move { Ok(Bounded::messages(connecting.await?, bound)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMIT: u64 = 1024;

    /// A backend message: tag, length (counting itself) and a body of `body` bytes.
    fn message(tag: u8, body: usize) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(u32::try_from(body + 4).unwrap()).to_be_bytes());
        bytes.resize(5 + body, b'x');
        bytes
    }

    /// Everything a bounded stream of `bytes` lets through, or its error.
    async fn read_all(bytes: Vec<u8>, bound: &MessageBound) -> io::Result<Vec<u8>> {
        let mut stream = Bounded::messages(&bytes[..], bound.clone());
        let mut read = Vec::new();
        stream.read_to_end(&mut read).await?;
        Ok(read)
    }

    #[tokio::test]
    async fn a_message_exactly_at_the_limit_passes_whole() {
        let bound = MessageBound::new(LIMIT);
        let bytes = [message(b'E', 1024), message(b'Z', 1)].concat();

        let read = read_all(bytes.clone(), &bound).await.unwrap();

        assert_eq!(read, bytes);
        assert_eq!(bound.tripped(), None);
    }

    #[tokio::test]
    async fn one_byte_over_fails_on_the_header_without_waiting_for_the_body() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let bound = MessageBound::new(LIMIT);
        let mut stream = Bounded::messages(client, bound.clone());
        // A whole message, then only the header of one a byte too long: its body is
        // never sent, so a reader that waited for it would wait for ever.
        server.write_all(&message(b'N', 10)).await.unwrap();
        server.write_all(&message(b'E', 1025)[..5]).await.unwrap();

        let mut first = vec![0; 15];
        stream.read_exact(&mut first).await.unwrap();
        let mut rest = vec![0; 16];
        let error = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut rest))
            .await
            .expect("the header alone fails the read")
            .unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            bound.tripped(),
            Some(&TooLarge::Message {
                kind: "an error",
                length: 1025,
                limit: LIMIT
            })
        );
        // The stream stays failed.
        assert!(stream.read(&mut rest).await.is_err());
    }

    #[tokio::test]
    async fn nothing_of_a_read_that_trips_the_bound_reaches_the_reader() {
        let bound = MessageBound::new(LIMIT);
        let bytes = [message(b'Z', 1), message(b'D', 5000)].concat();
        let mut stream = Bounded::messages(&bytes[..], bound.clone());
        let mut buffer = vec![0; 64];
        let mut read_buf = ReadBuf::new(&mut buffer);

        let polled = futures::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut stream).poll_read(cx, &mut read_buf))
        })
        .await;

        assert!(matches!(polled, Poll::Ready(Err(_))));
        assert!(read_buf.filled().is_empty());
    }

    #[tokio::test]
    async fn the_rows_of_one_answer_add_up_and_start_over_at_ready_for_query() {
        // Two answers of 3 rows of 300 bytes each pass; 4 rows in one answer do not.
        let rows = |n: usize| (0..n).flat_map(|_| message(b'D', 300)).collect::<Vec<_>>();
        let two_answers = [rows(3), message(b'Z', 1), rows(3), message(b'Z', 1)].concat();
        assert!(read_all(two_answers, &MessageBound::new(LIMIT))
            .await
            .is_ok());

        let bound = MessageBound::new(LIMIT);
        let error = read_all(rows(4), &bound).await.unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(bound.tripped(), Some(&TooLarge::Rows { limit: LIMIT }));
    }

    #[tokio::test]
    async fn notices_do_not_add_up() {
        let notices: Vec<u8> = (0..100).flat_map(|_| message(b'N', 1000)).collect();
        assert!(read_all(notices, &MessageBound::new(LIMIT)).await.is_ok());
    }

    #[tokio::test]
    async fn headers_split_across_reads_are_checked_whole() {
        let (client, mut server) = tokio::io::duplex(64);
        let bound = MessageBound::new(LIMIT);
        let mut stream = Bounded::messages(client, bound.clone());
        let header = message(b'E', 2000);
        let reading = tokio::spawn(async move {
            let mut sink = vec![0; 16];
            loop {
                match stream.read(&mut sink).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(error),
                }
            }
        });
        for byte in &header[..5] {
            server.write_all(&[*byte]).await.unwrap();
            server.flush().await.unwrap();
        }

        let error = reading.await.unwrap().unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(bound.tripped().is_some());
    }

    #[tokio::test]
    async fn the_answer_to_the_tls_request_comes_before_the_messages() {
        // `N`: no TLS, plain messages follow and are bounded.
        let bound = MessageBound::new(LIMIT);
        let bytes = [b"N".to_vec(), message(b'E', 2000)].concat();
        let mut plain = Bounded::asking_for_tls(&bytes[..], bound.clone());
        let mut sink = Vec::new();
        assert!(plain.read_to_end(&mut sink).await.is_err());
        assert!(bound.tripped().is_some());

        // `S`: TLS records follow, which only the stream above TLS can read.
        let bound = MessageBound::new(LIMIT);
        let records = [b"S".to_vec(), message(b'E', 2000)].concat();
        let mut encrypted = Bounded::asking_for_tls(&records[..], bound.clone());
        let mut sink = Vec::new();
        encrypted.read_to_end(&mut sink).await.unwrap();
        assert_eq!(sink, records);
        assert_eq!(bound.tripped(), None);
    }
}
