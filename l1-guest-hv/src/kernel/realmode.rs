//! `test=realmode` and `test=realmode-no-ug`: an L2 that boots like a PC
//! does. L1 copies hand-written boot code below 1 MiB and starts L2 in
//! real mode at a reset-like state (CS = 0x0800, base 0x8000, IP 0) with
//! "unrestricted guest" and EPT. L2 prints, loads its GDT, sets CR0.PE,
//! far-jumps to 32-bit code, builds page tables, enables PAE, loads CR3,
//! sets EFER.LME with WRMSR, enables paging, far-jumps to 64-bit code,
//! prints and halts. Without unrestricted guest the same state is refused
//! at VM entry (exit reason 33 with bit 31, SDM 27.3.1.1: CR0.PE and
//! CR0.PG are fixed to 1 unless "unrestricted guest" is 1).

use core::arch::global_asm;

use l1_guest_hv::abi;
use l1_guest_hv::caps::apply_fixed;
use l1_guest_hv::exit::{reason, ShowResult, EXIT_REASON_ENTRY_FAILURE};
use l1_guest_hv::segment::AR_UNUSABLE;
use l1_guest_hv::text::{Hex, Sink, TextBuf};
use vmcs12::controls::{EntryControls, SecondaryProcBased};
use vmcs12::VmcsField;

use crate::ept_mode::build_identity_ept;
use crate::hv::{self, write_or_say as wr, Action, Caps, GuestSpec};
use crate::modes::{load_vmcs, report_run_named, Checks, Handler};
use crate::vmx::{self, GuestRegs};

/// Where L1 copies the boot code (CS base; CS selector = base >> 4).
const L2RM_BASE: u64 = 0x8000;
/// The boot code must end below L2's page tables at 0xa000 (see the asm).
const L2RM_MAX: u64 = 0x2000;
/// EFER.LME and EFER.LMA.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// CR0.PE, CR0.ET, CR0.NE, CR0.PG.
const CR0_PE: u64 = 1;
const CR0_ET_NE: u64 = 0x30;
const CR0_PG: u64 = 1 << 31;
/// CPUID.80000001H:EDX.LM (bit 29).
const CPUID_LM: u32 = 1 << 29;

extern "C" {
    static l2rm_start: u8;
    static l2rm_end: u8;
    static l2rm_pe_set: u8;
    static l2rm_gdt: u8;
    static l2rm_gdt_end: u8;
}

/// Offset of a blob symbol from `l2rm_start`.
fn blob_offset(sym: *const u8) -> u64 {
    (sym as u64).wrapping_sub(core::ptr::addr_of!(l2rm_start) as u64)
}

/// Copies the boot code to [`L2RM_BASE`]; false if it does not fit.
fn copy_blob() -> bool {
    let len = blob_offset(core::ptr::addr_of!(l2rm_end));
    if len > L2RM_MAX {
        say!(
            "L1: real-mode boot code is ",
            len,
            " bytes, more than ",
            L2RM_MAX
        );
        return false;
    }
    // SAFETY: the blob lies in L1's image; 0x8000-0x9fff is RAM L1 does
    // not use (identity-mapped by the boot page tables and by the EPT).
    unsafe {
        core::ptr::copy_nonoverlapping(
            core::ptr::addr_of!(l2rm_start),
            L2RM_BASE as *mut u8,
            len as usize,
        )
    };
    say!(
        "L1: copied ",
        len,
        " bytes of L2 boot code to ",
        Hex(L2RM_BASE)
    );
    true
}

/// Where L2 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Real mode at CS:IP = 0800:0000, like a reset vector.
    Reset,
    /// Right after `mov %eax, %cr0` set PE: CR0.PE = 1, CS still holds the
    /// real-mode segment (type 3, read/write accessed data), GDTR loaded;
    /// the next instruction is the far jump.
    PeSet,
}

