//! State transfer between vmcs12 and the L1/L2 vCPU records.
//!
//! Three directions, as the SDM describes a VMX transition:
//! - [`prepare_vmcs12`]: an L2 exit that L0 reflects to L1 records the exit
//!   information and saves the L2 guest state into vmcs12 (SDM 28.2-28.4).
//!   When L0 handles an exit itself the caller does not call it: vmcs12 is
//!   left exactly as L1 last saw it.
//! - [`load_vmcs12_host_state`]: L1 gets the host state of vmcs12 and the
//!   VM-exit MSR-load area (SDM 28.5-28.6); failures are a [`VmxAbort`].
//! - [`prepare_vmcs02`]: VMLAUNCH/VMRESUME builds the L2 vCPU from the
//!   guest-state area and the VM-entry controls (SDM 27.3-27.6); failures
//!   after the checks are an [`EntryFailure`] (an exit with bit 31 set).
//!
//! `docs/state-transfer.md` maps every field to the vCPU state it feeds.

use vmcs12::controls::{
    intr_info, EntryControls, ExitControls, PinBased, PrimaryProcBased, SecondaryProcBased,
};
use vmcs12::entry::{pdpte_reserved, read_pdptes, Seg, GUEST_PDPTES};
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField as F, VmxCapabilities};

use crate::exit_info::ExitInfo;
use crate::state::{msr_index, DescriptorTable, Gprs, PendingEvent, Segment, VcpuState};

/// The value a guest reads from CR0 or CR4 (SDM 26.3, "MOV from CR0/CR4"):
/// bits set in the guest/host mask come from the read shadow, the others
/// from the register itself.
pub fn merge_cr(hw_value: u64, guest_host_mask: u64, read_shadow: u64) -> u64 {
    (hw_value & !guest_host_mask) | (read_shadow & guest_host_mask)
}

/// The inverse of [`merge_cr`] for a guest write that did not exit: the new
/// register value takes the guest-owned bits (mask clear) from what the
/// guest wrote and keeps the host-owned bits (mask set) of the register.
pub fn unmerge_cr(guest_written: u64, guest_host_mask: u64, hw_value: u64) -> u64 {
    (guest_written & !guest_host_mask) | (hw_value & guest_host_mask)
}

/// Whether MOV to CR0/CR4 of `written` exits (SDM 26.1.3): some bit owned
/// by the host (set in the mask) differs from the read shadow.
pub fn cr_write_causes_exit(guest_host_mask: u64, read_shadow: u64, written: u64) -> bool {
    (written ^ read_shadow) & guest_host_mask != 0
}

/// How the L0 reads and writes MSRs of a vCPU for the MSR areas.
pub trait MsrAccess {
    /// The value RDMSR at CPL 0 returns, or `None` if RDMSR would #GP.
    fn read_msr(&self, index: u32) -> Option<u64>;
    /// Whether WRMSR of `value` at CPL 0 would succeed (no #GP).
    fn can_write_msr(&self, index: u32, value: u64) -> bool;
}

/// The modelled MSRs of the record itself ([`VcpuState::msr`]); any other
/// index reads and writes as #GP.
impl MsrAccess for VcpuState {
    fn read_msr(&self, index: u32) -> Option<u64> {
        self.msr(index)
    }

    fn can_write_msr(&self, index: u32, _value: u64) -> bool {
        self.msr(index).is_some()
    }
}

/// One entry of an MSR area (SDM 25.7.2, Table 25-15): index in bits 31:0,
/// bits 63:32 reserved, data in bits 127:64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// MSR value.
    pub value: u64,
}

/// Entries an MSR area may hold: 512 * (IA32_VMX_MISC[27:25] + 1) with the
/// field at 0, which this L0 advertises (SDM A.6).
pub const MAX_MSR_AREA_ENTRIES: u32 = 512;

/// A VMX abort (SDM 28.7): the VM exit cannot complete. The L0 writes
/// [`VmxAbort::indicator`] to bytes 4-7 of the vmcs12 region and shuts the
/// L1 vCPU down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VmxAbort {
    /// Indicator 1: an entry of the VM-exit MSR-store area failed.
    #[error("VMX abort 1: VM-exit MSR-store entry {entry} failed; fix VM_EXIT_MSR_STORE_ADDR/COUNT or the MSR index in that entry")]
    SaveGuestMsr {
        /// 1-based number of the failing entry.
        entry: u32,
    },
    /// Indicator 2: the host PDPTEs (PAE host) are invalid.
    #[error("VMX abort 2: host PDPTEs at HOST_CR3 are unreadable or set reserved bits; give the PAE host valid PDPTEs")]
    HostPdpte,
    /// Indicator 3: the current VMCS is corrupted.
    #[error("VMX abort 3: the current VMCS is corrupted")]
    VmcsCorrupted,
    /// Indicator 4: an entry of the VM-exit MSR-load area failed.
    #[error("VMX abort 4: VM-exit MSR-load entry {entry} failed; fix VM_EXIT_MSR_LOAD_ADDR/COUNT or the entry's index/value")]
    LoadHostMsr {
        /// 1-based number of the failing entry.
        entry: u32,
    },
    /// Indicator 5: a machine-check event during the VM exit.
    #[error("VMX abort 5: machine-check event during VM exit")]
    MachineCheck,
    /// Indicator 6: the processor was in IA-32e mode and the "host
    /// address-space size" exit control is 0.
    #[error("VMX abort 6: L2 was in IA-32e mode but the \"host address-space size\" exit control is 0; set it for a 64-bit host")]
    HostAddressSpaceSize,
}

impl VmxAbort {
    /// The VMX-abort indicator number (SDM 28.7).
    pub fn indicator(&self) -> u32 {
        match self {
            VmxAbort::SaveGuestMsr { .. } => 1,
            VmxAbort::HostPdpte => 2,
            VmxAbort::VmcsCorrupted => 3,
            VmxAbort::LoadHostMsr { .. } => 4,
            VmxAbort::MachineCheck => 5,
            VmxAbort::HostAddressSpaceSize => 6,
        }
    }
}

/// A VM entry that passed its checks but failed while loading guest state
/// (SDM 27.8): L1 sees a VM exit with bit 31 of the exit reason set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryFailure {
    /// Exit reason 33, qualification 2: the guest PDPTEs could not be
    /// loaded (unreadable or reserved bits set).
    #[error("VM-entry failure (reason 33, qualification 2): guest PDPTEs are unreadable or set reserved bits")]
    PdpteLoad,
    /// Exit reason 34: entry `entry` (1-based, the exit qualification) of
    /// the VM-entry MSR-load area failed.
    #[error("VM-entry failure (reason 34): VM-entry MSR-load entry {entry} failed; fix the entry or VM_ENTRY_MSR_LOAD_ADDR/COUNT")]
    MsrLoad {
        /// 1-based number of the failing entry.
        entry: u32,
    },
}

impl EntryFailure {
    /// Basic exit reason 33: VM-entry failure due to invalid guest state.
    pub const REASON_INVALID_GUEST_STATE: u32 = 33;
    /// Basic exit reason 34: VM-entry failure due to MSR loading.
    pub const REASON_MSR_LOADING: u32 = 34;

    /// VM_EXIT_REASON, with bit 31 set.
    pub fn exit_reason(&self) -> u32 {
        let basic = match self {
            EntryFailure::PdpteLoad => Self::REASON_INVALID_GUEST_STATE,
            EntryFailure::MsrLoad { .. } => Self::REASON_MSR_LOADING,
        };
        basic | ExitInfo::REASON_ENTRY_FAILURE
    }

    /// EXIT_QUALIFICATION.
    pub fn qualification(&self) -> u64 {
        match self {
            EntryFailure::PdpteLoad => 2,
            EntryFailure::MsrLoad { entry } => u64::from(*entry),
        }
    }

    /// The exit record to pass to [`prepare_vmcs12`].
    pub fn exit_info(&self) -> ExitInfo {
        ExitInfo {
            reason: self.exit_reason(),
            qualification: self.qualification(),
            ..ExitInfo::default()
        }
    }
}

/// The L2 vCPU built by [`prepare_vmcs02`], with what L0 needs besides the
/// register state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmcs02 {
    /// The L2 vCPU.
    pub l2: VcpuState,
    /// CR0_GUEST_HOST_MASK: CR0 bits L1 owns.
    pub cr0_guest_host_mask: u64,
    /// CR0_READ_SHADOW.
    pub cr0_read_shadow: u64,
    /// CR4_GUEST_HOST_MASK.
    pub cr4_guest_host_mask: u64,
    /// CR4_READ_SHADOW.
    pub cr4_read_shadow: u64,
    /// TSC_OFFSET when "use TSC offsetting" is 1, else 0. This is L1's
    /// offset for L2 only; L0 adds its own offset for L1.
    pub tsc_offset: u64,
    /// The PDPTEs in use when L2 runs with PAE paging (from the GUEST_PDPTEn
    /// fields with EPT, from guest memory at CR3 without), else `None`.
    pub pdptes: Option<[u64; 4]>,
    /// The VM-entry MSR-load area, in order. Entries for MSRs that
    /// [`VcpuState`] models are already applied to `l2`; the caller applies
    /// the rest.
    pub msr_loads: Vec<MsrEntry>,
}

impl Vmcs02 {
    /// What MOV from CR0 returns in L2.
    pub fn l2_cr0_read(&self) -> u64 {
        merge_cr(self.l2.cr0, self.cr0_guest_host_mask, self.cr0_read_shadow)
    }

    /// What MOV from CR4 returns in L2.
    pub fn l2_cr4_read(&self) -> u64 {
        merge_cr(self.l2.cr4, self.cr4_guest_host_mask, self.cr4_read_shadow)
    }
}

// ---------------------------------------------------------------------------
// Exit-information tables (SDM 28.2)
// ---------------------------------------------------------------------------

/// Basic exit reasons used below (SDM Appendix C).
mod reason {
    pub const EXCEPTION_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const SIPI: u16 = 4;
    pub const IO_SMI: u16 = 5;
    pub const TASK_SWITCH: u16 = 9;
    pub const INVLPG: u16 = 14;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
}

/// Reasons whose exit qualification the SDM defines (SDM 28.2.1); for every
/// other exit the field is cleared. Exception exits (0) define it only for
/// #DB and #PF, see [`exit_defines_qualification`].
const QUALIFICATION_REASONS: &[u16] = &[
    reason::SIPI,
    reason::IO_SMI,
    reason::TASK_SWITCH,
    reason::INVLPG,
    19, // VMCLEAR
    21, // VMPTRLD
    22, // VMPTRST
    23, // VMREAD
    25, // VMWRITE
    27, // VMXON
    reason::CR_ACCESS,
    29, // MOV DR
    reason::IO_INSTRUCTION,
    33, // VM-entry failure: invalid guest state
    34, // VM-entry failure: MSR loading
    36, // MWAIT
    44, // APIC access
    45, // virtualized EOI
    46, // GDTR/IDTR access
    47, // LDTR/TR access
    reason::EPT_VIOLATION,
    50, // INVEPT
    53, // INVVPID
    56, // APIC write
    58, // INVPCID
    62, // page-modification log full
    63, // XSAVES
    64, // XRSTORS
    66, // SPP-related event
    75, // instruction timeout
];

/// Reasons caused by executing an instruction: they define the VM-exit
/// instruction length (SDM 28.2.5).
const INSTRUCTION_REASONS: &[u16] = &[
    10, 11, 12, 13, 14, 15, 16, 17, // CPUID GETSEC HLT INVD INVLPG RDPMC RDTSC RSM
    18, 19, 20, 21, 22, 23, 24, 25, 26, 27, // VMCALL .. VMXON
    28, 29, 30, 31, 32, // MOV CR, MOV DR, I/O, RDMSR, WRMSR
    36, 39, 40, // MWAIT MONITOR PAUSE
    46, 47, // descriptor-table instructions
    50, 51, 53, 54, 55, // INVEPT RDTSCP INVVPID WBINVD XSETBV
    57, 58, 59, 60, 61, // RDRAND INVPCID VMFUNC ENCLS RDSEED
    63, 64, 65, // XSAVES XRSTORS PCONFIG
    67, 68, 69, 70, // UMWAIT TPAUSE LOADIWKEY ENCLV
    72, 73, // ENQCMD ENQCMDS
    76, 77, // SEAMCALL TDCALL
];

/// Reasons that define the VM-exit instruction-information field
/// (SDM 28.2.5, Tables 28-9 to 28-14). I/O (30) is handled separately:
/// only INS/OUTS define it.
const INSTRUCTION_INFO_REASONS: &[u16] = &[
    19, 21, 22, 23, 25, 27, // VMCLEAR VMPTRLD VMPTRST VMREAD VMWRITE VMXON
    46, 47, // descriptor-table instructions
    50, 53, 58, // INVEPT INVVPID INVPCID
    57, 61, // RDRAND RDSEED
    63, 64, // XSAVES XRSTORS
    67, 68, 69, // UMWAIT TPAUSE LOADIWKEY
    72, 73, // ENQCMD ENQCMDS
];

fn intr_type(info: u32) -> u32 {
    info & intr_info::TYPE_MASK
}

fn is_software_event(info: u32) -> bool {
    info & intr_info::VALID != 0
        && matches!(
            intr_type(info),
            intr_info::TYPE_SOFT_INTR
                | intr_info::TYPE_PRIV_SW_EXCEPTION
                | intr_info::TYPE_SOFT_EXCEPTION
        )
}

/// I/O exit qualification bit 4: string instruction (INS/OUTS).
const IO_QUAL_STRING: u64 = 1 << 4;

/// Whether the SDM defines EXIT_QUALIFICATION for this exit (SDM 28.2.1).
pub fn exit_defines_qualification(exit: &ExitInfo) -> bool {
    let basic = exit.basic_reason();
    if basic == reason::EXCEPTION_NMI {
        // Only debug exceptions (#DB, 1) and page faults (#PF, 14).
        let hard = intr_type(exit.intr_info) == intr_info::TYPE_HARD_EXCEPTION;
        let vector = exit.intr_info & intr_info::VECTOR_MASK;
        return exit.intr_info & intr_info::VALID != 0 && hard && (vector == 1 || vector == 14);
    }
    QUALIFICATION_REASONS.contains(&basic)
}

