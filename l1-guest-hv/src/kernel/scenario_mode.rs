//! `test=scenario`: L1 driven by a scenario file. L0 encodes the scenario
//! (`l1_guest_hv::scenario`) at `SCENARIO_ADDR`; L1 builds the VMCS from
//! it, runs L2, handles each exit as the scenario says and records every
//! exit it observed (as read with VMREAD) in the results area at
//! `RESULTS_ADDR`, which L0 reads back and compares with the file's
//! expectations. Layout: `docs/scenarios.md`.

use l1_guest_hv::caps::{adjust_control, apply_fixed};
use l1_guest_hv::exit::{reason, ExitLine, IoQualification, LineBuffer, ShowOutcome};
use l1_guest_hv::scenario::{
    self as sc, Action, EptHole, ExitRecord, Header, MemRange, Next, OpResult, ResultsHeader,
    StartMode, VmcsWrite, VmxOp,
};
use l1_guest_hv::segment::AR_UNUSABLE;
use l1_guest_hv::text::{Hex, Sink};
use vmcs12::controls::{EntryControls, PrimaryProcBased, SecondaryProcBased};
use vmcs12::{VmcsField, VmxFault, VmxOutcome};

use core::arch::global_asm;

use crate::cpu::{Global, Page};
use crate::hv::{
    self, init_region, write_or_say as wr, Caps, GuestSpec, IO_PAGE_A, IO_PAGE_B, MSR_PAGE, VMCS_A,
    VMXON_REGION,
};
use crate::modes::{load_vmcs, Checks};
use crate::vmx::{self, GuestRegs};

/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;

/// A VMCS region with the right revision identifier for `[[l1.vmx]]`
/// operations (`address = "spare-vmcs"`).
static SPARE_VMCS: Page = Global::new([0; 4096]);
/// A region whose revision identifier is wrong (`"bad-revision"`).
static BAD_REVISION: Page = Global::new([0; 4096]);

extern "C" {
    /// `mov ss, ax` (same selector) then VMLAUNCH, so VMLAUNCH runs with
    /// blocking by MOV SS (SDM 26.1: VMfailValid(26)). Returns 0 when a VM
    /// exit came back (HOST_RIP must be `l1_scen_movss_landing`), 1
    /// VMfailInvalid, 2 VMfailValid, 3 fault.
    fn l1_scen_movss_vmlaunch() -> u64;
    /// HOST_RIP while `l1_scen_movss_vmlaunch` runs.
    fn l1_scen_movss_landing();
}

global_asm!(
    r#"
    .section .text.scenario, "ax"
    .globl l1_scen_movss_vmlaunch
l1_scen_movss_vmlaunch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, l1_scen_saved_rsp(%rip)
    movw %ss, %ax
    movw %ax, %ss
2:  vmlaunch
    movl $1, %eax
    jc 7f
    movl $2, %eax
    jz 7f
    movl $3, %eax
7:  movq l1_scen_saved_rsp(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
8:  movl $3, %eax
    jmp 7b
    .globl l1_scen_movss_landing
l1_scen_movss_landing:
    xorl %eax, %eax
    jmp 7b
    .pushsection .l1_extable, "a"
    .quad 2b, 8b
    .popsection

    .section .bss.scenario, "aw", @nobits
    .balign 8
l1_scen_saved_rsp:
    .skip 8
    .text
"#,
    options(att_syntax)
);

fn scenario_bytes() -> &'static [u8] {
    // SAFETY: the boot page tables identity-map the first 4 GiB; L0 wrote
    // the scenario there before L1 started and nothing writes it later.
    unsafe { core::slice::from_raw_parts(sc::SCENARIO_ADDR as *const u8, sc::SCENARIO_MAX) }
}

fn results_bytes() -> &'static mut [u8] {
    // SAFETY: identity-mapped RAM reserved for the results area (see
    // docs/scenarios.md); only this mode touches it, through this one
    // slice at a time.
    unsafe { core::slice::from_raw_parts_mut(sc::RESULTS_ADDR as *mut u8, sc::RESULTS_LEN) }
}

fn outcome_code(o: VmxOutcome) -> u32 {
    match o {
        VmxOutcome::Succeed => 0,
        VmxOutcome::FailInvalid => 1,
        VmxOutcome::FailValid(e) => 0x100 | (e as u32 & 0xff),
        VmxOutcome::Fault(f) => {
            0x200
                | match f {
                    VmxFault::InvalidOpcode => 6,
                    VmxFault::GeneralProtection => 13,
                    VmxFault::StackFault => 12,
                    _ => 14,
                }
        }
    }
}