/// Rewrites the guest state of the current VMCS for `start` (SDM 27.3.1
/// with unrestricted guest: real-mode segments have base = selector << 4,
/// limit 0xffff, accessed data/code types and DPL 0).
fn real_mode_state(caps: &Caps, start: Start) -> bool {
    use VmcsField::*;
    let [_, _, cr4_f0, cr4_f1] = caps.fixed;
    let cr0 = CR0_ET_NE | if start == Start::PeSet { CR0_PE } else { 0 };
    let cr4 = apply_fixed(0, cr4_f0, cr4_f1);
    let sel = L2RM_BASE >> 4;
    let cs_ar = if start == Start::PeSet { 0x93 } else { 0x9b };
    let (gdt, gdt_end, pe_set) = (
        blob_offset(core::ptr::addr_of!(l2rm_gdt)),
        blob_offset(core::ptr::addr_of!(l2rm_gdt_end)),
        blob_offset(core::ptr::addr_of!(l2rm_pe_set)),
    );
    let (rip, gdtr_base, gdtr_limit) = match start {
        Start::Reset => (0, 0, 0xffff),
        Start::PeSet => (pe_set, L2RM_BASE + gdt, gdt_end - gdt - 1),
    };
    let entry = vmx::vmread(VM_ENTRY_CONTROLS).unwrap_or(0)
        & !u64::from(EntryControls::IA32E_MODE_GUEST.bits());
    let mut ok = true;
    for (field, value) in [
        (VM_ENTRY_CONTROLS, entry),
        (GUEST_CR0, cr0),
        (CR0_READ_SHADOW, cr0),
        (GUEST_CR3, 0),
        (GUEST_CR4, cr4),
        (CR4_READ_SHADOW, 0),
        (GUEST_RIP, rip),
        (GUEST_RSP, 0),
        (GUEST_RFLAGS, 0x2),
        (GUEST_CS_SELECTOR, sel),
        (GUEST_CS_BASE, L2RM_BASE),
        (GUEST_CS_LIMIT, 0xffff),
        (GUEST_CS_AR_BYTES, cs_ar),
        (GUEST_TR_SELECTOR, 0),
        (GUEST_TR_BASE, 0),
        (GUEST_TR_LIMIT, 0xffff),
        (GUEST_TR_AR_BYTES, 0x8b),
        (GUEST_LDTR_AR_BYTES, AR_UNUSABLE.into()),
        (GUEST_GDTR_BASE, gdtr_base),
        (GUEST_GDTR_LIMIT, gdtr_limit),
        (GUEST_IDTR_BASE, 0),
        (GUEST_IDTR_LIMIT, 0x3ff),
    ] {
        ok &= wr(field, value);
    }
    for [s, b, l, a] in hv::GUEST_DATA_SEGMENTS {
        ok &= wr(s, sel) && wr(b, L2RM_BASE) && wr(l, 0xffff) && wr(a, 0x93);
    }
    if entry & u64::from(EntryControls::LOAD_EFER.bits()) != 0 {
        ok &= wr(GUEST_IA32_EFER, 0);
    }
    say!(
        "L1: L2 starts in ",
        if start == Start::Reset {
            "real mode"
        } else {
            "protected mode with a real-mode CS (after CR0.PE=1, before the far jump)"
        },
        ": CS ",
        Hex(sel),
        " base ",
        Hex(L2RM_BASE),
        " AR ",
        Hex(cs_ar),
        " IP ",
        Hex(rip),
        " CR0 ",
        Hex(cr0)
    );
    ok
}

/// Keeps the "IA-32e mode guest" entry control equal to the EFER.LMA L2
/// reached by itself (SDM 27.3.1.1 requires them equal at the next
/// VM entry); reports when the CPU already stored it at the exit.
fn sync_ia32e(notes: &mut u32) {
    let (Ok(efer), Ok(entry)) = (
        vmx::vmread(VmcsField::GUEST_IA32_EFER),
        vmx::vmread(VmcsField::VM_ENTRY_CONTROLS),
    ) else {
        return;
    };
    let bit = u64::from(EntryControls::IA32E_MODE_GUEST.bits());
    let want = if efer & EFER_LMA != 0 { bit } else { 0 };
    if entry & bit != want {
        say!(
            "L1: GUEST_IA32_EFER ",
            Hex(efer),
            ": IA-32e mode guest entry control <- ",
            u32::from(want != 0)
        );
        let _ = vmx::vmwrite(VmcsField::VM_ENTRY_CONTROLS, (entry & !bit) | want);
    } else if want != 0 && *notes == 0 {
        say!(
            "L1: GUEST_IA32_EFER ",
            Hex(efer),
            ": IA-32e mode guest entry control already 1 (stored at the VM exit)"
        );
        *notes += 1;
    }
}

