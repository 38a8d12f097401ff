//! The L1 kernel entry (built only with the `kernel` feature): a Multiboot
//! v1 kernel that runs a tiny VMX hypervisor. See `docs/l1-guest.md`.
#![no_std]
#![no_main]
#![no_builtins]

#[macro_use]
#[path = "kernel/io.rs"]
mod io;
#[path = "kernel/boot.rs"]
mod boot;
#[path = "kernel/cpu.rs"]
mod cpu;
#[path = "kernel/ept_mode.rs"]
mod ept_mode;
#[path = "kernel/hv.rs"]
mod hv;
#[path = "kernel/inject.rs"]
mod inject;
#[path = "kernel/modes.rs"]
mod modes;
#[path = "kernel/realmode.rs"]
mod realmode;
#[path = "kernel/rt.rs"]
mod rt;
#[path = "kernel/scenario_mode.rs"]
mod scenario_mode;
#[path = "kernel/vmx.rs"]
mod vmx;

use l1_guest_hv::abi;
use l1_guest_hv::cmdline;
use l1_guest_hv::multiboot::{cmdline_str, BootInfo, BootInfoError};
use l1_guest_hv::text;
use l1_guest_hv::text::Hex;

fn boot_info_error(e: BootInfoError) -> (&'static str, Hex) {
    match e {
        BootInfoError::BadMagic(m) => ("bad magic in EAX ", Hex(m.into())),
        BootInfoError::Truncated(n) => ("structure truncated at ", Hex(n as u64)),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(
        "L1: panic: ",
        info.message().as_str().unwrap_or("(formatted message)")
    );
    say!("Bail out! L1 panicked");
    io::exit(abi::EXIT_STATUS_CRASH)
}

/// Reads `len` bytes of physical memory below 4 GiB (identity-mapped).
fn phys_bytes(addr: u32, len: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    // SAFETY: the boot page tables identity-map the first 4 GiB; the
    // Multiboot loader put the information structure and the command line
    // at these addresses and nothing writes them while L1 runs.
    unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) }
}

/// Called by the boot trampoline in 64-bit mode.
#[no_mangle]
pub extern "C" fn kernel_main(magic: u32, info_addr: u32) -> ! {
    io::serial_init();
    cpu::init();
    say!("L1: tiny VMX hypervisor");
    let info = match BootInfo::parse(magic, phys_bytes(info_addr, 20)) {
        Ok(info) => info,
        Err(e) => {
            say!("L1: no usable Multiboot information: ", boot_info_error(e));
            BootInfo::default()
        }
    };
    let cmdline = info
        .cmdline_addr
        .map_or("", |a| cmdline_str(phys_bytes(a, 256)));
    say!(
        "L1: cmdline \"",
        cmdline,
        "\" memory ",
        info.memory_mib().unwrap_or(0),
        " MiB"
    );
    let status = match cmdline::test_mode(cmdline) {
        Ok(mode) => {
            say!("L1: test=", mode.name());
            modes::run(mode)
        }
        Err(cmdline::CmdlineError::UnknownTest(name)) => {
            say!("L1: unknown test \"", name, "\"; known:");
            for m in cmdline::TestMode::ALL {
                say!("  ", m.name());
            }
            say!("Bail out! unknown test");
            abi::EXIT_STATUS_FAIL
        }
    };
    say!("L1: exit status ", status);
    io::exit(status)
}
