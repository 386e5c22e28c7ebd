//! A fake Kubernetes API server for tests, speaking the real list/watch
//! protocol over HTTP/1.1 on 127.0.0.1:0: resourceVersion on every object
//! and list, limit/continue paging, label and field selectors, watch from a
//! resourceVersion with BOOKMARK events, an ERROR event with code 410 for a
//! resourceVersion that was compacted away, a switch that cuts every watch,
//! and a request log. Serves Services, EndpointSlices, Nodes, Leases and
//! FerryLoadBalancerIPPools: create (POST, 409 when it exists), replace
//! (PUT, 409 on a stale resourceVersion) and status PATCH. With a
//! ClusterRole installed ([`FakeApi::enforce_cluster_role`]) it authorizes
//! every request as the real RBAC authorizer would and answers 403 to what
//! the role does not allow.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The kinds served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Lease,
    Pool,
}

impl Kind {
    fn from_value(v: &Value) -> Option<Kind> {
        match v["kind"].as_str()? {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            "Lease" => Some(Kind::Lease),
            "FerryLoadBalancerIPPool" => Some(Kind::Pool),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
            Kind::Lease => "LeaseList",
            Kind::Pool => "FerryLoadBalancerIPPoolList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Pool => "ferry.dev/v1alpha1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Lease => "Lease",
            Kind::Pool => "FerryLoadBalancerIPPool",
        }
    }

    /// Not namespaced.
    fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Node | Kind::Pool)
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Lease => "leases",
            Kind::Pool => "ferryloadbalancerippools",
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Bumped to end every open watch.
    cut: u64,
    log: Vec<String>,
    /// Bodies of Event objects created or patched (events.k8s.io/v1).
    posted_events: Vec<Value>,
    /// The rules of the ClusterRole requests are checked against.
    rbac: Option<Vec<Rule>>,
    /// Requests the role refused: "verb group/resource".
    denied: Vec<String>,
    /// The fault injected into every request (see [`FakeApi::set_fault`]).
    fault: Fault,
}

/// A fault of the API server, for the agents' fault tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Every connection is closed at once, before a request is read (as
    /// an API server that went away): the client sees a transport error.
    Unreachable,
    /// Every request gets this status (e.g. 500) with a Status body.
    Status(u16),
    /// Every request is answered this long after it arrived.
    Slow(Duration),
}

/// One PolicyRule of a ClusterRole.
#[derive(Debug, Clone)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

impl Rule {
    fn allows(&self, verb: &str, group: &str, resource: &str) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        any(&self.api_groups, group) && any(&self.resources, resource) && any(&self.verbs, verb)
    }
}

