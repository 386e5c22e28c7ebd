//! Network namespaces created by a test (the shared `ferry-netns` crate:
//! per-test unique names, deleted on drop, also when the test panics), and
//! the topologies the dataplane tests build from them.

use anyhow::Result;

pub use ferry_netns::{Netns, VethLink};

/// The topology most dataplane tests use: a client namespace with
/// 198.18.`net`.1/24 and a backend namespace with 198.18.`net`.2/24 and
/// .3/24 (two backend addresses), joined by a veth pair named after `tag`.
pub fn client_and_backends(tag: &str, net: u8) -> Result<(Netns, Netns)> {
    let srv = Netns::new(&format!("{tag}srv"))?;
    let cli = Netns::new(&format!("{tag}cli"))?;
    let (local, remote) = (format!("{tag}0"), format!("{tag}1"));
    srv.veth_to(
        &cli,
        VethLink {
            local: &local,
            local_cidr: &format!("198.18.{net}.2/24"),
            remote: &remote,
            remote_cidr: &format!("198.18.{net}.1/24"),
        },
    )?;
    srv.ip(&["addr", "add", &format!("198.18.{net}.3/24"), "dev", &local])?;
    Ok((srv, cli))
}

/// The TC tests' topology: client (198.18.20.2) -- ext -- node (.20.1 |
/// .21.1 | .22.1) -- int -- backends (198.18.21.2, .3); node -- pod link
/// (no TC program) -- pod (198.18.22.2). The node forwards.
#[derive(Debug)]
pub struct TcTopology {
    pub cli: Netns,
    pub node: Netns,
    pub srv: Netns,
    pub pod: Netns,
}

impl TcTopology {
    pub fn new(tag: &str) -> Result<TcTopology> {
        let cli = Netns::new(&format!("{tag}c"))?;
        let node = Netns::new(&format!("{tag}n"))?;
        let srv = Netns::new(&format!("{tag}s"))?;
        let pod = Netns::new(&format!("{tag}p"))?;
        let links = [
            (&cli, "tce1", "198.18.20.2/24", "tce0", "198.18.20.1/24"),
            (&srv, "tcb1", "198.18.21.2/24", "tcb0", "198.18.21.1/24"),
            (&pod, "vethp1", "198.18.22.2/24", "vethp0", "198.18.22.1/24"),
        ];
        for (peer, local, local_cidr, remote, remote_cidr) in links {
            peer.veth_to(
                &node,
                VethLink {
                    local,
                    local_cidr,
                    remote,
                    remote_cidr,
                },
            )?;
        }
        srv.ip(&["addr", "add", "198.18.21.3/24", "dev", "tcb1"])?;
        for (ns, gw) in [
            (&cli, "198.18.20.1"),
            (&srv, "198.18.21.1"),
            (&pod, "198.18.22.1"),
        ] {
            ns.ip(&["route", "add", "default", "via", gw])?;
        }
        node.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        Ok(TcTopology {
            cli,
            node,
            srv,
            pod,
        })
    }

    /// Loads the programs with maps pinned at `pins` and attaches TC to the
    /// client and backend links of the node.
    pub fn attach(&self, pins: &std::path::Path) -> Result<aya::Ebpf> {
        self.attach_with(pins, ferry_proxy::datapath::MapCapacities::default())
    }

    /// [`TcTopology::attach`] with maps of these capacities.
    pub fn attach_with(
        &self,
        pins: &std::path::Path,
        caps: ferry_proxy::datapath::MapCapacities,
    ) -> Result<aya::Ebpf> {
        let pins = pins.to_path_buf();
        self.node.run(move || {
            let mut ebpf = ferry_proxy::ebpf::open(&pins, &caps)?;
            let links = ["tce0".to_string(), "tcb0".to_string()];
            let done = ferry_proxy::ebpf::tc::attach_tc(&mut ebpf, &pins, &links)?;
            anyhow::ensure!(done.len() == 4, "attached {done:?}");
            Ok(ebpf)
        })
    }
}
