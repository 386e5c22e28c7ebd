//! Golden tests: each proxy/testdata/<scenario>/ holds input.yaml (Services,
//! EndpointSlices, optionally this Node), optionally config.yaml and
//! after.yaml (the objects after a change, applied as after an agent
//! restart: maps restored from their entries, then reconciled), and
//! expected.txt: the errors, the planned ops and the resulting maps.
//! FERRY_UPDATE_GOLDEN=1 rewrites expected.txt.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::fmt::Write;
use std::path::Path;

use ferry_proxy::dump::{dump, format_op};
use ferry_proxy::model::NodeInfo;
use ferry_proxy::objects::{parse_documents, Object};
use ferry_proxy::parse::parse_node;
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, PlanConfig, PlanScope};
use ferry_proxy::translate::TranslateConfig;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ScenarioConfig {
    max_backends_per_service: Option<usize>,
    maglev_size: Option<u32>,
    max_backends: Option<u32>,
    #[serde(default)]
    nodeport_cidrs: Vec<String>,
}

struct Scenario {
    translate: TranslateConfig,
    plan: PlanConfig,
    cidrs: Vec<ipnet::IpNet>,
}

fn default_node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: Some("zone-a".into()),
        nodeport_addresses: vec!["198.18.0.10".parse().unwrap()],
    }
}

fn load(dir: &Path, file: &str, scenario: &Scenario, out: &mut String) -> Core {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let (objects, errors) = parse_documents(&text, file);
    for e in errors {
        writeln!(out, "document error: {e}").unwrap();
    }
    let node = objects
        .iter()
        .find_map(|o| match o {
            Object::Node(n) => Some(parse_node(n, &scenario.cidrs)),
            _ => None,
        })
        .unwrap_or_else(default_node);
    let mut core = Core::new("ferry", node, scenario.translate.clone());
    for o in &objects {
        match o {
            Object::Service(s) => core.upsert_service(s),
            Object::EndpointSlice(s) => core.upsert_slice(s),
            Object::Node(_) => {}
        }
    }
    core.translate_changes();
    for e in core.invalid() {
        writeln!(out, "invalid: {e}").unwrap();
    }
    for (name, why) in core.ignored() {
        writeln!(out, "ignored: Service {name}: {why}").unwrap();
    }
    let mut capped: Vec<_> = core
        .desired()
        .services()
        .iter()
        .filter(|(_, s)| s.left_out > 0)
        .map(|(n, s)| format!("capped: Service {n}: {} backends left out", s.left_out))
        .collect();
    capped.sort();
    for line in capped {
        writeln!(out, "{line}").unwrap();
    }
    core
}

fn sync(
    core: &Core,
    applied: &mut AppliedState,
    alloc: &mut Allocators,
    cfg: &PlanConfig,
    out: &mut String,
) {
    let plan = plan_sync(applied, core.desired(), PlanScope::Full, alloc, cfg);
    for e in &plan.errors {
        writeln!(out, "plan error: {e}").unwrap();
    }
    out.push_str("## ops\n");
    for op in &plan.ops {
        writeln!(out, "{}", format_op(op)).unwrap();
        applied.apply(op);
    }
    let again = plan_sync(applied, core.desired(), PlanScope::Full, alloc, cfg);
    assert!(
        again.ops.is_empty(),
        "second plan not empty: {:?}",
        again.ops
    );
    out.push_str("## maps\n");
    out.push_str(&dump(applied, Some(core.desired())));
}

fn run_scenario(dir: &Path) -> String {
    let cfg: ScenarioConfig = std::fs::read_to_string(dir.join("config.yaml"))
        .map(|t| yaml_serde::from_str(&t).unwrap())
        .unwrap_or_default();
    let mut plan = PlanConfig {
        maglev_size: cfg.maglev_size.unwrap_or(31),
        ..PlanConfig::default()
    };
    if let Some(m) = cfg.max_backends {
        plan.max_backends = m;
    }
    let scenario = Scenario {
        translate: TranslateConfig {
            max_backends_per_service: cfg.max_backends_per_service.unwrap_or(64),
        },
        plan,
        cidrs: cfg
            .nodeport_cidrs
            .iter()
            .map(|c| c.parse().unwrap())
            .collect(),
    };
    let mut out = String::new();
    let core = load(dir, "input.yaml", &scenario, &mut out);
    let mut applied = AppliedState::default();
    let mut alloc = Allocators::new(&scenario.plan);
    sync(&core, &mut applied, &mut alloc, &scenario.plan, &mut out);
    if dir.join("after.yaml").exists() {
        out.push_str("# after a restart with after.yaml\n");
        // Restart: a new core from a full list and maps read back.
        let mut restored = AppliedState::restore(applied.entries());
        let mut alloc = Allocators::restore(&scenario.plan, &restored);
        let core = load(dir, "after.yaml", &scenario, &mut out);
        sync(&core, &mut restored, &mut alloc, &scenario.plan, &mut out);
    }
    out
}

#[test]
fn golden_scenarios() {
    let update = std::env::var("FERRY_UPDATE_GOLDEN").as_deref() == Ok("1");
    let dirs = common::scenario_dirs();
    assert!(
        dirs.len() >= 20,
        "expected the full scenario set, found {}",
        dirs.len()
    );
    let mut failed = Vec::new();
    for dir in dirs {
        let got = run_scenario(&dir);
        let expected_path = dir.join("expected.txt");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            eprintln!("=== {} differs; got:\n{got}", dir.display());
            failed.push(dir.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "golden scenarios differ: {failed:?} (FERRY_UPDATE_GOLDEN=1 to accept)"
    );
}
