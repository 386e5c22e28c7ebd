//! Starting the demo: on loopback with the userspace dataplane, or in
//! network namespaces (a node with a bridge, three pods) with the eBPF
//! dataplane; the Service and EndpointSlice files `ferry run` reads.

use anyhow::{Context, Result};
use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use super::traffic::serve_http;
use super::{in_netns, Demo, Net, DEMO_METRICS, NAMESPACES};
use crate::deps;
use crate::host::{bridge_port, ip};

impl Demo {
    /// The userspace variant's set-up: backends on loopback, the agent
    /// with `--dataplane userspace`.
    pub(super) fn start_userspace(&mut self, ferry: &Path) -> Result<()> {
        let net = self.net;
        println!(
            "== the cluster on loopback: node {}, pods {:?} (HTTP on :{})",
            net.node_ip, net.pods, net.target_port
        );
        for (i, pod_ip) in net.pods.iter().enumerate() {
            let listener = TcpListener::bind((*pod_ip, net.target_port))
                .with_context(|| format!("binding {pod_ip}:{}", net.target_port))?;
            serve_http(
                listener,
                format!("pod-{}", i + 1),
                self.stop_servers.clone(),
            );
        }
        self.write_yaml(&net.pods)?;
        println!(
            "== starting ferry run --dataplane userspace --source file:{}",
            self.dir.display()
        );
        let log = File::create(self.dir.join("ferry.log"))?;
        // As root, the agent still runs unprivileged (as nobody): the
        // userspace dataplane needs no privilege on loopback.
        let mut cmd = if deps::is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(ferry);
            println!("== (root: the agent runs as nobody via setpriv)");
            c
        } else {
            Command::new(ferry)
        };
        let child = cmd
            .args([
                "run",
                "--dataplane",
                "userspace",
                "--hostname-override",
                "node-demo",
            ])
            .arg(format!("--source=file:{}", self.dir.display()))
            .args(["--min-sync-period", "100ms"])
            .args([
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                DEMO_METRICS,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        self.agent = Some(child);
        Ok(())
    }

    /// The eBPF variant's set-up; returns the node namespace the client
    /// runs in.
    pub(super) fn start_namespaces(&mut self, ferry: &Path) -> Result<String> {
        const PODS: [&str; 3] = NAMESPACES.pods;
        const NODE_IP: &str = NAMESPACES.node_ip;
        println!("== building the cluster: node {NODE_IP} (bridge), pods {PODS:?}");
        let node = self.build_pods(NODE_IP, &PODS)?;
        let cgroup = self.cgroup_root.join(&self.tag);
        std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        self.cgroup = Some(cgroup.clone());
        self.write_yaml(&PODS)?;
        self.spawn_ferry(ferry, &cgroup)?;
        // This process becomes the client: it joins the cgroup the
        // socket-level programs are attached to and talks from the node.
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(node)
    }

    /// The node namespace with its bridge, and a namespace per pod on it
    /// running the HTTP server; returns the node's namespace.
    fn build_pods(&mut self, node_ip: &str, pods: &[&str]) -> Result<String> {
        let node = self.netns("node")?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        for (i, pod_ip) in pods.iter().enumerate() {
            let pod = self.netns(&format!("pod{}", i + 1))?;
            bridge_port(
                &node,
                &format!("veth{}", i + 1),
                &pod,
                &format!("{pod_ip}/24"),
                None,
            )?;
            let name = format!("pod-{}", i + 1);
            let listener = in_netns(&pod, || Ok(TcpListener::bind("0.0.0.0:8080")?))?;
            serve_http(listener, name, self.stop_servers.clone());
        }
        Ok(node)
    }

    /// `ferry run` on the demo's files, attached to `cgroup`.
    fn spawn_ferry(&mut self, ferry: &Path, cgroup: &Path) -> Result<()> {
        println!("== starting ferry run --source file:{}", self.dir.display());
        let log = File::create(self.dir.join("ferry.log"))?;
        let child = Command::new(ferry)
            .args([
                "run",
                "--dataplane",
                "ebpf",
                // The host's own interfaces stay untouched by the demo.
                "--interfaces",
                "none",
                "--hostname-override",
                "node-demo",
            ])
            .arg(format!("--source=file:{}", self.dir.display()))
            .arg(format!("--bpffs-path={}", self.pins.display()))
            .arg(format!("--cgroup-path={}", cgroup.display()))
            .args(["--min-sync-period", "100ms"])
            .args([
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        self.agent = Some(child);
        Ok(())
    }

    pub(super) fn write_yaml(&self, pods: &[&str]) -> Result<()> {
        let Net {
            node_ip,
            cluster_ip,
            second_cluster_ip,
            port,
            target_port,
            node_port,
            ..
        } = *self.net;
        let services = format!(
            r"apiVersion: v1
kind: Node
metadata:
  name: node-demo
status:
  addresses:
  - {{type: InternalIP, address: {node_ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: {port}, targetPort: {target_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-nodeport, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {second_cluster_ip}
  ports: [{{name: http, port: {port}, targetPort: {target_port}, nodePort: {node_port}}}]
"
        );
        let mut slices = String::new();
        for svc in ["web", "web-nodeport"] {
            let endpoints: Vec<String> = pods
                .iter()
                .map(|ip| {
                    format!(
                        "- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node-demo}}"
                    )
                })
                .collect();
            slices.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: {target_port}}}]\nendpoints:\n{}\n",
                endpoints.join("\n")
            ));
        }
        std::fs::write(self.dir.join("services.yaml"), services)?;
        // Write then rename: the agent never reads half a file.
        let tmp = self.dir.join(".slices.yaml.tmp");
        std::fs::write(&tmp, slices)?;
        std::fs::rename(&tmp, self.dir.join("slices.yaml"))?;
        Ok(())
    }
}
