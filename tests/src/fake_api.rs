//! An in-process fake of the Kubernetes API server, because no API server runs on these
//! machines. It speaks the real wire protocol the agent's kube-rs client speaks — JSON over
//! HTTP/1.1, bearer-token auth, `resourceVersion`s, list then `?watch=true` streams of
//! newline-delimited watch events, `allowWatchBookmarks` BOOKMARK events, `fieldSelector`
//! (`spec.nodeName`, `metadata.name`), and `410 Gone` ERROR events for a watch from a compacted
//! version — for the resources the agent uses: pods, namespaces (list/watch), its own
//! DaemonSet (get, list/watch) and events.k8s.io/v1 Events (create/patch). The test is the only
//! writer; it can end every watch, compact history, restart the server on the same port, and
//! refuse every new request with 403 (RBAC deleted) while open watches go on.
//!
//! Not faked: pagination (lists are returned whole; tests stay far below the client's 500-item
//! page), label selectors, and every other resource (404, as for an unknown path).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{SocketAddr, TcpListener as StdListener},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "fake-token-for-interceptor-tests";
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    /// apps/v1: only GET of one object (the agent asks whether its own DaemonSet still exists).
    DaemonSet,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::DaemonSet => "DaemonSet",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Namespace => "v1",
            Kind::DaemonSet => "apps/v1",
        }
    }
}

type Key = (Kind, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    /// A watch from a version older than this gets 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch.
    watch_generation: u64,
    /// Events posted (and patched) by the agent.
    events: Vec<Value>,
    /// Every request line, for assertions on what the client asked.
    requests: Vec<String>,
    /// Watches served (each connection once).
    watches: u64,
    /// Lists served, per kind.
    lists: BTreeMap<&'static str, u64>,
    /// The highest resourceVersion sent in a BOOKMARK, per kind.
    bookmarked: BTreeMap<&'static str, u64>,
    /// Watch events written to open watches, per kind and type ("DaemonSet", "DELETED").
    delivered: BTreeMap<(&'static str, String), u64>,
    /// Every new request is refused with 403 (the agent's RoleBinding deleted); open watches
    /// go on, as the real server does not authorize a running watch again.
    forbidden: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

/// The fake server; dropped, it stops.
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    stop: CancellationToken,
}

impl FakeApi {
    /// Starts on a free loopback port.
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on `addr`.
    pub fn start_on(addr: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fake API runtime");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            changed: Notify::new(),
        });
        let listener = bind(addr);
        let addr = listener.local_addr().expect("fake API address");
        let stop = CancellationToken::new();
        rt.spawn(serve(listener, shared.clone(), stop.clone()));
        Self {
            addr,
            shared,
            rt: Some(rt),
            stop,
        }
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        write_kubeconfig(path, self.addr);
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.shared.state.lock().expect("fake API lock"));
        self.shared.changed.notify_waiters();
        out
    }

    /// Creates or replaces an object (as `kubectl apply` would), assigning its
    /// resourceVersion (and a uid and creationTimestamp when missing). Returns the version.
    pub fn apply(&self, kind: Kind, object: Value) -> u64 {
        self.with(|s| Changes(s).apply(kind, object))
    }

    /// Changes an existing object in place (a `kubectl annotate`/`label`).
    pub fn update(&self, kind: Kind, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        self.with(|s| Changes(s).update(kind, namespace, name, f));
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let s = self.shared.state.lock().expect("fake API lock");
        s.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Deletes an object; watchers get a DELETED event with its last state.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.with(|s| Changes(s).delete(kind, namespace, name));
    }

    /// A watch that expired while things changed: in one step, ends every open watch, makes
    /// `changes`, and compacts the history, so no client sees those changes as events — each
    /// client's next watch gets 410 Gone and it must re-list to learn them.
    pub fn expire_watches(&self, changes: impl FnOnce(&mut Changes<'_>)) {
        self.with(|s| {
            s.watch_generation += 1;
            changes(&mut Changes(s));
            s.compacted = s.rv;
            s.log.clear();
        });
    }

    /// Stops the server (every connection dropped, the port closed), makes `changes` while it
    /// is down, and starts it again on the same port after `down_for`.
    pub fn restart(&mut self, down_for: Duration, changes: impl FnOnce(&mut Changes<'_>)) {
        self.stop.cancel();
        self.with(|s| {
            s.watch_generation += 1;
            changes(&mut Changes(s));
        });
        thread::sleep(down_for);
        self.stop = CancellationToken::new();
        let listener = bind(self.addr);
        let rt = self.rt.as_ref().expect("runtime");
        rt.spawn(serve(listener, self.shared.clone(), self.stop.clone()));
    }

    /// Events the agent posted (events.k8s.io/v1 objects).
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().expect("lock").events.clone()
    }

    /// Request lines seen so far (`GET /api/v1/pods?…`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().expect("lock").requests.clone()
    }

    /// Complete lists served for a kind ("Pod", "Namespace").
    pub fn lists(&self, kind: &str) -> u64 {
        let s = self.shared.state.lock().expect("lock");
        s.lists.get(kind).copied().unwrap_or(0)
    }

    /// The highest resourceVersion a BOOKMARK carried to a watch of `kind` ("Pod", …).
    pub fn bookmarked(&self, kind: &str) -> u64 {
        let s = self.shared.state.lock().expect("lock");
        s.bookmarked.get(kind).copied().unwrap_or(0)
    }

    /// Watch connections served so far.
    /// Watch events of `kind` and `type_` written to open watches so far.
    pub fn delivered(&self, kind: &str, type_: &str) -> u64 {
        let s = self.shared.state.lock().expect("lock");
        s.delivered
            .iter()
            .filter(|((k, t), _)| *k == kind && t == type_)
            .map(|(_, n)| n)
            .sum()
    }

    /// While `on`, every new request gets 403 Forbidden, as when `helm uninstall` deletes the
    /// agent's Role and RoleBinding right after its DaemonSet.
    pub fn refuse_requests(&self, on: bool) {
        self.with(|s| s.forbidden = on);
    }

    pub fn watches(&self) -> u64 {
        self.shared.state.lock().expect("lock").watches
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Writes to the fake's objects (each one a new resourceVersion and a watch event).
pub struct Changes<'a>(&'a mut State);