fn copy_page(page: &Page, src: &[u8]) {
    let dst = page.ptr() as *mut u8;
    // SAFETY: `page` is a 4 KiB static; at most 4096 bytes are copied.
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len().min(4096)) };
}

/// Copies L2's code to its load address; false when it does not fit.
fn load_code(h: &Header, blob: &[u8]) -> bool {
    let code = Header::bytes(blob, h.code, 1);
    let end = h.code_addr.saturating_add(code.len() as u64);
    let overlaps = |a: u64, len: usize| h.code_addr < a + len as u64 && end > a;
    if h.code_addr < sc::CODE_MIN
        || end > sc::CODE_END
        || overlaps(sc::SCENARIO_ADDR, sc::SCENARIO_MAX)
        || overlaps(sc::RESULTS_ADDR, sc::RESULTS_LEN)
    {
        say!(
            "L1: L2 code [",
            Hex(h.code_addr),
            ", ",
            Hex(end),
            ") is outside the code area"
        );
        return false;
    }
    // SAFETY: checked above: the range is identity-mapped RAM outside
    // L1's image (L0 checks it against the image too) and outside the
    // scenario and results areas.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), h.code_addr as *mut u8, code.len());
    }
    say!(
        "L1: copied ",
        code.len(),
        " bytes of L2 code to ",
        Hex(h.code_addr)
    );
    true
}

fn control(name: &str, raw: bool, wanted: u32, cap: u64) -> u32 {
    if raw {
        return wanted;
    }
    let a = adjust_control(wanted, cap);
    if a.missing != 0 {
        say!(
            "vmcs: ",
            name,
            " control bits ",
            Hex(u64::from(a.missing)),
            " not allowed, dropped"
        );
    }
    a.value
}

/// Writes the scenario's controls over the ones `setup_vmcs` chose.
/// `ept`: L1 built its EPT, so "enable EPT" joins the secondary controls.
fn write_controls(caps: &Caps, h: &Header, ept: bool) -> bool {
    use VmcsField::*;
    let raw = h.flags & sc::FLAG_RAW_CONTROLS != 0;
    let mut primary = h.primary;
    let mut secondary = h.secondary;
    if ept {
        secondary |= SecondaryProcBased::ENABLE_EPT.bits();
    }
    if secondary != 0 {
        primary |= PrimaryProcBased::ACTIVATE_SECONDARY.bits();
    }
    let mut ok = wr(
        PIN_BASED_VM_EXEC_CONTROL,
        control("pin-based", raw, h.pin, caps.ctls[0]).into(),
    );
    let primary = control("primary", raw, primary, caps.ctls[1]);
    ok &= wr(CPU_BASED_VM_EXEC_CONTROL, primary.into());
    if primary & PrimaryProcBased::ACTIVATE_SECONDARY.bits() != 0 {
        let cap = caps.ctls2.unwrap_or(0);
        ok &= wr(
            SECONDARY_VM_EXEC_CONTROL,
            control("secondary", raw, secondary, cap).into(),
        );
    }
    ok &= wr(
        VM_EXIT_CONTROLS,
        control("exit", raw, h.exit, caps.ctls[2]).into(),
    );
    ok & wr(
        VM_ENTRY_CONTROLS,
        control("entry", raw, h.entry, caps.ctls[3]).into(),
    )
}

/// Guest state for a real-mode or flat 32-bit protected-mode start (SDM
/// 27.3.1 with unrestricted guest).
fn legacy_state(caps: &Caps, h: &Header) -> bool {
    use VmcsField::*;
    let [_, _, cr4_f0, cr4_f1] = caps.fixed;
    let cr4 = apply_fixed(0, cr4_f0, cr4_f1);
    let real = h.mode == StartMode::Real;
    let cr0 = if real { 0x30 } else { 0x31 };
    // Real mode: every segment is 0 (base 0), so IP = the label's
    // address, as with `org`; the code must lie below 64 KiB.
    let (cs_sel, base, limit, cs_ar, ds_sel, ds_ar) = if real {
        (0, 0, 0xffff, 0x9b, 0, 0x93)
    } else {
        (0x08, 0, 0xffff_ffff, 0xc09b, 0x10, 0xc093)
    };
    let rip = h.entry_rip.wrapping_sub(base);
    let rsp = match h.gprs[4] {
        0 if real => 0x7ff0,
        0 => vmx_default_rsp(),
        r => r,
    };
    let mut ok = true;
    for (field, value) in [
        (GUEST_CR0, cr0),
        (CR0_READ_SHADOW, cr0),
        (GUEST_CR3, 0),
        (GUEST_CR4, cr4),
        (CR4_READ_SHADOW, 0),
        (GUEST_RIP, rip),
        (GUEST_RSP, rsp),
        (GUEST_CS_SELECTOR, cs_sel),
        (GUEST_CS_BASE, base),
        (GUEST_CS_LIMIT, limit),
        (GUEST_CS_AR_BYTES, cs_ar),
        (GUEST_TR_SELECTOR, 0),
        (GUEST_TR_BASE, 0),
        (GUEST_TR_LIMIT, 0xffff),
        (GUEST_TR_AR_BYTES, 0x8b),
        (GUEST_LDTR_AR_BYTES, AR_UNUSABLE.into()),
        (GUEST_IDTR_BASE, 0),
        (GUEST_IDTR_LIMIT, 0x3ff),
        (GUEST_IA32_EFER, 0),
    ] {
        ok &= wr(field, value);
    }
    for [s, b, l, a] in hv::GUEST_DATA_SEGMENTS {
        ok &= wr(s, ds_sel) && wr(b, base) && wr(l, limit) && wr(a, ds_ar);
    }
    ok
}

