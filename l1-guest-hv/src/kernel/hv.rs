//! The hypervisor proper: capability discovery, VMXON, building a VMCS for
//! a 64-bit L2 that shares L1's address space, and the exit loop.

use core::arch::global_asm;

use l1_guest_hv::bitmaps::{io_bitmap_bit, msr_bitmap_bit, IoBitmap, MsrAccess};
use l1_guest_hv::caps::{self, adjust_control, apply_fixed, FeatureControlAction, VmxBasic};
use l1_guest_hv::exit::{ExitLine, ShowOutcome};
use l1_guest_hv::segment::{access_rights, AR_UNUSABLE};
use l1_guest_hv::text::Hex;
use vmcs12::controls::{EntryControls, ExitControls, PrimaryProcBased, SecondaryProcBased};
use vmcs12::{VmcsField, VmxOutcome};

use crate::boot::{KERNEL_CS, KERNEL_DS, KERNEL_TSS};
use crate::cpu::{self, page_fill, page_set_bit, page_write_u32, Global, Page};
use crate::vmx;

/// CR4.VMXE.
pub const CR4_VMXE: u64 = 1 << 13;

/// The VMXON region.
pub static VMXON_REGION: Page = Global::new([0; 4096]);
/// VMCS regions for the tests.
pub static VMCS_A: Page = Global::new([0; 4096]);
/// A second VMCS region.
pub static VMCS_B: Page = Global::new([0; 4096]);
/// I/O bitmap A.
pub static IO_PAGE_A: Page = Global::new([0; 4096]);
/// I/O bitmap B.
pub static IO_PAGE_B: Page = Global::new([0; 4096]);
/// MSR bitmap.
pub static MSR_PAGE: Page = Global::new([0; 4096]);

const L2_STACK_SIZE: usize = 16384;
static L2_STACK: Global<[u8; L2_STACK_SIZE]> = Global::new([0; L2_STACK_SIZE]);
static EXIT_STACK: Global<[u8; 4096]> = Global::new([0; 4096]);

/// The capability MSRs, read once.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// IA32_VMX_BASIC decoded.
    pub basic: VmxBasic,
    /// Pin, primary, exit, entry capability MSRs (TRUE_ ones if available).
    pub ctls: [u64; 4],
    /// IA32_VMX_MISC.
    pub misc: u64,
    /// CR0 fixed 0/1, CR4 fixed 0/1.
    pub fixed: [u64; 4],
    /// IA32_VMX_EPT_VPID_CAP, if readable.
    pub ept_vpid: Option<u64>,
    /// IA32_VMX_PROCBASED_CTLS2, when secondary controls may be activated.
    pub ctls2: Option<u64>,
}

fn rdmsr_logged(name: &str, msr: u32) -> Option<u64> {
    match cpu::try_rdmsr(msr) {
        Ok(v) => {
            say!("msr ", name, " (", Hex(u64::from(msr)), ") = ", Hex(v));
            Some(v)
        }
        Err(f) => {
            say!(
                "msr ",
                name,
                " (",
                Hex(u64::from(msr)),
                "): fault vector ",
                f.vector
            );
            None
        }
    }
}

/// Reads and prints the capability MSRs; `None` if VMX is not usable.
pub fn read_caps() -> Option<Caps> {
    let basic = VmxBasic::from_msr(rdmsr_logged("IA32_VMX_BASIC", caps::IA32_VMX_BASIC)?);
    say!(
        "vmx: revision=",
        Hex(u64::from(basic.revision_id)),
        " region-size=",
        basic.region_size,
        " true-controls=",
        basic.true_controls
    );
    let names = ["PINBASED", "PROCBASED", "EXIT", "ENTRY"];
    let mut ctls = [0u64; 4];
    for ((slot, msr), name) in ctls.iter_mut().zip(basic.control_msrs()).zip(names) {
        *slot = rdmsr_logged(name, msr)?;
    }
    let ctls2 = if ctls[1] >> 32 & u64::from(PrimaryProcBased::ACTIVATE_SECONDARY.bits()) != 0 {
        rdmsr_logged("PROCBASED_CTLS2", caps::IA32_VMX_PROCBASED_CTLS2)
    } else {
        None
    };
    let misc = rdmsr_logged("MISC", caps::IA32_VMX_MISC)?;
    let fixed = [
        rdmsr_logged("CR0_FIXED0", caps::IA32_VMX_CR0_FIXED0)?,
        rdmsr_logged("CR0_FIXED1", caps::IA32_VMX_CR0_FIXED1)?,
        rdmsr_logged("CR4_FIXED0", caps::IA32_VMX_CR4_FIXED0)?,
        rdmsr_logged("CR4_FIXED1", caps::IA32_VMX_CR4_FIXED1)?,
    ];
    let ept_vpid = ctls2.and_then(|_| rdmsr_logged("EPT_VPID_CAP", caps::IA32_VMX_EPT_VPID_CAP));
    Some(Caps {
        basic,
        ctls,
        misc,
        fixed,
        ept_vpid,
        ctls2,
    })
}