/// One launch of the boot code; the handler and the last VM_EXIT_REASON.
fn launch(
    caps: &Caps,
    checks: &mut Checks,
    eptp: u64,
    start: Start,
    ug: bool,
) -> Option<(Handler, u64)> {
    if !copy_blob() {
        checks.check("realmode-boot-code", "copied", "too big", false);
        return None;
    }
    let mut secondary = SecondaryProcBased::ENABLE_EPT;
    if ug {
        secondary |= SecondaryProcBased::UNRESTRICTED_GUEST;
    }
    let spec = GuestSpec {
        entry: 0,
        io_ports: &[abi::SERIAL_PORT],
        msrs: &[],
        exception_bitmap: u32::MAX,
        secondary: secondary.bits(),
        eptp,
    };
    if !load_vmcs(caps, &spec, checks) {
        return None;
    }
    let sec = vmx::vmread(VmcsField::SECONDARY_VM_EXEC_CONTROL).unwrap_or(0);
    checks.check(
        if ug {
            "secondary-ept-ug"
        } else {
            "secondary-ept-only"
        },
        Hex(secondary.bits().into()),
        Hex(sec),
        sec & 0x82 == u64::from(secondary.bits()),
    );
    if !real_mode_state(caps, start) {
        checks.check("realmode-vmcs", "written", "VMWRITE failed", false);
        return None;
    }
    let mut h = Handler::new();
    let mut notes = 0u32;
    let result = hv::run_guest(false, |exit| {
        sync_ia32e(&mut notes);
        if exit.line.basic() == reason::CPUID
            && vmx::guest_reg(GuestRegs::RAX) as u32 == 0x8000_0001
        {
            // Long mode for L2, whatever L1's own CPUID says.
            let r = core::arch::x86_64::__cpuid(0x8000_0001);
            let edx = r.edx | CPUID_LM;
            say!(
                "L1: cpuid 0x80000001 -> edx ",
                Hex(u64::from(edx)),
                " (LM set for L2)"
            );
            for (reg, v) in [
                (GuestRegs::RAX, r.eax),
                (GuestRegs::RBX, r.ebx),
                (GuestRegs::RCX, r.ecx),
                (GuestRegs::RDX, edx),
            ] {
                vmx::set_guest_reg(reg, v.into());
            }
            return Action::Advance;
        }
        h.handle(exit)
    });
    let reason_now = vmx::vmread(VmcsField::VM_EXIT_REASON).unwrap_or(u64::MAX);
    let prefix = match start {
        Start::Reset => "realmode-",
        Start::PeSet => "pe-set-",
    };
    if reason_now & u64::from(EXIT_REASON_ENTRY_FAILURE) == 0 || result.is_err() {
        report_run_named(&h, result, checks, prefix);
    }
    Some((h, reason_now))
}

fn check_entered(checks: &mut Checks, name: &str, reason_now: u64) {
    let failed = reason_now & u64::from(EXIT_REASON_ENTRY_FAILURE) != 0;
    checks.check(
        name,
        "VM entry (no entry failure)",
        ("exit reason ", Hex(reason_now)),
        !failed,
    );
}

fn check_refused(checks: &mut Checks, name: &str, reason_now: u64) {
    let want = u64::from(EXIT_REASON_ENTRY_FAILURE | u32::from(reason::INVALID_GUEST_STATE));
    checks.check(name, Hex(want), Hex(reason_now), reason_now == want);
}

