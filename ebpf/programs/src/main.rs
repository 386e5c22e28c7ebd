//! Ferry's eBPF programs. Every entry point is a thin function that calls a
//! `try_*` helper returning `Result`; packet access is bounds-checked and
//! nothing logs on the per-packet path.
#![no_std]
#![no_main]

mod ct;
mod maps;
mod nat;
mod packet;
mod pick;
mod sock;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
