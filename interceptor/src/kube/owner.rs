//! Is this stop an uninstall? In a DaemonSet, a stop is usually not one: a rollout, `kubectl
//! delete pod`, an OOM kill or a node-pressure eviction must leave every meshed pod of the node
//! intercepted (the pinned programs keep working and the next agent adopts them). Only when the
//! DaemonSet itself is gone or being deleted (`helm uninstall`, `kubectl delete daemonset`, in
//! either cascade mode) has the operator asked for the datapath to go.
//!
//! Asking the API at stop time is not enough on its own: `helm uninstall` and `kubectl delete -f`
//! delete the agent's Role, RoleBinding and ServiceAccount right after the DaemonSet, before the
//! garbage collector has its pods stopped, so by SIGTERM the agent's GET is refused (403, or 401
//! once its token is gone). The agent therefore also watches its DaemonSet for its whole life:
//! an open watch is not authorized again, so it still delivers the deletion, and a stop whose
//! GET fails goes by what the watch saw last. A refusal alone is never taken for an uninstall
//! (broken RBAC must not turn a restart into pods leaving the mesh).

use std::{fmt, str::FromStr, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info};

/// The DaemonSet that runs this agent (`--daemonset NAMESPACE/NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for DaemonSetRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "`{s}` is not NAMESPACE/NAME (e.g. interceptor-system/interceptor)"
            )),
        }
    }
}

impl fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the API says about the agent's DaemonSet at stop time.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It exists and is not being deleted: this stop is a restart, keep the datapath.
    Present,
    /// Gone, or carrying a deletion timestamp: uninstall.
    Uninstalling(String),
    /// The API did not answer in time: keep the datapath (the safe side: pods stay intercepted;
    /// `interceptor uninstall` on the node removes it).
    Unknown(String),
}

/// What the agent's watch of its DaemonSet saw last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seen {
    /// No complete list yet (the watch has not been allowed, or not answered).
    #[default]
    Nothing,
    Present,
    Deleting,
    Gone,
}

impl Seen {
    fn of(ds: &DaemonSet) -> Self {
        if ds.metadata.deletion_timestamp.is_some() {
            Self::Deleting
        } else {
            Self::Present
        }
    }
}

/// The agent's watch of its own DaemonSet (see the module's doc for why), and the question it
/// asks at stop time.
pub struct OwnerWatch {
    api: Api<DaemonSet>,
    owner: DaemonSetRef,
    seen: watch::Receiver<Seen>,
    task: JoinHandle<()>,
}

