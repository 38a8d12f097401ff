//! Multiboot v1 test kernel: an "unmodified" L1 hypervisor. It knows
//! nothing about L0: no trap port, no hypervisor CPUID leaf, no tolerance
//! for a refused CR4.VMXE. Its #GP and #UD handlers print the fault and
//! end the run (status 0x0d / 0x06), as a plain kernel's would.
//!
//! It loads its own GDT (with a TSS) and IDT, sets CR4.VMXE with `mov cr4`,
//! executes VMXON, VMCLEAR, VMPTRLD and the VMWRITEs of a minimal 64-bit L2
//! (controls adjusted to the capability MSRs), VMLAUNCHes it, handles the
//! L2's OUT (exit 30, unconditional I/O exiting) by skipping it and
//! VMRESUMEs; the L2 then ends with VMCALL (exit 18). L1 reads each exit
//! reason with VMREAD and prints it on COM1 (and the last one on 0xe9),
//! then exits through the debug-exit port with 0 on success.
//!
//! Command line: `end=out` ends the L2 with a second OUT instead of VMCALL;
//! `gp=1` finally writes CR4 with a reserved bit (the #GP must reach this
//! kernel's handler); `ud=1` finally executes UD2 (the #UD must reach it).
//!
//! Built by `tests/build.rs` with plain `rustc`; reuses the L1 kernel's
//! boot trampoline (Multiboot header, 32-bit entry, identity paging, long
//! mode), console and C runtime through `#[path]`. Runs unchanged under
//! Bochs (`/work/shared/bochs/run`).
#![no_std]
#![no_main]
#![no_builtins]

#[path = "../../l1-guest-hv/src/text.rs"]
#[allow(dead_code)]
mod text;
#[macro_use]
#[path = "../../l1-guest-hv/src/kernel/io.rs"]
#[allow(dead_code)]
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
use core::ptr::{addr_of, addr_of_mut};

use text::Hex;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(
        "unmodified L1: panic: ",
        info.message().as_str().unwrap_or("(formatted message)")
    );
    io::exit(3)
}

const CR4_VMXE: u64 = 1 << 13;
const CS: u64 = 0x08;
const DS: u64 = 0x10;
const TR: u64 = 0x18;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

#[repr(C, align(16))]
struct Table<const N: usize>([u64; N]);

static mut GDT: Table<5> = Table([0; 5]);
static mut IDT: Table<64> = Table([0; 64]);
static mut TSS: Table<13> = Table([0; 13]);
static mut VMXON_REGION: Page = Page([0; 4096]);
static mut VMCS: Page = Page([0; 4096]);
static mut L2_STACK: Page = Page([0; 4096]);

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

extern "C" {
    fn ul1_gp_entry();
    fn ul1_ud_entry();
    fn ul1_other_entry();
    fn ul1_l2_vmcall();
    fn ul1_l2_out();
    /// VMLAUNCH (`resume` = 0) or VMRESUME; 0 after a VM exit, 1 for
    /// VMfailInvalid, 2 for VMfailValid.
    fn ul1_vm_enter(resume: u64) -> u64;
}

global_asm!(
    r#"
    .section .text.ul1, "ax"
    .globl ul1_gp_entry
ul1_gp_entry:
    movq %rsp, %rdi
    andq $-16, %rsp
    call ul1_gp_report
    .globl ul1_ud_entry
ul1_ud_entry:
    movq %rsp, %rdi
    andq $-16, %rsp
    call ul1_ud_report
    .globl ul1_other_entry
ul1_other_entry:
    movq %rsp, %rdi
    andq $-16, %rsp
    call ul1_other_report

    /* L2: OUT to port 0x80 (exit 30), then VMCALL (exit 18). */
    .globl ul1_l2_vmcall
ul1_l2_vmcall:
    movb $0x42, %al
    outb %al, $0x80
    vmcall
    hlt
    jmp ul1_l2_vmcall
    /* L2 for end=out: two OUTs. */
    .globl ul1_l2_out
ul1_l2_out:
    movb $0x43, %al
    outb %al, $0x80
    outb %al, $0x81
    hlt
    jmp ul1_l2_out

    .globl ul1_vm_enter
ul1_vm_enter:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq $0x6c14, %rax
    vmwrite %rsp, %rax
    leaq 5f(%rip), %rbx
    movq $0x6c16, %rax
    vmwrite %rbx, %rax
    testq %rdi, %rdi
    jnz 2f
    vmlaunch
    jmp 3f
2:  vmresume
3:  movq $1, %rax
    jc 4f
    movq $2, %rax
4:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
5:  xorl %eax, %eax
    jmp 4b
"#,
    options(att_syntax)
);