impl Changes<'_> {
    pub fn apply(&mut self, kind: Kind, mut object: Value) -> u64 {
        let s = &mut *self.0;
        s.rv += 1;
        let rv = s.rv;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta["uid"].is_null() {
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012x}"));
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        }
        object["kind"] = json!(kind.name());
        object["apiVersion"] = json!(kind.api_version());
        let key = key_of(kind, &object);
        let type_ = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, object.clone());
        s.log.push(Change {
            rv,
            kind,
            type_,
            object,
        });
        rv
    }

    pub fn update(&mut self, kind: Kind, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut object = self
            .0
            .objects
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind:?} {namespace}/{name} in the fake API"));
        f(&mut object);
        self.apply(kind, object);
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) {
        let s = &mut *self.0;
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(mut object) = s.objects.remove(&key) else {
            panic!("no {kind:?} {namespace}/{name} to delete");
        };
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let rv = s.rv;
        s.log.push(Change {
            rv,
            kind,
            type_: "DELETED",
            object,
        });
    }
}

/// Writes a kubeconfig for a fake API at `addr` (which need not be up yet).
pub fn write_kubeconfig(path: &Path, addr: SocketAddr) {
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
         http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: \
         agent\ncurrent-context: fake\nusers:\n- name: agent\n  user:\n    token: {TOKEN}\n"
    );
    std::fs::write(path, config).expect("writing kubeconfig");
}

