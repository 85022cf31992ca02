//! Hundreds of pods on one node (the correctness half of `cargo xtask bench scale`, which has
//! the timings): every pod listed whole and exactly, its rows read back from maps that hold far
//! more than one batch, and exactly the pods whose namespaces go are collected by the agent's
//! pass, which keeps the live ones' namespaces open between passes.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::Value;

use crate::{Harness, wait_until};

const PODS: usize = 300;
const GONE: usize = 100;

/// Bare pod namespaces (a bridge device with one address: what the registry reads), removed on
/// drop.
struct Crowd {
    names: Vec<String>,
}

impl Crowd {
    fn new(prefix: &str, n: usize) -> Self {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}-c{i}")).collect();
        let crowd = Self { names };
        let batch: String = crowd
            .names
            .iter()
            .map(|n| format!("netns add {n}\nlink add e0 netns {n} type bridge\n"))
            .collect();
        ip_batch(&[], &batch);
        for (i, name) in crowd.names.iter().enumerate() {
            ip_batch(
                &["-n", name],
                &format!("link set lo up\naddr add {}/32 dev e0\n", Self::addr(i)),
            );
        }
        crowd
    }

    fn addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 200 + (i / 250) as u8, (i % 250) as u8 + 1)
    }

    fn remove(&mut self, range: std::ops::Range<usize>) {
        let batch: String = self.names[range.clone()]
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        ip_batch(&[], &batch);
        for name in &mut self.names[range] {
            name.clear();
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        let batch: String = self
            .names
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| format!("netns del {n}\n"))
            .collect();
        if !batch.is_empty() {
            // -force: go on past namespaces already gone.
            let _ = interceptor_lab::lab::ip_batch(&["-force"], &batch);
        }
    }
}

fn ip_batch(args: &[&str], batch: &str) {
    interceptor_lab::lab::ip_batch(args, batch).expect("ip -batch");
}

/// Pod name → its addresses, as `status` lists them.
fn listed(status: &Value) -> BTreeMap<String, Vec<String>> {
    status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            let addrs = p["addresses"]
                .as_array()
                .expect("addresses")
                .iter()
                .map(|a| a.as_str().expect("address").to_owned())
                .collect();
            (p["name"].as_str().expect("name").to_owned(), addrs)
        })
        .collect()
}

fn entries(status: &Value, map: &str) -> u64 {
    status["maps"]
        .as_array()
        .expect("maps in status")
        .iter()
        .find(|m| m["name"] == map)
        .and_then(|m| m["entries"].as_u64())
        .unwrap_or_else(|| panic!("no entry count for {map}"))
}

#[test]
fn hundreds_of_pods_are_listed_exactly_and_only_the_gone_ones_collected() {
    let _churn = crate::namespace_churn();
    let mut h = Harness::new("crowd");
    h.start_agent(&[]);
    let mut crowd = Crowd::new(&h.lab.name, PODS);
    for name in &crowd.names {
        let out = h.cli(&["pod", "enable", "--netns", name]);
        assert!(
            out.status.success(),
            "pod enable {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = h.status();
    let pods = listed(&status);
    assert_eq!(pods.len(), PODS, "every pod listed once");
    for (i, name) in crowd.names.iter().enumerate() {
        assert_eq!(
            pods.get(name),
            Some(&vec![Crowd::addr(i).to_string()]),
            "pod {name} listed with its own address only"
        );
    }
    // Each pod has the same rows (Istio's defaults): the maps hold exactly PODS times them.
    let rows = entries(&status, "POD_PORTS") / PODS as u64;
    assert!(rows > 0, "the default spec writes port rows");
    assert_eq!(entries(&status, "POD_PORTS"), rows * PODS as u64);
    assert_eq!(entries(&status, "POD_CONFIG"), PODS as u64);
    assert_eq!(entries(&status, "POD_IPS"), PODS as u64);

    // A third of the pods go away at once (their namespaces deleted, as kubelet does): the
    // agent's pass collects exactly those, with every row they had.
    crowd.remove(0..GONE);
    let mut last = Value::Null;
    wait_until(Duration::from_secs(30), || {
        last = h.status();
        listed(&last).len() == PODS - GONE
    });
    let left = listed(&last);
    assert_eq!(left.len(), PODS - GONE, "the pass collected the gone pods");
    for (i, name) in crowd.names.iter().enumerate().skip(GONE) {
        assert_eq!(
            left.get(name),
            Some(&vec![Crowd::addr(i).to_string()]),
            "live pod {name} kept"
        );
    }
    assert_eq!(entries(&last, "POD_CONFIG"), (PODS - GONE) as u64);
    assert_eq!(entries(&last, "POD_IPS"), (PODS - GONE) as u64);
    assert_eq!(entries(&last, "POD_PORTS"), rows * (PODS - GONE) as u64);

    // The live ones stay through further passes (the held namespaces are found again by stat).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        listed(&h.status()).len(),
        PODS - GONE,
        "no live pod collected later"
    );
}
