//! What an idle h2 connection costs a server, by allocation: a counting global allocator (over
//! mimalloc, as the lab and the product use) counts the bytes live on the server's threads
//! only, and the net count per allocation size, while N h2c client connections each make one
//! gRPC call and stay open. The clients and the upstream app run on untracked threads.
//!
//!     cargo run --release -p interceptor-lab --example h2_conn_memory -- hyper|h2|proxy [N] [BYTES]
//!
//! BYTES is the gRPC message each connection sends (and gets back) before going idle: 64 as the
//! benchmark does by default, larger to see what a connection keeps after a burst.
//!
//! `hyper`: the benchmark's gRPC app (tonic on hyper's h2 server); `h2`: the same echo on the
//! h2 crate alone; `proxy`: the sidecar proxy in front of the `hyper` app.

#![allow(unsafe_code, reason = "a global allocator")]

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    net::{SocketAddr, TcpListener as StdListener},
    sync::atomic::{AtomicI64, Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Result, bail};
use bytes::Bytes;
use interceptor_lab::{bench::proxy::idle::idle_connection, fixed_dst, testapp};
use tokio::net::TcpStream;

/// Sizes counted one by one up to this; larger ones share the last slot.
const MAX_SIZE: usize = 1 << 17;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static BY_SIZE: [AtomicI64; MAX_SIZE + 1] = [const { AtomicI64::new(0) }; MAX_SIZE + 1];

thread_local! {
    static UNTRACKED: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    !UNTRACKED.try_with(Cell::get).unwrap_or(true)
}

fn count(size: usize, sign: i64) {
    LIVE.fetch_add(sign * size as i64, Relaxed);
    BY_SIZE[size.min(MAX_SIZE)].fetch_add(sign, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            count(layout.size(), 1);
        }
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            count(layout.size(), 1);
        }
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracked() {
            count(layout.size(), -1);
        }
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if tracked() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn free_addr() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn untracked_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| UNTRACKED.with(|u| u.set(true)))
        .build()?)
}

/// One gRPC message of `len` bytes (the benchmark sends 64).
fn grpc_message(len: u32) -> Bytes {
    let mut msg = vec![0u8];
    msg.extend_from_slice(&len.to_be_bytes());
    msg.resize(5 + len as usize, b'x');
    Bytes::from(msg)
}

fn snapshot() -> (i64, Vec<i64>) {
    (
        LIVE.load(Relaxed),
        BY_SIZE.iter().map(|c| c.load(Relaxed)).collect(),
    )
}

fn main() -> Result<()> {
    UNTRACKED.with(|u| u.set(true));
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_else(|| "hyper".into());
    let n: usize = argv.next().map_or(Ok(1000), |s| s.parse())?;
    let message_len: u32 = argv.next().map_or(Ok(64), |s| s.parse())?;
    let clients = untracked_runtime()?;
    let app = free_addr()?;
    let target = match mode.as_str() {
        "hyper" => {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(testapp::grpc_echo::grpc_echo_server(app))
            });
            app
        }
        "h2" => {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(testapp::h2_echo::h2_echo_server(app, false))
            });
            app
        }
        "proxy" => {
            clients.spawn(testapp::grpc_echo::grpc_echo_server(app));
            let dir = std::env::temp_dir().join(format!("h2-conn-memory-{}", std::process::id()));
            fixed_dst::start_h2c_proxy(&dir, "grpc", app)?
        }
        other => bail!("unknown mode {other}: hyper, h2 or proxy"),
    };
    clients.block_on(async move {
        for _ in 0..100 {
            if TcpStream::connect(target).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let message = grpc_message(message_len);
        let mut warm = Vec::new();
        for _ in 0..16 {
            warm.push(idle_connection(target, &message).await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (live0, sizes0) = snapshot();
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(idle_connection(target, &message).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (live1, sizes1) = snapshot();
        let per = (live1 - live0) as f64 / n as f64;
        println!(
            "{mode}: {per:.0} bytes live per idle h2 connection (n = {n}, {message_len} B message)"
        );
        println!("  size (bytes) x allocations per connection, net:");
        let mut rows: Vec<(usize, f64)> = sizes0
            .iter()
            .zip(&sizes1)
            .enumerate()
            .map(|(size, (a, b))| (size, (b - a) as f64 / n as f64))
            .filter(|(_, k)| k.abs() >= 0.05)
            .collect();
        rows.sort_by(|a, b| (b.0 as f64 * b.1).total_cmp(&(a.0 as f64 * a.1)));
        for (size, k) in rows {
            let label = if size == MAX_SIZE {
                format!(">={size}")
            } else {
                size.to_string()
            };
            println!("  {label:>8} x {k:.2} = {:.0}", size as f64 * k);
        }
        drop(held);
        drop(warm);
        anyhow::Ok(())
    })?;
    std::process::exit(0)
}
