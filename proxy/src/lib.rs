//! Ferry's agent library: the pipeline stages, the dataplanes and the CLI
//! share this crate; the `ferry` binary is a thin front-end.

pub mod ebpf;
