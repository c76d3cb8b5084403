//! Rotating the controller-managed CA with overlap, so no party ever meets a certificate it
//! does not trust.
//!
//! The CA Secret ([`CA_SECRET`](super::CA_SECRET)) holds the CA that signs (`ca.crt`,
//! `ca.key`) and, during a rotation, one more trusted CA:
//! 1. **Adding**: a new CA (`next.crt`, `next.key`) joins the trust bundle; leaves are still
//!    signed by the old one.
//! 2. **Reissued**: once every party has had [`OVERLAP`] to load the bundle, the new CA
//!    signs and the leaves are re-issued under it; the old certificate (`previous.crt`, its
//!    key dropped) stays in the bundle.
//! 3. **Stable** again: after another [`OVERLAP`], the old CA leaves the bundle.
//!
//! A rotation begins when the signing CA is past [`ROTATE_AT_PERCENT`] of its life, or when an
//! admin sets [`ROTATE_ANNOTATION`] on the Secret (the controller removes it as it begins).
//! The phase's start is kept in [`SINCE_ANNOTATION`].

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use super::{Ca, TlsError, text};

/// Set by an admin on the CA Secret (any value) to rotate the CA now.
pub const ROTATE_ANNOTATION: &str = "ignis.dev/rotate-ca";
/// When the current rotation phase began (Unix seconds).
pub const SINCE_ANNOTATION: &str = "ignis.dev/ca-phase-since";
/// The incoming CA during the first phase of a rotation.
pub const NEXT_CERT: &str = "next.crt";
pub const NEXT_KEY: &str = "next.key";
/// The outgoing CA's certificate during the second phase (its key is gone by then).
pub const PREVIOUS_CERT: &str = "previous.crt";
/// How long each phase lasts at least: long enough for the kubelet to refresh the agents'
/// mounted Secret (its sync period and Secret cache, about two minutes), for the agents to
/// notice and restart (10 s), and for every controller replica to reload the Secret (it
/// checks every [`RENEW_CHECK_INTERVAL`](super::RENEW_CHECK_INTERVAL), 10 minutes).
pub const OVERLAP: i64 = 15 * 60;
/// A CA is replaced once this share of its life has passed.
pub const ROTATE_AT_PERCENT: i64 = 80;

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One CA, trusted and signing.
    Stable,
    /// A new CA is trusted too, the old one still signs.
    Adding,
    /// The new CA signs, the old one is still trusted.
    Reissued,
}

/// What the next rotation step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add a new CA to the bundle.
    Begin,
    /// Sign with the new CA.
    Reissue,
    /// Drop the old CA.
    Finish,
}

/// The facts a rotation step is decided from (seconds since the epoch).
#[derive(Clone, Copy, Debug)]
pub struct RotationView {
    pub phase: Phase,
    /// When the phase began (None: unknown, counted as now so the overlap is kept).
    pub since: Option<i64>,
    /// The signing CA's validity.
    pub not_before: i64,
    pub not_after: i64,
    /// An admin asked for a rotation.
    pub requested: bool,
}

/// The step to take at `now`, if any.
pub fn next_step(view: &RotationView, now: i64) -> Option<Step> {
    let waited = view
        .since
        .is_some_and(|since| now >= since.saturating_add(OVERLAP));
    match view.phase {
        Phase::Stable => {
            let life = view.not_after.saturating_sub(view.not_before).max(0);
            let aged = now
                >= view
                    .not_before
                    .saturating_add(life / 100 * ROTATE_AT_PERCENT);
            (aged || view.requested).then_some(Step::Begin)
        }
        Phase::Adding => waited.then_some(Step::Reissue),
        Phase::Reissued => waited.then_some(Step::Finish),
    }
}

/// The managed CAs: the one that signs and, during a rotation, the incoming or outgoing one.
pub struct CaSet {
    pub signing: Ca,
    pub incoming: Option<Ca>,
    pub outgoing: Option<String>,
}

impl CaSet {
    pub fn new(signing: Ca) -> CaSet {
        CaSet {
            signing,
            incoming: None,
            outgoing: None,
        }
    }

    /// The CAs stored in `secret`'s data.
    pub fn from_data(secret: &str, data: &BTreeMap<String, ByteString>) -> Result<CaSet, TlsError> {
        let signing = Ca::from_data(secret, data)?;
        let incoming = if data.contains_key(NEXT_CERT) {
            let next = BTreeMap::from([
                (super::CA_CERT.to_string(), data[NEXT_CERT].clone()),
                (
                    super::CA_KEY.to_string(),
                    ByteString(text(secret, data, NEXT_KEY)?.into_bytes()),
                ),
            ]);
            Some(Ca::from_data(secret, &next)?)
        } else {
            None
        };
        let outgoing = data
            .contains_key(PREVIOUS_CERT)
            .then(|| text(secret, data, PREVIOUS_CERT))
            .transpose()?;
        Ok(CaSet {
            signing,
            incoming,
            outgoing,
        })
    }

