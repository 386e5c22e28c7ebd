//! Reads the TC program's per-CPU traffic counters and sums them over CPUs.

use aya::maps::PerCpuArray;
use aya::Ebpf;
use ferry_common::counters::{ClassCounter, TrafficClass, TC_COUNTERS_MAP, TRAFFIC_CLASSES};

use super::EbpfError;

/// Packets and bytes per traffic class, summed over every CPU.
pub fn read(ebpf: &Ebpf) -> Result<Vec<(TrafficClass, ClassCounter)>, EbpfError> {
    let map = ebpf
        .map(TC_COUNTERS_MAP)
        .ok_or_else(|| EbpfError::MissingMap {
            name: TC_COUNTERS_MAP.into(),
        })?;
    let map_err = |source| EbpfError::Map {
        name: TC_COUNTERS_MAP.into(),
        source: Box::new(source),
    };
    let array: PerCpuArray<_, ClassCounter> = PerCpuArray::try_from(map).map_err(map_err)?;
    let mut out = Vec::with_capacity(TRAFFIC_CLASSES as usize);
    for class in TrafficClass::ALL {
        let per_cpu = array.get(&(class as u32), 0).map_err(map_err)?;
        let total = per_cpu
            .iter()
            .fold(ClassCounter::default(), |acc, c| ClassCounter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
        out.push((class, total));
    }
    Ok(out)
}
