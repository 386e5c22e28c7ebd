//! Property tests of translate + plan + applied over random Services,
//! EndpointSlices and change sequences:
//! - after applying a plan, a second plan is empty;
//! - the maps then say exactly what the desired state says;
//! - incremental plans (only the changed Services' frontends) reach the same
//!   maps as full plans;
//! - IDs are unique while live;
//! - a sync that stops at a failed op (any op) converges on the next one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::{BTreeMap, HashSet};

use ferry_proxy::model::{NodeInfo, ObjectName};
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, MapOp, PlanConfig, PlanScope};
use ferry_proxy::translate::TranslateConfig;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct SvcGen {
    id: u8,
    node_port: bool,
    local: bool,
    maglev: bool,
    ports: u8,
}

#[derive(Debug, Clone)]
struct SliceGen {
    svc: u8,
    part: u8,
    /// (last octet, ready, terminating, on this node)
    eps: Vec<(u8, bool, bool, bool)>,
}

#[derive(Debug, Clone)]
enum Step {
    Service(SvcGen),
    DeleteService(u8),
    Slice(SliceGen),
    DeleteSlice(u8, u8),
}

fn svc_gen() -> impl Strategy<Value = SvcGen> {
    (0u8..6, any::<bool>(), any::<bool>(), any::<bool>(), 1u8..3).prop_map(
        |(id, node_port, local, maglev, ports)| SvcGen {
            id,
            node_port,
            local,
            maglev,
            ports,
        },
    )
}

fn slice_gen() -> impl Strategy<Value = SliceGen> {
    (
        0u8..6,
        0u8..2,
        prop::collection::vec((0u8..12, any::<bool>(), any::<bool>(), any::<bool>()), 0..6),
    )
        .prop_map(|(svc, part, eps)| SliceGen { svc, part, eps })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => svc_gen().prop_map(Step::Service),
        1 => (0u8..6).prop_map(Step::DeleteService),
        4 => slice_gen().prop_map(Step::Slice),
        1 => (0u8..6, 0u8..2).prop_map(|(s, p)| Step::DeleteSlice(s, p)),
    ]
}

