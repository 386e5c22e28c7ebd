//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the binary
//! (one file to ship). Without it the binary still builds; the eBPF
//! dataplane then reports at run time that it has no programs.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default_dir = manifest.join("../target/ebpf");
    let source = if let Some(p) = std::env::var_os("FERRY_EBPF_OBJECT") {
        PathBuf::from(p)
    } else {
        // Watch the directory (created empty if needed) so the binary is
        // rebuilt when the object appears or changes.
        let _ = std::fs::create_dir_all(&default_dir);
        println!("cargo:rerun-if-changed={}", default_dir.display());
        default_dir.join("ferry-ebpf.o")
    };
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("ferry-ebpf.o");
    let bytes = std::fs::read(&source).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=no eBPF object at {}: building ferry without eBPF programs (run `cargo xtask build-ebpf`)",
            source.display()
        );
    }
    if let Err(e) = std::fs::write(&out, &bytes) {
        panic!("cannot write {}: {e}", out.display());
    }
}
