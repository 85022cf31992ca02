//! Calls through the proxy to h2c upstreams that behave legally but unusually, looking for a
//! call that never ends (issue 18: h2load stalled through the proxy, never through haproxy).
//! The upstream is raw frames on a socket, so it can do what no library server does on demand:
//! lower SETTINGS_MAX_CONCURRENT_STREAMS mid-flight, answer before reading the request body,
//! never read, stay silent, send GOAWAY below streams in flight, or close with
//! ENHANCE_YOUR_CALM. The client is the h2 crate's (hyper's), 16 gRPC-shaped calls at once on
//! one connection as h2load sends them. Every call must end — a response or a gRPC-shaped
//! error — within a bound, and the proxy's gauges must return to 0: its requests, its client
//! connections, and its count of upstream h2 streams (the pool's, which decides what a
//! connection can still take). The `streams_a_*` tests count what the upstream processed: a
//! stream a GOAWAY names as processed is not sent again unless the route retries on `reset`;
//! one it refuses is retried on a new connection.

#[path = "support/proxy.rs"]
mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use support::Proxy;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

const CALLS: usize = 16;
/// Far above what any call needs here: a call still open then is a call that hangs.
const BOUND: Duration = Duration::from_secs(15);

// === a raw h2c upstream ===

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const NO_ERROR: u32 = 0;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One frame off the socket: (type, flags, stream id, payload); None once it ends.
async fn read_frame(rd: &mut (impl AsyncRead + Unpin)) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    rd.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    rd.read_exact(&mut payload).await.ok()?;
    let sid = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], sid, payload))
}

/// WINDOW_UPDATEs giving `len` bytes back to the connection and to stream `sid`.
fn window_back(sid: u32, len: usize) -> Vec<u8> {
    let inc = u32::try_from(len).unwrap_or(0).to_be_bytes();
    let mut out = frame(WINDOW_UPDATE, 0, 0, &inc);
    out.extend(frame(WINDOW_UPDATE, 0, sid, &inc));
    out
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, value) in entries {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

fn goaway(last_stream: u32, code: u32) -> Vec<u8> {
    let mut p = last_stream.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

/// A whole gRPC answer: `:status 200` (static index 8), `content-type: application/grpc`
/// (literal, indexed name 31), one message, and `grpc-status: 0` trailers (literal, new name).
fn grpc_answer(stream: u32) -> Vec<u8> {
    let mut head = vec![0x88, 0x0f, 0x10, 16];
    head.extend_from_slice(b"application/grpc");
    let mut out = frame(HEADERS, 0x4, stream, &head);
    out.extend(frame(DATA, 0, stream, &[0, 0, 0, 0, 2, b'o', b'k']));
    let mut trailers = vec![0x00, 11];
    trailers.extend_from_slice(b"grpc-status");
    trailers.extend_from_slice(&[1, b'0']);
    out.extend(frame(HEADERS, 0x4 | END_STREAM, stream, &trailers));
    out
}

/// How a raw upstream connection behaves.
#[derive(Clone, Copy, Debug, Default)]
struct Behaviour {
    /// Nothing at all after accepting: no SETTINGS, no reads.
    mute: bool,
    /// Its SETTINGS and then nothing (reads, acknowledges nothing, answers nothing).
    settings_then_silence: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS in its first SETTINGS.
    max_streams: Option<u32>,
    /// Once this many requests arrived, a second SETTINGS lowers the limit to this.
    lower_to: Option<(usize, u32)>,
    /// A second SETTINGS right behind the first, in the same write, lowers the limit to this.
    lower_at_once: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE in its first SETTINGS.
    stream_window: Option<u32>,
    /// Never gives window back (reads request DATA, sends no WINDOW_UPDATE).
    keep_window: bool,
    /// Answers at the request's HEADERS, before its body (else at its END_STREAM).
    answer_early: bool,
    /// Waits this long before each answer.
    delay: Duration,
    /// Once this many requests arrived: GOAWAY(NO_ERROR) naming the first half as the last it
    /// processes; those are answered, the others never.
    goaway_after: Option<usize>,
    /// Once this many requests arrived: GOAWAY(ENHANCE_YOUR_CALM) and close, answering none.
    calm_after: Option<usize>,
}

/// An h2c upstream on a fresh port; counts the connections it accepted. A GOAWAY or
/// ENHANCE_YOUR_CALM comes on the first connection only: later ones (the proxy's retries)
/// answer every call.
async fn raw_upstream(
    how: Behaviour,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let (addr, accepted, task, _) = raw_upstream_telling(how).await;
    (addr, accepted, task)
}

/// [`raw_upstream`], also telling how many of its `lower_to` SETTINGS the proxy has
/// acknowledged (h2 applies a peer's SETTINGS as it acknowledges them).
async fn raw_upstream_telling(
    how: Behaviour,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
    watch::Receiver<usize>,
) {
    let (lowered_tx, lowered_rx) = watch::channel(0usize);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let how = if first || (how.goaway_after.is_none() && how.calm_after.is_none()) {
                how
            } else {
                Behaviour {
                    max_streams: how.max_streams,
                    ..Behaviour::default()
                }
            };
            held.push(tokio::spawn(serve_raw(stream, how, lowered_tx.clone())));
        }
    });
    (addr, accepted, task, lowered_rx)
}

