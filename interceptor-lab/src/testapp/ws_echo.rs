//! A WebSocket server (tokio-tungstenite) that sends every text or binary message back: the
//! upstream of the proxy benchmark's WebSocket row.

use std::{io, net::SocketAddr};

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// Serves until the process ends.
pub async fn ws_echo_server(listen: SocketAddr) -> io::Result<()> {
    serve(TcpListener::bind(listen).await?).await
}

/// Serves on `listener` until accepting fails: text and binary messages echoed; pings and
/// closes are answered by tungstenite itself (reading on flushes a close's answer, then the
/// stream ends).
pub async fn serve(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut ws = match tokio_tungstenite::accept_async(stream).await {
                Ok(ws) => ws,
                Err(err) => {
                    debug!(%err, "WebSocket handshake failed");
                    return;
                }
            };
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Text(_) | Message::Binary(_))
                    && ws.send(msg).await.is_err()
                {
                    return;
                }
            }
        });
    }
}
