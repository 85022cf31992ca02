//! Every connection "was going" to one address: the proxy benchmark runs the sidecar without
//! interception, so there is no SO_ORIGINAL_DST to ask.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::Arc,
};

use anyhow::Result;
use clap::Parser as _;
use interceptor::{cli::ProxyArgs, proxy::orig_dst::OrigDstAddr};
use tokio::net::TcpStream;

/// Answers every original-destination question with the same address.
#[derive(Clone, Copy, Debug)]
pub struct FixedDst(pub SocketAddr);

impl OrigDstAddr for FixedDst {
    fn outbound(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }

    fn inbound(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

#[derive(clap::Parser)]
struct Wrap {
    #[command(flatten)]
    args: ProxyArgs,
}

/// Starts the sidecar proxy in this process, on a thread of its own with one worker: an
/// outbound listener on 127.0.0.1 whose every connection goes to `cluster`, an h2c cluster of
/// the one endpoint `app` (as the proxy benchmark's gRPC row). Its config is written under
/// `dir`. Returns the outbound listener's address. For the measuring examples, which count
/// the proxy's allocations in their own process.
pub fn start_h2c_proxy(dir: &Path, cluster: &str, app: SocketAddr) -> Result<SocketAddr> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "clusters:\n  - name: \"{cluster}\"\n    endpoints: [\"{app}\"]\n    protocol: http2\n\
             outbound:\n  listeners:\n    - port: 9080\n      virtual_hosts:\n        \
             - name: grpc\n          domains: [\"*\"]\n          routes:\n            \
             - route: {{cluster: \"{cluster}\"}}\n"
        ),
    )?;
    let ports: Vec<SocketAddr> = (0..5)
        .map(|_| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?))
        .collect::<Result<_>>()?;
    let wrap = Wrap::parse_from([
        "proxy".to_owned(),
        "--no-drop-privileges".into(),
        "--workers".into(),
        "1".into(),
        "--config".into(),
        config.display().to_string(),
        "--outbound".into(),
        ports[0].to_string(),
        "--outbound-v6".into(),
        "none".into(),
        "--inbound".into(),
        ports[1].to_string(),
        "--metrics".into(),
        ports[2].to_string(),
        "--health".into(),
        ports[3].to_string(),
        "--admin".into(),
        ports[4].to_string(),
    ]);
    std::thread::spawn(move || {
        interceptor::commands::proxy::run_with(
            wrap.args,
            Some(Arc::new(FixedDst("127.0.0.1:9080".parse()?))),
        )
    });
    Ok(ports[0])
}
