//! Unit tests of the managed CA and the agents' Secret.

use super::*;
use crate::error::ErrorReason;

#[test]
fn agent_certificates_live_a_day_and_are_renewed_after_two_thirds() {
    let ca = Ca::generate().expect("CA");
    let data = ca.agent_secret_data().expect("agent data");
    let (_, leaf) = x509_parser::pem::parse_x509_pem(&data[TLS_CERT].0).expect("pem");
    let leaf = leaf.parse_x509().expect("x509");
    let now = jiff::Timestamp::now().as_second();
    let not_after = leaf.validity().not_after.timestamp();
    let hours_left = (not_after - now) / 3600;
    assert!(
        (23..=24).contains(&hours_left),
        "valid {hours_left} more hours"
    );
    assert!(ca.agent_data_is_current(&data), "fresh");
    // A day-long certificate: current for 16 hours, then renewed.
    let day = 86_400;
    assert!(!due_for_renewal(0, day, day / 2));
    assert!(!due_for_renewal(0, day, day * 2 / 3 - 1));
    assert!(due_for_renewal(0, day, day * 2 / 3));
    assert!(due_for_renewal(0, day, day + 1));
}

#[test]
fn the_agents_data_holds_no_ca_key_and_fits_its_ca() {
    let ca = Ca::generate().expect("CA");
    let data = ca.agent_secret_data().expect("agent data");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        [CA_CERT, TLS_CERT, TLS_KEY]
    );
    assert!(!data.contains_key(CA_KEY));
    assert!(ca.agent_data_is_current(&data));
    assert!(ca.client_config().is_ok());
}

#[test]
fn the_ca_survives_a_round_trip_through_its_secret() {
    let ca = Ca::generate().expect("CA");
    let again = Ca::from_data(CA_SECRET, &ca.secret_data()).expect("reload");
    assert_eq!(again.cert_pem, ca.cert_pem);
    // A certificate issued by the reloaded CA still chains to the stored certificate.
    let data = again.agent_secret_data().expect("agent data");
    assert!(ca.agent_data_is_current(&data));
}

#[test]
fn stale_or_foreign_agent_data_is_rewritten() {
    let ca = Ca::generate().expect("CA");
    let other = Ca::generate().expect("another CA");
    let mut old_layout = ca.agent_secret_data().expect("data");
    old_layout.insert(CA_KEY.into(), ByteString(ca.key_pem.clone().into_bytes()));
    assert!(!ca.agent_data_is_current(&old_layout), "holds the CA key");
    let foreign = other.agent_secret_data().expect("data");
    assert!(!ca.agent_data_is_current(&foreign), "another CA");
    let mut mixed = ca.agent_secret_data().expect("data");
    mixed.insert(TLS_CERT.into(), foreign[TLS_CERT].clone());
    assert!(
        !ca.agent_data_is_current(&mixed),
        "certificate of another CA"
    );
    let mut partial = ca.agent_secret_data().expect("data");
    partial.remove(TLS_KEY);
    assert!(!ca.agent_data_is_current(&partial), "no key");
}

#[test]
fn the_controller_certificate_is_made_again_when_due_or_when_its_source_changed() {
    let ca = Ca::generate().expect("CA");
    let (_, minted) = make(&Seen::Managed(Box::new(CaSet::new(
        Ca::from_data(CA_SECRET, &ca.secret_data()).expect("reload"),
    ))))
    .expect("minted");
    let ClientSource::Minted {
        not_before,
        not_after,
        ..
    } = minted.clone()
    else {
        panic!("minted from the CA: {minted:?}");
    };
    let hours = i64::try_from(CONTROLLER_CERT_HOURS).expect("hours");
    assert_eq!(
        not_after - not_before,
        hours * 3600 + 3600,
        "a day and the hour back"
    );
    let same = Seen::Managed(Box::new(CaSet::new(
        Ca::from_data(CA_SECRET, &ca.secret_data()).expect("reload"),
    )));
    assert!(!remake(&minted, &same, not_before + 3600), "fresh, same CA");
    let two_thirds = not_before + (not_after - not_before) / 3 * 2;
    assert!(remake(&minted, &same, two_thirds), "two thirds of its life");
    let rotated = Seen::Managed(Box::new(CaSet::new(Ca::generate().expect("new CA"))));
    assert!(remake(&minted, &rotated, not_before + 3600), "another CA");
    let mut adding = CaSet::from_data(CA_SECRET, &ca.secret_data()).expect("reload");
    adding.apply(rotation::Step::Begin).expect("begin");
    let adding = Seen::Managed(Box::new(adding));
    assert!(
        remake(&minted, &adding, not_before + 3600),
        "a CA joined the bundle"
    );

    let data = ca.agent_secret_data().expect("data");
    let own = ClientSource::Own(data.clone());
    assert!(!remake(&own, &Seen::Own(data.clone()), 0), "unchanged");
    let mut renewed = data.clone();
    renewed.insert(TLS_CERT.into(), ByteString(b"renewed".to_vec()));
    assert!(remake(&own, &Seen::Own(renewed), 0), "the user renewed it");
    assert!(remake(&own, &same, 0), "the user's Secret was removed");
    assert!(
        remake(&minted, &Seen::Own(data), 0),
        "the user's Secret appeared"
    );
}

#[test]
fn missing_keys_are_named() {
    let Err(error) = Ca::from_data("ignis-ca", &BTreeMap::new()) else {
        panic!("a CA without keys was accepted");
    };
    assert_eq!(error.reason(), "TlsSecretIncomplete");
    assert!(error.to_string().contains("ca.crt"), "{error}");
    let Err(error) = client_config_from_data(CLIENT_SECRET, &BTreeMap::new()) else {
        panic!("a client Secret without keys was accepted");
    };
    assert_eq!(error.reason(), "TlsSecretIncomplete");
}

#[test]
fn in_csr_mode_the_agents_data_holds_no_key_and_follows_the_signing_ca() {
    let mut cas = CaSet::new(Ca::generate().expect("CA"));
    let data = cas.agent_secret_data_for(ServingCert::Csr).expect("data");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        [CA_CERT, SIGNER_CERT],
        "no key, no shared certificate"
    );
    assert!(cas.agent_data_is_current_for(ServingCert::Csr, &data));
    assert_eq!(agent_secret_type(ServingCert::Csr), "Opaque");
    // Files-mode data is rewritten when switching to CSR mode, and back.
    let files = cas.agent_secret_data_for(ServingCert::Files).expect("data");
    assert!(!cas.agent_data_is_current_for(ServingCert::Csr, &files));
    assert!(!cas.agent_data_is_current_for(ServingCert::Files, &data));
    // Every rotation step changes the agents' Secret, so every agent restarts; from Reissue
    // on, signer.crt names the new CA, which then signs the agents' new requests.
    let mut seen = vec![data];
    for step in rotation_steps() {
        let old_signer = cas.signing.cert_pem.clone();
        cas.apply(step).expect("step");
        let now = cas.agent_secret_data_for(ServingCert::Csr).expect("data");
        assert!(
            seen.iter().all(|before| *before != now),
            "{step:?} changed nothing"
        );
        assert!(!cas.agent_data_is_current_for(ServingCert::Csr, &seen[seen.len() - 1]));
        assert_eq!(now[SIGNER_CERT].0, cas.signing.cert_pem.as_bytes());
        if step == rotation::Step::Reissue {
            assert_ne!(cas.signing.cert_pem, old_signer, "the new CA signs");
        }
        seen.push(now);
    }
}
