//! Leader election on a `coordination.k8s.io/v1` Lease: one controller replica reconciles, the
//! others stand by and take over once the holder stops renewing for a lease duration. The
//! decision is a pure function of the Lease and the clock; writes use the Lease's
//! resourceVersion, so two candidates racing for it cannot both win.

use std::time::Duration;

use crate::error::ErrorReason;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Leader election failures.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub(crate) enum LeaderError {
    #[error("cannot read or write the Lease")]
    #[strum(serialize = "LeaseApi")]
    Kube(#[source] kube::Error),
}

/// What a candidate should do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeaseDecision {
    /// Free or expired: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it and renewed recently.
    StandBy {
        holder: String,
        expires_in: Duration,
    },
}

/// Decide from the Lease's spec (None when the Lease does not exist).
pub(crate) fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return LeaseDecision::Acquire;
    }
    if holder == me {
        return LeaseDecision::Renew;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let Some(renewed) = renewed else {
        return LeaseDecision::Acquire;
    };
    let elapsed_ms = now
        .as_millisecond()
        .saturating_sub(renewed.as_millisecond());
    let left_ms = (duration.as_millis() as i64).saturating_sub(elapsed_ms);
    if left_ms <= 0 {
        LeaseDecision::Acquire
    } else {
        LeaseDecision::StandBy {
            holder,
            expires_in: Duration::from_millis(left_ms as u64),
        }
    }
}

/// The Lease spec after `me` acquires or renews it.
pub(crate) fn next_spec(
    current: Option<&LeaseSpec>,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(me);
    if !ours {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions =
            Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
    }
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(duration.as_secs().max(1) as i32);
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// A candidate for one Lease.
#[derive(Clone)]
pub(crate) struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    pub(crate) fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// One round: returns whether we hold the Lease afterwards. A lost write race is `false`,
    /// not an error.
    pub(crate) async fn try_once(&self) -> Result<bool, LeaderError> {
        self.round().await.map(|(held, _)| held)
    }

    /// One round; when standing by, also how long until the holder's Lease expires.
    async fn round(&self) -> Result<(bool, Option<Duration>), LeaderError> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(LeaderError::Kube)?;
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        match decide(spec, &self.identity, Timestamp::now()) {
            LeaseDecision::StandBy { expires_in, .. } => Ok((false, Some(expires_in))),
            LeaseDecision::Acquire | LeaseDecision::Renew => {
                let new = next_spec(spec, &self.identity, self.duration, Timestamp::now());
                let result = match lease {
                    Some(mut existing) => {
                        existing.spec = Some(new);
                        self.api
                            .replace(&self.name, &PostParams::default(), &existing)
                            .await
                    }
                    None => {
                        let fresh = Lease {
                            metadata: ObjectMeta {
                                name: Some(self.name.clone()),
                                ..Default::default()
                            },
                            spec: Some(new),
                        };
                        self.api.create(&PostParams::default(), &fresh).await
                    }
                };
                match result {
                    Ok(_) => Ok((true, None)),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok((false, None)),
                    Err(error) => Err(LeaderError::Kube(error)),
                }
            }
        }
    }

    /// Wait until we hold the Lease (`true`) or `shutdown` (`false`). API errors are retried:
    /// a standby must survive API server blips.
    pub(crate) async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let retry = self.duration / 3;
        loop {
            // Wake right after the holder's Lease would expire, so a dead leader is replaced
            // within one lease duration of its last renewal.
            let mut wait = retry;
            match self.round().await {
                Ok((true, _)) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return true;
                }
                Ok((false, Some(expires_in))) => {
                    wait = wait.min(expires_in + Duration::from_millis(50));
                }
                Ok((false, None)) => {}
                Err(error) => tracing::warn!(reason = error.reason(), %error, "lease round failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Keep renewing in the background. [`Leadership::lost`] fires when leadership is lost
    /// (someone else holds the Lease, or renewals failed for a whole lease duration);
    /// [`Leadership::step_down`] ends it on purpose.
    pub(crate) fn hold(self) -> Leadership {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(self.clone().renew(lost.clone(), stop.clone()));
        Leadership {
            elector: self,
            lost,
            stop,
            renewer,
        }
    }

    async fn renew(self, lost: CancellationToken, stop: CancellationToken) {
        let every = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match tokio::time::timeout(every, self.try_once()).await {
                Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "leadership lost to another replica");
                    lost.cancel();
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(reason = error.reason(), %error, "lease renewal failed")
                }
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
            if last_ok.elapsed() >= self.duration {
                tracing::error!(lease = %self.name, "could not renew the lease in time");
                lost.cancel();
                return;
            }
        }
    }

    /// Give the Lease up if we still hold it, so a standby takes over at once instead of
    /// waiting for it to expire. Best effort: on failure the Lease simply expires.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(error) => tracing::warn!(%error, "cannot release the lease; it will expire"),
        }
    }
}

