//! Multiboot v1 test kernel for the platform L0 gives its guests (QEMU's
//! `-kernel` conventions): it prints, one `platform: ` line each, its
//! command line, the fw_cfg signature, id, RAM size and CPU count, its
//! first module (string and first line), what the local APIC reports, a
//! one-shot and then a periodic LAPIC timer taken on its own IDT, and
//! exits through port 0xf4 with a 32-bit write of `exit=N` (default 0).
//! With the word `unhandled` on the command line it first touches what L0
//! does not emulate: port 0x61, the IOAPIC page at 0xfec00000 (read and
//! write) and MSR 0x1234 (RDMSR, whose #GP its IDT takes and skips).
//!
//! Built by `tests/build.rs` like `multiboot.rs` (plain `rustc`, no SSE,
//! no `core::fmt`), with the L1 kernel's trampoline (identity map of the
//! first 4 GiB, so the APIC page at 0xfee00000 is reachable), console and
//! runtime through `#[path]`.
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

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

use text::Hex;

/// fw_cfg ports (QEMU docs/specs/fw_cfg.rst).
const FW_CFG_SEL: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;

/// Local APIC registers (SDM Vol. 3, Table 11-1), identity mapped.
const APIC_BASE: usize = 0xfee0_0000;
const APIC_VERSION: usize = 0x30;
const APIC_EOI: usize = 0xb0;
const APIC_SVR: usize = 0xf0;
const APIC_ICR_LOW: usize = 0x300;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// The timer's vector.
const TIMER_VECTOR: usize = 0x40;
/// Bounds every wait so a missing interrupt ends in a message, not a hang.
const MAX_WAITS: u32 = 1_000_000;

/// Interrupts taken by the timer handler (incremented in assembly).
#[no_mangle]
static PLATFORM_TICKS: AtomicU32 = AtomicU32::new(0);

/// #GP faults taken (and skipped) by the #GP handler.
#[no_mangle]
static PLATFORM_GP: AtomicU32 = AtomicU32::new(0);

/// #GP vector.
const GP_VECTOR: usize = 13;
/// An MSR index nothing implements.
const UNKNOWN_MSR: u32 = 0x1234;

/// A 64-bit interrupt gate (SDM Vol. 3, 6.14.1).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Gate([u64; 2]);

#[repr(C, align(4096))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate([0; 2]); 256]);

extern "C" {
    fn platform_timer_entry();
    fn platform_gp_entry();
}

// The timer handler: count, EOI, return. Only RAX is used (saved).
// The #GP handler: count, skip the 2-byte RDMSR/WRMSR that faulted (RIP
// is above the error code), drop the error code, return.
global_asm!(
    r#"
    .section .text.platform_timer, "ax"
    .globl platform_timer_entry
platform_timer_entry:
    push rax
    lock inc dword ptr [rip + PLATFORM_TICKS]
    mov eax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq
    .globl platform_gp_entry
platform_gp_entry:
    lock inc dword ptr [rip + PLATFORM_GP]
    add qword ptr [rsp + 8], 2
    add rsp, 8
    iretq
"#
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(
        "platform: panic: ",
        info.message().as_str().unwrap_or("(formatted message)")
    );
    io::exit(3)
}

fn outw(port: u16, value: u16) {
    // SAFETY: port output has no memory effects on this kernel.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

fn phys_bytes(addr: u32, len: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    // SAFETY: the trampoline identity-maps the first 4 GiB and the loader
    // placed these bytes; nothing writes them while this kernel runs.
    unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) }
}

fn le32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Reads `N` bytes of fw_cfg item `key`.
fn fw_cfg<const N: usize>(key: u16) -> [u8; N] {
    outw(FW_CFG_SEL, key);
    let mut b = [0u8; N];
    for x in b.iter_mut() {
        *x = io::inb(FW_CFG_DATA);
    }
    b
}

fn apic_read(reg: usize) -> u32 {
    // SAFETY: the APIC page is identity mapped; a 32-bit aligned read.
    unsafe { core::ptr::read_volatile((APIC_BASE + reg) as *const u32) }
}