/// Prepares IA32_FEATURE_CONTROL and CR4.VMXE; false if VMX cannot be used.
pub fn enable_vmx() -> bool {
    let cpuid1_ecx = core::arch::x86_64::__cpuid(1).ecx;
    say!("cpuid.1:ecx.vmx = ", (cpuid1_ecx >> 5) & 1);
    let Ok(fc) = cpu::try_rdmsr(caps::IA32_FEATURE_CONTROL) else {
        say!("IA32_FEATURE_CONTROL: unreadable (#GP), VMX unavailable");
        return false;
    };
    say!("msr IA32_FEATURE_CONTROL (0x3a) = ", Hex(fc));
    match caps::feature_control_action(fc) {
        FeatureControlAction::Ready => {}
        FeatureControlAction::Write(v) => match cpu::try_wrmsr(caps::IA32_FEATURE_CONTROL, v) {
            Ok(()) => say!("IA32_FEATURE_CONTROL: wrote ", Hex(v)),
            Err(_) => say!("IA32_FEATURE_CONTROL: write ", Hex(v), " refused (#GP)"),
        },
        FeatureControlAction::LockedOff => {
            say!("IA32_FEATURE_CONTROL: locked with VMX off");
            return false;
        }
    }
    match cpu::try_write_cr4(cpu::read_cr4() | CR4_VMXE) {
        Ok(()) => say!("CR4.VMXE: set"),
        Err(f) => say!(
            "CR4.VMXE: refused (vector ",
            f.vector,
            "), treated as virtual (L0 keeps VMXE for us)"
        ),
    }
    true
}

/// Writes the revision identifier into a region (and clears the rest).
pub fn init_region(page: &Page, revision: u32) {
    page_fill(page, 0);
    page_write_u32(page, 0, revision & 0x7fff_ffff);
}

/// Bring-up: capabilities, feature control, VMXE, VMXON.
pub fn vmx_bringup() -> Option<Caps> {
    if !enable_vmx() {
        return None;
    }
    let caps = read_caps()?;
    init_region(&VMXON_REGION, caps.basic.revision_id);
    let o = vmx::vmxon(VMXON_REGION.addr());
    say!("vmxon ", Hex(VMXON_REGION.addr()), ": ", ShowOutcome(o));
    if o != VmxOutcome::Succeed {
        say!("VMX error: vmxon ", ShowOutcome(o));
        return None;
    }
    Some(caps)
}

/// An L2 to run: entry point plus which ports and MSRs L1 intercepts.
#[derive(Debug, Clone, Copy)]
pub struct GuestSpec<'a> {
    /// GUEST_RIP at VMLAUNCH.
    pub entry: u64,
    /// Ports whose accesses exit to L1.
    pub io_ports: &'a [u16],
    /// MSRs whose RDMSR and WRMSR exit to L1.
    pub msrs: &'a [u32],
    /// EXCEPTION_BITMAP.
    pub exception_bitmap: u32,
    /// Wanted secondary processor-based controls (0: secondary controls
    /// stay off).
    pub secondary: u32,
    /// EPT_POINTER, written when `secondary` enables EPT.
    pub eptp: u64,
}

/// A failed VMWRITE during setup.
#[derive(Debug, Clone, Copy)]
pub struct SetupError {
    /// The field.
    pub field: VmcsField,
    /// What VMWRITE returned.
    pub outcome: VmxOutcome,
}

fn w(field: VmcsField, value: u64) -> Result<(), SetupError> {
    match vmx::vmwrite(field, value) {
        VmxOutcome::Succeed => Ok(()),
        outcome => Err(SetupError { field, outcome }),
    }
}

/// VMWRITE for setup code that keeps going after a failure: prints the
/// field and outcome on the console and returns whether it succeeded.
pub fn write_or_say(field: VmcsField, value: u64) -> bool {
    match vmx::vmwrite(field, value) {
        VmxOutcome::Succeed => true,
        o => {
            say!("VMX error: vmwrite ", field.name(), " ", ShowOutcome(o));
            false
        }
    }
}