fn service(g: &SvcGen) -> Service {
    let ports = (0..g.ports)
        .map(|i| ServicePort {
            name: Some(format!("p{i}")),
            port: 80 + i32::from(i),
            node_port: g
                .node_port
                .then_some(30000 + i32::from(g.id) * 10 + i32::from(i)),
            ..Default::default()
        })
        .collect();
    let mut annotations = BTreeMap::new();
    if g.maglev {
        annotations.insert("ferry.dev/lb-algorithm".to_string(), "maglev".to_string());
    }
    Service {
        metadata: ObjectMeta {
            name: Some(format!("s{}", g.id)),
            namespace: Some("ns".into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(if g.node_port { "NodePort" } else { "ClusterIP" }.into()),
            cluster_ip: Some(format!("198.19.0.{}", g.id + 1)),
            ports: Some(ports),
            external_traffic_policy: Some(if g.local { "Local" } else { "Cluster" }.into()),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(g: &SliceGen) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("s{}-{}", g.svc, g.part)),
            namespace: Some("ns".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("s{}", g.svc),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: g
            .eps
            .iter()
            .map(|(octet, ready, terminating, here)| Endpoint {
                addresses: vec![format!("198.18.1.{octet}")],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready || *terminating),
                    terminating: Some(*terminating),
                }),
                node_name: Some(if *here { "node-a" } else { "node-b" }.into()),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            (0..2)
                .map(|i| EndpointPort {
                    name: Some(format!("p{i}")),
                    port: Some(8080 + i),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        nodeport_addresses: vec!["198.18.0.10".parse().unwrap()],
    }
}

fn cfg() -> PlanConfig {
    PlanConfig {
        maglev_size: 31,
        max_backends: 256,
        max_frontends: 256,
        max_service_entries: 1 << 20,
    }
}

fn apply_step(core: &mut Core, s: &Step) {
    match s {
        Step::Service(g) => core.upsert_service(&service(g)),
        Step::DeleteService(id) => core.delete_service(&ObjectName::new("ns", &format!("s{id}"))),
        Step::Slice(g) => core.upsert_slice(&slice(g)),
        Step::DeleteSlice(s, p) => core.delete_slice(&ObjectName::new("ns", &format!("s{s}-{p}"))),
    }
}

/// The maps with IDs resolved to addresses: comparable across runs that
/// allocated different IDs.
fn resolved(applied: &AppliedState) -> BTreeMap<String, String> {
    let addr = |id: &ferry_proxy::plan::BackendId| {
        applied.backends().get(id).map_or_else(
            || format!("DANGLING({id})"),
            |b| format!("{}{}", b.addr, if b.terminating { "~" } else { "" }),
        )
    };
    let mut out = BTreeMap::new();
    for (key, f) in applied.frontends() {
        let e = f
            .entry
            .expect("every frontend has its master entry after a sync");
        // Which slot a backend holds depends on the history (a backend
        // that stays keeps its slot); which backends they are does not.
        let mut slots: Vec<String> = f.slots.iter().map(addr).collect();
        slots.sort();
        let maglev = applied
            .maglev()
            .get(&e.id)
            .map(|t| t.iter().map(addr).collect::<Vec<_>>().join(","));
        out.insert(
            key.to_string(),
            format!(
                "{:?} {:?} {:?} count={} src={} slots={:?} maglev={:?}",
                e.scope, e.action, e.algorithm, e.count, e.preserve_source, slots, maglev
            ),
        );
    }
    // Backends named by a slot. (Draining-only entries depend on history:
    // an entry is kept while it drains only if it existed.)
    let mut backends: Vec<String> = applied
        .frontends()
        .values()
        .flat_map(|f| f.slots.iter())
        .map(addr)
        .collect();
    backends.sort();
    backends.dedup();
    out.insert("~backends".into(), backends.join(" "));
    out
}

fn check_invariants(core: &Core, applied: &AppliedState) -> Result<(), TestCaseError> {
    // Every desired frontend is there with its backends; nothing else is.
    let desired = core.desired().frontends();
    prop_assert_eq!(desired.len(), applied.frontends().len());
    // The services-map entry count kept as ops apply is the real one.
    let counted: usize = applied
        .frontends()
        .values()
        .map(|f| usize::from(f.entry.is_some()) + f.slots.iter().filter(|b| b.0 != 0).count())
        .sum();
    prop_assert_eq!(applied.service_entries(), counted);
    for (key, d) in desired {
        let f = applied
            .frontends()
            .get(key)
            .expect("desired frontend applied");
        let e = f.entry.expect("master entry");
        prop_assert_eq!(usize::from(e.count), d.backends.len());
        prop_assert_eq!(f.slots.len(), d.backends.len());
        // The slots hold exactly the desired backends, each once.
        let mut in_slots: Vec<_> = f
            .slots
            .iter()
            .map(|slot| {
                applied
                    .backends()
                    .get(slot)
                    .expect("slot names an existing backend")
                    .addr
            })
            .collect();
        let mut wanted: Vec<_> = d.backends.iter().map(|b| b.addr).collect();
        in_slots.sort();
        wanted.sort();
        prop_assert_eq!(in_slots, wanted);
        prop_assert_eq!(applied.rev_nat().get(&e.id), Some(key));
    }
    // IDs are unique while live: one ID per backend address and per frontend.
    let addrs: HashSet<_> = applied.backends().values().map(|b| b.addr).collect();
    prop_assert_eq!(addrs.len(), applied.backends().len());
    let fids: HashSet<_> = applied
        .frontends()
        .values()
        .filter_map(|f| f.entry.map(|e| e.id))
        .collect();
    prop_assert_eq!(fids.len(), applied.frontends().len());
    // No backend entry outlives every user.
    for b in applied.backends().values() {
        prop_assert!(
            core.desired().uses_backend(&b.addr),
            "orphan backend {}",
            b.addr
        );
    }
    Ok(())
}

/// Distinct backend IDs from `picks` (values 1..=16).
fn distinct(picks: &[u32]) -> Vec<ferry_proxy::plan::BackendId> {
    let mut seen = HashSet::new();
    picks
        .iter()
        .filter(|p| seen.insert(**p))
        .map(|p| ferry_proxy::plan::BackendId(*p))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A frontend's slot layout: exactly the wanted backends; one that
    /// stays keeps its slot when that slot still exists; the new ones take
    /// the free slots in the wanted order.
    #[test]
    fn a_backend_that_stays_keeps_its_slot(
        old in prop::collection::vec(1u32..=16, 0..10),
        new in prop::collection::vec(1u32..=16, 0..10),
    ) {
        let (old, new) = (distinct(&old), distinct(&new));
        let layout = ferry_proxy::plan::stable_layout(&old, &new);
        let mut sorted_layout = layout.clone();
        sorted_layout.sort();
        let mut sorted_new = new.clone();
        sorted_new.sort();
        prop_assert_eq!(sorted_layout, sorted_new);
        for (i, b) in old.iter().enumerate() {
            if i < new.len() && new.contains(b) {
                prop_assert_eq!(layout[i], *b, "{:?} moved: {:?} -> {:?}", b, old, layout);
            }
        }
        let kept = |b: &ferry_proxy::plan::BackendId| {
            old.iter().position(|o| o == b).is_some_and(|i| i < new.len())
        };
        let fresh_in_layout: Vec<_> = layout.iter().filter(|b| !kept(b)).collect();
        let fresh_in_new: Vec<_> = new.iter().filter(|b| !kept(b)).collect();
        prop_assert_eq!(fresh_in_layout, fresh_in_new);
    }


    #[test]
    fn plans_converge_incrementally_and_in_full(steps in prop::collection::vec(step(), 1..40), batch in 1usize..5) {
        let cfg = cfg();
        let mut core = Core::new("ferry", node(), TranslateConfig::default());
        let mut inc = AppliedState::default();
        let mut inc_alloc = Allocators::new(&cfg);
        let mut full = AppliedState::default();
        let mut full_alloc = Allocators::new(&cfg);
        for chunk in steps.chunks(batch) {
            for s in chunk {
                apply_step(&mut core, s);
            }
            let t = core.translate_changes();
            let scope = if t.full { PlanScope::Full } else { PlanScope::Changes(&t.touched) };
            let plan = plan_sync(&inc, core.desired(), scope, &mut inc_alloc, &cfg);
            prop_assert!(plan.errors.is_empty());
            for op in &plan.ops {
                inc.apply(op);
            }
            let again = plan_sync(&inc, core.desired(), PlanScope::Full, &mut inc_alloc, &cfg);
            prop_assert!(again.ops.is_empty(), "incremental left work: {:?}", again.ops);
            check_invariants(&core, &inc)?;

            let plan = plan_sync(&full, core.desired(), PlanScope::Full, &mut full_alloc, &cfg);
            for op in &plan.ops {
                full.apply(op);
            }
            prop_assert_eq!(resolved(&inc), resolved(&full));
        }
    }

    #[test]
    fn a_sync_cut_short_converges(steps in prop::collection::vec(step(), 1..30), cuts in prop::collection::vec(0usize..40, 1..30)) {
        let cfg = cfg();
        let mut core = Core::new("ferry", node(), TranslateConfig::default());
        let mut applied = AppliedState::default();
        let mut alloc = Allocators::new(&cfg);
        let mut reference = AppliedState::default();
        let mut ref_alloc = Allocators::new(&cfg);
        let mut cuts = cuts.into_iter().cycle();
        for s in &steps {
            apply_step(&mut core, s);
            core.translate_changes();
            // The datapath fails at op `cut`: later ops are not applied and
            // the next sync is a full one.
            let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
            let cut = cuts.next().unwrap_or(0);
            for op in plan.ops.iter().take(cut) {
                applied.apply(op);
            }
            let plan = plan_sync(&reference, core.desired(), PlanScope::Full, &mut ref_alloc, &cfg);
            for op in &plan.ops {
                reference.apply(op);
            }
        }
        // One clean full sync repairs everything.
        let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
        for op in &plan.ops {
            applied.apply(op);
        }
        check_invariants(&core, &applied)?;
        prop_assert_eq!(resolved(&applied), resolved(&reference));
    }

    #[test]
    fn restore_from_entries_is_lossless(steps in prop::collection::vec(step(), 1..30)) {
        let cfg = cfg();
        let mut core = Core::new("ferry", node(), TranslateConfig::default());
        let mut applied = AppliedState::default();
        let mut alloc = Allocators::new(&cfg);
        for s in &steps {
            apply_step(&mut core, s);
        }
        core.translate_changes();
        for op in plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg).ops {
            applied.apply(&op);
        }
        let restored = AppliedState::restore(applied.entries());
        let mut alloc = Allocators::restore(&cfg, &restored);
        prop_assert_eq!(resolved(&restored), resolved(&applied));
        let plan = plan_sync(&restored, core.desired(), PlanScope::Full, &mut alloc, &cfg);
        prop_assert!(plan.ops.is_empty(), "restart must not touch the maps: {:?}", plan.ops);
        // New IDs after a restart never collide with restored ones.
        let before: HashSet<u32> = restored.backends().keys().map(|b| b.0).collect();
        let id = alloc.backends.allocate(|i| before.contains(&i));
        prop_assert!(id.is_none_or(|i| !before.contains(&i)));
    }
}

#[test]
fn ops_are_ordered_backends_slots_count_then_deletions() {
    let cfg = cfg();
    let mut core = Core::new("ferry", node(), TranslateConfig::default());
    core.upsert_service(&service(&SvcGen {
        id: 1,
        node_port: true,
        local: false,
        maglev: false,
        ports: 1,
    }));
    core.upsert_slice(&slice(&SliceGen {
        svc: 1,
        part: 0,
        eps: vec![(1, true, false, true), (2, true, false, false)],
    }));
    core.translate_changes();
    let mut applied = AppliedState::default();
    let mut alloc = Allocators::new(&cfg);
    let plan = plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg);
    let rank = |op: &MapOp| match op {
        MapOp::UpsertBackend { .. } => 0,
        MapOp::UpsertRevNat { .. } => 1,
        MapOp::UpsertSlot { .. } => 2,
        MapOp::UpsertMaglev { .. } => 3,
        MapOp::UpsertSourceRange { .. } => 4,
        MapOp::UpsertMeta { .. } => 5,
        MapOp::UpsertFrontend { .. } => 6,
        MapOp::DeleteFrontend { .. } => 7,
        MapOp::DeleteMeta { .. } => 8,
        MapOp::DeleteSlot { .. } => 9,
        MapOp::DeleteMaglev { .. } => 10,
        MapOp::DeleteSourceRange { .. } => 11,
        MapOp::DeleteRevNat { .. } => 12,
        MapOp::DeleteBackend { .. } => 13,
        MapOp::ReleaseFlows { .. } => 14,
    };
    let ranks: Vec<u8> = plan.ops.iter().map(rank).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{:?}", plan.ops);
    for op in &plan.ops {
        applied.apply(op);
    }
    // Replace one endpoint: the new backend comes first, the old one last.
    core.upsert_slice(&slice(&SliceGen {
        svc: 1,
        part: 0,
        eps: vec![(1, true, false, true), (3, true, false, false)],
    }));
    let t = core.translate_changes();
    let plan = plan_sync(
        &applied,
        core.desired(),
        PlanScope::Changes(&t.touched),
        &mut alloc,
        &cfg,
    );
    assert!(
        matches!(plan.ops.first(), Some(MapOp::UpsertBackend { .. })),
        "{:?}",
        plan.ops
    );
    assert!(
        matches!(plan.ops.last(), Some(MapOp::DeleteBackend { .. })),
        "{:?}",
        plan.ops
    );
    let ranks: Vec<u8> = plan.ops.iter().map(rank).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{:?}", plan.ops);
}

/// A backends map far too small: the frontends that do not fit are refused
/// at once (no walk over every ID per refusal), the others are programmed.
#[test]
fn a_full_backends_map_refuses_fast() {
    let cfg = PlanConfig {
        maglev_size: 31,
        max_backends: 5_000,
        max_frontends: 65_536,
        max_service_entries: 1 << 20,
    };
    let mut core = Core::new("ferry", node(), TranslateConfig::default());
    for i in 0..2_000u32 {
        let name = format!("big-{i}");
        let mut svc = service(&SvcGen {
            id: 0,
            node_port: false,
            local: false,
            maglev: false,
            ports: 1,
        });
        svc.metadata.name = Some(name.clone());
        svc.spec.as_mut().unwrap().cluster_ip = Some(format!("198.19.{}.{}", i / 250, i % 250 + 1));
        core.upsert_service(&svc);
        let eps = (0..10u32)
            .map(|e| Endpoint {
                addresses: vec![format!("10.{}.{}.{}", i / 250, i % 250, e + 1)],
                ..Default::default()
            })
            .collect();
        core.upsert_slice(&EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-1")),
                namespace: Some("ns".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_string(),
                    name,
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps,
            ports: Some(vec![EndpointPort {
                name: Some("p0".into()),
                port: Some(8080),
                ..Default::default()
            }]),
        });
    }
    core.translate_changes();
    let mut alloc = Allocators::new(&cfg);
    let plan = plan_sync(
        &AppliedState::default(),
        core.desired(),
        PlanScope::Full,
        &mut alloc,
        &cfg,
    );
    assert_eq!(plan.errors.len(), 1_500, "500 frontends of 10 backends fit");
    let backends = plan
        .ops
        .iter()
        .filter(|op| matches!(op, MapOp::UpsertBackend { .. }))
        .count();
    assert_eq!(backends, 5_000);
}