async fn serve_raw(stream: TcpStream, how: Behaviour, lowered: watch::Sender<usize>) {
    let (mut rd, mut wr) = stream.into_split();
    if how.mute {
        // Holds the socket open, reading nothing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop((rd, wr));
        return;
    }
    let mut preface = [0u8; 24];
    if rd.read_exact(&mut preface).await.is_err() {
        return;
    }
    let mut first = Vec::new();
    if let Some(n) = how.max_streams {
        first.push((0x3, n));
    }
    if let Some(w) = how.stream_window {
        first.push((0x4, w));
    }
    let mut hello = settings(&first);
    if let Some(n) = how.lower_at_once {
        hello.extend(settings(&[(0x3, n)]));
    }
    if wr.write_all(&hello).await.is_err() {
        return;
    }
    if how.settings_then_silence {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    // One writer, so delayed answers from their own tasks interleave whole frames.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let answer = |sid: u32| {
        let tx = tx.clone();
        let delay = how.delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(grpc_answer(sid));
        });
    };
    let mut requests = 0usize;
    // Streams that may still be answered; `None` = every one.
    let mut last_answered: Option<u32> = None;
    let mut seen: Vec<u32> = Vec::new();
    let mut open: HashMap<u32, bool> = HashMap::new();
    // Before a GOAWAY or ENHANCE_YOUR_CALM, answers wait for it (so some streams are in flight).
    let hold = how.goaway_after.is_some() || how.calm_after.is_some();
    let mut held: Vec<u32> = Vec::new();
    // SETTINGS acknowledged, and whether the lowering one was sent (ACKs come in order: the
    // second is the lowering's).
    let mut acks = 0usize;
    let mut lowering_sent = how.lower_at_once.is_some();
    while let Some((kind, flags, sid, payload)) = read_frame(&mut rd).await {
        let answerable = |sid: u32| last_answered.is_none_or(|last| sid <= last);
        match kind {
            SETTINGS if flags & ACK == 0 => {
                let _ = tx.send(frame(SETTINGS, ACK, 0, &[]));
            }
            SETTINGS => {
                acks += 1;
                if lowering_sent && acks == 2 {
                    lowered.send_modify(|n| *n += 1);
                }
            }
            PING if flags & ACK == 0 => {
                let _ = tx.send(frame(PING, ACK, 0, &payload));
            }
            HEADERS => {
                requests += 1;
                seen.push(sid);
                open.insert(sid, true);
                if (how.answer_early || flags & END_STREAM != 0) && answerable(sid) {
                    if hold && last_answered.is_none() {
                        held.push(sid);
                    } else {
                        answer(sid);
                    }
                    open.insert(sid, false);
                }
                if how.lower_to.is_some_and(|(after, _)| requests == after) {
                    let n = how.lower_to.map_or(0, |(_, n)| n);
                    let _ = tx.send(settings(&[(0x3, n)]));
                    lowering_sent = true;
                }
                if how.goaway_after == Some(requests) {
                    let last = seen[seen.len() / 2 - 1];
                    last_answered = Some(last);
                    let _ = tx.send(goaway(last, NO_ERROR));
                    held.retain(|&s| s <= last);
                    held.drain(..).for_each(&answer);
                }
                if how.calm_after == Some(requests) {
                    // Closes with every stream unanswered.
                    let _ = tx.send(goaway(sid, ENHANCE_YOUR_CALM));
                    break;
                }
            }
            DATA => {
                if !payload.is_empty() && !how.keep_window {
                    let _ = tx.send(window_back(sid, payload.len()));
                }
                if flags & END_STREAM != 0 && open.get(&sid) == Some(&true) && answerable(sid) {
                    if hold && last_answered.is_none() {
                        held.push(sid);
                    } else {
                        answer(sid);
                    }
                    open.insert(sid, false);
                }
            }
            RST_STREAM => {
                open.remove(&sid);
            }
            _ => {}
        }
    }
    drop(tx);
    // Lets queued answers and the GOAWAY out before the socket closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.abort();
}

