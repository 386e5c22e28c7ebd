//! Per-CPU traffic counters written by the TC ingress program, indexed by
//! [`TrafficClass`]; the agent sums them over CPUs.

/// Name of the per-CPU array holding one [`ClassCounter`] per [`TrafficClass`].
/// At most 15 bytes (the kernel's BPF object name limit).
pub const TC_COUNTERS_MAP: &str = "ferry_counters";

/// Name of the TC ingress program in the eBPF object: it counts every
/// frame by class, translates flows entering the node to Services and
/// reverses replies to SNATed flows.
pub const TC_INGRESS_PROGRAM: &str = "ferry_tc_ingress";

/// What a packet seen by the TC program was, by its L3/L4 header.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficClass {
    Tcp = 0,
    Udp = 1,
    Sctp = 2,
    Icmp = 3,
    OtherIpv4 = 4,
    Ipv6 = 5,
    Arp = 6,
    Other = 7,
}

/// Number of slots in the counters map (one per [`TrafficClass`]).
pub const TRAFFIC_CLASSES: u32 = 8;

impl TrafficClass {
    /// Every class, in slot order.
    pub const ALL: [TrafficClass; TRAFFIC_CLASSES as usize] = [
        TrafficClass::Tcp,
        TrafficClass::Udp,
        TrafficClass::Sctp,
        TrafficClass::Icmp,
        TrafficClass::OtherIpv4,
        TrafficClass::Ipv6,
        TrafficClass::Arp,
        TrafficClass::Other,
    ];

    /// Classifies a frame from its EtherType and, for IPv4, its protocol number.
    #[inline(always)]
    pub fn classify(ether_type: u16, ipv4_protocol: u8) -> TrafficClass {
        match ether_type {
            ETH_P_IP => match ipv4_protocol {
                IPPROTO_TCP => TrafficClass::Tcp,
                IPPROTO_UDP => TrafficClass::Udp,
                IPPROTO_SCTP => TrafficClass::Sctp,
                IPPROTO_ICMP => TrafficClass::Icmp,
                _ => TrafficClass::OtherIpv4,
            },
            ETH_P_IPV6 => TrafficClass::Ipv6,
            ETH_P_ARP => TrafficClass::Arp,
            _ => TrafficClass::Other,
        }
    }

    /// Lower-case name, used as a bounded metric label.
    pub fn name(self) -> &'static str {
        match self {
            TrafficClass::Tcp => "tcp",
            TrafficClass::Udp => "udp",
            TrafficClass::Sctp => "sctp",
            TrafficClass::Icmp => "icmp",
            TrafficClass::OtherIpv4 => "other_ipv4",
            TrafficClass::Ipv6 => "ipv6",
            TrafficClass::Arp => "arp",
            TrafficClass::Other => "other",
        }
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Packets and bytes of one [`TrafficClass`] on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for ClassCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fill_their_slots_in_order() {
        for (slot, class) in TrafficClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, slot);
        }
    }

    #[test]
    fn classify_by_ethertype_and_protocol() {
        assert_eq!(
            TrafficClass::classify(ETH_P_IP, IPPROTO_TCP),
            TrafficClass::Tcp
        );
        assert_eq!(
            TrafficClass::classify(ETH_P_IP, IPPROTO_UDP),
            TrafficClass::Udp
        );
        assert_eq!(
            TrafficClass::classify(ETH_P_IP, IPPROTO_SCTP),
            TrafficClass::Sctp
        );
        assert_eq!(
            TrafficClass::classify(ETH_P_IP, IPPROTO_ICMP),
            TrafficClass::Icmp
        );
        assert_eq!(
            TrafficClass::classify(ETH_P_IP, 47),
            TrafficClass::OtherIpv4
        );
        assert_eq!(
            TrafficClass::classify(ETH_P_IPV6, IPPROTO_TCP),
            TrafficClass::Ipv6
        );
        assert_eq!(TrafficClass::classify(ETH_P_ARP, 0), TrafficClass::Arp);
        assert_eq!(TrafficClass::classify(0x88cc, 0), TrafficClass::Other);
    }

    #[test]
    fn counter_has_no_padding() {
        assert_eq!(core::mem::size_of::<ClassCounter>(), 16);
    }
}
