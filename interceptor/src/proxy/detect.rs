//! Protocol detection on the first bytes a client sends (Envoy's http_inspector): an HTTP/1.x
//! request line or the HTTP/2 prior-knowledge preface is HTTP; anything else — TLS, binary, a
//! server-first protocol that sends nothing within the detection timeout — is TCP. The bytes
//! read are handed back so they can be replayed, whatever the verdict.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line we wait for before calling it TCP.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    NeedMore,
}

/// Reads until the protocol is known, the client stops sending (EOF or `timeout`; `None` waits
/// for the client however long it takes, as Istio does by default), or the request line would
/// be too long. Returns the protocol and every byte read.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Option<Duration>,
) -> std::io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::ZERO));
    tokio::pin!(deadline);
    loop {
        if let Verdict::Is(p) = classify(&buf) {
            return Ok((p, buf));
        }
        if buf.len() >= MAX_REQUEST_LINE {
            return Ok((Protocol::Tcp, buf));
        }
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    // EOF before a verdict: what we have is all there is; proxy it as bytes.
                    return Ok((Protocol::Tcp, buf));
                }
            }
            _ = &mut deadline, if timeout.is_some() => return Ok((Protocol::Tcp, buf)),
        }
    }
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Verdict::Is(Protocol::Http2);
    }
    let could_be_h2 = H2_PREFACE.starts_with(buf);
    match http1_request_line(buf) {
        Verdict::Is(Protocol::Tcp) if could_be_h2 => Verdict::NeedMore,
        // "PRI * HTTP/2.0" is a valid-looking token line too: only the full preface decides.
        Verdict::NeedMore => Verdict::NeedMore,
        v => v,
    }
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`, checked byte by byte so a non-HTTP stream is
/// recognised on its first bytes.
fn http1_request_line(buf: &[u8]) -> Verdict {
    let tcp = Verdict::Is(Protocol::Tcp);
    // Method: an upper-case token (RFC 9110 allows more; every real method is upper case).
    let method_len = buf
        .iter()
        .position(|b| !(b.is_ascii_uppercase() || *b == b'-' || *b == b'_'))
        .unwrap_or(buf.len());
    if method_len > 20 {
        return tcp;
    }
    if method_len == buf.len() {
        return Verdict::NeedMore;
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return tcp;
    }
    let rest = &buf[method_len + 1..];
    // Request target: visible ASCII (and obs-text) up to the next space.
    let target_len = rest
        .iter()
        .position(|b| *b == b' ' || *b < 0x21 || *b == 0x7f)
        .unwrap_or(rest.len());
    if target_len == rest.len() {
        return Verdict::NeedMore;
    }
    if target_len == 0 || rest[target_len] != b' ' {
        return tcp;
    }
    let version = &rest[target_len + 1..];
    const V: &[u8] = b"HTTP/1.";
    let n = version.len().min(V.len());
    if version[..n] != V[..n] {
        return tcp;
    }
    if version.len() <= V.len() {
        return Verdict::NeedMore;
    }
    if !matches!(version[V.len()], b'0' | b'1') {
        return tcp;
    }
    match version.get(V.len() + 1) {
        None => Verdict::NeedMore,
        Some(b'\r' | b'\n') => Verdict::Is(Protocol::Http1),
        Some(_) => tcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(s: &[u8]) -> Verdict {
        classify(s)
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n"), Verdict::Is(Protocol::Http1));
        assert_eq!(
            verdict(b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(verdict(b"GE"), Verdict::NeedMore);
        assert_eq!(verdict(b"GET /long/pa"), Verdict::NeedMore);
        assert_eq!(verdict(b"GET / HTTP/1."), Verdict::NeedMore);
    }

    #[test]
    fn non_http_is_tcp_on_the_first_bytes() {
        for s in [
            &b"\x16\x03\x01\x02\x00"[..], // TLS ClientHello
            b"first",                     // lower case
            b"\x00\x01\x02",              // binary
            b"SET key value\r\n",         // redis inline: no HTTP version
            b"GET / HTTP/2.0\r\n",        // not 1.x
            b"GET  / HTTP/1.1\r\n",       // empty target
            b"GET / SIP/2.0\r\n",
            b"*1\r\n$4\r\nPING\r\n",
        ] {
            assert_eq!(verdict(s), Verdict::Is(Protocol::Tcp), "{s:?}");
        }
    }

    #[test]
    fn h2_preface_needs_all_of_it() {
        assert_eq!(verdict(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(verdict(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(verdict(b"PR"), Verdict::NeedMore);
        assert_eq!(
            verdict(b"PRX"),
            Verdict::NeedMore,
            "a method starting PR is possible"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_clients_become_tcp_after_the_timeout() {
        let (client, mut server) = tokio::io::duplex(64);
        let detect = tokio::spawn(async move {
            detect(&mut server, Some(Duration::from_millis(100)))
                .await
                .map(|(p, b)| (p, b.to_vec()))
        });
        // Nothing is sent; paused time jumps to the timeout.
        let (p, bytes) = detect.await.expect("join").expect("io");
        assert_eq!(p, Protocol::Tcp);
        assert!(bytes.is_empty());
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_slow_client_is_still_recognised() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let detect = tokio::spawn(async move {
            detect(&mut server, None)
                .await
                .map(|(p, b)| (p, b.to_vec()))
        });
        // An hour of (paused) silence, then a request.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!detect.is_finished(), "gave up without a timeout");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let (p, _) = detect.await.expect("join").expect("io");
        assert_eq!(p, Protocol::Http1);
    }

    #[tokio::test]
    async fn bytes_read_are_returned_for_replay() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HT").await.expect("write");
        let detect =
            tokio::spawn(async move { detect(&mut server, Some(Duration::from_secs(5))).await });
        client
            .write_all(b"TP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let (p, bytes) = detect.await.expect("join").expect("io");
        assert_eq!(p, Protocol::Http1);
        assert!(bytes.starts_with(b"GET / HTTP/1.1\r\n"));
    }
}