/// The frame words at the handler's RSP.
unsafe fn frame(rsp: *const u64, i: usize) -> u64 {
    // SAFETY: the CPU pushed at least 5 words there (caller's contract).
    unsafe { rsp.add(i).read_volatile() }
}

#[no_mangle]
extern "C" fn ul1_gp_report(rsp: *const u64) -> ! {
    // SAFETY: called by ul1_gp_entry with the #GP frame (error code first).
    let (err, rip) = unsafe { (frame(rsp, 0), frame(rsp, 1)) };
    say!("unmodified L1: #GP error ", Hex(err), " at RIP ", Hex(rip));
    io::exit(0x0d)
}

#[no_mangle]
extern "C" fn ul1_ud_report(rsp: *const u64) -> ! {
    // SAFETY: called by ul1_ud_entry with the #UD frame (no error code).
    let rip = unsafe { frame(rsp, 0) };
    say!("unmodified L1: #UD at RIP ", Hex(rip));
    io::exit(0x06)
}

#[no_mangle]
extern "C" fn ul1_other_report(rsp: *const u64) -> ! {
    // SAFETY: at least three words were pushed by any exception.
    let (a, b) = unsafe { (frame(rsp, 0), frame(rsp, 1)) };
    say!(
        "unmodified L1: unexpected exception, frame ",
        Hex(a),
        " ",
        Hex(b)
    );
    io::exit(0x7f)
}

fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an MSR this CPU reports (VMX, EFER, feature control).
    unsafe {
        asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(index: u32, value: u64) {
    // SAFETY: only IA32_FEATURE_CONTROL, to enable VMX (SDM 23.7).
    unsafe {
        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack))
    };
}

fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr3() -> u64 {
    let v;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr4() -> u64 {
    let v;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

fn write_cr4(v: u64) {
    // SAFETY: only VMXE (or a reserved bit, on purpose) changes.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nomem, nostack)) };
}

/// 0 VMsucceed, 1 VMfailInvalid, 2 VMfailValid (SDM 31.2).
fn outcome(rflags: u64) -> u64 {
    if rflags & 1 != 0 {
        1
    } else if rflags & 0x40 != 0 {
        2
    } else {
        0
    }
}

fn vmx_mem_op(which: u32, pa: u64) -> u64 {
    let ptr = &pa as *const u64;
    let f: u64;
    // SAFETY: VMXON/VMCLEAR/VMPTRLD with a pointer to a 4 KiB region of
    // this kernel; faults go to the handlers.
    unsafe {
        match which {
            0 => {
                asm!("vmxon qword ptr [{p}]", "pushfq", "pop {f}", p = in(reg) ptr, f = out(reg) f)
            }
            1 => {
                asm!("vmclear qword ptr [{p}]", "pushfq", "pop {f}", p = in(reg) ptr, f = out(reg) f)
            }
            _ => {
                asm!("vmptrld qword ptr [{p}]", "pushfq", "pop {f}", p = in(reg) ptr, f = out(reg) f)
            }
        }
    }
    outcome(f)
}

fn vmwrite(field: u64, value: u64) -> u64 {
    let f: u64;
    // SAFETY: VMWRITE to the current VMCS.
    unsafe {
        asm!("vmwrite {e}, {v}", "pushfq", "pop {f}", e = in(reg) field, v = in(reg) value, f = out(reg) f)
    };
    outcome(f)
}

fn vmread(field: u64) -> u64 {
    let v: u64;
    // SAFETY: VMREAD from the current VMCS.
    unsafe { asm!("vmread {v}, {e}", v = out(reg) v, e = in(reg) field) };
    v
}

/// A control value adjusted to its capability MSR (SDM A.3: allowed-0
/// settings in bits 31:0, allowed-1 in 63:32).
fn adjust(want: u32, msr: u32) -> u64 {
    let cap = rdmsr(msr);
    u64::from((want | cap as u32) & (cap >> 32) as u32)
}

fn tables() -> (u64, u64) {
    let tss = addr_of!(TSS) as u64;
    let gdt = addr_of_mut!(GDT);
    let idt = addr_of_mut!(IDT);
    // SAFETY: single-threaded boot; nothing else uses these tables yet.
    unsafe {
        (*gdt).0 = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x67 | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56),
            tss >> 32,
        ];
        for v in 0..32usize {
            let h = match v {
                6 => ul1_ud_entry as *const () as u64,
                13 => ul1_gp_entry as *const () as u64,
                _ => ul1_other_entry as *const () as u64,
            };
            (*idt).0[2 * v] =
                (h & 0xffff) | (CS << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
            (*idt).0[2 * v + 1] = h >> 32;
        }
        let gdtr = Dtr {
            limit: 5 * 8 - 1,
            base: gdt as u64,
        };
        let idtr = Dtr {
            limit: 32 * 16 - 1,
            base: idt as u64,
        };
        asm!(
            "lgdt [{g}]",
            "push 0x08",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov {t:e}, 0x10",
            "mov ds, {t:e}",
            "mov es, {t:e}",
            "mov ss, {t:e}",
            "mov fs, {t:e}",
            "mov gs, {t:e}",
            "mov {t:e}, 0x18",
            "ltr {t:x}",
            "lidt [{i}]",
            g = in(reg) &gdtr,
            i = in(reg) &idtr,
            t = out(reg) _,
        );
    }
    (gdt as u64, idt as u64)
}

fn phys_bytes(addr: u32, len: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    // SAFETY: the trampoline identity-maps the first 4 GiB and the loader
    // placed these bytes; nothing writes them while this kernel runs.
    unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) }
}

fn e9_line(s: &str, v: u64) {
    for b in s.bytes() {
        io::outb(0xe9, b);
    }
    let mut buf = [0u8; 20];
    for b in text::dec_str(v, &mut buf).bytes() {
        io::outb(0xe9, b);
    }
    io::outb(0xe9, b'\n');
}

