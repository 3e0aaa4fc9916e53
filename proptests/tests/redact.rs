//! `redact` on texts stitched from the pieces its rules look for: unchanged text is
//! borrowed, and a secret of every known shape planted anywhere does not survive.

use inferd_proptests::check_redact;
use proptest::prelude::*;

/// Fragments that start, end or break the rules, glued in any order.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("sk-".to_owned()),
        Just("hf_".to_owned()),
        Just("eyJ".to_owned()),
        Just("://".to_owned()),
        Just("-----BEGIN ".to_owned()),
        Just("PRIVATE KEY-----".to_owned()),
        Just("-----END ".to_owned()),
        Just("password".to_owned()),
        Just("bearer ".to_owned()),
        Just("AKIA".to_owned()),
        Just("ghp_".to_owned()),
        Just("@".to_owned()),
        "[=:\"'\\\\. _\\-]".prop_map(String::from),
        "[a-zA-Z0-9]{1,12}",
        "\\PC{0,4}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn planted_secrets_never_survive(t in text()) {
        check_redact(&t);
    }
}
