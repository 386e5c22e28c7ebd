//! Control-plane benchmarks: translate + plan of a whole cluster, one
//! EndpointSlice change at scale, Maglev table builds, and allocations per
//! Service. `cargo xtask bench` runs them; figures go to docs/BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferry_benches::{bench_node, cluster, loaded_core, plan_config, plan_from_empty, slice, Shape};
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{maglev, plan_sync, Allocators, AppliedState, PlanScope};
use ferry_proxy::translate::TranslateConfig;

/// Counts heap allocations so the bench can report them per Service; the
/// allocator underneath is mimalloc, as in the `ferry` binary.
struct Counting;

static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call goes to mimalloc unchanged; counting has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from INNER.alloc with this layout.
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// translate + plan of every Service from empty maps (objects already
/// parsed by the track stage, as they are when a source delivers them).
fn full_sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate_plan_full");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    let cfg = plan_config();
    for (label, services, nodeport_every) in [
        ("1k_clusterip", 1_000, 0),
        ("10k_clusterip", 10_000, 0),
        ("10k_10pct_nodeport", 10_000, 10),
        ("50k_clusterip", 50_000, 0),
    ] {
        let shape = Shape {
            services,
            endpoints: 10,
            nodeport_every,
        };
        g.bench_function(label, |b| {
            b.iter_batched(
                || loaded_core(shape),
                |mut core| {
                    core.translate_changes();
                    black_box(plan_from_empty(&core, &cfg).ops.len());
                    core
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// One EndpointSlice change (a pod replaced) at 10,000 Services: parse,
/// track, translate that Service and plan its ops.
fn endpoint_change(c: &mut Criterion) {
    let cfg = plan_config();
    let shape = Shape {
        services: 10_000,
        endpoints: 10,
        nodeport_every: 10,
    };
    let mut core = loaded_core(shape);
    core.translate_changes();
    let mut applied = AppliedState::default();
    let mut alloc = Allocators::new(&cfg);
    for op in plan_sync(&applied, core.desired(), PlanScope::Full, &mut alloc, &cfg).ops {
        applied.apply(&op);
    }
    let versions = [slice(4321, shape, 0), slice(4321, shape, 1)];
    let versions_np = [slice(4320, shape, 0), slice(4320, shape, 1)];
    let mut g = c.benchmark_group("endpoint_change_10k");
    for (label, v) in [("clusterip", &versions), ("nodeport_maglev", &versions_np)] {
        g.bench_function(label, |b| {
            let mut generation = 0usize;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    generation += 1;
                    let start = Instant::now();
                    core.upsert_slice(&v[generation % 2]);
                    let t = core.translate_changes();
                    let plan = plan_sync(
                        &applied,
                        core.desired(),
                        PlanScope::Changes(&t.touched),
                        &mut alloc,
                        &cfg,
                    );
                    total += start.elapsed();
                    for op in &plan.ops {
                        applied.apply(op);
                    }
                }
                total
            });
        });
    }
    g.finish();
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_16381");
    for n in [3usize, 10, 100] {
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("10.0.0.{i}:8080/TCP").into_bytes())
            .collect();
        g.bench_function(format!("{n}_backends"), |b| {
            b.iter(|| black_box(maglev::build_table(&keys, maglev::DEFAULT_TABLE_SIZE)));
        });
    }
    g.finish();
}

/// Heap allocations per Service for track + translate + plan at 10k.
fn allocations(_c: &mut Criterion) {
    let shape = Shape {
        services: 10_000,
        endpoints: 10,
        nodeport_every: 0,
    };
    let (svcs, slices) = cluster(shape);
    let cfg = plan_config();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut core = Core::new("ferry", bench_node(), TranslateConfig::default());
    for s in &svcs {
        core.upsert_service(s);
    }
    for s in &slices {
        core.upsert_slice(s);
    }
    let parsed = ALLOCATIONS.load(Ordering::Relaxed);
    core.translate_changes();
    let translated = ALLOCATIONS.load(Ordering::Relaxed);
    let plan = plan_from_empty(&core, &cfg);
    let planned = ALLOCATIONS.load(Ordering::Relaxed);
    let per = |a: u64, b: u64| (b - a) as f64 / shape.services as f64;
    println!(
        "allocations per Service (10k x 10 endpoints): parse+track {:.1}, translate {:.1}, plan {:.1} ({} ops)",
        per(before, parsed),
        per(parsed, translated),
        per(translated, planned),
        plan.ops.len()
    );
}

/// The file source's parse of a YAML file of N Services and their
/// EndpointSlices (block style, as `kubectl get -o yaml` writes), one
/// document each: the YAML parser, the kind dispatch and the k8s-openapi
/// types.
fn file_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("file_source_parse");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for (label, services) in [("1k", 1_000), ("10k", 10_000)] {
        let shape = Shape {
            services,
            endpoints: 10,
            nodeport_every: 0,
        };
        let (svcs, slices) = cluster(shape);
        let mut text = String::new();
        for (svc, sl) in svcs.iter().zip(&slices) {
            for doc in [
                yaml_serde::to_string(svc).expect("a Service as YAML"),
                yaml_serde::to_string(sl).expect("a slice as YAML"),
            ] {
                text.push_str("---\n");
                text.push_str(&doc);
            }
        }
        g.bench_function(label, |b| {
            b.iter(|| {
                let (objects, errors) = ferry_proxy::objects::parse_documents(&text, "bench.yaml");
                assert!(errors.is_empty(), "{errors:?}");
                black_box(objects.len())
            });
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    full_sync,
    file_parse,
    endpoint_change,
    maglev_build,
    allocations
);
criterion_main!(benches);
