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

/// A registry writer reads the pod tables once per lock and then follows its own writes
/// (`bpf/maps/session.rs`), as the agent does when it re-enables every pod after a restart.
/// Enables, updates and disables made in one lock (group A) and one lock each (group B) must
/// leave each pod as enabling a fresh pod with its last spec does (group C), and no row of
/// anything disabled or replaced behind: read back without a session.
#[test]
fn many_writes_in_one_lock_leave_the_maps_as_a_fresh_enable_does() {
    use interceptor::{
        bpf::{Maps, Pins},
        discovery::netns::Netns,
        registry::{
            self, PodRef, PodSource, Registry,
            spec::{PodSpec, parse_cidrs, parse_ports},
        },
    };

    const N: usize = 24;
    let _churn = crate::namespace_churn();
    let mut h = Harness::new("session");
    h.start_agent(&[]);
    let crowd = Crowd::new(&h.lab.name, 3 * N);
    let pins = Pins::new(&h.pin_root);
    let mut maps = Maps::open(&pins).expect("opening the pinned maps");
    let other = PodSpec {
        exclude_inbound_ports: parse_ports("x", "8081,8082").unwrap(),
        exclude_outbound_ports: parse_ports("x", "5432").unwrap(),
        include_outbound_ports: parse_ports("x", "9000").unwrap(),
        exclude_outbound_cidrs: parse_cidrs("x", "198.18.99.0/24,fd00:198:18:99::/64").unwrap(),
        ..PodSpec::default()
    };
    // What pod i goes through: enabled; the odd ones updated to `other`; every third updated
    // back to the defaults; every fifth disabled.
    let steps = |i: usize| {
        let mut s = vec![Some(PodSpec::default())];
        if i % 2 == 1 {
            s.push(Some(other.clone()));
        }
        if i.is_multiple_of(3) {
            s.push(Some(PodSpec::default()));
        }
        if i.is_multiple_of(5) {
            s.push(None);
        }
        s
    };
    let apply = |registry: &mut Registry<'_>, name: &str, step: &Option<PodSpec>| match step {
        Some(spec) => {
            let netns = Netns::by_name(name).expect("pod namespace");
            registry
                .enable(&netns, &PodSource::Netns(name.to_owned()), spec)
                .unwrap_or_else(|e| panic!("enable {name}: {e}"));
        }
        None => {
            registry
                .disable(&PodRef::Netns(name.to_owned()))
                .unwrap_or_else(|e| panic!("disable {name}: {e}"));
        }
    };
    {
        let mut registry = Registry::lock(&pins, &mut maps).expect("lock");
        for round in 0..4 {
            for i in 0..N {
                if let Some(step) = steps(i).get(round) {
                    apply(&mut registry, &crowd.names[i], step);
                }
            }
        }
    }
    for round in 0..4 {
        for i in 0..N {
            if let Some(step) = steps(i).get(round) {
                let mut registry = Registry::lock(&pins, &mut maps).expect("lock");
                apply(&mut registry, &crowd.names[N + i], step);
            }
        }
    }
    for i in 0..N {
        if let Some(Some(last)) = steps(i).last() {
            let mut registry = Registry::lock(&pins, &mut maps).expect("lock");
            apply(&mut registry, &crowd.names[2 * N + i], &Some(last.clone()));
        }
    }
    drop(maps);

    let fresh = Maps::open(&pins).expect("opening the pinned maps");
    let listed = registry::list(&pins, &fresh).expect("listing");
    let by_name: BTreeMap<&str, &registry::PodEntry> =
        listed.iter().map(|e| (e.name.as_str(), e)).collect();
    let kept = (0..N).filter(|i| !i.is_multiple_of(5)).count();
    assert_eq!(listed.len(), 3 * kept, "every enabled pod listed once");
    for i in 0..N {
        let group = |g: usize| by_name.get(crowd.names[g * N + i].as_str());
        if i.is_multiple_of(5) {
            assert!(group(0).is_none() && group(1).is_none(), "pod {i} disabled");
            continue;
        }
        let reference = group(2).unwrap_or_else(|| panic!("pod {i} of group C listed"));
        for g in 0..2 {
            let entry = group(g).unwrap_or_else(|| panic!("pod {i} of group {g} listed"));
            assert_eq!(
                entry.spec, reference.spec,
                "pod {i}, group {g}: spec as a fresh enable"
            );
            assert_eq!(
                entry.addresses,
                vec![std::net::IpAddr::V4(Crowd::addr(g * N + i))],
                "pod {i}, group {g}: its own address only"
            );
        }
        let want = if i % 2 == 1 && !i.is_multiple_of(3) {
            other.exclude_outbound_cidrs.len()
        } else {
            0
        };
        assert_eq!(
            reference.spec.exclude_outbound_cidrs.len(),
            want,
            "pod {i}: its last spec"
        );
    }
    // Nothing of the disabled pods or of replaced specs left: the tables hold exactly the
    // listed pods' rows.
    let rows: Vec<_> = listed
        .iter()
        .map(|e| fresh.pod_rows(e.id, e.netns_cookie))
        .collect();
    let status = h.status();
    let sum =
        |f: fn(&interceptor::bpf::maps::PodRows) -> usize| rows.iter().map(f).sum::<usize>() as u64;
    assert_eq!(entries(&status, "POD_PORTS"), sum(|r| r.ports.len()));
    assert_eq!(entries(&status, "CIDR_EXCLUDE"), sum(|r| r.excluded.len()));
    assert_eq!(entries(&status, "CIDR_INCLUDE"), sum(|r| r.included.len()));
    assert_eq!(entries(&status, "POD_IPS"), sum(|r| r.addresses.len()));
    assert_eq!(entries(&status, "POD_CONFIG"), listed.len() as u64);
    assert_eq!(entries(&status, "POD_INFO"), listed.len() as u64);
}