/// What RBAC sees of a request: (verb, API group, resource[/subresource]).
fn authorization_attributes(
    method: &str,
    path: &str,
    query: &str,
) -> Option<(String, String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        _ => rest,
    };
    let (resource, named) = match rest {
        [res] => (res.to_string(), false),
        [res, _name] => (res.to_string(), true),
        [res, _name, sub] => (format!("{res}/{sub}"), true),
        _ => return None,
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=1" || kv == "watch=true");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((verb.to_string(), group.to_string(), resource))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// A running fake API server; stops on drop.
#[derive(Debug)]
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn key_of(kind: Kind, v: &Value) -> (Kind, String, String) {
    let ns = if kind.cluster_scoped() {
        String::new()
    } else {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    };
    (
        kind,
        ns,
        v["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

/// Creates or replaces `object` under a new resourceVersion (filling in
/// apiVersion, namespace, uid and creationTimestamp) and records the event.
fn store(st: &mut State, kind: Kind, object: &mut Value) -> u64 {
    st.rv += 1;
    let rv = st.rv;
    object["apiVersion"] = json!(kind.api_version());
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if !kind.cluster_scoped() && object["metadata"]["namespace"].is_null() {
        object["metadata"]["namespace"] = json!("default");
    }
    let key = key_of(kind, object);
    // As the API server: a write of the main resource keeps the identity,
    // the creation time and (when it carries none) the status.
    if let Some(old) = st.objects.get(&key) {
        for field in ["uid", "creationTimestamp"] {
            if object["metadata"][field].is_null() {
                object["metadata"][field] = old["metadata"][field].clone();
            }
        }
        if object.get("status").is_none_or(Value::is_null) && !old["status"].is_null() {
            object["status"] = old["status"].clone();
        }
    }
    if object["metadata"]["uid"].is_null() {
        object["metadata"]["uid"] = json!(format!("uid-{}-{}-{}", kind.name(), key.1, key.2));
    }
    if object["metadata"]["creationTimestamp"].is_null() {
        object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    }
    let type_ = if st.objects.contains_key(&key) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    st.objects.insert(key, object.clone());
    st.events.push(Event {
        rv,
        kind,
        type_,
        object: object.clone(),
    });
    rv
}

/// Now as RFC 3339 UTC with whole seconds (as the API server writes
/// creationTimestamp).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl FakeApi {
    pub fn start() -> std::io::Result<FakeApi> {
        FakeApi::start_on(TcpListener::bind("127.0.0.1:0")?)
    }

    /// Serves on `listener` (e.g. one bound inside a test's network
    /// namespace, so agents in other namespaces reach it).
    pub fn start_on(listener: TcpListener) -> std::io::Result<FakeApi> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if lock(&sh).fault == Fault::Unreachable {
                            drop(conn);
                            continue;
                        }
                        let (sh, st) = (sh.clone(), st.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, &sh, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(FakeApi { shared, addr, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{token: fake}}\n",
                self.url()
            ),
        )
    }

    /// Creates or replaces an object (its `kind` says which); returns its
    /// new resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = Kind::from_value(&object).expect("a kind the fake API serves");
        let mut st = lock(&self.shared);
        let rv = store(&mut st, kind, &mut object);
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// The current object, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let ns = if kind.cluster_scoped() { "" } else { namespace };
        lock(&self.shared)
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = lock(&self.shared);
        let ns = if kind.cluster_scoped() { "" } else { namespace };
        let Some(mut object) = st.objects.remove(&(kind, ns.to_string(), name.to_string())) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push(Event {
            rv,
            kind,
            type_: "DELETED",
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Forgets the event history: a watch resuming from an older
    /// resourceVersion gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut st = lock(&self.shared);
        st.compacted_below = st.rv + 1;
        st.events.clear();
    }

    /// Ends every open watch (clients reconnect).
    /// Injects `fault` into every request from now on (and ends the open
    /// watches, so clients meet it at once); [`Fault::None`] heals.
    pub fn set_fault(&self, fault: Fault) {
        let mut st = lock(&self.shared);
        st.fault = fault;
        st.cut += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    pub fn cut_watches(&self) {
        lock(&self.shared).cut += 1;
        self.shared.changed.notify_all();
    }

    /// The Events clients created or patched, in order.
    pub fn posted_events(&self) -> Vec<Value> {
        lock(&self.shared).posted_events.clone()
    }

    /// From now on, authorizes every request against the rules of this
    /// ClusterRole (a JSON value of kind ClusterRole).
    pub fn enforce_cluster_role(&self, role: &Value) {
        let rules = role["rules"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| Rule {
                        api_groups: strings(&r["apiGroups"]),
                        resources: strings(&r["resources"]),
                        verbs: strings(&r["verbs"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        lock(&self.shared).rbac = Some(rules);
    }

    /// Requests refused by the enforced ClusterRole: "verb group/resource".
    pub fn denied(&self) -> Vec<String> {
        lock(&self.shared).denied.clone()
    }

    /// Every request so far: "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared).log.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

fn query_map(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`.
fn labels_match(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let get = |k: &str| labels.get(k.trim()).and_then(|v| v.as_str());
        if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim_end_matches('=')) == Some(v.trim_start_matches('=').trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    })
}

fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        match k {
            "metadata.name" => object["metadata"]["name"].as_str() == Some(v),
            "metadata.namespace" => object["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        }
    })
}

struct Request {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` for /services/NAME/status.
    subresource: Option<String>,
    query: BTreeMap<String, String>,
}

/// (kind, namespace, name, subresource) of an API path.
type Route = (Kind, Option<String>, Option<String>, Option<String>);

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (rest, group) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (rest, ""),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => (rest, "discovery.k8s.io"),
        ["apis", "coordination.k8s.io", "v1", rest @ ..] => (rest, "coordination.k8s.io"),
        ["apis", "ferry.dev", "v1alpha1", rest @ ..] => (rest, "ferry.dev"),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let plural = *rest.first()?;
    let kind = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Lease,
        Kind::Pool,
    ]
    .into_iter()
    .find(|k| k.plural() == plural && k.api_version().starts_with(group))?;
    if (group.is_empty()) != (kind.api_version() == "v1") {
        return None;
    }
    Some((
        kind,
        ns,
        rest.get(1).map(std::string::ToString::to_string),
        rest.get(2).map(std::string::ToString::to_string),
    ))
}

fn serve(conn: TcpStream, shared: &Shared, stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let (method, target) = (method.to_string(), target.to_string());
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut body = vec![0u8; content_length.min(1 << 20)];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let fault = {
            let mut st = lock(shared);
            st.log.push(format!("{method} {target}"));
            st.fault
        };
        match fault {
            Fault::None => {}
            Fault::Unreachable => return Ok(()),
            Fault::Slow(d) => std::thread::sleep(d),
            Fault::Status(code) => {
                respond(
                    &mut out,
                    code,
                    &status_body(code, "InternalError", "injected fault"),
                )?;
                if close {
                    return Ok(());
                }
                continue;
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if let Some(refused) = refused(shared, &method, path, query) {
            respond(&mut out, 403, &status_body(403, "Forbidden", &refused))?;
            if close {
                return Ok(());
            }
            continue;
        }
        let request = route(path).map(|(kind, namespace, name, subresource)| Request {
            kind,
            namespace,
            name,
            subresource,
            query: query_map(query),
        });
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/")
            && (method == "POST" || method == "PATCH")
        {
            let mut event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut st = lock(shared);
            st.rv += 1;
            event["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.posted_events.push(event.clone());
            drop(st);
            respond(&mut out, if method == "POST" { 201 } else { 200 }, &event)?;
            if close {
                return Ok(());
            }
            continue;
        }
        match (method.as_str(), request) {
            ("GET", Some(r))
                if r.query
                    .get("watch")
                    .is_some_and(|w| w == "1" || w == "true") =>
            {
                return watch(&mut out, shared, stop, &r);
            }
            ("GET", Some(r)) => {
                let (status, body) = get(shared, &r);
                respond(&mut out, status, &body)?;
            }
            ("PATCH", Some(r)) if r.subresource.as_deref() == Some("status") => {
                let (status, body) = patch_status(shared, &r, &body);
                respond(&mut out, status, &body)?;
            }
            ("POST", Some(r)) if r.name.is_none() && r.kind == Kind::Lease => {
                let (status, body) = create(shared, &r, &body);
                respond(&mut out, status, &body)?;
            }
            ("PUT", Some(r)) if r.subresource.is_none() && r.kind == Kind::Lease => {
                let (status, body) = replace(shared, &r, &body);
                respond(&mut out, status, &body)?;
            }
            _ => respond(
                &mut out,
                404,
                &status_body(404, "NotFound", "not served by the fake API"),
            )?,
        }
        if close {
            return Ok(());
        }
    }
}

/// PATCH of an object's status (merge patch, strategic merge patch or
/// server-side apply, all applied here as a JSON merge of the body's
/// `status`): 404 when the object does not exist, 409 when the body names
/// a resourceVersion that is no longer current, else the object with a new
/// resourceVersion (and a MODIFIED event for watchers).
fn patch_status(shared: &Shared, r: &Request, body: &[u8]) -> (u16, Value) {
    let patch: Value = match yaml_serde::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (400, status_body(400, "BadRequest", &e.to_string())),
    };
    let Some(name) = &r.name else {
        return (404, status_body(404, "NotFound", "no name"));
    };
    let ns = if r.kind.cluster_scoped() {
        String::new()
    } else {
        r.namespace.clone().unwrap_or_default()
    };
    let plural = r.kind.plural();
    let key = (r.kind, ns, name.clone());
    let mut st = lock(shared);
    let current_rv = st.rv;
    let Some(object) = st.objects.get_mut(&key) else {
        return (
            404,
            status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
        );
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
        if object["metadata"]["resourceVersion"].as_str() != Some(want) {
            return (
                409,
                status_body(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified"
                    ),
                ),
            );
        }
    }
    merge(&mut object["status"], &patch["status"]);
    let rv = current_rv + 1;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let object = object.clone();
    st.rv = rv;
    st.events.push(Event {
        rv,
        kind: r.kind,
        type_: "MODIFIED",
        object: object.clone(),
    });
    drop(st);
    shared.changed.notify_all();
    (200, object)
}

/// The object of a POST or PUT body, with the path's namespace and name.
fn body_object(r: &Request, body: &[u8]) -> Result<Value, (u16, Value)> {
    let mut object: Value = serde_json::from_slice(body)
        .map_err(|e| (400, status_body(400, "BadRequest", &e.to_string())))?;
    object["kind"] = json!(r.kind.name());
    if !r.kind.cluster_scoped() {
        object["metadata"]["namespace"] = json!(r.namespace.clone().unwrap_or_default());
    }
    if let Some(name) = &r.name {
        if object["metadata"]["name"].as_str() != Some(name) {
            return Err((
                400,
                status_body(400, "BadRequest", "the body names another object"),
            ));
        }
    }
    Ok(object)
}

/// POST: creates the object; 409 AlreadyExists when it is there.
fn create(shared: &Shared, r: &Request, body: &[u8]) -> (u16, Value) {
    let mut object = match body_object(r, body) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let mut st = lock(shared);
    let key = key_of(r.kind, &object);
    if st.objects.contains_key(&key) {
        let msg = format!("{} \"{}\" already exists", r.kind.plural(), key.2);
        return (409, status_body(409, "AlreadyExists", &msg));
    }
    object["metadata"]["resourceVersion"] = Value::Null;
    store(&mut st, r.kind, &mut object);
    drop(st);
    shared.changed.notify_all();
    (201, object)
}

/// PUT: replaces the object; 404 when missing, 409 Conflict when the body's
/// resourceVersion is not the current one.
fn replace(shared: &Shared, r: &Request, body: &[u8]) -> (u16, Value) {
    let mut object = match body_object(r, body) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let mut st = lock(shared);
    let key = key_of(r.kind, &object);
    let Some(current) = st.objects.get(&key) else {
        let msg = format!("{} \"{}\" not found", r.kind.plural(), key.2);
        return (404, status_body(404, "NotFound", &msg));
    };
    let want = &object["metadata"]["resourceVersion"];
    let unconditional = want.is_null() || want.as_str() == Some("");
    if !unconditional && *want != current["metadata"]["resourceVersion"] {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified",
            r.kind.plural(),
            key.2
        );
        return (409, status_body(409, "Conflict", &msg));
    }
    object["metadata"]["uid"] = current["metadata"]["uid"].clone();
    object["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    store(&mut st, r.kind, &mut object);
    drop(st);
    shared.changed.notify_all();
    (200, object)
}

/// JSON merge patch (RFC 7386): objects merge key by key, null deletes,
/// anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        if !patch.is_null() {
            *target = patch.clone();
        }
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// With a role enforced: the reason a request is forbidden, if it is.
fn refused(shared: &Shared, method: &str, path: &str, query: &str) -> Option<String> {
    let mut st = lock(shared);
    let rules = st.rbac.as_ref()?;
    let Some((verb, group, resource)) = authorization_attributes(method, path, query) else {
        let what = format!("{method} {path}");
        st.denied.push(what.clone());
        return Some(format!("{what} is not a resource request"));
    };
    if rules.iter().any(|r| r.allows(&verb, &group, &resource)) {
        return None;
    }
    let what = format!("{verb} {group}/{resource}");
    st.denied.push(what.clone());
    Some(format!("forbidden: the role does not allow {what}"))
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
}

fn selected(r: &Request, object: &Value) -> bool {
    let ns_ok = r
        .namespace
        .as_ref()
        .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
    let name_ok = r
        .name
        .as_ref()
        .is_none_or(|n| object["metadata"]["name"].as_str() == Some(n));
    ns_ok
        && name_ok
        && r.query
            .get("labelSelector")
            .is_none_or(|s| labels_match(s, &object["metadata"]["labels"]))
        && r.query
            .get("fieldSelector")
            .is_none_or(|s| fields_match(s, object))
}

fn get(shared: &Shared, r: &Request) -> (u16, Value) {
    let st = lock(shared);
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, _, _), v)| *k == r.kind && selected(r, v))
        .map(|(_, v)| v)
        .collect();
    if r.name.is_some() {
        return match items.first() {
            Some(v) => (200, (*v).clone()),
            None => (404, status_body(404, "NotFound", "not found")),
        };
    }
    let offset: usize = r
        .query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = r
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items
        .iter()
        .skip(offset)
        .take(limit)
        .map(|v| (*v).clone())
        .collect();
    let mut metadata = json!({"resourceVersion": st.rv.to_string()});
    if offset + page.len() < items.len() {
        metadata["continue"] = json!((offset + page.len()).to_string());
    }
    (
        200,
        json!({"kind": r.kind.list_kind(), "apiVersion": r.kind.api_version(),
               "metadata": metadata, "items": page}),
    )
}

fn chunk(out: &mut TcpStream, value: &Value) -> std::io::Result<()> {
    let text = format!("{value}\n");
    write!(out, "{:x}\r\n{text}\r\n", text.len())?;
    out.flush()
}

fn watch(
    out: &mut TcpStream,
    shared: &Shared,
    stop: &AtomicBool,
    r: &Request,
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let timeout = r
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_mins(1), Duration::from_secs)
        .min(Duration::from_mins(2));
    let bookmarks = r
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let deadline = Instant::now() + timeout;
    let mut st = lock(shared);
    let cut_at_start = st.cut;
    let from: u64 = r
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut last = from;
    if from == 0 {
        // "Any": start with the current objects as ADDED events.
        let current: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), v)| *k == r.kind && selected(r, v))
            .map(|(_, v)| v.clone())
            .collect();
        last = st.rv;
        drop(st);
        for object in current {
            chunk(out, &json!({"type": "ADDED", "object": object}))?;
        }
        st = lock(shared);
    } else if from < st.compacted_below {
        drop(st);
        chunk(
            out,
            &json!({"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")}),
        )?;
        return write!(out, "0\r\n\r\n");
    }
    let mut last_bookmark = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) || st.cut != cut_at_start || Instant::now() >= deadline {
            break;
        }
        // Under the lock: every event of this kind up to `newest` is in
        // `pending`, so `newest` is safe to report or resume from.
        let pending: Vec<Event> = st
            .events
            .iter()
            .filter(|e| e.rv > last && e.kind == r.kind && selected(r, &e.object))
            .cloned()
            .collect();
        let newest = st.rv;
        if !pending.is_empty() {
            drop(st);
            for e in &pending {
                chunk(out, &json!({"type": e.type_, "object": e.object}))?;
            }
            last = newest;
            st = lock(shared);
            continue;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            drop(st);
            chunk(
                out,
                &json!({"type": "BOOKMARK", "object": {"kind": r.kind.name(),
                    "apiVersion": r.kind.api_version(), "metadata": {"resourceVersion": newest.to_string()}}}),
            )?;
            last = newest;
            last_bookmark = Instant::now();
            st = lock(shared);
            continue;
        }
        let (guard, _) = shared
            .changed
            .wait_timeout(st, Duration::from_millis(200))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st = guard;
    }
    drop(st);
    write!(out, "0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels = json!({"a": "1", "b": "2"});
        assert!(labels_match("a=1,b", &labels));
        assert!(labels_match("a==1,!c", &labels));
        assert!(!labels_match("a!=1", &labels));
        assert!(!labels_match("c", &labels));
    }

    #[test]
    fn rbac_attributes() {
        let a = |m, p, q| authorization_attributes(m, p, q).unwrap();
        assert_eq!(
            a("GET", "/api/v1/services", "watch=true&resourceVersion=1"),
            ("watch".into(), String::new(), "services".into())
        );
        assert_eq!(
            a(
                "GET",
                "/apis/discovery.k8s.io/v1/endpointslices",
                "limit=500"
            ),
            (
                "list".into(),
                "discovery.k8s.io".into(),
                "endpointslices".into()
            )
        );
        assert_eq!(
            a("PATCH", "/api/v1/namespaces/a/services/b/status", ""),
            ("patch".into(), String::new(), "services/status".into())
        );
        assert_eq!(
            a("POST", "/apis/events.k8s.io/v1/namespaces/a/events", ""),
            ("create".into(), "events.k8s.io".into(), "events".into())
        );
        let rule = Rule {
            api_groups: vec![String::new()],
            resources: vec!["services".into()],
            verbs: vec!["list".into(), "watch".into()],
        };
        assert!(rule.allows("watch", "", "services"));
        assert!(!rule.allows("get", "", "services"));
        assert!(!rule.allows("watch", "", "services/status"));
        assert!(!rule.allows("watch", "discovery.k8s.io", "services"));
    }

    #[test]
    fn merge_patch_merges_replaces_and_deletes() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/services").map(|r| r.0), Some(Kind::Service));
        let r = route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/x").unwrap();
        assert_eq!(
            (r.0, r.1.as_deref(), r.2.as_deref()),
            (Kind::EndpointSlice, Some("ns"), Some("x"))
        );
        let r = route("/api/v1/namespaces/ns/services/web/status").unwrap();
        assert_eq!(
            (r.0, r.2.as_deref(), r.3.as_deref()),
            (Kind::Service, Some("web"), Some("status"))
        );
        assert_eq!(
            route("/api/v1/nodes/n1").and_then(|r| r.2),
            Some("n1".into())
        );
        assert!(route("/api/v1/pods").is_none());
        let r = route("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l").unwrap();
        assert_eq!((r.0, r.1.as_deref()), (Kind::Lease, Some("kube-system")));
        let r = route("/apis/ferry.dev/v1alpha1/ferryloadbalancerippools/p/status").unwrap();
        assert_eq!((r.0, r.3.as_deref()), (Kind::Pool, Some("status")));
        assert!(route("/api/v1/leases").is_none());
        assert!(route("/apis/ferry.dev/v1alpha1/services").is_none());
    }
}
