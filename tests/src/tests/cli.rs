//! Bad input gets a clear error that says what to do, and changes nothing.

use crate::Harness;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_switches_are_refused_with_the_field_and_value() {
    let mut h = Harness::new("badargs");
    let pod = h.pod("p");
    h.start_agent(&[]);
    for (flag, value, shown) in [
        ("--exclude-outbound-ports", "80,http", "http"),
        ("--exclude-inbound-ports", "70000", "70000"),
        ("--exclude-outbound-cidrs", "10.0.0.0/33", "10.0.0.0/33"),
        ("--include-inbound-ports", "80,*", "*"),
    ] {
        let out = h.cli(&["pod", "enable", "--netns", &pod.netns, flag, value]);
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = stderr(&out);
        assert!(err.contains(flag) && err.contains(shown), "{err}");
    }
    assert_eq!(h.status()["pods"].as_array().expect("pods").len(), 0);
}

#[test]
fn unknown_namespace_and_unknown_pod_say_what_to_do() {
    let mut h = Harness::new("unknown");
    h.start_agent(&[]);
    let out = h.cli(&["pod", "enable", "--netns", "icpt-no-such-netns"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ip netns list"), "{}", stderr(&out));
    let out = h.cli(&["pod", "disable", "--id", "4000"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("pod list"), "{}", stderr(&out));
}

#[test]
fn commands_without_an_agent_explain_it() {
    let h = Harness::new("noagent");
    let out = h.cli(&["pod", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is the agent running"),
        "{}",
        stderr(&out)
    );
    let status = h.status();
    assert_eq!(status["attached"], false);
    assert_eq!(status["pods"].as_array().expect("pods").len(), 0);
}
