use super::*;

#[test]
fn string_data_folds_into_data() {
    let mut secret = json!({"data": {"a": "YQ=="}, "stringData": {"b": "hi"}});
    fold_string_data(&mut secret);
    assert_eq!(secret, json!({"data": {"a": "YQ==", "b": "aGk="}}));
}
