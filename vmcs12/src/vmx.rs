//! VMX operation and the VMX instructions of one virtual CPU, following the
//! pseudo-code of SDM Vol. 3, chapter 31 ("VMX Instruction Reference").
//!
//! [`VmxCpu`] is what L0 keeps per L1 vCPU: whether L1 is in VMX root
//! operation (and its VMXON pointer), the current-VMCS pointer, the cached
//! current vmcs12 with its launch state, the capabilities offered to L1 and
//! IA32_FEATURE_CONTROL. The current vmcs12 is cached the way KVM caches it
//! (nested.c `handle_vmptrld` / `nested_release_vmcs12`): VMPTRLD reads the
//! 4 KiB region from guest memory, VMREAD/VMWRITE work on the cache, and
//! the cache is written back when another VMCS is made current, when the
//! current one is VMCLEARed, on VMXOFF, and on [`VmxCpu::flush`].
//!
//! Every instruction takes the operands L0 has already decoded and read
//! (the 64-bit pointer of VMXON/VMCLEAR/VMPTRLD, the INVEPT/INVVPID
//! descriptor, the VMREAD/VMWRITE register values) and an [`InsnContext`].
//! Call [`VmxCpu::check_access`] before reading a memory operand: the #UD
//! and #GP checks come first on hardware, before any #PF of the operand.

use serde::{Deserialize, Serialize};

use crate::caps::{
    msr, VmxCapabilities, FEATURE_CONTROL_LOCKED, FEATURE_CONTROL_VMXON_OUTSIDE_SMX,
};
use crate::entry::{check_eptp, check_vm_entry_in, EntryContext};
use crate::field::{AccessType, FieldAccess, VmcsField};
use crate::mem::GuestPhysMemory;
use crate::outcome::{VmInstructionError, VmxFault, VmxOutcome};
use crate::region::{self, LaunchState, RegionError, SHADOW_VMCS_INDICATOR};
use crate::vmcs::Vmcs12;

/// The current-VMCS pointer when there is no current VMCS (SDM 25.1).
pub const INVALID_VMCS_POINTER: u64 = u64::MAX;

/// Basic exit reason 33: VM-entry failure due to invalid guest state.
pub const EXIT_REASON_INVALID_GUEST_STATE: u32 = 33;
/// Bit 31 of the exit reason: VM-entry failure (SDM 28.8).
pub const EXIT_REASON_FAILED_VMENTRY: u32 = 0x8000_0000;

/// IA32_FEATURE_CONTROL bit 1: VMXON inside SMX operation (this model
/// never runs in SMX operation, so only bit 2 matters to VMXON).
pub const FEATURE_CONTROL_VMXON_IN_SMX: u64 = 1 << 1;
/// The IA32_FEATURE_CONTROL value used when the capabilities do not report
/// one: locked, VMXON allowed outside SMX.
pub const FEATURE_CONTROL_DEFAULT: u64 = FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX;

const CR0_PE: u64 = 1 << 0;
const CR4_VMXE: u64 = 1 << 13;
const RFLAGS_VM: u64 = 1 << 17;
const EFER_LMA: u64 = 1 << 10;

/// Linear-address width used for the canonical check of INVVPID type 0
/// (4-level paging; this model does not offer LA57).
const LINEAR_ADDRESS_BITS: u32 = 48;

/// The operating mode an instruction executes in, as the VMX #UD checks see
/// it (CR0.PE, RFLAGS.VM, IA32_EFER.LMA and CS.L).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuMode {
    /// CR0.PE = 0.
    Real,
    /// CR0.PE = 1 and RFLAGS.VM = 1.
    Virtual8086,
    /// Legacy protected mode (IA32_EFER.LMA = 0), 16- or 32-bit code.
    Protected,
    /// IA-32e mode with CS.L = 0.
    Compatibility,
    /// IA-32e mode with CS.L = 1.
    Long64,
}

impl CpuMode {
    /// Derives the mode from the registers the SDM's #UD checks name.
    pub fn from_registers(cr0: u64, rflags: u64, efer: u64, cs_l: bool) -> Self {
        if cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if rflags & RFLAGS_VM != 0 {
            CpuMode::Virtual8086
        } else if efer & EFER_LMA != 0 {
            if cs_l {
                CpuMode::Long64
            } else {
                CpuMode::Compatibility
            }
        } else {
            CpuMode::Protected
        }
    }

    /// Whether VMX instructions raise #UD in this mode: "(CR0.PE = 0) or
    /// (RFLAGS.VM = 1) or (IA32_EFER.LMA = 1 and CS.L = 0)" (SDM 31.3).
    pub fn vmx_instructions_undefined(self) -> bool {
        matches!(
            self,
            CpuMode::Real | CpuMode::Virtual8086 | CpuMode::Compatibility
        )
    }

    /// Whether register operands are 64 bits wide (64-bit mode); elsewhere
    /// VMREAD/VMWRITE/INVEPT/INVVPID use 32-bit register operands.
    pub fn is_64bit(self) -> bool {
        self == CpuMode::Long64
    }
}

/// What L0 knows about the trapped instruction's execution environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsnContext {
    /// Current privilege level (CS.RPL / SS.DPL).
    pub cpl: u8,
    /// Operating mode.
    pub mode: CpuMode,
    /// CR0 as L1 sees it.
    pub cr0: u64,
    /// CR4 as L1 sees it; bit 13 (VMXE) is replaced by [`Self::vmxe`].
    pub cr4: u64,
    /// The virtual CR4.VMXE (KVM on this host refuses the real bit, so L0
    /// keeps it apart).
    pub vmxe: bool,
    /// Events are blocked by MOV SS / POP SS (interruptibility state bit 1).
    pub blocked_by_mov_ss: bool,
}

impl InsnContext {
    /// CR4 with the virtual VMXE bit applied.
    pub fn effective_cr4(&self) -> u64 {
        if self.vmxe {
            self.cr4 | CR4_VMXE
        } else {
            self.cr4 & !CR4_VMXE
        }
    }
}

/// The VMX instructions this model executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmxInstruction {
    /// VMXON m64.
    Vmxon,
    /// VMXOFF.
    Vmxoff,
    /// VMCLEAR m64.
    Vmclear,
    /// VMPTRLD m64.
    Vmptrld,
    /// VMPTRST m64.
    Vmptrst,
    /// VMREAD r/m, r.
    Vmread,
    /// VMWRITE r, r/m.
    Vmwrite,
    /// VMLAUNCH.
    Vmlaunch,
    /// VMRESUME.
    Vmresume,
    /// INVEPT r, m128.
    Invept,
    /// INVVPID r, m128.
    Invvpid,
}

/// VMX operation state as L1 sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmxOperation {
    /// Not in VMX operation (before VMXON, after VMXOFF).
    Outside,
    /// VMX root operation, entered by VMXON with this pointer.
    Root {
        /// The VMXON pointer.
        vmxon_pointer: u64,
    },
}

/// The result of an instruction that produces a value when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InsnResult<T> {
    /// VMsucceed, with the value to store (VMREAD destination, VMPTRST
    /// pointer) or to act on (what INVEPT/INVVPID invalidate).
    Succeed(T),
    /// VMfailInvalid.
    FailInvalid,
    /// VMfailValid; the error is already in VM_INSTRUCTION_ERROR.
    FailValid(VmInstructionError),
    /// A fault; nothing changed.
    Fault(VmxFault),
}

impl<T> InsnResult<T> {
    /// The architectural outcome (what RFLAGS gets).
    pub fn outcome(&self) -> VmxOutcome {
        match self {
            InsnResult::Succeed(_) => VmxOutcome::Succeed,
            InsnResult::FailInvalid => VmxOutcome::FailInvalid,
            InsnResult::FailValid(e) => VmxOutcome::FailValid(*e),
            InsnResult::Fault(f) => VmxOutcome::Fault(*f),
        }
    }

    /// The value, when the instruction succeeded.
    pub fn value(self) -> Option<T> {
        match self {
            InsnResult::Succeed(v) => Some(v),
            _ => None,
        }
    }
}

/// What VMLAUNCH / VMRESUME did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryResult {
    /// All checks passed: L0 enters L2 from the current vmcs12 (VMLAUNCH
    /// has marked it launched).
    EnterL2,
    /// VM-entry failure while checking guest state (SDM 27.8): there is no
    /// instruction outcome; L0 reports a VM exit to L1 with this exit
    /// reason (33 | bit 31) and exit qualification. The launch state is
    /// unchanged.
    EntryFailure {
        /// Exit reason, with bit 31 set.
        exit_reason: u32,
        /// Exit qualification (0, or 4 for the VMCS link pointer).
        exit_qualification: u64,
    },
    /// VMfailInvalid: no current VMCS, or it is a shadow VMCS.
    FailInvalid,
    /// VMfailValid; the error is already in VM_INSTRUCTION_ERROR.
    FailValid(VmInstructionError),
    /// A fault (#UD, #GP); nothing changed.
    Fault(VmxFault),
}

impl EntryResult {
    /// The instruction outcome L1 sees in RFLAGS, or `None` when the
    /// instruction ends in L2 or in a VM exit.
    pub fn outcome(&self) -> Option<VmxOutcome> {
        match self {
            EntryResult::EnterL2 | EntryResult::EntryFailure { .. } => None,
            EntryResult::FailInvalid => Some(VmxOutcome::FailInvalid),
            EntryResult::FailValid(e) => Some(VmxOutcome::FailValid(*e)),
            EntryResult::Fault(f) => Some(VmxOutcome::Fault(*f)),
        }
    }
}

/// What an INVEPT asks L0 to invalidate (SDM 31.3, INVEPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EptInvalidation {
    /// Type 1: mappings derived from this EPTP (bits 51:12 select them).
    SingleContext {
        /// The EPTP from the descriptor.
        eptp: u64,
    },
    /// Type 2: mappings of every EPTP.
    AllContexts,
}

/// What an INVVPID asks L0 to invalidate (SDM 31.3, INVVPID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VpidInvalidation {
    /// Type 0: one linear address of one VPID.
    IndividualAddress {
        /// VPID (not 0).
        vpid: u16,
        /// Canonical linear address.
        linear_address: u64,
    },
    /// Type 1: every mapping of one VPID.
    SingleContext {
        /// VPID (not 0).
        vpid: u16,
    },
    /// Type 2: every mapping of every VPID except 0.
    AllContexts,
    /// Type 3: every non-global mapping of one VPID.
    SingleContextRetainingGlobals {
        /// VPID (not 0).
        vpid: u16,
    },
}

/// Error writing IA32_FEATURE_CONTROL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeatureControlError {
    /// The MSR is locked (bit 0): WRMSR raises #GP until reset.
    #[error("IA32_FEATURE_CONTROL is locked; a write raises #GP(0) until the vCPU is reset")]
    Locked,
    /// Only bits 0-2 are implemented in this model.
    #[error("IA32_FEATURE_CONTROL value {0:#x} sets bits other than 0-2, which this model does not implement; the write raises #GP(0)")]
    ReservedBits(u64),
}

/// The current VMCS: its pointer, cached contents and launch state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CurrentVmcs {
    pointer: u64,
    vmcs: Vmcs12,
    launch: LaunchState,
    /// Bit 31 of the region's revision dword was set at VMPTRLD.
    shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Operation {
    Outside,
    Root {
        vmxon_pointer: u64,
        current: Option<CurrentVmcs>,
    },
}

/// How an instruction ends when it does not succeed (internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Invalid,
    Valid(VmInstructionError),
    Fault(VmxFault),
}

impl From<VmxFault> for Failure {
    fn from(f: VmxFault) -> Self {
        Failure::Fault(f)
    }
}

fn outcome_of(r: Result<(), Failure>) -> VmxOutcome {
    match r {
        Ok(()) => VmxOutcome::Succeed,
        Err(Failure::Invalid) => VmxOutcome::FailInvalid,
        Err(Failure::Valid(e)) => VmxOutcome::FailValid(e),
        Err(Failure::Fault(f)) => VmxOutcome::Fault(f),
    }
}

