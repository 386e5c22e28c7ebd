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
    let f = Front {
        sock: front,
        key,
        shared,
        sessions,
    };
    let mut rng = Rng::new(u64::from(key.port) ^ 0x5151);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = f.sock.recv_from(&mut buf).await else {
            continue;
        };
        let now = f.shared.now_ms();
        let Some(session) = f.session(client, now, &mut rng).await else {
            continue;
        };
        session.last_ms.store(now, Ordering::Relaxed);
        let _ = session.sock.send(&buf[..n]).await;
    }
}

/// One UDP frontend: its socket, its sessions and what every frontend
/// shares.
struct Front {
    sock: Arc<UdpSocket>,
    key: L4Addr,
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
}

impl Front {
    /// The session of `client`'s datagram: its current one while the table
    /// is unchanged or its backend still serves, else a new one (None:
    /// refused).
    async fn session(&self, client: SocketAddr, now: u64, rng: &mut Rng) -> Option<Arc<Session>> {
        let table = self.shared.table();
        let existing = self.sessions.lock().get(&client).cloned();
        if let Some(s) = &existing {
            if s.generation == table.generation || still_valid(&table, &self.key, client, s, now) {
                return existing;
            }
        }
        // New flow, or its backend left / went down: (re)pick.
        let Some(fe) = table.serving(&self.key, client.ip()) else {
            self.shared.stats.refused(Refused::NoEndpoints);
            return None;
        };
        let backend = match self.shared.pick(&fe, client, &[], rng) {
            Ok(b) => b,
            Err(r) => {
                self.shared.stats.refused(Refused::from(r));
                return None;
            }
        };
        match existing {
            Some(old) if old.backend == backend.addr => {
                // Same backend after all: keep the socket.
                let s = Arc::new(Session {
                    backend: old.backend,
                    sock: old.sock.clone(),
                    last_ms: AtomicU64::new(now),
                    generation: table.generation,
                    reply: old.reply.clone(),
                });
                self.sessions.lock().insert(client, s.clone());
                Some(s)
            }
            old => {
                if let Some(old) = old {
                    old.reply.abort();
                    self.shared.release();
                    self.sessions.lock().remove(&client);
                }
                self.open(client, backend.addr, table.generation, now).await
            }
        }
    }

    /// Opens a session to `backend` and starts relaying its replies.
    async fn open(
        &self,
        client: SocketAddr,
        backend: L4Addr,
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
                tracing::warn!(frontend = %self.key, error = %e, "cannot open a UDP session socket");
                return None;
            }
        };
        if sock.connect(target).await.is_err() {
            self.shared.stats.refused(Refused::NoBackend);
            return None;
        }
        if !self.shared.admit() {
            self.shared.stats.refused(Refused::Limit);
            return None;
        }
        let sock = Arc::new(sock);
        let reply = tokio::spawn(relay_replies(
            self.sock.clone(),
            sock.clone(),
            client,
            self.shared.clone(),
            self.sessions.clone(),
        ))
        .abort_handle();
        self.shared
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
        self.sessions.lock().insert(client, s.clone());
        Some(s)
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

/// Relays the backend's replies to `client` from the frontend socket until
/// the session has been idle for the UDP idle timeout.
async fn relay_replies(
    front: Arc<UdpSocket>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
) {
    let idle = shared.cfg.udp_idle_timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(idle, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let _ = front.send_to(&buf[..n], client).await;
                if let Some(s) = sessions.lock().get(&client) {
                    s.last_ms.store(shared.now_ms(), Ordering::Relaxed);
                }
            }
            // ICMP unreachable from the backend and the like: keep
            // listening; the idle timeout ends the session.
            Ok(Err(_)) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(_) => {}
        }
        let last = sessions
            .lock()
            .get(&client)
            .map(|s| s.last_ms.load(Ordering::Relaxed));
        match last {
            Some(l) if shared.now_ms().saturating_sub(l) < idle.as_millis() as u64 => {}
            Some(_) => {
                sessions.lock().remove(&client);
                shared.release();
                return;
            }
            None => return,
        }
    }
}
