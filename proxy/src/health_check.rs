//! healthCheckNodePort servers (an I/O edge): for each Service with
//! externalTrafficPolicy Local, a listener on its healthCheckNodePort that
//! answers 200 when this node has local endpoints and 503 otherwise, with
//! kube-proxy's JSON body, so external load balancers send traffic only to
//! nodes that can serve it locally.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;

use crate::http::{HttpServer, Reply, Serving};
use crate::model::ServiceName;

/// What one health-check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub service: ServiceName,
    pub local_endpoints: usize,
    pub proxy_healthy: bool,
}

impl Report {
    /// The answer kube-proxy gives: 200 with local endpoints (and a healthy
    /// proxy), 503 otherwise, and a JSON body.
    pub fn response(&self) -> Reply {
        let status = if self.local_endpoints > 0 && self.proxy_healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = format!(
            "{{\"service\":{{\"namespace\":{:?},\"name\":{:?}}},\"localEndpoints\":{},\"serviceProxyHealthy\":{}}}",
            &*self.service.namespace, &*self.service.name, self.local_endpoints, self.proxy_healthy
        );
        Reply::new(status, "application/json", body)
    }
}

struct Server {
    report: Arc<Mutex<Report>>,
    _listeners: Vec<Serving>,
}

/// The running health-check servers, by port.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    /// Started with the first port.
    http: Option<HttpServer>,
}

impl std::fmt::Debug for HealthCheckServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheckServers")
            .field("ports", &self.servers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HealthCheckServers {
    /// Makes the servers match `wanted` (port -> report), listening on
    /// `addresses` (the unspecified address when empty). A port that cannot
    /// be bound is logged and tried again at the next update.
    pub fn update(&mut self, wanted: BTreeMap<u16, Report>, addresses: &[IpAddr]) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            self.servers.remove(&port);
        }
        for (port, report) in wanted {
            if let Some(s) = self.servers.get(&port) {
                if let Ok(mut r) = s.report.lock() {
                    *r = report;
                }
                continue;
            }
            match self.start(port, report.clone(), addresses) {
                Ok(server) => {
                    self.servers.insert(port, server);
                }
                Err(e) => tracing::warn!(
                    port,
                    service = %report.service,
                    error = %e,
                    "cannot serve healthCheckNodePort"
                ),
            }
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl HealthCheckServers {
    fn start(
        &mut self,
        port: u16,
        report: Report,
        addresses: &[IpAddr],
    ) -> std::io::Result<Server> {
        let unspecified = [IpAddr::from([0, 0, 0, 0])];
        let addrs = if addresses.is_empty() {
            &unspecified[..]
        } else {
            addresses
        };
        let listeners = addrs
            .iter()
            .map(|ip| TcpListener::bind(SocketAddr::new(*ip, port)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let http = match &mut self.http {
            Some(h) => h,
            None => self.http.insert(HttpServer::start("ferry-hc")?),
        };
        let report = Arc::new(Mutex::new(report));
        let handler: crate::http::Handler = {
            let report = report.clone();
            Arc::new(move |_path| {
                report
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .response()
            })
        };
        let listeners = listeners
            .into_iter()
            .map(|l| http.serve(l, handler.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Server {
            report,
            _listeners: listeners,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    fn get(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn answers_200_with_local_endpoints_then_503_then_stops() {
        let port = free_port();
        let lo = [IpAddr::from([127, 0, 0, 1])];
        let mut servers = HealthCheckServers::default();
        let report = |n| Report {
            service: ServiceName::new("default", "web"),
            local_endpoints: n,
            proxy_healthy: true,
        };
        servers.update(BTreeMap::from([(port, report(2))]), &lo);
        let r = get(port);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(
            "{\"service\":{\"namespace\":\"default\",\"name\":\"web\"},\"localEndpoints\":2,\"serviceProxyHealthy\":true}"
        ));
        servers.update(BTreeMap::from([(port, report(0))]), &lo);
        assert!(get(port).starts_with("HTTP/1.1 503"));
        servers.update(BTreeMap::new(), &lo);
        assert!(servers.ports().is_empty());
        // The listener goes away once its task sees the stop.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "port still bound");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
