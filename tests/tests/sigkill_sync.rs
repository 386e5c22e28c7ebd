//! Privileged: the agent killed with SIGKILL around its first full sync
//! (2,000 Services, ~10,000 map entries), again and again, each time a
//! little later; and, in process, an agent whose maps stop taking writes at
//! chosen points of its full sync (as a SIGKILL leaves them) dropped there.
//! The next start converges to the same maps as a fault-free run (compared
//! entry by entry, IDs resolved to addresses): no orphan slot, backend or
//! reverse-NAT entry left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_proxy::datapath::{BpfMaps, LbMaps, MapCapacities};
use ferry_proxy::plan::AppliedState;
use ferry_tests::agent::EbpfAgent;
use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::KillOnDrop;

const SERVICES: u32 = 2_000;

fn yaml() -> String {
    let mut out = String::new();
    for i in 0..SERVICES {
        let ip = std::net::Ipv4Addr::from_bits(0xc613_0000 + i + 1);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: t}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: t, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.{}.{}]}}, {{addresses: [198.18.{}.{}]}}, {{addresses: [198.18.{}.{}]}}]\n",
            100 + i / 200, (i % 200) + 1, 101 + i / 200, (i % 200) + 1, 102 + i / 200, (i % 200) + 1
        );
    }
    out
}

fn start(bin: &Path, dir: &Path, pins: &Path, cg: &Path, log: &str) -> KillOnDrop {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    KillOnDrop(
        EbpfAgent {
            netns: None,
            source: format!("--source=file:{}", dir.join("svc.yaml").display()),
            pins,
            cgroup: cg,
            interfaces: "none",
            hostname: "node-a",
        }
        .command(bin)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    )
}

/// The maps, IDs resolved: each frontend's policy and backends in slot
/// order, the backends and the reverse-NAT entries.
fn maps(pins: &Path) -> (BTreeMap<String, String>, BTreeSet<String>, BTreeSet<String>) {
    let ops = BpfMaps::open(pins, MapCapacities::default())
        .unwrap()
        .dump()
        .unwrap();
    let a = AppliedState::restore(ops);
    let addr = |id| {
        a.backends()
            .get(id)
            .map_or("?".to_string(), |b| b.addr.to_string())
    };
    let frontends = a
        .frontends()
        .iter()
        .map(|(k, f)| {
            let entry = f.entry.map(|e| {
                format!(
                    "{} {} count={}",
                    e.action.name(),
                    e.algorithm.name(),
                    e.count
                )
            });
            let slots: Vec<String> = f.slots.iter().map(addr).collect();
            (k.to_string(), format!("{entry:?} {slots:?}"))
        })
        .collect();
    let backends = a.backends().values().map(|b| b.addr.to_string()).collect();
    let rev_nat = a
        .rev_nat()
        .values()
        .map(std::string::ToString::to_string)
        .collect();
    (frontends, backends, rev_nat)
}

