//! A TCP proxy the fault tests control, put between the service and a tenant database:
//! it forwards bytes both ways, and on command cuts every open connection, delays every
//! chunk, or holds one direction's bytes (a paused link) until resumed.
//!
//! A cut drops both sockets of every connection at once: the service sees its session
//! end in the middle of whatever it was doing, as when a network path or a NAT forgets
//! a connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// Which way bytes go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the service to the database: requests.
    ToServer,
    /// From the database to the service: answers.
    ToClient,
}

#[derive(Debug, Clone, Copy, Default)]
struct Link {
    delay: Duration,
    hold_to_server: bool,
    hold_to_client: bool,
    /// Connections numbered below this are held both ways, whatever the rest do.
    frozen_below: u64,
}

impl Link {
    fn holds(&self, direction: Direction, connection: u64) -> bool {
        connection < self.frozen_below
            || match direction {
                Direction::ToServer => self.hold_to_server,
                Direction::ToClient => self.hold_to_client,
            }
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    /// Bytes read and not yet forwarded (for long only while their direction is held).
    held_to_server: AtomicU64,
    held_to_client: AtomicU64,
}

impl Counters {
    fn held(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::ToServer => &self.held_to_server,
            Direction::ToClient => &self.held_to_client,
        }
    }
}

pub struct Proxy {
    address: SocketAddr,
    link: watch::Sender<Link>,
    counters: Arc<Counters>,
    /// The pumps of every connection still open, to abort on a cut.
    pumps: Arc<Mutex<Vec<AbortHandle>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (link, watching) = watch::channel(Link::default());
        let counters = Arc::new(Counters::default());
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio::spawn(accept(
            listener,
            target,
            watching,
            counters.clone(),
            pumps.clone(),
        ));
        Proxy {
            address,
            link,
            counters,
            pumps,
            acceptor,
        }
    }

    /// A proxy in front of the server of the database at `url` (on this machine), and
    /// the same URL through the proxy.
    pub async fn in_front_of(url: &str) -> (Proxy, String) {
        let mut parsed = url::Url::parse(url).unwrap();
        let target: SocketAddr = format!("127.0.0.1:{}", parsed.port().unwrap())
            .parse()
            .unwrap();
        let proxy = Proxy::start(target).await;
        parsed.set_port(Some(proxy.port())).unwrap();
        (proxy, parsed.to_string())
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Bytes read in `direction` and not forwarded yet: held ones, while it is held.
    pub fn held(&self, direction: Direction) -> u64 {
        self.counters.held(direction).load(Ordering::SeqCst)
    }

    /// Closes every open connection, both sides, at once. New ones are accepted.
    pub fn cut(&self) {
        for pump in self.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }

    /// Holds the bytes going `direction` (both directions may be held) until
    /// [`Proxy::resume`].
    pub fn hold(&self, direction: Direction) {
        self.link.send_modify(|link| match direction {
            Direction::ToServer => link.hold_to_server = true,
            Direction::ToClient => link.hold_to_client = true,
        });
    }

    /// Forwards everything again, held bytes first.
    pub fn resume(&self) {
        self.link.send_modify(|link| {
            link.hold_to_server = false;
            link.hold_to_client = false;
        });
    }

    /// Holds every connection open now, both ways, until [`Proxy::thaw`]; connections
    /// opened later are not held by this.
    pub fn freeze_open_connections(&self) {
        let opened = self.accepted();
        self.link.send_modify(|link| link.frozen_below = opened);
    }

    /// Lets the frozen connections go on, with what they held.
    pub fn thaw(&self) {
        self.link.send_modify(|link| link.frozen_below = 0);
    }

    /// Delays every chunk, both ways, by `delay` (zero: none).
    pub fn delay(&self, delay: Duration) {
        self.link.send_modify(|link| link.delay = delay);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    link: watch::Receiver<Link>,
    counters: Arc<Counters>,
    pumps: Arc<Mutex<Vec<AbortHandle>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let connection = counters.accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(server) = TcpStream::connect(target).await else {
            continue; // the client sees its connection closed
        };
        client.set_nodelay(true).ok();
        server.set_nodelay(true).ok();
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let mut pumps = pumps.lock().unwrap();
        pumps.retain(|pump| !pump.is_finished());
        for (read, write, direction) in [
            (client_read, server_write, Direction::ToServer),
            (server_read, client_write, Direction::ToClient),
        ] {
            let pump = tokio::spawn(forward(
                read,
                write,
                (direction, connection),
                link.clone(),
                counters.clone(),
            ));
            pumps.push(pump.abort_handle());
        }
    }
}

/// Copies one direction of one connection, obeying the link's state. What arrives while
/// the direction is held is read anyway and kept here (not left in the socket, where a
/// sender that dies with a reset would take it back), and sent on when released. If the
/// receiving side is gone, what still arrives is read and dropped until the sender ends:
/// a server keeps running what it received, and a closed socket would reset it.
async fn forward(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    (direction, connection): (Direction, u64),
    mut link: watch::Receiver<Link>,
    counters: Arc<Counters>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut reading = true;
    let mut receiver_gone = false;
    loop {
        let state = *link.borrow_and_update();
        if !state.holds(direction, connection) && !pending.is_empty() {
            if !state.delay.is_zero() {
                tokio::time::sleep(state.delay).await;
            }
            if !receiver_gone && write.write_all(&pending).await.is_err() {
                receiver_gone = true;
            }
            counters
                .held(direction)
                .fetch_sub(pending.len() as u64, Ordering::SeqCst);
            pending.clear();
        }
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            received = read.read(&mut buffer), if reading => match received {
                Ok(0) | Err(_) => reading = false,
                Ok(n) => {
                    counters.held(direction).fetch_add(n as u64, Ordering::SeqCst);
                    pending.extend_from_slice(&buffer[..n]);
                }
            },
            changed = link.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    write.shutdown().await.ok();
}
