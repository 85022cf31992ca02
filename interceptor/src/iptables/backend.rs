//! Which iptables implementation writes the rules: the nf_tables one (`iptables-nft`, the
//! default of current distributions) or the legacy xtables one (`iptables-legacy`). A
//! namespace must be handled by the backend its existing rules use, as istio-iptables does.

use std::{fmt, process::Command, str::FromStr};

use serde::Serialize;

use super::Family;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn restore(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }

    pub fn save(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }

    /// The backend the plain `iptables` command uses on this machine (what an operator's own
    /// rules most likely went through), nft when that cannot be told.
    pub fn system_default() -> Self {
        let version = Command::new("iptables")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if version.contains("legacy") {
            Backend::Legacy
        } else {
            Backend::Nft
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// `--backend auto|nft|legacy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Fixed(Backend),
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "nft" => Ok(BackendChoice::Fixed(Backend::Nft)),
            "legacy" => Ok(BackendChoice::Fixed(Backend::Legacy)),
            other => Err(format!(
                "unknown backend {other:?}: use auto, nft or legacy"
            )),
        }
    }
}
