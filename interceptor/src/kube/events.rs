//! Kubernetes Events on pods (`kubectl describe pod` shows them): why a pod the agent was asked
//! to intercept is not. Published by kube-rs's `Recorder` (events.k8s.io/v1) from a task of its
//! own, so the reconcile pass never waits on the API.
//!
//! The controller reports each distinct problem of a pod once. A `Recorder` folds events with
//! the same pod, reason and action into a series that keeps the *first* note, which would hide
//! a second, different problem (another bad annotation); so each problem gets a fresh
//! `Recorder` and its own Event.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Client, Resource as _,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use super::metrics::KubeMetrics;

/// The `reportingController` of our events.
pub const CONTROLLER: &str = "interceptor.dev/agent";
/// Events' notes are limited to 1 KiB by the API.
const NOTE_MAX: usize = 1024;
/// And `reportingInstance` to 128 characters (node names can be 253).
const INSTANCE_MAX: usize = 128;
/// Events waiting to be sent; past that, new ones are dropped (and logged) rather than queued.
const QUEUE: usize = 256;

/// Event reasons (CamelCase, as Kubernetes components write them).
pub mod reason {
    pub const INVALID_ANNOTATION: &str = "InvalidInterceptionAnnotation";
    pub const INTERCEPTION_FAILED: &str = "InterceptionFailed";
    pub const SIDECAR_MISSING: &str = "SidecarMissing";
}

struct Notice {
    pod: ObjectReference,
    reason: &'static str,
    note: String,
}

/// Where the controller drops its events.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Notice>,
}

impl EventSink {
    /// Starts the publishing task; `instance` names this agent (the node).
    pub fn start(
        client: Client,
        mut instance: String,
        metrics: KubeMetrics,
    ) -> (Self, JoinHandle<()>) {
        truncate(&mut instance, INSTANCE_MAX, "");
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(instance),
        };
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(notice) = rx.recv().await {
                let recorder = Recorder::new(client.clone(), reporter.clone());
                let event = Event {
                    type_: EventType::Warning,
                    reason: notice.reason.into(),
                    note: Some(notice.note),
                    action: "Intercept".into(),
                    secondary: None,
                };
                match recorder.publish(&event, &notice.pod).await {
                    Ok(()) => {
                        metrics.events.inc();
                        debug!(pod = ?notice.pod.name, reason = notice.reason, "event posted");
                    }
                    Err(err) => warn!(
                        pod = ?notice.pod.name,
                        reason = notice.reason,
                        %err,
                        "could not post a Kubernetes event"
                    ),
                }
            }
        });
        (Self { tx }, task)
    }

    /// Posts a Warning event on `pod`.
    pub fn warn(&self, pod: &Pod, reason: &'static str, note: &str) {
        let mut note = note.to_owned();
        truncate(&mut note, NOTE_MAX, "...");
        let notice = Notice {
            pod: pod.object_ref(&()),
            reason,
            note,
        };
        if self.tx.try_send(notice).is_err() {
            warn!(reason, "too many Kubernetes events queued; dropping one");
        }
    }
}

/// Cuts `s` to at most `max` bytes (on a character boundary), ending with `marker` if cut.
fn truncate(s: &mut String, max: usize, marker: &str) {
    if s.len() <= max {
        return;
    }
    let mut end = max - marker.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(marker);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_and_instances_fit_the_api_limits() {
        let mut note = "é".repeat(1000);
        truncate(&mut note, NOTE_MAX, "...");
        assert!(note.len() <= NOTE_MAX && note.ends_with("..."));
        let mut instance = format!("interceptor-{}", "n".repeat(253));
        truncate(&mut instance, INSTANCE_MAX, "");
        assert_eq!(instance.len(), INSTANCE_MAX);
        let mut short = "ok".to_owned();
        truncate(&mut short, NOTE_MAX, "...");
        assert_eq!(short, "ok");
    }
}