// === the client: 16 gRPC-shaped calls on one h2 connection ===

/// How one call ended.
#[derive(Debug)]
enum Ended {
    /// HTTP status and `grpc-status` (from the head of a trailers-only answer, or the trailers).
    Answered(StatusCode, Option<String>),
    /// The stream or connection failed (a reset, GOAWAY, or the connection closing).
    Failed(#[expect(dead_code, reason = "shown by Debug in assertion messages")] String),
}

/// When a call's request body (its only DATA frame) goes out.
#[derive(Clone, Copy, Debug)]
enum Body {
    /// Right after the head, as h2load sends it.
    WithHead,
    /// Only once every call's response head is in: a client that keeps its side of each
    /// stream open until it has heard back on all of them (legal, as a bidi stream whose
    /// server answered early).
    AfterAllHeads,
}

/// `calls` gRPC unary calls at once on one h2c connection to `proxy`. Panics naming the calls
/// still open after `BOUND`.
async fn calls_on_one_connection(proxy: SocketAddr, calls: usize, body: Body) -> Vec<Ended> {
    calls_with(proxy, calls, body, None).await
}

/// [`calls_on_one_connection`], each call with `grpc-timeout` if given.
async fn calls_with(
    proxy: SocketAddr,
    calls: usize,
    body: Body,
    grpc_timeout: Option<&'static str>,
) -> Vec<Ended> {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let (heads, _) = watch::channel(0usize);
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let client = client.clone();
            let heads = heads.clone();
            tokio::spawn(async move { one_call(client, i, body, heads, calls, grpc_timeout).await })
        })
        .collect();
    let mut ended = Vec::new();
    let mut hung = Vec::new();
    let deadline = tokio::time::Instant::now() + BOUND;
    for (i, t) in tasks.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(e)) => ended.push(e),
            Ok(Err(join)) => ended.push(Ended::Failed(format!("task: {join}"))),
            Err(_) => hung.push(i),
        }
    }
    assert!(
        hung.is_empty(),
        "{} of {calls} calls never ended within {BOUND:?} (calls {hung:?}; {} response heads \
         in); the others: {ended:?}",
        hung.len(),
        *heads.borrow()
    );
    drop(client);
    conn.abort();
    ended
}