fn vmx_default_rsp() -> u64 {
    vmx::vmread(VmcsField::GUEST_RSP).unwrap_or(0x7ff0)
}

/// Keeps "IA-32e mode guest" equal to GUEST_IA32_EFER.LMA for the next
/// entry (SDM 27.3.1.1), for L2s that switch modes themselves.
fn sync_ia32e() {
    let (Ok(efer), Ok(entry)) = (
        vmx::vmread(VmcsField::GUEST_IA32_EFER),
        vmx::vmread(VmcsField::VM_ENTRY_CONTROLS),
    ) else {
        return;
    };
    let bit = u64::from(EntryControls::IA32E_MODE_GUEST.bits());
    let want = if efer & EFER_LMA != 0 { bit } else { 0 };
    if entry & bit != want {
        let _ = vmx::vmwrite(VmcsField::VM_ENTRY_CONTROLS, (entry & !bit) | want);
    }
}

fn find_action(blob: &[u8], h: &Header, basic: u32) -> Action {
    let table = Header::bytes(blob, h.actions, sc::ACTION_LEN);
    let mut any = None;
    for rec in table.chunks_exact(sc::ACTION_LEN) {
        let a = Action::decode(rec);
        if a.reason == basic {
            return a;
        }
        if a.reason == sc::ANY_REASON && any.is_none() {
            any = Some(a);
        }
    }
    any.unwrap_or(Action::default_for(basic))
}

fn read_exit() -> ExitRecord {
    use VmcsField::*;
    let r = |f: VmcsField| vmx::vmread(f).unwrap_or(0);
    ExitRecord {
        reason: r(VM_EXIT_REASON) as u32,
        instruction_len: r(VM_EXIT_INSTRUCTION_LEN) as u32,
        qualification: r(EXIT_QUALIFICATION),
        rip: r(GUEST_RIP),
        intr_info: r(VM_EXIT_INTR_INFO) as u32,
        intr_error: r(VM_EXIT_INTR_ERROR_CODE) as u32,
        gpa: r(GUEST_PHYSICAL_ADDRESS),
        gla: r(GUEST_LINEAR_ADDRESS),
        idt_vectoring: r(IDT_VECTORING_INFO_FIELD) as u32,
        instruction_info: r(VMX_INSTRUCTION_INFO) as u32,
        preemption_timer: r(VMX_PREEMPTION_TIMER_VALUE) as u32,
        activity_state: r(GUEST_ACTIVITY_STATE) as u32,
    }
}

/// VMWRITE of `value` combined with the field's current value as `mode`
/// says (`sc::WRITE_*`; a failed VMREAD counts as 0).
fn write_field(encoding: u32, mode: u32, value: u64) -> VmxOutcome {
    let old = if mode == sc::WRITE_SET {
        0
    } else {
        vmx::vmread_encoding(encoding.into()).unwrap_or(0)
    };
    vmx::vmwrite_encoding(encoding.into(), sc::combine(mode, old, value))
}

/// Arms L1's local-APIC timer as the scenario says (xAPIC MMIO).
fn arm_lapic_timer(t: &sc::LapicTimer) {
    if t.armed == 0 {
        return;
    }
    let write = |off: u64, v: u32| {
        // SAFETY: the boot page tables identity-map the first 4 GiB, so the
        // local APIC page at 0xfee00000 is reachable; these are aligned
        // 32-bit writes to APIC registers (SDM 11.4.1).
        unsafe { core::ptr::write_volatile((sc::APIC_BASE + off) as *mut u32, v) };
    };
    // Said first: console output costs an exit per byte, which would eat
    // into a short timer.
    say!(
        "L1: LAPIC timer LVT ",
        Hex(t.lvt.into()),
        " divide ",
        Hex(t.tdcr.into()),
        " count ",
        t.tmict
    );
    // Software-enable the APIC (SVR bit 8, spurious vector 0xff), then the
    // timer: divide, LVT, initial count (which starts it; SDM 11.5.4).
    write(sc::APIC_SVR, 0x1ff);
    write(sc::APIC_TDCR, t.tdcr);
    write(sc::APIC_LVTT, t.lvt);
    write(sc::APIC_TMICT, t.tmict);
}

