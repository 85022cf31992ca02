//! Shutdown on SIGINT or SIGTERM.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Registers for SIGTERM and SIGINT now and returns a future that resolves on the first one.
/// Registering when called, not when first polled: until a handler exists the kernel's default
/// action kills the process, so a SIGTERM between "agent ready" and the agent's first await
/// ended it without its clean-up (seen in the slow guests: the twenty-restarts test's agent
/// "did not exit cleanly" right after it said ready). Call it inside a tokio runtime.
pub fn shutdown() -> impl Future<Output = ()> + Send + 'static {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), Ok(mut int)) => {
                int.recv().await;
            }
            (Err(_), Err(_)) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