/// Whether the SDM defines VM_EXIT_INSTRUCTION_LEN for this exit
/// (SDM 28.2.5): instruction exits, software exceptions (INT3/INTO/INT1),
/// task switches caused by CALL/IRET/JMP or a software event, and any exit
/// during delivery of a software interrupt or exception.
pub fn exit_defines_instruction_len(exit: &ExitInfo) -> bool {
    let basic = exit.basic_reason();
    if is_software_event(exit.idt_vectoring_info) {
        return true;
    }
    match basic {
        reason::EXCEPTION_NMI => {
            exit.intr_info & intr_info::VALID != 0
                && matches!(
                    intr_type(exit.intr_info),
                    intr_info::TYPE_PRIV_SW_EXCEPTION | intr_info::TYPE_SOFT_EXCEPTION
                )
        }
        // Qualification bits 31:30: 0 CALL, 1 IRET, 2 JMP, 3 IDT task gate
        // (the gate case is covered by the IDT-vectoring check above).
        reason::TASK_SWITCH => (exit.qualification >> 30) & 3 != 3,
        _ => INSTRUCTION_REASONS.contains(&basic),
    }
}

/// Whether the SDM defines VMX_INSTRUCTION_INFO for this exit (SDM 28.2.5).
pub fn exit_defines_instruction_info(exit: &ExitInfo) -> bool {
    let basic = exit.basic_reason();
    if basic == reason::IO_INSTRUCTION {
        return exit.qualification & IO_QUAL_STRING != 0;
    }
    INSTRUCTION_INFO_REASONS.contains(&basic)
}

/// Whether the SDM defines GUEST_LINEAR_ADDRESS for this exit (SDM 28.2.1):
/// LMSW with a memory operand, INS/OUTS, and EPT violations that report a
/// valid linear address (qualification bit 7).
pub fn exit_defines_guest_linear_address(exit: &ExitInfo) -> bool {
    let q = exit.qualification;
    match exit.basic_reason() {
        // Access type (bits 5:4) 3 = LMSW; bit 6 = memory operand.
        reason::CR_ACCESS => (q >> 4) & 3 == 3 && q & (1 << 6) != 0,
        reason::IO_INSTRUCTION => q & IO_QUAL_STRING != 0,
        reason::EPT_VIOLATION => q & (1 << 7) != 0,
        _ => false,
    }
}

/// Whether the SDM defines GUEST_PHYSICAL_ADDRESS for this exit: EPT
/// violations and EPT misconfigurations (SDM 28.2.1).
pub fn exit_defines_guest_physical_address(exit: &ExitInfo) -> bool {
    matches!(
        exit.basic_reason(),
        reason::EPT_VIOLATION | reason::EPT_MISCONFIG
    )
}

// ---------------------------------------------------------------------------
// Segments
// ---------------------------------------------------------------------------

// The guest segment registers and their vmcs12 fields come from
// `vmcs12::entry::Seg` (one table for the entry checks and for this file).

/// The segment register of `s` that `reg` names.
fn segment_of(s: &VcpuState, reg: Seg) -> Segment {
    match reg {
        Seg::Es => s.es,
        Seg::Cs => s.cs,
        Seg::Ss => s.ss,
        Seg::Ds => s.ds,
        Seg::Fs => s.fs,
        Seg::Gs => s.gs,
        Seg::Ldtr => s.ldtr,
        Seg::Tr => s.tr,
    }
}

/// The segment register of `s` that `reg` names, for writing.
fn segment_slot(s: &mut VcpuState, reg: Seg) -> &mut Segment {
    match reg {
        Seg::Es => &mut s.es,
        Seg::Cs => &mut s.cs,
        Seg::Ss => &mut s.ss,
        Seg::Ds => &mut s.ds,
        Seg::Fs => &mut s.fs,
        Seg::Gs => &mut s.gs,
        Seg::Ldtr => &mut s.ldtr,
        Seg::Tr => &mut s.tr,
    }
}

/// Access-rights bits that exist: 7:0, 15:12 and unusable (16). Bits 11:8
/// and 31:17 are reserved and always saved as 0 (SDM 28.3.2).
const AR_DEFINED: u32 = 0x0001_f0ff;
/// AR DPL, bits 6:5.
const AR_DPL: u32 = 0x60;
/// AR L, D/B and G bits (15:13).
const AR_LDG: u32 = 0xe000;

/// The architectural view of a segment as VMX saves it on exit (SDM 28.3.2)
/// and loads it on entry (SDM 27.3.2.2). For an unusable register only what
/// the SDM defines survives; the undefined parts are made 0 so that both
/// directions are deterministic: CS keeps base, limit and L/D/G; SS keeps
/// its DPL (the CPL); FS/GS/LDTR keep their base; SS/DS/ES bases lose bits
/// 63:32.
fn normalize_segment(reg: Seg, seg: Segment) -> Segment {
    let mut out = seg;
    out.ar &= AR_DEFINED;
    if !seg.unusable() {
        return out;
    }
    out.ar = Segment::AR_UNUSABLE
        | match reg {
            Seg::Cs => seg.ar & AR_LDG,
            Seg::Ss => seg.ar & AR_DPL,
            _ => 0,
        };
    if matches!(reg, Seg::Ss | Seg::Ds | Seg::Es) {
        out.base &= 0xffff_ffff;
    }
    out
}

fn read_segment(vmcs12: &Vmcs12, reg: Seg) -> Segment {
    let (sel, base, limit, ar) = reg.fields();
    normalize_segment(
        reg,
        Segment {
            selector: vmcs12.get(sel) as u16,
            base: vmcs12.get(base),
            limit: vmcs12.get32(limit),
            ar: vmcs12.get32(ar),
        },
    )
}

fn write_segment(vmcs12: &mut Vmcs12, reg: Seg, seg: Segment) {
    let seg = normalize_segment(reg, seg);
    let (sel, base, limit, ar) = reg.fields();
    vmcs12.set(sel, u64::from(seg.selector));
    vmcs12.set(base, seg.base);
    vmcs12.set(limit, u64::from(seg.limit));
    vmcs12.set(ar, u64::from(seg.ar));
}

// ---------------------------------------------------------------------------
// MSR areas (SDM 27.4, 28.4, 28.6)
// ---------------------------------------------------------------------------

/// Guest-physical address of the data half (bytes 15:8) of entry `i`;
/// `None` when the address arithmetic overflows.
fn entry_data_addr(base: u64, i: u32) -> Option<u64> {
    base.checked_add(u64::from(i) * 16)?.checked_add(8)
}

/// Reads entry `i`: (index, reserved bits 63:32, data); `None` when any of
/// its 16 bytes is outside guest RAM.
fn read_area_entry(mem: &dyn GuestPhysMemory, base: u64, i: u32) -> Option<(u32, u32, u64)> {
    let data_addr = entry_data_addr(base, i)?;
    let lo = mem.read_u64(data_addr - 8).ok()?;
    let value = mem.read_u64(data_addr).ok()?;
    Some((lo as u32, (lo >> 32) as u32, value))
}

/// Rules common to all three areas: reserved bits 63:32, the x2APIC MSRs
/// (bits 31:8 = 000008H) and the microcode MSRs, which cannot be loaded or
/// stored for model-specific reasons.
fn common_msr_refused(index: u32, reserved: u32) -> bool {
    reserved != 0
        || (msr_index::X2APIC_FIRST..=msr_index::X2APIC_LAST).contains(&index)
        || index == msr_index::IA32_BIOS_UPDT_TRIG
        || index == msr_index::IA32_BIOS_SIGN_ID
}

/// Rules for an MSR-load area (SDM 27.4 and 28.6): FS/GS base cannot be
/// loaded this way, nor IA32_SMM_MONITOR_CTL, nor anything WRMSR refuses.
fn load_msr_refused(index: u32, reserved: u32, value: u64, msrs: &dyn MsrAccess) -> bool {
    common_msr_refused(index, reserved)
        || index == msr_index::IA32_FS_BASE
        || index == msr_index::IA32_GS_BASE
        || index == msr_index::IA32_SMM_MONITOR_CTL
        || !msrs.can_write_msr(index, value)
}

/// Processes an MSR-load area; `Err(entry)` names the 1-based failing entry.
fn load_msr_area(
    mem: &dyn GuestPhysMemory,
    base: u64,
    count: u32,
    msrs: &dyn MsrAccess,
) -> Result<Vec<MsrEntry>, u32> {
    let mut out = Vec::new();
    for i in 0..count {
        if i >= MAX_MSR_AREA_ENTRIES {
            return Err(i + 1);
        }
        let (index, reserved, value) = read_area_entry(mem, base, i).ok_or(i + 1)?;
        if load_msr_refused(index, reserved, value, msrs) {
            return Err(i + 1);
        }
        out.push(MsrEntry { index, value });
    }
    Ok(out)
}

