//! Active health checks (`ferry.dev/health-check`): one task per backend
//! address and check, TCP connect or HTTP GET, with thresholds. A failing
//! backend gets no new connections until it passes again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::table::{BackendState, Table};
use crate::model::{FastMap, L4Addr, ProbeSpec, Protocol};

/// Counters of the checks (for metrics).
#[derive(Debug, Default)]
pub struct CheckStats {
    pub probes_total: AtomicU64,
    pub probe_failures_total: AtomicU64,
    /// Backends taken out by a check / brought back.
    pub marked_down_total: AtomicU64,
    pub marked_up_total: AtomicU64,
}

/// The running checks.
#[derive(Debug, Default)]
pub struct Checkers {
    running: FastMap<(L4Addr, Arc<ProbeSpec>), (AbortHandle, Arc<BackendState>)>,
}

impl Checkers {
    /// Starts the checks `table` asks for and stops the others (a backend
    /// whose check stops is healthy again).
    pub fn update(&mut self, table: &Table, rt: &tokio::runtime::Handle, stats: &Arc<CheckStats>) {
        let mut wanted: FastMap<(L4Addr, Arc<ProbeSpec>), Arc<BackendState>> = FastMap::default();
        for fe in table.frontends.values() {
            let Some(spec) = &fe.probe else { continue };
            for b in &fe.slots {
                // Checks speak TCP; a UDP backend is checked on the same
                // port over TCP only when asked for (an http: check).
                if b.addr.protocol == Protocol::Tcp || spec.http_path.is_some() {
                    wanted.insert((b.addr, spec.clone()), b.state.clone());
                }
            }
        }
        self.running.retain(|k, (handle, state)| {
            if wanted.contains_key(k) {
                return true;
            }
            handle.abort();
            state.healthy.store(true, Ordering::Relaxed);
            false
        });
        for (k, state) in wanted {
            if self.running.contains_key(&k) {
                continue;
            }
            let (addr, spec) = (k.0, k.1.clone());
            let (st, stats) = (state.clone(), stats.clone());
            let handle = rt.spawn(check_loop(addr, spec, st, stats)).abort_handle();
            self.running.insert(k, (handle, state));
        }
    }

    pub fn stop_all(&mut self) {
        for (_, (h, _)) in self.running.drain() {
            h.abort();
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("no HTTP status line")]
    NoStatusLine,
    #[error("no answer in {0} ms")]
    Timeout(u32),
}

fn io(step: &'static str) -> impl Fn(std::io::Error) -> ProbeError {
    move |source| ProbeError::Io { step, source }
}

/// One probe: Ok when the backend passes.
pub async fn probe(addr: SocketAddr, spec: &ProbeSpec) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(u64::from(spec.timeout_ms));
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(io("connect"))?;
        let Some(path) = &spec.http_path else {
            return Ok(());
        };
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: ferry-health-check\r\nConnection: close\r\n\r\n",
            addr.ip()
        );
        s.write_all(req.as_bytes()).await.map_err(io("write"))?;
        let mut head = [0u8; 16];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut head[got..]).await.map_err(io("read"))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        // "HTTP/1.x NNN"
        let status = std::str::from_utf8(&head[..got.min(12)])
            .ok()
            .and_then(|l| l.get(9..12))
            .and_then(|c| c.parse::<u16>().ok());
        match status {
            Some(c) if (200..400).contains(&c) => Ok(()),
            Some(c) => Err(ProbeError::Status(c)),
            None => Err(ProbeError::NoStatusLine),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(spec.timeout_ms)),
    }
}

async fn check_loop(
    addr: L4Addr,
    spec: Arc<ProbeSpec>,
    state: Arc<BackendState>,
    counters: Arc<CheckStats>,
) {
    let target = SocketAddr::new(addr.ip, addr.port);
    let interval = Duration::from_millis(u64::from(spec.interval_ms));
    let (mut passes, mut failures) = (0u32, 0u32);
    loop {
        counters.probes_total.fetch_add(1, Ordering::Relaxed);
        match probe(target, &spec).await {
            Ok(()) => {
                failures = 0;
                passes = passes.saturating_add(1);
                if passes >= spec.healthy_threshold && !state.healthy.swap(true, Ordering::Relaxed)
                {
                    counters.marked_up_total.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(backend = %addr, "health check passes again: backend back in");
                }
            }
            Err(why) => {
                counters
                    .probe_failures_total
                    .fetch_add(1, Ordering::Relaxed);
                passes = 0;
                failures = failures.saturating_add(1);
                if failures >= spec.unhealthy_threshold
                    && state.healthy.swap(false, Ordering::Relaxed)
                {
                    counters.marked_down_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(backend = %addr, reason = %why, "health check fails: backend out");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