async fn one_call(
    client: h2::client::SendRequest<Bytes>,
    i: usize,
    when: Body,
    heads: watch::Sender<usize>,
    calls: usize,
    grpc_timeout: Option<&'static str>,
) -> Ended {
    let mut client = match client.ready().await {
        Ok(c) => c,
        Err(e) => return Ended::Failed(format!("ready: {e}")),
    };
    let mut req = Request::post("http://grpc.test:50051/bench.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = grpc_timeout {
        req = req.header("grpc-timeout", t);
    }
    let req = req.body(()).expect("request");
    let (resp, mut send) = match client.send_request(req, false) {
        Ok(sent) => sent,
        Err(e) => return Ended::Failed(format!("send: {e}")),
    };
    let mut msg = vec![0, 0, 0, 0, 64];
    msg.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 64));
    let mut all_heads = heads.subscribe();
    let body = async move {
        if matches!(when, Body::AfterAllHeads) {
            let _ = all_heads.wait_for(|n| *n >= calls).await;
        }
        send.reserve_capacity(msg.len());
        let _ = send.send_data(Bytes::from(msg), true);
        send
    };
    let resp = async move {
        let resp = resp.await;
        heads.send_modify(|n| *n += 1);
        resp
    };
    let (resp, _send) = tokio::join!(resp, body);
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Ended::Failed(format!("response: {e}")),
    };
    let status = resp.status();
    let head_grpc = grpc_status(resp.headers());
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(e) => return Ended::Failed(format!("body: {e}")),
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => Ended::Answered(status, grpc_status(&t).or(head_grpc)),
        Ok(None) => Ended::Answered(status, head_grpc),
        Err(e) => Ended::Failed(format!("trailers: {e}")),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<String> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// HTTP 200 with `grpc-status` `code` (the proxy's gRPC-shaped errors are 200 too).
fn answered_grpc(e: &Ended, code: &str) -> bool {
    matches!(e, Ended::Answered(StatusCode::OK, Some(g)) if g == code)
}

fn answered_ok(e: &Ended) -> bool {
    answered_grpc(e, "0")
}

/// A proxy whose cluster `grpc` (h2c upstream, `connect_timeout`) is every call's route.
async fn proxy_for(up: SocketAddr, connect_timeout: &str) -> Proxy {
    proxy_with(up, connect_timeout, "", "").await
}

/// [`proxy_for`] with more cluster lines (each `\n    key: value`) and route keys
/// (`, key: value`).
async fn proxy_with(up: SocketAddr, connect_timeout: &str, cluster: &str, route: &str) -> Proxy {
    let yaml = format!(
        r#"
clusters:
  - name: grpc
    endpoints: ["{up}"]
    protocol: http2
    connect_timeout: {connect_timeout}
    outlier_detection: {{consecutive_errors: 0}}{cluster}
outbound:
  listeners:
    - port: 50051
      virtual_hosts:
        - name: grpc
          domains: ["*"]
          routes:
            - route: {{cluster: grpc{route}}}
"#
    );
    Proxy::start(&yaml, "127.0.0.1:50051".parse().expect("addr")).await
}

/// The upstream h2 streams the proxy counts open to cluster `grpc` (`/clusters`).
async fn upstream_streams(proxy: &Proxy) -> u64 {
    let clusters = proxy.admin_json("/clusters?format=json").await;
    clusters
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == "grpc")
        .and_then(|c| c["rq_active_http2"].as_u64())
        .expect("rq_active_http2 of cluster grpc")
}