/// The guest data-segment registers SS, DS, ES, FS and GS, each as its
/// selector, base, limit and access-rights fields (SDM 25.4.1).
pub const GUEST_DATA_SEGMENTS: [[VmcsField; 4]; 5] = {
    use VmcsField::*;
    [
        [
            GUEST_SS_SELECTOR,
            GUEST_SS_BASE,
            GUEST_SS_LIMIT,
            GUEST_SS_AR_BYTES,
        ],
        [
            GUEST_DS_SELECTOR,
            GUEST_DS_BASE,
            GUEST_DS_LIMIT,
            GUEST_DS_AR_BYTES,
        ],
        [
            GUEST_ES_SELECTOR,
            GUEST_ES_BASE,
            GUEST_ES_LIMIT,
            GUEST_ES_AR_BYTES,
        ],
        [
            GUEST_FS_SELECTOR,
            GUEST_FS_BASE,
            GUEST_FS_LIMIT,
            GUEST_FS_AR_BYTES,
        ],
        [
            GUEST_GS_SELECTOR,
            GUEST_GS_BASE,
            GUEST_GS_LIMIT,
            GUEST_GS_AR_BYTES,
        ],
    ]
};

fn adjusted(name: &str, wanted: u32, cap: u64) -> u32 {
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

/// Writes a complete VMCS (the current one): controls adjusted to the
/// capability MSRs, host state = L1 now, guest state = a 64-bit L2 on
/// L1's page tables, GDT and IDT with its own stack.
pub fn setup_vmcs(caps: &Caps, spec: &GuestSpec<'_>) -> Result<(), SetupError> {
    use VmcsField::*;
    // Bitmaps (SDM 25.6.4, 25.6.9).
    for page in [&IO_PAGE_A, &IO_PAGE_B, &MSR_PAGE] {
        page_fill(page, 0);
    }
    for &port in spec.io_ports {
        let (which, byte, bit) = io_bitmap_bit(port);
        let page = if which == IoBitmap::A {
            &IO_PAGE_A
        } else {
            &IO_PAGE_B
        };
        page_set_bit(page, byte, bit);
    }
    for &msr in spec.msrs {
        for access in [MsrAccess::Read, MsrAccess::Write] {
            if let Some((byte, bit)) = msr_bitmap_bit(msr, access) {
                page_set_bit(&MSR_PAGE, byte, bit);
            }
        }
    }
    // Controls.
    let pin = adjusted("pin-based", 0, caps.ctls[0]);
    let mut want_proc = PrimaryProcBased::HLT_EXITING
        | PrimaryProcBased::USE_IO_BITMAPS
        | PrimaryProcBased::USE_MSR_BITMAPS;
    if spec.secondary != 0 {
        want_proc |= PrimaryProcBased::ACTIVATE_SECONDARY;
    }
    let proc = adjusted("primary", want_proc.bits(), caps.ctls[1]);
    let want_exit =
        ExitControls::HOST_ADDR_SPACE_SIZE | ExitControls::SAVE_EFER | ExitControls::LOAD_EFER;
    let exit = adjusted("exit", want_exit.bits(), caps.ctls[2]);
    let want_entry = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_EFER;
    let entry = adjusted("entry", want_entry.bits(), caps.ctls[3]);
    w(PIN_BASED_VM_EXEC_CONTROL, pin.into())?;
    w(CPU_BASED_VM_EXEC_CONTROL, proc.into())?;
    if proc & PrimaryProcBased::ACTIVATE_SECONDARY.bits() != 0 {
        // Secondary controls against IA32_VMX_PROCBASED_CTLS2 (SDM A.3.3).
        let secondary = match caps.ctls2 {
            Some(cap) => adjusted("secondary", spec.secondary, cap),
            None => 0,
        };
        w(SECONDARY_VM_EXEC_CONTROL, secondary.into())?;
        if secondary & SecondaryProcBased::ENABLE_EPT.bits() != 0 {
            w(EPT_POINTER, spec.eptp)?;
        }
    }
    w(EXCEPTION_BITMAP, spec.exception_bitmap.into())?;
    w(PAGE_FAULT_ERROR_CODE_MASK, 0)?;
    w(PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
    w(CR3_TARGET_COUNT, 0)?;
    w(VM_EXIT_CONTROLS, exit.into())?;
    w(VM_EXIT_MSR_STORE_COUNT, 0)?;
    w(VM_EXIT_MSR_LOAD_COUNT, 0)?;
    w(VM_ENTRY_CONTROLS, entry.into())?;
    w(VM_ENTRY_MSR_LOAD_COUNT, 0)?;
    w(VM_ENTRY_INTR_INFO_FIELD, 0)?;
    w(IO_BITMAP_A, IO_PAGE_A.addr())?;
    w(IO_BITMAP_B, IO_PAGE_B.addr())?;
    w(MSR_BITMAP, MSR_PAGE.addr())?;
    w(TSC_OFFSET, 0)?;
    w(CR0_GUEST_HOST_MASK, 0)?;
    w(CR4_GUEST_HOST_MASK, 0)?;
    w(VMCS_LINK_POINTER, u64::MAX)?;

    // Control registers: L1's, with the VMX fixed bits (SDM A.7, A.8);
    // VMXE is fixed to 1, which sets it even where L0 keeps it virtual.
    let [cr0_f0, cr0_f1, cr4_f0, cr4_f1] = caps.fixed;
    let cr0 = apply_fixed(cpu::read_cr0(), cr0_f0, cr0_f1);
    let cr3 = cpu::read_cr3();
    let cr4 = apply_fixed(cpu::read_cr4() | CR4_VMXE, cr4_f0, cr4_f1);
    let efer = cpu::try_rdmsr(caps::IA32_EFER).unwrap_or(0x500);
    let gdt = cpu::sgdt();
    let idt = cpu::sidt();
    let tss_base = l1_guest_hv::segment::descriptor_base(cpu::gdt_entry(KERNEL_TSS))
        | (cpu::gdt_entry(KERNEL_TSS + 8) << 32);

    // Host state: L1 itself (SDM 25.5).
    w(HOST_CR0, cr0)?;
    w(HOST_CR3, cr3)?;
    w(HOST_CR4, cr4)?;
    w(HOST_CS_SELECTOR, KERNEL_CS.into())?;
    for f in [
        HOST_SS_SELECTOR,
        HOST_DS_SELECTOR,
        HOST_ES_SELECTOR,
        HOST_FS_SELECTOR,
        HOST_GS_SELECTOR,
    ] {
        w(f, KERNEL_DS.into())?;
    }
    w(HOST_TR_SELECTOR, KERNEL_TSS.into())?;
    w(HOST_FS_BASE, 0)?;
    w(HOST_GS_BASE, 0)?;
    w(HOST_TR_BASE, tss_base)?;
    w(HOST_GDTR_BASE, gdt.base)?;
    w(HOST_IDTR_BASE, idt.base)?;
    w(HOST_IA32_SYSENTER_CS, 0)?;
    w(HOST_IA32_SYSENTER_ESP, 0)?;
    w(HOST_IA32_SYSENTER_EIP, 0)?;
    if exit & ExitControls::LOAD_EFER.bits() != 0 {
        w(HOST_IA32_EFER, efer)?;
    }
    w(HOST_RSP, EXIT_STACK.addr() + 4096)?;
    w(HOST_RIP, vmx::l1_vmx_exit_stub as *const () as u64)?;

    // Guest state: 64-bit L2 in L1's address space (SDM 25.4).
    w(GUEST_CR0, cr0)?;
    w(GUEST_CR3, cr3)?;
    w(GUEST_CR4, cr4)?;
    w(CR0_READ_SHADOW, cr0)?;
    w(CR4_READ_SHADOW, cr4)?;
    w(GUEST_DR7, 0x400)?;
    w(GUEST_RSP, L2_STACK.addr() + L2_STACK_SIZE as u64 - 8)?;
    w(GUEST_RIP, spec.entry)?;
    w(GUEST_RFLAGS, 0x2)?;
    // Segments from L1's GDT, accessed bit set (SDM 27.3.1.2 requires it).
    let code_ar = access_rights(cpu::gdt_entry(KERNEL_CS)) | 1;
    let data_ar = access_rights(cpu::gdt_entry(KERNEL_DS)) | 1;
    w(GUEST_CS_SELECTOR, KERNEL_CS.into())?;
    w(GUEST_CS_BASE, 0)?;
    w(GUEST_CS_LIMIT, 0xffff_ffff)?;
    w(GUEST_CS_AR_BYTES, code_ar.into())?;
    for [sel, base, limit, ar] in GUEST_DATA_SEGMENTS {
        w(sel, KERNEL_DS.into())?;
        w(base, 0)?;
        w(limit, 0xffff_ffff)?;
        w(ar, data_ar.into())?;
    }
    w(GUEST_LDTR_SELECTOR, 0)?;
    w(GUEST_LDTR_BASE, 0)?;
    w(GUEST_LDTR_LIMIT, 0)?;
    w(GUEST_LDTR_AR_BYTES, AR_UNUSABLE.into())?;
    w(GUEST_TR_SELECTOR, KERNEL_TSS.into())?;
    w(GUEST_TR_BASE, tss_base)?;
    w(GUEST_TR_LIMIT, 0x67)?;
    w(GUEST_TR_AR_BYTES, 0x8b)?; // present, busy 64-bit TSS
    w(GUEST_GDTR_BASE, gdt.base)?;
    w(GUEST_GDTR_LIMIT, gdt.limit.into())?;
    w(GUEST_IDTR_BASE, idt.base)?;
    w(GUEST_IDTR_LIMIT, idt.limit.into())?;
    if entry & EntryControls::LOAD_EFER.bits() != 0 {
        w(GUEST_IA32_EFER, efer)?;
    }
    w(GUEST_IA32_DEBUGCTL, 0)?;
    w(GUEST_SYSENTER_CS, 0)?;
    w(GUEST_SYSENTER_ESP, 0)?;
    w(GUEST_SYSENTER_EIP, 0)?;
    w(GUEST_INTERRUPTIBILITY_INFO, 0)?;
    w(GUEST_ACTIVITY_STATE, 0)?;
    w(GUEST_PENDING_DBG_EXCEPTIONS, 0)?;
    vmx::reset_guest_regs();
    Ok(())
}

/// One VM exit as L1 reads it.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The printable part.
    pub line: ExitLine,
    /// VM_EXIT_INTR_INFO (exception exits).
    pub intr_info: u32,
}

/// VMREADs the exit information; a failing VMREAD is reported as such.
pub fn read_exit() -> Result<Exit, (VmcsField, VmxOutcome)> {
    let r = |f: VmcsField| vmx::vmread(f).map_err(|o| (f, o));
    Ok(Exit {
        line: ExitLine {
            reason: r(VmcsField::VM_EXIT_REASON)? as u32,
            qualification: r(VmcsField::EXIT_QUALIFICATION)?,
            rip: r(VmcsField::GUEST_RIP)?,
            instruction_len: r(VmcsField::VM_EXIT_INSTRUCTION_LEN)? as u32,
        },
        intr_info: r(VmcsField::VM_EXIT_INTR_INFO)? as u32,
    })
}

/// What the exit handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Advance GUEST_RIP by VM_EXIT_INSTRUCTION_LEN and VMRESUME.
    Advance,
    /// Set GUEST_RIP to this and VMRESUME.
    Jump(u64),
    /// Leave the loop (L2 is done).
    Stop,
}

