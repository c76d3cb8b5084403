//! Status conditions: kstatus-compatible types, machine-matchable reasons, and the one
//! function that updates a condition list without faking transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types Ignis writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ConditionType {
    /// The VM has a node.
    Scheduled,
    /// The guest passed its readiness check.
    Ready,
    /// kstatus: the controller is still converging on the latest generation.
    Reconciling,
    /// kstatus: the controller cannot make progress without a change from the user.
    Stalled,
    /// The VM is saved on its node's disk (True), or the last suspend or resume did not go
    /// as asked (False, with why).
    Suspended,
}

impl ConditionType {
    /// The `type` string in the condition list.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConditionType::Scheduled => "Scheduled",
            ConditionType::Ready => "Ready",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
            ConditionType::Suspended => "Suspended",
        }
    }
}

/// Condition reasons: stable CamelCase words a program can match on.
pub(crate) struct Reason;

impl Reason {
    pub(crate) const PLACED: &'static str = "Placed";
    pub(crate) const UNSCHEDULABLE: &'static str = "Unschedulable";
    pub(crate) const PENDING: &'static str = "Pending";
    pub(crate) const STARTING: &'static str = "Starting";
    pub(crate) const PULLING_IMAGE: &'static str = "PullingImage";
    pub(crate) const GUEST_READY: &'static str = "GuestReady";
    pub(crate) const GUEST_EXITED: &'static str = "GuestExited";
    pub(crate) const GUEST_FAILED: &'static str = "GuestFailed";
    pub(crate) const STOPPING: &'static str = "Stopping";
    pub(crate) const AGENT_UNREACHABLE: &'static str = "AgentUnreachable";
    pub(crate) const NODE_MISMATCH: &'static str = "NodeNoLongerMatches";
    pub(crate) const RECONCILED: &'static str = "Reconciled";
    pub(crate) const PROGRESSING: &'static str = "Progressing";
    pub(crate) const SUSPENDING: &'static str = "Suspending";
    pub(crate) const SUSPENDED: &'static str = "Suspended";
    pub(crate) const RESUMING: &'static str = "Resuming";
    pub(crate) const CLAIMED: &'static str = "Claimed";
}

/// Set `type_` to the given status, reason and message.
///
/// `lastTransitionTime` moves only when the status itself changes: a new reason or message
/// with the same status is an update, not a transition. Returns whether anything changed.
#[cfg(test)]
#[cfg(test)]
pub(crate) fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    set_condition_status(
        conditions,
        type_,
        if status { "True" } else { "False" },
        reason,
        message,
        observed_generation,
        now,
    )
}

/// Like [`set_condition`], for the tri-state `Unknown`.
pub(crate) fn set_condition_status(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_.as_str()) {
        Some(existing) => {
            let transition = existing.status != status;
            let changed = transition
                || existing.reason != reason
                || existing.message != message
                || existing.observed_generation != observed_generation;
            if transition {
                existing.last_transition_time = now;
                existing.status = status.to_string();
            }
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.as_str().to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// Find a condition by type.
pub(crate) fn find_condition(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            false,
            Reason::STARTING,
            "booting",
            Some(1),
            at(10)
        ));
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            false,
            Reason::STARTING,
            "still booting",
            Some(1),
            at(20)
        ));
        assert_eq!(conds[0].last_transition_time, at(10));
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            true,
            Reason::GUEST_READY,
            "booted",
            Some(1),
            at(30)
        ));
        assert_eq!(conds[0].last_transition_time, at(30));
        assert_eq!(conds[0].status, "True");
    }

    #[test]
    fn identical_update_reports_no_change() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            ConditionType::Scheduled,
            true,
            Reason::PLACED,
            "node-a",
            Some(2),
            at(1),
        );
        assert!(!set_condition(
            &mut conds,
            ConditionType::Scheduled,
            true,
            Reason::PLACED,
            "node-a",
            Some(2),
            at(5)
        ));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn unknown_is_a_transition() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            ConditionType::Ready,
            true,
            Reason::GUEST_READY,
            "ok",
            Some(1),
            at(1),
        );
        set_condition_status(
            &mut conds,
            ConditionType::Ready,
            "Unknown",
            Reason::AGENT_UNREACHABLE,
            "agent gone",
            Some(1),
            at(9),
        );
        let c = find_condition(&conds, ConditionType::Ready).expect("ready condition");
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.clone()),
            ("Unknown", at(9))
        );
    }
}
