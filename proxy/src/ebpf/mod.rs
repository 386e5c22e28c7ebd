//! The embedded eBPF object and the edge that loads it into the kernel.
//! Errors name the program or map and the cause.

pub mod counters;
pub mod keeper;
pub mod lb;
pub mod status;
pub mod tc;

use std::path::Path;

use aya::programs::{Program, ProgramError};
use aya::{Ebpf, EbpfError as AyaEbpfError, EbpfLoader};
use ferry_common::lb as maps;

use crate::datapath::MapCapacities;

/// The object `cargo xtask build-ebpf` produced, embedded at build time;
/// empty when the binary was built without bpf-linker.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-ebpf.o"));

/// The embedded eBPF object, if this binary was built with one.
pub fn object() -> Option<&'static [u8]> {
    (!OBJECT.is_empty()).then_some(OBJECT)
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this ferry binary was built without eBPF programs (bpf-linker was missing at build \
         time); run `cargo xtask build-ebpf` and rebuild, or use the userspace dataplane"
    )]
    NotBuilt,
    #[error("parsing the embedded eBPF object: {0}")]
    Parse(#[source] Box<AyaEbpfError>),
    #[error("eBPF program {name} not found in the object")]
    MissingProgram { name: String },
    #[error("eBPF map {name} not found in the object")]
    MissingMap { name: String },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("bpffs at {path}: {cause}")]
    Bpffs {
        path: String,
        #[source]
        cause: Cause,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned link {path}: {cause}")]
    Link {
        path: String,
        #[source]
        cause: Cause,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// What failed under an [`EbpfError`]: what was being done, and the error
/// that stopped it (kept as the source) when there was one.
#[derive(Debug, thiserror::Error)]
#[error("{what}{}", .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct Cause {
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    /// `what` failed with `source`.
    pub fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Cause {
        Cause {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// A failure with no error under it (a check that did not hold).
    pub fn msg(what: impl Into<String>) -> Cause {
        Cause {
            what: what.into(),
            source: None,
        }
    }
}

/// Names of the programs in the embedded object, parsed without touching
/// the kernel.
pub fn embedded_programs() -> Result<Vec<String>, EbpfError> {
    let bytes = object().ok_or(EbpfError::NotBuilt)?;
    let obj = aya_obj::Object::parse(bytes).map_err(|e| EbpfError::Parse(Box::new(e.into())))?;
    let mut names: Vec<String> = obj.programs.keys().cloned().collect();
    names.sort();
    Ok(names)
}

/// Parses the embedded object and creates its maps (no program is loaded),
/// with the load-balancing maps pinned by name under `pin_dir` (reused when
/// already there: that is what makes restarts hitless).
pub fn open(pin_dir: &Path, caps: &MapCapacities) -> Result<Ebpf, EbpfError> {
    let bytes = object().ok_or(EbpfError::NotBuilt)?;
    lb::ensure_pin_dir(pin_dir)?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(maps::SERVICES4_MAP, caps.services)
        .map_max_entries(maps::BACKENDS4_MAP, caps.backends)
        .map_max_entries(maps::REVNAT4_MAP, caps.frontends)
        .map_max_entries(maps::MAGLEV4_MAP, caps.frontends)
        .map_max_entries(maps::AFFINITY4_MAP, caps.affinity)
        .map_max_entries(maps::SOCK_REVNAT4_MAP, caps.sock_revnat)
        .map_max_entries(maps::SOURCE_RANGES4_MAP, caps.source_ranges)
        .map_max_entries(maps::CT4_MAP, caps.conntrack)
        .load(bytes)
        .map_err(|e| EbpfError::Parse(Box::new(e)))
}

/// Names of every program in the embedded object.
pub fn program_names(ebpf: &Ebpf) -> Vec<String> {
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    names.sort();
    names
}

/// Loads one program into the kernel (running the verifier on it); one
/// already loaded is left as it is.
pub fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| EbpfError::MissingProgram { name: name.into() })?;
    let result = match program {
        Program::SchedClassifier(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        _ => {
            return Err(EbpfError::Program {
                name: name.into(),
                source: Box::new(ProgramError::UnexpectedProgramType),
            })
        }
    };
    match result {
        // Loaded before (a program attached again): that one serves.
        Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(()),
        Err(source) => Err(EbpfError::Program {
            name: name.into(),
            source: Box::new(source),
        }),
    }
}

/// Loads every program of the embedded object; the kernel's verifier must
/// accept each. Maps are pinned under a scratch directory of `bpffs`
/// (removed again). Returns the names loaded.
pub fn verify_all(bpffs: &Path) -> Result<Vec<String>, EbpfError> {
    let scratch = bpffs.join(format!("ferry-verify-{}", std::process::id()));
    let result = (|| {
        let mut ebpf = open(&scratch, &MapCapacities::default())?;
        let names = program_names(&ebpf);
        for name in &names {
            load_program(&mut ebpf, name)?;
        }
        Ok(names)
    })();
    lb::remove_pins(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_holds_the_tc_program_or_reports_not_built() {
        match embedded_programs() {
            Ok(names) => assert!(
                names
                    .iter()
                    .any(|n| n == ferry_common::counters::TC_INGRESS_PROGRAM),
                "{names:?}"
            ),
            Err(EbpfError::NotBuilt) => assert!(object().is_none()),
            Err(e) => panic!("embedded object does not parse: {e}"),
        }
    }
}
