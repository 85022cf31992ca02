//! The sidecar's DNS proxy (Istio's 15053), UDP and TCP on 127.0.0.1 and [::1]. Interception
//! (eBPF `sendmsg`/`connect` programs or istio-iptables' DNS rules) sends a pod's port-53
//! traffic here. Names the mesh knows (the config's `dns` section, [`table`]) are answered
//! locally; everything else is forwarded ([`forward`]) to the resolver the app asked — TCP: the
//! connection's original destination; UDP: the pod's resolv.conf nameservers, as Istio's agent
//! does — and cached ([`cache`]). The proxy runs as UID/GID 1337, so its own queries are never
//! captured again.
//!
//! Malformed messages get FORMERR when they have a header, else are dropped; queries beyond
//! [`MAX_IN_FLIGHT`] are dropped (the client retries), so a flood costs bounded memory.

pub mod cache;
pub mod forward;
pub mod sockets;
pub mod table;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::{
    cache::{Cache, Key},
    table::Table,
};
use crate::proxy::{
    metrics::{DnsMetrics, DnsResult, DnsTransport},
    orig_dst::OrigDstAddr,
    snapshot::ConfigSource,
};

/// Queries being answered at once (all listeners); more are dropped until some finish.
pub const MAX_IN_FLIGHT: usize = 1024;
/// TCP clients at once; more wait in the kernel's accept queue.
const MAX_TCP_CLIENTS: usize = 256;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP payload size the proxy's own answers advertise (the DNS flag day's value).
const EDNS_PAYLOAD: u16 = 1232;

/// Where the DNS proxy listens and whom it asks for UDP queries.
#[derive(Clone, Debug, Serialize)]
pub struct DnsSettings {
    /// Istio: 127.0.0.1:15053; none = no DNS proxy.
    pub listen: Option<SocketAddr>,
    /// [::1]:15053; skipped when the pod has no IPv6.
    pub listen_v6: Option<SocketAddr>,
    /// Nameservers for UDP queries (and TCP ones without an original destination).
    pub resolv_conf: PathBuf,
    /// Nameservers to use instead of resolv.conf's (any port); empty = resolv.conf.
    pub upstreams: Vec<SocketAddr>,
}

impl Default for DnsSettings {
    /// Off: the command line turns it on (tests bind port 0 and would collide on 15053).
    fn default() -> Self {
        Self {
            listen: None,
            listen_v6: None,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            upstreams: Vec::new(),
        }
    }
}

impl DnsSettings {
    /// Istio's addresses.
    pub fn istio() -> Self {
        Self {
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 15053))),
            listen_v6: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 15053))),
            ..Self::default()
        }
    }
}

