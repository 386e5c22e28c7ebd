//! UDP frontends: a session per client address with an idle timeout; each
//! session has its own connected socket to the backend, and replies go back
//! from the frontend socket, so they come from the Service address. When
//! the table changes, a session whose backend is gone or down moves to a
//! live one on its next datagram.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::table::Rng;
use super::{Refused, Shared};
use crate::model::{FastMap, L4Addr};

/// A UDP socket on `addr` with IP_FREEBIND.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    Ok(
        super::listen::bind_socket(addr, socket2::Type::DGRAM, socket2::Protocol::UDP, false)?
            .into(),
    )
}

struct Session {
    backend: L4Addr,
    sock: Arc<UdpSocket>,
    last_ms: AtomicU64,
    generation: u64,
    reply: AbortHandle,
}

/// The sessions of one frontend; aborting the frontend ends them all.
#[derive(Default)]
pub struct Sessions(Mutex<FastMap<SocketAddr, Arc<Session>>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<SocketAddr, Arc<Session>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends every session (the frontend is gone).
    pub fn clear(&self, shared: &Shared) {
        for (_, s) in self.lock().drain() {
            s.reply.abort();
            shared.release();
        }
    }
}

pub async fn serve(
    front: Arc<UdpSocket>,
    key: L4Addr,
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
) {
    let mut rng = Rng::new(u64::from(key.port) ^ 0x5151);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let now = shared.now_ms();
        let table = shared.table();
        let existing = sessions.lock().get(&client).cloned();
        let session = match existing {
            Some(s)
                if s.generation == table.generation
                    || still_valid(&table, &key, client, &s, now) =>
            {
                s
            }
            old => {
                // New flow, or its backend left / went down: (re)pick.
                let Some(fe) = table.serving(&key, client.ip()) else {
                    shared.stats.refused(Refused::NoEndpoints);
                    continue;
                };
                let backend = match shared.pick(&fe, client, &[], &mut rng) {
                    Ok(b) => b,
                    Err(r) => {
                        shared.stats.refused(Refused::from(r));
                        continue;
                    }
                };
                match old {
                    Some(old) if old.backend == backend.addr => {
                        // Same backend after all: keep the socket.
                        let s = Arc::new(Session {
                            backend: old.backend,
                            sock: old.sock.clone(),
                            last_ms: AtomicU64::new(now),
                            generation: table.generation,
                            reply: old.reply.clone(),
                        });
                        sessions.lock().insert(client, s.clone());
                        s
                    }
                    old => {
                        if let Some(old) = old {
                            old.reply.abort();
                            shared.release();
                            sessions.lock().remove(&client);
                        }
                        let opened = open(
                            &front,
                            client,
                            backend.addr,
                            &key,
                            &shared,
                            &sessions,
                            table.generation,
                            now,
                        )
                        .await;
                        match opened {
                            Some(s) => s,
                            None => continue,
                        }
                    }
                }
            }
        };
        session.last_ms.store(now, Ordering::Relaxed);
        let _ = session.sock.send(&buf[..n]).await;
    }
}

fn still_valid(
    table: &super::table::Table,
    key: &L4Addr,
    client: SocketAddr,
    s: &Session,
    now: u64,
) -> bool {
    table.serving(key, client.ip()).is_some_and(|fe| {
        fe.slots
            .iter()
            .any(|b| b.addr == s.backend && b.state.available(now))
    })
}

/// Opens a session to `backend` and starts relaying its replies.
#[allow(clippy::too_many_arguments)]
async fn open(
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    backend: L4Addr,
    key: &L4Addr,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    generation: u64,
    now: u64,
) -> Option<Arc<Session>> {
    let target = SocketAddr::new(backend.ip, backend.port);
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(frontend = %key, error = %e, "cannot open a UDP session socket");
            return None;
        }
    };
    if sock.connect(target).await.is_err() {
        shared.stats.refused(Refused::NoBackend);
        return None;
    }
    if !shared.admit() {
        shared.stats.refused(Refused::Limit);
        return None;
    }
    let sock = Arc::new(sock);
    let (front2, sock2, shared2, sessions2) = (
        front.clone(),
        sock.clone(),
        shared.clone(),
        sessions.clone(),
    );
    let idle = shared.cfg.udp_idle_timeout;
    let reply = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match tokio::time::timeout(idle, sock2.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let _ = front2.send_to(&buf[..n], client).await;
                    if let Some(s) = sessions2.lock().get(&client) {
                        s.last_ms.store(shared2.now_ms(), Ordering::Relaxed);
                    }
                }
                // ICMP unreachable from the backend and the like: keep
                // listening; the idle timeout ends the session.
                Ok(Err(_)) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                Err(_) => {}
            }
            let last = sessions2
                .lock()
                .get(&client)
                .map(|s| s.last_ms.load(Ordering::Relaxed));
            match last {
                Some(l) if shared2.now_ms().saturating_sub(l) < idle.as_millis() as u64 => {}
                Some(_) => {
                    sessions2.lock().remove(&client);
                    shared2.release();
                    return;
                }
                None => return,
            }
        }
    })
    .abort_handle();
    shared
        .stats
        .udp_sessions_total
        .fetch_add(1, Ordering::Relaxed);
    let s = Arc::new(Session {
        backend,
        sock,
        last_ms: AtomicU64::new(now),
        generation,
        reply,
    });
    sessions.lock().insert(client, s.clone());
    Some(s)
}
