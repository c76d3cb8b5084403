//! Outbound NAT for the node's range: one nftables table of Ignis' own (`ip ignis`), so
//! setting it up is one atomic transaction and cleaning it up is one `delete table`, and no
//! rule of anyone else (Docker, kube-proxy, firewalld) is ever touched.
//!
//! Rules are built as typed values with the `nftables` crate and handed to `nft -j` in one
//! batch; the kernel applies a batch all or nothing. The same table holds the filter chains of
//! [`super::guard`] (what guests may reach on the node), and `bridge ignis` its anti-spoofing.

use std::borrow::Cow;
use std::time::Duration;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use thiserror::Error;

use super::guard::{self, GuestAccess};

/// The nftables table Ignis owns (family `ip`).
pub(crate) const TABLE: &str = "ignis";
const POSTROUTING: &str = "postrouting";
/// `srcnat`: the standard priority of source NAT.
const SRCNAT_PRIORITY: i32 = 100;
/// Deadline for one `nft` run.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors programming nftables.
#[derive(Debug, Error)]
pub enum NatError {
    #[error("nftables {operation} failed (is `nft` installed and nf_tables available?)")]
    Nft {
        operation: &'static str,
        #[source]
        source: nftables::helper::NftablesError,
    },
    #[error("nftables {operation} did not finish within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        handle: None,
    }
}

fn ip_prefix_match(field: &'static str, range: Ipv4Net, op: Operator) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: Cow::Borrowed("ip"),
                field: Cow::Borrowed(field),
            },
        ))),
        right: Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(Cow::Owned(range.network().to_string()))),
            len: u32::from(range.prefix_len()),
        })),
        op,
    })
}

/// The transaction that (re)creates the table: `add` first so the `delete` never fails, then
/// `delete` to drop whatever an older agent left in it, then the fresh content.
pub(crate) fn setup_batch(range: Ipv4Net) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(POSTROUTING),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(SRCNAT_PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    // Guests talking to each other or to the node keep their addresses; only traffic that
    // leaves the range is masqueraded behind the node's address.
    batch.add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(POSTROUTING),
        expr: Cow::Owned(vec![
            ip_prefix_match("saddr", range, Operator::EQ),
            ip_prefix_match("daddr", range, Operator::NEQ),
            Statement::Masquerade(None),
        ]),
        comment: Some(Cow::Borrowed("ignis: outbound NAT for guests")),
        ..Rule::default()
    }));
    batch.to_nftables()
}

/// [`setup_batch`] plus the guests' filter chains on `bridge` ([`guard::filter_commands`]).
pub(crate) fn full_setup(range: Ipv4Net, bridge: &str, access: &GuestAccess) -> serde_json::Value {
    let mut v = serde_json::to_value(setup_batch(range)).unwrap_or_default();
    if let Some(cmds) = v["nftables"].as_array_mut() {
        let gateway = super::ipam::gateway_of(range.trunc());
        cmds.extend(guard::filter_commands(TABLE, bridge, gateway, access));
    }
    v
}

/// The transaction that removes our tables (NAT and filter, anti-spoofing) if they exist.
pub(crate) fn teardown_batch() -> serde_json::Value {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    let mut v = serde_json::to_value(batch.to_nftables()).unwrap_or_default();
    let guard = serde_json::json!({"table": {"family": "bridge", "name": guard::TABLE}});
    if let Some(cmds) = v["nftables"].as_array_mut() {
        cmds.push(serde_json::json!({ "add": guard }));
        cmds.push(serde_json::json!({ "delete": guard }));
    }
    v
}

pub(crate) async fn apply(
    operation: &'static str,
    ruleset: &serde_json::Value,
) -> Result<(), NatError> {
    let payload = ruleset.to_string();
    let run = nftables::helper::apply_ruleset_raw_async::<str, str, _>(&payload, None, []);
    match tokio::time::timeout(NFT_TIMEOUT, run).await {
        Ok(result) => result
            .map(|_| ())
            .map_err(|source| NatError::Nft { operation, source }),
        Err(_) => Err(NatError::Timeout {
            operation,
            timeout: NFT_TIMEOUT,
        }),
    }
}

/// Install (or refresh) the masquerade rule for `range` and the guests' filter on `bridge`.
pub(crate) async fn ensure(
    range: Ipv4Net,
    bridge: &str,
    access: &GuestAccess,
) -> Result<(), NatError> {
    apply("setup", &full_setup(range, bridge, access)).await
}

/// Remove Ignis' tables with everything in them.
pub(crate) async fn teardown() -> Result<(), NatError> {
    apply("teardown", &teardown_batch()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_is_one_idempotent_transaction_in_our_table() {
        let json =
            serde_json::to_value(setup_batch("10.88.0.0/16".parse().expect("cidr"))).expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        let verbs: Vec<&str> = cmds
            .iter()
            .filter_map(|c| c.as_object()?.keys().next().map(String::as_str))
            .collect();
        assert_eq!(verbs, ["add", "delete", "add", "add", "add"]);
        for c in cmds {
            let obj = c.as_object().and_then(|o| o.values().next()).expect("obj");
            let inner = obj
                .as_object()
                .and_then(|o| o.values().next())
                .expect("inner");
            let table = inner.get("table").or(inner.get("name")).expect("table");
            assert_eq!(table, TABLE);
            assert_eq!(inner["family"], "ip");
        }
        let rule = &cmds[4]["add"]["rule"];
        let text = rule["expr"].to_string();
        assert!(text.contains(r#""addr":"10.88.0.0","len":16"#), "{text}");
        assert!(text.contains(r#""op":"!=""#), "{text}");
        assert!(text.contains("masquerade"), "{text}");
        assert_eq!(cmds[3]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(cmds[3]["add"]["chain"]["type"], "nat");
    }

    #[test]
    fn teardown_never_fails_on_a_missing_table() {
        let json = teardown_batch();
        assert_eq!(
            json["nftables"][0]["add"]["table"]["name"],
            serde_json::json!(TABLE)
        );
        assert_eq!(
            json["nftables"][1]["delete"]["table"]["name"],
            serde_json::json!(TABLE)
        );
        assert_eq!(json["nftables"][3]["delete"]["table"]["family"], "bridge");
    }

    #[test]
    fn setup_closes_the_node_to_guests_by_default() {
        let v = full_setup(
            "10.88.0.0/16".parse().expect("cidr"),
            "ignis0",
            &GuestAccess::default(),
        );
        let text = v.to_string();
        assert!(text.contains("masquerade"), "{text}");
        assert!(text.contains(r#""hook":"input""#), "{text}");
        assert!(text.contains("169.254.0.0"), "{text}");
    }
}
