//! The rows of the dataplane benchmark and what each is given: its Service
//! address, its rules (iptables, nftables), HAProxy's configuration and
//! Ferry's objects, with the measured Service last.

use super::{BACKENDS, NODE_ADDRESS, NODE_PORT_HTTP, NODE_PORT_IPERF};
use std::fmt::Write as _;
use std::path::Path;

/// The rows, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Row {
    /// Client -> backend through the node, no translation: the limit.
    Direct,
    /// From the node itself to the backend: the limit for socket-level LB.
    DirectFromNode,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Ipvs,
    Haproxy,
    FerryUserspace,
    /// ClusterIP from a client on the node (socket-level LB at connect()).
    FerryEbpfClusterIp,
    /// NodePort from the client namespace (the TC path).
    FerryEbpfNodePort,
}

impl Row {
    pub(super) const ALL: [Row; 10] = [
        Row::Direct,
        Row::DirectFromNode,
        Row::IptablesLegacy,
        Row::IptablesNft,
        Row::Nftables,
        Row::Ipvs,
        Row::Haproxy,
        Row::FerryUserspace,
        Row::FerryEbpfClusterIp,
        Row::FerryEbpfNodePort,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::DirectFromNode => "direct (from node)",
            Row::IptablesLegacy => "iptables-legacy",
            Row::IptablesNft => "iptables-nft",
            Row::Nftables => "nftables",
            Row::Ipvs => "ipvs",
            Row::Haproxy => "haproxy (tcp mode)",
            Row::FerryUserspace => "ferry userspace",
            Row::FerryEbpfClusterIp => "ferry ebpf ClusterIP (socket LB, from node, 1 endpoint)",
            Row::FerryEbpfNodePort => "ferry ebpf NodePort (TC)",
        }
    }

    /// The name `--rows` takes.
    pub(super) fn key(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::DirectFromNode => "direct-node",
            Row::IptablesLegacy => "iptables-legacy",
            Row::IptablesNft => "iptables-nft",
            Row::Nftables => "nftables",
            Row::Ipvs => "ipvs",
            Row::Haproxy => "haproxy",
            Row::FerryUserspace => "ferry-userspace",
            Row::FerryEbpfClusterIp => "ferry-ebpf",
            Row::FerryEbpfNodePort => "ferry-nodeport",
        }
    }

    /// The row whose figures this one is compared with.
    pub(super) fn baseline(self) -> Row {
        match self {
            Row::DirectFromNode | Row::FerryEbpfClusterIp => Row::DirectFromNode,
            _ => Row::Direct,
        }
    }

    /// The third octet of this row's Service IP.
    pub(super) fn octet(self) -> u8 {
        self as u8 + 1
    }

    pub(super) fn service_ip(self) -> String {
        format!("198.19.{}.10", self.octet())
    }

    pub(super) fn iperf_ip(self) -> String {
        format!("198.19.{}.11", self.octet())
    }

    /// Where requests go.
    pub(super) fn http_target(self) -> String {
        match self {
            Row::Direct | Row::DirectFromNode => format!("{}:80", BACKENDS[0]),
            Row::FerryEbpfNodePort => format!("{NODE_ADDRESS}:{NODE_PORT_HTTP}"),
            _ => format!("{}:80", self.service_ip()),
        }
    }

    pub(super) fn iperf_port(self) -> u16 {
        if self == Row::FerryEbpfNodePort {
            NODE_PORT_IPERF
        } else {
            5201
        }
    }

    pub(super) fn iperf_target(self) -> String {
        match self {
            Row::Direct | Row::DirectFromNode => BACKENDS[0].to_string(),
            Row::FerryEbpfNodePort => NODE_ADDRESS.to_string(),
            _ => self.iperf_ip(),
        }
    }

    /// Runs from the node namespace (else from the client namespace).
    pub(super) fn runs_on_node(self) -> bool {
        matches!(self, Row::DirectFromNode | Row::FerryEbpfClusterIp)
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Metric {
    RpsKeepAlive,
    RpsNewConnection,
    P50Ms,
    P99Ms,
    ThroughputGbps,
    NodeCpuPct,
    /// wrk's socket errors and non-2xx answers, both wrk runs.
    Errors,
    /// Mean run time of the connect4 program during the new-connection run
    /// (kernel.bpf_stats_enabled), socket-LB row only; reported apart.
    Connect4Ns,
}

impl Metric {
    pub(super) const ALL: [Metric; 7] = [
        Metric::RpsKeepAlive,
        Metric::RpsNewConnection,
        Metric::P50Ms,
        Metric::P99Ms,
        Metric::ThroughputGbps,
        Metric::NodeCpuPct,
        Metric::Errors,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Metric::RpsKeepAlive => "req/s keep-alive",
            Metric::RpsNewConnection => "req/s new connection",
            Metric::P50Ms => "p50 ms (new connection)",
            Metric::P99Ms => "p99 ms (new connection)",
            Metric::ThroughputGbps => "iperf3 Gbit/s",
            Metric::NodeCpuPct => "machine CPU % (new connection)",
            Metric::Errors => "errors",
            Metric::Connect4Ns => "connect4 program ns per connect()",
        }
    }

    pub(super) fn key(self) -> &'static str {
        match self {
            Metric::RpsKeepAlive => "rps_keepalive",
            Metric::RpsNewConnection => "rps_new_connection",
            Metric::P50Ms => "p50_ms",
            Metric::P99Ms => "p99_ms",
            Metric::ThroughputGbps => "iperf3_gbps",
            Metric::NodeCpuPct => "cpu_pct",
            Metric::Errors => "errors",
            Metric::Connect4Ns => "connect4_ns",
        }
    }
}