/// Why the run loop ended without the handler asking (already printed as
/// a `VMX error: ...` line).
#[derive(Debug, Clone, Copy)]
pub enum RunError {
    /// VMLAUNCH/VMRESUME failed.
    Entry,
    /// A VMREAD/VMWRITE in the loop failed.
    Access,
}

/// Launches the current VMCS and handles exits until `handler` says stop.
/// Prints one `exit ...` line per exit unless `quiet`.
pub fn run_guest(quiet: bool, mut handler: impl FnMut(&Exit) -> Action) -> Result<u32, RunError> {
    let mut launched = false;
    let mut exits = 0u32;
    loop {
        if let Err(o) = vmx::enter(!launched) {
            let name = if launched { "vmresume" } else { "vmlaunch" };
            say!("VMX error: ", name, " ", ShowOutcome(o));
            return Err(RunError::Entry);
        }
        exits += 1;
        let exit = read_exit().map_err(|(f, o)| {
            say!("VMX error: vmread ", f.name(), " ", ShowOutcome(o));
            RunError::Access
        })?;
        if !quiet {
            say!(exit.line);
        }
        if exit.line.entry_failure() {
            // The VMCS stays not launched after a failed entry (SDM 27.8).
            return Ok(exits);
        }
        launched = true;
        let next = match handler(&exit) {
            Action::Stop => return Ok(exits),
            Action::Advance => exit
                .line
                .rip
                .wrapping_add(u64::from(exit.line.instruction_len)),
            Action::Jump(rip) => rip,
        };
        match vmx::vmwrite(VmcsField::GUEST_RIP, next) {
            VmxOutcome::Succeed => {}
            o => {
                say!("VMX error: vmwrite GUEST_RIP ", ShowOutcome(o));
                return Err(RunError::Access);
            }
        }
    }
}