/// Waits until the agent logged its first full sync as applied.
fn ready(dir: &Path, log: &str) {
    let deadline = Instant::now() + Duration::from_mins(1);
    let log = || std::fs::read_to_string(dir.join(log)).unwrap_or_default();
    while !log().contains("ready: the first full sync") {
        assert!(Instant::now() < deadline, "never ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigkill_during_a_full_sync_converges_to_the_fault_free_maps() {
    let Some(bin) = ferry_tests::privileged_ferry(
        "sigkill_during_a_full_sync_converges_to_the_fault_free_maps",
    ) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-test-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("svc.yaml"), yaml()).unwrap();
    let cg = TestCgroup::new("kill").unwrap();

    // Fault-free.
    let clean = PinDir::new("killref").unwrap();
    let agent = start(&bin, &dir, clean.path(), cg.path(), "clean.log");
    ready(&dir, "clean.log");
    drop(agent);
    let want = maps(clean.path());
    assert_eq!(want.0.len(), SERVICES as usize);

    // Killed again and again, each time a little later after the start
    // (coarsely until entries appear, then finely before that moment),
    // until kills have landed in the middle of a sync (some of the maps'
    // entries written, not all).
    let total = BpfMaps::open(clean.path(), MapCapacities::default())
        .unwrap()
        .dump()
        .unwrap()
        .len();
    let pins = PinDir::new("kill").unwrap();
    let entries = || {
        BpfMaps::open(pins.path(), MapCapacities::default())
            .and_then(|m| m.dump())
            .map_or(0, |ops| ops.len())
    };
    let kill_after = |delay_ms: u64| {
        let mut agent = start(&bin, &dir, pins.path(), cg.path(), "killed.log");
        std::thread::sleep(Duration::from_millis(delay_ms));
        agent.0.kill().unwrap();
        let _ = agent.0.wait();
        (delay_ms, entries())
    };
    let mut kills = Vec::new();
    let first = (100..3000u64).step_by(60).find(|d| {
        let k = kill_after(*d);
        kills.push(k);
        k.1 > 0
    });
    let first = first.expect("the agent never programmed anything");
    for d in (first.saturating_sub(60)..first).step_by(4) {
        kills.push(kill_after(d));
    }
    // The sync itself takes a few milliseconds (batched writes) and the
    // start varies by hundreds: a kill lands in it only now and then, so
    // the cut at every op boundary is tested in process below.
    let mid = |k: &(u64, usize)| k.1 > 0 && k.1 < total;
    let partial: Vec<(u64, usize)> = kills.iter().copied().filter(mid).collect();
    eprintln!(
        "{} SIGKILLs; (ms after the start, entries in the maps) of those mid-sync: {partial:?} of {total}",
        kills.len()
    );
    let started = Instant::now();
    let agent = start(&bin, &dir, pins.path(), cg.path(), "after.log");
    ready(&dir, "after.log");
    eprintln!(
        "after the kills: ready {:?} after the start",
        started.elapsed()
    );
    drop(agent);
    let got = maps(pins.path());
    assert_eq!(got.1, want.1, "backends");
    assert_eq!(got.2, want.2, "reverse-NAT entries");
    assert_eq!(got.0, want.0, "frontends");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Maps that take the first `left` writes, then refuse every other (what
/// a SIGKILL at that point leaves in the pinned maps).
struct CutAt {
    inner: BpfMaps,
    left: usize,
}

impl LbMaps for CutAt {
    fn apply(
        &mut self,
        op: &ferry_proxy::plan::MapOp,
    ) -> Result<(), ferry_proxy::datapath::DatapathError> {
        if self.left == 0 {
            return Err(ferry_proxy::datapath::DatapathError::Unsupported(
                "killed".into(),
            ));
        }
        self.left -= 1;
        self.inner.apply(op)
    }

    fn dump(&self) -> Result<Vec<ferry_proxy::plan::MapOp>, ferry_proxy::datapath::DatapathError> {
        self.inner.dump()
    }
}

/// One full sync of every object of the YAML through an agent on `maps`.
fn full_sync(maps: Box<dyn LbMaps + Send>) -> Result<(), String> {
    let (objects, errors) = ferry_proxy::objects::parse_documents(&yaml(), "svc.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for o in objects {
        match o {
            ferry_proxy::objects::Object::Service(s) => services.push(*s),
            ferry_proxy::objects::Object::EndpointSlice(s) => slices.push(*s),
            ferry_proxy::objects::Object::Node(_) => {}
        }
    }
    let mut agent = ferry_proxy::agent::Agent::new(ferry_tests::agent_config(vec!["test"]), maps)
        .map_err(|e| e.to_string())?;
    agent.handle(ferry_proxy::source::SourceEvent::Snapshot {
        source: "test",
        services,
        slices,
        nodes: vec![],
    });
    agent
        .sync(ferry_proxy::agent::runner::SyncKind::Full)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn a_full_sync_cut_at_any_point_converges_on_the_next_start() {
    ferry_tests::needs_ebpf!("a_full_sync_cut_at_any_point_converges_on_the_next_start");
    // The maps pinned as the agent's start pins them.
    let pinned = |tag| {
        let pins = PinDir::new(tag).unwrap();
        drop(ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap());
        pins
    };
    let clean = pinned("cutref");
    full_sync(Box::new(
        BpfMaps::open(clean.path(), MapCapacities::default()).unwrap(),
    ))
    .unwrap();
    let want = maps(clean.path());
    let total = BpfMaps::open(clean.path(), MapCapacities::default())
        .unwrap()
        .dump()
        .unwrap()
        .len();
    for cut in [1, 2_000, total / 2, total - 1] {
        let pins = pinned("cut");
        let open = || BpfMaps::open(pins.path(), MapCapacities::default()).unwrap();
        assert!(full_sync(Box::new(CutAt {
            inner: open(),
            left: cut
        }))
        .is_err());
        full_sync(Box::new(open())).unwrap();
        let got = maps(pins.path());
        assert_eq!(got.1, want.1, "cut after {cut} of {total} writes: backends");
        assert_eq!(
            got.2, want.2,
            "cut after {cut} of {total} writes: reverse-NAT entries"
        );
        assert_eq!(
            got.0, want.0,
            "cut after {cut} of {total} writes: frontends"
        );
    }
}
