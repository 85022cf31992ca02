//! WebSocket echo load with tokio-tungstenite's client: each connection upgrades, then sends a
//! binary message and waits for its echo, again and again, until the message budget or the
//! time limit runs out.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::tungstenite::Message;

use super::{Measured, configs::WS_HOST};
use crate::loadgen::Histogram;

pub(super) struct WsLoad {
    pub(super) target: SocketAddr,
    pub(super) connections: usize,
    pub(super) message_bytes: usize,
    /// Messages, all connections together.
    pub(super) messages: u64,
    pub(super) seconds: f64,
}

#[derive(Default)]
struct Tally {
    histogram: Histogram,
    echoed: u64,
    errors: u64,
}

pub(super) async fn run(load: &WsLoad) -> Result<Measured> {
    let issued = Arc::new(AtomicU64::new(0));
    let mut sockets = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let stream = TcpStream::connect(load.target)
            .await
            .with_context(|| format!("connecting to {}", load.target))?;
        stream.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{WS_HOST}/echo"), stream)
            .await
            .with_context(|| format!("WebSocket upgrade through {}", load.target))?;
        sockets.push(ws);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(load.seconds);
    let workers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let issued = issued.clone();
            let (budget, size) = (load.messages, load.message_bytes);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let payload = bytes::Bytes::from(vec![0x5a; size]);
                while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < budget {
                    let sent = Instant::now();
                    let round_trip = async {
                        ws.send(Message::Binary(payload.clone())).await.ok()?;
                        // Bounded: a reply per message; anything else means the echo broke.
                        match ws.next().await? {
                            Ok(Message::Binary(b)) if b.len() == size => Some(()),
                            _ => None,
                        }
                    };
                    match tokio::time::timeout_at(deadline + Duration::from_secs(5), round_trip)
                        .await
                    {
                        Ok(Some(())) => {
                            tally.histogram.record(sent.elapsed());
                            tally.echoed += 1;
                        }
                        _ => {
                            tally.errors += 1;
                            break;
                        }
                    }
                }
                let _ = ws.close(None).await;
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.context("a WebSocket load task panicked")?;
        total.histogram.merge(&t.histogram);
        total.echoed += t.echoed;
        total.errors += t.errors;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    Ok(Measured {
        per_second: total.echoed as f64 / elapsed,
        latency_us: total.histogram.percentiles(),
        operations: total.echoed,
        errors: total.errors,
        proxy_cpu_us_per_op: None,
    })
}
