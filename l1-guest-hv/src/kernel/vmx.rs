//! VMX instruction wrappers. Each decodes RFLAGS right after the
//! instruction (SDM 31.2: CF = VMfailInvalid, ZF = VMfailValid, then the
//! error number is in VM_INSTRUCTION_ERROR) and catches a #UD/#GP through
//! the exception table, returning `VmxOutcome::Fault` instead of crashing.

use core::arch::{asm, global_asm};

use vmcs12::{VmcsField, VmxFault, VmxOutcome};

use crate::cpu::{clear_fault, take_fault, Fault};

/// L2's general-purpose registers while L1 runs (saved by the exit stub,
/// loaded before VMLAUNCH/VMRESUME), in encoding order; the RSP slot is
/// unused (RSP is GUEST_RSP in the VMCS).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestRegs {
    /// RAX, RCX, RDX, RBX, RSP (unused), RBP, RSI, RDI, R8-R15.
    pub gpr: [u64; 16],
}

impl GuestRegs {
    /// RAX.
    pub const RAX: usize = 0;
    /// RCX.
    pub const RCX: usize = 1;
    /// RDX.
    pub const RDX: usize = 2;
    /// RBX.
    pub const RBX: usize = 3;
}

extern "C" {
    static mut L2_REGS: GuestRegs;
    fn l1_vmx_enter(launch: u64) -> u64;
    /// HOST_RIP: where L1 continues after every VM exit.
    pub fn l1_vmx_exit_stub();
}