/// Called by the boot trampoline in 64-bit mode.
#[no_mangle]
pub extern "C" fn kernel_main(magic: u32, info_addr: u32) -> ! {
    io::serial_init();
    let cmdline = multiboot::BootInfo::parse(magic, phys_bytes(info_addr, 20))
        .ok()
        .and_then(|i| i.cmdline_addr)
        .map_or("", |a| multiboot::cmdline_str(phys_bytes(a, 4096)));
    let (gdt, idt) = tables();
    say!(
        "unmodified L1: GDT ",
        Hex(gdt),
        " IDT ",
        Hex(idt),
        " #GP handler ",
        Hex(ul1_gp_entry as *const () as u64),
        " #UD handler ",
        Hex(ul1_ud_entry as *const () as u64),
        " cmdline \"",
        cmdline,
        "\""
    );
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    say!("unmodified L1: cpuid.1:ecx.vmx = ", (ecx >> 5) & 1);
    let fc = rdmsr(0x3a);
    if fc & 1 == 0 {
        wrmsr(0x3a, fc | 0x5);
    }
    say!("unmodified L1: IA32_FEATURE_CONTROL = ", Hex(rdmsr(0x3a)));
    let cr4 = read_cr4();
    write_cr4(cr4 | CR4_VMXE);
    let now = read_cr4();
    say!(
        "unmodified L1: mov cr4 with VMXE completed: cr4 was ",
        Hex(cr4),
        ", reads ",
        Hex(now),
        " (VMXE reads ",
        (now >> 13) & 1,
        ")"
    );
    let rev = rdmsr(0x480) & 0x7fff_ffff;
    let vmxon_pa = addr_of!(VMXON_REGION) as u64;
    let vmcs_pa = addr_of!(VMCS) as u64;
    // SAFETY: single-threaded; the regions are this kernel's.
    unsafe {
        (addr_of_mut!(VMXON_REGION) as *mut u32).write_volatile(rev as u32);
        (addr_of_mut!(VMCS) as *mut u32).write_volatile(rev as u32);
    }
    let r = vmx_mem_op(0, vmxon_pa);
    say!("unmodified L1: vmxon -> ", r);
    if r != 0 {
        io::exit(4)
    }
    let r = vmx_mem_op(1, vmcs_pa) | vmx_mem_op(2, vmcs_pa);
    say!("unmodified L1: vmclear+vmptrld -> ", r);
    if r != 0 {
        io::exit(5)
    }
    // Controls: HLT exiting, unconditional I/O exiting; 64-bit host and
    // guest with EFER loaded on both sides.
    let pin = adjust(0, 0x481);
    let proc = adjust((1 << 7) | (1 << 24), 0x482);
    let exit = adjust((1 << 9) | (1 << 21), 0x483);
    let entry = adjust((1 << 9) | (1 << 15), 0x484);
    let cr0 = (read_cr0() | rdmsr(0x486)) & rdmsr(0x487);
    // A hypervisor puts CR4 with the VMX fixed bits into its VMCS (VMXE is
    // fixed to 1, SDM A.8).
    let cr4 = (read_cr4() | rdmsr(0x488)) & rdmsr(0x489);
    let cr3 = read_cr3();
    let efer = rdmsr(0xc000_0080);
    let tss = addr_of!(TSS) as u64;
    let l2_entry = if cmdline::value_of(cmdline, "end") == Some("out") {
        ul1_l2_out as *const () as u64
    } else {
        ul1_l2_vmcall as *const () as u64
    };
    let fields: &[(u64, u64)] = &[
        (0x4000, pin),
        (0x4002, proc),
        (0x4004, 0),
        (0x4006, 0),
        (0x4008, 0),
        (0x400a, 0),
        (0x400c, exit),
        (0x400e, 0),
        (0x4010, 0),
        (0x4012, entry),
        (0x4014, 0),
        (0x4016, 0),
        (0x6000, 0),
        (0x6002, 0),
        (0x6004, cr0),
        (0x6006, cr4),
        (0x2800, u64::MAX),
        // Host state (SDM 25.5).
        (0x6c00, cr0),
        (0x6c02, cr3),
        (0x6c04, cr4),
        (0x0c00, DS),
        (0x0c02, CS),
        (0x0c04, DS),
        (0x0c06, DS),
        (0x0c08, DS),
        (0x0c0a, DS),
        (0x0c0c, TR),
        (0x6c06, 0),
        (0x6c08, 0),
        (0x6c0a, tss),
        (0x6c0c, gdt),
        (0x6c0e, idt),
        (0x4c00, 0),
        (0x6c10, 0),
        (0x6c12, 0),
        // Guest state (SDM 25.4): 64-bit, L1's paging and tables.
        (0x6800, cr0),
        (0x6802, cr3),
        (0x6804, cr4),
        (0x681a, 0x400),
        (0x681c, addr_of!(L2_STACK) as u64 + 4096 - 16),
        (0x681e, l2_entry),
        (0x6820, 0x2),
        (0x0802, CS),
        (0x6808, 0),
        (0x4802, 0xffff_ffff),
        (0x4816, 0xa09b),
        (0x0800, DS),
        (0x6806, 0),
        (0x4800, 0xffff_ffff),
        (0x4814, 0xc093),
        (0x0804, DS),
        (0x680a, 0),
        (0x4804, 0xffff_ffff),
        (0x4818, 0xc093),
        (0x0806, DS),
        (0x680c, 0),
        (0x4806, 0xffff_ffff),
        (0x481a, 0xc093),
        (0x0808, DS),
        (0x680e, 0),
        (0x4808, 0xffff_ffff),
        (0x481c, 0xc093),
        (0x080a, DS),
        (0x6810, 0),
        (0x480a, 0xffff_ffff),
        (0x481e, 0xc093),
        (0x080c, 0),
        (0x6812, 0),
        (0x480c, 0),
        (0x4820, 0x1_0000),
        (0x080e, TR),
        (0x6814, tss),
        (0x480e, 0x67),
        (0x4822, 0x8b),
        (0x6816, gdt),
        (0x4810, 5 * 8 - 1),
        (0x6818, idt),
        (0x4812, 32 * 16 - 1),
        (0x2802, 0),
        (0x482a, 0),
        (0x6824, 0),
        (0x6826, 0),
        (0x4824, 0),
        (0x4826, 0),
        (0x6822, 0),
    ];
    let mut failed = 0u64;
    for &(f, v) in fields {
        if vmwrite(f, v) != 0 {
            failed += 1;
            say!("unmodified L1: vmwrite ", Hex(f), " failed");
        }
    }
    if exit & (1 << 21) != 0 && vmwrite(0x2c02, efer) != 0 {
        failed += 1;
    }
    if entry & (1 << 15) != 0 && vmwrite(0x2806, efer) != 0 {
        failed += 1;
    }
    say!("unmodified L1: VMCS written, ", failed, " vmwrite failures");
    // SAFETY: the VMCS is complete; VM exits return through HOST_RIP.
    let r = unsafe { ul1_vm_enter(0) };
    if r != 0 {
        say!(
            "unmodified L1: vmlaunch failed (",
            r,
            "), VM-instruction error ",
            vmread(0x4400)
        );
        io::exit(6)
    }
    let first = vmread(0x4402) & 0xffff;
    let len = vmread(0x440c);
    say!(
        "unmodified L1: L2 exit reason ",
        first,
        " qualification ",
        Hex(vmread(0x6400)),
        " length ",
        len
    );
    let rip = vmread(0x681e);
    vmwrite(0x681e, rip + len);
    // SAFETY: as for VMLAUNCH.
    let r = unsafe { ul1_vm_enter(1) };
    if r != 0 {
        say!(
            "unmodified L1: vmresume failed (",
            r,
            "), VM-instruction error ",
            vmread(0x4400)
        );
        io::exit(7)
    }
    let last = vmread(0x4402) & 0xffff;
    say!(
        "unmodified L1: L2 exit reason ",
        last,
        " at guest RIP ",
        Hex(vmread(0x681e))
    );
    e9_line("unmodified L1: last L2 exit reason ", last);
    let want = if l2_entry == ul1_l2_vmcall as *const () as u64 {
        18
    } else {
        30
    };
    let ok = first == 30 && last == want;
    if cmdline::value_of(cmdline, "gp") == Some("1") {
        say!("unmodified L1: writing CR4 with reserved bit 15");
        write_cr4(read_cr4() | CR4_VMXE | (1 << 15));
        say!("unmodified L1: reserved CR4 bit accepted (wrong)");
        io::exit(8)
    }
    if cmdline::value_of(cmdline, "ud") == Some("1") {
        say!("unmodified L1: executing ud2");
        // SAFETY: raises #UD, which this kernel's handler reports.
        unsafe { asm!("ud2") };
    }
    if ok {
        say!("unmodified L1: passed");
        io::exit(0)
    }
    say!(
        "unmodified L1: FAILED (exit reasons ",
        first,
        ", ",
        last,
        ")"
    );
    io::exit(1)
}
