use super::*;

fn writer(manager: &str) -> Writer<'_> {
    Writer {
        manager,
        subresource: None,
        api_version: "v1",
        now: "t",
    }
}

fn owners(obj: &Value) -> Vec<(String, String, Value)> {
    entries(obj)
        .into_iter()
        .map(|e| (e.manager, e.operation, e.fields.to_fields_v1()))
        .collect()
}

/// The sequence the real server was observed to answer (kube-apiserver 1.34): a forced apply
/// takes the field, a second applier of the same value shares it, an update steals it.
#[test]
fn apply_conflicts_force_and_share_like_the_real_server() {
    let cm = |a: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": a, "b": "2"}});
    let live = apply(&json!({}), &cm("1"), writer("one"), false, None).expect("first apply");
    let conflicts = apply(&live, &cm("9"), writer("two"), false, None).expect_err("conflict");
    assert_eq!(conflicts, [("one".to_string(), ".data.a".to_string())]);
    let live = apply(&live, &cm("9"), writer("two"), true, None).expect("forced");
    let live = apply(&live, &cm("9"), writer("three"), false, None).expect("same value");
    let ab = json!({"f:data": {"f:a": {}, "f:b": {}}});
    assert_eq!(
        owners(&live),
        [
            ("one".into(), "Apply".into(), json!({"f:data": {"f:b": {}}})),
            ("two".into(), "Apply".into(), ab.clone()),
            ("three".into(), "Apply".into(), ab),
        ]
    );
    let mut patched = live.clone();
    patched["data"]["a"] = json!("5");
    patched["data"]["c"] = json!("3");
    record_update(Some(&live), &mut patched, writer("patcher"), None);
    let o = owners(&patched);
    assert_eq!(
        o[3],
        (
            "patcher".into(),
            "Update".into(),
            json!({"f:data": {"f:a": {}, "f:c": {}}})
        )
    );
    assert!(
        o[..3]
            .iter()
            .all(|(_, _, f)| *f == json!({"f:data": {"f:b": {}}}))
    );
}

#[test]
fn apply_removes_what_it_stopped_applying_unless_shared() {
    let first = json!({"data": {"a": "1", "b": "2"}});
    let live = apply(&json!({}), &first, writer("m"), false, None).expect("apply");
    let live = apply(
        &live,
        &json!({"data": {"b": "2"}}),
        writer("other"),
        false,
        None,
    )
    .expect("co-owner of b");
    let live = apply(&live, &json!({"data": {}}), writer("m"), false, None).expect("drop");
    assert_eq!(live["data"], json!({"b": "2"}));
}

#[test]
fn creates_own_what_they_set_including_new_maps() {
    let mut obj = json!({"metadata": {"name": "x", "labels": {"k": "v"}}, "data": {"q": "r"}});
    record_update(None, &mut obj, writer("python-thing"), None);
    assert_eq!(
        owners(&obj),
        [(
            "python-thing".into(),
            "Update".into(),
            json!({"f:data": {".": {}, "f:q": {}},
                   "f:metadata": {"f:labels": {".": {}, "f:k": {}}}})
        )]
    );
}