    /// The CA Secret's data.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = self.signing.secret_data();
        if let Some(next) = &self.incoming {
            let next = next.secret_data();
            data.insert(NEXT_CERT.into(), next[super::CA_CERT].clone());
            data.insert(NEXT_KEY.into(), next[super::CA_KEY].clone());
        }
        if let Some(previous) = &self.outgoing {
            data.insert(
                PREVIOUS_CERT.into(),
                ByteString(previous.clone().into_bytes()),
            );
        }
        data
    }

    pub fn phase(&self) -> Phase {
        match (&self.incoming, &self.outgoing) {
            (Some(_), _) => Phase::Adding,
            (None, Some(_)) => Phase::Reissued,
            (None, None) => Phase::Stable,
        }
    }

    /// Every CA a party must trust now: the signing one first.
    pub fn bundle(&self) -> String {
        let mut bundle = self.signing.cert_pem.clone();
        for pem in self
            .incoming
            .iter()
            .map(|ca| ca.cert_pem.as_str())
            .chain(self.outgoing.as_deref())
        {
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(pem);
        }
        bundle
    }

    /// The facts for [`next_step`].
    pub fn view(&self, since: Option<i64>, requested: bool) -> RotationView {
        let (not_before, not_after) = super::validity_of(&self.signing.cert_pem).unwrap_or((0, 0));
        RotationView {
            phase: self.phase(),
            since,
            not_before,
            not_after,
            requested,
        }
    }

    /// Take `step`.
    pub fn apply(&mut self, step: Step) -> Result<(), TlsError> {
        match step {
            Step::Begin => self.incoming = Some(Ca::generate()?),
            Step::Reissue => {
                if let Some(next) = self.incoming.take() {
                    let old = std::mem::replace(&mut self.signing, next);
                    self.outgoing = Some(old.cert_pem);
                }
            }
            Step::Finish => self.outgoing = None,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: i64 = 365 * 86_400;

    fn view(phase: Phase, since: Option<i64>, requested: bool) -> RotationView {
        RotationView {
            phase,
            since,
            not_before: 0,
            not_after: 10 * YEAR,
            requested,
        }
    }

    #[test]
    fn a_stable_ca_rotates_at_four_fifths_of_its_life_or_when_asked() {
        let stable = view(Phase::Stable, None, false);
        assert_eq!(next_step(&stable, YEAR), None);
        assert_eq!(next_step(&stable, 8 * YEAR - 1), None);
        assert_eq!(next_step(&stable, 8 * YEAR), Some(Step::Begin));
        assert_eq!(next_step(&stable, 11 * YEAR), Some(Step::Begin));
        let asked = view(Phase::Stable, None, true);
        assert_eq!(next_step(&asked, YEAR), Some(Step::Begin));
    }

    #[test]
    fn each_phase_waits_the_overlap_and_an_unknown_start_waits() {
        for (phase, step) in [
            (Phase::Adding, Step::Reissue),
            (Phase::Reissued, Step::Finish),
        ] {
            let since = 1_000;
            let v = view(phase, Some(since), true);
            assert_eq!(next_step(&v, since), None, "{phase:?} just began");
            assert_eq!(next_step(&v, since + OVERLAP - 1), None, "{phase:?}");
            assert_eq!(next_step(&v, since + OVERLAP), Some(step), "{phase:?}");
            assert_eq!(next_step(&view(phase, None, false), 20 * YEAR), None);
        }
    }

    #[test]
    fn the_steps_walk_the_phases_and_the_bundle_follows() {
        let first = Ca::generate().expect("CA");
        let old = first.cert_pem.clone();
        let mut set = CaSet::new(first);
        assert_eq!(set.phase(), Phase::Stable);
        assert_eq!(set.bundle(), old);

        set.apply(Step::Begin).expect("begin");
        assert_eq!(set.phase(), Phase::Adding);
        let new = set.incoming.as_ref().expect("incoming").cert_pem.clone();
        assert_eq!(set.signing.cert_pem, old, "the old CA still signs");
        assert!(set.bundle().contains(&old) && set.bundle().contains(&new));
        // The Secret carries the phase across restarts and replicas.
        let reloaded = CaSet::from_data("ignis-ca", &set.secret_data()).expect("reload");
        assert_eq!(reloaded.phase(), Phase::Adding);
        assert_eq!(reloaded.bundle(), set.bundle());

        set.apply(Step::Reissue).expect("reissue");
        assert_eq!(set.phase(), Phase::Reissued);
        assert_eq!(set.signing.cert_pem, new, "the new CA signs");
        assert!(set.bundle().contains(&old) && set.bundle().contains(&new));
        let data = set.secret_data();
        assert!(!data.contains_key(NEXT_KEY));
        assert_eq!(
            data[super::super::CA_KEY],
            set.signing.secret_data()[super::super::CA_KEY]
        );
        let reloaded = CaSet::from_data("ignis-ca", &data).expect("reload");
        assert_eq!(reloaded.phase(), Phase::Reissued);

        set.apply(Step::Finish).expect("finish");
        assert_eq!(set.phase(), Phase::Stable);
        assert_eq!(set.bundle(), new);
        assert_eq!(
            set.secret_data()
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [super::super::CA_CERT, super::super::CA_KEY]
        );
    }

    #[test]
    fn a_fresh_ca_is_read_as_ten_years_and_not_due() {
        let set = CaSet::new(Ca::generate().expect("CA"));
        let v = set.view(None, false);
        assert!(v.not_after - v.not_before > 9 * YEAR);
        let now = jiff::Timestamp::now().as_second();
        assert_eq!(next_step(&v, now), None);
        assert_eq!(next_step(&set.view(None, true), now), Some(Step::Begin));
    }
}
