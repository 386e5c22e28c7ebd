//! TCP proxying: small messages through a userspace buffer, bulk flows
//! zero-copy with splice(2) (socket -> pipe -> socket). Sockets are driven
//! through tokio's `AsyncFd`, so a read that returned less than asked can
//! clear the readiness at once (tokio's tick check makes that race-free)
//! instead of paying another read that only says EAGAIN: one receive per
//! message, as HAProxy does. Half-close is forwarded (EOF on one side shuts
//! down the write side of the other); the connection ends when both
//! directions finished, on an error, or after the idle timeout.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// A non-blocking TCP socket registered with the reactor.
pub type Sock = AsyncFd<TcpStream>;

/// Registers a socket that owns its descriptor with the reactor.
pub fn register<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` (a std TcpStream or TcpListener) owns its descriptor:
    // it stays open and the same until the AsyncFd drops it.
    Ok(unsafe { AsyncFd::register(inner) }?)
}

/// Bytes a pipe holds (F_SETPIPE_SZ; the default is 64 KiB) and moves at
/// most per splice call: fewer, larger splices for bulk flows.
const CHUNK: usize = 256 * 1024;
/// Bytes copied through userspace per read before switching to splice.
const SMALL: usize = 8 * 1024;

/// A non-blocking pipe (read end, write end).
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds` on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let pipe = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Best effort: unprivileged processes may be capped by
        // /proc/sys/fs/pipe-max-size (1 MiB by default).
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(pipe.w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller; null offsets
    // mean "current position" (required for sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Milliseconds since `epoch`, for the shared last-activity stamp.
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Reads once into `buf` when readable; a short read clears readiness.
async fn read_some(from: &Sock, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = from.readable().await?;
        match guard.try_io(|s| s.get_ref().read(buf)) {
            Ok(Ok(n)) => {
                if n > 0 && n < buf.len() {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {} // not ready after all: wait again
        }
    }
}

/// Fills the pipe from the socket: the bytes moved (0: end of stream).
async fn fill_pipe(from: &Sock, pipe: &Pipe) -> io::Result<usize> {
    loop {
        let mut guard = from.readable().await?;
        match guard.try_io(|s| splice(s.as_raw_fd(), pipe.w.as_raw_fd(), CHUNK)) {
            Ok(Ok(n)) => {
                if n > 0 && n < CHUNK {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {} // not ready after all: wait again
        }
    }
}

/// Writes all of `buf`.
async fn write_all(to: &Sock, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut guard = to.writable().await?;
        match guard.try_io(|s| s.get_ref().write(buf)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {} // not ready after all: wait again
        }
    }
    Ok(())
}

/// Forwards an EOF as a half-close, unless the other direction already
/// ended: then both sockets are about to be closed anyway.
fn shutdown_write(to: &Sock, first_eof: &AtomicBool) {
    if !first_eof.swap(true, Ordering::Relaxed) {
        let _ = to.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

/// One direction: `from` -> `to` until EOF; then shuts down `to`'s write
/// side. Returns the bytes moved. Small messages (requests, replies) are
/// copied through a userspace buffer, which costs fewer system calls than
/// two splices; once a read fills the buffer the flow is bulk and the rest
/// moves with splice(2), without a copy (HAProxy's "splice-auto").
async fn one_way(
    from: &Sock,
    to: &Sock,
    activity: &AtomicU64,
    first_eof: &AtomicBool,
    epoch: Instant,
) -> io::Result<u64> {
    let mut total = 0u64;
    // Allocated when the first byte arrives: an idle connection holds no
    // buffer (memory per idle connection: docs/BENCHMARKS.md).
    let _ = from.readable().await?;
    let mut buf = vec![0u8; SMALL];
    loop {
        let n = read_some(from, &mut buf).await?;
        if n == 0 {
            shutdown_write(to, first_eof);
            return Ok(total);
        }
        activity.store(stamp(epoch), Ordering::Relaxed);
        write_all(to, &buf[..n]).await?;
        total += n as u64;
        if n == SMALL {
            break;
        }
    }
    // Bulk: zero-copy from here on.
    drop(buf);
    let pipe = Pipe::new()?;
    loop {
        let n = fill_pipe(from, &pipe).await?;
        if n == 0 {
            shutdown_write(to, first_eof);
            return Ok(total);
        }
        activity.store(stamp(epoch), Ordering::Relaxed);
        // Drain the pipe into the other socket.
        let mut left = n;
        while left > 0 {
            let mut guard = to.writable().await?;
            match guard.try_io(|s| splice(pipe.r.as_raw_fd(), s.as_raw_fd(), left)) {
                Ok(Ok(m)) => left -= m,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {} // not ready after all: wait again
            }
        }
        total += n as u64;
    }
}

/// What a proxied connection moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_backend: u64,
    pub to_client: u64,
    pub idle_timeout: bool,
}

/// Proxies `client` <-> `backend` until both sides closed, an error, or
/// `idle` without a byte in either direction.
pub async fn proxy(client: &Sock, backend: &Sock, idle: Duration) -> io::Result<Moved> {
    let epoch = Instant::now();
    let activity = AtomicU64::new(0);
    let first_eof = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            one_way(client, backend, &activity, &first_eof, epoch),
            one_way(backend, client, &activity, &first_eof, epoch)
        )
    };
    let watchdog = async {
        let idle_ms = idle.as_millis() as u64;
        loop {
            let last = activity.load(Ordering::Relaxed);
            let since = stamp(epoch).saturating_sub(last);
            if since >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - since)).await;
        }
    };
    tokio::select! {
        r = both => {
            let (a, b) = r?;
            Ok(Moved { to_backend: a, to_client: b, idle_timeout: false })
        }
        () = watchdog => Ok(Moved { idle_timeout: true, ..Moved::default() }),
    }
}