/// The VM-exit MSR-store area (SDM 28.4): each entry's data gets the value
/// RDMSR returns; IA32_SMBASE (SMM only) and anything RDMSR refuses fail.
fn store_msr_area(
    mem: &mut dyn GuestPhysMemory,
    base: u64,
    count: u32,
    msrs: &dyn MsrAccess,
) -> Result<(), u32> {
    for i in 0..count {
        if i >= MAX_MSR_AREA_ENTRIES {
            return Err(i + 1);
        }
        let (index, reserved, _) = read_area_entry(mem, base, i).ok_or(i + 1)?;
        if common_msr_refused(index, reserved) || index == msr_index::IA32_SMBASE {
            return Err(i + 1);
        }
        let value = msrs.read_msr(index).ok_or(i + 1)?;
        let data_addr = entry_data_addr(base, i).ok_or(i + 1)?;
        mem.write_u64(data_addr, value).map_err(|_| i + 1)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// PDPTEs (SDM 4.4.1, 27.3.1.6, 28.5.4)
// ---------------------------------------------------------------------------

const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// CR0 bits 63:32, 28:19, 17 and 15:6: reserved.
const CR0_RESERVED: u64 = 0xffff_ffff_0000_0000 | 0x1ff8_0000 | (1 << 17) | 0xffc0;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PCIDE: u64 = 1 << 17;
const DR7_RESET: u64 = 0x400;
const RFLAGS_RESERVED_1: u64 = 0x2;
const ACTIVITY_HLT: u32 = 1;

/// Reads and checks the four PDPTEs at CR3 bits 31:5 (SDM 4.4.1; one
/// implementation in `vmcs12::entry`, shared with the VM-entry checks).
fn load_pdptes(mem: &dyn GuestPhysMemory, cr3: u64, phys_addr_width: u8) -> Option<[u64; 4]> {
    let p = read_pdptes(mem, cr3).ok()?;
    (!p.iter().any(|&e| pdpte_reserved(e, phys_addr_width))).then_some(p)
}

/// The secondary controls as VMX uses them: 0 unless "activate secondary
/// controls" is 1 (SDM 25.6.2).
fn secondary_controls(vmcs12: &Vmcs12) -> SecondaryProcBased {
    let primary = PrimaryProcBased::from_bits_retain(vmcs12.get32(F::CPU_BASED_VM_EXEC_CONTROL));
    if primary.contains(PrimaryProcBased::ACTIVATE_SECONDARY) {
        SecondaryProcBased::from_bits_retain(vmcs12.get32(F::SECONDARY_VM_EXEC_CONTROL))
    } else {
        SecondaryProcBased::empty()
    }
}

fn ept_enabled(vmcs12: &Vmcs12) -> bool {
    secondary_controls(vmcs12).contains(SecondaryProcBased::ENABLE_EPT)
}

fn uses_pae_paging(cr0: u64, cr4: u64, efer: u64) -> bool {
    cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0 && efer & VcpuState::EFER_LMA == 0
}

// ---------------------------------------------------------------------------
// prepare_vmcs12 (SDM 28.2-28.4)
// ---------------------------------------------------------------------------

/// Records a reflected L2 exit in vmcs12 and saves the L2 state, as a VMX
/// CPU does on VM exit (SDM 28.2 to 28.4).
///
/// - Exit information: VM_EXIT_REASON as given; EXIT_QUALIFICATION,
///   GUEST_LINEAR_ADDRESS, GUEST_PHYSICAL_ADDRESS, VM_EXIT_INSTRUCTION_LEN and
///   VMX_INSTRUCTION_INFO are written from `exit` where the SDM defines them
///   for that reason and written as 0 where it does not (hardware leaves them
///   undefined; 0 keeps stale values from earlier exits away from L1).
///   VM_EXIT_INTR_INFO holds the event for exception/NMI exits and for
///   external-interrupt exits with "acknowledge interrupt on exit", else 0;
///   the two error codes are written only when their info field says an
///   error code is valid, else 0. The I/O RCX/RSI/RDI/RIP fields are written
///   for SMIs after I/O (reason 5) only.
/// - A VM-entry failure (bit 31 of the reason) writes only the reason and
///   the qualification (SDM 27.8): no guest state, no MSR store, and the
///   VM-entry interruption information keeps its valid bit.
/// - Otherwise the valid bit of VM_ENTRY_INTR_INFO_FIELD is cleared, the
///   guest-state area is saved from `l2`, "IA-32e mode guest" gets EFER.LMA,
///   and the VM-exit MSR-store area gets the values `l2_msrs` reads.
///
/// `preemption_timer_remaining` is stored only with "save VMX-preemption
/// timer value". A failing MSR-store entry is [`VmxAbort::SaveGuestMsr`].
pub fn prepare_vmcs12(
    vmcs12: &mut Vmcs12,
    l2: &VcpuState,
    exit: &ExitInfo,
    preemption_timer_remaining: u32,
    l2_msrs: &dyn MsrAccess,
    mem: &mut dyn GuestPhysMemory,
) -> Result<(), VmxAbort> {
    record_exit_information(vmcs12, exit);
    if exit.reason & ExitInfo::REASON_ENTRY_FAILURE != 0 {
        return Ok(());
    }
    let entry_info = vmcs12.get(F::VM_ENTRY_INTR_INFO_FIELD);
    vmcs12.set(
        F::VM_ENTRY_INTR_INFO_FIELD,
        entry_info & !u64::from(intr_info::VALID),
    );
    save_guest_state(vmcs12, l2, preemption_timer_remaining);
    let base = vmcs12.get(F::VM_EXIT_MSR_STORE_ADDR);
    let count = vmcs12.get32(F::VM_EXIT_MSR_STORE_COUNT);
    store_msr_area(mem, base, count, l2_msrs).map_err(|entry| VmxAbort::SaveGuestMsr { entry })
}

fn record_exit_information(vmcs12: &mut Vmcs12, exit: &ExitInfo) {
    let defined = |yes: bool, v: u64| if yes { v } else { 0 };
    vmcs12.set(F::VM_EXIT_REASON, u64::from(exit.reason));
    vmcs12.set(
        F::EXIT_QUALIFICATION,
        defined(exit_defines_qualification(exit), exit.qualification),
    );
    if exit.reason & ExitInfo::REASON_ENTRY_FAILURE != 0 {
        return;
    }
    vmcs12.set(
        F::GUEST_LINEAR_ADDRESS,
        defined(
            exit_defines_guest_linear_address(exit),
            exit.guest_linear_address,
        ),
    );
    vmcs12.set(
        F::GUEST_PHYSICAL_ADDRESS,
        defined(
            exit_defines_guest_physical_address(exit),
            exit.guest_physical_address,
        ),
    );
    let exit_ctl = ExitControls::from_bits_retain(vmcs12.get32(F::VM_EXIT_CONTROLS));
    let intr = match exit.basic_reason() {
        reason::EXCEPTION_NMI => exit.intr_info,
        reason::EXTERNAL_INTERRUPT if exit_ctl.contains(ExitControls::ACK_INTR_ON_EXIT) => {
            exit.intr_info
        }
        _ => 0,
    };
    let has_code =
        |info: u32| info & intr_info::VALID != 0 && info & intr_info::DELIVER_ERROR_CODE != 0;
    vmcs12.set(F::VM_EXIT_INTR_INFO, u64::from(intr));
    vmcs12.set(
        F::VM_EXIT_INTR_ERROR_CODE,
        defined(has_code(intr), u64::from(exit.intr_error_code)),
    );
    vmcs12.set(
        F::IDT_VECTORING_INFO_FIELD,
        u64::from(exit.idt_vectoring_info),
    );
    vmcs12.set(
        F::IDT_VECTORING_ERROR_CODE,
        defined(
            has_code(exit.idt_vectoring_info),
            u64::from(exit.idt_vectoring_error_code),
        ),
    );
    vmcs12.set(
        F::VM_EXIT_INSTRUCTION_LEN,
        defined(
            exit_defines_instruction_len(exit),
            u64::from(exit.instruction_len),
        ),
    );
    vmcs12.set(
        F::VMX_INSTRUCTION_INFO,
        defined(
            exit_defines_instruction_info(exit),
            u64::from(exit.instruction_info),
        ),
    );
    if exit.basic_reason() == reason::IO_SMI {
        vmcs12.set(F::IO_RCX, exit.io_rcx);
        vmcs12.set(F::IO_RSI, exit.io_rsi);
        vmcs12.set(F::IO_RDI, exit.io_rdi);
        vmcs12.set(F::IO_RIP, exit.io_rip);
    }
}

/// SDM 28.3: the guest-state area from the L2 vCPU.
fn save_guest_state(vmcs12: &mut Vmcs12, l2: &VcpuState, preemption_timer_remaining: u32) {
    let exit_ctl = ExitControls::from_bits_retain(vmcs12.get32(F::VM_EXIT_CONTROLS));
    // CR0 and CR4 are the values L2 runs with; the shadows stay in vmcs12.
    vmcs12.set(F::GUEST_CR0, l2.cr0);
    vmcs12.set(F::GUEST_CR3, l2.cr3);
    vmcs12.set(F::GUEST_CR4, l2.cr4);
    if exit_ctl.contains(ExitControls::SAVE_DEBUG_CONTROLS) {
        vmcs12.set(F::GUEST_DR7, l2.dr7);
        vmcs12.set(F::GUEST_IA32_DEBUGCTL, l2.msrs.debugctl);
    }
    vmcs12.set(F::GUEST_SYSENTER_CS, u64::from(l2.msrs.sysenter_cs));
    vmcs12.set(F::GUEST_SYSENTER_ESP, l2.msrs.sysenter_esp);
    vmcs12.set(F::GUEST_SYSENTER_EIP, l2.msrs.sysenter_eip);
    if exit_ctl.contains(ExitControls::SAVE_PAT) {
        vmcs12.set(F::GUEST_IA32_PAT, l2.msrs.pat);
    }
    if exit_ctl.contains(ExitControls::SAVE_EFER) {
        vmcs12.set(F::GUEST_IA32_EFER, l2.msrs.efer);
    }
    for reg in Seg::ALL {
        write_segment(vmcs12, reg, segment_of(l2, reg));
    }
    vmcs12.set(F::GUEST_GDTR_BASE, l2.gdtr.base);
    vmcs12.set(F::GUEST_GDTR_LIMIT, u64::from(l2.gdtr.limit));
    vmcs12.set(F::GUEST_IDTR_BASE, l2.idtr.base);
    vmcs12.set(F::GUEST_IDTR_LIMIT, u64::from(l2.idtr.limit));
    vmcs12.set(F::GUEST_RIP, l2.rip);
    vmcs12.set(F::GUEST_RSP, l2.gprs.regs[Gprs::RSP]);
    vmcs12.set(F::GUEST_RFLAGS, l2.rflags);
    vmcs12.set(F::GUEST_ACTIVITY_STATE, u64::from(l2.activity));
    vmcs12.set(
        F::GUEST_INTERRUPTIBILITY_INFO,
        u64::from(l2.interruptibility),
    );
    vmcs12.set(F::GUEST_PENDING_DBG_EXCEPTIONS, l2.pending_dbg_exceptions);
    // SDM 28.3.4: with "enable EPT" and PAE paging in use, the PDPTEs the
    // CPU holds are saved; otherwise the fields are left alone.
    if ept_enabled(vmcs12) && uses_pae_paging(l2.cr0, l2.cr4, l2.msrs.efer) {
        for (field, value) in GUEST_PDPTES.into_iter().zip(l2.msrs.pdptes) {
            vmcs12.set(field, value);
        }
    }
    if exit_ctl.contains(ExitControls::SAVE_PREEMPTION_TIMER) {
        vmcs12.set(
            F::VMX_PREEMPTION_TIMER_VALUE,
            u64::from(preemption_timer_remaining),
        );
    }
    // SDM 28.2: "IA-32e mode guest" takes the value of EFER.LMA on exit.
    let mut entry = EntryControls::from_bits_retain(vmcs12.get32(F::VM_ENTRY_CONTROLS));
    entry.set(
        EntryControls::IA32E_MODE_GUEST,
        l2.msrs.efer & VcpuState::EFER_LMA != 0,
    );
    vmcs12.set(F::VM_ENTRY_CONTROLS, u64::from(entry.bits()));
}

// ---------------------------------------------------------------------------
// load_vmcs12_host_state (SDM 28.5-28.6)
// ---------------------------------------------------------------------------

/// Host CS access rights: type 11 (execute/read, accessed), S, P, G, with L
/// (64-bit host) or D/B (32-bit host) (SDM 28.5.2).
pub const HOST_CS_AR_64: u32 = 0xa09b;
/// Host CS access rights for a 32-bit host.
pub const HOST_CS_AR_32: u32 = 0xc09b;
/// Host SS/DS/ES/FS/GS access rights when usable: type 3 (read/write,
/// accessed), S, P, D/B, G.
pub const HOST_DATA_AR: u32 = 0xc093;
/// Host TR access rights: type 11 (busy TSS), P.
pub const HOST_TR_AR: u32 = 0x8b;
/// Host TR limit.
pub const HOST_TR_LIMIT: u32 = 0x67;

/// Loads the vmcs12 host-state area into the L1 vCPU, then processes the
/// VM-exit MSR-load area (SDM 28.5, 28.6).
///
/// CR0 keeps ET, CD, NW and its reserved bits; CR4 has VMXE set, gets PAE
/// with a 64-bit host and loses PCIDE without. EFER is loaded from the field
/// with "load IA32_EFER", else only LMA/LME change (to "host address-space
/// size"). PAT and PERF_GLOBAL_CTRL are loaded when their controls ask;
/// BNDCFGS is cleared with "clear IA32_BNDCFGS". DR7 = 0x400, DEBUGCTL = 0,
/// RFLAGS = 0x2, interruptibility, activity and pending debug exceptions are
/// cleared and any pending event is dropped. GPRs other than RSP, CR2, CR8,
/// DR0-DR3 and DR6 are left as they are.
///
/// The MSR-load entries are returned in order; those [`VcpuState`] models
/// are applied to `l1` too, the caller applies the rest with
/// `l1_msrs`-compatible semantics. A PAE host with bad PDPTEs, a bad MSR
/// entry or an IA-32e L2 returning to a 32-bit host is a [`VmxAbort`].
pub fn load_vmcs12_host_state(
    vmcs12: &Vmcs12,
    l1: &mut VcpuState,
    mem: &dyn GuestPhysMemory,
    l1_msrs: &dyn MsrAccess,
    caps: &VmxCapabilities,
) -> Result<Vec<MsrEntry>, VmxAbort> {
    let exit_ctl = ExitControls::from_bits_retain(vmcs12.get32(F::VM_EXIT_CONTROLS));
    let entry_ctl = EntryControls::from_bits_retain(vmcs12.get32(F::VM_ENTRY_CONTROLS));
    let host64 = exit_ctl.contains(ExitControls::HOST_ADDR_SPACE_SIZE);
    // SDM 28.5: leaving IA-32e mode through a VM exit is a VMX abort. The
    // entry control mirrors L2's EFER.LMA after prepare_vmcs12.
    if entry_ctl.contains(EntryControls::IA32E_MODE_GUEST) && !host64 {
        return Err(VmxAbort::HostAddressSpaceSize);
    }

    // SDM 28.5.1: control registers, debug registers, MSRs.
    let keep0 = CR0_ET | CR0_CD | CR0_NW | CR0_RESERVED;
    l1.cr0 = (vmcs12.get(F::HOST_CR0) & !keep0) | (l1.cr0 & keep0);
    l1.cr3 = vmcs12.get(F::HOST_CR3);
    // CR4.VMXE is fixed to 1 in VMX operation (SDM 24.8), so it is 1 after
    // every VM exit whatever the field says. KVM cannot hold it (the guest
    // gets #GP): l0-vmm keeps it virtual when it applies this state.
    let mut cr4 = vmcs12.get(F::HOST_CR4) | CR4_VMXE;
    if host64 {
        cr4 |= CR4_PAE;
    } else {
        cr4 &= !CR4_PCIDE;
    }
    l1.cr4 = cr4;
    l1.dr7 = DR7_RESET;
    l1.msrs.debugctl = 0;
    l1.msrs.sysenter_cs = vmcs12.get32(F::HOST_IA32_SYSENTER_CS);
    l1.msrs.sysenter_esp = vmcs12.get(F::HOST_IA32_SYSENTER_ESP);
    l1.msrs.sysenter_eip = vmcs12.get(F::HOST_IA32_SYSENTER_EIP);
    let lm = VcpuState::EFER_LMA | VcpuState::EFER_LME;
    if exit_ctl.contains(ExitControls::LOAD_EFER) {
        l1.msrs.efer = vmcs12.get(F::HOST_IA32_EFER);
    } else if host64 {
        l1.msrs.efer |= lm;
    } else {
        l1.msrs.efer &= !lm;
    }
    if exit_ctl.contains(ExitControls::LOAD_PAT) {
        l1.msrs.pat = vmcs12.get(F::HOST_IA32_PAT);
    }
    if exit_ctl.contains(ExitControls::LOAD_PERF_GLOBAL_CTRL) {
        l1.msrs.perf_global_ctrl = vmcs12.get(F::HOST_IA32_PERF_GLOBAL_CTRL);
    }
    if exit_ctl.contains(ExitControls::CLEAR_BNDCFGS) {
        l1.msrs.bndcfgs = 0;
    }

    // SDM 28.5.2: segment and descriptor-table registers.
    l1.cs = Segment {
        selector: vmcs12.get(F::HOST_CS_SELECTOR) as u16,
        base: 0,
        limit: 0xffff_ffff,
        ar: if host64 { HOST_CS_AR_64 } else { HOST_CS_AR_32 },
    };
    let data = |selector: F, base: u64| {
        let selector = vmcs12.get(selector) as u16;
        if selector == 0 {
            // Unusable; the rest is undefined and made 0 (SS.DPL is 0).
            Segment {
                selector,
                base,
                limit: 0,
                ar: Segment::AR_UNUSABLE,
            }
        } else {
            Segment {
                selector,
                base,
                limit: 0xffff_ffff,
                ar: HOST_DATA_AR,
            }
        }
    };
    l1.ss = data(F::HOST_SS_SELECTOR, 0);
    l1.ds = data(F::HOST_DS_SELECTOR, 0);
    l1.es = data(F::HOST_ES_SELECTOR, 0);
    l1.fs = data(F::HOST_FS_SELECTOR, vmcs12.get(F::HOST_FS_BASE));
    l1.gs = data(F::HOST_GS_SELECTOR, vmcs12.get(F::HOST_GS_BASE));
    l1.tr = Segment {
        selector: vmcs12.get(F::HOST_TR_SELECTOR) as u16,
        base: vmcs12.get(F::HOST_TR_BASE),
        limit: HOST_TR_LIMIT,
        ar: HOST_TR_AR,
    };
    l1.ldtr = Segment {
        selector: 0,
        base: 0,
        limit: 0,
        ar: Segment::AR_UNUSABLE,
    };
    l1.gdtr = DescriptorTable {
        base: vmcs12.get(F::HOST_GDTR_BASE),
        limit: 0xffff,
    };
    l1.idtr = DescriptorTable {
        base: vmcs12.get(F::HOST_IDTR_BASE),
        limit: 0xffff,
    };

    // SDM 28.5.3 and 28.5.5: RIP, RSP, RFLAGS and non-register state.
    l1.rip = vmcs12.get(F::HOST_RIP);
    l1.gprs.regs[Gprs::RSP] = vmcs12.get(F::HOST_RSP);
    l1.rflags = RFLAGS_RESERVED_1;
    l1.interruptibility = if host_nmi_blocked(vmcs12, l1.interruptibility) {
        INTERRUPTIBILITY_NMI
    } else {
        0
    };
    l1.activity = 0;
    l1.pending_dbg_exceptions = 0;
    l1.pending_event = None;

    // SDM 28.5.4: a PAE host gets its PDPTEs loaded from CR3 and checked.
    if !host64 && uses_pae_paging(l1.cr0, l1.cr4, l1.msrs.efer) {
        l1.msrs.pdptes =
            load_pdptes(mem, l1.cr3, caps.phys_addr_width).ok_or(VmxAbort::HostPdpte)?;
    }

    // SDM 28.6: the VM-exit MSR-load area, after all of the above.
    let base = vmcs12.get(F::VM_EXIT_MSR_LOAD_ADDR);
    let count = vmcs12.get32(F::VM_EXIT_MSR_LOAD_COUNT);
    let loads = load_msr_area(mem, base, count, l1_msrs)
        .map_err(|entry| VmxAbort::LoadHostMsr { entry })?;
    for e in &loads {
        l1.set_msr(e.index, e.value);
    }
    Ok(loads)
}

/// Interruptibility state bit 3: blocking by NMI (SDM 24.4.2).
const INTERRUPTIBILITY_NMI: u32 = 1 << 3;

/// Blocking by NMI after the VM exit vmcs12 describes (SDM 28.5.5
/// "Updating Non-Register State"): there is no STI or MOV-SS blocking after
/// a VM exit; an exit caused directly by an NMI blocks NMIs; any other exit
/// leaves NMI blocking as it was. With "virtual NMIs" = 0 the blocking L2
/// had is the CPU's (the saved interruptibility bit 3); with it = 1 that bit
/// is virtual-NMI blocking and NMIs themselves were not blocked in L2 (they
/// exit). A VM-entry failure loaded no guest state, so L1 keeps the blocking
/// it had at VMLAUNCH/VMRESUME (`l1_interruptibility`).
fn host_nmi_blocked(vmcs12: &Vmcs12, l1_interruptibility: u32) -> bool {
    let reason = vmcs12.get32(F::VM_EXIT_REASON);
    if reason & ExitInfo::REASON_ENTRY_FAILURE != 0 {
        return l1_interruptibility & INTERRUPTIBILITY_NMI != 0;
    }
    let info = vmcs12.get32(F::VM_EXIT_INTR_INFO);
    let nmi_exit = reason & 0xffff == u32::from(reason::EXCEPTION_NMI)
        && info & intr_info::VALID != 0
        && intr_type(info) == intr_info::TYPE_NMI;
    let pin = PinBased::from_bits_retain(vmcs12.get32(F::PIN_BASED_VM_EXEC_CONTROL));
    let l2_blocked = vmcs12.get32(F::GUEST_INTERRUPTIBILITY_INFO) & INTERRUPTIBILITY_NMI != 0;
    nmi_exit || (!pin.contains(PinBased::VIRTUAL_NMIS) && l2_blocked)
}

// ---------------------------------------------------------------------------
// prepare_vmcs02 (SDM 27.3-27.6)
// ---------------------------------------------------------------------------

/// Builds the L2 vCPU for VMLAUNCH/VMRESUME from the vmcs12 guest-state
/// area and the VM-entry controls (SDM 27.3.2, 27.4, 27.6). Run the
/// VM-entry checks first: this function assumes they passed.
///
/// State VM entry does not load comes from `l1` (GPRs other than RSP, CR2,
/// CR8, DR0-DR3, DR6, and the MSRs whose load control is 0: DEBUGCTL and DR7
/// without "load debug controls", PAT, PERF_GLOBAL_CTRL, BNDCFGS, and EFER
/// apart from LMA/LME, which follow "IA-32e mode guest" without "load
/// IA32_EFER"). Segments are normalized as [`normalize_segment`] describes.
/// A valid VM_ENTRY_INTR_INFO_FIELD becomes `pending_event` (instruction
/// length for software events only) and wakes a HLT activity state. The
/// VM-entry MSR-load area is processed last; `l2_msrs` says which writes
/// would #GP.
pub fn prepare_vmcs02(
    vmcs12: &Vmcs12,
    l1: &VcpuState,
    mem: &dyn GuestPhysMemory,
    l2_msrs: &dyn MsrAccess,
    caps: &VmxCapabilities,
) -> Result<Vmcs02, EntryFailure> {
    let entry_ctl = EntryControls::from_bits_retain(vmcs12.get32(F::VM_ENTRY_CONTROLS));
    let primary = PrimaryProcBased::from_bits_retain(vmcs12.get32(F::CPU_BASED_VM_EXEC_CONTROL));

    let mut l2 = VcpuState {
        pending_event: None,
        ..*l1
    };
    // SDM 27.3.2.1: control registers, debug registers, MSRs.
    l2.cr0 = vmcs12.get(F::GUEST_CR0);
    l2.cr3 = vmcs12.get(F::GUEST_CR3);
    l2.cr4 = vmcs12.get(F::GUEST_CR4);
    if entry_ctl.contains(EntryControls::LOAD_DEBUG_CONTROLS) {
        l2.dr7 = vmcs12.get(F::GUEST_DR7);
        l2.msrs.debugctl = vmcs12.get(F::GUEST_IA32_DEBUGCTL);
    }
    l2.msrs.sysenter_cs = vmcs12.get32(F::GUEST_SYSENTER_CS);
    l2.msrs.sysenter_esp = vmcs12.get(F::GUEST_SYSENTER_ESP);
    l2.msrs.sysenter_eip = vmcs12.get(F::GUEST_SYSENTER_EIP);
    let lm = VcpuState::EFER_LMA | VcpuState::EFER_LME;
    if entry_ctl.contains(EntryControls::LOAD_EFER) {
        l2.msrs.efer = vmcs12.get(F::GUEST_IA32_EFER);
    } else if entry_ctl.contains(EntryControls::IA32E_MODE_GUEST) {
        l2.msrs.efer |= lm;
    } else {
        l2.msrs.efer &= !lm;
    }
    if entry_ctl.contains(EntryControls::LOAD_PAT) {
        l2.msrs.pat = vmcs12.get(F::GUEST_IA32_PAT);
    }
    if entry_ctl.contains(EntryControls::LOAD_PERF_GLOBAL_CTRL) {
        l2.msrs.perf_global_ctrl = vmcs12.get(F::GUEST_IA32_PERF_GLOBAL_CTRL);
    }
    if entry_ctl.contains(EntryControls::LOAD_BNDCFGS) {
        l2.msrs.bndcfgs = vmcs12.get(F::GUEST_IA32_BNDCFGS);
    }

    // SDM 27.3.2.2: segment and descriptor-table registers.
    for reg in Seg::ALL {
        *segment_slot(&mut l2, reg) = read_segment(vmcs12, reg);
    }
    l2.gdtr = DescriptorTable {
        base: vmcs12.get(F::GUEST_GDTR_BASE),
        limit: vmcs12.get(F::GUEST_GDTR_LIMIT) as u16,
    };
    l2.idtr = DescriptorTable {
        base: vmcs12.get(F::GUEST_IDTR_BASE),
        limit: vmcs12.get(F::GUEST_IDTR_LIMIT) as u16,
    };

    // SDM 27.3.2.3-27.3.2.5: RIP, RSP, RFLAGS, PDPTEs, non-register state.
    l2.rip = vmcs12.get(F::GUEST_RIP);
    l2.gprs.regs[Gprs::RSP] = vmcs12.get(F::GUEST_RSP);
    l2.rflags = vmcs12.get(F::GUEST_RFLAGS);
    l2.activity = vmcs12.get32(F::GUEST_ACTIVITY_STATE);
    l2.interruptibility = vmcs12.get32(F::GUEST_INTERRUPTIBILITY_INFO);
    l2.pending_dbg_exceptions = vmcs12.get(F::GUEST_PENDING_DBG_EXCEPTIONS);

    let pdptes = if uses_pae_paging(l2.cr0, l2.cr4, l2.msrs.efer) {
        let p = if ept_enabled(vmcs12) {
            let p = GUEST_PDPTES.map(|f| vmcs12.get(f));
            let ok = !p.iter().any(|&e| pdpte_reserved(e, caps.phys_addr_width));
            ok.then_some(p)
        } else {
            load_pdptes(mem, l2.cr3, caps.phys_addr_width)
        };
        Some(p.ok_or(EntryFailure::PdpteLoad)?)
    } else {
        None
    };
    if let Some(p) = pdptes {
        // The PDPTE registers L2 runs with (SDM 27.3.2.4).
        l2.msrs.pdptes = p;
    }

    // SDM 27.6: event injection.
    let info = vmcs12.get32(F::VM_ENTRY_INTR_INFO_FIELD);
    if info & intr_info::VALID != 0 {
        let error_code = if info & intr_info::DELIVER_ERROR_CODE != 0 {
            vmcs12.get32(F::VM_ENTRY_EXCEPTION_ERROR_CODE)
        } else {
            0
        };
        let instruction_len = if is_software_event(info) {
            vmcs12.get32(F::VM_ENTRY_INSTRUCTION_LEN)
        } else {
            0
        };
        l2.pending_event = Some(PendingEvent {
            info,
            error_code,
            instruction_len,
        });
        // Delivering the event takes the CPU out of HLT.
        if l2.activity == ACTIVITY_HLT {
            l2.activity = 0;
        }
    }

    // SDM 27.4: the VM-entry MSR-load area, after the guest state.
    let base = vmcs12.get(F::VM_ENTRY_MSR_LOAD_ADDR);
    let count = vmcs12.get32(F::VM_ENTRY_MSR_LOAD_COUNT);
    let msr_loads = load_msr_area(mem, base, count, l2_msrs)
        .map_err(|entry| EntryFailure::MsrLoad { entry })?;
    for e in &msr_loads {
        l2.set_msr(e.index, e.value);
    }

    let tsc_offset = if primary.contains(PrimaryProcBased::USE_TSC_OFFSETTING) {
        vmcs12.get(F::TSC_OFFSET)
    } else {
        0
    };
    Ok(Vmcs02 {
        l2,
        cr0_guest_host_mask: vmcs12.get(F::CR0_GUEST_HOST_MASK),
        cr0_read_shadow: vmcs12.get(F::CR0_READ_SHADOW),
        cr4_guest_host_mask: vmcs12.get(F::CR4_GUEST_HOST_MASK),
        cr4_read_shadow: vmcs12.get(F::CR4_READ_SHADOW),
        tsc_offset,
        pdptes,
        msr_loads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vmcs12::FlatMemory;

    const MEM_SIZE: usize = 0x10000;

    fn mem() -> FlatMemory {
        FlatMemory::new(MEM_SIZE)
    }

    fn caps() -> VmxCapabilities {
        VmxCapabilities::default()
    }

    fn seg(selector: u16, base: u64, limit: u32, ar: u32) -> Segment {
        Segment {
            selector,
            base,
            limit,
            ar,
        }
    }

    fn unusable() -> Segment {
        seg(0, 0, 0, Segment::AR_UNUSABLE)
    }

    /// A 64-bit L1 host, in exactly the shape a VM exit leaves it.
    fn l1_64() -> VcpuState {
        let mut gprs = Gprs::default();
        for (i, r) in gprs.regs.iter_mut().enumerate() {
            *r = 0x1000 + i as u64;
        }
        gprs.regs[Gprs::RSP] = 0xffff_8000_0000_7000;
        VcpuState {
            gprs,
            rip: 0xffff_8000_0010_0000,
            rflags: 0x2,
            cr0: 0x8005_0033,
            cr2: 0x5555,
            cr3: 0x3000,
            cr4: 0x20a0,
            cr8: 0,
            dr0_3: [1, 2, 3, 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            es: unusable(),
            cs: seg(0x08, 0, 0xffff_ffff, HOST_CS_AR_64),
            ss: seg(0x10, 0, 0xffff_ffff, HOST_DATA_AR),
            ds: unusable(),
            fs: seg(0, 0x7f00_1234_5000, 0, Segment::AR_UNUSABLE),
            gs: seg(0x18, 0xffff_8880_0000_0000, 0xffff_ffff, HOST_DATA_AR),
            ldtr: unusable(),
            tr: seg(0x28, 0xffff_8000_0002_0000, HOST_TR_LIMIT, HOST_TR_AR),
            gdtr: DescriptorTable {
                base: 0xffff_8000_0003_0000,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0xffff_8000_0004_0000,
                limit: 0xffff,
            },
            msrs: crate::VmxMsrs {
                efer: 0x501,
                pat: 0x0007_0406_0007_0406,
                debugctl: 0,
                sysenter_cs: 0x8,
                sysenter_esp: 0xffff_8000_0000_8000,
                sysenter_eip: 0xffff_8000_0000_9000,
                perf_global_ctrl: 0x3,
                bndcfgs: 0x11,
                kernel_gs_base: 0xabc,
                pdptes: [0; 4],
            },
            interruptibility: 0,
            activity: 0,
            pending_dbg_exceptions: 0,
            pending_event: None,
        }
    }

    /// A 64-bit L2 at CPL 3 with STI blocking.
    fn l2_64() -> VcpuState {
        let mut gprs = Gprs::default();
        for (i, r) in gprs.regs.iter_mut().enumerate() {
            *r = 0x2000 + i as u64;
        }
        VcpuState {
            gprs,
            rip: 0x40_1000,
            rflags: 0x202,
            cr0: 0x8005_0033,
            cr2: 0x6666,
            cr3: 0x5000,
            cr4: 0x6a0,
            cr8: 2,
            dr0_3: [5, 6, 7, 8],
            dr6: 0xffff_4ff0,
            dr7: 0x401,
            es: unusable(),
            cs: seg(0x33, 0, 0xffff_ffff, 0xa0fb),
            ss: seg(0x2b, 0, 0xffff_ffff, 0xc0f3),
            ds: unusable(),
            fs: seg(0, 0x7000_0000, 0, Segment::AR_UNUSABLE),
            gs: seg(0x2b, 0x7100_0000, 0xffff_ffff, 0xc0f3),
            ldtr: unusable(),
            tr: seg(0x40, 0x9000, 0x67, 0x8b),
            gdtr: DescriptorTable {
                base: 0xa000,
                limit: 0x7f,
            },
            idtr: DescriptorTable {
                base: 0xb000,
                limit: 0xfff,
            },
            msrs: crate::VmxMsrs {
                efer: 0xd01,
                pat: 0x0006_0606_0006_0606,
                debugctl: 0x1,
                sysenter_cs: 0x23,
                sysenter_esp: 0x7fff_0000,
                sysenter_eip: 0x7ffe_0000,
                perf_global_ctrl: 0x7,
                bndcfgs: 0x21,
                kernel_gs_base: 0xdef,
                pdptes: [0; 4],
            },
            interruptibility: 1,
            activity: 0,
            pending_dbg_exceptions: 0x4000,
            pending_event: None,
        }
    }

    /// A real-mode L2 (unrestricted guest) halted at the reset vector.
    fn l2_real() -> VcpuState {
        let data = seg(0, 0, 0xffff, 0x93);
        VcpuState {
            rip: 0xfff0,
            rflags: 0x2,
            cr0: 0x6000_0010,
            cs: seg(0xf000, 0xffff_0000, 0xffff, 0x9b),
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ldtr: seg(0, 0, 0xffff, 0x82),
            tr: seg(0, 0, 0xffff, 0x8b),
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0x3ff,
            },
            activity: ACTIVITY_HLT,
            ..VcpuState::default()
        }
    }

    fn cpuid_exit() -> ExitInfo {
        ExitInfo {
            reason: 10,
            instruction_len: 2,
            ..ExitInfo::default()
        }
    }

    const ALL_SAVE: ExitControls = ExitControls::SAVE_DEBUG_CONTROLS
        .union(ExitControls::SAVE_PAT)
        .union(ExitControls::SAVE_EFER);
    const ALL_LOAD: EntryControls = EntryControls::LOAD_DEBUG_CONTROLS
        .union(EntryControls::LOAD_PAT)
        .union(EntryControls::LOAD_EFER);

    fn set_host_fields(v: &mut Vmcs12, h: &VcpuState) {
        v.set(F::HOST_CR0, h.cr0);
        v.set(F::HOST_CR3, h.cr3);
        v.set(F::HOST_CR4, h.cr4);
        v.set(F::HOST_RIP, h.rip);
        v.set(F::HOST_RSP, h.gprs.regs[Gprs::RSP]);
        v.set(F::HOST_CS_SELECTOR, h.cs.selector.into());
        v.set(F::HOST_SS_SELECTOR, h.ss.selector.into());
        v.set(F::HOST_DS_SELECTOR, h.ds.selector.into());
        v.set(F::HOST_ES_SELECTOR, h.es.selector.into());
        v.set(F::HOST_FS_SELECTOR, h.fs.selector.into());
        v.set(F::HOST_GS_SELECTOR, h.gs.selector.into());
        v.set(F::HOST_TR_SELECTOR, h.tr.selector.into());
        v.set(F::HOST_FS_BASE, h.fs.base);
        v.set(F::HOST_GS_BASE, h.gs.base);
        v.set(F::HOST_TR_BASE, h.tr.base);
        v.set(F::HOST_GDTR_BASE, h.gdtr.base);
        v.set(F::HOST_IDTR_BASE, h.idtr.base);
        v.set(F::HOST_IA32_SYSENTER_CS, h.msrs.sysenter_cs.into());
        v.set(F::HOST_IA32_SYSENTER_ESP, h.msrs.sysenter_esp);
        v.set(F::HOST_IA32_SYSENTER_EIP, h.msrs.sysenter_eip);
        v.set(F::HOST_IA32_EFER, h.msrs.efer);
        v.set(F::HOST_IA32_PAT, h.msrs.pat);
        v.set(F::HOST_IA32_PERF_GLOBAL_CTRL, h.msrs.perf_global_ctrl);
    }

    fn set_exit_ctl(v: &mut Vmcs12, c: ExitControls) {
        v.set(F::VM_EXIT_CONTROLS, c.bits().into());
    }

    fn set_entry_ctl(v: &mut Vmcs12, c: EntryControls) {
        v.set(F::VM_ENTRY_CONTROLS, c.bits().into());
    }

    /// Lets every MSR be read (as 0x42) and written.
    struct AllowAll;
    impl MsrAccess for AllowAll {
        fn read_msr(&self, _index: u32) -> Option<u64> {
            Some(0x42)
        }
        fn can_write_msr(&self, _index: u32, _value: u64) -> bool {
            true
        }
    }

    /// An MSR-area entry as stored: (index, reserved bits 63:32, data).
    type RawEntry = (u32, u32, u64);

    fn write_area(m: &mut FlatMemory, base: u64, entries: &[RawEntry]) {
        for (i, &(index, reserved, value)) in entries.iter().enumerate() {
            let a = base + 16 * i as u64;
            m.write_u32(a, index).unwrap();
            m.write_u32(a + 4, reserved).unwrap();
            m.write_u64(a + 8, value).unwrap();
        }
    }

    // ----- merge_cr -------------------------------------------------------

    fn merge_reference(hw: u64, mask: u64, shadow: u64) -> u64 {
        (0..64).fold(0, |acc, bit| {
            let from = if mask >> bit & 1 == 1 { shadow } else { hw };
            acc | (from & (1 << bit))
        })
    }

    proptest! {
        #[test]
        fn test_merge_cr_matches_bitwise_reference(hw: u64, mask: u64, shadow: u64) {
            prop_assert_eq!(merge_cr(hw, mask, shadow), merge_reference(hw, mask, shadow));
        }

        #[test]
        fn test_unmerge_cr_is_inverse_of_merge(hw: u64, mask: u64, shadow: u64, written: u64) {
            let new_hw = unmerge_cr(written, mask, hw);
            // The guest reads back what it wrote in the bits it owns ...
            prop_assert_eq!(merge_cr(new_hw, mask, shadow) & !mask, written & !mask);
            // ... and the shadow in the bits the host owns, which keep their value.
            prop_assert_eq!(new_hw & mask, hw & mask);
            prop_assert_eq!(merge_cr(new_hw, mask, shadow) & mask, shadow & mask);
        }

        #[test]
        fn test_cr_write_exit_matches_reference(mask: u64, shadow: u64, written: u64) {
            let reference = (0..64).any(|b| mask >> b & 1 == 1 && (shadow >> b & 1) != (written >> b & 1));
            prop_assert_eq!(cr_write_causes_exit(mask, shadow, written), reference);
        }
    }

    #[test]
    fn test_cr_write_exit_only_on_host_owned_change() {
        // CR0.TS (bit 3) owned by the host, shadow has it clear.
        assert!(cr_write_causes_exit(0x8, 0x11, 0x19));
        assert!(!cr_write_causes_exit(0x8, 0x11, 0x13));
    }

    #[test]
    fn test_vmcs02_reports_shadowed_cr_reads() {
        let mut v = Vmcs12::new();
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        set_entry_ctl(&mut v, EntryControls::IA32E_MODE_GUEST);
        v.set(F::CR0_GUEST_HOST_MASK, 0x8);
        v.set(F::CR0_READ_SHADOW, 0x8);
        v.set(F::CR4_GUEST_HOST_MASK, 0x2000);
        v.set(F::CR4_READ_SHADOW, 0);
        v.set(F::GUEST_CR4, l2.cr4 | 0x2000);
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(v02.l2.cr0, l2.cr0);
        assert_eq!(v02.l2_cr0_read(), l2.cr0 | 0x8);
        assert_eq!(v02.l2.cr4 & 0x2000, 0x2000);
        assert_eq!(v02.l2_cr4_read(), l2.cr4);
    }

    // ----- round trips ----------------------------------------------------

    fn expected_l2_after_entry(l2: &VcpuState, l1: &VcpuState) -> VcpuState {
        let mut gprs = l1.gprs;
        gprs.regs[Gprs::RSP] = l2.gprs.regs[Gprs::RSP];
        VcpuState {
            gprs,
            cr2: l1.cr2,
            cr8: l1.cr8,
            dr0_3: l1.dr0_3,
            dr6: l1.dr6,
            msrs: crate::VmxMsrs {
                perf_global_ctrl: l1.msrs.perf_global_ctrl,
                bndcfgs: l1.msrs.bndcfgs,
                kernel_gs_base: l1.msrs.kernel_gs_base,
                ..l2.msrs
            },
            ..*l2
        }
    }

    fn check_guest_round_trip(l2: VcpuState) {
        let l1 = l1_64();
        let mut m = mem();
        let mut v = Vmcs12::new();
        set_exit_ctl(&mut v, ALL_SAVE | ExitControls::HOST_ADDR_SPACE_SIZE);
        set_entry_ctl(&mut v, ALL_LOAD);
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
        let v02 = prepare_vmcs02(&v, &l1, &m, &AllowAll, &caps()).unwrap();
        assert_eq!(v02.l2, expected_l2_after_entry(&l2, &l1));
        assert_eq!(v02.pdptes, None);
        // Saving the entered state again reproduces vmcs12 exactly.
        let mut again = v.clone();
        prepare_vmcs12(&mut again, &v02.l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
        assert_eq!(
            again.diff(&v).count(),
            0,
            "{:?}",
            again.diff(&v).collect::<Vec<_>>()
        );
    }

    #[test]
    fn test_64bit_l2_round_trips_through_vmcs12() {
        check_guest_round_trip(l2_64());
    }

    #[test]
    fn test_real_mode_l2_round_trips_through_vmcs12() {
        check_guest_round_trip(l2_real());
    }

    #[test]
    fn test_host_state_round_trips_onto_l1() {
        for l2 in [l2_64(), l2_real()] {
            let l1 = l1_64();
            let mut v = Vmcs12::new();
            set_host_fields(&mut v, &l1);
            set_exit_ctl(
                &mut v,
                ALL_SAVE
                    | ExitControls::HOST_ADDR_SPACE_SIZE
                    | ExitControls::LOAD_EFER
                    | ExitControls::LOAD_PAT
                    | ExitControls::LOAD_PERF_GLOBAL_CTRL,
            );
            let mut m = mem();
            prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
            // The vCPU holds L2 state, except what VM exit leaves alone.
            let mut vcpu = VcpuState {
                gprs: Gprs {
                    regs: {
                        let mut r = l1.gprs.regs;
                        r[Gprs::RSP] = 0xdead;
                        r
                    },
                },
                cr2: l1.cr2,
                cr8: l1.cr8,
                dr0_3: l1.dr0_3,
                dr6: l1.dr6,
                cr0: l1.cr0,
                msrs: crate::VmxMsrs {
                    kernel_gs_base: l1.msrs.kernel_gs_base,
                    bndcfgs: l1.msrs.bndcfgs,
                    ..l2.msrs
                },
                pending_event: Some(PendingEvent::default()),
                ..l2
            };
            let loads = load_vmcs12_host_state(&v, &mut vcpu, &m, &l1, &caps()).unwrap();
            assert!(loads.is_empty());
            assert_eq!(vcpu, l1);
        }
    }

    #[test]
    fn test_host_cr0_keeps_et_cd_nw_and_reserved_bits() {
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        v.set(F::HOST_CR0, 0x8000_0021);
        let mut vcpu = l2_real(); // CR0 has CD, NW, ET set
        vcpu.cr0 |= 1 << 40;
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cr0, 0x8000_0021 | 0x6000_0010 | 1 << 40);
        // A host CR0 with CD set does not set it either.
        let mut vcpu = l1_64();
        v.set(F::HOST_CR0, 0xc000_0021);
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cr0 & CR0_CD, 0);
    }

    #[test]
    fn test_host_cr4_pae_pcide_and_vmxe() {
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        v.set(F::HOST_CR4, CR4_PCIDE);
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        let mut vcpu = l1_64();
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cr4, CR4_PCIDE | CR4_PAE | CR4_VMXE);
        set_exit_ctl(&mut v, ExitControls::empty());
        let mut vcpu = l1_64();
        vcpu.msrs.efer = 0;
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cr4, CR4_VMXE);
        assert_eq!(
            vcpu.msrs.efer & (VcpuState::EFER_LMA | VcpuState::EFER_LME),
            0
        );
    }

    // ----- host segments --------------------------------------------------

    #[test]
    fn test_host_segments_get_fixed_attributes() {
        let mut v = Vmcs12::new();
        let mut h = l1_64();
        h.ds.selector = 0x10;
        h.ss.selector = 0;
        set_host_fields(&mut v, &h);
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        let mut vcpu = l2_64();
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cs, seg(0x08, 0, 0xffff_ffff, 0xa09b));
        assert_eq!(vcpu.ds, seg(0x10, 0, 0xffff_ffff, 0xc093));
        // Null selectors: unusable, SS included (its DPL is 0).
        assert_eq!(vcpu.ss, seg(0, 0, 0, Segment::AR_UNUSABLE));
        assert_eq!(vcpu.es, seg(0, 0, 0, Segment::AR_UNUSABLE));
        assert_eq!(vcpu.fs.base, h.fs.base);
        assert!(vcpu.fs.unusable());
        assert_eq!(vcpu.gs, seg(0x18, h.gs.base, 0xffff_ffff, 0xc093));
        assert_eq!(vcpu.tr, seg(0x28, h.tr.base, 0x67, 0x8b));
        assert_eq!(vcpu.ldtr, unusable());
        assert_eq!(vcpu.gdtr.limit, 0xffff);
        assert_eq!(vcpu.idtr.limit, 0xffff);
        assert_eq!((vcpu.rflags, vcpu.dr7, vcpu.msrs.debugctl), (0x2, 0x400, 0));
        assert_eq!((vcpu.interruptibility, vcpu.activity), (0, 0));
        assert_eq!(vcpu.cpl(), 0);
        assert!(vcpu.in_64bit_mode());
    }

    #[test]
    fn test_host_cs_for_32bit_host_has_db_not_l() {
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        v.set(F::HOST_CR4, CR4_VMXE);
        let mut vcpu = l1_64();
        load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(vcpu.cs.ar, 0xc09b);
        assert!(!vcpu.in_64bit_mode());
    }

    #[test]
    fn test_abort_6_when_ia32e_l2_returns_to_32bit_host() {
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        let mut vcpu = l1_64();
        let err = load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps());
        assert_eq!(err, Err(VmxAbort::HostAddressSpaceSize));
        assert_eq!(VmxAbort::HostAddressSpaceSize.indicator(), 6);
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        assert!(load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).is_ok());
    }

    #[test]
    fn test_pae_host_pdptes_checked() {
        let mut m = mem();
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        v.set(F::HOST_CR0, 0x8000_0031);
        v.set(F::HOST_CR4, CR4_PAE | CR4_VMXE);
        v.set(F::HOST_CR3, 0x4000);
        m.write_u64(0x4000, 0x5001).unwrap();
        let mut vcpu = l1_64();
        vcpu.msrs.efer = 0;
        assert!(load_vmcs12_host_state(&v, &mut vcpu, &m, &AllowAll, &caps()).is_ok());
        m.write_u64(0x4008, 0x6001 | 0x6).unwrap(); // reserved bits 2:1
        let err = load_vmcs12_host_state(&v, &mut vcpu, &m, &AllowAll, &caps()).unwrap_err();
        assert_eq!((err, err.indicator()), (VmxAbort::HostPdpte, 2));
        v.set(F::HOST_CR3, MEM_SIZE as u64);
        let err = load_vmcs12_host_state(&v, &mut vcpu, &m, &AllowAll, &caps());
        assert_eq!(err, Err(VmxAbort::HostPdpte));
    }

    // ----- exit information -----------------------------------------------

    #[test]
    fn test_entry_intr_info_valid_bit_clears_on_exit() {
        let info = intr_info::VALID | intr_info::TYPE_HARD_EXCEPTION | 14;
        let mut v = Vmcs12::new();
        v.set(F::VM_ENTRY_INTR_INFO_FIELD, info.into());
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        assert_eq!(
            v.get32(F::VM_ENTRY_INTR_INFO_FIELD),
            info & !intr_info::VALID
        );
    }

    #[test]
    fn test_entry_failure_saves_only_reason_and_qualification() {
        let info = intr_info::VALID | 32;
        let mut v = Vmcs12::new();
        v.set(F::VM_ENTRY_INTR_INFO_FIELD, info.into());
        v.set(F::VM_EXIT_MSR_STORE_COUNT, 1);
        v.set(F::VM_EXIT_MSR_STORE_ADDR, u64::MAX - 4); // would abort if used
        let before = v.clone();
        let failure = EntryFailure::MsrLoad { entry: 3 };
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &failure.exit_info(), 7, &l2, &mut mem()).unwrap();
        let changed: Vec<_> = before.diff(&v).collect();
        assert_eq!(
            changed,
            vec![
                (F::VM_EXIT_REASON, 0, 34 | 1 << 31),
                (F::EXIT_QUALIFICATION, 0, 3)
            ]
        );
        assert_eq!(v.get32(F::VM_ENTRY_INTR_INFO_FIELD), info);
    }

    #[test]
    fn test_instruction_length_only_where_defined() {
        let l2 = l2_64();
        let mut v = Vmcs12::new();
        let exit = ExitInfo {
            qualification: 0x99,
            instruction_info: 0x1234,
            ..cpuid_exit()
        };
        prepare_vmcs12(&mut v, &l2, &exit, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 2);
        assert_eq!(
            v.get(F::EXIT_QUALIFICATION),
            0,
            "CPUID has no qualification"
        );
        assert_eq!(
            v.get(F::VMX_INSTRUCTION_INFO),
            0,
            "CPUID has no instruction info"
        );
        // An external interrupt defines no length; a stale one is cleared.
        let ext = ExitInfo {
            reason: 1,
            instruction_len: 3,
            intr_info: intr_info::VALID | 0x30,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &ext, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 0);
        assert_eq!(v.get(F::VM_EXIT_INTR_INFO), 0, "no ack-on-exit: not valid");
        set_exit_ctl(&mut v, ExitControls::ACK_INTR_ON_EXIT);
        prepare_vmcs12(&mut v, &l2, &ext, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get32(F::VM_EXIT_INTR_INFO), intr_info::VALID | 0x30);
        // An exit during delivery of INT n defines it.
        let during_int = ExitInfo {
            reason: 48,
            instruction_len: 2,
            idt_vectoring_info: intr_info::VALID | intr_info::TYPE_SOFT_INTR | 0x80,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &during_int, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 2);
    }

    #[test]
    fn test_instruction_info_only_where_defined() {
        let l2 = l2_64();
        let mut v = Vmcs12::new();
        let with = |reason: u32, qualification: u64| ExitInfo {
            reason,
            qualification,
            instruction_info: 0x7c4b_0000,
            instruction_len: 3,
            ..ExitInfo::default()
        };
        // VMREAD (23): info and displacement qualification are defined.
        prepare_vmcs12(&mut v, &l2, &with(23, 0x10), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VMX_INSTRUCTION_INFO), 0x7c4b_0000);
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0x10);
        // VMRESUME (24) defines neither.
        prepare_vmcs12(&mut v, &l2, &with(24, 0x10), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VMX_INSTRUCTION_INFO), 0);
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0);
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 3);
        // OUTS defines it, OUT does not.
        prepare_vmcs12(&mut v, &l2, &with(30, IO_QUAL_STRING), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VMX_INSTRUCTION_INFO), 0x7c4b_0000);
        prepare_vmcs12(&mut v, &l2, &with(30, 0), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VMX_INSTRUCTION_INFO), 0);
    }

    #[test]
    fn test_task_switch_length_only_for_instructions() {
        let l2 = l2_64();
        let mut v = Vmcs12::new();
        let ts = |source: u64, idt: u32| ExitInfo {
            reason: 9,
            qualification: source << 30 | 0x28,
            instruction_len: 5,
            idt_vectoring_info: idt,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &ts(0, 0), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 5, "CALL");
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0x28);
        let ext = intr_info::VALID | intr_info::TYPE_EXT_INTR | 0x20;
        prepare_vmcs12(&mut v, &l2, &ts(3, ext), 0, &l2, &mut mem()).unwrap();
        assert_eq!(
            v.get(F::VM_EXIT_INSTRUCTION_LEN),
            0,
            "gate for an interrupt"
        );
        let int_n = intr_info::VALID | intr_info::TYPE_SOFT_INTR | 0x20;
        prepare_vmcs12(&mut v, &l2, &ts(3, int_n), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 5, "gate for INT n");
    }

    #[test]
    fn test_exception_exit_records_error_code_and_pf_qualification() {
        let l2 = l2_64();
        let mut v = Vmcs12::new();
        let pf = ExitInfo {
            reason: 0,
            qualification: 0xdead_b000,
            intr_info: intr_info::VALID
                | intr_info::TYPE_HARD_EXCEPTION
                | intr_info::DELIVER_ERROR_CODE
                | 14,
            intr_error_code: 6,
            idt_vectoring_error_code: 9,
            instruction_len: 4,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &pf, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0xdead_b000);
        assert_eq!(v.get(F::VM_EXIT_INTR_ERROR_CODE), 6);
        assert_eq!(
            v.get(F::IDT_VECTORING_ERROR_CODE),
            0,
            "vectoring info not valid"
        );
        assert_eq!(
            v.get(F::VM_EXIT_INSTRUCTION_LEN),
            0,
            "#PF is not a software exception"
        );
        // #UD has no qualification; INT3 (software exception) has a length.
        let bp = ExitInfo {
            reason: 0,
            qualification: 5,
            intr_info: intr_info::VALID | intr_info::TYPE_SOFT_EXCEPTION | 3,
            instruction_len: 1,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &bp, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::EXIT_QUALIFICATION), 0);
        assert_eq!(v.get(F::VM_EXIT_INTR_ERROR_CODE), 0);
        assert_eq!(v.get(F::VM_EXIT_INSTRUCTION_LEN), 1);
    }

    #[test]
    fn test_linear_and_physical_address_only_where_defined() {
        let l2 = l2_64();
        let mut v = Vmcs12::new();
        let ept = ExitInfo {
            reason: 48,
            qualification: 1 << 7,
            guest_linear_address: 0x40_0000,
            guest_physical_address: 0x9000,
            ..ExitInfo::default()
        };
        prepare_vmcs12(&mut v, &l2, &ept, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::GUEST_LINEAR_ADDRESS), 0x40_0000);
        assert_eq!(v.get(F::GUEST_PHYSICAL_ADDRESS), 0x9000);
        let no_gla = ExitInfo {
            qualification: 0,
            ..ept
        };
        prepare_vmcs12(&mut v, &l2, &no_gla, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::GUEST_LINEAR_ADDRESS), 0);
        assert_eq!(v.get(F::GUEST_PHYSICAL_ADDRESS), 0x9000);
        let io = ExitInfo { reason: 30, ..ept };
        prepare_vmcs12(&mut v, &l2, &io, 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::GUEST_PHYSICAL_ADDRESS), 0);
        assert_eq!(v.get(F::GUEST_LINEAR_ADDRESS), 0, "OUT, not OUTS");
    }

    #[test]
    fn test_ia32e_mode_guest_control_follows_efer_lma() {
        let mut v = Vmcs12::new();
        set_entry_ctl(&mut v, EntryControls::LOAD_PAT);
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        assert_eq!(
            v.get32(F::VM_ENTRY_CONTROLS),
            (EntryControls::LOAD_PAT | EntryControls::IA32E_MODE_GUEST).bits()
        );
        let real = l2_real();
        prepare_vmcs12(&mut v, &real, &cpuid_exit(), 0, &real, &mut mem()).unwrap();
        assert_eq!(
            v.get32(F::VM_ENTRY_CONTROLS),
            EntryControls::LOAD_PAT.bits()
        );
    }

    #[test]
    fn test_unusable_segments_save_only_defined_bits() {
        let mut l2 = l2_64();
        l2.ds = seg(
            0,
            0xffff_ffff_1234_0000,
            0x55,
            Segment::AR_UNUSABLE | 0xff | 0xf00,
        );
        l2.ss = seg(0, 0, 0, Segment::AR_UNUSABLE | 0x60 | 0x13);
        l2.gs.ar |= 0xfffe_0f00; // reserved bits of a usable segment
        let mut v = Vmcs12::new();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        assert_eq!(v.get(F::GUEST_DS_AR_BYTES), u64::from(Segment::AR_UNUSABLE));
        assert_eq!(v.get(F::GUEST_DS_BASE), 0x1234_0000);
        assert_eq!(
            v.get(F::GUEST_SS_AR_BYTES),
            u64::from(Segment::AR_UNUSABLE | 0x60)
        );
        assert_eq!(v.get(F::GUEST_GS_AR_BYTES), 0xc0f3);
        assert_eq!(v.get(F::GUEST_FS_BASE), 0x7000_0000, "FS base is kept");
    }

    // ----- controls on/off ------------------------------------------------

    #[test]
    fn test_save_controls_change_exactly_their_fields() {
        let run = |ctl: ExitControls| {
            let mut v = Vmcs12::new();
            set_exit_ctl(&mut v, ctl);
            let l2 = l2_64();
            prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 1234, &l2, &mut mem()).unwrap();
            v
        };
        let cases = [
            (
                ExitControls::SAVE_DEBUG_CONTROLS,
                vec![F::GUEST_IA32_DEBUGCTL, F::GUEST_DR7],
            ),
            (ExitControls::SAVE_PAT, vec![F::GUEST_IA32_PAT]),
            (ExitControls::SAVE_EFER, vec![F::GUEST_IA32_EFER]),
            (
                ExitControls::SAVE_PREEMPTION_TIMER,
                vec![F::VMX_PREEMPTION_TIMER_VALUE],
            ),
        ];
        for (ctl, fields) in cases {
            let off = run(ExitControls::HOST_ADDR_SPACE_SIZE);
            let on = run(ExitControls::HOST_ADDR_SPACE_SIZE | ctl);
            let changed: Vec<_> = off
                .diff(&on)
                .map(|(f, _, _)| f)
                .filter(|&f| f != F::VM_EXIT_CONTROLS)
                .collect();
            assert_eq!(changed, fields, "{ctl:?}");
        }
    }

    #[test]
    fn test_host_load_controls_change_exactly_their_msrs() {
        type Pick = fn(&mut VcpuState) -> &mut u64;
        let run = |ctl: ExitControls| {
            let mut v = Vmcs12::new();
            set_host_fields(&mut v, &l1_64());
            set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE | ctl);
            let mut vcpu = l2_64();
            load_vmcs12_host_state(&v, &mut vcpu, &mem(), &AllowAll, &caps()).unwrap();
            vcpu
        };
        let cases: [(ExitControls, Pick); 4] = [
            (ExitControls::LOAD_PAT, |s| &mut s.msrs.pat),
            (ExitControls::LOAD_EFER, |s| &mut s.msrs.efer),
            (ExitControls::LOAD_PERF_GLOBAL_CTRL, |s| {
                &mut s.msrs.perf_global_ctrl
            }),
            (ExitControls::CLEAR_BNDCFGS, |s| &mut s.msrs.bndcfgs),
        ];
        for (ctl, pick) in cases {
            let mut off = run(ExitControls::empty());
            let mut on = run(ctl);
            assert_ne!(*pick(&mut off), *pick(&mut on), "{ctl:?}");
            *pick(&mut off) = *pick(&mut on);
            assert_eq!(off, on, "{ctl:?}");
        }
    }

    #[test]
    fn test_entry_load_controls_change_exactly_their_state() {
        type Pick = fn(&mut VcpuState) -> Vec<&mut u64>;
        let l2 = l2_64();
        let mut base = Vmcs12::new();
        set_exit_ctl(&mut base, ALL_SAVE);
        prepare_vmcs12(&mut base, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        base.set(F::GUEST_IA32_PERF_GLOBAL_CTRL, l2.msrs.perf_global_ctrl);
        base.set(F::GUEST_IA32_BNDCFGS, l2.msrs.bndcfgs);
        let run = |ctl: EntryControls| {
            let mut v = base.clone();
            set_entry_ctl(&mut v, EntryControls::IA32E_MODE_GUEST | ctl);
            prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps())
                .unwrap()
                .l2
        };
        let cases: [(EntryControls, Pick); 5] = [
            (EntryControls::LOAD_DEBUG_CONTROLS, |s| {
                vec![&mut s.dr7, &mut s.msrs.debugctl]
            }),
            (EntryControls::LOAD_PAT, |s| vec![&mut s.msrs.pat]),
            (EntryControls::LOAD_EFER, |s| vec![&mut s.msrs.efer]),
            (EntryControls::LOAD_PERF_GLOBAL_CTRL, |s| {
                vec![&mut s.msrs.perf_global_ctrl]
            }),
            (EntryControls::LOAD_BNDCFGS, |s| vec![&mut s.msrs.bndcfgs]),
        ];
        for (ctl, pick) in cases {
            let mut off = run(EntryControls::empty());
            let mut on = run(ctl);
            let on_values: Vec<u64> = pick(&mut on).into_iter().map(|v| *v).collect();
            for (slot, value) in pick(&mut off).into_iter().zip(&on_values) {
                assert_ne!(*slot, *value, "{ctl:?}");
                *slot = *value;
            }
            assert_eq!(off, on, "{ctl:?}");
        }
    }

    #[test]
    fn test_entry_efer_follows_ia32e_mode_guest_without_load_efer() {
        let mut v = Vmcs12::new();
        let real = l2_real();
        prepare_vmcs12(&mut v, &real, &cpuid_exit(), 0, &real, &mut mem()).unwrap();
        let lm = VcpuState::EFER_LMA | VcpuState::EFER_LME;
        let l2 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps())
            .unwrap()
            .l2;
        assert_eq!(l2.msrs.efer, l1_64().msrs.efer & !lm);
        set_entry_ctl(&mut v, EntryControls::IA32E_MODE_GUEST);
        let l2 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps())
            .unwrap()
            .l2;
        assert_eq!(l2.msrs.efer, l1_64().msrs.efer | lm);
    }

    // ----- event injection, TSC offset, PDPTEs ------------------------------

    #[test]
    fn test_event_injection_becomes_pending_event() {
        let real = l2_real();
        let mut v = Vmcs12::new();
        prepare_vmcs12(&mut v, &real, &cpuid_exit(), 0, &real, &mut mem()).unwrap();
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(v02.l2.pending_event, None);
        assert_eq!(v02.l2.activity, ACTIVITY_HLT);

        let gp =
            intr_info::VALID | intr_info::TYPE_HARD_EXCEPTION | intr_info::DELIVER_ERROR_CODE | 13;
        v.set(F::VM_ENTRY_INTR_INFO_FIELD, gp.into());
        v.set(F::VM_ENTRY_EXCEPTION_ERROR_CODE, 0x18);
        v.set(F::VM_ENTRY_INSTRUCTION_LEN, 3);
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        let expected = PendingEvent {
            info: gp,
            error_code: 0x18,
            instruction_len: 0,
        };
        assert_eq!(v02.l2.pending_event, Some(expected));
        assert_eq!(v02.l2.activity, 0, "an injected event leaves HLT");

        let int_n = intr_info::VALID | intr_info::TYPE_SOFT_INTR | 0x80;
        v.set(F::VM_ENTRY_INTR_INFO_FIELD, int_n.into());
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        let expected = PendingEvent {
            info: int_n,
            error_code: 0,
            instruction_len: 3,
        };
        assert_eq!(v02.l2.pending_event, Some(expected));
    }

    #[test]
    fn test_tsc_offset_only_with_use_tsc_offsetting() {
        let mut v = Vmcs12::new();
        v.set(F::TSC_OFFSET, (-5000i64) as u64);
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(v02.tsc_offset, 0);
        v.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            PrimaryProcBased::USE_TSC_OFFSETTING.bits().into(),
        );
        let v02 = prepare_vmcs02(&v, &l1_64(), &mem(), &AllowAll, &caps()).unwrap();
        assert_eq!(v02.tsc_offset as i64, -5000);
    }

    fn pae_l2_vmcs12() -> Vmcs12 {
        let mut v = Vmcs12::new();
        let l2 = VcpuState {
            cr0: 0x8000_0031,
            cr3: 0x4000,
            cr4: CR4_PAE,
            msrs: crate::VmxMsrs::default(),
            ..l2_64()
        };
        set_exit_ctl(&mut v, ExitControls::SAVE_EFER);
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut mem()).unwrap();
        set_entry_ctl(&mut v, EntryControls::LOAD_EFER);
        v
    }

    #[test]
    fn test_pae_l2_loads_pdptes_from_memory_without_ept() {
        let v = pae_l2_vmcs12();
        let mut m = mem();
        for i in 0..4 {
            m.write_u64(0x4000 + 8 * i, (0x1000 * (i + 5)) | 1).unwrap();
        }
        let v02 = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap();
        assert_eq!(v02.pdptes, Some([0x5001, 0x6001, 0x7001, 0x8001]));
        // A present PDPTE beyond MAXPHYADDR (39) fails the entry.
        m.write_u64(0x4018, 1 << 45 | 1).unwrap();
        let err = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap_err();
        assert_eq!(err, EntryFailure::PdpteLoad);
        assert_eq!((err.exit_reason(), err.qualification()), (33 | 1 << 31, 2));
        // Not present: reserved bits do not matter.
        m.write_u64(0x4018, 1 << 45).unwrap();
        assert!(prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).is_ok());
    }

    #[test]
    fn test_pae_l2_takes_pdptes_from_fields_with_ept() {
        let mut v = pae_l2_vmcs12();
        v.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            PrimaryProcBased::ACTIVATE_SECONDARY.bits().into(),
        );
        v.set(
            F::SECONDARY_VM_EXEC_CONTROL,
            SecondaryProcBased::ENABLE_EPT.bits().into(),
        );
        v.set(F::GUEST_PDPTE2, 0x9001);
        // Guest memory at CR3 is garbage; it must not be read.
        let mut m = mem();
        m.write_u64(0x4000, 0x7).unwrap(); // present, reserved bits 2:1
        let v02 = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap();
        assert_eq!(v02.pdptes, Some([0, 0, 0x9001, 0]));
        v.set(F::GUEST_PDPTE1, 0x101); // bit 8 reserved
        let err = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps());
        assert_eq!(err, Err(EntryFailure::PdpteLoad));
    }

    fn with_ept(v: &mut Vmcs12) {
        v.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            PrimaryProcBased::ACTIVATE_SECONDARY.bits().into(),
        );
        v.set(
            F::SECONDARY_VM_EXEC_CONTROL,
            SecondaryProcBased::ENABLE_EPT.bits().into(),
        );
    }

    #[test]
    fn test_pae_l2_with_ept_saves_pdptes_on_exit() {
        // SDM 28.3.4: with "enable EPT" and PAE paging the PDPTE registers
        // are saved. Entry loads them from the fields, L2 reloads CR3 (new
        // PDPTEs), the exit saves what L2 used.
        let mut v = pae_l2_vmcs12();
        with_ept(&mut v);
        v.set(F::GUEST_PDPTE0, 0x5001);
        let mut m = mem();
        let v02 = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap();
        assert_eq!(v02.l2.msrs.pdptes, [0x5001, 0, 0, 0]);
        let mut l2 = v02.l2;
        l2.msrs.pdptes = [0x6001, 0x7001, 0, 0x8001];
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
        let saved = GUEST_PDPTES.map(|f| v.get(f));
        assert_eq!(saved, [0x6001, 0x7001, 0, 0x8001]);
        // Entry then exit with the registers unchanged reproduces the fields.
        let v02 = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap();
        let mut again = v.clone();
        prepare_vmcs12(&mut again, &v02.l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
        assert_eq!(GUEST_PDPTES.map(|f| again.get(f)), saved);
    }

    #[test]
    fn test_pdptes_not_saved_without_ept_or_pae() {
        // Without EPT, or with EPT but 4-level paging, the fields keep
        // whatever L1 wrote.
        let mut m = mem();
        let mut l2 = l2_64(); // 4-level paging
        l2.msrs.pdptes = [0x6001; 4];
        let mut pae = VcpuState {
            cr0: 0x8000_0031,
            cr4: CR4_PAE,
            msrs: crate::VmxMsrs::default(),
            ..l2_64()
        };
        pae.msrs.pdptes = [0x6001; 4];
        for (state, ept) in [(l2, true), (pae, false)] {
            let mut v = Vmcs12::new();
            if ept {
                with_ept(&mut v);
            }
            v.set(F::GUEST_PDPTE3, 0x1234);
            prepare_vmcs12(&mut v, &state, &cpuid_exit(), 0, &state, &mut m).unwrap();
            assert_eq!(GUEST_PDPTES.map(|f| v.get(f)), [0, 0, 0, 0x1234]);
        }
    }

    #[test]
    fn test_pae_host_pdptes_loaded_into_l1() {
        let mut v = Vmcs12::new();
        let mut l1 = l1_64();
        set_host_fields(&mut v, &l1);
        v.set(F::HOST_CR4, CR4_PAE);
        let mut m = mem();
        for i in 0..4 {
            m.write_u64(0x1000 + 8 * i, (0x1000 * (i + 2)) | 1).unwrap();
        }
        v.set(F::HOST_CR3, 0x1000);
        l1.msrs.efer = 0;
        load_vmcs12_host_state(&v, &mut l1, &m, &AllowAll, &caps()).unwrap();
        assert_eq!(l1.msrs.pdptes, [0x2001, 0x3001, 0x4001, 0x5001]);
        // A 64-bit host does not use PDPTEs: the registers are left alone.
        let mut l1 = l1_64();
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        load_vmcs12_host_state(&v, &mut l1, &m, &AllowAll, &caps()).unwrap();
        assert_eq!(l1.msrs.pdptes, [0; 4]);
    }

    // ----- NMI blocking after the exit (SDM 28.5.5) --------------------------

    /// L1's interruptibility after `exit` from `l2` under `pin` controls.
    fn l1_interruptibility_after(exit: &ExitInfo, l2: &VcpuState, pin: PinBased, l1: u32) -> u32 {
        let mut v = Vmcs12::new();
        let mut host = l1_64();
        set_host_fields(&mut v, &host);
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        v.set(F::PIN_BASED_VM_EXEC_CONTROL, pin.bits().into());
        let mut m = mem();
        prepare_vmcs12(&mut v, l2, exit, 0, l2, &mut m).unwrap();
        host.interruptibility = l1;
        load_vmcs12_host_state(&v, &mut host, &m, &AllowAll, &caps()).unwrap();
        host.interruptibility
    }

    fn nmi_exit() -> ExitInfo {
        ExitInfo {
            reason: 0,
            intr_info: intr_info::VALID | intr_info::TYPE_NMI | 2,
            ..ExitInfo::default()
        }
    }

    #[test]
    fn test_nmi_exit_blocks_nmis_in_l1() {
        let nmi = PinBased::NMI_EXITING | PinBased::VIRTUAL_NMIS;
        assert_eq!(l1_interruptibility_after(&nmi_exit(), &l2_64(), nmi, 0), 8);
        // #UD (hardware exception, vector 6) and an external interrupt do
        // not block NMIs; STI blocking (L2 has it) never survives an exit.
        let ud = ExitInfo {
            intr_info: intr_info::VALID | intr_info::TYPE_HARD_EXCEPTION | 6,
            ..nmi_exit()
        };
        assert_eq!(l1_interruptibility_after(&ud, &l2_64(), nmi, 0), 0);
        let ext = ExitInfo {
            reason: 1,
            ..ExitInfo::default()
        };
        assert_eq!(l1_interruptibility_after(&ext, &l2_64(), nmi, 0), 0);
    }

    #[test]
    fn test_l2_nmi_blocking_survives_exit_only_without_virtual_nmis() {
        let blocked = VcpuState {
            interruptibility: 8,
            ..l2_64()
        };
        let cpuid = cpuid_exit();
        assert_eq!(
            l1_interruptibility_after(&cpuid, &blocked, PinBased::empty(), 0),
            8
        );
        let virt = PinBased::NMI_EXITING | PinBased::VIRTUAL_NMIS;
        assert_eq!(l1_interruptibility_after(&cpuid, &blocked, virt, 0), 0);
    }

    #[test]
    fn test_entry_failure_keeps_l1_nmi_blocking() {
        let failure = EntryFailure::PdpteLoad.exit_info();
        let l2 = VcpuState {
            interruptibility: 8,
            ..l2_64()
        };
        assert_eq!(
            l1_interruptibility_after(&failure, &l2, PinBased::empty(), 8),
            8
        );
        assert_eq!(
            l1_interruptibility_after(&failure, &l2, PinBased::empty(), 0),
            0
        );
    }

    // ----- MSR areas --------------------------------------------------------

    #[test]
    fn test_exit_msr_store_area_stores_l2_values() {
        let mut m = mem();
        write_area(
            &mut m,
            0x8000,
            &[(msr_index::IA32_PAT, 0, 0), (msr_index::IA32_FS_BASE, 0, 0)],
        );
        let mut v = Vmcs12::new();
        v.set(F::VM_EXIT_MSR_STORE_ADDR, 0x8000);
        v.set(F::VM_EXIT_MSR_STORE_COUNT, 2);
        let l2 = l2_64();
        prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut m).unwrap();
        assert_eq!(m.read_u64(0x8008), Ok(l2.msrs.pat));
        assert_eq!(m.read_u64(0x8018), Ok(l2.fs.base));
    }

    #[test]
    fn test_exit_msr_store_failures_abort_with_indicator_1() {
        let l2 = l2_64();
        let cases: [(u64, RawEntry, u32); 5] = [
            // out of RAM: the second entry crosses the end
            (MEM_SIZE as u64 - 24, (msr_index::IA32_PAT, 0, 0), 2),
            (0x8000, (msr_index::IA32_PAT, 1, 0), 2), // reserved bits
            (0x8000, (msr_index::IA32_SMBASE, 0, 0), 2), // SMM only
            (0x8000, (0x808, 0, 0), 2),               // x2APIC TPR
            (0x8000, (0x10, 0, 0), 2),                // RDMSR refuses
        ];
        for (addr, bad, entry) in cases {
            let mut m = mem();
            write_area(&mut m, addr, &[(msr_index::IA32_PAT, 0, 0)]);
            if addr == 0x8000 {
                write_area(&mut m, addr + 16, &[bad]);
            }
            let mut v = Vmcs12::new();
            v.set(F::VM_EXIT_MSR_STORE_ADDR, addr);
            v.set(F::VM_EXIT_MSR_STORE_COUNT, 2);
            let err = prepare_vmcs12(&mut v, &l2, &cpuid_exit(), 0, &l2, &mut m).unwrap_err();
            assert_eq!(err, VmxAbort::SaveGuestMsr { entry }, "{bad:?}");
            assert_eq!(err.indicator(), 1);
        }
    }

    #[test]
    fn test_exit_msr_load_area_returns_and_applies_entries() {
        let mut m = mem();
        write_area(
            &mut m,
            0x8000,
            &[
                (msr_index::IA32_KERNEL_GS_BASE, 0, 0x77),
                (0xc000_0103, 0, 5), // TSC_AUX, not modelled
            ],
        );
        let mut v = Vmcs12::new();
        set_host_fields(&mut v, &l1_64());
        set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
        v.set(F::VM_EXIT_MSR_LOAD_ADDR, 0x8000);
        v.set(F::VM_EXIT_MSR_LOAD_COUNT, 2);
        let mut vcpu = l1_64();
        let loads = load_vmcs12_host_state(&v, &mut vcpu, &m, &AllowAll, &caps()).unwrap();
        assert_eq!(
            loads,
            vec![
                MsrEntry {
                    index: msr_index::IA32_KERNEL_GS_BASE,
                    value: 0x77
                },
                MsrEntry {
                    index: 0xc000_0103,
                    value: 5
                }
            ]
        );
        assert_eq!(vcpu.msrs.kernel_gs_base, 0x77);
    }

    #[test]
    fn test_exit_msr_load_failures_abort_with_indicator_4() {
        let l1 = l1_64();
        let cases: [(u64, RawEntry); 5] = [
            (MEM_SIZE as u64 - 16, (msr_index::IA32_PAT, 0, 0)), // 2nd entry outside RAM
            (0x8000, (msr_index::IA32_PAT, 0x100, 0)),           // reserved bits
            (0x8000, (msr_index::IA32_FS_BASE, 0, 0)),           // FS base
            (0x8000, (msr_index::IA32_SMM_MONITOR_CTL, 0, 0)),
            (0x8000, (0x10, 0, 0)), // WRMSR refuses (not modelled by l1)
        ];
        for (addr, bad) in cases {
            let mut m = mem();
            write_area(&mut m, addr, &[(msr_index::IA32_PAT, 0, 6)]);
            if addr == 0x8000 {
                write_area(&mut m, addr + 16, &[bad]);
            }
            let mut v = Vmcs12::new();
            set_host_fields(&mut v, &l1);
            set_exit_ctl(&mut v, ExitControls::HOST_ADDR_SPACE_SIZE);
            v.set(F::VM_EXIT_MSR_LOAD_ADDR, addr);
            v.set(F::VM_EXIT_MSR_LOAD_COUNT, 2);
            let mut vcpu = l1;
            let err = load_vmcs12_host_state(&v, &mut vcpu, &m, &l1, &caps()).unwrap_err();
            assert_eq!(err, VmxAbort::LoadHostMsr { entry: 2 }, "{bad:?}");
            assert_eq!(err.indicator(), 4);
        }
    }

    #[test]
    fn test_entry_msr_load_area_applies_in_order() {
        let mut m = mem();
        write_area(
            &mut m,
            0x8000,
            &[
                (msr_index::IA32_PAT, 0, 1),
                (msr_index::IA32_PAT, 0, 2),
                (msr_index::IA32_EFER, 0, 0x901),
            ],
        );
        let mut v = Vmcs12::new();
        v.set(F::VM_ENTRY_MSR_LOAD_ADDR, 0x8000);
        v.set(F::VM_ENTRY_MSR_LOAD_COUNT, 3);
        let v02 = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap();
        assert_eq!(v02.msr_loads.len(), 3);
        assert_eq!(v02.l2.msrs.pat, 2);
        assert_eq!(v02.l2.msrs.efer, 0x901);
    }

    #[test]
    fn test_entry_msr_load_failure_is_exit_34_with_entry_number() {
        let cases: [(u64, u32, RawEntry, u32); 5] = [
            (MEM_SIZE as u64 - 16, 2, (0, 0, 0), 2), // second entry outside RAM
            (0x8000, 3, (msr_index::IA32_PAT, 1 << 31, 0), 2), // reserved bits
            (0x8000, 3, (msr_index::IA32_GS_BASE, 0, 0), 2),
            (0x8000, 3, (0x8ff, 0, 0), 2), // x2APIC range
            (0x8000, 3, (msr_index::IA32_BIOS_UPDT_TRIG, 0, 0), 2),
        ];
        for (addr, count, bad, entry) in cases {
            let mut m = mem();
            write_area(&mut m, addr, &[(msr_index::IA32_PAT, 0, 6)]);
            if addr == 0x8000 {
                write_area(&mut m, addr + 16, &[bad, (msr_index::IA32_PAT, 0, 0)]);
            }
            let mut v = Vmcs12::new();
            v.set(F::VM_ENTRY_MSR_LOAD_ADDR, addr);
            v.set(F::VM_ENTRY_MSR_LOAD_COUNT, count.into());
            let err = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()).unwrap_err();
            assert_eq!(err, EntryFailure::MsrLoad { entry }, "{bad:?}");
            assert_eq!(err.exit_info().reason, 34 | 1 << 31);
            assert_eq!(err.exit_info().qualification, u64::from(entry));
        }
        // WRMSR refusing the value is a failure too (VcpuState refuses 0x10).
        let mut m = mem();
        write_area(&mut m, 0x8000, &[(0x10, 0, 0)]);
        let mut v = Vmcs12::new();
        v.set(F::VM_ENTRY_MSR_LOAD_ADDR, 0x8000);
        v.set(F::VM_ENTRY_MSR_LOAD_COUNT, 1);
        let err = prepare_vmcs02(&v, &l1_64(), &m, &l1_64(), &caps());
        assert_eq!(err, Err(EntryFailure::MsrLoad { entry: 1 }));
    }

    #[test]
    fn test_msr_area_over_the_limit_fails() {
        let mut big = FlatMemory::new(0x4000);
        let entries: Vec<_> = (0..MAX_MSR_AREA_ENTRIES + 1)
            .map(|_| (msr_index::IA32_PAT, 0, 0))
            .collect();
        write_area(&mut big, 0, &entries);
        let mut v = Vmcs12::new();
        v.set(F::VM_ENTRY_MSR_LOAD_COUNT, MAX_MSR_AREA_ENTRIES.into());
        assert!(prepare_vmcs02(&v, &l1_64(), &big, &AllowAll, &caps()).is_ok());
        v.set(
            F::VM_ENTRY_MSR_LOAD_COUNT,
            (MAX_MSR_AREA_ENTRIES + 1).into(),
        );
        let err = prepare_vmcs02(&v, &l1_64(), &big, &AllowAll, &caps());
        assert_eq!(
            err,
            Err(EntryFailure::MsrLoad {
                entry: MAX_MSR_AREA_ENTRIES + 1
            })
        );
    }

    #[test]
    fn test_abort_messages_name_the_fix() {
        let msg = VmxAbort::LoadHostMsr { entry: 3 }.to_string();
        assert!(
            msg.contains("entry 3") && msg.contains("VM_EXIT_MSR_LOAD_ADDR"),
            "{msg}"
        );
        let all = [
            VmxAbort::SaveGuestMsr { entry: 1 },
            VmxAbort::HostPdpte,
            VmxAbort::VmcsCorrupted,
            VmxAbort::LoadHostMsr { entry: 1 },
            VmxAbort::MachineCheck,
            VmxAbort::HostAddressSpaceSize,
        ];
        let numbers: Vec<u32> = all.iter().map(VmxAbort::indicator).collect();
        assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6]);
        for a in all {
            assert!(a
                .to_string()
                .starts_with(&format!("VMX abort {}", a.indicator())));
        }
    }

    // ----- robustness: random exits and random vmcs12 ----------------------

    /// A vmcs12 with every field set from `values` (masked to its width),
    /// with small MSR-area counts pointing into `mem` often enough to walk
    /// the areas.
    fn random_vmcs12(values: &[u64], small_areas: bool) -> Vmcs12 {
        let mut v = Vmcs12::new();
        for (f, x) in F::ALL.iter().zip(values) {
            v.set(*f, *x);
        }
        if small_areas {
            for (addr, count) in [
                (F::VM_EXIT_MSR_STORE_ADDR, F::VM_EXIT_MSR_STORE_COUNT),
                (F::VM_EXIT_MSR_LOAD_ADDR, F::VM_EXIT_MSR_LOAD_COUNT),
                (F::VM_ENTRY_MSR_LOAD_ADDR, F::VM_ENTRY_MSR_LOAD_COUNT),
            ] {
                v.set(addr, v.get(addr) % (MEM_SIZE as u64 + 64));
                v.set(count, v.get(count) % 8);
            }
        }
        v
    }

    fn random_vcpu(r: [u64; 8]) -> VcpuState {
        let mut s = l2_64();
        s.cr0 = r[0];
        s.cr3 = r[1];
        s.cr4 = r[2];
        s.msrs.efer = r[3];
        s.rflags = r[4];
        s.cs.ar = r[5] as u32;
        s.interruptibility = (r[5] >> 32) as u32;
        s.rip = r[6];
        s.msrs.pdptes = [r[7]; 4];
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The whole reflected-exit path on random input: any exit
        /// information decodes or is refused, `decide` answers, and for a
        /// reflected exit `prepare_vmcs12` then `load_vmcs12_host_state`
        /// complete or abort, never panic. Invariants: VM_EXIT_REASON is the
        /// reason; after a (non-failure) exit the VM-entry interruption
        /// information is not valid; L1 comes back with RFLAGS = 2,
        /// DR7 = 0x400, CR4.VMXE, an unusable LDTR and at most NMI blocking.
        #[test]
        fn test_random_exit_decide_prepare_load_never_panic(
            reason in prop_oneof![0u32..80, any::<u32>()],
            fail in any::<bool>(),
            q in any::<[u64; 4]>(),
            w in any::<[u32; 6]>(),
            ctx in any::<(u32, u64, u64, u64, u64)>(),
            values in proptest::collection::vec(any::<u64>(), F::COUNT),
            small_areas in any::<bool>(),
            regs in any::<[u64; 8]>(),
            mem_words in proptest::collection::vec((0u64..(MEM_SIZE as u64 / 8), any::<u64>()), 0..64),
        ) {
            let info = ExitInfo {
                reason: if fail { reason | ExitInfo::REASON_ENTRY_FAILURE } else { reason },
                qualification: q[0],
                guest_linear_address: q[1],
                guest_physical_address: q[2],
                intr_info: w[0],
                intr_error_code: w[1],
                idt_vectoring_info: w[2],
                idt_vectoring_error_code: w[3],
                instruction_len: w[4],
                instruction_info: w[5],
                io_rcx: q[3],
                ..ExitInfo::default()
            };
            let ectx = crate::ExitContext {
                msr_index: ctx.0,
                cr_source: ctx.1,
                rax: ctx.2,
                vmcs_field: ctx.3,
                xss: ctx.4,
            };
            let mut m = mem();
            for (slot, x) in mem_words {
                m.write_u64(slot * 8, x).unwrap();
            }
            let mut v = random_vmcs12(&values, small_areas);
            let l2 = random_vcpu(regs);
            if let Ok(exit) = crate::Exit::from_info(&info, &ectx) {
                let d = crate::decide(&exit, &v, &m, &crate::L0Policy::default());
                prop_assert!(!d.explanation.is_empty());
            }
            if prepare_vmcs12(&mut v, &l2, &info, 7, &AllowAll, &mut m).is_ok() {
                prop_assert_eq!(v.get32(F::VM_EXIT_REASON), info.reason);
                if info.reason & ExitInfo::REASON_ENTRY_FAILURE == 0 {
                    prop_assert_eq!(v.get32(F::VM_ENTRY_INTR_INFO_FIELD) & intr_info::VALID, 0);
                }
                let mut l1 = l1_64();
                if load_vmcs12_host_state(&v, &mut l1, &m, &AllowAll, &caps()).is_ok() {
                    prop_assert_eq!(l1.rflags, 2);
                    prop_assert_eq!(l1.dr7, 0x400);
                    prop_assert!(l1.cr4 & CR4_VMXE != 0);
                    prop_assert!(l1.ldtr.unusable());
                    prop_assert_eq!(l1.interruptibility & !INTERRUPTIBILITY_NMI, 0);
                }
            }
        }

        /// `prepare_vmcs02` on a random vmcs12 (it runs after the entry
        /// checks, but must not trust them) never panics; an entry has PDPTEs
        /// exactly when L2 uses PAE paging, and a pending event exactly when
        /// VM_ENTRY_INTR_INFO_FIELD is valid.
        #[test]
        fn test_random_vmcs12_prepare_vmcs02_never_panics(
            values in proptest::collection::vec(any::<u64>(), F::COUNT),
            small_areas in any::<bool>(),
            mem_words in proptest::collection::vec((0u64..(MEM_SIZE as u64 / 8), any::<u64>()), 0..64),
        ) {
            let mut m = mem();
            for (slot, x) in mem_words {
                m.write_u64(slot * 8, x).unwrap();
            }
            let v = random_vmcs12(&values, small_areas);
            if let Ok(v02) = prepare_vmcs02(&v, &l1_64(), &m, &AllowAll, &caps()) {
                let l2 = &v02.l2;
                prop_assert_eq!(
                    v02.pdptes.is_some(),
                    uses_pae_paging(l2.cr0, l2.cr4, l2.msrs.efer)
                );
                prop_assert_eq!(
                    l2.pending_event.is_some(),
                    v.get32(F::VM_ENTRY_INTR_INFO_FIELD) & intr_info::VALID != 0
                );
            }
        }
    }
}
