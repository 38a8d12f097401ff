//! The L1 kernel entry (built only with the `kernel` feature).
#![no_std]
#![no_main]

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Entry point.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    loop {}
}
