//! The control plane on the control-plane node: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler as processes in that node's
//! namespaces, with the flags kubeadm would give them.

use anyhow::Result;
use std::time::Duration;

use super::poll::poll;
use super::{
    node, Layout, NodeSpec, API_PORT, CLUSTER_CIDR, CONTROL_PLANE_IP, NODES, SERVICE_CIDR,
};

fn control_plane() -> &'static NodeSpec {
    &NODES[0]
}

pub fn start_etcd(layout: &Layout) -> Result<()> {
    let data = layout.state.join("etcd");
    let argv = vec![
        layout.program("etcd").display().to_string(),
        format!("--data-dir={}", data.display()),
        format!("--name={}", control_plane().name),
        format!(
            "--initial-cluster={}=http://127.0.0.1:2380",
            control_plane().name
        ),
        "--listen-client-urls=http://127.0.0.1:2379".into(),
        "--advertise-client-urls=http://127.0.0.1:2379".into(),
        "--listen-peer-urls=http://127.0.0.1:2380".into(),
        "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
        "--listen-metrics-urls=http://127.0.0.1:2381".into(),
        // A test cluster: its data goes with it, so no fsync per write.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ];
    node::spawn(layout, control_plane(), "etcd", &argv)?;
    wait_for(layout, "etcd", "http://127.0.0.1:2381/health", 30)
}

pub fn start_apiserver(layout: &Layout) -> Result<()> {
    let pki = layout.pki();
    let p = |f: &str| pki.join(f).display().to_string();
    let argv = vec![
        layout.program("kube-apiserver").display().to_string(),
        "--etcd-servers=http://127.0.0.1:2379".into(),
        format!("--advertise-address={CONTROL_PLANE_IP}"),
        format!("--secure-port={API_PORT}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!(
            "--kubelet-client-certificate={}",
            p("apiserver-kubelet-client.crt")
        ),
        format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    node::spawn(layout, control_plane(), "kube-apiserver", &argv)?;
    wait_for(
        layout,
        "kube-apiserver",
        &format!("https://{CONTROL_PLANE_IP}:{API_PORT}/readyz"),
        90,
    )
}

pub fn start_controllers(layout: &Layout) -> Result<()> {
    let pki = layout.pki();
    let p = |f: &str| pki.join(f).display().to_string();
    let cm = layout
        .state
        .join("controller-manager.kubeconfig")
        .display()
        .to_string();
    let argv = vec![
        layout
            .program("kube-controller-manager")
            .display()
            .to_string(),
        format!("--kubeconfig={cm}"),
        format!("--authentication-kubeconfig={cm}"),
        format!("--authorization-kubeconfig={cm}"),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
        format!("--cluster-signing-cert-file={}", p("ca.crt")),
        format!("--cluster-signing-key-file={}", p("ca.key")),
        "--use-service-account-credentials=true".into(),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
        "--node-cidr-mask-size=24".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--v=1".into(),
    ];
    node::spawn(layout, control_plane(), "kube-controller-manager", &argv)?;
    let sched = layout
        .state
        .join("scheduler.kubeconfig")
        .display()
        .to_string();
    let argv = vec![
        layout.program("kube-scheduler").display().to_string(),
        format!("--kubeconfig={sched}"),
        format!("--authentication-kubeconfig={sched}"),
        format!("--authorization-kubeconfig={sched}"),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--v=1".into(),
    ];
    node::spawn(layout, control_plane(), "kube-scheduler", &argv)?;
    Ok(())
}

/// Stops the API server (SIGTERM, then SIGKILL after 10 s).
pub fn stop_apiserver(layout: &Layout) -> Result<()> {
    let pid: u32 =
        std::fs::read_to_string(layout.pid_file(control_plane().name, "kube-apiserver"))?
            .trim()
            .parse()?;
    // SAFETY: signalling the API server process we started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    node::wait_or_kill(pid, Duration::from_secs(10));
    Ok(())
}

/// Polls `url` from the control-plane node until it answers healthy.
fn wait_for(layout: &Layout, what: &str, url: &str, seconds: u64) -> Result<()> {
    let ca = layout.pki().join("ca.crt").display().to_string();
    let log = layout.log(control_plane().name, what);
    let goal = format!("{what} answering {url} (see {})", log.display());
    poll(
        &goal,
        Duration::from_secs(seconds),
        Duration::from_millis(250),
        || {
            let probe = node::in_netns(
                control_plane().ns,
                &format!("curl -s --max-time 2 --cacert {ca} {url}"),
            );
            // kube-apiserver's /readyz says "ok", etcd's /health a JSON object.
            let healthy = |body: &str| body.trim() == "ok" || body.contains(r#""health":"true""#);
            Ok(match probe {
                Ok(body) if healthy(&body) => Ok(()),
                Ok(body) => Err(format!("answered {:?}", body.trim())),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    )
}
