//! A node's container runtime and kubelet: containerd 2 with runc and
//! Debian's CNI plugins, the locally assembled images imported, and a
//! kubelet in cgroup v1 mode (this kernel's hierarchy is hybrid) registered
//! under the node's name and address. The CNI configuration is written once
//! the controller manager gave the node its pod CIDR.

use anyhow::Result;
use std::path::Path;
use std::time::Duration;

use super::poll::poll;
use super::{images, node, pki, Layout, NodeSpec, DNS_SERVICE_IP, NODES};

pub fn start_containerd(
    layout: &Layout,
    spec: &NodeSpec,
    archives: &[std::path::PathBuf],
) -> Result<()> {
    let dir = layout.node(spec.name);
    std::fs::write(
        dir.join("etc-containerd/config.toml"),
        containerd_config(images::PAUSE),
    )?;
    let path = format!(
        "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
        layout.bin.display()
    );
    let argv = vec![
        "env".into(),
        path.clone(),
        layout.program("containerd").display().to_string(),
        "--config=/etc/containerd/config.toml".into(),
    ];
    node::spawn(layout, spec, "containerd", &argv)?;
    let ctr = layout.program("ctr").display().to_string();
    let what = format!("node {}: containerd answering", spec.name);
    poll(
        &what,
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(node::exec(layout, spec, &[&ctr, "version"])
                .map(|_| ())
                .map_err(|e| format!("{e:#}")))
        },
    )?;
    for archive in archives {
        let archive = archive.display().to_string();
        node::exec(
            layout,
            spec,
            &[&ctr, "-n", "k8s.io", "images", "import", &archive],
        )?;
    }
    Ok(())
}

fn containerd_config(pause: &str) -> String {
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which this
  # machine's bounding set lacks (kubelet asks -998 for sandboxes): keep
  # every container at or above containerd's own score instead.
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
"#
    )
}

pub fn start_kubelet(layout: &Layout, spec: &NodeSpec) -> Result<()> {
    let dir = layout.node(spec.name);
    let kubeconfig = pki::kubeconfig(
        layout,
        &pki::Client {
            stem: &format!("kubelet-{}", spec.name),
            user: &format!("system:node:{}", spec.name),
            group: Some("system:nodes"),
        },
    )?;
    let config = dir.join("etc-kubernetes/kubelet.yaml");
    std::fs::write(dir.join("etc-kubernetes/resolv.conf"), "")?;
    std::fs::write(&config, kubelet_config(&layout.pki().join("ca.crt")))?;
    let argv = vec![
        layout.program("kubelet").display().to_string(),
        "--config=/etc/kubernetes/kubelet.yaml".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={}", spec.name),
        format!("--node-ip={}", spec.ip),
        "--v=1".into(),
    ];
    node::spawn(layout, spec, "kubelet", &argv)?;
    Ok(())
}

fn kubelet_config(ca: &Path) -> String {
    format!(
        r"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
# This kernel mounts cgroups hybrid (v1 controllers); KEP-5573.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: [{DNS_SERVICE_IP}]
clusterDomain: cluster.local
resolvConf: /etc/kubernetes/resolv.conf
# Disks of test machines are often fuller than kubelet's defaults allow.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
serializeImagePulls: false
rotateCertificates: false
",
        ca = ca.display()
    )
}

/// Waits for every node's pod CIDR, then writes each node's CNI bridge
/// configuration and the routes to the other nodes' pods (kindnet's job
/// in kind).
pub fn configure_pod_network(layout: &Layout) -> Result<()> {
    let what = "a pod CIDR for every node (see the kubelet logs)";
    let cidrs = poll(
        what,
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            let text = crate::host::sh(layout.kubectl().args([
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR}{\"\\n\"}{end}",
            ]));
            let found: Vec<(String, String)> = text
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, cidr)| !cidr.is_empty())
                .map(|(n, c)| (n.to_string(), c.to_string()))
                .collect();
            Ok(if found.len() == NODES.len() {
                Ok(found)
            } else {
                Err(format!("{found:?}"))
            })
        },
    )?;
    for spec in &NODES {
        let own = cidr_of(&cidrs, spec.name)?;
        std::fs::write(
            layout
                .node(spec.name)
                .join("etc-cni-net.d/10-ferry-bridge.conflist"),
            cni_config(own)?,
        )?;
        for other in NODES.iter().filter(|o| o.name != spec.name) {
            let theirs = cidr_of(&cidrs, other.name)?;
            crate::host::ip(&["-n", spec.ns, "route", "replace", theirs, "via", other.ip])?;
        }
    }
    Ok(())
}

fn cidr_of<'a>(cidrs: &'a [(String, String)], name: &str) -> Result<&'a str> {
    cidrs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, c)| c.as_str())
        .ok_or_else(|| anyhow::anyhow!("node {name} has no pod CIDR"))
}

/// A bridge `cni0` with the node's pod CIDR; its first address is the
/// pods' gateway.
fn cni_config(cidr: &str) -> Result<String> {
    let (net, _) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("pod CIDR {cidr:?} is not a CIDR"))?;
    let net: std::net::Ipv4Addr = net.parse()?;
    let gateway = std::net::Ipv4Addr::from(u32::from(net) + 1);
    Ok(format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "ferry-pods",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{cidr}", "gateway": "{gateway}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#
    ))
}