// The L2 guests: plain code in the L1 image, run on L1's page tables.
global_asm!(
    r#"
    .section .text.l2, "ax"
    /* l2_puts: print the NUL-terminated string at RSI on port DX. */
l2_puts:
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

    .globl l2_demo
l2_demo:
    leaq l2_msg_hello(%rip), %rsi
    movw $0x3f8, %dx
    call l2_puts
    leaq l2_msg_e9(%rip), %rsi
    movw $0xe9, %dx
    call l2_puts
    movl $0x1b, %ecx
    rdmsr
    movl %eax, l2_results+0(%rip)
    movl %edx, l2_results+4(%rip)
    addl $1, %eax
    movl $0x1b, %ecx
    wrmsr
    movl $0x1b, %ecx
    rdmsr
    movl %eax, l2_results+8(%rip)
    movl %edx, l2_results+12(%rip)
    movl $0x277, %ecx
    rdmsr
    movl %eax, l2_results+16(%rip)
    movl %edx, l2_results+20(%rip)
    leaq l2_msg_bye(%rip), %rsi
    movw $0x3f8, %dx
    call l2_puts
3:  hlt
    jmp 3b

    .globl l2_rip_change
l2_rip_change:
    movw $0x3f8, %dx
    movb $'@', %al
    outb %al, %dx
    leaq l2_msg_wrong(%rip), %rsi
    call l2_puts
4:  hlt
    jmp 4b
    .globl l2_rip_target
l2_rip_target:
    leaq l2_msg_moved(%rip), %rsi
    movw $0x3f8, %dx
    call l2_puts
5:  hlt
    jmp 5b

    .globl l2_cpuid
l2_cpuid:
    movl $0x4c310000, %eax
    xorl %ecx, %ecx
    cpuid
    movl %eax, l2_results+0(%rip)
    movl %ebx, l2_results+8(%rip)
    movl %ecx, l2_results+16(%rip)
    movl %edx, l2_results+24(%rip)
6:  hlt
    jmp 6b

    .globl l2_exception
l2_exception:
    ud2
    .globl l2_after_ud2
l2_after_ud2:
    leaq l2_msg_after_ud2(%rip), %rsi
    movw $0x3f8, %dx
    call l2_puts
7:  hlt
    jmp 7b

    .globl l2_bench
l2_bench:
    movl $1000, %ecx
    movw $0x80, %dx
8:  outb %al, %dx
    loop 8b
9:  hlt
    jmp 9b

    .globl l2_halt
l2_halt:
    hlt
    jmp l2_halt

    .section .rodata.l2, "a"
l2_msg_hello:
    .asciz "hello from L2\n"
l2_msg_e9:
    .asciz "L2 via port 0xe9 (not intercepted by L1)\n"
l2_msg_bye:
    .asciz "L2 done, halting\n"
l2_msg_wrong:
    .asciz "WRONG: L1 did not change GUEST_RIP\n"
l2_msg_moved:
    .asciz "L2 continues at the RIP L1 chose\n"
l2_msg_after_ud2:
    .asciz "L2 resumed after #UD\n"

    .section .bss.l2, "aw", @nobits
    .balign 8
    .globl l2_results
l2_results:
    .skip 64
    .text
"#,
    options(att_syntax)
);

extern "C" {
    /// Demo L2 entry.
    pub fn l2_demo();
    /// rip-change L2 entry.
    pub fn l2_rip_change();
    /// Where rip-change's L1 sends L2.
    pub fn l2_rip_target();
    /// cpuid L2 entry.
    pub fn l2_cpuid();
    /// exception L2 entry.
    pub fn l2_exception();
    /// After exception's UD2.
    pub fn l2_after_ud2();
    /// bench L2 entry.
    pub fn l2_bench();
    /// An L2 that only halts (for the vmx-errors launches).
    pub fn l2_halt();
    static l2_results: [u64; 8];
}

/// The address of an L2 entry point.
pub fn entry(f: unsafe extern "C" fn()) -> u64 {
    f as *const () as u64
}

/// Slot `i` of the 8 u64 results L2 stores.
pub fn l2_result(i: usize) -> u64 {
    if i >= 8 {
        return 0;
    }
    // SAFETY: l2_results is 64 bytes of .bss; L2 is not running now.
    unsafe {
        (core::ptr::addr_of!(l2_results) as *const u64)
            .add(i)
            .read_volatile()
    }
}
