//! The datapath must never break the host: getsockopt calls of every other program keep working
//! (the getsockopt hook runs for all of them), including values larger than a page.

#![allow(
    unsafe_code,
    reason = "a raw getsockopt with a buffer larger than a page: the case under test"
)]

use std::{net::TcpListener, os::fd::AsRawFd};

use crate::{Harness, host_iptables_tool, iptables_tool};

#[test]
fn getsockopt_with_a_buffer_larger_than_a_page_still_works() {
    let mut h = Harness::new("bigopt");
    h.pod("meshed");
    h.start_agent(&[]);
    let sock = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut buf = vec![0u8; 3 * 4096];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into buf.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    assert!(len > 0 && (len as usize) < 4096);
}

#[test]
fn iptables_legacy_save_of_a_large_ruleset_still_works() {
    let mut h = Harness::new("iptsave");
    let pod = h.pod("scratch");
    h.start_agent(&[]);
    // Enough rules that the kernel's answer to IPT_SO_GET_ENTRIES is several pages long.
    let mut rules =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..300 {
        rules.push_str(&format!(
            "-A INPUT -s 198.18.{}.{}/32 -p tcp --dport {} -j ACCEPT\n",
            i / 200,
            i % 200 + 1,
            1000 + i
        ));
    }
    rules.push_str("COMMIT\n");
    iptables_tool(&pod, "iptables-legacy-restore", &[], Some(rules));
    let text = iptables_tool(&pod, "iptables-legacy-save", &["-t", "filter"], None);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("-A INPUT")).count(),
        300
    );
}

/// The node's own network namespace is never a pod: enabling it (by init's pid, or this
/// process's, in either mode) is refused with a message, and nothing is written.
#[test]
fn the_node_namespace_cannot_be_enabled() {
    let mut h = Harness::new("nodens");
    h.start_agent(&[]);
    let me = std::process::id().to_string();
    for mode in ["ebpf", "iptables"] {
        let args = ["pod", "enable", "--pid", &me, "--mode", mode];
        let out = h.cli(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("node's own network namespace"),
            "{args:?}: {err}"
        );
    }
    // init's namespace is refused too (some sandboxes do not even let root open it).
    assert!(!h.cli(&["pod", "enable", "--pid", "1"]).status.success());
    assert_eq!(h.status()["pods"].as_array().expect("pods").len(), 0);
    // No Istio chain reached the host's nat table.
    assert!(!host_iptables_tool("iptables-save", &["-t", "nat"]).contains("ISTIO_"));
}
