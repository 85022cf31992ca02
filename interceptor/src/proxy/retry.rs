//! Envoy's retry semantics: which outcomes of an attempt are retried (`retry_on`), how often
//! (`num_retries`), how long to wait between attempts (jittered exponential backoff), and on which
//! endpoint (`previous_hosts`: not one that was already tried). The loop that uses it lives in
//! `http.rs`; this module only decides.

use std::time::Duration;

use super::config::RetryPolicyConfig;

/// The `retry_on` conditions, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    pub const CONNECT_FAILURE: Self = Self(1);
    pub const REFUSED_STREAM: Self = Self(1 << 1);
    pub const RESET: Self = Self(1 << 2);
    pub const FIVE_XX: Self = Self(1 << 3);
    pub const GATEWAY_ERROR: Self = Self(1 << 4);
    pub const RETRIABLE_4XX: Self = Self(1 << 5);
    pub const RETRIABLE_STATUS_CODES: Self = Self(1 << 6);
    pub const CANCELLED: Self = Self(1 << 7);
    pub const DEADLINE_EXCEEDED: Self = Self(1 << 8);
    pub const INTERNAL: Self = Self(1 << 9);
    pub const RESOURCE_EXHAUSTED: Self = Self(1 << 10);
    pub const UNAVAILABLE: Self = Self(1 << 11);

    const NAMES: [(&'static str, Self); 12] = [
        ("connect-failure", Self::CONNECT_FAILURE),
        ("refused-stream", Self::REFUSED_STREAM),
        ("reset", Self::RESET),
        ("5xx", Self::FIVE_XX),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("cancelled", Self::CANCELLED),
        ("deadline-exceeded", Self::DEADLINE_EXCEEDED),
        ("internal", Self::INTERNAL),
        ("resource-exhausted", Self::RESOURCE_EXHAUSTED),
        ("unavailable", Self::UNAVAILABLE),
    ];

    pub fn parse(s: &str) -> Result<Self, String> {
        let mut bits = 0;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match Self::NAMES.iter().find(|(n, _)| *n == part) {
                Some((_, v)) => bits |= v.0,
                None => {
                    let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "unknown condition {part:?} (known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(Self(bits))
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
}

/// What one attempt ended with, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the endpoint (refused, unreachable, connect timeout).
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    RefusedStream,
    /// The connection broke before a response head arrived.
    Reset,
    /// The attempt's own timeout (`per_try_timeout`) expired.
    PerTryTimeout,
    /// The client's request body failed (cut short, or past the size limit): no fault of the
    /// endpoint's, and nothing a retry could send.
    ClientBody,
    /// A response head arrived, with its status and its `grpc-status` header (trailers-only
    /// gRPC responses carry it there).
    Response { status: u16, grpc: Option<u32> },
}

impl Outcome {
    /// Whether the endpoint misbehaved (for outlier detection): no connection, a broken one,
    /// or a 5xx.
    pub fn is_endpoint_failure(self) -> bool {
        match self {
            Outcome::ConnectFailure | Outcome::Reset | Outcome::PerTryTimeout => true,
            Outcome::RefusedStream | Outcome::ClientBody => false,
            Outcome::Response { status, .. } => status >= 500,
        }
    }
}

/// A route's compiled retry policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub retriable_status_codes: Vec<u16>,
    pub previous_hosts: bool,
    pub host_selection_retry_max_attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
}

impl RetryPolicy {
    /// No retries at all (the passthrough cluster, inbound).
    pub fn none() -> Self {
        Self {
            on: RetryOn::default(),
            num_retries: 0,
            retriable_status_codes: Vec::new(),
            previous_hosts: false,
            host_selection_retry_max_attempts: 1,
            per_try_timeout: None,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
        }
    }

    /// From validated config (`retry_on` was checked at load).
    pub fn from_config(c: &RetryPolicyConfig) -> Self {
        let base = if c.base_interval.0.is_zero() {
            Duration::from_millis(25)
        } else {
            c.base_interval.0
        };
        Self {
            on: RetryOn::parse(&c.retry_on).unwrap_or_default(),
            num_retries: c.num_retries,
            retriable_status_codes: c.retriable_status_codes.clone(),
            previous_hosts: c.previous_hosts,
            host_selection_retry_max_attempts: c.host_selection_retry_max_attempts.max(1),
            per_try_timeout: c.per_try_timeout.nonzero(),
            base_interval: base,
            max_interval: c.max_interval.0.max(base),
        }
    }

    /// Whether `outcome` of attempt number `attempt` (1-based) calls for another attempt.
    pub fn should_retry(&self, attempt: u32, outcome: Outcome) -> bool {
        if attempt > self.num_retries {
            return false;
        }
        self.retriable(outcome)
    }

    /// Whether `outcome` matches a `retry_on` condition.
    pub fn retriable(&self, outcome: Outcome) -> bool {
        let on = self.on;
        match outcome {
            Outcome::ConnectFailure => {
                on.contains(RetryOn::CONNECT_FAILURE)
                    || on.contains(RetryOn::FIVE_XX)
                    || on.contains(RetryOn::GATEWAY_ERROR)
            }
            Outcome::RefusedStream => {
                on.contains(RetryOn::REFUSED_STREAM) || on.contains(RetryOn::FIVE_XX)
            }
            Outcome::ClientBody => false,
            Outcome::Reset | Outcome::PerTryTimeout => {
                on.contains(RetryOn::RESET)
                    || on.contains(RetryOn::FIVE_XX)
                    || on.contains(RetryOn::GATEWAY_ERROR)
            }
            Outcome::Response { status, grpc } => {
                (on.contains(RetryOn::FIVE_XX) && status >= 500)
                    || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (on.contains(RetryOn::RETRIABLE_4XX) && status == 409)
                    || (on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                        && self.retriable_status_codes.contains(&status))
                    || grpc.is_some_and(|g| self.grpc_retriable(g))
            }
        }
    }

    fn grpc_retriable(&self, code: u32) -> bool {
        let cond = match code {
            1 => RetryOn::CANCELLED,
            4 => RetryOn::DEADLINE_EXCEEDED,
            8 => RetryOn::RESOURCE_EXHAUSTED,
            13 => RetryOn::INTERNAL,
            14 => RetryOn::UNAVAILABLE,
            _ => return false,
        };
        self.on.contains(cond)
    }

    /// Wait before retry number `retry` (1-based): uniform in [0, base × 2^(retry-1)], capped at
    /// the max interval (Envoy's fully jittered backoff). `random` is in [0, 1).
    pub fn backoff(&self, retry: u32, random: f64) -> Duration {
        let exp = 1u32 << (retry.saturating_sub(1)).min(16);
        let ceiling = self
            .base_interval
            .saturating_mul(exp)
            .min(self.max_interval);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio() -> RetryPolicy {
        RetryPolicy::from_config(&RetryPolicyConfig::default())
    }

    #[test]
    fn istio_default_retries_what_the_article_lists() {
        let p = istio();
        assert_eq!(p.num_retries, 2);
        assert!(p.previous_hosts);
        assert!(p.retriable(Outcome::ConnectFailure));
        assert!(p.retriable(Outcome::RefusedStream));
        assert!(p.retriable(Outcome::Response {
            status: 503,
            grpc: None
        }));
        // unavailable / cancelled / resource-exhausted are gRPC statuses.
        for code in [14, 1, 8] {
            assert!(p.retriable(Outcome::Response {
                status: 200,
                grpc: Some(code)
            }));
        }
        // Not listed: other 5xx, a reset after the request went out, gRPC internal.
        assert!(!p.retriable(Outcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(!p.retriable(Outcome::Reset));
        assert!(!p.retriable(Outcome::Response {
            status: 200,
            grpc: Some(13)
        }));
    }

    #[test]
    fn num_retries_bounds_the_attempts() {
        let p = istio();
        assert!(p.should_retry(1, Outcome::ConnectFailure));
        assert!(p.should_retry(2, Outcome::ConnectFailure));
        assert!(!p.should_retry(3, Outcome::ConnectFailure));
    }

    #[test]
    fn five_xx_and_gateway_error_cover_local_failures() {
        let mut p = RetryPolicy::none();
        p.num_retries = 1;
        p.on = RetryOn::parse("gateway-error").expect("valid");
        assert!(p.retriable(Outcome::ConnectFailure));
        assert!(p.retriable(Outcome::Response {
            status: 504,
            grpc: None
        }));
        assert!(!p.retriable(Outcome::Response {
            status: 500,
            grpc: None
        }));
        p.on = RetryOn::parse("5xx").expect("valid");
        assert!(p.retriable(Outcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(p.retriable(Outcome::PerTryTimeout));
        assert!(!p.retriable(Outcome::Response {
            status: 404,
            grpc: None
        }));
        p.on = RetryOn::parse("retriable-4xx").expect("valid");
        assert!(p.retriable(Outcome::Response {
            status: 409,
            grpc: None
        }));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = istio();
        assert_eq!(p.backoff(1, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(1, 0.999_999).as_millis(), 24);
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(25));
        assert_eq!(p.backoff(10, 0.5), Duration::from_millis(125));
        assert!(p.backoff(30, 1.0) <= Duration::from_millis(250));
    }

    #[test]
    fn unknown_conditions_are_named() {
        let err = RetryOn::parse("connect-failure, 5xx ,oops").expect_err("oops");
        assert!(err.contains("\"oops\""), "{err}");
        assert!(
            RetryOn::parse("").expect("empty ok") == RetryOn::default(),
            "empty = retry nothing"
        );
    }
}