/// iptables-restore input in kube-proxy's shape: KUBE-SERVICES jumps to a
/// KUBE-SVC chain per Service, which picks a KUBE-SEP chain with `statistic
/// random`, which DNATs. `extra` Services come first, the measured ones
/// last (the worst case: every new connection walks the whole list).
pub(super) fn iptables_rules(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 200 + 4096);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..extra {
        let _ = writeln!(s, ":KUBE-SVC-X{i} - [0:0]\n:KUBE-SEP-X{i} - [0:0]");
    }
    s.push_str(":KUBE-SVC-WEB - [0:0]\n:KUBE-SVC-IPERF - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n:KUBE-SEP-3 - [0:0]\n:KUBE-SEP-IPERF - [0:0]\n");
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    s.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..extra {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d 198.19.{}.{}/32 -p tcp -m comment --comment \"bench/x{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X{i}\n-A KUBE-SVC-X{i} -j KUBE-SEP-X{i}\n-A KUBE-SEP-X{i} -p tcp -m tcp -j DNAT --to-destination {}:80",
            100 + i / 250,
            1 + i % 250,
            BACKENDS[i % 3]
        );
    }
    let svc = row.service_ip();
    let iperf = row.iperf_ip();
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -d {svc}/32 -p tcp -m comment --comment \"bench/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-WEB\n\
         -A KUBE-SERVICES -d {iperf}/32 -p tcp -m tcp --dport 5201 -j KUBE-SVC-IPERF\n\
         -A KUBE-SVC-WEB -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-1\n\
         -A KUBE-SVC-WEB -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-2\n\
         -A KUBE-SVC-WEB -j KUBE-SEP-3\n\
         -A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SEP-3 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SVC-IPERF -j KUBE-SEP-IPERF\n\
         -A KUBE-SEP-IPERF -p tcp -m tcp -j DNAT --to-destination {}:5201",
        BACKENDS[0], BACKENDS[1], BACKENDS[2], BACKENDS[0]
    );
    s.push_str("COMMIT\n");
    s
}

/// One Service's endpoint moves (x0 from b1 to b2), applied the way
/// today's kube-proxy does: iptables-restore --noflush of the changed
/// chains only (MinimizeIPTablesRestore), or one nft transaction that
/// rewrites the Service's chain.
pub(super) fn one_change(row: Row) -> Option<(&'static str, Vec<&'static str>, String)> {
    match row {
        Row::IptablesLegacy | Row::IptablesNft => Some((
            if row == Row::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            },
            vec!["--noflush"],
            format!(
                "*nat\n:KUBE-SEP-X0 - [0:0]\n-A KUBE-SEP-X0 -p tcp -m tcp -j DNAT --to-destination {}:80\nCOMMIT\n",
                BACKENDS[1]
            ),
        )),
        Row::Nftables => Some((
            "nft",
            vec!["-f"],
            format!(
                "flush chain ip ferry-bench-kp svc-x0\nadd rule ip ferry-bench-kp svc-x0 meta l4proto tcp dnat to {}:80\n",
                BACKENDS[1]
            ),
        )),
        _ => None,
    }
}

/// `nft -f` input in kube-proxy's nftables shape: a verdict map from
/// address . protocol . port to a per-Service chain, which picks an
/// endpoint chain with `numgen random`.
pub(super) fn nft_rules(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 250 + 4096);
    s.push_str("table ip ferry-bench-kp {\n");
    let mut elements = Vec::with_capacity(extra + 2);
    for i in 0..extra {
        let _ = writeln!(
            s,
            "  chain svc-x{i} {{ meta l4proto tcp dnat to {}:80; }}",
            BACKENDS[i % 3]
        );
        elements.push(format!(
            "198.19.{}.{} . tcp . 80 : goto svc-x{i}",
            100 + i / 250,
            1 + i % 250
        ));
    }
    for (i, b) in BACKENDS.iter().enumerate() {
        let _ = writeln!(
            s,
            "  chain ep-{} {{ meta l4proto tcp dnat to {b}:80; }}",
            i + 1
        );
    }
    let _ = writeln!(
        s,
        "  chain svc-web {{ numgen random mod 3 vmap {{ 0 : goto ep-1, 1 : goto ep-2, 2 : goto ep-3 }}; }}\n  chain svc-iperf {{ meta l4proto tcp dnat to {}:5201; }}",
        BACKENDS[0]
    );
    elements.push(format!("{} . tcp . 80 : goto svc-web", row.service_ip()));
    elements.push(format!("{} . tcp . 5201 : goto svc-iperf", row.iperf_ip()));
    let _ = writeln!(
        s,
        "  map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }}; }}",
        elements.join(", ")
    );
    s.push_str("  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
    s.push_str("  chain nat-output { type nat hook output priority -100; policy accept; ip daddr . meta l4proto . th dport vmap @service-ips; }\n}\n");
    s
}

