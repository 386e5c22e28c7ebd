//! Runs one full translate + plan at 10,000 Services for profilers
//! (`perf record`); prints the phase times.

use std::time::Instant;

use ferry_benches::{bench_node, cluster, plan_config, plan_from_empty, Shape};
use ferry_proxy::pipeline::Core;
use ferry_proxy::translate::TranslateConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let services = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let shape = Shape {
        services,
        endpoints: 10,
        nodeport_every: 0,
    };
    let (svcs, slices) = cluster(shape);
    let cfg = plan_config();
    for round in 0..3 {
        let t0 = Instant::now();
        let mut core = Core::new("ferry", bench_node(), TranslateConfig::default());
        for s in &svcs {
            core.upsert_service(s);
        }
        for s in &slices {
            core.upsert_slice(s);
        }
        let t1 = Instant::now();
        core.translate_changes();
        let t2 = Instant::now();
        let plan = plan_from_empty(&core, &cfg);
        let t3 = Instant::now();
        println!(
            "round {round}: parse+track {:?}, translate {:?}, plan {:?} ({} ops)",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            plan.ops.len()
        );
    }
}
