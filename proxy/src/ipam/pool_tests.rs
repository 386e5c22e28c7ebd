use super::*;

fn block(cidr: &str) -> PoolBlock {
    PoolBlock {
        cidr: Some(cidr.into()),
        ..Default::default()
    }
}

#[test]
fn cidr_blocks_skip_network_and_broadcast_unless_allowed() {
    let spec = PoolSpec {
        blocks: vec![
            block("10.0.0.0/30"),
            block("10.0.1.7/32"),
            block("10.0.2.0/31"),
        ],
        ..Default::default()
    };
    let p = parse_pool("p", 0, &spec);
    assert_eq!(p.invalid, None);
    let shown: Vec<String> = p
        .ranges
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(
        shown,
        [
            "10.0.0.1-10.0.0.2",
            "10.0.1.7-10.0.1.7",
            "10.0.2.0-10.0.2.1"
        ]
    );
    let all = parse_pool(
        "p",
        0,
        &PoolSpec {
            allow_first_last_ips: true,
            ..spec
        },
    );
    assert_eq!(all.ranges[0].to_string(), "10.0.0.0-10.0.0.3");
    let v6 = parse_pool(
        "p",
        0,
        &PoolSpec {
            blocks: vec![block("fd00::/126")],
            ..Default::default()
        },
    );
    assert_eq!(v6.ranges[0].to_string(), "fd00::1-fd00::3");
}

#[test]
fn bad_blocks_and_selectors_make_the_pool_invalid() {
    let cases = [
        (vec![block("10.0.0.0/33")], None, "spec.blocks[0]: cidr"),
        (
            vec![PoolBlock {
                start: Some("10.0.0.9".into()),
                stop: Some("10.0.0.1".into()),
                cidr: None,
            }],
            None,
            "is after stop",
        ),
        (
            vec![PoolBlock {
                start: Some("10.0.0.1".into()),
                stop: Some("fd00::1".into()),
                cidr: None,
            }],
            None,
            "different families",
        ),
        (
            vec![PoolBlock {
                cidr: Some("10.0.0.0/24".into()),
                start: Some("10.0.0.1".into()),
                stop: None,
            }],
            None,
            "either `cidr`",
        ),
        (vec![], None, "spec.blocks is empty"),
        (
            vec![block("10.0.0.0/24")],
            Some(ServiceSelector {
                match_expressions: vec![SelectorRequirement {
                    key: "a".into(),
                    operator: "Like".into(),
                    values: vec![],
                }],
                ..Default::default()
            }),
            "unknown operator \"Like\"",
        ),
    ];
    for (blocks, service_selector, want) in cases {
        let p = parse_pool(
            "p",
            0,
            &PoolSpec {
                blocks,
                service_selector,
                ..Default::default()
            },
        );
        let why = p.invalid.expect(want);
        assert!(why.contains(want), "{why} lacks {want}");
        assert!(p.ranges.is_empty());
    }
}

#[test]
fn selectors_match_labels_and_expressions() {
    let labels: BTreeMap<String, String> = [
        ("tier", "web"),
        (NAMESPACE_LABEL, "shop"),
        (NAME_LABEL, "front"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let req = |key: &str, operator: &str, values: &[&str]| SelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: values
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    };
    let sel = |labels: &[(&str, &str)], exprs: Vec<SelectorRequirement>| ServiceSelector {
        match_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: exprs,
    };
    assert!(selects(None, &labels));
    assert!(selects(
        Some(&sel(&[(NAMESPACE_LABEL, "shop")], vec![])),
        &labels
    ));
    assert!(!selects(
        Some(&sel(&[(NAMESPACE_LABEL, "dev")], vec![])),
        &labels
    ));
    assert!(selects(
        Some(&sel(&[], vec![req("tier", "In", &["web", "db"])])),
        &labels
    ));
    assert!(!selects(
        Some(&sel(&[], vec![req("tier", "NotIn", &["web"])])),
        &labels
    ));
    assert!(selects(
        Some(&sel(&[], vec![req("zone", "NotIn", &["a"])])),
        &labels
    ));
    assert!(selects(
        Some(&sel(&[], vec![req("tier", "Exists", &[])])),
        &labels
    ));
    assert!(!selects(
        Some(&sel(&[], vec![req("tier", "DoesNotExist", &[])])),
        &labels
    ));
    assert!(!selects(
        Some(&sel(&[("tier", "web")], vec![req("zone", "Exists", &[])])),
        &labels
    ));
}