global_asm!(
    r#"
    .section .text.vmx, "ax"
    .globl l1_vmx_enter
l1_vmx_enter:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, l1_saved_rsp(%rip)
    cmpq $0, %rdi
    movq L2_REGS+0(%rip), %rax
    movq L2_REGS+8(%rip), %rcx
    movq L2_REGS+16(%rip), %rdx
    movq L2_REGS+24(%rip), %rbx
    movq L2_REGS+40(%rip), %rbp
    movq L2_REGS+48(%rip), %rsi
    movq L2_REGS+64(%rip), %r8
    movq L2_REGS+72(%rip), %r9
    movq L2_REGS+80(%rip), %r10
    movq L2_REGS+88(%rip), %r11
    movq L2_REGS+96(%rip), %r12
    movq L2_REGS+104(%rip), %r13
    movq L2_REGS+112(%rip), %r14
    movq L2_REGS+120(%rip), %r15
    movq L2_REGS+56(%rip), %rdi
    je 4f
2:  vmlaunch
    jmp 5f
4:
3:  vmresume
5:  /* VMfail: CF -> 1 (VMfailInvalid), ZF -> 2 (VMfailValid). */
    movl $1, %eax
    jc 7f
    movl $2, %eax
    jz 7f
    movl $4, %eax
7:  movq l1_saved_rsp(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
8:  /* A fault on VMLAUNCH/VMRESUME (exception table). */
    movl $3, %eax
    jmp 7b
    .pushsection .l1_extable, "a"
    .quad 2b, 8b
    .quad 3b, 8b
    .popsection

    .globl l1_vmx_exit_stub
l1_vmx_exit_stub:
    movq %rax, L2_REGS+0(%rip)
    movq %rcx, L2_REGS+8(%rip)
    movq %rdx, L2_REGS+16(%rip)
    movq %rbx, L2_REGS+24(%rip)
    movq %rbp, L2_REGS+40(%rip)
    movq %rsi, L2_REGS+48(%rip)
    movq %rdi, L2_REGS+56(%rip)
    movq %r8, L2_REGS+64(%rip)
    movq %r9, L2_REGS+72(%rip)
    movq %r10, L2_REGS+80(%rip)
    movq %r11, L2_REGS+88(%rip)
    movq %r12, L2_REGS+96(%rip)
    movq %r13, L2_REGS+104(%rip)
    movq %r14, L2_REGS+112(%rip)
    movq %r15, L2_REGS+120(%rip)
    movq l1_saved_rsp(%rip), %rsp
    xorl %eax, %eax
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

    .section .bss.vmx, "aw", @nobits
    .balign 64
    .globl L2_REGS
L2_REGS:
    .skip 128
l1_saved_rsp:
    .skip 8
    .text
"#,
    options(att_syntax)
);

/// Resets L2's registers to zero.
pub fn reset_guest_regs() {
    // SAFETY: L2_REGS is only used by the enter/exit stubs, which do not
    // run now.
    unsafe { core::ptr::addr_of_mut!(L2_REGS).write(GuestRegs::default()) };
}

/// Reads L2's saved GPR `index` (see [`GuestRegs`]).
pub fn guest_reg(index: usize) -> u64 {
    // SAFETY: L2_REGS is only written by the exit stub, which is not running.
    unsafe {
        (*core::ptr::addr_of!(L2_REGS))
            .gpr
            .get(index)
            .copied()
            .unwrap_or(0)
    }
}

/// Sets L2's saved GPR `index` (applied at the next VMRESUME).
pub fn set_guest_reg(index: usize, value: u64) {
    // SAFETY: as for `guest_reg`.
    unsafe {
        if let Some(slot) = (*core::ptr::addr_of_mut!(L2_REGS)).gpr.get_mut(index) {
            *slot = value;
        }
    }
}

/// Runs one VMX instruction (`$insn`, an `asm!` template line with
/// `$operands`) under L1's exception table: a fault on it resumes right
/// after it (label 3) and is reported through `take_fault`. Evaluates to
/// the (CF, ZF) flags it left, for [`outcome`]. Use inside `unsafe`.
macro_rules! vmx_insn {
    ($insn:expr, [$($operands:tt)*], $($option:ident),*) => {{
        let (cf, zf): (u8, u8);
        asm!(
            "2:",
            $insn,
            "3:",
            "setc {cf}",
            "setz {zf}",
            ".pushsection .l1_extable, \"a\"",
            ".quad 2b, 3b",
            ".popsection",
            $($operands)*
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options($($option),*)
        );
        (cf, zf)
    }};
}

fn fault_outcome(f: Fault) -> VmxOutcome {
    VmxOutcome::Fault(match f.vector {
        6 => VmxFault::InvalidOpcode,
        12 => VmxFault::StackFault,
        14 => VmxFault::PageFault {
            linear_address: f.cr2,
            error_code: f.error_code as u32,
        },
        _ => VmxFault::GeneralProtection,
    })
}

/// VMREAD without fault or error decoding (for VM_INSTRUCTION_ERROR).
fn vmread_raw(encoding: u64) -> Option<u64> {
    let value: u64;
    // SAFETY: VMREAD of a register operand has no memory effects; a fault
    // resumes at label 3 and is reported through `take_fault`.
    let (cf, zf) = unsafe {
        vmx_insn!("vmread {v}, {e}", [v = out(reg) value, e = in(reg) encoding,], nomem, nostack)
    };
    (cf == 0 && zf == 0).then_some(value)
}

/// Turns the flags after a VMX instruction into its outcome.
fn outcome(cf: u8, zf: u8) -> VmxOutcome {
    if let Some(f) = take_fault() {
        return fault_outcome(f);
    }
    if cf != 0 {
        return VmxOutcome::FailInvalid;
    }
    if zf != 0 {
        clear_fault();
        let err = vmread_raw(u64::from(VmcsField::VM_INSTRUCTION_ERROR.encoding())).unwrap_or(0);
        let _ = take_fault();
        return VmxOutcome::from_rflags(vmcs12::outcome::RFLAGS_ZF, err as u32);
    }
    VmxOutcome::Succeed
}

macro_rules! vmx_mem_op {
    ($name:ident, $insn:literal, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(pa: u64) -> VmxOutcome {
            let operand = pa;
            clear_fault();
            // SAFETY: the instruction reads the 8-byte operand; its effect on
            // the VMX state is what L1 asks for; a fault resumes at label 3.
            let (cf, zf) = unsafe {
                vmx_insn!(concat!($insn, " qword ptr [{p}]"), [p = in(reg) &operand,], nostack)
            };
            outcome(cf, zf)
        }
    };
}

vmx_mem_op!(vmxon, "vmxon", "VMXON with the region at `pa`.");
vmx_mem_op!(vmclear, "vmclear", "VMCLEAR of the VMCS at `pa`.");
vmx_mem_op!(vmptrld, "vmptrld", "VMPTRLD of the VMCS at `pa`.");

/// VMPTRST: the current-VMCS pointer.
pub fn vmptrst() -> Result<u64, VmxOutcome> {
    let mut value: u64 = 0;
    clear_fault();
    // SAFETY: VMPTRST writes 8 bytes into `value`; a fault resumes at 3.
    let (cf, zf) =
        unsafe { vmx_insn!("vmptrst qword ptr [{p}]", [p = in(reg) &mut value,], nostack) };
    match outcome(cf, zf) {
        VmxOutcome::Succeed => Ok(value),
        other => Err(other),
    }
}

/// VMREAD of a raw encoding.
pub fn vmread_encoding(encoding: u64) -> Result<u64, VmxOutcome> {
    let value: u64;
    clear_fault();
    // SAFETY: register-operand VMREAD; a fault resumes at label 3.
    let (cf, zf) = unsafe {
        vmx_insn!("vmread {v}, {e}", [v = inout(reg) 0u64 => value, e = in(reg) encoding,], nomem, nostack)
    };
    match outcome(cf, zf) {
        VmxOutcome::Succeed => Ok(value),
        other => Err(other),
    }
}

/// VMREAD of a field.
pub fn vmread(field: VmcsField) -> Result<u64, VmxOutcome> {
    vmread_encoding(u64::from(field.encoding()))
}

/// VMWRITE of a raw encoding.
pub fn vmwrite_encoding(encoding: u64, value: u64) -> VmxOutcome {
    clear_fault();
    // SAFETY: register-operand VMWRITE; it changes only VMCS state. A
    // fault resumes at label 3.
    let (cf, zf) = unsafe {
        vmx_insn!("vmwrite {e}, {v}", [v = in(reg) value, e = in(reg) encoding,], nomem, nostack)
    };
    outcome(cf, zf)
}

/// VMWRITE of a field.
pub fn vmwrite(field: VmcsField, value: u64) -> VmxOutcome {
    vmwrite_encoding(u64::from(field.encoding()), value)
}

/// VMXOFF.
pub fn vmxoff() -> VmxOutcome {
    clear_fault();
    // SAFETY: leaves VMX operation; a fault resumes at label 3.
    let (cf, zf) = unsafe { vmx_insn!("vmxoff", [], nomem, nostack) };
    outcome(cf, zf)
}

/// VMCALL outside VMX non-root operation: #UD outside VMX operation,
/// VMfail(VMCALL executed in VMX root operation) in root (SDM 31.3).
pub fn vmcall() -> VmxOutcome {
    clear_fault();
    // SAFETY: VMCALL in root operation only sets RFLAGS (or the
    // VM-instruction error field); a fault resumes at label 3.
    let (cf, zf) = unsafe { vmx_insn!("vmcall", [], nomem, nostack) };
    outcome(cf, zf)
}

macro_rules! vmx_inv_op {
    ($name:ident, $insn:literal, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(kind: u64, descriptor: [u64; 2]) -> VmxOutcome {
            clear_fault();
            // SAFETY: the instruction reads the 16-byte descriptor and only
            // invalidates cached translations; a fault resumes at label 3.
            let (cf, zf) = unsafe {
                vmx_insn!(concat!($insn, " {t}, xmmword ptr [{d}]"), [t = in(reg) kind, d = in(reg) &descriptor,], nostack)
            };
            outcome(cf, zf)
        }
    };
}

vmx_inv_op!(
    invept,
    "invept",
    "INVEPT of `kind` with a 128-bit descriptor."
);
vmx_inv_op!(
    invvpid,
    "invvpid",
    "INVVPID of `kind` with a 128-bit descriptor."
);

/// VMLAUNCH (`launch`) or VMRESUME with L2's registers from [`GuestRegs`].
/// `Ok(())` means a VM exit (or a VM-entry failure exit) happened and L1
/// is back at HOST_RIP; `Err` is the instruction's VMfail or fault.
pub fn enter(launch: bool) -> Result<(), VmxOutcome> {
    clear_fault();
    // SAFETY: the current VMCS's host state points HOST_RIP at
    // l1_vmx_exit_stub, which restores the callee-saved registers and the
    // stack saved by l1_vmx_enter before returning here.
    let r = unsafe { l1_vmx_enter(u64::from(launch)) };
    match r {
        0 => Ok(()),
        1 => Err(VmxOutcome::FailInvalid),
        2 => Err(outcome(0, 1)),
        3 => Err(take_fault().map_or(
            VmxOutcome::Fault(VmxFault::GeneralProtection),
            fault_outcome,
        )),
        _ => Err(VmxOutcome::FailInvalid),
    }
}
