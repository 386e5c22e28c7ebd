//! Bounded HTTP traffic for the cluster story: probers that open a new
//! connection per request from the client namespace (NodePort, LoadBalancer)
//! or from a pod (`kubectl exec` of a curl loop, by DNS name), and
//! keep-alive connections that must survive a Ferry rollout. Each answer is
//! the serving pod's name (agnhost netexec's /hostname).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every answer so far: per path, the pods that answered (with the time
/// of their first and last answer) and the failures.
#[derive(Debug, Default)]
pub struct Tally {
    pub paths: BTreeMap<String, PathTally>,
}

#[derive(Debug, Default, Clone)]
pub struct PathTally {
    pub pods: BTreeMap<String, PodTally>,
    pub failures: u64,
    /// The first failures, with when they happened.
    pub failed: Vec<(Instant, String)>,
}

#[derive(Debug, Clone, Copy)]
pub struct PodTally {
    pub count: u64,
    pub last: Instant,
}

impl Tally {
    fn record(&mut self, path: &str, answer: Result<String, String>) {
        let entry = self.paths.entry(path.to_string()).or_default();
        match answer {
            Ok(pod) => {
                let now = Instant::now();
                let pod = entry.pods.entry(pod).or_insert(PodTally {
                    count: 0,
                    last: now,
                });
                pod.count += 1;
                pod.last = now;
            }
            Err(why) => {
                entry.failures += 1;
                if entry.failed.len() < 10 {
                    entry.failed.push((Instant::now(), why));
                }
            }
        }
    }
    pub fn failures(&self) -> u64 {
        self.paths.values().map(|p| p.failures).sum()
    }
}

/// Shared by the probers and the story: the tally and the stop flag.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    pub tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

/// How long any prober runs at most, and the pause between its requests.
const MAX_RUN: Duration = Duration::from_mins(15);
const PAUSE: Duration = Duration::from_millis(50);

impl Traffic {
    pub fn snapshot(&self) -> Tally {
        let t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Tally {
            paths: t.paths.clone(),
        }
    }

    fn record(&self, path: &str, answer: Result<String, String>) {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(path, answer);
    }

    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::spawn(f);
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle);
    }

    /// New connections to `addr` from namespace `netns`, until stopped.
    pub fn connect_loop(&self, path: &str, netns: &str, addr: SocketAddr) {
        let (me, path, netns) = (self.clone(), path.to_string(), netns.to_string());
        self.spawn(move || {
            if let Err(err) = enter_netns(&netns) {
                me.record(&path, Err(format!("{err:#}")));
                return;
            }
            let started = Instant::now();
            while !me.stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .map_err(|e| format!("connect {addr}: {e}"))
                    .and_then(|mut s| get_hostname(&mut s).map_err(|e| format!("{addr}: {e:#}")));
                me.record(&path, answer);
                std::thread::sleep(PAUSE);
            }
        });
    }

    /// Answers a pod writes to its log (one per line, in the CRI log
    /// format kubelet keeps under /var/log/pods), read as they come.
    pub fn log_loop(&self, path: &str, log: &std::path::Path) -> Result<()> {
        use std::io::Seek;
        let mut file =
            std::fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
        file.seek(std::io::SeekFrom::End(0))?;
        let (me, path) = (self.clone(), path.to_string());
        self.spawn(move || {
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            let started = Instant::now();
            while !me.stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                match reader.read_line(&mut line) {
                    Ok(0) => std::thread::sleep(PAUSE),
                    Ok(_) if line.ends_with('\n') => {
                        // "<time> stdout F <answer>"
                        let answer = line.trim_end().splitn(4, ' ').nth(3).unwrap_or("");
                        let answer = match answer {
                            "" | "FAIL" => Err(format!("curl answered {answer:?}")),
                            pod => Ok(pod.to_string()),
                        };
                        me.record(&path, answer);
                        line.clear();
                    }
                    Ok(_) => std::thread::sleep(PAUSE),
                    Err(e) => {
                        me.record(&path, Err(format!("reading the pod's log: {e}")));
                        break;
                    }
                }
            }
        });
        Ok(())
    }

    /// Forgets every answer so far (the story counts from when every path
    /// first served).
    pub fn reset(&self) {
        *self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Tally::default();
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 keep-alive connection, asked for /hostname on demand.
#[derive(Debug)]
pub struct KeepAlive {
    stream: TcpStream,
    pub answers: u64,
}

impl KeepAlive {
    /// Connects from namespace `netns` (on a helper thread, so only it
    /// changes namespace).
    pub fn open(netns: &str, addr: SocketAddr) -> Result<Self> {
        let netns = netns.to_string();
        let stream = std::thread::spawn(move || -> Result<TcpStream> {
            enter_netns(&netns)?;
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
        Ok(Self { stream, answers: 0 })
    }
    pub fn ask(&mut self) -> Result<String> {
        let pod = get_hostname(&mut self.stream)?;
        self.answers += 1;
        Ok(pod)
    }
}

/// GET /hostname on `stream` (kept open); the body.
fn get_hostname(stream: &mut TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /hostname HTTP/1.1\r\nHost: echo\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            bail!("connection closed after {} bytes", head.len());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 200") {
        bail!("answer {:?}", head.lines().next().unwrap_or(""));
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .context("no Content-Length")?
        .parse()?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) -> Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    // SAFETY: setns on a namespace file we hold open; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The live table: one row per pod, a column per path, failures last.
pub fn table(tally: &Tally) -> String {
    let paths: Vec<&String> = tally.paths.keys().collect();
    let mut pods: Vec<&String> = tally.paths.values().flat_map(|p| p.pods.keys()).collect();
    pods.sort();
    pods.dedup();
    let mut out = format!("{:<28}", "pod");
    for p in &paths {
        out.push_str(&format!("{p:>14}"));
    }
    out.push('\n');
    for pod in pods {
        out.push_str(&format!("{pod:<28}"));
        for p in &paths {
            let n = tally.paths[*p].pods.get(pod).map_or(0, |t| t.count);
            out.push_str(&format!("{n:>14}"));
        }
        out.push('\n');
    }
    out.push_str(&format!("{:<28}", "failed"));
    for p in &paths {
        out.push_str(&format!("{:>14}", tally.paths[*p].failures));
    }
    out.push('\n');
    out
}
