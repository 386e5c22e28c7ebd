//! Test support: the privileged-test gate and network namespaces that
//! clean themselves up. Test traffic never leaves namespaces made here.

pub mod bpf;
pub mod fake_api;
pub mod icmp;
pub mod netns;
pub mod privileged;

pub use netns::Netns;
pub use privileged::require_privileged;