fn result_of<T>(r: Result<T, Failure>) -> InsnResult<T> {
    match r {
        Ok(v) => InsnResult::Succeed(v),
        Err(Failure::Invalid) => InsnResult::FailInvalid,
        Err(Failure::Valid(e)) => InsnResult::FailValid(e),
        Err(Failure::Fault(f)) => InsnResult::Fault(f),
    }
}

/// The capability MSR values the instructions consult.
struct CapView {
    cr0_fixed0: u64,
    cr0_fixed1: u64,
    cr4_fixed0: u64,
    cr4_fixed1: u64,
    /// Allowed-1 settings of the secondary processor-based controls (0 when
    /// "activate secondary controls" cannot be 1).
    secondary_allowed1: u32,
    ept_vpid_cap: u64,
}

impl CapView {
    fn of(caps: &VmxCapabilities) -> Self {
        // A missing MSR reads as 0: every fixed1 bit 0 and no feature, so a
        // capability set without it fails closed.
        let read = |index| caps.read_msr(index).unwrap_or(0);
        let primary_allowed1 = (read(msr::IA32_VMX_PROCBASED_CTLS) >> 32) as u32;
        let secondary_allowed1 = if primary_allowed1 & (1 << 31) != 0 {
            (read(msr::IA32_VMX_PROCBASED_CTLS2) >> 32) as u32
        } else {
            0
        };
        Self {
            cr0_fixed0: read(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: read(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: read(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: read(msr::IA32_VMX_CR4_FIXED1),
            secondary_allowed1,
            ept_vpid_cap: read(msr::IA32_VMX_EPT_VPID_CAP),
        }
    }

    /// SDM A.7/A.8: a bit set in FIXED0 must be 1, a bit clear in FIXED1
    /// must be 0.
    fn cr_valid(value: u64, fixed0: u64, fixed1: u64) -> bool {
        value & fixed0 == fixed0 && value & !fixed1 == 0
    }

    fn vmcs_shadowing(&self) -> bool {
        self.secondary_allowed1 & (1 << 14) != 0
    }

    /// INVEPT exists: "enable EPT" may be 1 and EPT_VPID_CAP bit 20.
    fn invept(&self) -> bool {
        self.secondary_allowed1 & (1 << 1) != 0 && self.ept_vpid_cap & (1 << 20) != 0
    }

    /// INVVPID exists: "enable VPID" may be 1 and EPT_VPID_CAP bit 32.
    fn invvpid(&self) -> bool {
        self.secondary_allowed1 & (1 << 5) != 0 && self.ept_vpid_cap & (1 << 32) != 0
    }

    /// INVEPT type 1 (bit 25) or 2 (bit 26) supported.
    fn invept_type(&self, t: u64) -> bool {
        match t {
            1 => self.ept_vpid_cap & (1 << 25) != 0,
            2 => self.ept_vpid_cap & (1 << 26) != 0,
            _ => false,
        }
    }

    /// INVVPID types 0-3 are EPT_VPID_CAP bits 40-43.
    fn invvpid_type(&self, t: u64) -> bool {
        t <= 3 && self.ept_vpid_cap & (1 << (40 + t)) != 0
    }
}

/// A register operand as the instruction sees it: 64 bits in 64-bit mode,
/// else the low 32 bits (SDM 31: INVEPT/INVVPID type, VMREAD/VMWRITE
/// encoding).
fn register_operand(ctx: &InsnContext, value: u64) -> u64 {
    if ctx.mode.is_64bit() {
        value
    } else {
        value & 0xffff_ffff
    }
}

fn canonical(addr: u64) -> bool {
    let shift = 64 - LINEAR_ADDRESS_BITS;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// One L1 vCPU's VMX state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmxCpu {
    caps: VmxCapabilities,
    feature_control: u64,
    operation: Operation,
}

impl VmxCpu {
    /// A vCPU outside VMX operation, with IA32_FEATURE_CONTROL as the
    /// capabilities report it (or [`FEATURE_CONTROL_DEFAULT`]).
    pub fn new(caps: VmxCapabilities) -> Self {
        let feature_control = caps
            .read_msr(msr::IA32_FEATURE_CONTROL)
            .unwrap_or(FEATURE_CONTROL_DEFAULT);
        Self {
            caps,
            feature_control,
            operation: Operation::Outside,
        }
    }

    /// The capabilities offered to L1.
    pub fn caps(&self) -> &VmxCapabilities {
        &self.caps
    }

    /// IA32_FEATURE_CONTROL as RDMSR returns it.
    pub fn feature_control(&self) -> u64 {
        self.feature_control
    }

    /// WRMSR to IA32_FEATURE_CONTROL: `Err` means L0 injects #GP(0).
    pub fn write_feature_control(&mut self, value: u64) -> Result<(), FeatureControlError> {
        if self.feature_control & FEATURE_CONTROL_LOCKED != 0 {
            return Err(FeatureControlError::Locked);
        }
        let implemented = FEATURE_CONTROL_LOCKED
            | FEATURE_CONTROL_VMXON_IN_SMX
            | FEATURE_CONTROL_VMXON_OUTSIDE_SMX;
        if value & !implemented != 0 {
            return Err(FeatureControlError::ReservedBits(value));
        }
        self.feature_control = value;
        Ok(())
    }

    /// Outside VMX operation or in root operation (with the VMXON pointer).
    pub fn vmx_operation(&self) -> VmxOperation {
        match &self.operation {
            Operation::Outside => VmxOperation::Outside,
            Operation::Root { vmxon_pointer, .. } => VmxOperation::Root {
                vmxon_pointer: *vmxon_pointer,
            },
        }
    }

    /// The current-VMCS pointer ([`INVALID_VMCS_POINTER`] when none).
    pub fn current_vmcs_pointer(&self) -> u64 {
        self.current()
            .map(|c| c.pointer)
            .unwrap_or(INVALID_VMCS_POINTER)
    }

    /// The cached current vmcs12.
    pub fn current_vmcs(&self) -> Option<&Vmcs12> {
        self.current().map(|c| &c.vmcs)
    }

    /// The cached current vmcs12, for L0's own writes (prepare_vmcs12 on a
    /// reflected exit).
    pub fn current_vmcs_mut(&mut self) -> Option<&mut Vmcs12> {
        self.current_mut().map(|c| &mut c.vmcs)
    }

    /// Launch state of the current VMCS.
    pub fn current_launch_state(&self) -> Option<LaunchState> {
        self.current().map(|c| c.launch)
    }

    /// Whether the current VMCS is a shadow VMCS.
    pub fn current_is_shadow(&self) -> bool {
        self.current().is_some_and(|c| c.shadow)
    }

    /// Writes the cached current vmcs12 back to its region (e.g. before a
    /// snapshot of guest memory). Nothing to do without a current VMCS.
    pub fn flush(&self, mem: &mut dyn GuestPhysMemory) -> Result<(), RegionError> {
        match self.current() {
            Some(c) => region::flush_region(mem, c.pointer, &c.vmcs, c.launch),
            None => Ok(()),
        }
    }

    /// Checks the invariants VMX operation maintains (used on a decoded
    /// snapshot): a 4 KiB-aligned, in-width VMXON pointer; a current VMCS
    /// pointer that is aligned, in width and not the VMXON pointer; a
    /// well-formed cached vmcs12.
    pub fn check_consistency(&self) -> Result<(), String> {
        let Operation::Root {
            vmxon_pointer,
            current,
        } = &self.operation
        else {
            return Ok(());
        };
        let ok = |pa: u64| pa & 0xfff == 0 && self.caps.pa_in_width(pa);
        if !ok(*vmxon_pointer) {
            return Err(format!(
                "VMXON pointer {vmxon_pointer:#x} is not 4 KiB aligned within the physical-address width"
            ));
        }
        if let Some(c) = current {
            if !ok(c.pointer) || c.pointer == *vmxon_pointer {
                return Err(format!(
                    "current-VMCS pointer {:#x} is misaligned, too wide or the VMXON pointer",
                    c.pointer
                ));
            }
            if !c.vmcs.is_well_formed() {
                return Err("cached vmcs12 does not hold one in-width value per field".into());
            }
        }
        Ok(())
    }

    fn current(&self) -> Option<&CurrentVmcs> {
        match &self.operation {
            Operation::Root { current, .. } => current.as_ref(),
            Operation::Outside => None,
        }
    }

    fn current_mut(&mut self) -> Option<&mut CurrentVmcs> {
        match &mut self.operation {
            Operation::Root { current, .. } => current.as_mut(),
            Operation::Outside => None,
        }
    }

    fn vmxon_pointer(&self) -> Option<u64> {
        match &self.operation {
            Operation::Root { vmxon_pointer, .. } => Some(*vmxon_pointer),
            Operation::Outside => None,
        }
    }

    /// VMfail(error) (SDM 31.2): VMfailValid with the error stored in the
    /// current VMCS when there is one, else VMfailInvalid.
    fn vmfail(&mut self, error: VmInstructionError) -> Failure {
        match self.current_mut() {
            Some(c) => {
                c.vmcs
                    .set(VmcsField::VM_INSTRUCTION_ERROR, u64::from(error.number()));
                Failure::Valid(error)
            }
            None => Failure::Invalid,
        }
    }

    /// The #UD and #GP checks an instruction makes before it reads any
    /// memory operand (SDM 31.3, the first lines of each pseudo-code).
    pub fn check_access(&self, insn: VmxInstruction, ctx: &InsnContext) -> Result<(), VmxFault> {
        let caps = CapView::of(&self.caps);
        if insn == VmxInstruction::Vmxon {
            if ctx.mode.vmx_instructions_undefined() || !ctx.vmxe {
                return Err(VmxFault::InvalidOpcode);
            }
            if ctx.cpl > 0 {
                return Err(VmxFault::GeneralProtection);
            }
            if self.vmxon_pointer().is_none() {
                let fc = self.feature_control;
                // Never in SMX operation here, so bit 2 is the one that counts.
                let fc_ok =
                    fc & FEATURE_CONTROL_LOCKED != 0 && fc & FEATURE_CONTROL_VMXON_OUTSIDE_SMX != 0;
                // SDM 24.8 / A.7-A.8: CR0 and CR4 must satisfy the fixed MSRs.
                let cr_ok = CapView::cr_valid(ctx.cr0, caps.cr0_fixed0, caps.cr0_fixed1)
                    && CapView::cr_valid(ctx.effective_cr4(), caps.cr4_fixed0, caps.cr4_fixed1);
                if !fc_ok || !cr_ok {
                    return Err(VmxFault::GeneralProtection);
                }
            }
            return Ok(());
        }
        if self.vmxon_pointer().is_none() || ctx.mode.vmx_instructions_undefined() {
            return Err(VmxFault::InvalidOpcode);
        }
        // INVEPT/INVVPID do not exist on a CPU without them (SDM 31.3,
        // "Protected Mode Exceptions").
        let missing = match insn {
            VmxInstruction::Invept => !caps.invept(),
            VmxInstruction::Invvpid => !caps.invvpid(),
            _ => false,
        };
        if missing {
            return Err(VmxFault::InvalidOpcode);
        }
        if ctx.cpl > 0 {
            return Err(VmxFault::GeneralProtection);
        }
        Ok(())
    }

    /// VMXON with the pointer read from its memory operand.
    ///
    /// In root operation VMXON does not read its operand; `vmxon_pointer`
    /// is then ignored.
    pub fn vmxon(
        &mut self,
        ctx: &InsnContext,
        mem: &dyn GuestPhysMemory,
        vmxon_pointer: u64,
    ) -> VmxOutcome {
        let r = self.vmxon_inner(ctx, mem, vmxon_pointer);
        outcome_of(r)
    }

    fn vmxon_inner(
        &mut self,
        ctx: &InsnContext,
        mem: &dyn GuestPhysMemory,
        ptr: u64,
    ) -> Result<(), Failure> {
        self.check_access(VmxInstruction::Vmxon, ctx)?;
        if self.vmxon_pointer().is_some() {
            return Err(self.vmfail(VmInstructionError::VmxonInVmxRoot));
        }
        if ptr & 0xfff != 0 || !self.caps.pa_in_width(ptr) {
            return Err(Failure::Invalid);
        }
        // A region outside guest RAM fails like a bad revision (KVM:
        // kvm_read_guest failure -> nested_vmx_failInvalid).
        let rev = region::read_revision(mem, ptr).map_err(|_| Failure::Invalid)?;
        if rev != self.caps.vmcs_revision_id() {
            // Covers bit 31 set as well: the VMXON region is never a shadow.
            return Err(Failure::Invalid);
        }
        self.operation = Operation::Root {
            vmxon_pointer: ptr,
            current: None,
        };
        Ok(())
    }

    /// VMXOFF. Leaving VMX operation writes the cached vmcs12 back (KVM
    /// `free_nested` -> `nested_release_vmcs12`).
    pub fn vmxoff(&mut self, ctx: &InsnContext, mem: &mut dyn GuestPhysMemory) -> VmxOutcome {
        let r = self
            .check_access(VmxInstruction::Vmxoff, ctx)
            .map_err(Failure::from);
        if r.is_ok() {
            // A write-back into memory that is gone is dropped, as hardware
            // drops writes to non-existent memory; L0 can call `flush` first
            // to see the error.
            let _ = self.flush(mem);
            self.operation = Operation::Outside;
        }
        outcome_of(r)
    }

    /// VMCLEAR with the pointer read from its memory operand.
    pub fn vmclear(
        &mut self,
        ctx: &InsnContext,
        mem: &mut dyn GuestPhysMemory,
        vmcs_pointer: u64,
    ) -> VmxOutcome {
        let r = self.vmclear_inner(ctx, mem, vmcs_pointer);
        outcome_of(r)
    }

    fn vmclear_inner(
        &mut self,
        ctx: &InsnContext,
        mem: &mut dyn GuestPhysMemory,
        ptr: u64,
    ) -> Result<(), Failure> {
        self.check_access(VmxInstruction::Vmclear, ctx)?;
        if ptr & 0xfff != 0 || !self.caps.pa_in_width(ptr) {
            return Err(self.vmfail(VmInstructionError::VmclearInvalidAddress));
        }
        if Some(ptr) == self.vmxon_pointer() {
            return Err(self.vmfail(VmInstructionError::VmclearVmxonPointer));
        }
        // Writes into memory outside guest RAM are dropped (KVM ignores
        // the kvm_vcpu_write_guest result in handle_vmclear).
        if self.current_vmcs_pointer() == ptr {
            if let Operation::Root { current, .. } = &mut self.operation {
                if let Some(c) = current.take() {
                    let _ = region::flush_region(mem, c.pointer, &c.vmcs, LaunchState::Clear);
                }
            }
        } else {
            let _ = region::clear_region(mem, ptr);
        }
        Ok(())
    }

    /// VMPTRLD with the pointer read from its memory operand.
    pub fn vmptrld(
        &mut self,
        ctx: &InsnContext,
        mem: &mut dyn GuestPhysMemory,
        vmcs_pointer: u64,
    ) -> VmxOutcome {
        let r = self.vmptrld_inner(ctx, mem, vmcs_pointer);
        outcome_of(r)
    }

    fn vmptrld_inner(
        &mut self,
        ctx: &InsnContext,
        mem: &mut dyn GuestPhysMemory,
        ptr: u64,
    ) -> Result<(), Failure> {
        self.check_access(VmxInstruction::Vmptrld, ctx)?;
        if ptr & 0xfff != 0 || !self.caps.pa_in_width(ptr) {
            return Err(self.vmfail(VmInstructionError::VmptrldInvalidAddress));
        }
        if Some(ptr) == self.vmxon_pointer() {
            return Err(self.vmfail(VmInstructionError::VmptrldVmxonPointer));
        }
        // A region outside guest RAM: KVM fails kvm_vcpu_map and reports
        // VMPTRLD with invalid physical address.
        let Ok(rev) = region::read_revision(mem, ptr) else {
            return Err(self.vmfail(VmInstructionError::VmptrldInvalidAddress));
        };
        let shadow = rev & SHADOW_VMCS_INDICATOR != 0;
        let caps = CapView::of(&self.caps);
        if rev & !SHADOW_VMCS_INDICATOR != self.caps.vmcs_revision_id()
            || (shadow && !caps.vmcs_shadowing())
        {
            return Err(self.vmfail(VmInstructionError::VmptrldIncorrectRevisionId));
        }
        if self.current_vmcs_pointer() == ptr {
            // Already current: the cache is the truth, nothing to reload.
            if let Some(c) = self.current_mut() {
                c.shadow = shadow;
            }
            return Ok(());
        }
        let (vmcs, launch) = match region::load_region(mem, ptr) {
            Ok(loaded) => loaded,
            Err(RegionError::OutOfRange(_)) => {
                return Err(self.vmfail(VmInstructionError::VmptrldInvalidAddress));
            }
            // Never VMCLEARed by this model (the SDM leaves this undefined):
            // start from an all-zero, clear VMCS.
            Err(RegionError::UnknownLayout { .. } | RegionError::BadLaunchState { .. }) => {
                (Vmcs12::new(), LaunchState::Clear)
            }
        };
        if let Operation::Root { current, .. } = &mut self.operation {
            if let Some(old) = current.take() {
                let _ = region::flush_region(mem, old.pointer, &old.vmcs, old.launch);
            }
            *current = Some(CurrentVmcs {
                pointer: ptr,
                vmcs,
                launch,
                shadow,
            });
        }
        Ok(())
    }

    /// VMPTRST: the current-VMCS pointer to store into the memory operand.
    pub fn vmptrst(&mut self, ctx: &InsnContext) -> InsnResult<u64> {
        let r = self
            .check_access(VmxInstruction::Vmptrst, ctx)
            .map(|()| self.current_vmcs_pointer())
            .map_err(Failure::from);
        result_of(r)
    }

    /// Resolves a VMREAD/VMWRITE encoding operand (32 bits wide outside
    /// 64-bit mode).
    fn resolve(&mut self, ctx: &InsnContext, encoding: u64) -> Result<FieldAccess, Failure> {
        FieldAccess::resolve(register_operand(ctx, encoding))
            .map_err(|_| self.vmfail(VmInstructionError::UnsupportedVmcsComponent))
    }

    /// VMREAD of the field named by `encoding` (the register operand).
    ///
    /// The value is what goes into the destination operand: zero-extended
    /// to 64 bits in 64-bit mode, the low 32 bits elsewhere (SDM 31.3).
    pub fn vmread(&mut self, ctx: &InsnContext, encoding: u64) -> InsnResult<u64> {
        let r = self.vmread_inner(ctx, encoding);
        result_of(r)
    }

    fn vmread_inner(&mut self, ctx: &InsnContext, encoding: u64) -> Result<u64, Failure> {
        self.check_access(VmxInstruction::Vmread, ctx)?;
        if self.current().is_none() {
            return Err(Failure::Invalid);
        }
        let access = self.resolve(ctx, encoding)?;
        let value = self.current().map_or(0, |c| c.vmcs.read_access(access));
        Ok(register_operand(ctx, value))
    }

    /// VMWRITE of `value` (the source operand) to the field named by
    /// `encoding`. Outside 64-bit mode the source is 32 bits and is
    /// zero-extended into 64-bit and natural-width fields; a source wider
    /// than the field loses its high bits (SDM 31.3, 24.11.2).
    pub fn vmwrite(&mut self, ctx: &InsnContext, encoding: u64, value: u64) -> VmxOutcome {
        let r = self.vmwrite_inner(ctx, encoding, value);
        outcome_of(r)
    }

    fn vmwrite_inner(
        &mut self,
        ctx: &InsnContext,
        encoding: u64,
        value: u64,
    ) -> Result<(), Failure> {
        self.check_access(VmxInstruction::Vmwrite, ctx)?;
        if self.current().is_none() {
            return Err(Failure::Invalid);
        }
        let access = self.resolve(ctx, encoding)?;
        if access.field.is_read_only() && !self.caps.vmwrite_any_field {
            return Err(self.vmfail(VmInstructionError::VmwriteReadOnlyComponent));
        }
        let value = if ctx.mode.is_64bit() && access.access == AccessType::Full {
            value
        } else {
            value & 0xffff_ffff
        };
        if let Some(c) = self.current_mut() {
            c.vmcs.write_access(access, value);
        }
        Ok(())
    }

    /// VMLAUNCH: instruction checks, then the VM-entry checks.
    pub fn vmlaunch(&mut self, ctx: &InsnContext, mem: &dyn GuestPhysMemory) -> EntryResult {
        self.vm_entry(ctx, mem, true)
    }

    /// VMRESUME: instruction checks, then the VM-entry checks.
    pub fn vmresume(&mut self, ctx: &InsnContext, mem: &dyn GuestPhysMemory) -> EntryResult {
        self.vm_entry(ctx, mem, false)
    }

    fn vm_entry(
        &mut self,
        ctx: &InsnContext,
        mem: &dyn GuestPhysMemory,
        launch: bool,
    ) -> EntryResult {
        let insn = if launch {
            VmxInstruction::Vmlaunch
        } else {
            VmxInstruction::Vmresume
        };
        let checked = self.entry_instruction_checks(ctx, insn, launch);
        let fail = match checked {
            Ok(()) => None,
            Err(Failure::Invalid) => Some(EntryResult::FailInvalid),
            Err(Failure::Valid(e)) => Some(EntryResult::FailValid(e)),
            Err(Failure::Fault(f)) => Some(EntryResult::Fault(f)),
        };
        if let Some(fail) = fail {
            return fail;
        }
        let Some(current) = self.current() else {
            return EntryResult::FailInvalid;
        };
        // SDM 27.2 (controls, host state) then 27.3 (guest state). L1 is in
        // IA-32e mode exactly when it executes in 64-bit mode here
        // (compatibility mode already raised #UD); the VMCS link pointer
        // must not be the current-VMCS pointer (SDM 27.3.1.5).
        let cx = EntryContext {
            l1_ia32e: matches!(ctx.mode, CpuMode::Long64 | CpuMode::Compatibility),
            current_vmcs: Some(current.pointer),
        };
        match check_vm_entry_in(&current.vmcs, &self.caps, mem, &cx) {
            Ok(()) => {
                if let Some(c) = self.current_mut() {
                    if launch {
                        c.launch = LaunchState::Launched;
                    }
                }
                EntryResult::EnterL2
            }
            // Controls -> VMfailValid(7), host state -> VMfailValid(8)
            // (SDM 27.2); guest state -> VM-entry failure (SDM 27.8).
            Err(failure) => match failure.vm_instruction_error() {
                Some(error) => self.entry_fail_valid(error),
                None => EntryResult::EntryFailure {
                    exit_reason: EXIT_REASON_INVALID_GUEST_STATE | EXIT_REASON_FAILED_VMENTRY,
                    exit_qualification: failure.exit_qualification().unwrap_or(0),
                },
            },
        }
    }

    fn entry_fail_valid(&mut self, error: VmInstructionError) -> EntryResult {
        match self.vmfail(error) {
            Failure::Valid(e) => EntryResult::FailValid(e),
            Failure::Invalid => EntryResult::FailInvalid,
            Failure::Fault(f) => EntryResult::Fault(f),
        }
    }

    /// SDM 31.3 VMLAUNCH/VMRESUME, up to "check settings of VMX controls".
    fn entry_instruction_checks(
        &mut self,
        ctx: &InsnContext,
        insn: VmxInstruction,
        launch: bool,
    ) -> Result<(), Failure> {
        self.check_access(insn, ctx)?;
        let (state, shadow) = match self.current() {
            Some(c) => (c.launch, c.shadow),
            None => return Err(Failure::Invalid),
        };
        // SDM 27.1: a shadow VMCS cannot be entered.
        if shadow {
            return Err(Failure::Invalid);
        }
        if ctx.blocked_by_mov_ss {
            return Err(self.vmfail(VmInstructionError::EntryEventsBlockedByMovSs));
        }
        if launch && state != LaunchState::Clear {
            return Err(self.vmfail(VmInstructionError::VmlaunchNonClearVmcs));
        }
        if !launch && state != LaunchState::Launched {
            return Err(self.vmfail(VmInstructionError::VmresumeNonLaunchedVmcs));
        }
        Ok(())
    }

    /// INVEPT with the type from its register operand and the 128-bit
    /// descriptor read from memory (`descriptor[0]` = EPTP).
    pub fn invept(
        &mut self,
        ctx: &InsnContext,
        invept_type: u64,
        descriptor: [u64; 2],
    ) -> InsnResult<EptInvalidation> {
        let r = self.invept_inner(ctx, invept_type, descriptor);
        result_of(r)
    }

    fn invept_inner(
        &mut self,
        ctx: &InsnContext,
        invept_type: u64,
        descriptor: [u64; 2],
    ) -> Result<EptInvalidation, Failure> {
        self.check_access(VmxInstruction::Invept, ctx)?;
        let caps = CapView::of(&self.caps);
        let t = register_operand(ctx, invept_type);
        if !caps.invept_type(t) {
            return Err(self.vmfail(VmInstructionError::InvalidInveptInvvpidOperand));
        }
        if t == 2 {
            return Ok(EptInvalidation::AllContexts);
        }
        let eptp = descriptor[0];
        // SDM 31 INVEPT: the descriptor's EPTP must pass the VM-entry
        // EPTP checks (one implementation: `entry::check_eptp`).
        if check_eptp(&self.caps, eptp).is_err() {
            return Err(self.vmfail(VmInstructionError::InvalidInveptInvvpidOperand));
        }
        Ok(EptInvalidation::SingleContext { eptp })
    }

    /// INVVPID with the type from its register operand and the 128-bit
    /// descriptor read from memory (`descriptor[0]` bits 15:0 = VPID, bits
    /// 63:16 reserved; `descriptor[1]` = linear address).
    pub fn invvpid(
        &mut self,
        ctx: &InsnContext,
        invvpid_type: u64,
        descriptor: [u64; 2],
    ) -> InsnResult<VpidInvalidation> {
        let r = self.invvpid_inner(ctx, invvpid_type, descriptor);
        result_of(r)
    }

    fn invvpid_inner(
        &mut self,
        ctx: &InsnContext,
        invvpid_type: u64,
        descriptor: [u64; 2],
    ) -> Result<VpidInvalidation, Failure> {
        self.check_access(VmxInstruction::Invvpid, ctx)?;
        let caps = CapView::of(&self.caps);
        let t = register_operand(ctx, invvpid_type);
        let bad = VmInstructionError::InvalidInveptInvvpidOperand;
        if !caps.invvpid_type(t) || descriptor[0] >> 16 != 0 {
            return Err(self.vmfail(bad));
        }
        let vpid = (descriptor[0] & 0xffff) as u16;
        let linear_address = descriptor[1];
        match t {
            0 if vpid == 0 || !canonical(linear_address) => Err(self.vmfail(bad)),
            0 => Ok(VpidInvalidation::IndividualAddress {
                vpid,
                linear_address,
            }),
            2 => Ok(VpidInvalidation::AllContexts),
            _ if vpid == 0 => Err(self.vmfail(bad)),
            1 => Ok(VpidInvalidation::SingleContext { vpid }),
            _ => Ok(VpidInvalidation::SingleContextRetainingGlobals { vpid }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::ControlMsr;
    use crate::controls::{EntryControls, ExitControls, SecondaryProcBased};
    use crate::mem::FlatMemory;
    use crate::outcome::VmInstructionError as E;
    use crate::region::{flush_region, load_region};
    use proptest::prelude::*;

    const VMXON_PA: u64 = 0x1000;
    const VMCS_A: u64 = 0x2000;
    const VMCS_B: u64 = 0x3000;
    const BLANK: u64 = 0x4000;
    const RAM: usize = 0x10000;
    const CR0: u64 = 0x8000_0031; // PE | ET | NE | PG
    const CR4: u64 = 0x20; // PAE

    fn ctx64() -> InsnContext {
        InsnContext {
            cpl: 0,
            mode: CpuMode::Long64,
            cr0: CR0,
            cr4: CR4,
            vmxe: true,
            blocked_by_mov_ss: false,
        }
    }

    fn ctx32() -> InsnContext {
        InsnContext {
            mode: CpuMode::Protected,
            ..ctx64()
        }
    }

    fn with_mode(mode: CpuMode) -> InsnContext {
        InsnContext { mode, ..ctx64() }
    }

    fn cpl3() -> InsnContext {
        InsnContext { cpl: 3, ..ctx64() }
    }

    fn memory() -> FlatMemory {
        let mut m = FlatMemory::new(RAM);
        for pa in [VMXON_PA, VMCS_A, VMCS_B, BLANK] {
            m.write_u32(pa, crate::caps::VMCS_REVISION_ID).unwrap();
        }
        m
    }

    /// Outside VMX operation, default capabilities.
    fn fresh() -> (VmxCpu, FlatMemory) {
        (VmxCpu::new(VmxCapabilities::default()), memory())
    }

    /// In root operation, no current VMCS.
    fn root() -> (VmxCpu, FlatMemory) {
        let (mut cpu, mem) = fresh();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        (cpu, mem)
    }

    /// In root operation with VMCS_A current (VMCLEARed, then loaded).
    fn current() -> (VmxCpu, FlatMemory) {
        let (mut cpu, mut mem) = root();
        assert_eq!(cpu.vmclear(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        (cpu, mem)
    }

    fn error_field(cpu: &VmxCpu) -> u64 {
        cpu.current_vmcs()
            .map(|v| v.get(VmcsField::VM_INSTRUCTION_ERROR))
            .unwrap_or(u64::MAX)
    }

    fn caps_with(f: impl FnOnce(&mut VmxCapabilities)) -> VmxCapabilities {
        let mut c = VmxCapabilities::default();
        f(&mut c);
        c
    }

    /// A 64-bit guest and 64-bit host VMCS with controls at their
    /// must-be-1 settings from the TRUE MSRs, as an L1 writes it.
    fn valid_vmcs(caps: &VmxCapabilities) -> Vmcs12 {
        use VmcsField as F;
        let mut v = Vmcs12::new();
        let must = |c| u64::from(caps.control_settings(c).0);
        v.set(F::PIN_BASED_VM_EXEC_CONTROL, must(ControlMsr::PinBased));
        v.set(
            F::CPU_BASED_VM_EXEC_CONTROL,
            must(ControlMsr::PrimaryProcBased),
        );
        v.set(
            F::VM_EXIT_CONTROLS,
            must(ControlMsr::Exit) | u64::from(ExitControls::HOST_ADDR_SPACE_SIZE.bits()),
        );
        v.set(
            F::VM_ENTRY_CONTROLS,
            must(ControlMsr::Entry) | u64::from(EntryControls::IA32E_MODE_GUEST.bits()),
        );
        v.set(F::HOST_CR0, CR0);
        v.set(F::HOST_CR4, CR4 | CR4_VMXE);
        v.set(F::HOST_CR3, 0x5000);
        v.set(F::HOST_CS_SELECTOR, 0x08);
        for f in [
            F::HOST_SS_SELECTOR,
            F::HOST_DS_SELECTOR,
            F::HOST_ES_SELECTOR,
            F::HOST_FS_SELECTOR,
            F::HOST_GS_SELECTOR,
        ] {
            v.set(f, 0x10);
        }
        v.set(F::HOST_TR_SELECTOR, 0x18);
        v.set(F::HOST_RIP, 0x40_0000);
        v.set(F::HOST_RSP, 0x8000);
        v.set(F::GUEST_CR0, CR0);
        v.set(F::GUEST_CR4, CR4 | CR4_VMXE);
        v.set(F::GUEST_CR3, 0x5000);
        v.set(F::GUEST_DR7, 0x400);
        v.set(F::GUEST_IA32_EFER, 0x500);
        use crate::entry::Seg;
        let mut seg = |s: Seg, sel: u64, limit: u64, ar: u64| {
            let (fs, _, fl, fa) = s.fields();
            v.set(fs, sel);
            v.set(fl, limit);
            v.set(fa, ar);
        };
        seg(Seg::Cs, 0x08, 0xffff_ffff, 0xa09b);
        for s in [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
            seg(s, 0x10, 0xffff_ffff, 0xc093);
        }
        seg(Seg::Tr, 0x18, 0x67, 0x8b);
        seg(Seg::Ldtr, 0, 0, 0x1_0000);
        v.set(F::GUEST_GDTR_LIMIT, 0x27);
        v.set(F::GUEST_IDTR_LIMIT, 0xfff);
        v.set(F::GUEST_RIP, 0x1000);
        v.set(F::GUEST_RSP, 0x8000);
        v.set(F::GUEST_RFLAGS, 0x2);
        v.set(F::VMCS_LINK_POINTER, u64::MAX);
        v
    }

    /// `current()` with a valid VMCS in the cache.
    fn ready() -> (VmxCpu, FlatMemory) {
        let (mut cpu, mem) = current();
        let v = valid_vmcs(cpu.caps());
        if let Some(c) = cpu.current_vmcs_mut() {
            *c = v;
        }
        (cpu, mem)
    }

    // ---- modes and common checks ----

    #[test]
    fn test_cpu_mode_from_registers() {
        assert_eq!(CpuMode::from_registers(0, 0, 0, false), CpuMode::Real);
        assert_eq!(
            CpuMode::from_registers(1, RFLAGS_VM, 0, false),
            CpuMode::Virtual8086
        );
        assert_eq!(CpuMode::from_registers(1, 2, 0, false), CpuMode::Protected);
        assert_eq!(
            CpuMode::from_registers(CR0, 2, 0x500, false),
            CpuMode::Compatibility
        );
        assert_eq!(
            CpuMode::from_registers(CR0, 2, 0x500, true),
            CpuMode::Long64
        );
    }

    #[test]
    fn test_instructions_outside_vmx_operation_ud() {
        let (mut cpu, mut mem) = fresh();
        let ud = VmxOutcome::Fault(VmxFault::InvalidOpcode);
        let c = ctx64();
        assert_eq!(cpu.vmxoff(&c, &mut mem), ud);
        assert_eq!(cpu.vmclear(&c, &mut mem, VMCS_A), ud);
        assert_eq!(cpu.vmptrld(&c, &mut mem, VMCS_A), ud);
        assert_eq!(cpu.vmptrst(&c).outcome(), ud);
        assert_eq!(cpu.vmread(&c, 0x681e).outcome(), ud);
        assert_eq!(cpu.vmwrite(&c, 0x681e, 1), ud);
        assert_eq!(
            cpu.vmlaunch(&c, &mem),
            EntryResult::Fault(VmxFault::InvalidOpcode)
        );
        assert_eq!(
            cpu.vmresume(&c, &mem),
            EntryResult::Fault(VmxFault::InvalidOpcode)
        );
        assert_eq!(cpu.invept(&c, 2, [0, 0]).outcome(), ud);
        assert_eq!(cpu.invvpid(&c, 2, [0, 0]).outcome(), ud);
        assert_eq!(cpu.vmx_operation(), VmxOperation::Outside);
    }

    #[test]
    fn test_instructions_in_real_v8086_compat_mode_ud() {
        for mode in [CpuMode::Real, CpuMode::Virtual8086, CpuMode::Compatibility] {
            let (mut cpu, mut mem) = current();
            let c = with_mode(mode);
            let ud = VmxOutcome::Fault(VmxFault::InvalidOpcode);
            assert_eq!(cpu.vmclear(&c, &mut mem, VMCS_B), ud, "{mode:?}");
            assert_eq!(cpu.vmptrld(&c, &mut mem, VMCS_B), ud, "{mode:?}");
            assert_eq!(cpu.vmptrst(&c).outcome(), ud);
            assert_eq!(cpu.vmread(&c, 0x681e).outcome(), ud);
            assert_eq!(cpu.vmwrite(&c, 0x681e, 1), ud);
            assert_eq!(
                cpu.vmlaunch(&c, &mem),
                EntryResult::Fault(VmxFault::InvalidOpcode)
            );
            assert_eq!(cpu.invept(&c, 2, [0, 0]).outcome(), ud);
            assert_eq!(cpu.invvpid(&c, 2, [0, 0]).outcome(), ud);
            assert_eq!(cpu.vmxoff(&c, &mut mem), ud);
            // Nothing changed.
            assert_eq!(cpu.current_vmcs_pointer(), VMCS_A);
        }
    }

    #[test]
    fn test_instructions_in_32bit_protected_mode_succeed() {
        let (mut cpu, mut mem) = fresh();
        let c = ctx32();
        assert_eq!(cpu.vmxon(&c, &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(cpu.vmclear(&c, &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&c, &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrst(&c), InsnResult::Succeed(VMCS_A));
        assert_eq!(cpu.vmwrite(&c, 0x681e, 0x1234), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&c, 0x681e), InsnResult::Succeed(0x1234));
        assert_eq!(cpu.vmxoff(&c, &mut mem), VmxOutcome::Succeed);
    }

    #[test]
    fn test_instructions_cpl3_gp() {
        let (mut cpu, mut mem) = current();
        let gp = VmxOutcome::Fault(VmxFault::GeneralProtection);
        let c = cpl3();
        assert_eq!(cpu.vmxon(&c, &mem, VMXON_PA), gp);
        assert_eq!(cpu.vmclear(&c, &mut mem, VMCS_B), gp);
        assert_eq!(cpu.vmptrld(&c, &mut mem, VMCS_B), gp);
        assert_eq!(cpu.vmptrst(&c).outcome(), gp);
        assert_eq!(cpu.vmread(&c, 0x681e).outcome(), gp);
        assert_eq!(cpu.vmwrite(&c, 0x681e, 1), gp);
        assert_eq!(
            cpu.vmlaunch(&c, &mem),
            EntryResult::Fault(VmxFault::GeneralProtection)
        );
        assert_eq!(
            cpu.vmresume(&c, &mem),
            EntryResult::Fault(VmxFault::GeneralProtection)
        );
        assert_eq!(cpu.invept(&c, 2, [0, 0]).outcome(), gp);
        assert_eq!(cpu.invvpid(&c, 2, [0, 0]).outcome(), gp);
        assert_eq!(cpu.vmxoff(&c, &mut mem), gp);
        assert_eq!(cpu.current_vmcs_pointer(), VMCS_A);
        assert_eq!(error_field(&cpu), 0);
    }

    #[test]
    fn test_check_access_precedes_operand_read() {
        let (cpu, _) = fresh();
        assert_eq!(
            cpu.check_access(VmxInstruction::Vmptrld, &ctx64()),
            Err(VmxFault::InvalidOpcode)
        );
        let (cpu, _) = root();
        assert_eq!(cpu.check_access(VmxInstruction::Vmptrld, &ctx64()), Ok(()));
        assert_eq!(
            cpu.check_access(VmxInstruction::Vmptrld, &cpl3()),
            Err(VmxFault::GeneralProtection)
        );
    }

    // ---- VMXON ----

    #[test]
    fn test_vmxon_succeeds_and_enters_root() {
        let (mut cpu, mem) = fresh();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(
            cpu.vmx_operation(),
            VmxOperation::Root {
                vmxon_pointer: VMXON_PA
            }
        );
        assert_eq!(cpu.current_vmcs_pointer(), INVALID_VMCS_POINTER);
    }

    #[test]
    fn test_vmxon_mode_and_vmxe_ud() {
        for c in [
            with_mode(CpuMode::Real),
            with_mode(CpuMode::Virtual8086),
            with_mode(CpuMode::Compatibility),
            InsnContext {
                vmxe: false,
                ..ctx64()
            },
        ] {
            let (mut cpu, mem) = fresh();
            assert_eq!(
                cpu.vmxon(&c, &mem, VMXON_PA),
                VmxOutcome::Fault(VmxFault::InvalidOpcode),
                "{c:?}"
            );
            assert_eq!(cpu.vmx_operation(), VmxOperation::Outside);
        }
    }

    #[test]
    fn test_vmxon_vmxe_from_virtual_bit_not_cr4() {
        // The real CR4 lacks VMXE (KVM refuses it); the virtual bit counts.
        let (mut cpu, mem) = fresh();
        let c = InsnContext {
            cr4: CR4 & !CR4_VMXE,
            vmxe: true,
            ..ctx64()
        };
        assert_eq!(cpu.vmxon(&c, &mem, VMXON_PA), VmxOutcome::Succeed);
    }

    #[test]
    fn test_vmxon_cpl3_gp() {
        let (mut cpu, mem) = fresh();
        assert_eq!(
            cpu.vmxon(&cpl3(), &mem, VMXON_PA),
            VmxOutcome::Fault(VmxFault::GeneralProtection)
        );
    }

    #[test]
    fn test_vmxon_feature_control_unlocked_gp() {
        let (mut cpu, mem) = fresh();
        cpu.feature_control = FEATURE_CONTROL_VMXON_OUTSIDE_SMX;
        assert_eq!(
            cpu.vmxon(&ctx64(), &mem, VMXON_PA),
            VmxOutcome::Fault(VmxFault::GeneralProtection)
        );
        // Locking it (allowed while unlocked) makes VMXON work.
        assert_eq!(cpu.write_feature_control(FEATURE_CONTROL_DEFAULT), Ok(()));
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
    }

    #[test]
    fn test_vmxon_feature_control_outside_smx_clear_gp() {
        let (mut cpu, mem) = fresh();
        cpu.feature_control = FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_IN_SMX;
        assert_eq!(
            cpu.vmxon(&ctx64(), &mem, VMXON_PA),
            VmxOutcome::Fault(VmxFault::GeneralProtection)
        );
    }

    #[test]
    fn test_feature_control_write_rules() {
        let (mut cpu, _) = fresh();
        assert_eq!(cpu.feature_control(), FEATURE_CONTROL_DEFAULT);
        assert_eq!(
            cpu.write_feature_control(0),
            Err(FeatureControlError::Locked)
        );
        cpu.feature_control = 0;
        assert_eq!(
            cpu.write_feature_control(1 << 8),
            Err(FeatureControlError::ReservedBits(1 << 8))
        );
        assert_eq!(
            cpu.write_feature_control(FEATURE_CONTROL_VMXON_OUTSIDE_SMX),
            Ok(())
        );
        assert_eq!(cpu.feature_control(), FEATURE_CONTROL_VMXON_OUTSIDE_SMX);
    }

    #[test]
    fn test_vmxon_cr0_fixed_bits_gp() {
        // NE (fixed0) clear, then a bit above 31 (not in fixed1).
        for cr0 in [CR0 & !(1 << 5), CR0 | (1 << 40)] {
            let (mut cpu, mem) = fresh();
            let c = InsnContext { cr0, ..ctx64() };
            assert_eq!(
                cpu.vmxon(&c, &mem, VMXON_PA),
                VmxOutcome::Fault(VmxFault::GeneralProtection),
                "{cr0:#x}"
            );
        }
    }

    #[test]
    fn test_vmxon_cr4_fixed1_violation_gp() {
        // LA57 (bit 12) is not offered by this model's CR4_FIXED1.
        let (mut cpu, mem) = fresh();
        assert_eq!(cpu.caps().cr4_fixed1() & (1 << 12), 0);
        let c = InsnContext {
            cr4: CR4 | (1 << 12),
            ..ctx64()
        };
        assert_eq!(
            cpu.vmxon(&c, &mem, VMXON_PA),
            VmxOutcome::Fault(VmxFault::GeneralProtection)
        );
    }

    #[test]
    fn test_vmxon_twice_without_current_fails_invalid() {
        let (mut cpu, mem) = root();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::FailInvalid);
    }

    #[test]
    fn test_vmxon_twice_with_current_fails_valid_15() {
        let (mut cpu, mem) = current();
        assert_eq!(
            cpu.vmxon(&ctx64(), &mem, VMXON_PA),
            VmxOutcome::FailValid(E::VmxonInVmxRoot)
        );
        assert_eq!(error_field(&cpu), 15);
    }

    #[test]
    fn test_vmxon_in_root_cpl3_gp() {
        let (mut cpu, mem) = current();
        assert_eq!(
            cpu.vmxon(&cpl3(), &mem, VMXON_PA),
            VmxOutcome::Fault(VmxFault::GeneralProtection)
        );
    }

    #[test]
    fn test_vmxon_bad_pointer_fails_invalid() {
        let width = VmxCapabilities::default().phys_addr_width;
        for ptr in [VMXON_PA + 8, 1 << width, u64::MAX] {
            let (mut cpu, mem) = fresh();
            assert_eq!(
                cpu.vmxon(&ctx64(), &mem, ptr),
                VmxOutcome::FailInvalid,
                "{ptr:#x}"
            );
            assert_eq!(cpu.vmx_operation(), VmxOperation::Outside);
        }
    }

    #[test]
    fn test_vmxon_wrong_revision_fails_invalid() {
        let (mut cpu, mut mem) = fresh();
        mem.write_u32(VMXON_PA, 0x1234).unwrap();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::FailInvalid);
        // Right identifier but the shadow bit set.
        mem.write_u32(
            VMXON_PA,
            crate::caps::VMCS_REVISION_ID | SHADOW_VMCS_INDICATOR,
        )
        .unwrap();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::FailInvalid);
        assert_eq!(cpu.vmx_operation(), VmxOperation::Outside);
    }

    #[test]
    fn test_vmxon_region_outside_ram_fails_invalid() {
        let (mut cpu, mem) = fresh();
        assert_eq!(
            cpu.vmxon(&ctx64(), &mem, RAM as u64 + 0x1000),
            VmxOutcome::FailInvalid
        );
    }

    // ---- VMXOFF ----

    #[test]
    fn test_vmxoff_leaves_vmx_operation_and_flushes() {
        let (mut cpu, mut mem) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 0xabc), VmxOutcome::Succeed);
        assert_eq!(cpu.vmxoff(&ctx64(), &mut mem), VmxOutcome::Succeed);
        assert_eq!(cpu.vmx_operation(), VmxOperation::Outside);
        assert_eq!(cpu.current_vmcs_pointer(), INVALID_VMCS_POINTER);
        let (v, _) = load_region(&mem, VMCS_A).unwrap();
        assert_eq!(v.get(VmcsField::GUEST_RIP), 0xabc);
        // A second VMXOFF is outside VMX operation.
        assert_eq!(
            cpu.vmxoff(&ctx64(), &mut mem),
            VmxOutcome::Fault(VmxFault::InvalidOpcode)
        );
    }

    // ---- VMCLEAR ----

    #[test]
    fn test_vmclear_writes_clear_launch_state() {
        let (mut cpu, mut mem) = root();
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_RSP, 0x55);
        flush_region(&mut mem, VMCS_B, &v, LaunchState::Launched).unwrap();
        assert_eq!(cpu.vmclear(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert_eq!(load_region(&mem, VMCS_B), Ok((v, LaunchState::Clear)));
    }

    #[test]
    fn test_vmclear_bad_address_fails_valid_2() {
        let width = VmxCapabilities::default().phys_addr_width;
        for ptr in [VMCS_B | 0x10, 1 << width] {
            let (mut cpu, mut mem) = current();
            assert_eq!(
                cpu.vmclear(&ctx64(), &mut mem, ptr),
                VmxOutcome::FailValid(E::VmclearInvalidAddress)
            );
            assert_eq!(error_field(&cpu), 2);
        }
    }

    #[test]
    fn test_vmclear_bad_address_without_current_fails_invalid() {
        let (mut cpu, mut mem) = root();
        assert_eq!(
            cpu.vmclear(&ctx64(), &mut mem, VMCS_B | 1),
            VmxOutcome::FailInvalid
        );
    }

    #[test]
    fn test_vmclear_vmxon_pointer_fails_valid_3() {
        let (mut cpu, mut mem) = current();
        assert_eq!(
            cpu.vmclear(&ctx64(), &mut mem, VMXON_PA),
            VmxOutcome::FailValid(E::VmclearVmxonPointer)
        );
        assert_eq!(error_field(&cpu), 3);
        let (mut cpu, mut mem) = root();
        assert_eq!(
            cpu.vmclear(&ctx64(), &mut mem, VMXON_PA),
            VmxOutcome::FailInvalid
        );
    }

    #[test]
    fn test_vmclear_current_flushes_and_invalidates() {
        let (mut cpu, mut mem) = ready();
        assert!(matches!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2));
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 0x777), VmxOutcome::Succeed);
        assert_eq!(cpu.vmclear(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.current_vmcs_pointer(), INVALID_VMCS_POINTER);
        let (v, launch) = load_region(&mem, VMCS_A).unwrap();
        assert_eq!(v.get(VmcsField::GUEST_RIP), 0x777);
        assert_eq!(launch, LaunchState::Clear);
    }

    #[test]
    fn test_vmclear_outside_ram_succeeds_and_writes_nothing() {
        let (mut cpu, mut mem) = root();
        let before = mem.clone();
        assert_eq!(
            cpu.vmclear(&ctx64(), &mut mem, RAM as u64),
            VmxOutcome::Succeed
        );
        assert_eq!(mem, before);
    }

    // ---- VMPTRLD ----

    #[test]
    fn test_vmptrld_loads_region_and_makes_current() {
        let (mut cpu, mut mem) = root();
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_RIP, 0x1234);
        flush_region(&mut mem, VMCS_B, &v, LaunchState::Launched).unwrap();
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert_eq!(cpu.current_vmcs_pointer(), VMCS_B);
        assert_eq!(cpu.current_vmcs(), Some(&v));
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Launched));
    }

    #[test]
    fn test_vmptrld_never_cleared_region_loads_zeroed_clear() {
        let (mut cpu, mut mem) = root();
        mem.bytes[BLANK as usize + 8..BLANK as usize + 0x1000].fill(0xee);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, BLANK), VmxOutcome::Succeed);
        assert_eq!(cpu.current_vmcs(), Some(&Vmcs12::new()));
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Clear));
    }

    #[test]
    fn test_vmptrld_bad_address_fails_valid_9() {
        let width = VmxCapabilities::default().phys_addr_width;
        for ptr in [VMCS_B + 0x800, 1 << width, RAM as u64] {
            let (mut cpu, mut mem) = current();
            assert_eq!(
                cpu.vmptrld(&ctx64(), &mut mem, ptr),
                VmxOutcome::FailValid(E::VmptrldInvalidAddress),
                "{ptr:#x}"
            );
            assert_eq!(error_field(&cpu), 9);
            assert_eq!(cpu.current_vmcs_pointer(), VMCS_A);
        }
    }

    #[test]
    fn test_vmptrld_bad_address_without_current_fails_invalid() {
        let (mut cpu, mut mem) = root();
        assert_eq!(
            cpu.vmptrld(&ctx64(), &mut mem, VMCS_B + 4),
            VmxOutcome::FailInvalid
        );
        assert_eq!(cpu.current_vmcs_pointer(), INVALID_VMCS_POINTER);
    }

    #[test]
    fn test_vmptrld_vmxon_pointer_fails_valid_10() {
        let (mut cpu, mut mem) = current();
        assert_eq!(
            cpu.vmptrld(&ctx64(), &mut mem, VMXON_PA),
            VmxOutcome::FailValid(E::VmptrldVmxonPointer)
        );
        assert_eq!(error_field(&cpu), 10);
    }

    #[test]
    fn test_vmptrld_wrong_revision_fails_valid_11() {
        let (mut cpu, mut mem) = current();
        mem.write_u32(VMCS_B, 0x4242).unwrap();
        assert_eq!(
            cpu.vmptrld(&ctx64(), &mut mem, VMCS_B),
            VmxOutcome::FailValid(E::VmptrldIncorrectRevisionId)
        );
        assert_eq!(error_field(&cpu), 11);
        assert_eq!(cpu.current_vmcs_pointer(), VMCS_A);
    }

    #[test]
    fn test_vmptrld_shadow_bit_without_shadowing_fails_valid_11() {
        let (mut cpu, mut mem) = current();
        assert!(!cpu
            .caps()
            .controls
            .secondary
            .contains(SecondaryProcBased::VMCS_SHADOWING));
        mem.write_u32(
            VMCS_B,
            crate::caps::VMCS_REVISION_ID | SHADOW_VMCS_INDICATOR,
        )
        .unwrap();
        assert_eq!(
            cpu.vmptrld(&ctx64(), &mut mem, VMCS_B),
            VmxOutcome::FailValid(E::VmptrldIncorrectRevisionId)
        );
    }

    #[test]
    fn test_vmptrld_shadow_bit_with_shadowing_succeeds() {
        let caps = caps_with(|c| c.controls.secondary |= SecondaryProcBased::VMCS_SHADOWING);
        let mut cpu = VmxCpu::new(caps);
        let mut mem = memory();
        mem.write_u32(
            VMCS_B,
            crate::caps::VMCS_REVISION_ID | SHADOW_VMCS_INDICATOR,
        )
        .unwrap();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert!(cpu.current_is_shadow());
        // A shadow VMCS can be read and written in root operation but not
        // entered (SDM 27.1).
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 5), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&ctx64(), 0x681e), InsnResult::Succeed(5));
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::FailInvalid);
    }

    #[test]
    fn test_vmptrld_other_pointer_flushes_previous() {
        let (mut cpu, mut mem) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681c, 0x9000), VmxOutcome::Succeed);
        assert_eq!(cpu.vmclear(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        let (v, _) = load_region(&mem, VMCS_A).unwrap();
        assert_eq!(v.get(VmcsField::GUEST_RSP), 0x9000);
        assert_eq!(cpu.vmread(&ctx64(), 0x681c), InsnResult::Succeed(0));
        // And back: the value comes from guest memory.
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&ctx64(), 0x681c), InsnResult::Succeed(0x9000));
    }

    #[test]
    fn test_vmptrld_same_pointer_keeps_cache() {
        let (mut cpu, mut mem) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681c, 0x9000), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&ctx64(), 0x681c), InsnResult::Succeed(0x9000));
    }

    #[test]
    fn test_launch_state_survives_vmptrld_round_trip() {
        let (mut cpu, mut mem) = ready();
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
        assert_eq!(cpu.vmclear(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_B), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Launched));
        assert_eq!(cpu.vmresume(&ctx64(), &mem), EntryResult::EnterL2);
    }

    // ---- VMPTRST ----

    #[test]
    fn test_vmptrst_returns_current_pointer() {
        let (mut cpu, _) = current();
        assert_eq!(cpu.vmptrst(&ctx64()), InsnResult::Succeed(VMCS_A));
        let (mut cpu, _) = root();
        assert_eq!(
            cpu.vmptrst(&ctx64()),
            InsnResult::Succeed(INVALID_VMCS_POINTER)
        );
    }

    // ---- VMREAD / VMWRITE ----

    #[test]
    fn test_vmread_vmwrite_without_current_fail_invalid() {
        let (mut cpu, _) = root();
        assert_eq!(cpu.vmread(&ctx64(), 0x681e), InsnResult::FailInvalid);
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 1), VmxOutcome::FailInvalid);
    }

    #[test]
    fn test_vmread_vmwrite_unsupported_field_fails_valid_12() {
        // Unknown field, bit 12 set, bits 31:15 set, bit 32 set (64-bit
        // mode), HIGH on a natural-width and on a 32-bit field.
        for enc in [0x6830u64, 0x7000, 0x8000, 1 << 32 | 0x681e, 0x681f, 0x4003] {
            let (mut cpu, _) = current();
            assert_eq!(
                cpu.vmread(&ctx64(), enc),
                InsnResult::FailValid(E::UnsupportedVmcsComponent),
                "{enc:#x}"
            );
            assert_eq!(
                cpu.vmwrite(&ctx64(), enc, 1),
                VmxOutcome::FailValid(E::UnsupportedVmcsComponent),
                "{enc:#x}"
            );
            assert_eq!(error_field(&cpu), 12);
        }
    }

    #[test]
    fn test_vmread_outside_64bit_ignores_encoding_bits_63_32() {
        let (mut cpu, _) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 0x42), VmxOutcome::Succeed);
        assert_eq!(
            cpu.vmread(&ctx32(), 1 << 32 | 0x681e),
            InsnResult::Succeed(0x42)
        );
    }

    #[test]
    fn test_vmwrite_read_only_field_fails_valid_13() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.vmwrite(&ctx64(), VmcsField::VM_EXIT_REASON.encoding().into(), 1),
            VmxOutcome::FailValid(E::VmwriteReadOnlyComponent)
        );
        assert_eq!(error_field(&cpu), 13);
        assert_eq!(
            cpu.current_vmcs().map(|v| v.get(VmcsField::VM_EXIT_REASON)),
            Some(0)
        );
        // Reading it is fine.
        assert_eq!(cpu.vmread(&ctx64(), 0x4402), InsnResult::Succeed(0));
    }

    #[test]
    fn test_vmwrite_read_only_field_with_vmwrite_any_succeeds() {
        let mut cpu = VmxCpu::new(caps_with(|c| c.vmwrite_any_field = true));
        let mut mem = memory();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(cpu.vmwrite(&ctx64(), 0x6400, 0x99), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&ctx64(), 0x6400), InsnResult::Succeed(0x99));
    }

    #[test]
    fn test_vmread_high_returns_bits_63_32() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.vmwrite(&ctx64(), 0x2010, 0x1122_3344_5566_7788),
            VmxOutcome::Succeed
        );
        assert_eq!(
            cpu.vmread(&ctx64(), 0x2011),
            InsnResult::Succeed(0x1122_3344)
        );
        assert_eq!(
            cpu.vmread(&ctx32(), 0x2011),
            InsnResult::Succeed(0x1122_3344)
        );
        assert_eq!(
            cpu.vmread(&ctx32(), 0x2010),
            InsnResult::Succeed(0x5566_7788)
        );
    }

    #[test]
    fn test_vmwrite_high_keeps_low_bits() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.vmwrite(&ctx64(), 0x2010, 0x1122_3344_5566_7788),
            VmxOutcome::Succeed
        );
        assert_eq!(
            cpu.vmwrite(&ctx64(), 0x2011, 0xffff_ffff_aabb_ccdd),
            VmxOutcome::Succeed
        );
        assert_eq!(
            cpu.vmread(&ctx64(), 0x2010),
            InsnResult::Succeed(0xaabb_ccdd_5566_7788)
        );
    }

    #[test]
    fn test_vmread_outside_64bit_returns_low_32_bits() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.vmwrite(&ctx64(), 0x681e, 0xffff_8000_0000_1000),
            VmxOutcome::Succeed
        );
        assert_eq!(cpu.vmread(&ctx32(), 0x681e), InsnResult::Succeed(0x1000));
        assert_eq!(
            cpu.vmread(&ctx64(), 0x681e),
            InsnResult::Succeed(0xffff_8000_0000_1000)
        );
    }

    #[test]
    fn test_vmwrite_outside_64bit_zero_extends() {
        let (mut cpu, _) = current();
        for enc in [0x681eu64, 0x2010] {
            assert_eq!(cpu.vmwrite(&ctx64(), enc, u64::MAX), VmxOutcome::Succeed);
            assert_eq!(
                cpu.vmwrite(&ctx32(), enc, 0xdead_beef_1234_5678),
                VmxOutcome::Succeed
            );
            assert_eq!(cpu.vmread(&ctx64(), enc), InsnResult::Succeed(0x1234_5678));
        }
    }

    #[test]
    fn test_vmwrite_truncates_to_field_width() {
        let (mut cpu, _) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x0802, 0x1_2345), VmxOutcome::Succeed);
        assert_eq!(cpu.vmread(&ctx64(), 0x0802), InsnResult::Succeed(0x2345));
        assert_eq!(cpu.vmwrite(&ctx64(), 0x4802, u64::MAX), VmxOutcome::Succeed);
        assert_eq!(
            cpu.vmread(&ctx64(), 0x4802),
            InsnResult::Succeed(0xffff_ffff)
        );
    }

    fn access_strategy() -> impl Strategy<Value = (VmcsField, AccessType)> {
        let writable: Vec<VmcsField> = VmcsField::ALL
            .iter()
            .copied()
            .filter(|f| !f.is_read_only())
            .collect();
        (proptest::sample::select(writable), any::<bool>()).prop_map(|(f, high)| {
            let high = high && f.width() == crate::field::FieldWidth::Qword;
            (
                f,
                if high {
                    AccessType::High
                } else {
                    AccessType::Full
                },
            )
        })
    }

    proptest! {
        #[test]
        fn test_vmwrite_vmread_round_trip_every_field(
            (field, access) in access_strategy(),
            old in any::<u64>(),
            value in any::<u64>(),
            long in any::<bool>(),
        ) {
            let (mut cpu, _) = current();
            let c = if long { ctx64() } else { ctx32() };
            if let Some(v) = cpu.current_vmcs_mut() {
                v.set(field, old);
            }
            let encoding = u64::from(field.encoding())
                | u64::from(access == AccessType::High);
            prop_assert_eq!(cpu.vmwrite(&c, encoding, value), VmxOutcome::Succeed);
            // Reference: what the field holds afterwards, from SDM 24.11.2.
            let mask = field.width().mask();
            let operand = if long { value } else { value & 0xffff_ffff };
            let expected_field = match access {
                AccessType::Full => operand & mask,
                AccessType::High => (old & mask & 0xffff_ffff) | ((value & 0xffff_ffff) << 32),
            };
            let expected_read = match access {
                AccessType::Full => expected_field,
                AccessType::High => expected_field >> 32,
            };
            let expected_read = if long { expected_read } else { expected_read & 0xffff_ffff };
            prop_assert_eq!(cpu.vmread(&c, encoding), InsnResult::Succeed(expected_read));
            prop_assert_eq!(cpu.current_vmcs().map(|v| v.get(field)), Some(expected_field));
        }

        #[test]
        fn test_vmread_vmwrite_never_panic_on_any_encoding(encoding in any::<u64>(), value in any::<u64>(), long in any::<bool>()) {
            let (mut cpu, _) = current();
            let c = if long { ctx64() } else { ctx32() };
            let w = cpu.vmwrite(&c, encoding, value);
            let r = cpu.vmread(&c, encoding).outcome();
            prop_assert!(matches!(w, VmxOutcome::Succeed | VmxOutcome::FailValid(_)));
            prop_assert!(matches!(r, VmxOutcome::Succeed | VmxOutcome::FailValid(_)));
        }
    }

    // ---- VMLAUNCH / VMRESUME ----

    #[test]
    fn test_vmlaunch_enters_l2_and_marks_launched() {
        let (mut cpu, mem) = ready();
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Clear));
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Launched));
        assert_eq!(EntryResult::EnterL2.outcome(), None);
    }

    #[test]
    fn test_vmlaunch_vmresume_without_current_fail_invalid() {
        let (mut cpu, mem) = root();
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::FailInvalid);
        assert_eq!(cpu.vmresume(&ctx64(), &mem), EntryResult::FailInvalid);
    }

    #[test]
    fn test_vmlaunch_launched_vmcs_fails_valid_4() {
        let (mut cpu, mem) = ready();
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
        assert_eq!(
            cpu.vmlaunch(&ctx64(), &mem),
            EntryResult::FailValid(E::VmlaunchNonClearVmcs)
        );
        assert_eq!(error_field(&cpu), 4);
    }

    #[test]
    fn test_vmresume_clear_vmcs_fails_valid_5() {
        let (mut cpu, mem) = ready();
        assert_eq!(
            cpu.vmresume(&ctx64(), &mem),
            EntryResult::FailValid(E::VmresumeNonLaunchedVmcs)
        );
        assert_eq!(error_field(&cpu), 5);
    }

    #[test]
    fn test_vmresume_launched_vmcs_enters_l2() {
        let (mut cpu, mem) = ready();
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
        assert_eq!(cpu.vmresume(&ctx64(), &mem), EntryResult::EnterL2);
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Launched));
    }

    #[test]
    fn test_vmlaunch_blocked_by_mov_ss_fails_valid_26() {
        let (mut cpu, mem) = ready();
        let c = InsnContext {
            blocked_by_mov_ss: true,
            ..ctx64()
        };
        assert_eq!(
            cpu.vmlaunch(&c, &mem),
            EntryResult::FailValid(E::EntryEventsBlockedByMovSs)
        );
        assert_eq!(error_field(&cpu), 26);
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Clear));
    }

    #[test]
    fn test_vmlaunch_invalid_control_fails_valid_7() {
        let (mut cpu, mem) = ready();
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::CR3_TARGET_COUNT, 5);
        }
        assert_eq!(
            cpu.vmlaunch(&ctx64(), &mem),
            EntryResult::FailValid(E::EntryInvalidControlFields)
        );
        assert_eq!(error_field(&cpu), 7);
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Clear));
    }

    #[test]
    fn test_vmlaunch_invalid_host_state_fails_valid_8() {
        let (mut cpu, mem) = ready();
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::HOST_CR0, 0);
        }
        assert_eq!(
            cpu.vmlaunch(&ctx64(), &mem),
            EntryResult::FailValid(E::EntryInvalidHostStateFields)
        );
        assert_eq!(error_field(&cpu), 8);
    }

    #[test]
    fn test_vmlaunch_invalid_guest_state_is_entry_failure_33() {
        let (mut cpu, mem) = ready();
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::GUEST_RFLAGS, 0);
        }
        let r = cpu.vmlaunch(&ctx64(), &mem);
        assert_eq!(
            r,
            EntryResult::EntryFailure {
                exit_reason: 0x8000_0021,
                exit_qualification: 0
            }
        );
        assert_eq!(r.outcome(), None);
        // The launch state stays clear; no VM-instruction error.
        assert_eq!(cpu.current_launch_state(), Some(LaunchState::Clear));
        assert_eq!(error_field(&cpu), 0);
    }

    #[test]
    fn test_vmlaunch_bad_link_pointer_qualification_4() {
        let (mut cpu, mem) = ready();
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::VMCS_LINK_POINTER, 0x6000);
        }
        assert_eq!(
            cpu.vmlaunch(&ctx64(), &mem),
            EntryResult::EntryFailure {
                exit_reason: 0x8000_0021,
                exit_qualification: 4
            }
        );
    }

    // ---- INVEPT ----

    const EPTP_WB_4: u64 = 0x7000 | (3 << 3) | 6;

    #[test]
    fn test_invept_single_context_returns_eptp() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.invept(&ctx64(), 1, [EPTP_WB_4, 0]),
            InsnResult::Succeed(EptInvalidation::SingleContext { eptp: EPTP_WB_4 })
        );
    }

    #[test]
    fn test_invept_all_context_ignores_descriptor() {
        let (mut cpu, _) = root();
        assert_eq!(
            cpu.invept(&ctx64(), 2, [u64::MAX, u64::MAX]),
            InsnResult::Succeed(EptInvalidation::AllContexts)
        );
    }

    #[test]
    fn test_invept_unsupported_type_fails_valid_28() {
        for t in [0u64, 3, 1 << 32 | 1] {
            let (mut cpu, _) = current();
            assert_eq!(
                cpu.invept(&ctx64(), t, [EPTP_WB_4, 0]),
                InsnResult::FailValid(E::InvalidInveptInvvpidOperand),
                "type {t:#x}"
            );
            assert_eq!(error_field(&cpu), 28);
        }
        let (mut cpu, _) = root();
        assert_eq!(cpu.invept(&ctx64(), 0, [0, 0]), InsnResult::FailInvalid);
    }

    #[test]
    fn test_invept_type_uses_32_bit_register_outside_64bit_mode() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.invept(&ctx32(), 1 << 32 | 2, [0, 0]),
            InsnResult::Succeed(EptInvalidation::AllContexts)
        );
    }

    #[test]
    fn test_invept_type_not_offered_fails_valid_28() {
        let mut cpu = VmxCpu::new(caps_with(|c| {
            c.ept_vpid_cap &= !crate::caps::ept_vpid::INVEPT_SINGLE_CONTEXT
        }));
        let mut mem = memory();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(
            cpu.invept(&ctx64(), 1, [EPTP_WB_4, 0]),
            InsnResult::FailValid(E::InvalidInveptInvvpidOperand)
        );
        assert_eq!(
            cpu.invept(&ctx64(), 2, [0, 0]),
            InsnResult::Succeed(EptInvalidation::AllContexts)
        );
    }

    #[test]
    fn test_invept_invalid_eptp_fails_valid_28() {
        let width = VmxCapabilities::default().phys_addr_width;
        for eptp in [
            0x7000 | (3 << 3),        // UC, not offered
            0x7000 | (3 << 3) | 5,    // memory type 5, reserved
            0x7000 | (4 << 3) | 6,    // 5-level walk, not offered
            0x7000 | (1 << 3) | 6,    // 2-level walk
            EPTP_WB_4 | (1 << 6),     // A/D flags, not offered
            EPTP_WB_4 | (1 << 8),     // reserved bit 8
            EPTP_WB_4 | (1 << width), // beyond the physical-address width
        ] {
            let (mut cpu, _) = current();
            assert_eq!(
                cpu.invept(&ctx64(), 1, [eptp, 0]),
                InsnResult::FailValid(E::InvalidInveptInvvpidOperand),
                "{eptp:#x}"
            );
        }
    }

    #[test]
    fn test_invept_without_ept_ud() {
        let mut cpu = VmxCpu::new(caps_with(|c| {
            c.controls.secondary.remove(SecondaryProcBased::ENABLE_EPT)
        }));
        let mem = memory();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(
            cpu.invept(&ctx64(), 2, [0, 0]),
            InsnResult::Fault(VmxFault::InvalidOpcode)
        );
        let mut cpu = VmxCpu::new(caps_with(|c| {
            c.ept_vpid_cap &= !crate::caps::ept_vpid::INVEPT
        }));
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(
            cpu.invept(&ctx64(), 2, [0, 0]),
            InsnResult::Fault(VmxFault::InvalidOpcode)
        );
    }

    // ---- INVVPID ----

    #[test]
    fn test_invvpid_each_type_succeeds() {
        let (mut cpu, _) = current();
        let c = ctx64();
        assert_eq!(
            cpu.invvpid(&c, 0, [5, 0xffff_8000_0000_0000]),
            InsnResult::Succeed(VpidInvalidation::IndividualAddress {
                vpid: 5,
                linear_address: 0xffff_8000_0000_0000
            })
        );
        assert_eq!(
            cpu.invvpid(&c, 1, [5, 0]),
            InsnResult::Succeed(VpidInvalidation::SingleContext { vpid: 5 })
        );
        assert_eq!(
            cpu.invvpid(&c, 2, [0, 0]),
            InsnResult::Succeed(VpidInvalidation::AllContexts)
        );
        assert_eq!(
            cpu.invvpid(&c, 3, [7, 0]),
            InsnResult::Succeed(VpidInvalidation::SingleContextRetainingGlobals { vpid: 7 })
        );
    }

    #[test]
    fn test_invvpid_vpid_zero_fails_valid_28() {
        for t in [0u64, 1, 3] {
            let (mut cpu, _) = current();
            assert_eq!(
                cpu.invvpid(&ctx64(), t, [0, 0x1000]),
                InsnResult::FailValid(E::InvalidInveptInvvpidOperand),
                "type {t}"
            );
            assert_eq!(error_field(&cpu), 28);
        }
    }

    #[test]
    fn test_invvpid_non_canonical_address_fails_valid_28() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.invvpid(&ctx64(), 0, [1, 0x0000_8000_0000_0000]),
            InsnResult::FailValid(E::InvalidInveptInvvpidOperand)
        );
        // Types 1-3 do not look at the address.
        assert!(matches!(
            cpu.invvpid(&ctx64(), 1, [1, 0x0000_8000_0000_0000]),
            InsnResult::Succeed(_)
        ));
    }

    #[test]
    fn test_invvpid_reserved_descriptor_bits_fail_valid_28() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.invvpid(&ctx64(), 2, [1 << 16, 0]),
            InsnResult::FailValid(E::InvalidInveptInvvpidOperand)
        );
    }

    #[test]
    fn test_invvpid_unsupported_type_fails_valid_28() {
        let (mut cpu, _) = current();
        assert_eq!(
            cpu.invvpid(&ctx64(), 4, [1, 0]),
            InsnResult::FailValid(E::InvalidInveptInvvpidOperand)
        );
        let mut cpu = VmxCpu::new(caps_with(|c| {
            c.ept_vpid_cap &= !crate::caps::ept_vpid::INVVPID_SINGLE_CONTEXT
        }));
        let mut mem = memory();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(cpu.vmptrld(&ctx64(), &mut mem, VMCS_A), VmxOutcome::Succeed);
        assert_eq!(
            cpu.invvpid(&ctx64(), 1, [1, 0]),
            InsnResult::FailValid(E::InvalidInveptInvvpidOperand)
        );
    }

    #[test]
    fn test_invvpid_without_vpid_ud() {
        let mut cpu = VmxCpu::new(caps_with(|c| {
            c.controls.secondary.remove(SecondaryProcBased::ENABLE_VPID)
        }));
        let mem = memory();
        assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
        assert_eq!(
            cpu.invvpid(&ctx64(), 2, [0, 0]),
            InsnResult::Fault(VmxFault::InvalidOpcode)
        );
    }

    // ---- flush and snapshots ----

    #[test]
    fn test_flush_writes_cache_to_region() {
        let (mut cpu, mut mem) = current();
        assert_eq!(cpu.vmwrite(&ctx64(), 0x681e, 0x31), VmxOutcome::Succeed);
        assert_eq!(
            load_region(&mem, VMCS_A).map(|(v, _)| v.get(VmcsField::GUEST_RIP)),
            Ok(0)
        );
        assert_eq!(cpu.flush(&mut mem), Ok(()));
        assert_eq!(
            load_region(&mem, VMCS_A).map(|(v, _)| v.get(VmcsField::GUEST_RIP)),
            Ok(0x31)
        );
    }

    #[test]
    fn test_vmx_cpu_snapshot_round_trip() {
        let (mut cpu, mem) = ready();
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
        let blob = crate::snapshot::encode_vmx_cpu(&cpu).unwrap();
        let back = crate::snapshot::decode_vmx_cpu(&blob).unwrap();
        assert_eq!(back, cpu);
        assert_eq!(back.current_launch_state(), Some(LaunchState::Launched));
        let (outside, _) = fresh();
        let blob = crate::snapshot::encode_vmx_cpu(&outside).unwrap();
        assert_eq!(crate::snapshot::decode_vmx_cpu(&blob), Ok(outside));
    }

    #[test]
    fn test_vmx_cpu_snapshot_rejects_inconsistent_state() {
        let (mut cpu, _) = current();
        if let Operation::Root {
            current: Some(c), ..
        } = &mut cpu.operation
        {
            c.pointer = VMXON_PA;
        }
        let blob = crate::snapshot::encode_vmx_cpu(&cpu).unwrap();
        assert!(matches!(
            crate::snapshot::decode_vmx_cpu(&blob),
            Err(crate::snapshot::SnapshotError::Inconsistent(_))
        ));
        let (mut cpu, _) = root();
        cpu.operation = Operation::Root {
            vmxon_pointer: 0x1234,
            current: None,
        };
        assert!(cpu.check_consistency().is_err());
        assert!(root().0.check_consistency().is_ok());
    }

    // ---- L1's mode and the current-VMCS pointer reach the entry checks ----

    #[test]
    fn test_vmlaunch_checks_host_size_against_l1_mode() {
        // SDM 27.2.4: "host address-space size" must equal L1's EFER.LMA.
        // The VMCS has a 64-bit host: fine from 64-bit L1, VMfailValid(8)
        // from a 32-bit protected-mode L1.
        let (mut cpu, mem) = ready();
        assert_eq!(
            cpu.vmlaunch(&ctx32(), &mem),
            EntryResult::FailValid(VmInstructionError::EntryInvalidHostStateFields)
        );
        assert_eq!(error_field(&cpu), 8);
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
    }

    #[test]
    fn test_vmlaunch_link_pointer_equal_to_current_vmcs_qualification_4() {
        // SDM 27.3.1.5: a link pointer to another valid region passes, one
        // equal to the current-VMCS pointer is an entry failure (qual 4).
        let (mut cpu, mem) = ready();
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::VMCS_LINK_POINTER, VMCS_A);
        }
        assert_eq!(
            cpu.vmlaunch(&ctx64(), &mem),
            EntryResult::EntryFailure {
                exit_reason: 0x8000_0021,
                exit_qualification: 4
            }
        );
        if let Some(v) = cpu.current_vmcs_mut() {
            v.set(VmcsField::VMCS_LINK_POINTER, VMCS_B);
        }
        assert_eq!(cpu.vmlaunch(&ctx64(), &mem), EntryResult::EnterL2);
    }

    /// One step of a random instruction sequence.
    #[derive(Debug, Clone)]
    enum Step {
        Vmxon(u64),
        Vmxoff,
        Vmclear(u64),
        Vmptrld(u64),
        Vmptrst,
        Vmread(u64),
        Vmwrite(u64, u64),
        Vmlaunch,
        Vmresume,
        Invept(u64, [u64; 2]),
        Invvpid(u64, [u64; 2]),
        Scribble(u64, u64),
    }

    fn pointer() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(VMXON_PA),
            Just(VMCS_A),
            Just(VMCS_B),
            Just(BLANK),
            any::<u64>(),
            (0u64..0x20).prop_map(|p| p << 12),
        ]
    }

    fn encoding() -> impl Strategy<Value = u64> {
        prop_oneof![
            proptest::sample::select(VmcsField::ALL.to_vec()).prop_map(|f| u64::from(f.encoding())),
            any::<u64>(),
            0u64..0x8000,
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            pointer().prop_map(Step::Vmxon),
            Just(Step::Vmxoff),
            pointer().prop_map(Step::Vmclear),
            pointer().prop_map(Step::Vmptrld),
            Just(Step::Vmptrst),
            encoding().prop_map(Step::Vmread),
            (encoding(), any::<u64>()).prop_map(|(e, v)| Step::Vmwrite(e, v)),
            Just(Step::Vmlaunch),
            Just(Step::Vmresume),
            (0u64..5, any::<[u64; 2]>()).prop_map(|(t, d)| Step::Invept(t, d)),
            (0u64..5, any::<[u64; 2]>()).prop_map(|(t, d)| Step::Invvpid(t, d)),
            (0u64..(RAM as u64 + 8), any::<u64>()).prop_map(|(a, v)| Step::Scribble(a, v)),
        ]
    }

    fn context() -> impl Strategy<Value = InsnContext> {
        prop_oneof![
            8 => Just(ctx64()),
            1 => Just(ctx32()),
            1 => Just(cpl3()),
            1 => Just(with_mode(CpuMode::Real)),
            1 => Just(with_mode(CpuMode::Compatibility)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random instruction sequences (random pointers, encodings, values,
        /// modes, and L1 scribbling over its own VMCS regions) never panic,
        /// keep the model consistent, and every VMfailValid(n) leaves n in
        /// VM_INSTRUCTION_ERROR of the current VMCS.
        #[test]
        fn test_random_instruction_sequences_never_panic(
            steps in proptest::collection::vec((context(), step()), 1..40)
        ) {
            let (mut cpu, mut mem) = fresh();
            for (ctx, st) in steps {
                let failed_valid = match st {
                    Step::Vmxon(p) => matches!(cpu.vmxon(&ctx, &mem, p), VmxOutcome::FailValid(_)),
                    Step::Vmxoff => matches!(cpu.vmxoff(&ctx, &mut mem), VmxOutcome::FailValid(_)),
                    Step::Vmclear(p) => {
                        matches!(cpu.vmclear(&ctx, &mut mem, p), VmxOutcome::FailValid(_))
                    }
                    Step::Vmptrld(p) => {
                        matches!(cpu.vmptrld(&ctx, &mut mem, p), VmxOutcome::FailValid(_))
                    }
                    Step::Vmptrst => {
                        let r = cpu.vmptrst(&ctx);
                        if let InsnResult::Succeed(p) = r {
                            prop_assert_eq!(p, cpu.current_vmcs_pointer());
                        }
                        false
                    }
                    Step::Vmread(e) => matches!(cpu.vmread(&ctx, e), InsnResult::FailValid(_)),
                    Step::Vmwrite(e, v) => {
                        matches!(cpu.vmwrite(&ctx, e, v), VmxOutcome::FailValid(_))
                    }
                    Step::Vmlaunch => matches!(cpu.vmlaunch(&ctx, &mem), EntryResult::FailValid(_)),
                    Step::Vmresume => matches!(cpu.vmresume(&ctx, &mem), EntryResult::FailValid(_)),
                    Step::Invept(t, d) => matches!(cpu.invept(&ctx, t, d), InsnResult::FailValid(_)),
                    Step::Invvpid(t, d) => {
                        matches!(cpu.invvpid(&ctx, t, d), InsnResult::FailValid(_))
                    }
                    Step::Scribble(a, v) => {
                        let _ = mem.write_u64(a, v);
                        false
                    }
                };
                prop_assert!(cpu.check_consistency().is_ok(), "{:?}", cpu.check_consistency());
                if failed_valid {
                    prop_assert!(cpu.current_vmcs().is_some());
                    prop_assert_ne!(error_field(&cpu), 0);
                }
            }
        }

        /// INVEPT single-context accepts exactly the EPTPs VM entry accepts
        /// (one check, `entry::check_eptp`), for the default capabilities and
        /// for ones that offer A/D flags and UC.
        #[test]
        fn test_invept_eptp_check_is_the_vm_entry_check(
            eptp in prop_oneof![any::<u64>(), (0u64..0x1000).prop_map(|low| 0x7000 | low)],
            extra in prop_oneof![Just(0u64), Just(crate::caps::ept_vpid::AD_FLAGS
                | crate::caps::ept_vpid::MEMTYPE_UC)],
        ) {
            let caps = caps_with(|c| c.ept_vpid_cap |= extra);
            let mut cpu = VmxCpu::new(caps.clone());
            let mem = memory();
            prop_assert_eq!(cpu.vmxon(&ctx64(), &mem, VMXON_PA), VmxOutcome::Succeed);
            let invept_ok = matches!(cpu.invept(&ctx64(), 1, [eptp, 0]), InsnResult::Succeed(_));
            prop_assert_eq!(invept_ok, check_eptp(&caps, eptp).is_ok());
        }
    }
}
