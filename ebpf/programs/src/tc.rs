//! TC programs on the interfaces traffic enters and leaves the node by.
//! Ingress counts every frame by class, then hands IPv4 TCP/UDP to the
//! translation in [`crate::nat`]; egress reverses replies of translated
//! flows that leave the node. Frames that are no Service's pass untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use ferry_common::counters::{ClassCounter, TrafficClass, ETH_P_IP, TRAFFIC_CLASSES};

use crate::nat;

/// Offset of the EtherType in an Ethernet header.
const ETHERTYPE_OFFSET: usize = 12;
/// Offset of the protocol field of an IPv4 header that follows a bare
/// Ethernet header.
const IPV4_PROTOCOL_OFFSET: usize = 14 + 9;

#[map(name = "ferry_counters")]
static COUNTERS: PerCpuArray<ClassCounter> = PerCpuArray::with_max_entries(TRAFFIC_CLASSES, 0);

#[classifier]
pub fn ferry_tc_ingress(ctx: TcContext) -> i32 {
    // A frame too short to classify is still passed on untouched.
    let _ = try_count(&ctx);
    match nat::parse(&ctx) {
        // A failed rewrite must not leave half a translation on the wire.
        Ok(Some(flow)) => nat::ingress(&ctx, &flow).unwrap_or(TC_ACT_SHOT),
        _ => TC_ACT_OK,
    }
}

#[classifier]
pub fn ferry_tc_egress(ctx: TcContext) -> i32 {
    match nat::parse(&ctx) {
        Ok(Some(flow)) => nat::egress(&ctx, &flow).unwrap_or(TC_ACT_SHOT),
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn try_count(ctx: &TcContext) -> Result<(), i64> {
    let ether_type = u16::from_be(ctx.load::<u16>(ETHERTYPE_OFFSET)?);
    let protocol = if ether_type == ETH_P_IP {
        ctx.load::<u8>(IPV4_PROTOCOL_OFFSET)?
    } else {
        0
    };
    let class = TrafficClass::classify(ether_type, protocol);
    let counter = COUNTERS.get_ptr_mut(class as u32).ok_or(0i64)?;
    // SAFETY: the pointer comes from the map lookup and is this CPU's slot;
    // no other program instance runs on this CPU concurrently.
    unsafe {
        (*counter).packets += 1;
        (*counter).bytes += u64::from(ctx.len());
    }
    Ok(())
}
