use super::*;

fn env() -> Environment {
    Environment {
        node_name: "node-env".into(),
        pod_namespace: None,
        cgroup2_root: Some(PathBuf::from("/sys/fs/cgroup")),
        default_interfaces: Box::new(|| vec!["eth0".into()]),
    }
}

fn flags(f: impl FnOnce(&mut RunFlags)) -> RunFlags {
    let mut flags = RunFlags::default();
    f(&mut flags);
    flags
}

fn file(yaml: &str) -> RunSettings {
    yaml_serde::from_str(yaml).unwrap()
}

fn error(flags: RunFlags, file: RunSettings) -> UsageError {
    resolve(flags, file, &env()).unwrap_err()
}

#[test]
fn defaults() {
    let r = resolve(RunFlags::default(), RunSettings::default(), &env()).unwrap();
    assert_eq!(r.source, Source::Kube(None));
    assert_eq!(r.dataplane.mode, Dataplane::Auto);
    assert_eq!(r.dataplane.bpffs, PathBuf::from("/sys/fs/bpf/ferry"));
    assert_eq!(r.dataplane.cgroup, Some(PathBuf::from("/sys/fs/cgroup")));
    assert_eq!(r.dataplane.interfaces, None);
    assert_eq!(r.agent.min_sync_period, Duration::from_secs(1));
    assert_eq!(r.agent.sync_period, Duration::from_secs(30));
    assert_eq!(r.agent.node_name, "node-env");
    assert_eq!(r.agent.sources, crate::source::kube::SOURCES.to_vec());
    let listen: Vec<String> = r.listen.iter().map(|(a, _)| a.to_string()).collect();
    assert_eq!(listen, ["0.0.0.0:10256", "127.0.0.1:10249"]);
    let ipam = r.ipam.unwrap();
    assert!(ipam.allocate);
    assert!(!ipam.l2_required);
    assert_eq!(ipam.l2_interfaces, ["eth0"]);
    assert_eq!(ipam.lease_namespace, "kube-system");
    assert_eq!(ipam.identity, "node-env");
    assert_eq!(
        ipam.l2_lease_duration,
        crate::ipam::announce::DEFAULT_LEASE_DURATION
    );
}

#[test]
fn a_flag_wins_over_the_file_and_the_file_over_the_default() {
    let file = file(
        "source: file:/from-file\nminSyncPeriod: 2s\nsyncPeriod: 1m\nhostnameOverride: Node-File\n\
         dataplane: userspace\nleaseNamespace: ferry\nmetricsBindAddress: ''\n",
    );
    let given = flags(|f| {
        f.source = Some("file:/from-flag".into());
        f.sync_period = Some("10s".into());
    });
    let r = resolve(given, file, &env()).unwrap();
    assert_eq!(r.source, Source::File(PathBuf::from("/from-flag")));
    assert_eq!(r.agent.min_sync_period, Duration::from_secs(2));
    assert_eq!(r.agent.sync_period, Duration::from_secs(10));
    assert_eq!(r.agent.node_name, "node-file");
    assert_eq!(r.dataplane.mode, Dataplane::Userspace);
    assert_eq!(r.listen.len(), 1, "an empty address turns a server off");
    assert!(r.ipam.is_none(), "no LoadBalancer management from files");
    assert_eq!(r.agent.sources, vec![crate::source::file::NAME]);
}

#[test]
fn ipam_follows_the_flags_and_the_environment() {
    let environment = Environment {
        pod_namespace: Some("ferry-system".into()),
        ..env()
    };
    let given = flags(|f| {
        f.interfaces = Some("ens3,ens4".into());
        f.lb_ipam = Some("no".into());
        f.kubeconfig = Some(PathBuf::from("/k"));
        f.l2_lease_duration = Some("3s".into());
        f.hostname_override = Some(String::new());
    });
    let r = resolve(given, RunSettings::default(), &environment).unwrap();
    assert_eq!(r.source, Source::Kube(Some(PathBuf::from("/k"))));
    let ipam = r.ipam.unwrap();
    assert!(!ipam.allocate);
    assert_eq!(ipam.l2_interfaces, ["ens3", "ens4"], "the TC interfaces");
    assert!(!ipam.l2_required);
    assert_eq!(ipam.lease_namespace, "ferry-system");
    assert_eq!(ipam.kubeconfig, Some(PathBuf::from("/k")));
    assert_eq!(ipam.l2_lease_duration, Duration::from_secs(3));
    assert_eq!(
        ipam.identity, "node-env",
        "an empty override is no override"
    );
    let asked = flags(|f| f.l2_interfaces = Some("none".into()));
    let ipam = resolve(asked, RunSettings::default(), &env())
        .unwrap()
        .ipam
        .unwrap();
    assert!(ipam.l2_required);
    assert!(ipam.l2_interfaces.is_empty());
}