/// HAProxy as an operator would tune it for L4: TCP mode, two threads,
/// and splice(2) for bulk transfers ("option splice-auto"; "maxpipes"
/// keeps its descriptor need within the harness's RLIMIT_NOFILE, which
/// HAProxy otherwise refuses to start under with maxconn 9000).
pub(super) fn haproxy_config(row: Row, dir: &Path) -> String {
    format!(
        "global\n  maxconn 9000\n  maxpipes 500\n  nbthread 2\n  pidfile {}/haproxy.pid\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend web\n  bind {}:80\n  default_backend web\nbackend web\n  balance roundrobin\n  server b1 {}:80\n  server b2 {}:80\n  server b3 {}:80\nfrontend iperf\n  bind {}:5201\n  default_backend iperf\nbackend iperf\n  server b1 {}:5201\n",
        dir.display(),
        row.service_ip(),
        BACKENDS[0],
        BACKENDS[1],
        BACKENDS[2],
        row.iperf_ip(),
        BACKENDS[0]
    )
}

/// Service + EndpointSlice YAML for Ferry's file source: the measured
/// Service (3 endpoints; 1 for the socket-LB row), the iperf3 one, and `extra` one-endpoint ones.
pub(super) fn ferry_yaml(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 600 + 4096);
    // The NodePort row's Services are NodePorts (the extra ones stay
    // ClusterIPs: they fill the same maps the TC path looks up).
    let node_port = |port: u16| match (row, port) {
        (Row::FerryEbpfNodePort, 80) => format!(", nodePort: {NODE_PORT_HTTP}"),
        (Row::FerryEbpfNodePort, _) => format!(", nodePort: {NODE_PORT_IPERF}"),
        _ => String::new(),
    };
    let mut add = |name: &str, ip: &str, port: u16, eps: &[&str], np: String| {
        let kind = if np.is_empty() {
            "ClusterIP"
        } else {
            "NodePort"
        };
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{type: {kind}, clusterIP: {ip}, ports: [{{name: p, port: {port}{np}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {port}}}]\nendpoints:\n"
        );
        for e in eps {
            let _ = writeln!(s, "- addresses: [{e}]");
        }
    };
    for i in 0..extra {
        add(
            &format!("x{i}"),
            &format!("198.19.{}.{}", 100 + i / 250, 1 + i % 250),
            80,
            &[BACKENDS[i % 3]],
            String::new(),
        );
    }
    // The socket-LB row is compared with connections from the node straight
    // to the first backend, so its Service has that one endpoint: the
    // comparison then differs only in the translation at connect() (three
    // nginx servers instead of one change the figures on two vCPUs, with
    // keep-alive too, where the socket programs do nothing per request).
    let web: &[&str] = if row == Row::FerryEbpfClusterIp {
        &BACKENDS[..1]
    } else {
        &BACKENDS
    };
    add("web", &row.service_ip(), 80, web, node_port(80));
    add(
        "iperf",
        &row.iperf_ip(),
        5201,
        &[BACKENDS[0]],
        node_port(5201),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_put_the_measured_service_last() {
        let r = iptables_rules(Row::IptablesLegacy, 3);
        let last_svc = r.rfind("-A KUBE-SERVICES").unwrap();
        assert!(r[last_svc..].contains("--dport 5201"));
        assert!(
            r.find("198.19.100.1/32").unwrap() < r.find(&Row::IptablesLegacy.service_ip()).unwrap()
        );
        let n = nft_rules(Row::Nftables, 2);
        assert!(n.contains("numgen random mod 3"));
        assert!(n.contains("198.19.100.2 . tcp . 80 : goto svc-x1"));
        let (tool, args, change) = one_change(Row::IptablesNft).unwrap();
        assert_eq!((tool, args), ("iptables-nft-restore", vec!["--noflush"]));
        assert!(change.contains(":KUBE-SEP-X0") && change.ends_with("COMMIT\n"));
        assert!(one_change(Row::Nftables)
            .unwrap()
            .2
            .contains("flush chain ip ferry-bench-kp svc-x0"));
        assert!(one_change(Row::Haproxy).is_none());
        let y = ferry_yaml(Row::FerryUserspace, 2);
        assert_eq!(y.matches("kind: Service\n").count(), 4);
    }
}