/// Checks that L2 printed its stage lines in order: from the real-mode
/// line when it started at the reset state, without it when it started
/// after CR0.PE=1. Check names start with `prefix`.
fn check_stages(checks: &mut Checks, prefix: &str, h: &Handler, from_real: bool) {
    let real = h.log.position("real mode");
    let pm = h.log.position("protected mode");
    let lm = h.log.position("long mode");
    let shown = |p: Option<usize>| if p.is_some() { "printed" } else { "absent" };
    let name = |suffix: &str| {
        let mut b = TextBuf::<64>::default();
        b.put(prefix);
        b.put(suffix);
        b
    };
    if from_real {
        checks.check(
            name("-real-mode-line").as_str(),
            "printed",
            shown(real),
            real.is_some(),
        );
    } else {
        checks.check(
            name("-no-real-mode-line").as_str(),
            "absent",
            shown(real),
            real.is_none(),
        );
    }
    checks.check(
        name("-protected-mode-line").as_str(),
        "printed",
        shown(pm),
        pm.is_some() && (!from_real || real < pm),
    );
    checks.check(
        name("-long-mode-line").as_str(),
        "printed after protected mode",
        shown(lm),
        lm.is_some() && pm < lm,
    );
}

/// The state L2 reached by itself: long mode, paging, 64-bit CS.
fn check_long_mode_state(checks: &mut Checks) {
    let r = |f: VmcsField| vmx::vmread(f);
    let cr0 = r(VmcsField::GUEST_CR0);
    checks.check(
        "realmode-final-cr0-pe-pg",
        Hex(CR0_PE | CR0_PG),
        ShowResult(cr0),
        cr0.is_ok_and(|v| v & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG),
    );
    let cr4 = r(VmcsField::GUEST_CR4);
    checks.check(
        "realmode-final-cr4-pae",
        "PAE (0x20) set",
        ShowResult(cr4),
        cr4.is_ok_and(|v| v & 0x20 != 0),
    );
    let cr3 = r(VmcsField::GUEST_CR3);
    checks.check(
        "realmode-final-cr3",
        "0xa000",
        ShowResult(cr3),
        cr3 == Ok(0xa000),
    );
    let efer = r(VmcsField::GUEST_IA32_EFER);
    checks.check(
        "realmode-final-efer-lme-lma",
        Hex(EFER_LME | EFER_LMA),
        ShowResult(efer),
        efer.is_ok_and(|v| v & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA),
    );
    let cs = r(VmcsField::GUEST_CS_SELECTOR);
    let ar = r(VmcsField::GUEST_CS_AR_BYTES);
    checks.check(
        "realmode-final-cs-64-bit",
        "CS 0x18, AR.L=1",
        (ShowResult(cs), (" AR ", ShowResult(ar))),
        cs == Ok(0x18) && ar.is_ok_and(|v| v & (1 << 13) != 0),
    );
    let entry = r(VmcsField::VM_ENTRY_CONTROLS);
    let bit = u64::from(EntryControls::IA32E_MODE_GUEST.bits());
    checks.check(
        "realmode-final-ia32e-entry-control",
        "IA-32e mode guest = 1",
        ShowResult(entry),
        entry.is_ok_and(|v| v & bit != 0),
    );
}

/// `test=realmode`: the full boot with unrestricted guest, then a launch
/// at the state right after CR0.PE=1.
pub fn realmode(caps: &Caps, checks: &mut Checks) {
    let Some(eptp) = build_identity_ept(caps, checks) else {
        return;
    };
    say!("L1: [1/2] real-mode boot with unrestricted guest");
    let Some((h, r)) = launch(caps, checks, eptp, Start::Reset, true) else {
        return;
    };
    check_entered(checks, "realmode-ug-vm-entry", r);
    check_stages(checks, "realmode", &h, true);
    if h.halted() {
        check_long_mode_state(checks);
    }
    say!("L1: [2/2] CR0.PE=1 with a real-mode CS, unrestricted guest");
    pe_set_with_ug(caps, checks, eptp);
}

fn pe_set_with_ug(caps: &Caps, checks: &mut Checks, eptp: u64) {
    let Some((h, r)) = launch(caps, checks, eptp, Start::PeSet, true) else {
        return;
    };
    check_entered(checks, "pe-set-real-cs-ug-vm-entry", r);
    check_stages(checks, "pe-set", &h, false);
}