/// A loopback address with a port free right now (for a server started later).
pub fn free_loopback_addr() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn bind(addr: SocketAddr) -> StdListener {
    // SO_REUSEADDR: a restart binds the same port while old connections are in TIME_WAIT.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&addr.into()).expect("binding the fake API");
    socket.listen(128).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    (
        kind,
        meta["namespace"].as_str().unwrap_or("").to_owned(),
        meta["name"].as_str().expect("metadata.name").to_owned(),
    )
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

async fn serve(listener: StdListener, shared: Arc<Shared>, stop: CancellationToken) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn_stop = stop.clone();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let stop = stop.clone();
                async move { Ok::<_, Infallible>(handle(req, shared, stop).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // A restart drops the connection outright, as a dying API server does.
            tokio::select! {
                _ = conn => {}
                _ = conn_stop.cancelled() => {}
            }
        });
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).expect("status code"),
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

/// `a=b&c=d` with percent-decoding.
fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => out.push(b),
                        Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                    }
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Which objects a list or watch asks for: the path's namespace and a field selector of
/// `spec.nodeName` and `metadata.name` terms (`=` or `==`).
#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    node: Option<String>,
    name: Option<String>,
}

/// Other field labels are refused, as the real server refuses unsupported ones.
fn filter(namespace: Option<&str>, q: &BTreeMap<String, String>) -> Result<Filter, String> {
    let mut out = Filter {
        namespace: namespace.map(str::to_owned),
        ..Filter::default()
    };
    let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) else {
        return Ok(out);
    };
    for term in sel.split(',') {
        let (field, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("invalid field selector {term:?}"))?;
        match field {
            "spec.nodeName" => out.node = Some(value.to_owned()),
            "metadata.name" => out.name = Some(value.to_owned()),
            _ => return Err(format!("field label not supported: {field}")),
        }
    }
    Ok(out)
}

fn matches(object: &Value, filter: &Filter) -> bool {
    let is = |field: &Value, want: &Option<String>| {
        want.as_deref().is_none_or(|w| field.as_str() == Some(w))
    };
    is(&object["spec"]["nodeName"], &filter.node)
        && is(&object["metadata"]["name"], &filter.name)
        && is(&object["metadata"]["namespace"], &filter.namespace)
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Response<Body> {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    );
    shared.state.lock().expect("lock").requests.push(line);
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path().to_owned();
    if shared.state.lock().expect("lock").forbidden {
        return status(
            403,
            "Forbidden",
            &format!("access to {path} is forbidden for this service account"),
        );
    }
    let q = query(&req);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "pods"]) => {
            list_or_watch(Kind::Pod, None, &q, shared, stop).await
        }
        (Method::GET, ["api", "v1", "namespaces"]) => {
            list_or_watch(Kind::Namespace, None, &q, shared, stop).await
        }
        (Method::GET, ["apis", "apps", "v1", "namespaces", ns, "daemonsets"]) => {
            list_or_watch(Kind::DaemonSet, Some(ns), &q, shared, stop).await
        }
        (Method::GET, ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
            let key = (Kind::DaemonSet, (*ns).to_owned(), (*name).to_owned());
            let found = shared
                .state
                .lock()
                .expect("lock")
                .objects
                .get(&key)
                .cloned();
            match found {
                Some(ds) => json_response(StatusCode::OK, &ds),
                None => status(
                    404,
                    "NotFound",
                    &format!("daemonsets.apps \"{name}\" not found"),
                ),
            }
        }
        (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let ns = (*ns).to_owned();
            let Ok(body) = req.into_body().collect().await else {
                return status(400, "BadRequest", "unreadable body");
            };
            let Ok(mut event) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(400, "BadRequest", "not JSON");
            };
            let mut s = shared.state.lock().expect("lock");
            s.rv += 1;
            event["metadata"]["namespace"] = json!(ns);
            event["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.events.push(event.clone());
            json_response(StatusCode::CREATED, &event)
        }
        (
            Method::PATCH,
            [
                "apis",
                "events.k8s.io",
                "v1",
                "namespaces",
                _ns,
                "events",
                name,
            ],
        ) => {
            let name = (*name).to_owned();
            let Ok(body) = req.into_body().collect().await else {
                return status(400, "BadRequest", "unreadable body");
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(400, "BadRequest", "not JSON");
            };
            let mut s = shared.state.lock().expect("lock");
            let Some(event) = s
                .events
                .iter_mut()
                .rev()
                .find(|e| e["metadata"]["name"] == name.as_str())
            else {
                return status(404, "NotFound", &format!("events \"{name}\" not found"));
            };
            // A JSON merge patch of the fields the recorder sends.
            if let (Some(target), Some(fields)) = (event.as_object_mut(), patch.as_object()) {
                for (k, v) in fields {
                    target.insert(k.clone(), v.clone());
                }
            }
            let event = event.clone();
            json_response(StatusCode::OK, &event)
        }
        _ => status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        ),
    }
}

