//! Support for userspace-dataplane tests: line-echo backends that say who
//! they are and answer an HTTP health check they can be told to fail, UDP
//! backends, and `ferry run --dataplane userspace` from a YAML file as a
//! child process (optionally as an unprivileged user), stopped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A TCP backend: for each connection, answers every line with
/// "<its address> <line>" until the client closes, and answers
/// "GET /healthz" with 200 or 503 (see [`EchoBackend::set_healthy`]).
/// Stops when dropped (and after five minutes at most).
#[derive(Debug)]
pub struct EchoBackend {
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl EchoBackend {
    pub fn start(addr: &str) -> Result<EchoBackend> {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (healthy.clone(), stop.clone());
        let deadline = Instant::now() + Duration::from_mins(5);
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((s, _)) => {
                        let (h, st) = (h.clone(), st.clone());
                        std::thread::spawn(move || serve_lines(s, addr, &h, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(EchoBackend {
            addr,
            healthy,
            stop,
        })
    }

    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_lines(s: TcpStream, me: SocketAddr, healthy: &AtomicBool, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut out) = s.try_clone() else { return };
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.starts_with("GET /healthz") => {
                let status = if healthy.load(Ordering::Relaxed) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = write!(out, "HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n");
                return;
            }
            Ok(_) => {
                if writeln!(out, "{me} {}", line.trim_end()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A UDP backend answering each datagram with "<its address> <datagram>".
#[derive(Debug)]
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    pub fn start(addr: &str) -> Result<UdpEcho> {
        let u = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        u.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = u.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let deadline = Instant::now() + Duration::from_mins(5);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let reply = format!("{addr} {}", String::from_utf8_lossy(&buf[..n]));
                    let _ = u.send_to(reply.as_bytes(), from);
                }
            }
        });
        Ok(UdpEcho { addr, stop })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A persistent client connection speaking the line protocol.
#[derive(Debug)]
pub struct LineClient {
    reader: BufReader<TcpStream>,
    out: TcpStream,
}

impl LineClient {
    pub fn connect(addr: &str) -> Result<LineClient> {
        let a: SocketAddr = addr.parse()?;
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(LineClient {
            out: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends a line; returns the backend address that answered.
    pub fn ask(&mut self, what: &str) -> Result<String> {
        writeln!(self.out, "{what}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let (who, echo) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.trim_end(), ""));
        if echo != what {
            bail!("unexpected answer {line:?}");
        }
        Ok(who.to_string())
    }

    /// Whether the peer closed or reset the connection (within 2 s).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.get_mut().read(&mut b), Ok(0) | Err(_))
    }
}

/// One request on a new connection; the backend that answered.
pub fn ask_once(addr: &str) -> Result<String> {
    LineClient::connect(addr)?.ask("hello")
}

/// One datagram from a socket bound to `from` (or any port); the answer's
/// sender and the backend named in it.
pub fn udp_ask(sock: &UdpSocket, to: &str, what: &str) -> Result<(SocketAddr, String)> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(what.as_bytes(), to)?;
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let (who, echo) = text.split_once(' ').unwrap_or((&text, ""));
    if echo != what {
        bail!("unexpected answer {text:?}");
    }
    Ok((from, who.to_string()))
}

/// `ferry run --dataplane userspace --source file:DIR/cluster.yaml`.
#[derive(Debug)]
pub struct UserspaceAgent {
    child: crate::KillOnDrop,
    pub dir: PathBuf,
    pub metrics: String,
    /// /healthz, /livez and /readyz: 127.0.0.1 on the metrics port + 100.
    pub health: String,
}

impl UserspaceAgent {
    /// Starts the agent on `yaml` (written to a fresh directory). With
    /// `unprivileged`, it runs as nobody (setpriv) when we are root.
    /// `extra` are more flags.
    pub fn start(
        tag: &str,
        yaml: &str,
        metrics_port: u16,
        unprivileged: bool,
        extra: &[&str],
    ) -> Result<UserspaceAgent> {
        Self::start_limited(tag, yaml, metrics_port, unprivileged, extra, None)
    }

    /// [`UserspaceAgent::start`] with RLIMIT_NOFILE (soft and hard) set to
    /// `nofile` for the agent, when given, and then two TCP threads
    /// whatever the machine's CPU count (each thread has its own listeners).
    pub fn start_limited(
        tag: &str,
        yaml: &str,
        metrics_port: u16,
        unprivileged: bool,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<UserspaceAgent> {
        let bin = crate::ferry_path().map_err(anyhow::Error::msg)?;
        let dir = std::env::temp_dir().join(format!("ferry-us-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let yaml_path = dir.join("cluster.yaml");
        std::fs::write(&yaml_path, yaml)?;
        let metrics = format!("127.0.0.1:{metrics_port}");
        let health = format!("127.0.0.1:{}", metrics_port + 100);
        let mut cmd = if unprivileged && crate::privileged::is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.arg("run")
            .arg(format!("--source=file:{}", yaml_path.display()))
            .args(["--hostname-override", "node-a", "--min-sync-period", "50ms"])
            .args([
                "--healthz-bind-address",
                &health,
                "--metrics-bind-address",
                &metrics,
            ])
            .arg(format!("--bpffs-path={}", dir.join("bpffs").display()))
            .args(extra);
        if !extra.contains(&"--dataplane") {
            cmd.args(["--dataplane", "userspace"]);
        }
        if let Some(n) = nofile {
            cmd.env("FERRY_USERSPACE_THREADS", "2");
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: the closure runs in the forked child before exec and
            // only calls setrlimit, which is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        Ok(UserspaceAgent {
            child: crate::KillOnDrop(child),
            dir,
            metrics,
            health,
        })
    }

    /// Replaces the YAML (the file source reloads it).
    pub fn update(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.dir.join("cluster.yaml"))?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// GET on the agent's metrics address.
    pub fn get(&self, path: &str) -> Result<String> {
        ferry_proxy::http::get(&self.metrics, path).map_err(anyhow::Error::from)
    }

    /// Whether /readyz answers 200.
    pub fn ready(&self) -> bool {
        ferry_proxy::http::get(&self.health, "/readyz").is_ok()
    }

    /// The /services rows.
    pub fn services(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.get("/services")?)?)
    }

    /// Waits until `check` holds on the /services rows (10 s at most).
    pub fn wait_for(&self, what: &str, check: impl Fn(&[serde_json::Value]) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(rows) = self.services() {
                if check(&rows) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "timed out waiting for {what}; /services: {:?}\nlog:\n{}",
            self.get("/services").ok(),
            self.log()
        )
    }

    /// A metric's value from /metrics (the first sample of that name).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for UserspaceAgent {
    fn drop(&mut self) {
        // SIGTERM first: the agent removes the addresses it added.
        self.child.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Service + EndpointSlice pair as YAML. `endpoints` are
/// (ip, ready, serving, terminating); `extra_spec` and `annotations` are
/// raw YAML flow mappings' contents.
#[allow(clippy::too_many_arguments)] // one flat call per Service reads best in tests
pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target_port: u16,
    protocol: &str,
    endpoints: &[(&str, bool, bool, bool)],
    extra_spec: &str,
    annotations: &str,
) -> String {
    let mut eps = String::new();
    for (ip, ready, serving, terminating) in endpoints {
        eps.push_str(&format!(
            "  - addresses: [{ip}]\n    conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    if eps.is_empty() {
        eps.push_str("  []\n");
    }
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t, annotations: {{{annotations}}}}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{name: p, port: {port}, targetPort: {target_port}, protocol: {protocol}}}]{extra_spec}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: t\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, port: {target_port}, protocol: {protocol}}}]\nendpoints:\n{eps}"
    )
}
