//! Test client run as a child process: joins a cgroup (where the socket-LB
//! programs are attached), enters a network namespace, then talks to an
//! address and prints what happened, one line per attempt:
//!   ok <peer seen by getpeername/recvfrom> <reply>
//!   err <error kind> <millis>
//! usage: ferry-test-client CGROUP NETNS tcp|udp ADDR COUNT
//!        ferry-test-client CGROUP NETNS stream ADDR SECONDS
//!        ferry-test-client CGROUP NETNS udpsock ADDR COUNT
//! Bounded: COUNT attempts, 2 s timeout each. `stream` keeps one TCP
//! connection, sends a line every 20 ms and expects it echoed, for SECONDS
//! (at most 60); it prints `ok <lines>` or `err <kind> <lines>`. `udpsock`
//! sends COUNT datagrams 100 ms apart from one unconnected UDP socket and
//! prints a line per reply like `udp`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: ferry-test-client CGROUP NETNS tcp|udp ADDR COUNT");
        std::process::exit(2);
    }
    let (cgroup, netns, proto, addr, count) = (&args[1], &args[2], &args[3], &args[4], &args[5]);
    if let Err(e) = std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    ) {
        eprintln!("joining cgroup {cgroup}: {e}");
        std::process::exit(1);
    }
    let ns = match std::fs::File::open(format!("/var/run/netns/{netns}")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("opening netns {netns}: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: setns on a valid namespace fd; single-threaded process.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        eprintln!("setns {netns}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {addr}: {e}");
            std::process::exit(2);
        }
    };
    let count: u32 = count.parse().unwrap_or(1).min(1000);
    if proto == "stream" {
        match stream(addr, Duration::from_secs(u64::from(count.min(60)))) {
            Ok(n) => println!("ok {n}"),
            Err((e, n)) => println!("err {:?} {n}", e.kind()),
        }
        return;
    }
    if proto == "udpconn" {
        // One connected socket; after an error a new one, as resolvers do.
        let connect = || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(s)
        };
        let mut sock = connect();
        for _ in 0..count {
            let start = Instant::now();
            let mut buf = [0u8; 256];
            let result = match &sock {
                Ok(s) => s
                    .send(b"hello\n")
                    .and_then(|_| s.recv(&mut buf))
                    .and_then(|n| Ok((s.peer_addr()?, n))),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            match result {
                Ok((peer, n)) => {
                    println!("ok {peer} {}", String::from_utf8_lossy(&buf[..n]).trim());
                }
                Err(e) => {
                    println!("err {:?} {}", e.kind(), start.elapsed().as_millis());
                    sock = connect();
                }
            }
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    if proto == "udpsock" {
        let s = match UdpSocket::bind("0.0.0.0:0") {
            Ok(s) => s,
            Err(e) => {
                println!("err {:?} 0", e.kind());
                return;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        for _ in 0..count {
            let start = Instant::now();
            let mut buf = [0u8; 256];
            let result = s
                .send_to(b"hello\n", addr)
                .and_then(|_| s.recv_from(&mut buf));
            match result {
                Ok((n, from)) => {
                    println!("ok {from} {}", String::from_utf8_lossy(&buf[..n]).trim());
                }
                Err(e) => println!("err {:?} {}", e.kind(), start.elapsed().as_millis()),
            }
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    for _ in 0..count {
        let start = Instant::now();
        let result = match proto.as_str() {
            "tcp" => tcp(addr),
            _ => udp(addr),
        };
        match result {
            Ok((peer, reply)) => println!("ok {peer} {reply}"),
            Err(e) => println!("err {:?} {}", e.kind(), start.elapsed().as_millis()),
        }
    }
}

fn tcp(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = s.peer_addr()?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((peer, reply.trim().to_string()))
}

fn udp(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(b"hello\n", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}

fn stream(addr: SocketAddr, duration: Duration) -> Result<u64, (std::io::Error, u64)> {
    let mut lines = 0u64;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| (e, 0))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| (e, 0))?;
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let msg = format!("line {lines}\n");
        s.write_all(msg.as_bytes()).map_err(|e| (e, lines))?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).map_err(|e| (e, lines))?;
        if buf != msg.as_bytes() {
            return Err((std::io::Error::other("echo mismatch"), lines));
        }
        lines += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(lines)
}
