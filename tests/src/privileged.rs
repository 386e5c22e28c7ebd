//! The gate every privileged test passes first: without root (or without
//! the embedded eBPF object) the test is skipped with a loud message, or
//! fails when FERRY_REQUIRE_PRIVILEGED=1 (as in CI).

/// True when a privileged test may run. When it may not, prints why and
/// returns false, or panics if FERRY_REQUIRE_PRIVILEGED=1.
pub fn require_privileged(test: &str, extra_requirement: Result<(), String>) -> bool {
    let reason = if is_root() {
        extra_requirement.err()
    } else {
        Some("not running as root".to_string())
    };
    match reason {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("FERRY_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                "{test}: privileged test cannot run ({why}) and FERRY_REQUIRE_PRIVILEGED=1"
            );
            eprintln!("SKIPPED {test}: {why} (set FERRY_REQUIRE_PRIVILEGED=1 to fail instead)");
            false
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The preamble of an eBPF test: returns from it unless it may run
/// privileged with the eBPF object (see [`require_privileged`]).
#[macro_export]
macro_rules! needs_ebpf {
    ($test:expr) => {
        if !$crate::require_privileged($test, $crate::ebpf_object()) {
            return;
        }
    };
}