fn op_address(op: &VmxOp) -> u64 {
    let base = match op.base {
        sc::BASE_VMXON => VMXON_REGION.addr(),
        sc::BASE_VMCS => VMCS_A.addr(),
        sc::BASE_SPARE => SPARE_VMCS.addr(),
        sc::BASE_BAD_REVISION => BAD_REVISION.addr(),
        _ => 0,
    };
    base.wrapping_add(op.a)
}

/// VMLAUNCH in the shadow of a MOV SS (see `l1_scen_movss_vmlaunch`).
fn vmlaunch_after_mov_ss() -> (VmxOutcome, u64) {
    let host_rip = vmx::vmread(VmcsField::HOST_RIP).unwrap_or(0);
    let _ = vmx::vmwrite(
        VmcsField::HOST_RIP,
        l1_scen_movss_landing as *const () as u64,
    );
    crate::cpu::clear_fault();
    // SAFETY: the routine saves and restores the callee-saved registers
    // and the stack itself; a VM exit lands on l1_scen_movss_landing
    // (HOST_RIP, written above), which restores them; a fault resumes
    // through L1's exception table.
    let r = unsafe { l1_scen_movss_vmlaunch() };
    let out = match r {
        0 => VmxOutcome::Succeed,
        1 => VmxOutcome::FailInvalid,
        2 => {
            let err = vmx::vmread(VmcsField::VM_INSTRUCTION_ERROR).unwrap_or(0);
            VmxOutcome::from_rflags(vmcs12::outcome::RFLAGS_ZF, err as u32)
        }
        _ => match crate::cpu::take_fault() {
            Some(f) if f.vector == 6 => VmxOutcome::Fault(VmxFault::InvalidOpcode),
            _ => VmxOutcome::Fault(VmxFault::GeneralProtection),
        },
    };
    let _ = vmx::vmwrite(VmcsField::HOST_RIP, host_rip);
    let value = if r == 0 {
        vmx::vmread(VmcsField::VM_EXIT_REASON).unwrap_or(0)
    } else {
        0
    };
    (out, value)
}

/// VMCALL in VMX root operation; the outcome from RFLAGS (and
/// VM_INSTRUCTION_ERROR), a fault through L1's exception table.
fn vmcall_in_root() -> VmxOutcome {
    let (cf, zf): (u8, u8);
    crate::cpu::clear_fault();
    // SAFETY: in VMX root operation VMCALL only sets RFLAGS (and the
    // VM-instruction error field); a fault resumes at label 3.
    unsafe {
        core::arch::asm!(
            "2:",
            "vmcall",
            "3:",
            "setc {cf}",
            "setz {zf}",
            ".pushsection .l1_extable, \"a\"",
            ".quad 2b, 3b",
            ".popsection",
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nomem, nostack)
        );
    }
    if let Some(f) = crate::cpu::take_fault() {
        return VmxOutcome::Fault(if f.vector == 6 {
            VmxFault::InvalidOpcode
        } else {
            VmxFault::GeneralProtection
        });
    }
    if cf != 0 {
        return VmxOutcome::FailInvalid;
    }
    if zf != 0 {
        let err = vmx::vmread(VmcsField::VM_INSTRUCTION_ERROR).unwrap_or(0);
        return VmxOutcome::from_rflags(vmcs12::outcome::RFLAGS_ZF, err as u32);
    }
    VmxOutcome::Succeed
}

