//! Listening for a frontend: one SO_REUSEPORT TCP listener per shard (a
//! thread with its own runtime) while descriptors allow, or a UDP server.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::AbortHandle;

use super::{splice, tcp, udp, UserspaceDataplane};
use crate::model::{L4Addr, Protocol};

/// A socket bound to `addr` with SO_REUSEADDR and IP_FREEBIND (the address
/// need not be local yet), non-blocking; with SO_REUSEPORT when several of
/// ours share the address (one TCP listener per shard).
pub(super) fn bind_socket(
    addr: SocketAddr,
    ty: socket2::Type,
    proto: socket2::Protocol,
    reuse_port: bool,
) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

pub(super) struct Listener {
    /// The accept loops (one per shard) or the UDP server.
    pub(super) tasks: Vec<AbortHandle>,
    pub(super) sessions: Option<Arc<udp::Sessions>>,
}

impl Listener {
    /// Listening TCP sockets it holds (a UDP server's socket is not one).
    pub(super) fn tcp_fds(&self) -> usize {
        if self.sessions.is_none() {
            self.tasks.len()
        } else {
            0
        }
    }

    pub(super) fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A thread with its own single-threaded runtime that serves TCP. Each TCP
/// frontend has one SO_REUSEPORT listener per shard, and a connection stays
/// on the shard that accepted it from accept to close: its wake-ups never
/// cross threads, as in HAProxy's and nginx's per-thread listeners. The
/// kernel spreads new connections over the shards' listeners.
pub(super) struct Shard {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shard {
    pub(super) fn start(index: usize) -> std::io::Result<Shard> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-tcp-{index}"))
            .spawn(move || {
                // Runs the shard's tasks until told to stop; dropping the
                // runtime then drops every task it still holds.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Shard {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a frontend could not be listened on (reported as unserved).
#[derive(Debug, thiserror::Error)]
pub(super) enum ListenError {
    #[error("binding {protocol} {addr}: {source}")]
    Bind {
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("SCTP is not served by the userspace dataplane")]
    Sctp,
}

impl UserspaceDataplane {
    pub(super) fn listen(&mut self, key: L4Addr) -> Result<Listener, ListenError> {
        let addr = SocketAddr::new(key.ip, key.port);
        let _guard = self.runtime.enter();
        match key.protocol {
            Protocol::Tcp => self.listen_tcp(key, addr),
            Protocol::Udp => self.listen_udp(key, addr),
            Protocol::Sctp => Err(ListenError::Sctp),
        }
    }

    /// One listener per shard while the descriptors allow; beyond that
    /// (thousands of Services) one listener per frontend, the frontends
    /// spread over the shards.
    fn listen_tcp(&mut self, key: L4Addr, addr: SocketAddr) -> Result<Listener, ListenError> {
        let n = self.shards.len();
        let per_shard = self.tcp_listener_fds + n <= self.listener_budget;
        let shards: &[Shard] = if per_shard {
            &self.shards
        } else {
            // Logged once, at the first such frontend.
            if self.next_shard == 0 {
                tracing::info!(
                    listeners = self.tcp_listener_fds,
                    "listener budget (a quarter of RLIMIT_NOFILE) reached: \
                     further TCP frontends get one listener on one thread"
                );
            }
            self.next_shard += 1;
            let i = self.next_shard % n;
            &self.shards[i..=i]
        };
        let mut listener = Listener {
            tasks: Vec::with_capacity(shards.len()),
            sessions: None,
        };
        let shared_port = shards.len() > 1;
        for shard in shards {
            // AsyncFd registers with the runtime it is created in.
            let _in_shard = shard.handle.enter();
            match tcp::bind(addr, shared_port).and_then(splice::register) {
                Ok(l) => listener.tasks.push(
                    shard
                        .handle
                        .spawn(tcp::accept_loop(l, key, self.shared.clone()))
                        .abort_handle(),
                ),
                Err(source) => {
                    listener.abort();
                    return Err(ListenError::Bind {
                        protocol: Protocol::Tcp,
                        addr,
                        source,
                    });
                }
            }
        }
        Ok(listener)
    }

    fn listen_udp(&mut self, key: L4Addr, addr: SocketAddr) -> Result<Listener, ListenError> {
        let bind_err = |source| ListenError::Bind {
            protocol: Protocol::Udp,
            addr,
            source,
        };
        let std = udp::bind(addr).map_err(bind_err)?;
        let s = tokio::net::UdpSocket::from_std(std).map_err(bind_err)?;
        let sessions = Arc::new(udp::Sessions::default());
        let task = self
            .runtime
            .spawn(udp::serve(
                Arc::new(s),
                key,
                self.shared.clone(),
                sessions.clone(),
            ))
            .abort_handle();
        Ok(Listener {
            tasks: vec![task],
            sessions: Some(sessions),
        })
    }
}
