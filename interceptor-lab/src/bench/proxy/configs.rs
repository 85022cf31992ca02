//! The two sidecars configured alike: routing by Host (HTTP/1.1 app, WebSocket app) and every
//! other request, gRPC included, to the gRPC app over HTTP/2; `x-request-id`; retries on the
//! routes (Istio's default policy here, `retry-on` in haproxy); pooled upstream connections.

use std::net::SocketAddr;

/// Where the benchmark's apps listen.
#[derive(Clone, Copy, Debug)]
pub(super) struct Apps {
    pub(super) http: SocketAddr,
    pub(super) grpc: SocketAddr,
    pub(super) ws: SocketAddr,
}

/// The original destination every connection to the proxy gets (`--fixed-dst`).
pub(super) const FIXED_DST: &str = "127.0.0.1:9080";

/// The Host the HTTP/1.1 rows send; the WebSocket row sends [`WS_HOST`].
pub(super) const HTTP_HOST: &str = "reviews";
pub(super) const WS_HOST: &str = "ws";

pub(super) fn interceptor(apps: Apps) -> String {
    format!(
        r#"# Written by `cargo xtask bench proxy`.
clusters:
  - name: outbound|9080||reviews.default.svc.cluster.local
    endpoints: ["{http}"]
  - name: outbound|8080||ws.default.svc.cluster.local
    endpoints: ["{ws}"]
  - name: outbound|50051||grpc.default.svc.cluster.local
    endpoints: ["{grpc}"]
    protocol: http2
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          services: [reviews.default.svc.cluster.local]
          routes:
            - route: {{cluster: "outbound|9080||reviews.default.svc.cluster.local"}}
        - name: ws
          domains: [{WS_HOST}]
          routes:
            - route: {{cluster: "outbound|8080||ws.default.svc.cluster.local"}}
        - name: grpc
          domains: ["*"]
          routes:
            - route: {{cluster: "outbound|50051||grpc.default.svc.cluster.local"}}
"#,
        http = apps.http,
        ws = apps.ws,
        grpc = apps.grpc,
    )
}

/// haproxy listens for HTTP/1.1 (and WebSocket) on `h1` and for h2c on `h2`: one clear-text
/// `bind` does not serve both, unlike the proxy's listener, which detects the protocol.
pub(super) fn haproxy(h1: SocketAddr, h2: SocketAddr, apps: Apps) -> String {
    format!(
        r#"# Written by `cargo xtask bench proxy`: haproxy as the same sidecar.
global
    maxconn 9000
    log stderr format raw local0 emerg

defaults
    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    timeout tunnel 60s
    option http-keep-alive
    http-reuse always

frontend sidecar_outbound_h1
    bind {h1}
    unique-id-format %[uuid()]
    http-request set-header x-request-id %[unique-id] unless {{ req.hdr(x-request-id) -m found }}
    http-request set-header x-envoy-attempt-count 1
    acl reviews hdr(host) -i reviews reviews:9080 reviews.default reviews.default:9080 reviews.default.svc reviews.default.svc:9080 reviews.default.svc.cluster reviews.default.svc.cluster:9080 reviews.default.svc.cluster.local reviews.default.svc.cluster.local:9080
    acl ws hdr(host) -i {WS_HOST}
    use_backend reviews if reviews
    use_backend ws if ws
    default_backend grpc

frontend sidecar_outbound_h2
    bind {h2} proto h2
    unique-id-format %[uuid()]
    http-request set-header x-request-id %[unique-id] unless {{ req.hdr(x-request-id) -m found }}
    http-request set-header x-envoy-attempt-count 1
    default_backend grpc

backend reviews
    retry-on conn-failure empty-response 503
    retries 2
    option redispatch
    server reviews1 {http}

backend ws
    server ws1 {ws}

backend grpc
    retry-on conn-failure empty-response 503
    retries 2
    server grpc1 {grpc} proto h2
"#,
        http = apps.http,
        ws = apps.ws,
        grpc = apps.grpc,
    )
}