/// Executes one `[[l1.vmx]]` operation and says what L1 saw.
fn exec_op(op: &VmxOp) -> OpResult {
    let addr = op_address(op);
    let entered = |launch: bool| match vmx::enter(launch) {
        Ok(()) => (
            VmxOutcome::Succeed,
            vmx::vmread(VmcsField::VM_EXIT_REASON).unwrap_or(0),
        ),
        Err(o) => (o, 0),
    };
    let (outcome, value) = match op.op {
        sc::OP_VMXON => (vmx::vmxon(addr), 0),
        sc::OP_VMXOFF => (vmx::vmxoff(), 0),
        sc::OP_VMCLEAR => (vmx::vmclear(addr), 0),
        sc::OP_VMPTRLD => (vmx::vmptrld(addr), 0),
        sc::OP_VMPTRST => match vmx::vmptrst() {
            Ok(v) => (VmxOutcome::Succeed, v),
            Err(o) => (o, 0),
        },
        sc::OP_VMREAD => match vmx::vmread_encoding(op.a) {
            Ok(v) => (VmxOutcome::Succeed, v),
            Err(o) => (o, 0),
        },
        sc::OP_VMWRITE => (vmx::vmwrite_encoding(op.a, op.b), 0),
        sc::OP_VMLAUNCH => entered(true),
        sc::OP_VMRESUME => entered(false),
        sc::OP_INVEPT => (vmx::invept(op.a, [op.b, op.c]), 0),
        sc::OP_INVVPID => (vmx::invvpid(op.a, [op.b, op.c]), 0),
        sc::OP_VMLAUNCH_MOV_SS => vmlaunch_after_mov_ss(),
        sc::OP_VMCALL => (vmcall_in_root(), 0),
        _ => (VmxOutcome::Fault(VmxFault::InvalidOpcode), 0),
    };
    let name = sc::OP_NAMES.get(op.op as usize).copied().unwrap_or("?");
    say!(
        "L1: vmx op ",
        name,
        " addr/field ",
        Hex(if op.base == sc::BASE_ABSOLUTE {
            op.a
        } else {
            addr
        }),
        ": ",
        ShowOutcome(outcome),
        " value ",
        Hex(value)
    );
    OpResult {
        done: 1,
        outcome: outcome_code(outcome),
        value,
    }
}

/// State of one scenario run.
struct Run<'a> {
    results: &'a mut [u8],
    mode: StartMode,
    header: ResultsHeader,
    console: LineBuffer,
}