/// `test=realmode-no-ug`: both starting states without unrestricted guest
/// are refused (exit reason 0x80000021); the PE-set state is accepted
/// with it.
pub fn realmode_no_ug(caps: &Caps, checks: &mut Checks) {
    let Some(eptp) = build_identity_ept(caps, checks) else {
        return;
    };
    say!("L1: [1/3] real-mode reset state without unrestricted guest");
    if let Some((_, r)) = launch(caps, checks, eptp, Start::Reset, false) {
        check_refused(checks, "realmode-no-ug-refused", r);
    }
    say!("L1: [2/3] CR0.PE=1 with a real-mode CS, without unrestricted guest");
    if let Some((_, r)) = launch(caps, checks, eptp, Start::PeSet, false) {
        check_refused(checks, "pe-set-real-cs-no-ug-refused", r);
    }
    say!("L1: [3/3] the same state with unrestricted guest");
    pe_set_with_ug(caps, checks, eptp);
}

// The boot code. It runs at L2RM_BASE (copied there by L1), so every
// absolute address is L2RM_BASE + (label - l2rm_start); 16-bit code uses
// offsets from CS/DS base L2RM_BASE. Page tables: 0xa000 (PML4), 0xb000
// (PDPT), 0xc000 (PD with one 2 MiB page at 0).
global_asm!(
    r#"
    .set L2RM_BASE, 0x8000
    .set L2RM_PT, 0xa000
    .section .text.l2rm, "ax"
    .balign 16
    .globl l2rm_start
    .code16
l2rm_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $(l2rm_stack_top - l2rm_start), %sp
    movw $(l2rm_msg_real - l2rm_start), %si
    call l2rm_puts16
    movw $(l2rm_gdtr - l2rm_start), %bx
    lgdtl (%bx)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    .globl l2rm_pe_set
l2rm_pe_set:
    ljmpl $0x08, $(L2RM_BASE + l2rm_pm32 - l2rm_start)

l2rm_puts16:
    movw $0x3f8, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

    .code32
l2rm_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $(L2RM_BASE + l2rm_stack_top - l2rm_start), %esp
    movl $(L2RM_BASE + l2rm_msg_pm - l2rm_start), %esi
    call l2rm_puts32
    /* Ask for long mode the way boot code does; the answer is kept, not
       relied on (CPUID may not reach L1 on every platform). */
    movl $0x80000001, %eax
    cpuid
    movl %edx, (L2RM_BASE + l2rm_cpuid_edx - l2rm_start)
    /* Identity-map the first 2 MiB. */
    movl $L2RM_PT, %edi
    movl $(3 * 1024), %ecx
    xorl %eax, %eax
    rep stosl
    movl $(L2RM_PT + 0x1000 + 3), (L2RM_PT)
    movl $(L2RM_PT + 0x2000 + 3), (L2RM_PT + 0x1000)
    movl $0x83, (L2RM_PT + 0x2000)
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $L2RM_PT, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmp $0x18, $(L2RM_BASE + l2rm_lm64 - l2rm_start)

l2rm_puts32:
    movw $0x3f8, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

    .code64
l2rm_lm64:
    movl $(L2RM_BASE + l2rm_msg_lm - l2rm_start), %esi
    movw $0x3f8, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  hlt
    jmp 2b

    .balign 8
    .globl l2rm_gdt
l2rm_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
    .globl l2rm_gdt_end
l2rm_gdt_end:
l2rm_gdtr:
    .word l2rm_gdt_end - l2rm_gdt - 1
    .long L2RM_BASE + l2rm_gdt - l2rm_start
l2rm_cpuid_edx:
    .long 0
l2rm_msg_real:
    .asciz "real mode: CS=0x0800 (base 0x8000), lgdt, CR0.PE=1, far jump\n"
l2rm_msg_pm:
    .asciz "protected mode (32-bit): PAE, CR3, EFER.LME, CR0.PG, far jump\n"
l2rm_msg_lm:
    .asciz "long mode (64-bit): boot complete, halting\n"
    .balign 16
l2rm_stack:
    .skip 256
l2rm_stack_top:
    .globl l2rm_end
l2rm_end:
    .text
"#,
    options(att_syntax)
);
