//! The agent's HTTP endpoints (an I/O edge): /healthz, /livez and /readyz
//! on the healthz address, /metrics, /proxyMode and /services on the
//! metrics address, as kube-proxy serves them, and the healthCheckNodePort
//! listeners. HTTP/1.1 by hyper on a runtime of one thread of its own:
//! keep-alive, HEAD, bounded headers and a header read timeout, graceful
//! shutdown when a listener is dropped. What a path answers is [`route`]'s
//! business, a plain function.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

use crate::metrics::Metrics;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long open connections get to finish when a listener stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Health,
    Metrics,
}

/// One answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type,
            body,
        }
    }

    fn text(status: StatusCode, body: &str) -> Reply {
        Reply::new(status, "text/plain; charset=utf-8", body.into())
    }
}

/// Answers a GET (or HEAD) of a path.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// The runtime every listener of one owner runs on; dropping it stops them.
pub struct HttpServer {
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer").finish_non_exhaustive()
    }
}

/// A listener being served; dropping it closes the listener and lets open
/// connections finish their request (up to two seconds).
#[derive(Debug)]
pub struct Serving {
    pub local: SocketAddr,
    _stop: tokio::sync::watch::Sender<()>,
}

impl HttpServer {
    /// A runtime of one thread named `name`.
    pub fn start(name: &str) -> std::io::Result<HttpServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(HttpServer { rt })
    }

    /// Serves `listener` with `handler` until the returned [`Serving`] is
    /// dropped.
    pub fn serve(&self, listener: TcpListener, handler: Handler) -> std::io::Result<Serving> {
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = self.rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stopped) = tokio::sync::watch::channel(());
        self.rt.spawn(accept_loop(listener, handler, stopped));
        Ok(Serving { local, _stop: stop })
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: Handler,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |req| {
                    let reply = respond(&handler, &req);
                    async move { Ok::<_, Infallible>(reply) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(8192)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

fn respond(handler: &Handler, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = if matches!(*req.method(), Method::GET | Method::HEAD) {
        handler(req.uri().path())
    } else {
        Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n")
    };
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if reply.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

/// The agent's own endpoints on `what`.
pub fn agent_handler(what: Endpoints, metrics: Arc<Metrics>, health_timeout: Duration) -> Handler {
    Arc::new(move |path| route(path, what, &metrics, health_timeout))
}

/// What a path answers.
pub fn route(path: &str, what: Endpoints, metrics: &Metrics, health_timeout: Duration) -> Reply {
    match (what, path) {
        (Endpoints::Health, "/readyz") => {
            let (ok, body) = metrics.readiness(SystemTime::now(), health_timeout);
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Reply::new(status, "application/json", body)
        }
        (Endpoints::Health, "/healthz" | "/livez") => {
            let (ok, body) = metrics.health(SystemTime::now(), health_timeout, path == "/healthz");
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Reply::new(status, "application/json", body)
        }
        (Endpoints::Metrics, "/metrics") => Reply::new(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            metrics.render(),
        ),
        (Endpoints::Metrics, "/proxyMode") => Reply::text(
            StatusCode::OK,
            metrics.dataplane().map_or("ebpf", |d| d.mode()),
        ),
        (Endpoints::Metrics, "/services") => match metrics.dataplane() {
            Some(d) => Reply::new(StatusCode::OK, "application/json", d.services_json()),
            None => Reply::text(
                StatusCode::NOT_FOUND,
                "the eBPF dataplane: use `ferry services` (it reads the pinned maps)\n",
            ),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// Why [`get`] got no body; each names the address and path.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("{0:?} is not ADDRESS:PORT")]
    Address(String),
    #[error("a runtime for {addr}: {source}")]
    Runtime {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}{path}: {source}")]
    Http {
        addr: String,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{addr}{path}: {status}")]
    Status {
        addr: String,
        path: String,
        status: StatusCode,
    },
    #[error("{addr}{path}: no answer in 5 s")]
    Timeout { addr: String, path: String },
}

/// A GET of `path` on `addr` (ADDRESS:PORT), as `ferry services` and the
/// tests ask the agent: the body of a 200, else an error naming the status.
pub fn get(addr: &str, path: &str) -> Result<String, GetError> {
    let sock: SocketAddr = addr.parse().map_err(|_| GetError::Address(addr.into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| GetError::Runtime {
            addr: addr.into(),
            source,
        })?;
    let http = |source: Box<dyn std::error::Error + Send + Sync>| GetError::Http {
        addr: addr.into(),
        path: path.into(),
        source,
    };
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(sock)
            .await
            .map_err(|source| GetError::Connect {
                addr: addr.into(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| http(e.into()))?;
        let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| http(e.into()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(GetError::Status {
                addr: addr.into(),
                path: path.into(),
                status,
            });
        }
        String::from_utf8(body.to_vec()).map_err(|e| http(e.into()))
    };
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .unwrap_or_else(|_| {
                Err(GetError::Timeout {
                    addr: addr.into(),
                    path: path.into(),
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn server(handler: Handler) -> (HttpServer, Serving) {
        let http = HttpServer::start("test-http").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let serving = http.serve(listener, handler).unwrap();
        (http, serving)
    }

    /// Sends `requests` on one connection, then reads until the server
    /// closes it (the last request says `Connection: close`).
    fn exchange(addr: SocketAddr, requests: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(requests.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn keep_alive_head_and_methods() {
        let handler: Handler = Arc::new(|path| match path {
            "/a" => Reply::new(StatusCode::OK, "application/json", "{\"a\":1}".into()),
            _ => Reply::text(StatusCode::NOT_FOUND, "no\n"),
        });
        let (_http, serving) = server(handler);
        let out = exchange(
            serving.local,
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
             HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
             GET /b?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        // A body is not followed by a newline: find the status lines.
        let statuses: Vec<&str> = out
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| out[i..].lines().next())
            .collect();
        assert_eq!(
            statuses,
            [
                "HTTP/1.1 200 OK",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 405 Method Not Allowed",
                "HTTP/1.1 404 Not Found"
            ],
            "{out}"
        );
        // The body once (GET), not after HEAD, which still gives its length.
        assert_eq!(out.matches("{\"a\":1}").count(), 1, "{out}");
        assert_eq!(out.matches("content-length: 7").count(), 2, "{out}");
        assert!(out.contains("allow: GET, HEAD"), "{out}");
        assert!(out.contains("content-type: application/json"), "{out}");
    }

    #[test]
    fn a_dropped_listener_stops_accepting() {
        let (_http, serving) = server(Arc::new(|_| Reply::text(StatusCode::OK, "ok")));
        let addr = serving.local;
        assert!(exchange(addr, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").contains("200 OK"));
        drop(serving);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).is_ok() {
            assert!(std::time::Instant::now() < deadline, "still accepting");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn get_returns_the_body_of_a_200_and_names_other_statuses() {
        let (_http, serving) = server(Arc::new(|path| match path {
            "/ok" => Reply::text(StatusCode::OK, "fine"),
            _ => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "no"),
        }));
        let addr = serving.local.to_string();
        assert_eq!(get(&addr, "/ok").unwrap(), "fine");
        let err = get(&addr, "/down").unwrap_err().to_string();
        assert!(err.contains("503 Service Unavailable"), "{err}");
        assert!(get("localhost", "/")
            .unwrap_err()
            .to_string()
            .contains("ADDRESS:PORT"));
    }

    #[test]
    fn routes() {
        let m = Metrics::default();
        let t = Duration::from_mins(1);
        assert_eq!(
            route("/healthz", Endpoints::Health, &m, t).status,
            StatusCode::OK
        );
        assert_eq!(
            route("/metrics", Endpoints::Health, &m, t).status,
            StatusCode::NOT_FOUND
        );
        let metrics = route("/metrics", Endpoints::Metrics, &m, t);
        assert_eq!(metrics.content_type, crate::metrics::CONTENT_TYPE);
        assert_eq!(route("/proxyMode", Endpoints::Metrics, &m, t).body, "ebpf");
    }
}
