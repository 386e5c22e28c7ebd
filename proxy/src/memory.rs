//! Memory of the agent: mimalloc (the `ferry` binary's global allocator)
//! returns freed memory to the OS lazily; after a full sync the agent asks
//! it to do so at once.

/// Returns freed memory to the OS now. After the first list of a large
/// cluster, tens of MiB of decoded objects are freed at once; mimalloc
/// would keep them mapped for another second (its purge delay), and the
/// agent's RSS right after programming 10,000 Services read 180-186 MiB
/// instead of 110-120 MiB. A purge delay of 250 ms instead cost 0.3 s of
/// start-up in page faults; one forced collection after the sync costs
/// neither (docs/BENCHMARKS.md).
pub fn release_freed() {
    // SAFETY: mi_collect is thread-safe; it frees nothing still in use.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