/// Every request, client connection and upstream h2 stream the proxy counted as open is closed
/// again (bounded waits). The first two drop at a response's head and its client's close; only
/// the upstream count sees a stream kept open past both (`/clusters`' `rq_active_http2`).
async fn assert_gauges_back_to_zero(proxy: &Proxy) {
    let mut streams = 0;
    for _ in 0..100 {
        streams = upstream_streams(proxy).await;
        if streams == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        streams, 0,
        "{streams} upstream h2 streams still counted open after 5 s"
    );
    proxy.assert_no_open_connections().await;
    let mut last = 0.0;
    for _ in 0..100 {
        last = proxy
            .prometheus()
            .await
            .lines()
            .filter(|l| l.starts_with("interceptor_proxy_active_requests{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if last == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{last} requests still counted as active after 5 s");
}

// === tests ===

/// The upstream allows 100 streams, then — with 8 calls in flight — lowers the limit to 1. The
/// calls over the new limit wait in h2's queue of streams not yet opened (nothing times that
/// out): each must still be answered.
#[tokio::test]
async fn a_stream_limit_lowered_mid_flight_leaves_no_call_hanging() {
    let how = Behaviour {
        max_streams: Some(100),
        lower_to: Some((8, 1)),
        delay: Duration::from_millis(100),
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, CALLS, Body::WithHead).await;
    assert!(ended.iter().all(answered_ok), "{ended:?}");
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// The upstream allows 100 streams, then lowers its limit to 1 at the first call (h2 reports 1
/// before it has applied a peer's first SETTINGS too, which must not hide a real 1). Calls
/// made while that stream is open go to a new connection, as past any other limit, instead of
/// queueing unopened behind it in h2.
#[tokio::test]
async fn a_stream_limit_lowered_to_one_sends_new_calls_to_a_new_connection() {
    let how = Behaviour {
        max_streams: Some(100),
        lower_to: Some((1, 1)),
        delay: Duration::from_millis(500),
        ..Behaviour::default()
    };
    calls_past_a_limit_of_one_get_a_new_connection(
        how,
        "calls past the upstream's lowered limit of 1 shared its one connection",
    )
    .await;
}

/// One call, and once the proxy has acknowledged the upstream's lowered limit of 1 (while that
/// call's stream is open), two more: all answered, the two on a connection of their own.
async fn calls_past_a_limit_of_one_get_a_new_connection(how: Behaviour, shared: &str) {
    let (up, accepted, task, mut lowered) = raw_upstream_telling(how).await;
    let proxy = proxy_for(up, "10s").await;
    let first = tokio::spawn(calls_on_one_connection(proxy.outbound, 1, Body::WithHead));
    // The first call's stream is open upstream, and the proxy has acknowledged (so applied)
    // the lower limit.
    tokio::time::timeout(BOUND, lowered.wait_for(|n| *n >= 1))
        .await
        .expect("the proxy acknowledged the lowered limit")
        .expect("upstream");
    let later = calls_on_one_connection(proxy.outbound, 2, Body::WithHead).await;
    let first = first.await.expect("first call");
    assert!(
        first.iter().chain(&later).all(answered_ok),
        "{first:?} {later:?}"
    );
    assert!(accepted.load(Ordering::SeqCst) >= 2, "{shared}");
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// The upstream's first SETTINGS allow 100 streams and a second one, in the same write, lowers
/// the limit to 1: h2 applies both in one poll of the connection, so it never reports the 100.
/// The pool must still take the 1 rather than the first SETTINGS' 100 (which it reads off the
/// socket as the connection opens), and send calls made while the first call's stream is open
/// to a new connection.
#[tokio::test]
async fn a_stream_limit_lowered_to_one_right_after_the_first_settings_is_heard() {
    let how = Behaviour {
        max_streams: Some(100),
        lower_at_once: Some(1),
        delay: Duration::from_millis(500),
        ..Behaviour::default()
    };
    calls_past_a_limit_of_one_get_a_new_connection(
        how,
        "calls past the upstream's limit of 1 (lowered right after its first SETTINGS) shared \
         its one connection",
    )
    .await;
}

/// The upstream allows 4 streams and answers each call whole at its HEADERS, before the
/// request body arrives; the client sends bodies only once every call has its answer. An
/// answer's end does not end the stream for h2 (the request body is still to go): a pool
/// counting streams only until their answers end puts the 5th call on the same connection,
/// where h2 holds it back, unopened, until a body goes — which here never happens. Within the
/// peer's limit the 5th call needs a connection of its own.
#[tokio::test]
async fn answers_before_request_bodies_leave_no_call_hanging() {
    let how = Behaviour {
        max_streams: Some(4),
        answer_early: true,
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, CALLS, Body::AfterAllHeads).await;
    assert!(ended.iter().all(answered_ok), "{ended:?}");
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// The upstream allows 4 streams of a 16-byte window each, answers each call whole at its
/// HEADERS and never gives window back: each 69-byte request body can send 16 bytes, never the
/// rest. h2 counts such a stream open while it holds unsent data, so the pool must too (a body
/// queued whole in h2 let the pool's count end with the answers, and a 5th call went to the
/// same connection, where h2 held it unopened for good). With the answers ended, the stuck
/// bodies are given up (CANCEL) after the pool's idle timeout, so no stream stays counted and
/// the connections can close as idle.
#[tokio::test]
async fn bodies_stuck_without_window_after_their_answers_keep_their_streams_counted() {
    let how = Behaviour {
        max_streams: Some(4),
        answer_early: true,
        stream_window: Some(16),
        keep_window: true,
        ..Behaviour::default()
    };
    let (up, accepted, task) = raw_upstream(how).await;
    // Long enough that the stuck bodies are still counted when the 5th call comes on a slow
    // machine, short enough for the reset to come within assert_gauges_back_to_zero's wait.
    let proxy = proxy_with(up, "10s", "\n    idle_timeout: 3s", "").await;
    let first = calls_on_one_connection(proxy.outbound, 4, Body::WithHead).await;
    assert!(first.iter().all(answered_ok), "{first:?}");
    assert_eq!(
        upstream_streams(&proxy).await,
        4,
        "the 4 answered calls whose bodies h2 still holds stay counted"
    );
    let fifth = calls_on_one_connection(proxy.outbound, 1, Body::WithHead).await;
    assert!(fifth.iter().all(answered_ok), "{fifth:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the 5th call's own connection"
    );
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// The upstream gives a 16-byte stream window and never gives any back: the 69-byte request
/// bodies can never be sent whole. The calls cannot succeed, but a gRPC deadline must still
/// end each one (DEADLINE_EXCEEDED), and nothing stays counted.
#[tokio::test]
async fn a_window_never_given_back_ends_at_the_deadline() {
    let how = Behaviour {
        stream_window: Some(16),
        keep_window: true,
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = deadline_calls(proxy.outbound).await;
    for e in &ended {
        assert!(answered_grpc(e, "4"), "{ended:?}");
    }
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// 16 calls with `grpc-timeout: 500m` on one connection.
async fn deadline_calls(proxy: SocketAddr) -> Vec<Ended> {
    calls_with(proxy, CALLS, Body::WithHead, Some("500m")).await
}

/// An upstream that accepts and says nothing (no SETTINGS): a burst of 16 calls on a cold
/// pool must all get UNAVAILABLE within the connect timeout, not one connect timeout each
/// in turn. No retries (the default policy would reopen to the one endpoint twice more, one
/// connect timeout each).
#[tokio::test]
async fn a_mute_upstream_fails_a_burst_within_one_connect_timeout() {
    let how = Behaviour {
        mute: true,
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_with(up, "1s", "", ", retry_policy: {num_retries: 0}").await;
    let started = tokio::time::Instant::now();
    let ended = calls_on_one_connection(proxy.outbound, CALLS, Body::WithHead).await;
    let took = started.elapsed();
    for e in &ended {
        assert!(answered_grpc(e, "14"), "{ended:?}");
    }
    assert!(
        took < Duration::from_millis(2500),
        "16 calls to a mute upstream took {took:?} with a 1 s connect timeout: they waited \
         for each other's connect timeouts"
    );
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// An upstream that sends its SETTINGS and then nothing: calls wait as long as the client lets
/// them (no route timeout, as Istio), and a gRPC deadline ends each one.
#[tokio::test]
async fn an_upstream_silent_after_its_settings_ends_at_the_deadline() {
    let how = Behaviour {
        settings_then_silence: true,
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = deadline_calls(proxy.outbound).await;
    for e in &ended {
        assert!(answered_grpc(e, "4"), "{ended:?}");
    }
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// With 16 calls in flight the upstream sends a graceful GOAWAY naming the first 8 as the
/// last it processes, answers those, never the rest, and keeps the connection open. The rest
/// were never processed: each gets an answer (the default retry policy's success on a new
/// connection, or UNAVAILABLE) — none waits on the old connection.
#[tokio::test]
async fn a_goaway_below_streams_in_flight_leaves_no_call_hanging() {
    let how = Behaviour {
        goaway_after: Some(CALLS),
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    let (up, _accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, CALLS, Body::WithHead).await;
    let ok = ended.iter().filter(|e| answered_ok(e)).count();
    assert!(ok >= CALLS / 2, "{ended:?}");
    for e in &ended {
        assert!(answered_ok(e) || answered_grpc(e, "14"), "{ended:?}");
    }
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// With 16 calls in flight the upstream closes the connection with GOAWAY(ENHANCE_YOUR_CALM),
/// answering none: each call ends (UNAVAILABLE, or a retry's answer from a new connection),
/// and the next call is answered on a new connection.
#[tokio::test]
async fn an_enhance_your_calm_goaway_ends_every_call() {
    let how = Behaviour {
        calm_after: Some(CALLS),
        ..Behaviour::default()
    };
    let (up, accepted, task) = raw_upstream(how).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, CALLS, Body::WithHead).await;
    for e in &ended {
        assert!(answered_ok(e) || answered_grpc(e, "14"), "{ended:?}");
    }
    let again = calls_on_one_connection(proxy.outbound, 1, Body::WithHead).await;
    assert!(again.iter().all(answered_ok), "{again:?}");
    assert!(accepted.load(Ordering::SeqCst) >= 2, "no new connection");
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

// === GOAWAY: what was processed is not sent again ===

/// What a counting upstream's first connection does once `after` requests are whole on it.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// GOAWAY(last stream id = the highest so far, ENHANCE_YOUR_CALM), then close, answering
    /// none: every request on it was processed (counted), none answered.
    CalmAndClose,
    /// GOAWAY(last stream id = that of the `processed`-th request, NO_ERROR): the requests up
    /// to it are processed and answered, the later ones refused (never processed nor
    /// answered). The connection stays open.
    Refuse { processed: usize },
}

/// The requests an upstream processed: (connection number from 0, the message's letter —
/// each call's message is its own letter repeated).
type Processed = Arc<std::sync::Mutex<Vec<(usize, u8)>>>;

/// An h2c upstream whose first connection ends as `ending` says once `after` requests are
/// whole on it; later connections answer every request. Every request processed (and only
/// those) is recorded.
async fn counting_upstream(
    after: usize,
    ending: Ending,
) -> (SocketAddr, Processed, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let processed = Processed::default();
    let record = processed.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let first = (n == 0).then_some((after, ending));
            held.push(tokio::spawn(serve_counting(
                stream,
                n,
                first,
                record.clone(),
            )));
            n += 1;
        }
    });
    (addr, processed, task)
}

async fn serve_counting(
    stream: TcpStream,
    conn: usize,
    ending: Option<(usize, Ending)>,
    processed: Processed,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut preface = [0u8; 24];
    if rd.read_exact(&mut preface).await.is_err() || wr.write_all(&settings(&[])).await.is_err() {
        return;
    }
    let process = |letter: u8| processed.lock().expect("lock").push((conn, letter));
    // Each stream's letter (the first byte of its message), then the requests whole so far.
    let mut letters: HashMap<u32, u8> = HashMap::new();
    let mut whole: Vec<(u32, u8)> = Vec::new();
    let mut last_answered: Option<u32> = None;
    while let Some((kind, flags, sid, payload)) = read_frame(&mut rd).await {
        let mut out = Vec::new();
        match kind {
            SETTINGS if flags & ACK == 0 => out = frame(SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => out = frame(PING, ACK, 0, &payload),
            DATA => {
                if let Some(&letter) = payload.get(5) {
                    letters.entry(sid).or_insert(letter);
                }
                if !payload.is_empty() {
                    out.extend(window_back(sid, payload.len()));
                }
                if flags & END_STREAM != 0 {
                    let letter = letters.get(&sid).copied().unwrap_or(b'?');
                    match ending {
                        None => {
                            process(letter);
                            out.extend(grpc_answer(sid));
                        }
                        Some(_) if last_answered.is_some() => {}
                        Some((_, Ending::CalmAndClose)) => {
                            process(letter);
                            whole.push((sid, letter));
                        }
                        Some((_, Ending::Refuse { .. })) => whole.push((sid, letter)),
                    }
                }
            }
            _ => {}
        }
        if let Some((after, how)) = ending
            && last_answered.is_none()
            && whole.len() == after
        {
            whole.sort_unstable();
            match how {
                Ending::CalmAndClose => {
                    let highest = whole.last().map_or(0, |w| w.0);
                    out.extend(goaway(highest, ENHANCE_YOUR_CALM));
                    let _ = wr.write_all(&out).await;
                    let _ = wr.shutdown().await;
                    // Lets the GOAWAY and FIN arrive before anything unread resets the socket.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
                Ending::Refuse { processed: first } => {
                    let last = whole[first - 1].0;
                    last_answered = Some(last);
                    out.extend(goaway(last, NO_ERROR));
                    for &(sid, letter) in whole.iter().filter(|w| w.0 <= last) {
                        process(letter);
                        out.extend(grpc_answer(sid));
                    }
                }
            }
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// How many times the upstream processed each call's request, by call.
fn times_processed(processed: &Processed, calls: usize) -> Vec<usize> {
    let all = processed.lock().expect("lock").clone();
    (0..calls)
        .map(|i| all.iter().filter(|p| p.1 == b'a' + i as u8).count())
        .collect()
}

/// Two calls on one upstream connection; the upstream processes both, then sends
/// GOAWAY(last stream id = the higher of the two, ENHANCE_YOUR_CALM) and closes without
/// answering. Neither stream was refused (both are at or below the last stream id): under the
/// default retry policy (refused-stream, no reset) neither may be sent again, and each client
/// gets UNAVAILABLE.
#[tokio::test]
async fn streams_a_calm_goaway_names_as_processed_are_not_sent_again() {
    let (up, processed, task) = counting_upstream(2, Ending::CalmAndClose).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, 2, Body::WithHead).await;
    // Any retry would have had time to reach the upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        times_processed(&processed, 2),
        [1, 1],
        "each request must reach the upstream exactly once: {:?}; calls: {ended:?}",
        processed.lock().expect("lock")
    );
    for e in &ended {
        assert!(answered_grpc(e, "14"), "{ended:?}");
    }
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// The same upstream, with a route that retries on `reset` (as Envoy's): the two calls, whose
/// requests may have been processed and were lost with the connection, are sent again on a
/// new connection, and answered.
#[tokio::test]
async fn streams_a_calm_goaway_names_as_processed_are_retried_on_reset() {
    let (up, processed, task) = counting_upstream(2, Ending::CalmAndClose).await;
    let proxy = proxy_with(
        up,
        "10s",
        "",
        ", retry_policy: {retry_on: reset, num_retries: 1, base_interval: 1ms, max_interval: 1ms}",
    )
    .await;
    let ended = calls_on_one_connection(proxy.outbound, 2, Body::WithHead).await;
    assert!(ended.iter().all(answered_ok), "{ended:?}");
    assert_eq!(
        times_processed(&processed, 2),
        [2, 2],
        "{:?}",
        processed.lock().expect("lock")
    );
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}

/// Four calls on one upstream connection; the upstream sends GOAWAY(NO_ERROR) naming the
/// second as the last it processes, answers the first two and never the others. The two
/// refused streams were not processed: the default retry policy (refused-stream) sends them
/// on a new connection, where they are answered. Every call succeeds and every request is
/// processed exactly once.
#[tokio::test]
async fn streams_a_goaway_refuses_are_retried_on_a_new_connection() {
    let (up, processed, task) = counting_upstream(4, Ending::Refuse { processed: 2 }).await;
    let proxy = proxy_for(up, "10s").await;
    let ended = calls_on_one_connection(proxy.outbound, 4, Body::WithHead).await;
    assert!(ended.iter().all(answered_ok), "{ended:?}");
    let all = processed.lock().expect("lock").clone();
    assert_eq!(times_processed(&processed, 4), [1, 1, 1, 1], "{all:?}");
    assert_eq!(
        all.iter().filter(|p| p.0 == 0).count(),
        2,
        "the first connection processes the two streams at or below the GOAWAY's last id: {all:?}"
    );
    assert_gauges_back_to_zero(&proxy).await;
    task.abort();
}