/// A held Lease, renewed in the background until [`Leadership::step_down`].
pub(crate) struct Leadership {
    elector: LeaderElector,
    lost: CancellationToken,
    stop: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Fires when leadership was lost without stepping down.
    pub(crate) fn lost(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    /// Stop renewing, then release the Lease. Call it only once this replica has stopped
    /// reconciling: a standby may take over the moment the Lease is released. The renewer is
    /// stopped first so a renewal in flight cannot take the released Lease back. Bounded by
    /// one lease duration; past that the Lease expires on its own anyway.
    pub(crate) async fn step_down(self) {
        self.stop.cancel();
        let elector = self.elector;
        let renewer = self.renewer;
        let bounded = tokio::time::timeout(elector.duration, async {
            let _ = renewer.await;
            if !self.lost.is_cancelled() {
                elector.release().await;
            }
        });
        if bounded.await.is_err() {
            tracing::warn!(lease = %elector.name, "stepping down timed out; the lease will expire");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("valid")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(renewed))),
            acquire_time: Some(MicroTime(t(renewed))),
            lease_transitions: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn acquires_a_missing_or_released_lease() {
        assert_eq!(decide(None, "me", t(100)), LeaseDecision::Acquire);
        let mut released = held_by("other", 99);
        released.holder_identity = None;
        assert_eq!(
            decide(Some(&released), "me", t(100)),
            LeaseDecision::Acquire
        );
    }

    #[test]
    fn acquires_an_expired_lease() {
        let spec = held_by("other", 100);
        assert_eq!(decide(Some(&spec), "me", t(115)), LeaseDecision::Acquire);
        assert_eq!(decide(Some(&spec), "me", t(200)), LeaseDecision::Acquire);
    }

    #[test]
    fn renews_its_own_lease() {
        let spec = held_by("me", 100);
        assert_eq!(decide(Some(&spec), "me", t(105)), LeaseDecision::Renew);
        // Even when late: it is still ours until someone else takes it.
        assert_eq!(decide(Some(&spec), "me", t(500)), LeaseDecision::Renew);
    }

    #[test]
    fn stands_by_while_another_holder_is_fresh() {
        let spec = held_by("other", 100);
        assert_eq!(
            decide(Some(&spec), "me", t(110)),
            LeaseDecision::StandBy {
                holder: "other".to_string(),
                expires_in: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn next_spec_counts_transitions_only_on_takeover() {
        let theirs = held_by("other", 100);
        let taken = next_spec(Some(&theirs), "me", Duration::from_secs(15), t(120));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(t(120))));
        let renewed = next_spec(Some(&taken), "me", Duration::from_secs(15), t(125));
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t(120))));
        assert_eq!(renewed.renew_time, Some(MicroTime(t(125))));
        let fresh = next_spec(None, "me", Duration::from_secs(15), t(1));
        assert_eq!(fresh.lease_transitions, Some(0));
        assert_eq!(fresh.lease_duration_seconds, Some(15));
    }
}
