//! A CA rotation with overlap, over real mutual-TLS connections (rustls through tonic, the
//! agent's own server): a new CA is added to both sides' trust bundle, then the leaf
//! certificates are re-issued under it, then the old CA is removed. The controller reaches the
//! agent at every step, in either order of the leaves; skipping the overlap breaks it.

use std::time::Duration;

use rcgen::ExtendedKeyUsagePurpose;

use super::tests::{call, pem, serve_tls};
use crate::controller::tls::{CA_CERT, CONTROLLER_NAME, Ca, CaSet, TLS_CERT, TLS_KEY};

/// One side's TLS material: its leaf (cert, key) and the CAs it trusts.
#[derive(Clone)]
struct Side {
    leaf: (String, String),
    trusts: String,
}

/// The agent serving with `agent`'s material; GetHost called with `controller`'s. Ok when
/// the call was answered. Each call is a fresh agent, as a restarted agent pod is.
async fn reaches(agent: &Side, controller: &Side) -> Result<(), String> {
    let tmp = tempfile::tempdir().expect("tmp");
    let (served, port, shutdown) =
        serve_tls(tmp.path(), &agent.leaf.0, &agent.leaf.1, &agent.trusts).await;
    let result = call(port, &controller.trusts, Some(controller.leaf.clone())).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), served.wait()).await;
    result
}

fn agent_leaf(ca: &Ca) -> (String, String) {
    let data = ca.agent_secret_data().expect("agents' data");
    (pem(&data, TLS_CERT), pem(&data, TLS_KEY))
}

fn controller_leaf(ca: &Ca) -> (String, String) {
    ca.issue(CONTROLLER_NAME, ExtendedKeyUsagePurpose::ClientAuth)
        .expect("controller cert")
}

#[tokio::test]
async fn a_ca_rotation_with_overlap_never_breaks_mutual_tls() {
    let old = Ca::generate().expect("old CA");
    let new = Ca::generate().expect("new CA");
    let both = format!("{}{}", old.cert_pem, new.cert_pem);
    let side = |leaf: (String, String), trusts: &str| Side {
        leaf,
        trusts: trusts.to_string(),
    };

    // Every state the two sides pass through, in the order the rotation writes them: either
    // side may lag one step behind the other (an agent restarts when the kubelet refreshes
    // its Secret; the controller when it reloads), so each step is checked against the
    // previous and the next state of the other side.
    let agent = [
        side(agent_leaf(&old), &old.cert_pem),
        side(agent_leaf(&old), &both),
        side(agent_leaf(&new), &both),
        side(agent_leaf(&new), &new.cert_pem),
    ];
    let controller = [
        side(controller_leaf(&old), &old.cert_pem),
        side(controller_leaf(&old), &both),
        side(controller_leaf(&new), &both),
        side(controller_leaf(&new), &new.cert_pem),
    ];
    for (a, agent_side) in agent.iter().enumerate() {
        for (c, controller_side) in controller.iter().enumerate() {
            if a.abs_diff(c) > 1 {
                continue;
            }
            reaches(agent_side, controller_side)
                .await
                .unwrap_or_else(|e| panic!("agent at step {a}, controller at step {c}: {e}"));
        }
    }

    // Without the overlap (straight from the old CA to the new), whichever side moves first
    // is cut off from the other.
    let cut = reaches(&agent[3], &controller[0]).await;
    assert!(
        cut.is_err(),
        "a new-CA agent accepted an old-only controller"
    );
    let cut = reaches(&agent[0], &controller[3]).await;
    assert!(
        cut.is_err(),
        "an old-CA agent was reached by a new-only controller"
    );
    // Once the old CA is gone, what it issued is refused.
    let stale = side(controller_leaf(&old), &both);
    let refused = reaches(&agent[3], &stale).await;
    assert!(refused.is_err(), "a leaf of the removed CA was accepted");
}

/// The controller's own rotation ([`CaSet`] stepped as the controller steps it, its Secrets
/// reloaded at every step as another replica or a restarted controller would): the agents'
/// Secret and the controller's client config it produces at each step reach each other, one
/// step apart either way.
#[tokio::test]
async fn the_controllers_ca_rotation_keeps_agents_reachable_through_every_step() {
    use crate::controller::tls::CA_SECRET;
    use crate::controller::tls::rotation_steps;

    let mut cas = CaSet::new(Ca::generate().expect("CA"));
    let first_ca = cas.signing.cert_pem.clone();
    let mut agent = Vec::new();
    let mut controller = Vec::new();
    for step in [None].into_iter().chain(rotation_steps().map(Some)) {
        if let Some(step) = step {
            cas.apply(step).expect("step");
            cas = CaSet::from_data(CA_SECRET, &cas.secret_data()).expect("reload");
        }
        let data = cas.agent_secret_data().expect("agents' data");
        agent.push(Side {
            leaf: (pem(&data, TLS_CERT), pem(&data, TLS_KEY)),
            trusts: pem(&data, CA_CERT),
        });
        controller.push(Side {
            leaf: controller_leaf(&cas.signing),
            trusts: cas.bundle(),
        });
    }
    assert_eq!(agent.len(), 4, "stable, adding, reissued, stable");
    assert_ne!(cas.signing.cert_pem, first_ca, "the CA was replaced");
    for (a, agent_side) in agent.iter().enumerate() {
        for (c, controller_side) in controller.iter().enumerate() {
            if a.abs_diff(c) > 1 {
                continue;
            }
            reaches(agent_side, controller_side)
                .await
                .unwrap_or_else(|e| panic!("agent at step {a}, controller at step {c}: {e}"));
        }
    }
    // Two steps apart (a party that missed a whole phase) is where the overlap ends.
    assert!(reaches(&agent[3], &controller[0]).await.is_err());
    assert!(reaches(&agent[0], &controller[3]).await.is_err());
}
