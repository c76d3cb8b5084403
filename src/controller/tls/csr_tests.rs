//! The approval decision over plain values, and what the signer issues.

use rcgen::{CertificateParams, KeyPair};
use x509_parser::extensions::GeneralName;

use super::*;

const AGENT: &str = "system:serviceaccount:ignis-system:ignis-agent";

/// A request as the agent on `bound` would make it for its own node.
fn facts(bound: &str) -> CsrFacts {
    let (request, _key) = request_for(bound).expect("request");
    CsrFacts {
        username: AGENT.to_string(),
        node_names: Some(vec![bound.to_string()]),
        usages: AGENT_USAGES.iter().map(|u| u.to_string()).collect(),
        request: request.into_bytes(),
    }
}

fn reason(decision: Decision) -> &'static str {
    match decision {
        Decision::Deny { reason, message } => {
            assert!(!message.is_empty());
            reason
        }
        Decision::Approve { node } => panic!("approved for {node}"),
    }
}

#[test]
fn the_agent_of_the_named_node_is_approved() {
    assert_eq!(
        decide(&facts("node-a"), AGENT),
        Decision::Approve {
            node: "node-a".into()
        }
    );
    // Usages in any order.
    let mut f = facts("node-a");
    f.usages.reverse();
    assert!(matches!(decide(&f, AGENT), Decision::Approve { .. }));
}

#[test]
fn a_request_naming_another_node_is_denied() {
    let mut f = facts("node-b");
    f.node_names = Some(vec!["node-a".into()]);
    assert_eq!(reason(decide(&f, AGENT)), "NodeMismatch");
}

#[test]
fn another_requester_is_denied() {
    for user in [
        "system:serviceaccount:ignis-system:ignis-controller",
        "system:serviceaccount:tenant:ignis-agent",
        "system:node:node-a",
        "",
    ] {
        let mut f = facts("node-a");
        f.username = user.into();
        assert_eq!(reason(decide(&f, AGENT)), "NotAgent", "{user}");
    }
}

#[test]
fn a_request_without_its_node_binding_is_denied() {
    for names in [None, Some(vec![]), Some(vec![String::new()])] {
        let mut f = facts("node-a");
        f.node_names = names.clone();
        assert_eq!(reason(decide(&f, AGENT)), "NoNodeBinding", "{names:?}");
    }
    let mut two = facts("node-a");
    two.node_names = Some(vec!["node-a".into(), "node-b".into()]);
    assert_eq!(reason(decide(&two, AGENT)), "NoNodeBinding");
}

#[test]
fn wrong_usages_are_denied() {
    for usages in [
        vec!["digital signature"],
        vec!["digital signature", "server auth", "client auth"],
        vec!["digital signature", "client auth"],
        vec!["server auth", "server auth"],
        vec![],
    ] {
        let mut f = facts("node-a");
        f.usages = usages.iter().map(|u| u.to_string()).collect();
        assert_eq!(reason(decide(&f, AGENT)), "WrongUsages", "{usages:?}");
    }
}

#[test]
fn garbage_requests_are_denied() {
    let valid = facts("node-a").request;
    let mut flipped = valid.clone();
    // A byte inside the base64 body: the request no longer parses or its signature fails.
    let at = flipped.len() / 2;
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    for request in [
        b"not a request".to_vec(),
        vec![0xff, 0xfe],
        Vec::new(),
        flipped,
    ] {
        let mut f = facts("node-a");
        f.request = request;
        assert_eq!(reason(decide(&f, AGENT)), "BadRequest");
    }
}

#[test]
fn other_names_and_key_types_are_denied() {
    let request = |names: Vec<String>, key: &KeyPair| {
        CertificateParams::new(names)
            .expect("params")
            .serialize_request(key)
            .and_then(|r| r.pem())
            .expect("request")
            .into_bytes()
    };
    let ecdsa = KeyPair::generate().expect("key");
    for names in [
        vec!["ignis-agent".to_string()],
        vec!["node-a".to_string()],
        vec![agent_server_name("node-a"), agent_server_name("node-b")],
        vec![agent_server_name("node-a"), "127.0.0.1".to_string()],
        vec![],
    ] {
        let mut f = facts("node-a");
        f.request = request(names.clone(), &ecdsa);
        assert_eq!(reason(decide(&f, AGENT)), "WrongName", "{names:?}");
    }
    let rsa_less = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
    let mut f = facts("node-a");
    f.request = request(vec![agent_server_name("node-a")], &rsa_less);
    assert!(
        matches!(decide(&f, AGENT), Decision::Approve { .. }),
        "P-384"
    );
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
    f.request = request(vec![agent_server_name("node-a")], &ed);
    assert!(
        matches!(decide(&f, AGENT), Decision::Approve { .. }),
        "Ed25519"
    );
}

#[test]
fn the_issued_certificate_is_ours_not_the_requests() {
    let ca = Ca::generate().expect("CA");
    // The request asks for more (a CA, client auth, other names): none of it is issued.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![agent_server_name("node-a")]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .expect("request");
    let pem = sign(&ca, request.as_bytes(), "node-a", Some(3600)).expect("signed");
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    let cert = parsed.parse_x509().expect("x509");
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).expect("pem");
    let ca_cert = ca_pem.parse_x509().expect("x509");
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the CA");
    assert!(!cert.is_ca());
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && !eku.client_auth);
    let san = cert
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    let names: Vec<_> = san.value.general_names.iter().collect();
    assert_eq!(
        names,
        [&GeneralName::DNSName("ignis-agent.node-a")],
        "only the node's name"
    );
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the request's key"
    );
    // An hour asked: an hour (plus the hour back for slow clocks); a week asked: a day.
    let life = |c: &x509_parser::certificate::X509Certificate| {
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    };
    assert_eq!(life(&cert), 2 * 3600);
    let pem = sign(&ca, request.as_bytes(), "node-a", Some(7 * 86_400)).expect("signed");
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    assert_eq!(life(&parsed.parse_x509().expect("x509")), 25 * 3600);
}
