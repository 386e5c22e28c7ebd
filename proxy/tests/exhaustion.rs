//! Exhaustion through the whole pipeline (track, translate, plan, maps in
//! memory): a Service with 100,000 endpoints in 100 EndpointSlices is
//! served by the capacity's worth of them, counted as capped, and the
//! other Services are unaffected; full backends and frontends maps leave
//! out whole frontends with a plan error each, the rest programmed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use ferry_proxy::datapath::{apply_ops, FakeMaps};
use ferry_proxy::model::NodeInfo;
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, PlanConfig, PlanScope};
use ferry_proxy::translate::TranslateConfig;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn service(name: &str, ip: &str) -> Service {
    yaml_serde::from_str(&format!(
        "metadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
    ))
    .unwrap()
}

/// Slice `part` of `service`: `count` endpoints from 198.18.x.y on.
fn slice(service: &str, part: u32, first: u32, count: u32) -> EndpointSlice {
    let eps: Vec<String> = (first..first + count)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from_bits(0xc612_0000 + i);
            format!("{{addresses: [{ip}]}}")
        })
        .collect();
    yaml_serde::from_str(&format!(
        "metadata: {{name: {service}-{part}, namespace: t, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
        eps.join(", ")
    ))
    .unwrap()
}

fn core() -> Core {
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        nodeport_addresses: vec![],
    };
    Core::new("", node, TranslateConfig::default())
}

#[test]
fn a_service_with_100000_endpoints_is_capped_and_the_others_are_served() {
    let mut core = core();
    core.upsert_service(&service("huge", "198.19.0.10"));
    core.upsert_service(&service("small", "198.19.0.11"));
    for part in 0..100 {
        core.upsert_slice(&slice("huge", part, part * 1000, 1000));
    }
    core.upsert_slice(&slice("small", 0, 200_000, 3));
    core.translate_changes();
    assert_eq!(core.invalid().count(), 0);
    let huge = &core.desired().services()[&ferry_proxy::model::ServiceName::new("t", "huge")];
    assert_eq!(huge.left_out, 100_000 - 4096);
    let cfg = PlanConfig::default();
    let (mut maps, mut applied) = (FakeMaps::default(), AppliedState::default());
    let mut alloc = Allocators::new(&cfg);
    let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    assert!(apply_ops(&mut maps, &mut applied, &plan.ops)
        .failed
        .is_none());
    let slots = |ip: &str| {
        applied
            .frontends()
            .iter()
            .find(|(k, _)| k.ip.to_string() == ip)
            .map(|(_, f)| f.slots.len())
    };
    assert_eq!(slots("198.19.0.10"), Some(4096));
    assert_eq!(slots("198.19.0.11"), Some(3));
    assert_eq!(applied.backends().len(), 4096 + 3);
}

/// Ten Services of ten endpoints each, at 198.19.`net`.0-9.
fn ten_services(net: u8) -> Core {
    let mut core = core();
    for i in 0..10u32 {
        let name = format!("s{i}");
        core.upsert_service(&service(&name, &format!("198.19.{net}.{i}")));
        core.upsert_slice(&slice(&name, 0, i * 10, 10));
    }
    core.translate_changes();
    core
}

/// A full sync of `core` into maps in memory, applied without a failure.
fn full_sync(
    core: &Core,
    cfg: &PlanConfig,
) -> (FakeMaps, AppliedState, Allocators, ferry_proxy::plan::Plan) {
    let (mut maps, mut applied) = (FakeMaps::default(), AppliedState::default());
    let mut alloc = Allocators::new(cfg);
    let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, cfg);
    assert!(apply_ops(&mut maps, &mut applied, &plan.ops)
        .failed
        .is_none());
    (maps, applied, alloc, plan)
}

#[test]
fn full_maps_leave_out_whole_frontends_and_program_the_rest() {
    let core = ten_services(1);
    // Room for 4 frontends, and for 55 backends (5 Services and a half).
    let cfg = PlanConfig {
        max_frontends: 4,
        max_backends: 55,
        ..PlanConfig::default()
    };
    let (_, applied, _, plan) = full_sync(&core, &cfg);
    assert_eq!(applied.frontends().len(), 4);
    assert!(
        applied.frontends().values().all(|f| f.slots.len() == 10),
        "whole frontends only"
    );
    assert_eq!(plan.errors.len(), 6, "{:?}", plan.errors);
    assert!(plan.errors.iter().all(|e| e.reason.contains("map is full")));
}

#[test]
fn a_full_services_map_leaves_out_whole_frontends_and_updates_still_apply() {
    let mut core = ten_services(2);
    // Room for 5 frontends of 1 master entry and 10 slots, and a half.
    let cfg = PlanConfig {
        max_service_entries: 60,
        ..PlanConfig::default()
    };
    let (mut maps, mut applied, mut alloc, plan) = full_sync(&core, &cfg);
    assert_eq!(applied.frontends().len(), 5);
    assert_eq!(applied.service_entries(), 55);
    assert_eq!(plan.errors.len(), 5, "{:?}", plan.errors);
    assert!(plan.errors[0]
        .reason
        .contains("services map is full (60 entries)"));
    // A programmed Service shrinking always fits, and frees room.
    core.upsert_slice(&slice("s0", 0, 0, 2));
    let t = core.translate_changes();
    let plan = plan_sync(
        &applied,
        core.desired(),
        PlanScope::Changes(&t.touched),
        &mut alloc,
        &cfg,
    );
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    assert!(apply_ops(&mut maps, &mut applied, &plan.ops)
        .failed
        .is_none());
    assert_eq!(applied.service_entries(), 47);
}
