//! Map keys, values and constants shared by the eBPF programs and the agent;
//! every type is `#[repr(C)]` without implicit padding so both sides agree
//! byte for byte.
#![no_std]

pub mod counters;
pub mod lb;