#[test]
fn every_bad_value_names_its_setting() {
    let cases: Vec<(RunFlags, &str, &str)> = vec![
        (
            flags(|f| f.source = Some("etcd".into())),
            "--source",
            "is not kube or file:PATH",
        ),
        (
            flags(|f| f.source = Some("file:".into())),
            "--source",
            "is not kube or file:PATH",
        ),
        (
            flags(|f| f.dataplane = Some("fpga".into())),
            "--dataplane",
            "is not ebpf, userspace or auto",
        ),
        (
            flags(|f| f.max_connections = Some(0)),
            "--max-connections",
            "must be at least 1",
        ),
        (
            flags(|f| f.idle_timeout = Some("forever".into())),
            "--idle-timeout",
            "not a duration",
        ),
        (
            flags(|f| f.udp_idle_timeout = Some("0s".into())),
            "--udp-idle-timeout",
            "must be more than 0",
        ),
        (
            flags(|f| f.interfaces = Some("eth0,a/b".into())),
            "--interfaces",
            "is not an interface name",
        ),
        (
            flags(|f| f.lb_ipam = Some("maybe".into())),
            "--lb-ipam",
            "is not true or false",
        ),
        (
            flags(|f| f.l2_interfaces = Some("a b".into())),
            "--l2-interfaces",
            "is not an interface name",
        ),
        (
            flags(|f| f.l2_lease_duration = Some("0s".into())),
            "--l2-lease-duration",
            "must be more than 0",
        ),
        (
            flags(|f| f.l2_lease_duration = Some("long".into())),
            "--l2-lease-duration",
            "not a duration",
        ),
        (
            flags(|f| f.nodeport_addresses = Some("10.0.0.0/33".into())),
            "--nodeport-addresses",
            "is not a CIDR",
        ),
        (
            flags(|f| f.min_sync_period = Some("soon".into())),
            "--min-sync-period",
            "not a duration",
        ),
        (
            flags(|f| f.sync_period = Some("3d".into())),
            "--sync-period",
            "unknown unit",
        ),
        (
            flags(|f| f.healthz_bind_address = Some("localhost".into())),
            "--healthz-bind-address",
            "is not ADDRESS:PORT",
        ),
        (
            flags(|f| f.metrics_bind_address = Some(":80".into())),
            "--metrics-bind-address",
            "is not ADDRESS:PORT",
        ),
    ];
    for (flags, setting, why) in cases {
        let e = error(flags, RunSettings::default());
        assert_eq!(e.setting, setting, "{e}");
        assert!(e.why.contains(why), "{setting}: {e}");
        assert!(e.to_string().starts_with(&format!("invalid {setting}: ")));
    }
}

#[test]
fn values_from_the_file_are_checked_like_flags() {
    let e = error(RunFlags::default(), file("minSyncPeriod: soon\n"));
    assert_eq!(e.setting, "--min-sync-period");
    // The flag's good value wins over the file's bad one.
    let given = flags(|f| f.min_sync_period = Some("2s".into()));
    assert!(resolve(given, file("minSyncPeriod: soon\n"), &env()).is_ok());
    // The first bad setting in documented order is the one reported.
    let e = error(RunFlags::default(), file("source: etcd\ndataplane: fpga\n"));
    assert_eq!(e.setting, "--source");
}

#[test]
fn ebpf_without_cgroup2_is_refused() {
    let environment = Environment {
        cgroup2_root: None,
        ..env()
    };
    let ebpf = || flags(|f| f.dataplane = Some("ebpf".into()));
    let e = resolve(ebpf(), RunSettings::default(), &environment).unwrap_err();
    assert_eq!(e.setting, "--cgroup-path");
    let given = flags(|f| {
        f.dataplane = Some("eBPF".into());
        f.cgroup_path = Some(PathBuf::from("/cg"));
    });
    let r = resolve(given, RunSettings::default(), &environment).unwrap();
    assert_eq!(r.dataplane.mode, Dataplane::Ebpf);
    assert_eq!(r.dataplane.cgroup, Some(PathBuf::from("/cg")));
    let auto = resolve(RunFlags::default(), RunSettings::default(), &environment).unwrap();
    assert_eq!(auto.dataplane.cgroup, None, "auto falls back to userspace");
}
