//! Ferry's agent library: the pipeline stages, the dataplanes and the CLI
//! share this crate; the `ferry` binary is a thin front-end.

pub mod agent;
pub mod cli;
pub mod datapath;
pub mod dump;
pub mod ebpf;
pub mod explain;
pub mod health_check;
pub mod http;
pub mod ipam;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod netlink;
pub mod objects;
pub mod parse;
pub mod pipeline;
pub mod plan;
pub mod rows;
pub mod source;
pub mod track;
pub mod translate;
pub mod units;
pub mod userspace;