/// A pod under a fresh id is written without looking for an earlier pod's rows under that id
/// (`Maps::insert_pod`: a lone `pod enable` then reads no node-wide table): an id without an
/// identity record has no rows, because a pod's rows are written after its record and removed
/// before it. Rows an older build left under a free id (it wrote them first, so a writer that
/// died part-way left them) go when an agent starts; the pod enabled next under that id has
/// its own rows only. Also: the entry `pod enable` returns is what `pod list` reads back.
#[test]
fn rows_left_under_a_free_id_go_when_the_agent_starts() {
    use interceptor::bpf::{
        Maps, Pins,
        maps::{PodRows, PortRule},
    };
    use interceptor_common::pod::{DIR_OUTBOUND, POD_NAME_LEN, PORT_EXCLUDE, PodInfo};

    let _churn = crate::namespace_churn();
    let mut h = Harness::new("orphans");
    h.start_agent(&["--keep-pinned"]);
    assert!(h.stop_agent(), "the agent stops cleanly");
    let pins = Pins::new(&h.pin_root);
    let mut maps = Maps::open(&pins).expect("opening the pinned maps");
    let stale = PodRows {
        ports: vec![PortRule {
            port: 4444,
            direction: DIR_OUTBOUND,
            rule: PORT_EXCLUDE,
        }],
        excluded: vec![("198.18.77.0".parse().unwrap(), 24)],
        ..PodRows::default()
    };
    // Under id 1 (the next pod's) and 7: rows, no identity record, no config.
    for id in [1u32, 7] {
        let info = PodInfo {
            netns_cookie: 0xdead_0000 + u64::from(id),
            netns_ino: 0,
            netns_dev: 0,
            source: 0,
            pid: 0,
            mode: 0,
            backend: 0,
            name: [0; POD_NAME_LEN],
        };
        maps.restore_pod(id, &info, None, &stale);
        maps.remove_pod_info(id);
    }
    assert_eq!(
        entries(&h.status(), "POD_PORTS"),
        2,
        "the stale rows are in"
    );

    h.start_agent(&[]);
    let status = h.status();
    assert_eq!(
        entries(&status, "POD_PORTS"),
        0,
        "gone at the agent's start"
    );
    assert_eq!(
        entries(&status, "CIDR_EXCLUDE"),
        0,
        "gone at the agent's start"
    );

    let crowd = Crowd::new(&h.lab.name, 1);
    let out = h.cli(&["pod", "enable", "--netns", &crowd.names[0], "--json"]);
    assert!(
        out.status.success(),
        "pod enable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enabled: Value = serde_json::from_slice(&out.stdout).expect("pod enable --json");
    let out = h.cli(&["pod", "list", "--json"]);
    assert!(out.status.success(), "pod list");
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("pod list --json");
    let status = h.status();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], 1, "the free id");
    assert_eq!(
        enabled, listed[0],
        "what enable returned is what list reads back"
    );
    let spec = listed[0]["spec"].to_string();
    assert!(
        !spec.contains("4444") && !spec.contains("198.18.77"),
        "{spec}"
    );
    let rows = entries(&status, "POD_PORTS");
    assert!(rows > 0, "its own rows");
    drop(maps);
}
