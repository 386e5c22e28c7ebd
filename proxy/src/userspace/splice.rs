//! Zero-copy TCP proxying with splice(2): socket -> pipe -> socket, driven
//! by tokio readiness. Half-close is forwarded (EOF on one side shuts down
//! the write side of the other) and the connection ends when both
//! directions finished or nothing moved for the idle timeout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe holds at most per splice call (the default pipe size).
const CHUNK: usize = 64 * 1024;

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
        Ok(unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        })
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

/// One direction: `from` -> `to` until EOF; then shuts down `to`'s write
/// side. Returns the bytes moved.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
    epoch: Instant,
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // Fill the pipe from the socket.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.w.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: forward the half-close.
            // SAFETY: shutdown on a socket descriptor we borrow.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        activity.store(stamp(epoch), Ordering::Relaxed);
        // Drain the pipe into the other socket.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
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
pub async fn proxy(client: &TcpStream, backend: &TcpStream, idle: Duration) -> io::Result<Moved> {
    let epoch = Instant::now();
    let activity = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            one_way(client, backend, &activity, epoch),
            one_way(backend, client, &activity, epoch)
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
