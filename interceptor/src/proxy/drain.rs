//! The drain signal as HTTP connections see it: one per data-plane worker. A connection checks it
//! with one atomic load each time it is polled, and registers its waker once for its whole
//! life, so the signal costs nothing per request. (A shared `CancellationToken` takes two
//! mutexes on every poll, shared by every connection of every worker.)

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use slab::Slab;

/// One worker's drain signal; `trigger` is called once, on SIGTERM.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    waiting: Mutex<Slab<Waker>>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain: every watcher sees it on its next poll and is woken for it.
    pub fn trigger(&self) {
        self.inner.draining.store(true, Ordering::Release);
        let wakers: Vec<Waker> = match self.inner.waiting.lock() {
            Ok(mut waiting) => waiting.drain().collect(),
            Err(_) => return,
        };
        for waker in wakers {
            waker.wake();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// A watcher for one connection (it registers on its first poll).
    pub fn watch(&self) -> Watch {
        Watch {
            drain: self.clone(),
            key: None,
        }
    }
}

/// Resolves when the drain starts. Polling it again is one atomic load unless the task's waker
/// changed (a connection's task keeps one waker for its whole life).
#[derive(Debug)]
pub struct Watch {
    drain: Drain,
    key: Option<(usize, Waker)>,
}

impl Watch {
    pub fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.drain.inner;
        if inner.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if matches!(&self.key, Some((_, w)) if w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let Ok(mut waiting) = inner.waiting.lock() else {
            return Poll::Pending;
        };
        if let Some((key, _)) = self.key.take()
            && waiting.contains(key)
        {
            waiting.remove(key);
        }
        let key = waiting.insert(cx.waker().clone());
        self.key = Some((key, cx.waker().clone()));
        drop(waiting);
        // The drain may have started between the first check and the registration.
        if inner.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Future for Watch {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_drain(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((key, _)) = self.key.take()
            && let Ok(mut waiting) = self.drain.inner.waiting.lock()
            && waiting.contains(key)
        {
            waiting.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_wake_on_trigger_and_late_watchers_see_it_at_once() {
        let drain = Drain::new();
        let early = tokio::spawn(drain.watch());
        tokio::task::yield_now().await;
        assert!(!drain.is_draining());
        drain.trigger();
        early.await.expect("the watcher resolves");
        drain.watch().await;
        assert!(drain.inner.waiting.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_dropped_watcher_leaves_no_waker_behind() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        let polled = futures::poll!(&mut watch);
        assert!(polled.is_pending());
        assert_eq!(drain.inner.waiting.lock().expect("lock").len(), 1);
        drop(watch);
        assert!(drain.inner.waiting.lock().expect("lock").is_empty());
    }
}