impl Run<'_> {
    fn console_byte(&mut self, byte: u8) {
        let at = sc::RESULTS_CONSOLE_OFF + self.header.console_len as usize;
        if (self.header.console_len as usize) < sc::RESULTS_CONSOLE_MAX {
            if let Some(slot) = self.results.get_mut(at) {
                *slot = byte;
                self.header.console_len += 1;
            }
        }
        if let Some(line) = self.console.push(byte) {
            say!("L2> ", line);
        }
    }

    /// Emulates an intercepted INS (storing `answer` per element at ES:RDI)
    /// or OUTS (collecting the low byte of each element at DS:RSI as
    /// console output), REP-prefixed or not, as the SDM's INS/OUTS
    /// pseudo-code does: RDI/RSI step by the size (down when RFLAGS.DF),
    /// RCX counts down to 0. Segments are flat (base 0) in every start
    /// mode; the address size is the start mode's. Elements outside the L2
    /// code areas (`CODE_MIN..CODE_END` without the scenario and results)
    /// are skipped, so L2 cannot make L1 overwrite itself.
    fn string_io(&mut self, q: IoQualification, answer: u64) {
        let size = u64::from(q.size);
        let amask = match self.mode {
            StartMode::Real => 0xffff,
            StartMode::Protected => 0xffff_ffff,
            StartMode::Long => u64::MAX,
        };
        let df = vmx::vmread(VmcsField::GUEST_RFLAGS).unwrap_or(0) & (1 << 10) != 0;
        let (index, ptr_reg) = if q.is_in { (7, "RDI") } else { (6, "RSI") };
        let mut ptr = vmx::guest_reg(index) & amask;
        let mut count = if q.rep {
            vmx::guest_reg(GuestRegs::RCX) & amask
        } else {
            1
        };
        let mut done = 0u32;
        while count != 0 && done < 4096 {
            let inside = |a: u64| {
                a >= sc::CODE_MIN
                    && a.saturating_add(size) <= sc::CODE_END
                    && !(a < sc::RESULTS_ADDR + sc::RESULTS_LEN as u64
                        && a + size > sc::SCENARIO_ADDR)
                    && !(a < 0x20_0000 && a + size > 0x10_0000)
            };
            if inside(ptr) {
                // SAFETY: the element lies in identity-mapped RAM that is
                // neither L1's image nor the scenario/results areas
                // (checked by `inside`).
                unsafe {
                    let p = ptr as *mut u8;
                    for i in 0..size as usize {
                        if q.is_in {
                            p.add(i).write_volatile((answer >> (8 * i)) as u8);
                        } else if i == 0 {
                            self.console_byte(p.read_volatile());
                        }
                    }
                }
            }
            ptr = if df {
                ptr.wrapping_sub(size)
            } else {
                ptr.wrapping_add(size)
            } & amask;
            count -= 1;
            done += 1;
        }
        let keep = vmx::guest_reg(index) & !amask;
        vmx::set_guest_reg(index, keep | ptr);
        if q.rep {
            let rcx = vmx::guest_reg(GuestRegs::RCX);
            vmx::set_guest_reg(GuestRegs::RCX, (rcx & !amask) | count);
        }
        say!(
            "L1: emulated ",
            done,
            if q.is_in { " INS" } else { " OUTS" },
            " elements, ",
            ptr_reg,
            " now ",
            Hex(ptr)
        );
    }

    /// Carries out `a` for `e`; the RIP to resume at, or `None` to stop.
    fn act(&mut self, a: &Action, e: &ExitRecord) -> Option<u64> {
        let basic = (e.reason & 0xffff) as u16;
        if basic == reason::IO {
            if let Some(q) = IoQualification::decode(e.qualification) {
                let rax = vmx::guest_reg(GuestRegs::RAX);
                let mask = (1u64 << (8 * u32::from(q.size))) - 1;
                if q.is_in && !q.string && a.flags & sc::ACT_ANSWER != 0 {
                    vmx::set_guest_reg(GuestRegs::RAX, (rax & !mask) | (a.answer & mask));
                } else if !q.is_in && !q.string && a.flags & sc::ACT_CONSOLE != 0 {
                    self.console_byte(rax as u8);
                } else if q.string
                    && ((q.is_in && a.flags & sc::ACT_ANSWER != 0)
                        || (!q.is_in && a.flags & sc::ACT_CONSOLE != 0))
                {
                    self.string_io(q, a.answer);
                }
            }
        }
        if basic == reason::RDMSR && a.flags & sc::ACT_ANSWER != 0 {
            vmx::set_guest_reg(GuestRegs::RAX, a.answer & 0xffff_ffff);
            vmx::set_guest_reg(GuestRegs::RDX, a.answer >> 32);
        }
        if a.flags & sc::ACT_INJECT != 0 {
            say!(
                "L1: inject VM_ENTRY_INTR_INFO_FIELD ",
                Hex(a.inject_info.into())
            );
            wr(VmcsField::VM_ENTRY_INTR_INFO_FIELD, a.inject_info.into());
            wr(
                VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE,
                a.inject_error.into(),
            );
            wr(VmcsField::VM_ENTRY_INSTRUCTION_LEN, a.inject_len.into());
        }
        if a.flags & sc::ACT_SET_FIELD != 0 {
            let mode = if a.flags & sc::ACT_SET_OR != 0 {
                sc::WRITE_OR
            } else if a.flags & sc::ACT_SET_CLEAR != 0 {
                sc::WRITE_CLEAR
            } else {
                sc::WRITE_SET
            };
            let o = write_field(a.field, mode, a.value);
            say!(
                "L1: vmwrite ",
                Hex(a.field.into()),
                " <- ",
                Hex(a.value),
                ": ",
                ShowOutcome(o)
            );
        }
        match a.next {
            Next::Advance => Some(e.rip.wrapping_add(e.instruction_len.into())),
            Next::Resume => Some(e.rip),
            Next::Jump => Some(a.target),
            Next::Stop => None,
        }
    }

    /// Executes the scenario's VMX operations of `phase`, in table order.
    fn run_ops(&mut self, blob: &[u8], h: &Header, phase: u32) {
        let table = Header::bytes(blob, h.vmx_ops, sc::VMX_OP_LEN);
        for (i, rec) in table
            .chunks_exact(sc::VMX_OP_LEN)
            .take(sc::MAX_VMX_OPS)
            .enumerate()
        {
            let op = VmxOp::decode(rec);
            if op.phase != phase {
                continue;
            }
            let r = exec_op(&op);
            let off = sc::op_result_offset(i);
            if let Some(slot) = self.results.get_mut(off..off + sc::OP_RESULT_LEN) {
                r.encode(slot);
            }
            self.header.ops_done += 1;
        }
    }

    /// Copies the scenario's memory ranges into the results area.
    fn copy_memory(&mut self, blob: &[u8], h: &Header) {
        let table = Header::bytes(blob, h.memory, sc::MEM_RANGE_LEN);
        for rec in table.chunks_exact(sc::MEM_RANGE_LEN) {
            let m = MemRange::decode(rec);
            let used = self.header.memory_len as usize;
            let len = m.len as usize;
            let inside = m
                .addr
                .checked_add(len as u64)
                .is_some_and(|e| e <= sc::CODE_END);
            if !inside || used + len > sc::RESULTS_MEMORY_MAX {
                say!(
                    "L1: memory range ",
                    Hex(m.addr),
                    " not copied (outside 8 MiB or too long)"
                );
                continue;
            }
            let at = sc::RESULTS_MEMORY_OFF + used;
            if let Some(dst) = self.results.get_mut(at..at + len) {
                // SAFETY: below CODE_END (8 MiB): identity-mapped guest RAM
                // (checked above); only read.
                let src = unsafe { core::slice::from_raw_parts(m.addr as *const u8, len) };
                dst.copy_from_slice(src);
                self.header.memory_len += m.len;
            }
        }
    }

    fn finish(&mut self) {
        if !self.console.is_empty() {
            say!("L2> ", self.console.take());
        }
        for (i, r) in self.header.gprs.iter_mut().enumerate() {
            *r = vmx::guest_reg(i);
        }
        self.header.gprs[4] = vmx::vmread(VmcsField::GUEST_RSP).unwrap_or(0);
        self.header.rip = vmx::vmread(VmcsField::GUEST_RIP).unwrap_or(0);
        self.header.rflags = vmx::vmread(VmcsField::GUEST_RFLAGS).unwrap_or(0);
        self.header.encode(self.results);
    }
}

