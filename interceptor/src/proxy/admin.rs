//! The admin endpoint (127.0.0.1:15000, Envoy's admin port): what the proxy runs and how its
//! upstreams are doing.
//!
//! - `/config_dump`: the effective config (file + defaults + command line) as JSON.
//! - `/clusters`: every cluster and endpoint with health and counters (`?format=json`).
//! - `/stats`: every metric as `name{labels}: value` lines (`?format=prometheus` for the
//!   exposition format).
//! - `/ready`: 200 LIVE while serving, 503 DRAINING during shutdown.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE};
use prometheus_client::{encoding::text::encode, registry::Registry};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{ProxyConfig, cluster::Cluster, snapshot::ConfigSource};
use crate::http_server::{Body, Handler, text};

pub fn handler(
    config: Arc<ProxyConfig>,
    source: ConfigSource,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
) -> Handler {
    Arc::new(move |req| {
        let json_wanted = req.uri().query().is_some_and(|q| q.contains("format=json"));
        match req.uri().path() {
            "/config_dump" => json_reply(&config_dump(&config, &source)),
            "/clusters" if json_wanted => json_reply(&clusters_json(&source)),
            "/clusters" => text(StatusCode::OK, clusters_text(&source)),
            "/stats" => {
                let mut out = String::new();
                if encode(&mut out, &registry).is_err() {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
                }
                if req
                    .uri()
                    .query()
                    .is_some_and(|q| q.contains("format=prometheus"))
                {
                    return text(StatusCode::OK, out);
                }
                text(StatusCode::OK, stats_lines(&out))
            }
            "/ready" if ready.load(Ordering::Relaxed) => text(StatusCode::OK, "LIVE\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "admin: /config_dump /clusters[?format=json] /stats[?format=prometheus] /ready\n",
            ),
        }
    })
}

fn json_reply(value: &Value) -> Response<Body> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    let mut resp = text(StatusCode::OK, body + "\n");
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn config_dump(config: &ProxyConfig, source: &ConfigSource) -> Value {
    let snapshot = source.snapshot();
    let mut listeners: Vec<_> = snapshot.listeners.values().collect();
    listeners.sort_by_key(|l| l.port);
    json!({
        "source": source.info(),
        "proxy": config,
        "config": &*snapshot.config,
        "virtual_hosts": listeners.iter().map(|l| json!({
            "port": l.port,
            "virtual_hosts": l.virtual_hosts.iter().map(|v| json!({
                "name": v.name,
                "domains": v.domains,
                "routes": v.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn all_clusters(source: &ConfigSource) -> Vec<Arc<Cluster>> {
    let snapshot = source.snapshot();
    let mut clusters: Vec<Arc<Cluster>> = snapshot.clusters.by_name.values().cloned().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    clusters.push(snapshot.clusters.outbound_passthrough.clone());
    clusters.push(snapshot.clusters.inbound_passthrough.clone());
    clusters
}

pub fn clusters_json(source: &ConfigSource) -> Value {
    let now = Instant::now();
    Value::Array(
        all_clusters(source)
            .iter()
            .map(|c| {
                let s = &c.stats;
                json!({
                    "name": c.name,
                    "type": c.kind_name(),
                    "protocol": c.protocol,
                    "cx_idle_http1": c.idle_connections(),
                    "cx_open_http2": c.h2_connections(),
                    "rq_active_http2": c.h2_streams(),
                    "stats": {
                        "rq_total": s.rq_total.load(Ordering::Relaxed),
                        "rq_error": s.rq_error.load(Ordering::Relaxed),
                        "rq_retry": s.rq_retry.load(Ordering::Relaxed),
                        "rq_timeout": s.rq_timeout.load(Ordering::Relaxed),
                        "cx_connect_fail": s.cx_connect_fail.load(Ordering::Relaxed),
                        "outlier_ejections": s.ejections.load(Ordering::Relaxed),
                    },
                    "endpoints": c.endpoints().iter().map(|e| json!({
                        "address": e.addr.to_string(),
                        "health": if e.is_ejected(now) { "ejected" } else { "healthy" },
                        "rq_active": e.active(),
                        "rq_total": e.rq_total.load(Ordering::Relaxed),
                        "rq_error": e.rq_error.load(Ordering::Relaxed),
                        "consecutive_failures": e.health.consecutive_failures(),
                        "times_ejected": e.health.times_ejected(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Envoy's `/clusters` text shape: `cluster::endpoint::stat::value`.
fn clusters_text(source: &ConfigSource) -> String {
    let mut out = String::new();
    for c in clusters_json(source).as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or_default();
        for k in ["cx_idle_http1", "cx_open_http2", "rq_active_http2"] {
            let _ = writeln!(out, "{name}::{k}::{}", c[k]);
        }
        if let Some(stats) = c["stats"].as_object() {
            for (k, v) in stats {
                let _ = writeln!(out, "{name}::{k}::{v}");
            }
        }
        for e in c["endpoints"].as_array().into_iter().flatten() {
            let addr = e["address"].as_str().unwrap_or_default();
            for k in [
                "health",
                "rq_active",
                "rq_total",
                "rq_error",
                "consecutive_failures",
                "times_ejected",
            ] {
                let v = &e[k];
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                let _ = writeln!(out, "{name}::{addr}::{k}::{v}");
            }
        }
    }
    out
}

/// Prometheus text → `name{labels}: value`, comments dropped.
fn stats_lines(exposition: &str) -> String {
    let mut out = String::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            let _ = writeln!(out, "{name}: {value}");
        }
    }
    out
}
