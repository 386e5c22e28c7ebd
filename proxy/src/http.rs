//! The agent's HTTP endpoints (an I/O edge): /healthz and /livez on the
//! healthz address, /metrics and /proxyMode on the metrics address, as
//! kube-proxy serves them. A small HTTP/1.1 server on a thread: one request
//! per connection, bounded request size and read timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::metrics::Metrics;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Health,
    Metrics,
}

/// Binds `addr` and serves until `stop`; returns the bound address.
pub fn serve(
    addr: SocketAddr,
    what: Endpoints,
    metrics: Arc<Metrics>,
    health_timeout: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    spawn_accept_loop(listener, stop, move |s| {
        let _ = handle(s, what, &metrics, health_timeout);
    })?;
    Ok(local)
}

/// Serves `listener` on a thread, one connection at a time, until `stop`:
/// accept() blocks (answering at once) but wakes every 200 ms to look at
/// `stop` (SO_RCVTIMEO applies to accept on Linux).
pub fn spawn_accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    mut handler: impl FnMut(TcpStream) + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(false)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setsockopt on the listener's own fd with a valid timeval.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok((s, _)) = listener.accept() {
                handler(s);
            }
        }
    });
    Ok(())
}

fn handle(
    mut s: TcpStream,
    what: Endpoints,
    metrics: &Metrics,
    health_timeout: Duration,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (status, ctype, body) = route(path, what, metrics, health_timeout);
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// (status line, content type, body) for a path.
pub fn route(
    path: &str,
    what: Endpoints,
    metrics: &Metrics,
    health_timeout: Duration,
) -> (&'static str, &'static str, String) {
    match (what, path) {
        (Endpoints::Health, "/healthz" | "/livez") => {
            let (ok, body) = metrics.health(SystemTime::now(), health_timeout, path == "/healthz");
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body)
        }
        (Endpoints::Metrics, "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (Endpoints::Metrics, "/proxyMode") => (
            "200 OK",
            "text/plain; charset=utf-8",
            metrics.dataplane().map_or("ebpf", |d| d.mode()).into(),
        ),
        (Endpoints::Metrics, "/services") => match metrics.dataplane() {
            Some(d) => ("200 OK", "application/json", d.services_json()),
            None => (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "the eBPF dataplane: use `ferry services` (it reads the pinned maps)\n".into(),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        ),
    }
}
