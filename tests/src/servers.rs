//! Test backends: TCP and UDP servers that answer every request with their
//! own address (and, if asked, the client address they saw), so a client
//! can tell which backend it reached and whether its source was kept.
//! Bounded: they stop when dropped, or after two minutes.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Servers that answer with their own address, until stopped (bounded by
/// a deadline either way).
#[derive(Debug)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> Servers {
        Servers::spawn(tcp, udp, false)
    }

    /// Servers answering "OWN_ADDRESS PEER_ADDRESS".
    pub fn start_with_peer(tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> Servers {
        Servers::spawn(tcp, udp, true)
    }

    fn spawn(tcp: Vec<TcpListener>, udp: Vec<UdpSocket>, with_peer: bool) -> Servers {
        let answer = move |me: &str, peer: std::net::SocketAddr| {
            if with_peer {
                format!("{me} {peer}")
            } else {
                me.to_string()
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_mins(2);
        let mut threads = Vec::new();
        for l in tcp {
            l.set_nonblocking(true).expect("test server socket");
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let me = l.local_addr().expect("test server socket").to_string();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            // Read the request first: closing with unread
                            // data would reset the connection.
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 64];
                            let _ = std::io::Read::read(&mut s, &mut buf);
                            let _ = s.write_all(answer(&me, peer).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        for u in udp {
            u.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("test server socket");
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let me = u.local_addr().expect("test server socket").to_string();
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((_, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(answer(&me, from).as_bytes(), from);
                    }
                }
            }));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
