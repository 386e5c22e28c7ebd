//! What the fuzz targets (fuzz/) run on each input, and what
//! tests/tests/fuzz_regressions.rs runs on every input kept in
//! fuzz/regressions/ and the seed corpus: each function panics when Ferry
//! misbehaves (a crash, or a broken invariant), never on bad input itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // an oracle panics

use ferry_proxy::datapath::{apply_ops, FakeMaps, LbMaps};
use ferry_proxy::model::NodeInfo;
use ferry_proxy::objects::{parse_documents, Object};
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, PlanConfig, PlanScope};
use ferry_proxy::translate::TranslateConfig;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// What a target runs on one input.
pub type Oracle = fn(&[u8]);

/// The fuzz targets, by name (fuzz/fuzz_targets/NAME.rs), with the
/// function each runs. The packet target needs root and lives apart
/// ([`crate::fuzz_packets`]).
pub const TARGETS: &[(&str, Oracle)] = &[
    ("objects_yaml", objects_yaml),
    ("objects_json", objects_json),
    ("file_source", file_source),
    ("config", config),
    ("pool", pool),
];

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: Some("z1".into()),
        nodeport_addresses: vec!["198.18.20.1".parse().unwrap()],
    }
}

/// Each object through the parse stage (what the agent does with every
/// object a source delivers).
fn parse_objects(objects: &[Object]) -> Core {
    let mut core = Core::new("", node(), TranslateConfig::default());
    for o in objects {
        match o {
            Object::Service(s) => core.upsert_service(s),
            Object::EndpointSlice(s) => core.upsert_slice(s),
            Object::Node(n) => {
                let _ = ferry_proxy::parse::parse_node(n, &[]);
            }
        }
    }
    core
}

/// YAML documents (the file source's parser) into objects and through
/// the parse stage.
pub fn objects_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (objects, errors) = parse_documents(text, "fuzz.yaml");
    for e in &errors {
        assert!(!e.to_string().is_empty());
    }
    parse_objects(&objects);
}

/// JSON (what the kube source decodes) into each kind and through the
/// parse stage.
pub fn objects_json(data: &[u8]) {
    let mut objects = Vec::new();
    if let Ok(s) = serde_json::from_slice::<Service>(data) {
        objects.push(Object::Service(Box::new(s)));
    }
    if let Ok(s) = serde_json::from_slice::<EndpointSlice>(data) {
        objects.push(Object::EndpointSlice(Box::new(s)));
    }
    if let Ok(n) = serde_json::from_slice::<Node>(data) {
        objects.push(Object::Node(Box::new(n)));
    }
    parse_objects(&objects);
}

/// A whole file through the pipeline (parse, track, translate, plan, the
/// maps): the plan applies, and planning again changes nothing.
pub fn file_source(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (objects, _) = parse_documents(text, "fuzz.yaml");
    let mut core = parse_objects(&objects);
    core.translate_changes();
    let cfg = PlanConfig {
        maglev_size: 31,
        max_backends: 64,
        max_frontends: 32,
        max_service_entries: 256,
    };
    let mut maps = FakeMaps::default();
    let mut applied = AppliedState::default();
    let mut alloc = Allocators::new(&cfg);
    let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
    let done = apply_ops(&mut maps, &mut applied, &plan.ops);
    assert!(done.failed.is_none(), "fake maps refused {:?}", done.failed);
    let again = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
    assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
    let restored = AppliedState::restore(maps.dump().unwrap());
    assert_eq!(
        ferry_proxy::dump::dump(&restored, None),
        ferry_proxy::dump::dump(&applied, None),
        "a restart would read other maps back"
    );
}

/// `ferry run --config FILE`: the settings and every value a flag takes.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(s) = yaml_serde::from_str::<ferry_proxy::cli::RunSettings>(text) else {
        return;
    };
    let strings = [
        &s.min_sync_period,
        &s.sync_period,
        &s.idle_timeout,
        &s.udp_idle_timeout,
        &s.l2_lease_duration,
    ];
    for v in strings.into_iter().flatten() {
        let _ = ferry_proxy::units::parse_duration(v);
    }
    if let Some(v) = &s.nodeport_addresses {
        let _ = ferry_proxy::units::parse_cidrs(v);
    }
    for v in [&s.interfaces, &s.l2_interfaces].into_iter().flatten() {
        let _ = ferry_proxy::units::parse_interfaces(v);
    }
}

/// A FerryLoadBalancerIPPool (YAML or JSON) through the pool parser.
pub fn pool(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = yaml_serde::from_str::<ferry_proxy::ipam::pool::FerryLoadBalancerIPPool>(text) {
        let info = ferry_proxy::ipam::pool::parse_pool("fuzz", 0, &p.spec);
        let _ = format!("{info:?}");
    }
}