impl OwnerWatch {
    /// Starts watching (`fieldSelector=metadata.name=NAME`, which RBAC's `resourceNames`
    /// requires for list and watch), re-listing with kube's backoff when the watch breaks.
    pub fn start(client: Client, owner: DaemonSetRef) -> Self {
        let api: Api<DaemonSet> = Api::namespaced(client, &owner.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", owner.name));
        let (tx, seen) = watch::channel(Seen::Nothing);
        let task = tokio::spawn({
            let (api, owner) = (api.clone(), owner.clone());
            async move {
                let mut events = watcher(api, config).default_backoff().boxed();
                // During a (re-)list: what it has shown so far; a list without the object says
                // it is gone.
                let mut listing = None;
                while let Some(event) = events.next().await {
                    let now = match event {
                        Ok(watcher::Event::Init) => {
                            listing = Some(Seen::Gone);
                            continue;
                        }
                        Ok(watcher::Event::InitApply(ds)) => {
                            listing = Some(Seen::of(&ds));
                            continue;
                        }
                        Ok(watcher::Event::InitDone) => match listing.take() {
                            Some(seen) => seen,
                            None => continue,
                        },
                        Ok(watcher::Event::Apply(ds)) => Seen::of(&ds),
                        Ok(watcher::Event::Delete(_)) => Seen::Gone,
                        Err(err) => {
                            debug!(daemonset = %owner, %err, "watching the DaemonSet");
                            continue;
                        }
                    };
                    let before = tx.send_replace(now);
                    if before != now && matches!(now, Seen::Deleting | Seen::Gone) {
                        info!(
                            daemonset = %owner,
                            seen = ?now,
                            "the DaemonSet is being deleted or gone: the next stop uninstalls"
                        );
                        // A line scripts and tests wait for.
                        println!(
                            "interceptor agent: DaemonSet {owner} {now:?}: the next stop uninstalls"
                        );
                    }
                }
            }
        });
        Self {
            api,
            owner,
            seen,
            task,
        }
    }

    pub fn owner(&self) -> &DaemonSetRef {
        &self.owner
    }

    fn seen(&self) -> Seen {
        *self.seen.borrow()
    }

    /// Asks the API, for at most `timeout`; when it does not answer, goes by what the watch
    /// sees, waiting up to `REFUSED_WAIT` for a deletion: a refusal is itself a hint that an
    /// uninstall is under way (`kubectl delete -f` can delete the namespace's RBAC and pods
    /// before the DaemonSet).
    pub async fn check(&self, timeout: Duration) -> Verdict {
        let failed = match tokio::time::timeout(timeout, self.api.get_opt(&self.owner.name)).await {
            Err(_) => format!("no answer within {timeout:?}"),
            Ok(Err(err)) => err.to_string(),
            // The answer judged as the watch judges what it sees.
            Ok(Ok(ds)) => {
                return match ds.as_ref().map_or(Seen::Gone, Seen::of) {
                    Seen::Gone => Verdict::Uninstalling("the DaemonSet is gone".to_owned()),
                    Seen::Deleting => {
                        Verdict::Uninstalling("the DaemonSet is being deleted".to_owned())
                    }
                    Seen::Present | Seen::Nothing => Verdict::Present,
                };
            }
        };
        decide_without_answer(failed, self.deletion_within(REFUSED_WAIT).await)
    }

    /// What the watch sees within `timeout`, returning early at a deletion.
    async fn deletion_within(&self, timeout: Duration) -> Seen {
        let mut seen = self.seen.clone();
        let deleted = |s: &Seen| matches!(s, Seen::Deleting | Seen::Gone);
        match tokio::time::timeout(timeout, seen.wait_for(deleted)).await {
            Ok(Ok(s)) => *s,
            _ => self.seen(),
        }
    }
}

impl Drop for OwnerWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a stop whose question failed waits for the watch to see a deletion (well inside
/// Kubernetes' 30 s grace period, with the 5 s question before it).
const REFUSED_WAIT: Duration = Duration::from_secs(5);

/// The API refused or did not answer: an uninstall only if the watch saw the deletion.
fn decide_without_answer(failed: String, watched: Seen) -> Verdict {
    match watched {
        Seen::Gone => Verdict::Uninstalling(format!(
            "the DaemonSet was deleted (seen by the agent's watch; the API now answers: {failed})"
        )),
        Seen::Deleting => Verdict::Uninstalling(format!(
            "the DaemonSet is being deleted (seen by the agent's watch; the API now answers: \
             {failed})"
        )),
        Seen::Present | Seen::Nothing => Verdict::Unknown(failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_answer_uninstalls_only_after_the_watch_saw_the_deletion() {
        let refused = || "403 Forbidden".to_owned();
        assert!(matches!(
            decide_without_answer(refused(), Seen::Gone),
            Verdict::Uninstalling(why) if why.contains("403")
        ));
        assert!(matches!(
            decide_without_answer(refused(), Seen::Deleting),
            Verdict::Uninstalling(_)
        ));
        for kept in [Seen::Present, Seen::Nothing] {
            assert_eq!(
                decide_without_answer(refused(), kept),
                Verdict::Unknown(refused())
            );
        }
    }

    #[test]
    fn parses_namespace_and_name_only() {
        let r: DaemonSetRef = "interceptor-system/interceptor".parse().expect("valid");
        assert_eq!(r.namespace, "interceptor-system");
        assert_eq!(r.name, "interceptor");
        assert_eq!(r.to_string(), "interceptor-system/interceptor");
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            let err = bad.parse::<DaemonSetRef>().expect_err(bad);
            assert!(err.contains("NAMESPACE/NAME"), "{err}");
        }
    }
}