/// The bound DNS listeners.
pub struct Listeners {
    pub addrs: Vec<SocketAddr>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds UDP and TCP on each configured address (same port for both; port 0 picks one for the
/// pair). The IPv6 pair is skipped when the pod has no IPv6.
pub fn bind(settings: &DnsSettings) -> Result<Option<Listeners>, (SocketAddr, io::Error)> {
    let mut out = Listeners {
        addrs: Vec::new(),
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for (addr, required) in [(settings.listen, true), (settings.listen_v6, false)] {
        let Some(addr) = addr else { continue };
        match bind_pair(addr) {
            Ok((udp, tcp, bound)) => {
                out.udp.push(udp);
                out.tcp.push(tcp);
                out.addrs.push(bound);
            }
            Err(err) if !required => debug!(%addr, %err, "no IPv6 DNS listener (IPv6 off?)"),
            Err(err) => return Err((addr, err)),
        }
    }
    Ok((!out.addrs.is_empty()).then_some(out))
}

fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    // Port 0: the port UDP picked may be taken for TCP (a connection's local port on a busy
    // loopback), so another pick is tried; a configured port fails at once.
    let tries = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        match bind_pair_once(addr) {
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => last = Some(err),
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

fn bind_pair_once(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    let bound = udp.local_addr()?;
    udp.set_nonblocking(true)?;
    let tcp = Socket::new(
        Domain::for_address(bound),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    tcp.set_reuse_address(true)?;
    tcp.set_nonblocking(true)?;
    tcp.bind(&bound.into())?;
    tcp.listen(1024)?;
    Ok((
        UdpSocket::from_std(udp)?,
        TcpListener::from_std(tcp.into())?,
        bound,
    ))
}

/// The proxy's DNS logic, shared by every listener.
pub struct DnsProxy {
    source: ConfigSource,
    /// The local names of the config generation they were built from.
    table: Mutex<(u64, Arc<Table>)>,
    cache: Mutex<Cache>,
    resolv_conf: PathBuf,
    fixed_upstreams: Vec<SocketAddr>,
    /// Our own listeners: never an upstream (that would loop).
    own: Vec<SocketAddr>,
    metrics: DnsMetrics,
    in_flight: Arc<Semaphore>,
    /// Upstream UDP sockets kept between forwarded queries.
    sockets: forward::Sockets,
}

/// What [`DnsProxy::answer_now`] made of a query.
enum Step {
    /// Answered (or None: dropped) without an upstream.
    Done(Option<Vec<u8>>),
    /// Must be forwarded.
    Forward(Pending),
}

/// A parsed query on its way to the upstream.
struct Pending {
    request: Message,
    key: Option<Key>,
    limit: usize,
    tr: DnsTransport,
}

/// How a query arrived (decides the size limit and the fallback upstream).
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Udp,
    /// With the connection's original destination, if interception recorded one.
    Tcp(Option<SocketAddr>),
}

impl DnsProxy {
    pub fn new(
        source: ConfigSource,
        settings: &DnsSettings,
        own: Vec<SocketAddr>,
        metrics: DnsMetrics,
    ) -> Self {
        Self {
            source,
            table: Mutex::new((u64::MAX, Arc::new(Table::default()))),
            cache: Mutex::new(Cache::new()),
            resolv_conf: settings.resolv_conf.clone(),
            fixed_upstreams: settings.upstreams.clone(),
            own,
            metrics,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            sockets: forward::Sockets::default(),
        }
    }

    fn table(&self) -> Arc<Table> {
        let snapshot = self.source.snapshot();
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0 != snapshot.generation {
            *guard = (
                snapshot.generation,
                Arc::new(Table::build(&snapshot.config)),
            );
        }
        guard.1.clone()
    }

    /// The resolvers to ask: the original destination for TCP, else `--dns-upstream` or
    /// resolv.conf's (read per query, so an edited file applies at once; it is small and in
    /// the page cache).
    fn upstreams(&self, transport: Transport) -> Vec<SocketAddr> {
        let is_own = |a: &SocketAddr| {
            self.own
                .iter()
                .any(|o| o.port() == a.port() && (o.ip() == a.ip() || a.ip().is_unspecified()))
        };
        if let Transport::Tcp(Some(dst)) = transport
            && !is_own(&dst)
        {
            return vec![dst];
        }
        let mut servers = if self.fixed_upstreams.is_empty() {
            let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
            forward::parse_resolv_conf(&text)
        } else {
            self.fixed_upstreams.clone()
        };
        servers.retain(|s| !is_own(s));
        servers
    }

    /// The answer to one query message, or None to drop it.
    pub async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.answer_now(query, transport) {
            Step::Done(answer) => answer,
            Step::Forward(pending) => self.forward(query, transport, pending).await,
        }
    }

    /// Everything that needs no upstream: malformed queries, local names, cache hits. Kept
    /// synchronous so the UDP listener answers these inline, without a task hand-off (a
    /// cross-thread wake costs more than the answer itself).
    fn answer_now(&self, query: &[u8], transport: Transport) -> Step {
        let tr = match transport {
            Transport::Udp => DnsTransport::Udp,
            Transport::Tcp(_) => DnsTransport::Tcp,
        };
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(err) => {
                self.metrics.query(tr, DnsResult::Malformed);
                debug!(%err, len = query.len(), "malformed DNS query");
                return Step::Done(formerr(query));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            // A response sent to us: answering would let two servers bounce it for ever.
            self.metrics.query(tr, DnsResult::Malformed);
            return Step::Done(None);
        }
        let limit = match transport {
            Transport::Udp => request
                .edns
                .as_ref()
                .map_or(512, |e| usize::from(e.max_payload().max(512))),
            Transport::Tcp(_) => usize::from(u16::MAX),
        };
        if request.metadata.op_code == OpCode::Query {
            if request.queries.len() != 1 {
                self.metrics.query(tr, DnsResult::Malformed);
                return Step::Done(encode(&reply(&request, ResponseCode::FormErr), limit));
            }
            let q = &request.queries[0];
            let name = q.name().to_lowercase().to_ascii();
            let name = name.trim_end_matches('.');
            if q.query_class() == DNSClass::IN
                && let Some(addrs) = self.table().lookup(name)
            {
                self.metrics.query(tr, DnsResult::Local);
                let ttl = u32::try_from(self.source.snapshot().config.dns.ttl.0.as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1);
                return Step::Done(encode(&local_answer(&request, addrs, ttl), limit));
            }
        }
        let key = Key::of(&request).filter(|_| request.metadata.op_code == OpCode::Query);
        if let Some(key) = &key {
            let hit = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(
                key,
                request.metadata.id,
                Instant::now(),
            );
            if let Some(mut hit) = hit {
                hit.metadata.recursion_desired = request.metadata.recursion_desired;
                self.metrics.query(tr, DnsResult::Cached);
                return Step::Done(encode(&hit, limit));
            }
        }
        Step::Forward(Pending {
            request,
            key,
            limit,
            tr,
        })
    }

    /// Asks the upstream for what [`Self::answer_now`] could not answer.
    async fn forward(&self, query: &[u8], transport: Transport, p: Pending) -> Option<Vec<u8>> {
        let Pending {
            request,
            key,
            limit,
            tr,
        } = p;
        let dns = self.source.snapshot().config.dns.clone();
        let upstreams = self.upstreams(transport);
        match forward::forward(query, &upstreams, dns.upstream_timeout.0, &self.sockets).await {
            Ok(raw) => {
                let parsed = Message::from_vec(&raw).ok();
                // Only an answer to the question asked may be cached or passed on.
                let Some(parsed) = parsed.filter(|m| m.queries == request.queries) else {
                    self.metrics.query(tr, DnsResult::Failed);
                    debug!(?upstreams, "upstream answered another question");
                    return encode(&reply(&request, ResponseCode::ServFail), limit);
                };
                self.metrics.query(tr, DnsResult::Forwarded);
                if let Some(key) = key {
                    self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        key,
                        parsed.clone(),
                        usize::try_from(dns.cache_entries).unwrap_or(usize::MAX),
                        dns.max_cache_ttl.0,
                        Instant::now(),
                    );
                }
                if raw.len() <= limit {
                    Some(raw)
                } else {
                    // Got over TCP, asked over UDP: the client retries over TCP.
                    encode(&parsed, limit)
                }
            }
            Err(err) => {
                self.metrics.query(tr, DnsResult::Failed);
                debug!(%err, "DNS forward failed");
                encode(&reply(&request, ResponseCode::ServFail), limit)
            }
        }
    }

    /// Serves every listener until `stop`.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Listeners,
        orig_dst: Arc<dyn OrigDstAddr>,
        stop: CancellationToken,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        for udp in listeners.udp {
            tasks.spawn(self.clone().serve_udp(Arc::new(udp), stop.clone()));
        }
        let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
        for tcp in listeners.tcp {
            tasks.spawn(self.clone().serve_tcp(
                tcp,
                orig_dst.clone(),
                clients.clone(),
                stop.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>, stop: CancellationToken) {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(err) => {
                        // ICMP errors of earlier replies land here; nothing to do but go on.
                        debug!(%err, "DNS UDP receive");
                        continue;
                    }
                },
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                self.metrics.query(DnsTransport::Udp, DnsResult::Dropped);
                continue;
            };
            let pending = match self.answer_now(&buf[..n], Transport::Udp) {
                Step::Done(None) => continue,
                Step::Done(Some(answer)) => {
                    // A full socket buffer (rare): the reply waits in a task, not the listener.
                    match sock.try_send_to(&answer, peer) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            let sock = sock.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                if let Err(err) = sock.send_to(&answer, peer).await {
                                    debug!(%err, %peer, "DNS UDP reply");
                                }
                            });
                        }
                        Err(err) => debug!(%err, %peer, "DNS UDP reply"),
                        Ok(_) => {}
                    }
                    continue;
                }
                Step::Forward(pending) => pending,
            };
            let query = buf[..n].to_vec();
            let (this, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(answer) = this.forward(&query, Transport::Udp, pending).await
                    && let Err(err) = sock.send_to(&answer, peer).await
                {
                    debug!(%err, %peer, "DNS UDP reply");
                }
            });
        }
    }

    async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        orig_dst: Arc<dyn OrigDstAddr>,
        clients: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        loop {
            let Ok(permit) = clients.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = crate::socket::accept_with_backoff(&listener) => r,
            };
            let dst = orig_dst.outbound(&stream).ok();
            let (this, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = this.serve_tcp_client(stream, dst) => if let Err(err) = r {
                        debug!(%err, %peer, "DNS TCP client");
                    },
                }
            });
        }
    }

    async fn serve_tcp_client(
        &self,
        mut stream: TcpStream,
        dst: Option<SocketAddr>,
    ) -> io::Result<()> {
        let _ = stream.set_nodelay(true);
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                // Idle, closed or broken: the client is done.
                Ok(Err(_)) | Err(_) => return Ok(()),
            };
            let mut query = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query body"))??;
            let permit = self.in_flight.clone().acquire_owned().await;
            let answer = self.answer(&query, Transport::Tcp(dst)).await;
            drop(permit);
            let Some(answer) = answer else {
                // Nothing to say to this message; a stream cannot skip it, so close.
                return Ok(());
            };
            let Ok(alen) = u16::try_from(answer.len()) else {
                warn!(len = answer.len(), "DNS answer too long for TCP");
                return Ok(());
            };
            let mut out = Vec::with_capacity(answer.len() + 2);
            out.extend_from_slice(&alen.to_be_bytes());
            out.extend_from_slice(&answer);
            stream.write_all(&out).await?;
        }
    }
}

