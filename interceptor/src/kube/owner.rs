//! Is this stop an uninstall? In a DaemonSet, a stop is usually not one: a rollout, `kubectl
//! delete pod`, an OOM kill or a node-pressure eviction must leave every meshed pod of the node
//! intercepted (the pinned programs keep working and the next agent adopts them). Only when the
//! DaemonSet itself is gone or being deleted (`helm uninstall`, `kubectl delete daemonset`, in
//! either cascade mode) has the operator asked for the datapath to go.

use std::{fmt, str::FromStr, time::Duration};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};

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
    Uninstalling(&'static str),
    /// The API did not answer in time: keep the datapath (the safe side: pods stay intercepted;
    /// `interceptor uninstall` on the node removes it).
    Unknown(String),
}

/// Asks the API, for at most `timeout`.
pub async fn check(client: Client, owner: &DaemonSetRef, timeout: Duration) -> Verdict {
    let api: Api<DaemonSet> = Api::namespaced(client, &owner.namespace);
    match tokio::time::timeout(timeout, api.get_opt(&owner.name)).await {
        Err(_) => Verdict::Unknown(format!("no answer within {timeout:?}")),
        Ok(Err(err)) => Verdict::Unknown(err.to_string()),
        Ok(Ok(None)) => Verdict::Uninstalling("the DaemonSet is gone"),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
            Verdict::Uninstalling("the DaemonSet is being deleted")
        }
        Ok(Ok(Some(_))) => Verdict::Present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
