//! The README's main command runs end to end and reports every request through both sidecars.

use std::process::Command;

#[test]
fn demo_runs_and_every_request_crosses_both_sidecars() {
    crate::require_root();
    let out = Command::new(crate::lab_binary())
        .args(["demo", "--requests", "3", "--json"])
        .output()
        .expect("interceptor-lab demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find("\n{").expect("JSON summary") + 1;
    let json_end = stdout.rfind('}').expect("JSON end") + 1;
    let summary: serde_json::Value =
        serde_json::from_str(&stdout[json_start..json_end]).expect("summary");
    assert_eq!(summary["ok"], 3);
    assert_eq!(summary["counters"]["connect_redirected"], 3);
    assert!(summary["counters"]["msg_redirected"].as_u64().expect("n") > 0);
    assert_eq!(summary["client_sidecar_outbound_connections"], 3.0);
    // The client sidecar pools its upstream connection (HTTP keep-alive), so the three
    // requests reach the server pod over 1 to 3 connections; each request crosses both sidecars.
    // sk_lookup counts per lookup (a retransmitted SYN counts again), the sidecar per
    // connection: every connection the server sidecar accepted was steered, none refused.
    let server_in = summary["server_sidecar_inbound_connections"]
        .as_f64()
        .expect("n");
    assert!((1.0..=3.0).contains(&server_in), "{server_in}");
    let inbound = summary["counters"]["inbound_assigned"].as_u64().expect("n");
    assert!(inbound as f64 >= server_in, "{inbound} < {server_in}");
    assert_eq!(summary["counters"]["inbound_no_listener"], 0);
    assert_eq!(summary["counters"]["inbound_assign_failed"], 0);
    assert_eq!(summary["client_sidecar_outbound_requests"], 3.0);
    assert_eq!(summary["server_sidecar_inbound_requests"], 3.0);
}
