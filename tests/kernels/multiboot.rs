//! Multiboot v1 test kernel: prints its command line and the memory size
//! from the Multiboot information, then exits through the debug-exit port
//! with the status given as `exit=N` on the command line (default 0).
//!
//! Built by `tests/build.rs` with plain `rustc` (no cargo, no crates); it
//! reuses the L1 kernel's boot trampoline, console and C runtime and the
//! L1 library's text, Multiboot and command-line code through `#[path]`.
#![no_std]
#![no_main]
#![no_builtins]

#[path = "../../l1-guest-hv/src/text.rs"]
#[allow(dead_code)]
mod text;
#[macro_use]
#[path = "../../l1-guest-hv/src/kernel/io.rs"]
mod io;
#[path = "../../l1-guest-hv/src/kernel/boot.rs"]
#[allow(dead_code)]
mod boot;
#[path = "../../l1-guest-hv/src/cmdline.rs"]
#[allow(dead_code)]
mod cmdline;
#[path = "../../l1-guest-hv/src/multiboot.rs"]
#[allow(dead_code)]
mod multiboot;
#[path = "../../l1-guest-hv/src/kernel/rt.rs"]
mod rt;

use text::Hex;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(
        "multiboot test kernel: panic: ",
        info.message().as_str().unwrap_or("(formatted message)")
    );
    io::exit(3)
}

fn phys_bytes(addr: u32, len: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    // SAFETY: the trampoline identity-maps the first 4 GiB and the loader
    // placed these bytes; nothing writes them while this kernel runs.
    unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) }
}

/// Called by the boot trampoline in 64-bit mode.
#[no_mangle]
pub extern "C" fn kernel_main(magic: u32, info_addr: u32) -> ! {
    io::serial_init();
    let Ok(info) = multiboot::BootInfo::parse(magic, phys_bytes(info_addr, 20)) else {
        say!(
            "multiboot test kernel: bad boot information (magic ",
            Hex(magic.into()),
            " info ",
            Hex(info_addr.into()),
            ")"
        );
        io::exit(2)
    };
    let cmdline = info
        .cmdline_addr
        .map_or("", |a| multiboot::cmdline_str(phys_bytes(a, 4096)));
    say!("multiboot test kernel: cmdline=\"", cmdline, "\"");
    say!(
        "multiboot test kernel: mem_lower=",
        info.mem_lower_kib.unwrap_or(0),
        " KiB mem_upper=",
        info.mem_upper_kib.unwrap_or(0),
        " KiB memory=",
        info.memory_mib().unwrap_or(0),
        " MiB"
    );
    let status = cmdline::value_of(cmdline, "exit")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    say!("multiboot test kernel: exit status ", status);
    io::exit(status)
}