/// Prints the used part of the results area as `scenario-results OFFSET
/// HEX` lines (64 bytes each), so L0 can read it from the console too.
fn dump_results(results: &[u8], header: &ResultsHeader, ops: usize) {
    let ops = ops.min(sc::MAX_VMX_OPS);
    let records = (header.exits as usize).min(sc::MAX_EXIT_RECORDS);
    let ranges = [
        (0, sc::exit_record_offset(records)),
        (
            sc::RESULTS_CONSOLE_OFF,
            sc::RESULTS_CONSOLE_OFF + header.console_len as usize,
        ),
        (sc::RESULTS_OPS_OFF, sc::op_result_offset(ops)),
        (
            sc::RESULTS_MEMORY_OFF,
            sc::RESULTS_MEMORY_OFF + header.memory_len as usize,
        ),
    ];
    for (start, end) in ranges {
        let mut off = start;
        while off < end {
            let chunk = results.get(off..end.min(off + 64)).unwrap_or(&[]);
            let mut line = l1_guest_hv::text::TextBuf::<160>::default();
            for b in chunk {
                let digits = b"0123456789abcdef";
                let pair = [digits[usize::from(b >> 4)], digits[usize::from(b & 0xf)]];
                line.put(core::str::from_utf8(&pair).unwrap_or("??"));
            }
            say!("scenario-results ", Hex(off as u64), " ", line.as_str());
            off += 64;
        }
    }
}