async fn list_or_watch(
    kind: Kind,
    namespace: Option<&str>,
    q: &BTreeMap<String, String>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Response<Body> {
    let filter = match filter(namespace, q) {
        Ok(f) => f,
        Err(msg) => return status(400, "BadRequest", &msg),
    };
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watch {
        let mut s = shared.state.lock().expect("lock");
        *s.lists.entry(kind.name()).or_default() += 1;
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == kind && matches(o, &filter))
            .map(|(_, o)| o.clone())
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            }),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let generation = {
        let mut s = shared.state.lock().expect("lock");
        s.watches += 1;
        s.watch_generation
    };
    tokio::spawn(watch_stream(
        WatchArgs {
            kind,
            filter,
            from,
            bookmarks,
            timeout,
            generation,
        },
        shared,
        stop,
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response")
}

struct WatchArgs {
    kind: Kind,
    filter: Filter,
    from: u64,
    bookmarks: bool,
    timeout: Duration,
    generation: u64,
}

/// Streams a watch: every change after `from`, then new ones as they come, bookmarks when
/// asked; ends at the timeout, when the test ends every watch, or at a restart.
async fn watch_stream(
    args: WatchArgs,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tx: mpsc::Sender<Bytes>,
) {
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last = args.from;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (out, current, ended) = {
            let s = shared.state.lock().expect("lock");
            if last < s.compacted {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {last} ({})", s.compacted),
                    "reason": "Expired", "code": 410,
                }});
                (vec![gone], s.rv, true)
            } else {
                let out: Vec<Value> = s
                    .log
                    .iter()
                    .filter(|c| {
                        c.rv > last && c.kind == args.kind && matches(&c.object, &args.filter)
                    })
                    .map(|c| json!({"type": c.type_, "object": c.object}))
                    .collect();
                (out, s.rv, s.watch_generation != args.generation)
            }
        };
        if ended && out.iter().all(|e| e["type"] != "ERROR") {
            return;
        }
        for event in out {
            let type_ = event["type"].as_str().unwrap_or("").to_owned();
            if tx.send(line(event)).await.is_err() {
                return;
            }
            *shared
                .state
                .lock()
                .expect("lock")
                .delivered
                .entry((args.kind.name(), type_))
                .or_default() += 1;
        }
        if ended {
            return;
        }
        last = current;
        tokio::select! {
            _ = &mut notified => {}
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tokio::time::sleep(BOOKMARK_EVERY), if args.bookmarks => {
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": args.kind.name(), "apiVersion": args.kind.api_version(),
                    "metadata": {"resourceVersion": current.to_string()},
                }});
                if tx.send(line(bookmark)).await.is_err() {
                    return;
                }
                let mut s = shared.state.lock().expect("lock");
                let sent = s.bookmarked.entry(args.kind.name()).or_default();
                *sent = (*sent).max(current);
            }
        }
    }
}
