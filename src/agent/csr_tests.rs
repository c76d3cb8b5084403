//! Renewal timing, and an agent serving a certificate issued through the CSR path, dialed by
//! the controller's pool as its own node and as another.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::{AgentConfig, ListenAddr, ServerTls, serve};
use crate::controller::agents::AgentTls;
use crate::controller::tls::Ca;
use crate::controller::tls::csr::{CsrFacts, Decision, decide, sign};

#[test]
fn renewal_is_due_at_two_thirds_of_the_life() {
    let issued = Issued {
        cert_pem: String::new(),
        key_pem: "secret".into(),
        not_before: 1_000,
        not_after: 1_000 + 90_000,
    };
    assert_eq!(renew_in(&issued, 1_000), Duration::from_secs(60_000));
    assert_eq!(renew_in(&issued, 61_000), Duration::ZERO);
    assert_eq!(renew_in(&issued, 100_000), Duration::ZERO, "overdue: now");
    assert!(
        !format!("{issued:?}").contains("secret"),
        "the key is not logged"
    );
}

/// GetHost on the agent at `port`, dialed the way the pool dials `node`.
async fn call_as(tls: &AgentTls, port: u16, node: &str) -> Result<(), String> {
    crate::agent::tls::tests::get_host_over(tls.config_for(node), port).await
}

#[tokio::test]
async fn the_controller_accepts_only_the_certificate_of_the_node_it_dials() {
    let ca = Ca::generate().expect("CA");
    // The agent of node-a: its own key and request, approved and signed as the signer does.
    let (request, key_pem) = request_for("node-a").expect("request");
    let agent = "system:serviceaccount:ignis-system:ignis-agent";
    let facts = CsrFacts {
        username: agent.into(),
        node_names: Some(vec!["node-a".into()]),
        usages: AGENT_USAGES.iter().map(|u| u.to_string()).collect(),
        request: request.clone().into_bytes(),
    };
    assert_eq!(
        decide(&facts, agent),
        Decision::Approve {
            node: "node-a".into()
        }
    );
    let cert_pem =
        sign(&ca, request.as_bytes(), "node-a", Some(AGENT_CSR_SECONDS)).expect("signed");
    let (not_before, not_after) = validity_of(&cert_pem).expect("validity");
    let tmp = tempfile::tempdir().expect("tmp");
    let client_ca = tmp.path().join("ca.crt");
    std::fs::write(&client_ca, &ca.cert_pem).expect("write");
    let mut config = AgentConfig::local(&tmp.path().join("state"));
    config.listen = ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"));
    config.tls = Some(ServerTls::Issued {
        issued: Issued {
            cert_pem,
            key_pem,
            not_before,
            not_after,
        },
        client_ca,
    });
    config.network = None;
    config.simulated = true;
    config.accelerator = crate::agent::AcceleratorFlag::Tcg;
    let shutdown = CancellationToken::new();
    let handle = serve(config, shutdown.clone()).await.expect("agent serves");
    let ListenAddr::Tcp(addr) = handle.listen else {
        panic!("tcp")
    };

    let (_tx, latest) = tokio::sync::watch::channel(ca.client_config().expect("client"));
    let per_node = AgentTls {
        latest: latest.clone(),
        per_node: true,
    };
    call_as(&per_node, addr.port(), "node-a")
        .await
        .expect("node-a's agent is reached as node-a");
    let refused = call_as(&per_node, addr.port(), "node-b").await;
    assert!(
        refused.is_err(),
        "node-a's certificate was accepted from node-b's address"
    );
    // The shared name is not in a per-node certificate either.
    let shared = AgentTls {
        latest,
        per_node: false,
    };
    assert!(call_as(&shared, addr.port(), "node-a").await.is_err());

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle.wait()).await;
}
