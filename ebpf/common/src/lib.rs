//! Map keys, values and constants shared by the eBPF programs and the agent;
//! every type is `#[repr(C)]` without implicit padding so both sides agree
//! byte for byte.
#![no_std]
// The eBPF programs call these helpers: always inlined, so the verifier
// sees no BPF-to-BPF calls on the hot path.
#![allow(clippy::inline_always)]

pub mod counters;
pub mod lb;