fn apic_write(reg: usize, v: u32) {
    // SAFETY: as for `apic_read`.
    unsafe { core::ptr::write_volatile((APIC_BASE + reg) as *mut u32, v) }
}

fn gate(handler: u64) -> Gate {
    Gate([
        (handler & 0xffff)
            | (u64::from(boot::KERNEL_CS) << 16)
            | (0x8e << 40)
            | ((handler >> 16 & 0xffff) << 48),
        handler >> 32,
    ])
}

fn load_idt() {
    // SAFETY: single CPU, interrupts off: nothing else touches the IDT.
    let base = unsafe {
        let idt = &raw mut IDT;
        (*idt).0[TIMER_VECTOR] = gate(platform_timer_entry as usize as u64);
        (*idt).0[GP_VECTOR] = gate(platform_gp_entry as usize as u64);
        idt as u64
    };
    let desc: [u16; 5] = [
        (256 * 16 - 1) as u16,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ];
    // SAFETY: `desc` is a valid IDTR image of a live, static IDT.
    unsafe { asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack)) }
}

/// `sti; hlt` until `PLATFORM_TICKS` reaches `n` (bounded); then `cli`.
fn wait_ticks(n: u32) -> bool {
    for _ in 0..MAX_WAITS {
        if PLATFORM_TICKS.load(Ordering::SeqCst) >= n {
            // SAFETY: masking interrupts has no memory effects.
            unsafe { asm!("cli", options(nomem, nostack)) };
            return true;
        }
        // SAFETY: STI; HLT waits for the next interrupt (the timer).
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
    // SAFETY: as above.
    unsafe { asm!("cli", options(nomem, nostack)) };
    false
}

fn first_line(b: &[u8]) -> &str {
    let end = b
        .iter()
        .position(|&c| c == b'\n' || !(0x20..=0x7e).contains(&c))
        .unwrap_or(b.len());
    core::str::from_utf8(b.get(..end).unwrap_or(&[])).unwrap_or("")
}

fn report_modules(info: &[u8]) {
    let flags = le32(info, 0);
    let count = if flags & (1 << 3) != 0 {
        le32(info, 20)
    } else {
        0
    };
    say!("platform: modules=", count);
    if count == 0 {
        return;
    }
    let m = phys_bytes(le32(info, 24), 16);
    let (start, end, string) = (le32(m, 0), le32(m, 4), le32(m, 8));
    let bytes = phys_bytes(start, end.saturating_sub(start) as usize);
    say!(
        "platform: module[0] start=",
        Hex(start.into()),
        " len=",
        end.saturating_sub(start),
        " string=\"",
        multiboot::cmdline_str(phys_bytes(string, 256)),
        "\""
    );
    say!("platform: module[0] first line=\"", first_line(bytes), "\"");
}

fn report_fw_cfg() {
    let sig = fw_cfg::<4>(0x00);
    say!(
        "platform: fw_cfg signature=",
        core::str::from_utf8(&sig).unwrap_or("?")
    );
    say!(
        "platform: fw_cfg id=",
        u32::from_le_bytes(fw_cfg::<4>(0x01))
    );
    let ram = u64::from_le_bytes(fw_cfg::<8>(0x03));
    say!("platform: fw_cfg ram=", ram >> 20, " MiB");
    say!(
        "platform: fw_cfg cpus=",
        u16::from_le_bytes(fw_cfg::<2>(0x05))
    );
    let unknown = u32::from_le_bytes(fw_cfg::<4>(0x1234));
    say!("platform: fw_cfg unknown key=", Hex(unknown.into()));
}

fn report_apic() {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID has no side effects.
    let ecx = unsafe { core::arch::x86_64::__cpuid(1) }.ecx;
    say!("platform: cpuid x2apic=", ecx & (1 << 21) != 0);
    apic_write(APIC_SVR, 0x1ff);
    say!(
        "platform: lapic version=",
        Hex((apic_read(APIC_VERSION) & 0xff).into())
    );
    // INIT, then SIPI, to all excluding self: no other CPU exists.
    let mut idle = true;
    for icr in [0x000c_4500u32, 0x000c_4610] {
        apic_write(APIC_ICR_LOW, icr);
        idle &= apic_read(APIC_ICR_LOW) & ICR_DELIVERY_PENDING == 0;
    }
    say!("platform: lapic icr idle after INIT/SIPI=", idle);
}

/// Touches a port, an MMIO page and an MSR nobody emulates.
fn probe_unhandled() {
    let port = io::inb(0x61);
    // SAFETY: the trampoline identity-maps the IOAPIC page; nothing backs
    // it under L0, so the read returns all ones and the write is dropped.
    let mmio = unsafe {
        let p = 0xfec0_0000usize as *mut u32;
        let v = core::ptr::read_volatile(p);
        core::ptr::write_volatile(p.wrapping_add(4), 0);
        v
    };
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR of an unimplemented MSR raises #GP, which the IDT's
    // handler counts and skips (RDMSR is 2 bytes); EDX:EAX keep their
    // zero inputs then.
    unsafe {
        asm!("rdmsr", in("ecx") UNKNOWN_MSR, inout("eax") 0u32 => lo, inout("edx") 0u32 => hi, options(nostack))
    };
    say!(
        "platform: unhandled port 0x61=",
        Hex(port.into()),
        " mmio=",
        Hex(mmio.into()),
        " msr #GP=",
        PLATFORM_GP.load(Ordering::SeqCst),
        " value=",
        Hex(u64::from(hi) << 32 | u64::from(lo))
    );
}

fn run_timer() {
    apic_write(APIC_TDCR, 0xb); // divide by 1
    apic_write(APIC_LVT_TIMER, TIMER_VECTOR as u32);
    apic_write(APIC_TMICT, 1_000_000);
    let ok = wait_ticks(1);
    say!(
        "platform: lapic one-shot ticks=",
        PLATFORM_TICKS.load(Ordering::SeqCst),
        " fired=",
        ok,
        " current count=",
        apic_read(APIC_TMCCT)
    );
    PLATFORM_TICKS.store(0, Ordering::SeqCst);
    apic_write(APIC_LVT_TIMER, TIMER_VECTOR as u32 | LVT_PERIODIC);
    apic_write(APIC_TMICT, 200_000);
    let ok = wait_ticks(3);
    apic_write(APIC_LVT_TIMER, TIMER_VECTOR as u32 | LVT_MASKED);
    apic_write(APIC_TMICT, 0);
    say!(
        "platform: lapic periodic ticks=",
        PLATFORM_TICKS.load(Ordering::SeqCst),
        " fired=",
        ok
    );
    apic_write(APIC_EOI, 0);
}

/// Called by the boot trampoline in 64-bit mode.
#[no_mangle]
pub extern "C" fn kernel_main(magic: u32, info_addr: u32) -> ! {
    io::serial_init();
    let info = phys_bytes(info_addr, 28);
    let Ok(mb) = multiboot::BootInfo::parse(magic, info) else {
        say!(
            "platform: bad boot information (magic ",
            Hex(magic.into()),
            ")"
        );
        io::exit(2)
    };
    let cmdline = mb
        .cmdline_addr
        .map_or("", |a| multiboot::cmdline_str(phys_bytes(a, 4096)));
    say!("platform: cmdline=\"", cmdline, "\"");
    say!(
        "platform: mem_lower=",
        mb.mem_lower_kib.unwrap_or(0),
        " KiB mem_upper=",
        mb.mem_upper_kib.unwrap_or(0),
        " KiB"
    );
    load_idt();
    if cmdline::has_flag(cmdline, "unhandled") {
        probe_unhandled();
    }
    report_fw_cfg();
    report_modules(info);
    report_apic();
    run_timer();
    let status = cmdline::value_of(cmdline, "exit")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    say!("platform: exit status ", status);
    io::exit(status)
}
