//! Heap allocations per gRPC unary call through the proxy: a counting global allocator (over
//! mimalloc, as the lab and the product use) counts allocations made on the proxy's threads
//! only, while one h2c client connection makes N calls with 16 streams at once (the
//! benchmark's one-connection gRPC row). The client and the upstream app run on untracked
//! threads.
//!
//!     cargo run --release -p interceptor-lab --example proxy_call_allocs -- [N] [SAMPLE]
//!
//! With SAMPLE > 0, every SAMPLE-th counted allocation also records its call stack, and the
//! most frequent stacks are printed (a debug build names more frames: fat LTO inlines most).

#![allow(unsafe_code, reason = "a global allocator")]

use std::{
    alloc::{GlobalAlloc, Layout},
    backtrace::Backtrace,
    cell::Cell,
    collections::HashMap,
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use interceptor_lab::{fixed_dst, testapp};
use tokio::net::TcpStream;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static SAMPLING: AtomicBool = AtomicBool::new(false);
static EVERY: AtomicU64 = AtomicU64::new(0);
static STACKS: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());

thread_local! {
    static UNTRACKED: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    !UNTRACKED.try_with(Cell::get).unwrap_or(true)
}

fn counted(size: usize) {
    let n = ALLOCS.fetch_add(1, Relaxed);
    BYTES.fetch_add(size as u64, Relaxed);
    let every = EVERY.load(Relaxed);
    if every > 0 && SAMPLING.load(Relaxed) && n.is_multiple_of(every) {
        // Allocations made while capturing are not counted (this thread is untracked then).
        UNTRACKED.with(|u| u.set(true));
        let bt = Backtrace::force_capture();
        if let Ok(mut s) = STACKS.lock() {
            s.push(bt);
        }
        UNTRACKED.with(|u| u.set(false));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            counted(layout.size());
        }
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            counted(layout.size());
        }
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if tracked() {
            REALLOCS.fetch_add(1, Relaxed);
        }
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn free_addr() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The benchmark's request: a 64-byte message behind gRPC's 5-byte prefix.
fn grpc_message() -> Bytes {
    let mut msg = vec![0u8];
    msg.extend_from_slice(&64u32.to_be_bytes());
    msg.resize(5 + 64, b'x');
    Bytes::from(msg)
}

/// `calls` gRPC calls on one h2c connection, `streams` at once.
async fn calls(target: SocketAddr, calls: usize, streams: usize, message: &Bytes) -> Result<()> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut workers = Vec::new();
    for w in 0..streams {
        let mut sender = sender.clone();
        let message = message.clone();
        let n = calls / streams + usize::from(w < calls % streams);
        workers.push(tokio::spawn(async move {
            for _ in 0..n {
                let req = Request::post("http://grpc/bench.Echo/Unary")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    // As h2load sends it with `-d` (hyper's client sends none).
                    .header("content-length", message.len())
                    .body(Full::new(message.clone()))?;
                let resp = sender.send_request(req).await?;
                if !resp.status().is_success() {
                    bail!("answered {}", resp.status());
                }
                let collected = resp.into_body().collect().await?;
                let ok = collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .is_some_and(|s| s == "0");
                if !ok {
                    bail!("no grpc-status 0 in the trailers");
                }
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    task.abort();
    Ok(())
}

/// The frames of a captured stack, innermost first, from the allocation's caller on (the
/// allocator's own frames and the capture's are left out).
fn frames(bt: &Backtrace) -> Vec<String> {
    const ALLOCATOR: &[&str] = &[
        "counted",
        "alloc",
        "alloc_zeroed",
        "realloc",
        "alloc_impl",
        "alloc_impl_runtime",
        "__rust_alloc",
        "__rust_alloc_zeroed",
        "__rust_realloc",
        "__rdl_alloc",
        "__rdl_alloc_zeroed",
        "__rdl_realloc",
    ];
    let text = bt.to_string();
    text.lines()
        .filter_map(|l| {
            let (num, name) = l.trim().split_once(": ")?;
            num.parse::<usize>().ok()?;
            // Without the hash suffix.
            Some(match name.rsplit_once("::h") {
                Some((head, hash)) if hash.len() == 16 => head.to_owned(),
                _ => name.to_owned(),
            })
        })
        .skip_while(|n| {
            ALLOCATOR.contains(&n.as_str())
                || n.starts_with("std::backtrace")
                || n.contains("proxy_call_allocs")
                || n.contains("GlobalAlloc")
                || n.starts_with("alloc::alloc")
                || n.starts_with("mimalloc")
        })
        .collect()
}

fn main() -> Result<()> {
    UNTRACKED.with(|u| u.set(true));
    let mut argv = std::env::args().skip(1);
    let n: usize = argv.next().map_or(Ok(20_000), |s| s.parse())?;
    let sample: u64 = argv.next().map_or(Ok(0), |s| s.parse())?;
    let depth: usize = std::env::var("DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(8);
    EVERY.store(sample, Relaxed);
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| UNTRACKED.with(|u| u.set(true)))
        .build()?;
    let app = free_addr()?;
    clients.spawn(testapp::grpc_echo::grpc_echo_server(app));
    let dir = std::env::temp_dir().join(format!("proxy-call-allocs-{}", std::process::id()));
    // The benchmark's config (`bench/proxy/configs.rs`), the gRPC cluster only.
    let target =
        fixed_dst::start_h2c_proxy(&dir, "outbound|50051||grpc.default.svc.cluster.local", app)?;
    clients.block_on(async move {
        for _ in 0..100 {
            if TcpStream::connect(target).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let message = grpc_message();
        // Warm-up: the upstream connection, the metric series, the allocator's pages.
        calls(target, 2000, 16, &message).await.context("warm-up")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (a0, r0, b0) = (
            ALLOCS.load(Relaxed),
            REALLOCS.load(Relaxed),
            BYTES.load(Relaxed),
        );
        SAMPLING.store(true, Relaxed);
        calls(target, n, 16, &message).await?;
        SAMPLING.store(false, Relaxed);
        let (a1, r1, b1) = (
            ALLOCS.load(Relaxed),
            REALLOCS.load(Relaxed),
            BYTES.load(Relaxed),
        );
        // The connection's own setup and teardown are counted too: spread over N calls.
        let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
        println!(
            "proxy: {:.1} allocations, {:.1} reallocations, {:.0} bytes allocated per call \
             (N = {n}, 16 streams on 1 connection)",
            per(a0, a1),
            per(r0, r1),
            per(b0, b1)
        );
        anyhow::Ok(())
    })?;
    if sample > 0 {
        let stacks = std::mem::take(&mut *STACKS.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        let total = stacks.len();
        let mut by: HashMap<String, usize> = HashMap::new();
        for bt in &stacks {
            let f = frames(bt);
            let key = f
                .iter()
                .take(depth)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n      < ");
            *by.entry(key).or_default() += 1;
        }
        let mut rows: Vec<_> = by.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("{total} sampled stacks (1 in {sample}); per call = share x allocations per call");
        for (key, k) in rows.iter().take(60) {
            println!(
                "{:5.1}%  {:.2}/call\n      {key}",
                100.0 * *k as f64 / total as f64,
                *k as f64 * sample as f64 / n as f64
            );
        }
    }
    std::process::exit(0)
}
