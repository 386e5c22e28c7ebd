//! TCP frontends: accept, pick a backend (retrying others when a connect
//! fails), then splice both ways.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

use tokio::io::unix::AsyncFd;

use super::splice::Sock;
use super::table::{Backend, Frontend, Rng};
use super::{Refused, Shared};
use crate::model::L4Addr;

/// Connect attempts per client connection (each to another backend).
const CONNECT_ATTEMPTS: usize = 3;

/// A listening socket on `addr` (IP_FREEBIND: the address need not be
/// local yet; SO_REUSEPORT when each shard has its own). TCP_NODELAY is set
/// here once: accepted sockets inherit it, which saves a setsockopt per
/// connection.
pub fn bind(addr: SocketAddr, shared_port: bool) -> io::Result<TcpListener> {
    let s = super::listen::bind_socket(
        addr,
        socket2::Type::STREAM,
        socket2::Protocol::TCP,
        shared_port,
    )?;
    s.set_tcp_nodelay(true)?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Closes with a RST instead of a FIN: the client sees "connection reset"
/// at once rather than an empty reply.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Out of descriptors (RLIMIT_NOFILE): the reserved one is closed to
/// accept the waiting connection and reset it at once, so the client fails
/// fast instead of hanging in the queue; logged at most every 10 s and
/// counted (`ferry_userspace_refused_total{reason="descriptors"}`).
/// Returns whether a connection was taken off the queue.
fn refuse_without_descriptors(listener: &TcpListener, key: L4Addr, shared: &Shared) -> bool {
    shared.stats.refused(Refused::Descriptors);
    let now = shared.now_ms();
    let last = shared
        .nofile_logged_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    if last == 0 || now.saturating_sub(last) >= 10_000 {
        shared
            .nofile_logged_ms
            .store(now.max(1), std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            frontend = %key,
            "out of descriptors (RLIMIT_NOFILE): new connections are reset until open ones close"
        );
    }
    let mut reserve = shared
        .reserve
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if reserve.take().is_none() {
        *reserve = std::fs::File::open("/dev/null").ok();
        return false;
    }
    let taken = accept_nonblocking(listener).map(|(stream, _)| reset(&stream));
    *reserve = std::fs::File::open("/dev/null").ok();
    taken.is_ok()
}

/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC (one system call).
fn accept_nonblocking(l: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes into the zeroed storage
    // try_init hands it.
    let (fd, peer) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                l.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })
    }?;
    // SAFETY: a new connected socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a non-IP peer"))?;
    Ok((stream, peer))
}

/// A non-blocking connect to `target` (one socket(2) with SOCK_NONBLOCK).
async fn connect(target: SocketAddr) -> io::Result<Sock> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let sock = super::splice::register(TcpStream::from(s))?;
    // A failed connect leaves the socket closed, which epoll reports as a
    // hang-up (EPOLLHUP): only then is SO_ERROR worth a system call. A
    // writable socket without it is connected.
    let hung_up = sock.writable().await?.ready().is_write_closed();
    if hung_up {
        return Err(sock
            .get_ref()
            .take_error()?
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused)));
    }
    Ok(sock)
}

pub async fn accept_loop(listener: AsyncFd<TcpListener>, key: L4Addr, shared: Arc<Shared>) {
    let mut seed = u64::from(key.port) ^ (shared.now_ms() << 16);
    loop {
        let mut guard = match listener.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(frontend = %key, error = %e, "listener failed");
                return;
            }
        };
        // Take every queued connection, then wait again.
        loop {
            let (stream, peer) = match accept_nonblocking(listener.get_ref()) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if refuse_without_descriptors(listener.get_ref(), key, &shared) {
                        continue;
                    }
                    // No reserve to give up (another thread holds it):
                    // wait for descriptors instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    break;
                }
                Err(e) => {
                    // Anything else: back off instead of spinning.
                    tracing::warn!(frontend = %key, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    break;
                }
            };
            if !shared.admit() {
                shared.stats.refused(Refused::Limit);
                reset(&stream);
                continue;
            }
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let shared = shared.clone();
            tokio::spawn(async move {
                handle(stream, peer, key, &shared, Rng::new(seed)).await;
                shared.release();
            });
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, key: L4Addr, shared: &Shared, mut rng: Rng) {
    let Some(fe) = shared.frontend(&key, peer.ip()) else {
        shared.stats.refused(Refused::NoEndpoints);
        return reset(&client);
    };
    let (backend, server) = match connect_backend(&fe, peer, shared, &mut rng).await {
        Ok(pair) => pair,
        Err(why) => {
            shared.stats.refused(why);
            return reset(&client);
        }
    };
    let Ok(client) = super::splice::register(client) else {
        return;
    };
    backend.state.active.fetch_add(1, Ordering::Relaxed);
    backend
        .state
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let moved = super::splice::proxy(&client, &server, shared.cfg.idle_timeout).await;
    backend.state.active.fetch_sub(1, Ordering::Relaxed);
    match moved {
        Ok(m) if m.idle_timeout => {
            shared.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
            reset(client.get_ref());
            reset(server.get_ref());
        }
        Ok(m) => {
            shared
                .stats
                .bytes
                .fetch_add(m.to_backend + m.to_client, Ordering::Relaxed);
        }
        Err(_) => {
            // A reset on one side: pass it on.
            reset(client.get_ref());
            reset(server.get_ref());
        }
    }
}

/// Connects to one of the frontend's backends, trying another after a
/// failed connect (up to [`CONNECT_ATTEMPTS`]); a backend failing in a row
/// is ejected.
async fn connect_backend(
    fe: &Frontend,
    peer: SocketAddr,
    shared: &Shared,
    rng: &mut Rng,
) -> Result<(Backend, Sock), Refused> {
    let mut tried: Vec<L4Addr> = Vec::new();
    loop {
        let backend = shared.pick(fe, peer, &tried, rng).map_err(Refused::from)?;
        let target = SocketAddr::new(backend.addr.ip, backend.addr.port);
        if let Ok(Ok(server)) =
            tokio::time::timeout(shared.cfg.connect_timeout, connect(target)).await
        {
            backend.state.connected();
            return Ok((backend, server));
        }
        shared
            .stats
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        if backend.state.connect_failed(shared.now_ms()) {
            tracing::warn!(frontend = %fe.key, backend = %backend.addr,
                "backend ejected after consecutive connect failures");
        }
        tried.push(backend.addr);
        if tried.len() >= CONNECT_ATTEMPTS {
            return Err(Refused::NoBackend);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = super::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let accepted = loop {
            match super::accept_nonblocking(&l) {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nothing to accept");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn connect_reports_a_refused_connection_and_a_live_one() {
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = super::connect(live.local_addr().unwrap()).await.unwrap();
        assert!(sock.get_ref().nodelay().unwrap());
        assert!(sock.get_ref().peer_addr().is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let err = super::connect(addr)
            .await
            .expect_err("connect to a closed port");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