/// Runs the scenario at `SCENARIO_ADDR`.
pub fn scenario(caps: &Caps, checks: &mut Checks) {
    let blob = scenario_bytes();
    let results = results_bytes();
    results.fill(0);
    let mut run = Run {
        results,
        mode: StartMode::Long,
        header: ResultsHeader::default(),
        console: LineBuffer::new(),
    };
    let h = match Header::decode(blob) {
        Ok(h) => h,
        Err(e) => {
            let (what, v) = e.describe();
            say!(
                "L1: scenario at ",
                Hex(sc::SCENARIO_ADDR),
                ": ",
                what,
                Hex(v)
            );
            run.header.status = sc::STATUS_BAD_SCENARIO;
            run.header.encode(run.results);
            checks.check("scenario-loaded", "a scenario", what, false);
            return;
        }
    };
    say!(
        "L1: scenario: ",
        h.total_len,
        " bytes, mode ",
        h.mode.bitness(),
        "-bit, ",
        h.actions.count,
        " actions, ",
        h.writes.count,
        " VMCS writes"
    );
    checks.check("scenario-loaded", "a scenario", "a scenario", true);
    run.mode = h.mode;
    if !load_code(&h, blob) {
        run.header.status = sc::STATUS_BAD_SCENARIO;
        run.header.encode(run.results);
        checks.check("scenario-code", "inside the code area", "outside", false);
        return;
    }
    let ops = h.vmx_ops.count as usize;
    init_region(&SPARE_VMCS, caps.basic.revision_id);
    init_region(&BAD_REVISION, caps.basic.revision_id.wrapping_add(1));
    run.run_ops(blob, &h, sc::PHASE_SETUP);
    let mut eptp = 0;
    if h.flags & sc::FLAG_EPT != 0 {
        let Some(p) = crate::ept_mode::build_identity_ept(caps, checks) else {
            run.header.status = sc::STATUS_SETUP_FAILED;
            run.header.encode(run.results);
            return;
        };
        eptp = p;
        for rec in Header::bytes(blob, h.holes, sc::HOLE_LEN).chunks_exact(sc::HOLE_LEN) {
            let hole = EptHole::decode(rec);
            let r = crate::ept_mode::with_ept(|t| t.set_perms(hole.gpa, hole.perms));
            say!(
                "L1: EPT page ",
                Hex(hole.gpa),
                " rights ",
                Hex(hole.perms),
                if r.is_ok() { "" } else { " (outside the EPT)" }
            );
        }
    }
    let spec = GuestSpec {
        entry: h.entry_rip,
        io_ports: &[],
        msrs: &[],
        exception_bitmap: h.exception_bitmap,
        secondary: if eptp != 0 {
            h.secondary | SecondaryProcBased::ENABLE_EPT.bits()
        } else {
            h.secondary
        },
        eptp,
    };
    let mut ok = load_vmcs(caps, &spec, checks);
    if ok {
        let io = Header::bytes(blob, h.io_bitmaps, 1);
        if io.len() == sc::IO_BITMAPS_LEN {
            copy_page(&IO_PAGE_A, io.get(..4096).unwrap_or(&[]));
            copy_page(&IO_PAGE_B, io.get(4096..).unwrap_or(&[]));
        }
        let msr = Header::bytes(blob, h.msr_bitmap, 1);
        if msr.len() == sc::MSR_BITMAP_LEN {
            copy_page(&MSR_PAGE, msr);
        }
        ok = write_controls(caps, &h, eptp != 0);
        if eptp != 0 {
            ok &= wr(VmcsField::EPT_POINTER, eptp);
        }
    }
    if ok && h.mode != StartMode::Long {
        ok = legacy_state(caps, &h);
    }
    if ok {
        for (i, v) in h.gprs.iter().enumerate() {
            if i == 4 {
                if *v != 0 {
                    ok &= wr(VmcsField::GUEST_RSP, *v);
                }
            } else {
                vmx::set_guest_reg(i, *v);
            }
        }
        for rec in Header::bytes(blob, h.writes, sc::WRITE_LEN).chunks_exact(sc::WRITE_LEN) {
            let w = VmcsWrite::decode(rec);
            let o = write_field(w.encoding, w.mode, w.value);
            say!(
                "L1: vmwrite ",
                Hex(w.encoding.into()),
                " <- ",
                Hex(w.value),
                ": ",
                ShowOutcome(o)
            );
            ok &= o == VmxOutcome::Succeed;
        }
    }
    if !ok {
        run.header.status = sc::STATUS_SETUP_FAILED;
        run.header.encode(run.results);
        checks.check("scenario-vmcs", "written", "VMWRITE failed", false);
        dump_results(run.results, &run.header, ops);
        return;
    }
    run.run_ops(blob, &h, sc::PHASE_LAUNCH);
    arm_lapic_timer(&h.lapic_timer);
    let mut launched = false;
    loop {
        if run.header.exits >= h.max_exits {
            say!("L1: stopping after ", h.max_exits, " exits (max_exits)");
            run.header.status = sc::STATUS_MAX_EXITS;
            break;
        }
        if let Err(o) = vmx::enter(!launched) {
            let name = if launched { "vmresume" } else { "vmlaunch" };
            say!("VMX error: ", name, " ", ShowOutcome(o));
            run.header.status = sc::STATUS_ENTRY_FAILED;
            run.header.launch_outcome = outcome_code(o);
            break;
        }
        let e = read_exit();
        let index = run.header.exits as usize;
        run.header.exits += 1;
        if index < sc::MAX_EXIT_RECORDS {
            let off = sc::exit_record_offset(index);
            if let Some(slot) = run.results.get_mut(off..off + sc::EXIT_RECORD_LEN) {
                e.encode(slot);
            }
        }
        let line = ExitLine {
            reason: e.reason,
            qualification: e.qualification,
            rip: e.rip,
            instruction_len: e.instruction_len,
        };
        say!(line);
        if line.entry_failure() {
            // The VMCS stays not launched after a failed entry (SDM 27.8).
            break;
        }
        launched = true;
        sync_ia32e();
        let a = find_action(blob, &h, e.reason & 0xffff);
        let Some(next) = run.act(&a, &e) else {
            break;
        };
        if !wr(VmcsField::GUEST_RIP, next) {
            run.header.status = sc::STATUS_SETUP_FAILED;
            break;
        }
    }
    run.finish();
    run.copy_memory(blob, &h);
    run.run_ops(blob, &h, sc::PHASE_END);
    run.header.encode(run.results);
    say!(
        "L1: scenario done: ",
        run.header.exits,
        " exits, status ",
        run.header.status
    );
    dump_results(run.results, &run.header, ops);
    let ran = run.header.status != sc::STATUS_SETUP_FAILED;
    checks.check(
        "scenario-ran",
        "L2 run to its end",
        if ran {
            "L2 run to its end"
        } else {
            "VMWRITE failed"
        },
        ran,
    );
}