/// A reply to `request` with no records and `code`, echoing the question (and EDNS).
fn reply(request: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.metadata.response_code = code;
    m.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.edns = Some(edns);
    }
    m
}

/// FORMERR for bytes that do not parse, when they at least have a header to answer; the
/// question is not echoed (it may be what did not parse).
fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 {
        // A response: never answer one.
        return None;
    }
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&header[..2]);
    // QR=1, the query's opcode and RD; RA; RCODE=1 (FORMERR); all counts 0.
    out[2] = 0x80 | (header[2] & 0x79);
    out[3] = 0x80 | 0x01;
    Some(out)
}

/// The locally known addresses of the question's name, as an authoritative answer. A type the
/// name has no records of gets an empty NOERROR (NODATA), not a forward: the mesh owns the name.
fn local_answer(request: &Message, addrs: &table::Addresses, ttl: u32) -> Message {
    let mut m = reply(request, ResponseCode::NoError);
    m.metadata.authoritative = true;
    let q = &request.queries[0];
    let name: Name = q.name().clone();
    let (a, aaaa) = match q.query_type() {
        RecordType::A => (true, false),
        RecordType::AAAA => (false, true),
        RecordType::ANY => (true, true),
        _ => (false, false),
    };
    if a {
        for ip in &addrs.v4 {
            m.add_answer(Record::from_rdata(
                name.clone(),
                ttl,
                RData::A(rdata::A(*ip)),
            ));
        }
    }
    if aaaa {
        for ip in &addrs.v6 {
            m.add_answer(Record::from_rdata(
                name.clone(),
                ttl,
                RData::AAAA(rdata::AAAA(*ip)),
            ));
        }
    }
    m
}

/// Encodes `m`; when it does not fit `limit` (a UDP client's size), the header and question
/// only, with TC set, so the client asks again over TCP.
fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = match m.to_vec() {
        Ok(b) => b,
        Err(err) => {
            warn!(%err, "cannot encode a DNS answer");
            return None;
        }
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut t = m.truncate();
    t.edns = m.edns.clone();
    t.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formerr_keeps_the_id_and_never_answers_a_response() {
        let q = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let r = formerr(&q).expect("has a header");
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, 1);
        assert!(formerr(&[1, 2, 3]).is_none());
        let mut resp = q;
        resp[2] |= 0x80;
        assert!(formerr(&resp).is_none());
    }
}
