//! The L7 sidecar through the real interception: the client pod's app connects to a pod address,
//! connect4 steers it to its sidecar, the sidecar reads SO_ORIGINAL_DST (from the BPF map),
//! routes by `Host` per its config, and the server pod's sidecar (sk_lookup → 15006) hands the
//! request to the app from 127.0.0.6.

use std::{net::SocketAddr, time::Duration};

use interceptor_lab::testapp::{HttpResponse, http_get_host};

use crate::{Harness, ip4};

fn get(pod: &interceptor_lab::lab::LabPod, addr: SocketAddr, host: &str) -> HttpResponse {
    pod.run(|| http_get_host(addr, host, "/", Duration::from_secs(10)))
        .expect("netns")
        .unwrap_or_else(|e| panic!("GET http://{host}/ via {addr}: {e}"))
}

#[test]
fn http_is_routed_by_host_through_the_bpf_interception() {
    let mut h = Harness::new("l7route");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    let reviews = SocketAddr::new(ip4(&server), 9080);
    let details = SocketAddr::new(ip4(&server), 9081);
    h.http_app(&server, reviews, "reviews");
    h.http_app(&server, details, "details");
    let config = format!(
        r#"
clusters:
  - {{name: reviews, endpoints: ["{reviews}"]}}
  - {{name: details, endpoints: ["{details}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          services: [reviews.default.svc.cluster.local]
          routes: [{{route: {{cluster: reviews}}}}]
        - name: details
          services: [details.default.svc.cluster.local]
          routes: [{{route: {{cluster: details}}}}]
"#
    );
    h.sidecar_with_config(&client, &config);
    h.sidecar(&server);
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();

    // The app always dials reviews' address (as with a ClusterIP); Host decides where it goes.
    for (host, want) in [
        ("reviews", "hello from reviews"),
        ("details", "hello from details"),
        (
            "details.default.svc.cluster.local:9080",
            "hello from details",
        ),
        ("reviews.default", "hello from reviews"),
        // No virtual host: passthrough to the original destination.
        ("somewhere.else", "hello from reviews"),
    ] {
        let resp = get(&client, reviews, host);
        let body = String::from_utf8_lossy(&resp.body);
        assert_eq!(resp.status, 200, "{host}: {body}");
        assert!(body.starts_with(want), "{host}: {body}");
        // The server sidecar delivered it from Istio's inbound passthrough address.
        assert!(body.contains("you are 127.0.0.6:"), "{host}: {body}");
    }

    let after = h.counters();
    // Five app connections, each redirected to the client sidecar and answered by the map.
    assert_eq!(after.since(&before, "connect_redirected"), 5);
    assert_eq!(after.since(&before, "orig_dst_answered"), 5);
    let out = |cluster: &str| {
        h.proxy_metric(
            &client,
            &format!(
                "interceptor_proxy_requests_total{{direction=\"Outbound\",cluster=\"{cluster}\",code=\"200\"}}"
            ),
        )
    };
    assert_eq!(out("reviews"), 2.0);
    assert_eq!(out("details"), 2.0);
    assert_eq!(out("PassthroughCluster"), 1.0);
    let inbound_9081 = h.proxy_metric(
        &server,
        "interceptor_proxy_requests_total{direction=\"Inbound\",cluster=\"inbound|9081||\",code=\"200\"}",
    );
    assert_eq!(inbound_9081, 2.0);
}
