//! The demo's traffic: the pods' tiny HTTP server, and bounded clients
//! that tally which backend answered each request.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::INTERRUPTED;

/// A tiny HTTP server answering with its pod name (bounded: stops with the
/// demo, at most 10 minutes).
pub(super) fn serve_http(listener: TcpListener, name: String, stop: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_mins(10);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let body = format!("{name}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) per_backend: BTreeMap<String, u32>,
    pub(super) failed: u32,
    pub(super) done: u32,
}

pub(super) fn lock(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn tally_done(t: &Mutex<Tally>) -> u32 {
    lock(t).done
}

pub(super) fn pod3(t: &Mutex<Tally>) -> u32 {
    lock(t).per_backend.get("pod-3").copied().unwrap_or(0)
}

/// `count` HTTP requests from the node namespace on a thread, a new
/// connection each, alternating ClusterIP and NodePort, with a live table.
pub(super) fn traffic(
    node_ns: Option<String>,
    targets: [SocketAddr; 2],
    count: u32,
    tally: Arc<Mutex<Tally>>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        if let Some(node_ns) = node_ns {
            ferry_netns::enter(&format!("/var/run/netns/{node_ns}"))?;
        }
        for i in 0..count {
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let result = get(targets[i as usize % 2]);
            let mut t = lock(&tally);
            match result {
                Ok(pod) => *t.per_backend.entry(pod).or_insert(0) += 1,
                Err(_) => t.failed += 1,
            }
            t.done += 1;
            if t.done.is_multiple_of(20) || t.done == count {
                let cells: Vec<String> = t
                    .per_backend
                    .iter()
                    .map(|(p, n)| format!("{p}: {n:>4}"))
                    .collect();
                print!(
                    "\r  [{:>3}/{count}] {}   failed: {}",
                    t.done,
                    cells.join("  "),
                    t.failed
                );
                let _ = std::io::stdout().flush();
            }
            drop(t);
            // Pace the requests so the change lands mid-stream.
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
}

pub(super) fn get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    Ok(body.trim().to_string())
}
