//! The L1 VMX instruction trap: decode, resolve operands, execute, apply.
//!
//! KVM on this host cannot run VMX instructions in a guest: it stops with an
//! emulation failure, RIP at the instruction (see
//! `/work/shared/kvm-host-facts.md`). [`emulate_vmx`] takes L1's state, the
//! instruction bytes and L1's memory and does what the CPU would have done:
//!
//! 1. decode the bytes with iced-x86 in L1's current mode ([`decode_vmx`]);
//! 2. read the memory operand (segmentation, then L1's paging through the
//!    `nested-exit` walker) or the register operand;
//! 3. run the instruction on the VMX state machine ([`VmxMachine`]);
//! 4. apply the outcome to L1's state: RFLAGS (SDM 31.2), the VMREAD or
//!    VMPTRST destination, RIP past the instruction; or leave RIP alone and
//!    return the fault to inject (#UD, #GP, #SS, #PF with CR2).
//!
//! Guest bytes never panic: something that is not a VMX instruction, or does
//! not decode, is a [`DecodeError`] the caller turns into #UD.
//!
//! Virtual CR4.VMXE: KVM refuses CR4.VMXE here, so the bit lives in L0
//! (`InsnContext::vmxe`); the caller (`nested.rs`) keeps it and passes it
//! in (see `docs/architecture.md`).

use std::borrow::Cow;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};
use nested_exit::{walk, Segment, VcpuState};
use vmcs12::vmx::VmxOperation;
use vmcs12::{
    CpuMode, EntryResult, GuestPhysMemory, InsnContext, InsnResult, VmInstructionError, VmcsField,
    VmxCpu, VmxFault, VmxOutcome,
};

/// CR0.PE.
const CR0_PE: u64 = 1 << 0;
/// CR4.VMXE (SDM 2.5).
pub const CR4_VMXE: u64 = 1 << 13;
/// RFLAGS.RF: cleared when an instruction completes (SDM 17.3.1.1).
const RFLAGS_RF: u64 = 1 << 16;
/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// Segment access-rights bits (VMCS format, SDM 24.4.1).
const AR_TYPE_CODE: u32 = 1 << 3;
const AR_TYPE_WRITABLE_OR_READABLE: u32 = 1 << 1;
const AR_TYPE_EXPAND_DOWN: u32 = 1 << 2;
const AR_S: u32 = 1 << 4;
const AR_L: u32 = 1 << 13;
const AR_DB: u32 = 1 << 14;

/// The VMX instructions L0 traps (SDM Vol. 3 ch. 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// VMCALL.
    Vmcall,
    /// VMFUNC.
    Vmfunc,
}

impl VmxInstruction {
    /// Every instruction, in the order of this enum.
    pub const ALL: [VmxInstruction; 13] = [
        Self::Vmxon,
        Self::Vmxoff,
        Self::Vmclear,
        Self::Vmptrld,
        Self::Vmptrst,
        Self::Vmread,
        Self::Vmwrite,
        Self::Vmlaunch,
        Self::Vmresume,
        Self::Invept,
        Self::Invvpid,
        Self::Vmcall,
        Self::Vmfunc,
    ];

    /// The mnemonic, lower case.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmxon => "vmxon",
            Self::Vmxoff => "vmxoff",
            Self::Vmclear => "vmclear",
            Self::Vmptrld => "vmptrld",
            Self::Vmptrst => "vmptrst",
            Self::Vmread => "vmread",
            Self::Vmwrite => "vmwrite",
            Self::Vmlaunch => "vmlaunch",
            Self::Vmresume => "vmresume",
            Self::Invept => "invept",
            Self::Invvpid => "invvpid",
            Self::Vmcall => "vmcall",
            Self::Vmfunc => "vmfunc",
        }
    }

    /// Position in [`Self::ALL`] (for counters).
    pub fn index(self) -> usize {
        self as usize
    }

    fn from_code(code: Code) -> Option<Self> {
        Some(match code {
            Code::Vmxon_m64 => Self::Vmxon,
            Code::Vmxoff => Self::Vmxoff,
            Code::Vmclear_m64 => Self::Vmclear,
            Code::Vmptrld_m64 => Self::Vmptrld,
            Code::Vmptrst_m64 => Self::Vmptrst,
            Code::Vmread_rm32_r32 | Code::Vmread_rm64_r64 => Self::Vmread,
            Code::Vmwrite_r32_rm32 | Code::Vmwrite_r64_rm64 => Self::Vmwrite,
            Code::Vmlaunch => Self::Vmlaunch,
            Code::Vmresume => Self::Vmresume,
            Code::Invept_r32_m128 | Code::Invept_r64_m128 => Self::Invept,
            Code::Invvpid_r32_m128 | Code::Invvpid_r64_m128 => Self::Invvpid,
            Code::Vmcall => Self::Vmcall,
            Code::Vmfunc => Self::Vmfunc,
            _ => return None,
        })
    }
}

/// The execution mode of a vCPU, as far as VMX instructions care (SDM 31.3:
/// they #UD in real, virtual-8086 and compatibility mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// CR0.PE = 0.
    Real,
    /// RFLAGS.VM = 1.
    Virtual8086,
    /// Protected mode outside IA-32e mode, CS.D = 0 (16-bit code) or 1.
    Protected {
        /// Default operand/address size from CS.D: 16 or 32.
        bits: u32,
    },
    /// IA-32e mode with CS.L = 0.
    Compatibility {
        /// Default operand/address size from CS.D: 16 or 32.
        bits: u32,
    },
    /// IA-32e mode with CS.L = 1.
    Long64,
}

impl ExecMode {
    /// The mode of `state`.
    pub fn of(state: &VcpuState) -> Self {
        let bits = if state.cs.ar & AR_DB != 0 { 32 } else { 16 };
        if state.cr0 & CR0_PE == 0 {
            ExecMode::Real
        } else if state.msrs.efer & VcpuState::EFER_LMA != 0 {
            if state.cs.ar & AR_L != 0 {
                ExecMode::Long64
            } else {
                ExecMode::Compatibility { bits }
            }
        } else if state.rflags & VcpuState::RFLAGS_VM != 0 {
            ExecMode::Virtual8086
        } else {
            ExecMode::Protected { bits }
        }
    }

    /// Code size for the decoder: 16, 32 or 64.
    pub fn bitness(self) -> u32 {
        match self {
            ExecMode::Long64 => 64,
            ExecMode::Real | ExecMode::Virtual8086 => 16,
            ExecMode::Protected { bits } | ExecMode::Compatibility { bits } => bits,
        }
    }

    /// Whether VMX instructions are allowed at all in this mode (SDM 31.3:
    /// #UD in real-address, virtual-8086 and compatibility mode).
    pub fn vmx_allowed(self) -> bool {
        matches!(self, ExecMode::Protected { .. } | ExecMode::Long64)
    }
}

/// A segment register named by an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegReg {
    /// ES.
    Es,
    /// CS.
    Cs,
    /// SS.
    Ss,
    /// DS.
    Ds,
    /// FS.
    Fs,
    /// GS.
    Gs,
}

impl SegReg {
    fn from_iced(r: Register) -> Option<Self> {
        Some(match r {
            Register::ES => SegReg::Es,
            Register::CS => SegReg::Cs,
            Register::SS => SegReg::Ss,
            Register::DS => SegReg::Ds,
            Register::FS => SegReg::Fs,
            Register::GS => SegReg::Gs,
            _ => return None,
        })
    }

    fn of(self, state: &VcpuState) -> &Segment {
        match self {
            SegReg::Es => &state.es,
            SegReg::Cs => &state.cs,
            SegReg::Ss => &state.ss,
            SegReg::Ds => &state.ds,
            SegReg::Fs => &state.fs,
            SegReg::Gs => &state.gs,
        }
    }
}

/// Base of a memory operand's effective address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrBase {
    /// No base register.
    None,
    /// A general-purpose register (0 = RAX ... 15 = R15).
    Gpr(u8),
    /// RIP-relative: the displacement already holds the absolute target.
    Rip,
}

/// A decoded memory operand, before segmentation and paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Segment (override prefix or the default for the base register).
    pub segment: SegReg,
    /// Base.
    pub base: AddrBase,
    /// Index register, if any.
    pub index: Option<u8>,
    /// Scale of the index: 1, 2, 4 or 8.
    pub scale: u8,
    /// Displacement (for RIP-relative: the absolute target address).
    pub displacement: u64,
    /// Address size in bits: 16, 32 or 64.
    pub address_size: u32,
}

impl MemOperand {
    /// The effective address (offset within the segment), truncated to the
    /// address size.
    pub fn effective_address(&self, state: &VcpuState) -> u64 {
        let base = match self.base {
            AddrBase::None => 0,
            AddrBase::Gpr(r) => state.gprs.get(r),
            AddrBase::Rip => 0,
        };
        let index = self
            .index
            .map_or(0, |r| state.gprs.get(r).wrapping_mul(u64::from(self.scale)));
        base.wrapping_add(index).wrapping_add(self.displacement) & size_mask(self.address_size)
    }
}

/// A register-or-memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOrMem {
    /// A general-purpose register (0 = RAX ... 15 = R15).
    Reg(u8),
    /// A memory operand.
    Mem(MemOperand),
}

/// A decoded VMX instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedVmx {
    /// Which instruction.
    pub kind: VmxInstruction,
    /// Length in bytes.
    pub len: u8,
    /// Operand size in bits for register and VMREAD/VMWRITE operands: 64 in
    /// 64-bit mode, 32 otherwise (SDM 31.3, VMREAD/VMWRITE; INVEPT/INVVPID).
    pub operand_size: u32,
    /// The register operand: VMREAD source (field encoding), VMWRITE
    /// destination (field encoding), INVEPT/INVVPID type.
    pub reg: Option<u8>,
    /// The r/m operand: VMREAD destination, VMWRITE source, or the memory
    /// operand of VMXON, VMCLEAR, VMPTRLD, VMPTRST, INVEPT and INVVPID.
    pub rm: Option<RegOrMem>,
}

/// Why instruction bytes are not a VMX instruction L0 can emulate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not decode at all.
    #[error("instruction bytes {bytes:02x?} do not decode in {bitness}-bit mode: inject #UD")]
    Invalid {
        /// The bytes tried.
        bytes: Vec<u8>,
        /// Decoder mode.
        bitness: u32,
    },
    /// The bytes end before the instruction does.
    #[error("instruction bytes {bytes:02x?} end before the instruction does: fetch more bytes")]
    Truncated {
        /// The bytes tried.
        bytes: Vec<u8>,
    },
    /// A valid instruction, but not a VMX one.
    #[error("`{text}` is not a VMX instruction: L0 does not emulate it; inject #UD or report it")]
    NotVmx {
        /// The instruction, formatted.
        text: String,
    },
    /// A VMX instruction with an operand form the CPU rejects (e.g. a
    /// register where memory is required: iced decodes no such form, so
    /// this is a defensive case).
    #[error("`{text}` has an operand form VMX does not allow: inject #UD")]
    BadOperand {
        /// The instruction, formatted.
        text: String,
    },
}

fn size_mask(bits: u32) -> u64 {
    match bits {
        16 => 0xffff,
        32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn gpr_number(r: Register) -> Option<u8> {
    let full = r.full_register();
    if full.is_gpr64() {
        u8::try_from(full.number()).ok()
    } else {
        None
    }
}

/// Address size of an instruction: the mode's default, flipped by 0x67 in
/// the legacy-prefix run (SDM 2.2.1; 64-bit mode: 64 -> 32).
fn address_size(bytes: &[u8], len: usize, bitness: u32) -> u32 {
    let mut flipped = false;
    for &b in bytes.iter().take(len) {
        match b {
            0x67 => flipped = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0xf0 | 0xf2 | 0xf3 => {}
            0x40..=0x4f if bitness == 64 => {}
            _ => break,
        }
    }
    match (bitness, flipped) {
        (64, false) => 64,
        (64, true) => 32,
        (32, false) | (16, true) => 32,
        _ => 16,
    }
}

fn mem_operand(insn: &Instruction, bytes: &[u8], bitness: u32) -> Option<MemOperand> {
    let address_size = address_size(bytes, insn.len(), bitness);
    let base = match insn.memory_base() {
        Register::None => AddrBase::None,
        Register::RIP | Register::EIP => AddrBase::Rip,
        r => AddrBase::Gpr(gpr_number(r)?),
    };
    let index = match insn.memory_index() {
        Register::None => None,
        r => Some(gpr_number(r)?),
    };
    Some(MemOperand {
        segment: SegReg::from_iced(insn.memory_segment())?,
        base,
        index,
        scale: u8::try_from(insn.memory_index_scale()).ok()?,
        displacement: insn.memory_displacement64(),
        address_size,
    })
}

/// Decodes one VMX instruction at the start of `bytes`, in the mode `mode`,
/// at instruction pointer `rip` (used for RIP-relative operands).
pub fn decode_vmx(bytes: &[u8], mode: ExecMode, rip: u64) -> Result<DecodedVmx, DecodeError> {
    let bitness = mode.bitness();
    let window = bytes.get(..bytes.len().min(MAX_INSN_LEN)).unwrap_or(bytes);
    let mut decoder =
        Decoder::try_with_ip(bitness, window, rip, DecoderOptions::NONE).map_err(|_| {
            DecodeError::Invalid {
                bytes: window.to_vec(),
                bitness,
            }
        })?;
    let insn = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => {}
        DecoderError::NoMoreBytes => {
            return Err(DecodeError::Truncated {
                bytes: window.to_vec(),
            })
        }
        _ => {
            return Err(DecodeError::Invalid {
                bytes: window.to_vec(),
                bitness,
            })
        }
    }
    if insn.is_invalid() {
        return Err(DecodeError::Invalid {
            bytes: window.to_vec(),
            bitness,
        });
    }
    let Some(kind) = VmxInstruction::from_code(insn.code()) else {
        return Err(DecodeError::NotVmx {
            text: insn.to_string(),
        });
    };
    let bad = || DecodeError::BadOperand {
        text: insn.to_string(),
    };
    let operand = |i: u32| -> Result<RegOrMem, DecodeError> {
        match insn.op_kind(i) {
            OpKind::Register => Ok(RegOrMem::Reg(
                gpr_number(insn.op_register(i)).ok_or_else(bad)?,
            )),
            OpKind::Memory => Ok(RegOrMem::Mem(
                mem_operand(&insn, window, bitness).ok_or_else(bad)?,
            )),
            _ => Err(bad()),
        }
    };
    let (reg, rm) = match kind {
        VmxInstruction::Vmxon
        | VmxInstruction::Vmclear
        | VmxInstruction::Vmptrld
        | VmxInstruction::Vmptrst => (None, Some(operand(0)?)),
        // Intel syntax: VMREAD r/m, r (destination first).
        VmxInstruction::Vmread => match operand(1)? {
            RegOrMem::Reg(r) => (Some(r), Some(operand(0)?)),
            RegOrMem::Mem(_) => return Err(bad()),
        },
        VmxInstruction::Vmwrite | VmxInstruction::Invept | VmxInstruction::Invvpid => {
            match operand(0)? {
                RegOrMem::Reg(r) => (Some(r), Some(operand(1)?)),
                RegOrMem::Mem(_) => return Err(bad()),
            }
        }
        VmxInstruction::Vmxoff
        | VmxInstruction::Vmlaunch
        | VmxInstruction::Vmresume
        | VmxInstruction::Vmcall
        | VmxInstruction::Vmfunc => (None, None),
    };
    // Memory-only forms (SDM 31.3: "m64", "m128").
    let memory_only = matches!(
        kind,
        VmxInstruction::Vmxon
            | VmxInstruction::Vmclear
            | VmxInstruction::Vmptrld
            | VmxInstruction::Vmptrst
            | VmxInstruction::Invept
            | VmxInstruction::Invvpid
    );
    if memory_only && !matches!(rm, Some(RegOrMem::Mem(_))) {
        return Err(bad());
    }
    Ok(DecodedVmx {
        kind,
        len: u8::try_from(insn.len()).map_err(|_| bad())?,
        operand_size: if bitness == 64 { 64 } else { 32 },
        reg,
        rm,
    })
}

/// A VMX instruction with its operands read: what the state machine gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxRequest {
    /// VMXON with the VMXON pointer read from memory.
    Vmxon {
        /// The 64-bit VMXON pointer.
        vmxon_ptr: u64,
    },
    /// VMXOFF.
    Vmxoff,
    /// VMCLEAR with the VMCS pointer.
    Vmclear {
        /// The 64-bit operand.
        ptr: u64,
    },
    /// VMPTRLD with the VMCS pointer.
    Vmptrld {
        /// The 64-bit operand.
        ptr: u64,
    },
    /// VMPTRST (the pointer to store is in the response).
    Vmptrst,
    /// VMREAD of the field with this encoding.
    Vmread {
        /// The register holding the field encoding (full operand size).
        encoding: u64,
    },
    /// VMWRITE.
    Vmwrite {
        /// Field encoding.
        encoding: u64,
        /// Value (32-bit operands zero-extended outside 64-bit mode).
        value: u64,
    },
    /// VMLAUNCH.
    Vmlaunch,
    /// VMRESUME.
    Vmresume,
    /// INVEPT.
    Invept {
        /// Type from the register operand.
        ty: u64,
        /// The 128-bit descriptor (low, high quadword).
        descriptor: [u64; 2],
    },
    /// INVVPID.
    Invvpid {
        /// Type from the register operand.
        ty: u64,
        /// The 128-bit descriptor (low, high quadword).
        descriptor: [u64; 2],
    },
    /// VMCALL in VMX root operation (or outside VMX operation).
    Vmcall,
}

/// What the VMX state machine answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxResponse {
    /// The instruction completed (or faulted) with this outcome.
    Outcome(VmxOutcome),
    /// VMREAD / VMPTRST: the outcome and, on VMsucceed, the value to store.
    Value(VmxOutcome, u64),
    /// VMLAUNCH/VMRESUME passed every check: enter L2.
    EnterL2 {
        /// VMLAUNCH (true) or VMRESUME (false).
        launch: bool,
    },
    /// VMLAUNCH/VMRESUME failed the guest-state or MSR-load checks: a VM
    /// exit with bit 31 of the reason set (SDM 27.8), reflected to L1.
    EntryFailure {
        /// Basic exit reason (33 guest state, 34 MSR loading, 41 MCE).
        basic_reason: u16,
        /// Exit qualification.
        qualification: u64,
    },
}

/// The VMX state machine of one vCPU, as the instruction trap sees it:
/// implemented by [`VmxCpu`] (below); tests may script it.
pub trait VmxMachine {
    /// Whether the vCPU is in VMX operation (VMXON then does not read its
    /// operand: SDM 31.3 VMXON).
    fn in_vmx_operation(&self) -> bool;
    /// The #UD/#GP checks that come before any operand is read (SDM 31.3,
    /// the first lines of each instruction's pseudo-code).
    fn check_access(&self, kind: VmxInstruction, ctx: &InsnContext) -> Result<(), VmxFault>;
    /// Executes one instruction whose operands have been read.
    fn execute(
        &mut self,
        ctx: &InsnContext,
        request: VmxRequest,
        mem: &mut dyn GuestPhysMemory,
    ) -> VmxResponse;
}

impl VmxInstruction {
    /// The `vmcs12` model's name for this instruction (VMCALL and VMFUNC
    /// are not part of that model).
    fn model(self) -> Option<vmcs12::VmxInstruction> {
        use vmcs12::VmxInstruction as M;
        Some(match self {
            Self::Vmxon => M::Vmxon,
            Self::Vmxoff => M::Vmxoff,
            Self::Vmclear => M::Vmclear,
            Self::Vmptrld => M::Vmptrld,
            Self::Vmptrst => M::Vmptrst,
            Self::Vmread => M::Vmread,
            Self::Vmwrite => M::Vmwrite,
            Self::Vmlaunch => M::Vmlaunch,
            Self::Vmresume => M::Vmresume,
            Self::Invept => M::Invept,
            Self::Invvpid => M::Invvpid,
            Self::Vmcall | Self::Vmfunc => return None,
        })
    }
}

fn entry_response(r: EntryResult, launch: bool) -> VmxResponse {
    match r {
        EntryResult::EnterL2 => VmxResponse::EnterL2 { launch },
        EntryResult::EntryFailure {
            exit_reason,
            exit_qualification,
        } => VmxResponse::EntryFailure {
            basic_reason: exit_reason as u16,
            qualification: exit_qualification,
        },
        EntryResult::FailInvalid => VmxResponse::Outcome(VmxOutcome::FailInvalid),
        EntryResult::FailValid(e) => VmxResponse::Outcome(VmxOutcome::FailValid(e)),
        EntryResult::Fault(f) => VmxResponse::Outcome(VmxOutcome::Fault(f)),
    }
}

impl VmxMachine for VmxCpu {
    fn in_vmx_operation(&self) -> bool {
        self.vmx_operation() != VmxOperation::Outside
    }

    fn check_access(&self, kind: VmxInstruction, ctx: &InsnContext) -> Result<(), VmxFault> {
        match kind.model() {
            Some(m) => VmxCpu::check_access(self, m, ctx),
            None => {
                if ctx.mode.vmx_instructions_undefined() {
                    return Err(VmxFault::InvalidOpcode);
                }
                match kind {
                    // VMCALL outside VMX operation is #UD; in root
                    // operation any CPL gets VMfail (SDM 31.3 VMCALL).
                    VmxInstruction::Vmcall if self.vmx_operation() == VmxOperation::Outside => {
                        Err(VmxFault::InvalidOpcode)
                    }
                    VmxInstruction::Vmcall => Ok(()),
                    // VMFUNC outside VMX non-root operation is #UD, and L1
                    // is never in non-root operation (SDM 31.3 VMFUNC).
                    _ => Err(VmxFault::InvalidOpcode),
                }
            }
        }
    }

    fn execute(
        &mut self,
        ctx: &InsnContext,
        request: VmxRequest,
        mem: &mut dyn GuestPhysMemory,
    ) -> VmxResponse {
        use VmxResponse::{Outcome, Value};
        let value = |r: InsnResult<u64>| match r {
            InsnResult::Succeed(v) => Value(VmxOutcome::Succeed, v),
            other => Outcome(other.outcome()),
        };
        match request {
            VmxRequest::Vmxon { vmxon_ptr } => Outcome(self.vmxon(ctx, mem, vmxon_ptr)),
            VmxRequest::Vmxoff => Outcome(self.vmxoff(ctx, mem)),
            VmxRequest::Vmclear { ptr } => Outcome(self.vmclear(ctx, mem, ptr)),
            VmxRequest::Vmptrld { ptr } => Outcome(self.vmptrld(ctx, mem, ptr)),
            VmxRequest::Vmptrst => value(self.vmptrst(ctx)),
            VmxRequest::Vmread { encoding } => value(self.vmread(ctx, encoding)),
            VmxRequest::Vmwrite { encoding, value } => Outcome(self.vmwrite(ctx, encoding, value)),
            VmxRequest::Vmlaunch => entry_response(self.vmlaunch(ctx, mem), true),
            VmxRequest::Vmresume => entry_response(self.vmresume(ctx, mem), false),
            // L0 keeps no EPT or VPID-tagged translations of its own (the
            // L2 VM's memslots alias L1 RAM; KVM tracks L2's page tables),
            // so only the outcome matters.
            VmxRequest::Invept { ty, descriptor } => {
                Outcome(self.invept(ctx, ty, descriptor).outcome())
            }
            VmxRequest::Invvpid { ty, descriptor } => {
                Outcome(self.invvpid(ctx, ty, descriptor).outcome())
            }
            // VMCALL in VMX root operation without dual-monitor treatment:
            // VMfail(VMCALL executed in VMX root operation) (SDM 31.3).
            VmxRequest::Vmcall => match self.current_vmcs_mut() {
                Some(v) => {
                    let e = VmInstructionError::VmcallInVmxRoot;
                    v.set(VmcsField::VM_INSTRUCTION_ERROR, u64::from(e.number()));
                    Outcome(VmxOutcome::FailValid(e))
                }
                None => Outcome(VmxOutcome::FailInvalid),
            },
        }
    }
}

/// Why the trap could not complete (not an architectural outcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulError {
    /// The bytes are not an emulable VMX instruction.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// L1's paging could not be walked (see the message).
    #[error("cannot translate L1 linear address {linear:#x}: {reason}")]
    Translate {
        /// The linear address.
        linear: u64,
        /// Why.
        reason: String,
    },
    /// A physical access fell outside guest RAM after a successful walk.
    #[error(
        "L1 operand at guest-physical {gpa:#x} is outside guest RAM: give the VM more memory or fix L1's page tables"
    )]
    OutsideRam {
        /// The address.
        gpa: u64,
    },
}

/// A memory access kind, for segmentation and paging checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Segmentation (SDM 3.4, 5.3): the linear address of `len` bytes at the
/// operand, or #GP(0)/#SS(0) (SS-based operands raise #SS).
pub fn linear_address(
    state: &VcpuState,
    op: &MemOperand,
    len: u64,
    access: Access,
) -> Result<u64, VmxFault> {
    let seg = op.segment.of(state);
    let fault = if op.segment == SegReg::Ss {
        VmxFault::StackFault
    } else {
        VmxFault::GeneralProtection
    };
    let ea = op.effective_address(state);
    let mode = ExecMode::of(state);
    if mode == ExecMode::Long64 {
        // 64-bit mode: only FS/GS bases apply, no limit checks; the
        // address must be canonical (SDM 3.3.7.1).
        let base = match op.segment {
            SegReg::Fs | SegReg::Gs => seg.base,
            _ => 0,
        };
        let first = base.wrapping_add(ea);
        let last = first.wrapping_add(len.saturating_sub(1));
        if !canonical(first) || !canonical(last) {
            return Err(fault);
        }
        return Ok(first);
    }
    // Real and virtual-8086 mode: no type checks, only the limit.
    let protected = matches!(
        mode,
        ExecMode::Protected { .. } | ExecMode::Compatibility { .. }
    );
    if protected {
        if seg.unusable() || seg.ar & AR_S == 0 {
            return Err(fault);
        }
        let code = seg.ar & AR_TYPE_CODE != 0;
        let rw = seg.ar & AR_TYPE_WRITABLE_OR_READABLE != 0;
        let type_ok = match access {
            Access::Write => !code && rw,
            Access::Read => !code || rw,
            Access::Fetch => code,
        };
        if !type_ok {
            return Err(fault);
        }
    }
    let last = ea.checked_add(len.saturating_sub(1)).ok_or(fault)?;
    let limit = u64::from(seg.limit);
    let expand_down = seg.ar & AR_TYPE_CODE == 0 && seg.ar & AR_TYPE_EXPAND_DOWN != 0;
    let in_limit = if expand_down && protected {
        let upper = if seg.ar & AR_DB != 0 {
            0xffff_ffff
        } else {
            0xffff
        };
        ea > limit && last <= upper
    } else {
        last <= limit
    };
    if !in_limit {
        return Err(fault);
    }
    Ok(seg.base.wrapping_add(ea) & 0xffff_ffff)
}

fn canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == 0x1_ffff
}

/// Reads or writes `buf.len()` bytes at a linear address through the
/// paging of the vCPU in `state` (the `nested-exit` walker). Every page is translated before any
/// byte moves, so a write that faults on its second page changes nothing.
/// `Ok(Err(fault))` is the architectural fault to inject. Accessed/dirty
/// flags are not set (the walker's default; L1 does not rely on them).
pub fn access_linear(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    linear: u64,
    buf: &mut [u8],
    access: Access,
) -> Result<Result<(), VmxFault>, EmulError> {
    let paging = walk::PagingState::from_vcpu(state);
    let kind = match access {
        Access::Read => walk::Access::read(),
        Access::Write => walk::Access::write(),
        Access::Fetch => walk::Access::fetch(),
    };
    let ranges = match walk::translate_range(&paging, linear, buf.len() as u64, kind, &*mem) {
        Ok(r) => r,
        Err(walk::PagingFault::PageFault { linear, error_code }) => {
            return Ok(Err(VmxFault::PageFault {
                linear_address: linear,
                error_code: error_code.bits(),
            }))
        }
        Err(walk::PagingFault::GeneralProtection { .. }) => {
            return Ok(Err(VmxFault::GeneralProtection))
        }
    };
    let mut off = 0usize;
    for r in ranges {
        let n = usize::try_from(r.len).unwrap_or(usize::MAX);
        let Some(part) = off.checked_add(n).and_then(|end| buf.get_mut(off..end)) else {
            return Err(EmulError::Translate {
                linear,
                reason: "the walker returned more bytes than asked for".into(),
            });
        };
        let res = match access {
            Access::Write => mem.write(r.gpa, part),
            Access::Read | Access::Fetch => mem.read(r.gpa, part),
        };
        res.map_err(|e| EmulError::OutsideRam { gpa: e.gpa })?;
        off += n;
    }
    Ok(Ok(()))
}

/// Reads up to 15 instruction bytes at L1's CS:RIP (for when KVM did not
/// report them). Stops early at a page that does not translate.
pub fn fetch_insn_bytes(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
) -> Result<Result<Vec<u8>, VmxFault>, EmulError> {
    let mode = ExecMode::of(state);
    let rip = state.rip & size_mask(mode.bitness());
    let linear = if mode == ExecMode::Long64 {
        rip
    } else {
        state.cs.base.wrapping_add(rip) & 0xffff_ffff
    };
    let mut out = Vec::with_capacity(MAX_INSN_LEN);
    let first_page = (0x1000 - (linear & 0xfff)).min(MAX_INSN_LEN as u64) as usize;
    let mut buf = vec![0u8; first_page];
    match access_linear(state, mem, linear, &mut buf, Access::Fetch)? {
        Ok(()) => out.extend_from_slice(&buf),
        Err(f) => return Ok(Err(f)),
    }
    if out.len() < MAX_INSN_LEN {
        let mut rest = vec![0u8; MAX_INSN_LEN - out.len()];
        // A fault on the second page only matters if the instruction needs
        // those bytes: the caller sees a truncated decode then.
        if let Ok(Ok(())) = access_linear(
            state,
            mem,
            linear.wrapping_add(out.len() as u64),
            &mut rest,
            Access::Fetch,
        ) {
            out.extend_from_slice(&rest);
        }
    }
    Ok(Ok(out))
}

/// The bytes of a trapped instruction: those KVM reported or, when it
/// reported none, up to 15 fetched at CS:RIP (`Ok(Err(fault))` when that
/// fetch faults).
pub fn trapped_insn_bytes<'a>(
    state: &VcpuState,
    reported: &'a [u8],
    mem: &mut dyn GuestPhysMemory,
) -> Result<Result<Cow<'a, [u8]>, VmxFault>, EmulError> {
    if reported.is_empty() {
        Ok(fetch_insn_bytes(state, mem)?.map(Cow::Owned))
    } else {
        Ok(Ok(Cow::Borrowed(reported)))
    }
}

/// The VMX instruction at L1's CS:RIP, if the trapped bytes decode as one
/// in L1's mode; `None` for anything else, including a fetch that faults.
pub fn vmx_instruction_at(
    state: &VcpuState,
    reported: &[u8],
    mem: &mut dyn GuestPhysMemory,
) -> Option<VmxInstruction> {
    let bytes = trapped_insn_bytes(state, reported, mem).ok()?.ok()?;
    decode_vmx(&bytes, ExecMode::of(state), state.rip)
        .ok()
        .map(|d| d.kind)
}

/// The result of one trapped VMX instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxStep {
    /// The instruction completed: RFLAGS, destination and RIP are updated
    /// in the state. L1 continues.
    Completed {
        /// Which instruction.
        kind: VmxInstruction,
        /// Its outcome (Succeed, FailInvalid or FailValid).
        outcome: VmxOutcome,
    },
    /// The instruction faults: RIP is unchanged; inject this (CR2 for #PF
    /// is the fault's linear address).
    Fault {
        /// Which instruction.
        kind: VmxInstruction,
        /// The fault.
        fault: VmxFault,
    },
    /// VMLAUNCH/VMRESUME succeeded: run L2. RIP of L1 is left at the
    /// instruction (L1 comes back at HOST_RIP).
    EnterL2 {
        /// VMLAUNCH or VMRESUME.
        kind: VmxInstruction,
    },
    /// VMLAUNCH/VMRESUME failed with a VM-entry failure: reflect an exit
    /// with this reason (bit 31 set) without running L2.
    EntryFailure {
        /// VMLAUNCH or VMRESUME.
        kind: VmxInstruction,
        /// Basic exit reason.
        basic_reason: u16,
        /// Exit qualification.
        qualification: u64,
    },
}

impl VmxStep {
    /// The instruction.
    pub fn kind(&self) -> VmxInstruction {
        match *self {
            VmxStep::Completed { kind, .. }
            | VmxStep::Fault { kind, .. }
            | VmxStep::EnterL2 { kind }
            | VmxStep::EntryFailure { kind, .. } => kind,
        }
    }
}

/// The vector and error code to inject for a fault, and the CR2 value for
/// #PF (SDM 6.15).
pub fn fault_vector(fault: VmxFault) -> (u8, Option<u32>, Option<u64>) {
    match fault {
        VmxFault::InvalidOpcode => (6, None, None),
        VmxFault::StackFault => (12, Some(0), None),
        VmxFault::GeneralProtection => (13, Some(0), None),
        VmxFault::PageFault {
            linear_address,
            error_code,
        } => (14, Some(error_code), Some(linear_address)),
    }
}

/// The context of an instruction executed by `state` with virtual
/// CR4.VMXE `vmxe` (the hardware CR4.VMXE is always 0 on this host).
pub fn insn_context(state: &VcpuState, vmxe: bool) -> InsnContext {
    InsnContext {
        cpl: state.cpl(),
        mode: CpuMode::from_registers(
            state.cr0,
            state.rflags,
            state.msrs.efer,
            state.cs.ar & AR_L != 0,
        ),
        cr0: state.cr0,
        cr4: if vmxe {
            state.cr4 | CR4_VMXE
        } else {
            state.cr4 & !CR4_VMXE
        },
        vmxe,
        // Interruptibility bit 1 (SDM 24.4.2); VM entry fails with
        // VMfailValid(26) when it is set (SDM 31.3 VMLAUNCH).
        blocked_by_mov_ss: state.interruptibility & 0b10 != 0,
    }
}

/// Emulates the VMX instruction `bytes` (at L1's RIP) for L1.
///
/// On [`VmxStep::Completed`] `state` holds the new RFLAGS, RIP and any
/// destination register; memory destinations are written to `mem`. On a
/// fault, `state` is unchanged and the caller injects the fault.
pub fn emulate_vmx(
    state: &mut VcpuState,
    bytes: &[u8],
    vmxe: bool,
    machine: &mut dyn VmxMachine,
    mem: &mut dyn GuestPhysMemory,
) -> Result<VmxStep, EmulError> {
    let ctx = insn_context(state, vmxe);
    let insn = decode_vmx(bytes, ExecMode::of(state), state.rip)?;
    let kind = insn.kind;
    let fault = |fault| Ok(VmxStep::Fault { kind, fault });
    // Memory-operand faults come after the instruction's own #UD/#GP
    // checks (SDM 31.3 pseudo-code reads the operand after them).
    if let Err(f) = machine.check_access(kind, &ctx) {
        return fault(f);
    }
    let opsize_bytes: u64 = if insn.operand_size == 64 { 8 } else { 4 };
    let reg_value = |s: &VcpuState| {
        insn.reg
            .map_or(0, |r| s.gprs.get(r) & size_mask(insn.operand_size))
    };

    // Read the source operand (memory faults become the fault to inject).
    let request = match kind {
        // In VMX operation VMXON fails without reading its operand.
        VmxInstruction::Vmxon if machine.in_vmx_operation() => VmxRequest::Vmxon { vmxon_ptr: 0 },
        VmxInstruction::Vmxon | VmxInstruction::Vmclear | VmxInstruction::Vmptrld => {
            let ptr = match read_operand(state, mem, insn.rm, 8)? {
                Ok(v) => v,
                Err(f) => return fault(f),
            };
            match kind {
                VmxInstruction::Vmxon => VmxRequest::Vmxon { vmxon_ptr: ptr },
                VmxInstruction::Vmclear => VmxRequest::Vmclear { ptr },
                _ => VmxRequest::Vmptrld { ptr },
            }
        }
        VmxInstruction::Vmptrst => {
            // Check the destination is writable before executing (a fault
            // means nothing happens).
            if let Some(RegOrMem::Mem(m)) = insn.rm {
                if let Err(f) = linear_address(state, &m, 8, Access::Write) {
                    return fault(f);
                }
            }
            VmxRequest::Vmptrst
        }
        VmxInstruction::Vmread => VmxRequest::Vmread {
            encoding: reg_value(state),
        },
        VmxInstruction::Vmwrite => {
            let value = match read_operand(state, mem, insn.rm, opsize_bytes)? {
                Ok(v) => v,
                Err(f) => return fault(f),
            };
            VmxRequest::Vmwrite {
                encoding: reg_value(state),
                value,
            }
        }
        VmxInstruction::Invept | VmxInstruction::Invvpid => {
            let Some(RegOrMem::Mem(m)) = insn.rm else {
                return fault(VmxFault::InvalidOpcode);
            };
            let mut desc = [0u8; 16];
            let la = match linear_address(state, &m, 16, Access::Read) {
                Ok(la) => la,
                Err(f) => return fault(f),
            };
            if let Err(f) = access_linear(state, mem, la, &mut desc, Access::Read)? {
                return fault(f);
            }
            let lo = u64::from_le_bytes(desc[..8].try_into().unwrap_or_default());
            let hi = u64::from_le_bytes(desc[8..].try_into().unwrap_or_default());
            let ty = reg_value(state);
            if kind == VmxInstruction::Invept {
                VmxRequest::Invept {
                    ty,
                    descriptor: [lo, hi],
                }
            } else {
                VmxRequest::Invvpid {
                    ty,
                    descriptor: [lo, hi],
                }
            }
        }
        VmxInstruction::Vmxoff => VmxRequest::Vmxoff,
        VmxInstruction::Vmlaunch => VmxRequest::Vmlaunch,
        VmxInstruction::Vmresume => VmxRequest::Vmresume,
        VmxInstruction::Vmcall => VmxRequest::Vmcall,
        // check_access() always faults VMFUNC in root operation.
        VmxInstruction::Vmfunc => return fault(VmxFault::InvalidOpcode),
    };

    let response = machine.execute(&ctx, request, mem);
    let outcome = match response {
        VmxResponse::EnterL2 { .. } => return Ok(VmxStep::EnterL2 { kind }),
        VmxResponse::EntryFailure {
            basic_reason,
            qualification,
        } => {
            return Ok(VmxStep::EntryFailure {
                kind,
                basic_reason,
                qualification,
            })
        }
        VmxResponse::Outcome(VmxOutcome::Fault(f))
        | VmxResponse::Value(VmxOutcome::Fault(f), _) => return fault(f),
        VmxResponse::Outcome(o) => o,
        VmxResponse::Value(o, value) => {
            if o == VmxOutcome::Succeed {
                let size = if kind == VmxInstruction::Vmptrst {
                    8
                } else {
                    opsize_bytes
                };
                if let Err(f) = write_operand(state, mem, insn.rm, value, size)? {
                    return fault(f);
                }
            }
            o
        }
    };
    complete(state, &insn, outcome);
    Ok(VmxStep::Completed { kind, outcome })
}

/// Finishes a completed instruction: RFLAGS, RIP past it, RF and the
/// STI/MOV-SS blocking cleared (SDM 31.2, 6.8.3).
fn complete(state: &mut VcpuState, insn: &DecodedVmx, outcome: VmxOutcome) {
    state.rflags = outcome.apply_to_rflags(state.rflags) & !RFLAGS_RF;
    let mask = size_mask(ExecMode::of(state).bitness());
    state.rip = state.rip.wrapping_add(u64::from(insn.len)) & mask;
    state.interruptibility &= !0b11;
}

fn read_operand(
    state: &VcpuState,
    mem: &mut dyn GuestPhysMemory,
    op: Option<RegOrMem>,
    size: u64,
) -> Result<Result<u64, VmxFault>, EmulError> {
    match op {
        None => Ok(Err(VmxFault::InvalidOpcode)),
        Some(RegOrMem::Reg(r)) => Ok(Ok(state.gprs.get(r) & size_mask((size * 8) as u32))),
        Some(RegOrMem::Mem(m)) => {
            let la = match linear_address(state, &m, size, Access::Read) {
                Ok(la) => la,
                Err(f) => return Ok(Err(f)),
            };
            let mut b = [0u8; 8];
            let buf = &mut b[..size.min(8) as usize];
            if let Err(f) = access_linear(state, mem, la, buf, Access::Read)? {
                return Ok(Err(f));
            }
            Ok(Ok(u64::from_le_bytes(b)))
        }
    }
}

fn write_operand(
    state: &mut VcpuState,
    mem: &mut dyn GuestPhysMemory,
    op: Option<RegOrMem>,
    value: u64,
    size: u64,
) -> Result<Result<(), VmxFault>, EmulError> {
    match op {
        None => Ok(Err(VmxFault::InvalidOpcode)),
        // A 32-bit register write zero-extends (as in 64-bit mode; outside
        // it the upper half is not visible to L1).
        Some(RegOrMem::Reg(r)) => {
            state.gprs.set(r, value & size_mask((size * 8) as u32));
            Ok(Ok(()))
        }
        Some(RegOrMem::Mem(m)) => {
            let la = match linear_address(state, &m, size, Access::Write) {
                Ok(la) => la,
                Err(f) => return Ok(Err(f)),
            };
            let mut b = value.to_le_bytes();
            let buf = &mut b[..size.min(8) as usize];
            access_linear(state, mem, la, buf, Access::Write)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vmcs12::{FlatMemory, VmInstructionError};

    /// A 32-bit flat protected-mode L1 at CPL 0, paging off.
    fn prot32() -> VcpuState {
        let flat_code = Segment {
            selector: 0x08,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xc09b,
        };
        let flat_data = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xffff_ffff,
            ar: 0xc093,
        };
        VcpuState {
            cr0: CR0_PE | (1 << 5),
            rflags: 0x2,
            rip: 0x1000,
            cs: flat_code,
            ds: flat_data,
            es: flat_data,
            ss: flat_data,
            fs: flat_data,
            gs: flat_data,
            ..Default::default()
        }
    }

    /// A 64-bit-mode L1 (LMA, CS.L). The paging adapter treats CR0.PG = 0
    /// as identity, which lets these tests run without page tables.
    fn long64() -> VcpuState {
        let mut s = prot32();
        s.msrs.efer = VcpuState::EFER_LMA | VcpuState::EFER_LME;
        s.cs.ar = 0xa09b;
        s
    }

    /// A VMX machine that records requests and answers from a script.
    struct Scripted {
        in_vmx: bool,
        requests: Vec<VmxRequest>,
        response: VmxResponse,
    }

    impl Scripted {
        fn new(response: VmxResponse) -> Self {
            Self {
                in_vmx: true,
                requests: Vec::new(),
                response,
            }
        }
    }

    impl VmxMachine for Scripted {
        fn in_vmx_operation(&self) -> bool {
            self.in_vmx
        }
        /// The SDM's first checks, written out independently of vmcs12.
        fn check_access(&self, kind: VmxInstruction, ctx: &InsnContext) -> Result<(), VmxFault> {
            let ud = ctx.mode.vmx_instructions_undefined()
                || kind == VmxInstruction::Vmfunc
                || (kind == VmxInstruction::Vmxon && !ctx.vmxe)
                || (kind != VmxInstruction::Vmxon && !self.in_vmx);
            if ud {
                Err(VmxFault::InvalidOpcode)
            } else if ctx.cpl > 0 {
                Err(VmxFault::GeneralProtection)
            } else {
                Ok(())
            }
        }
        fn execute(
            &mut self,
            _ctx: &InsnContext,
            request: VmxRequest,
            _mem: &mut dyn GuestPhysMemory,
        ) -> VmxResponse {
            self.requests.push(request);
            self.response
        }
    }

    fn iced_text(bytes: &[u8], bitness: u32) -> String {
        let mut d = Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE);
        d.decode().to_string()
    }

    #[test]
    fn test_decode_every_vmx_instruction_64bit() {
        let cases: &[(&[u8], VmxInstruction, &str)] = &[
            (
                &[0xf3, 0x0f, 0xc7, 0x30],
                VmxInstruction::Vmxon,
                "vmxon qword ptr [rax]",
            ),
            (
                &[0x66, 0x0f, 0xc7, 0x30],
                VmxInstruction::Vmclear,
                "vmclear qword ptr [rax]",
            ),
            (
                &[0x0f, 0xc7, 0x30],
                VmxInstruction::Vmptrld,
                "vmptrld qword ptr [rax]",
            ),
            (
                &[0x0f, 0xc7, 0x38],
                VmxInstruction::Vmptrst,
                "vmptrst qword ptr [rax]",
            ),
            (
                &[0x0f, 0x78, 0xd8],
                VmxInstruction::Vmread,
                "vmread rax,rbx",
            ),
            (
                &[0x0f, 0x79, 0xd8],
                VmxInstruction::Vmwrite,
                "vmwrite rbx,rax",
            ),
            (&[0x0f, 0x01, 0xc2], VmxInstruction::Vmlaunch, "vmlaunch"),
            (&[0x0f, 0x01, 0xc3], VmxInstruction::Vmresume, "vmresume"),
            (&[0x0f, 0x01, 0xc4], VmxInstruction::Vmxoff, "vmxoff"),
            (&[0x0f, 0x01, 0xc1], VmxInstruction::Vmcall, "vmcall"),
            (&[0x0f, 0x01, 0xd4], VmxInstruction::Vmfunc, "vmfunc"),
            (
                &[0x66, 0x0f, 0x38, 0x80, 0x03],
                VmxInstruction::Invept,
                "invept rax,oword ptr [rbx]",
            ),
            (
                &[0x66, 0x0f, 0x38, 0x81, 0x03],
                VmxInstruction::Invvpid,
                "invvpid rax,oword ptr [rbx]",
            ),
        ];
        for &(bytes, kind, text) in cases {
            assert_eq!(iced_text(bytes, 64), text, "test vector itself");
            // Trailing bytes after the instruction are ignored.
            let mut padded = bytes.to_vec();
            padded.extend_from_slice(&[0x90; 8]);
            let d = decode_vmx(&padded, ExecMode::Long64, 0x1000).unwrap();
            assert_eq!(d.kind, kind, "{text}");
            assert_eq!(usize::from(d.len), bytes.len(), "{text}");
            assert_eq!(d.operand_size, 64);
        }
    }

    #[test]
    fn test_decode_operands_follow_intel_order() {
        // vmread rax, rbx: destination r/m = RAX (0), source reg = RBX (3).
        let d = decode_vmx(&[0x0f, 0x78, 0xd8], ExecMode::Long64, 0).unwrap();
        assert_eq!((d.reg, d.rm), (Some(3), Some(RegOrMem::Reg(0))));
        // vmwrite rbx, rax: field in RBX (reg), value from RAX (r/m).
        let d = decode_vmx(&[0x0f, 0x79, 0xd8], ExecMode::Long64, 0).unwrap();
        assert_eq!((d.reg, d.rm), (Some(3), Some(RegOrMem::Reg(0))));
        // vmread r9, r10 (REX.RB).
        let bytes = [0x45, 0x0f, 0x78, 0xd1];
        assert_eq!(iced_text(&bytes, 64), "vmread r9,r10");
        let d = decode_vmx(&bytes, ExecMode::Long64, 0).unwrap();
        assert_eq!((d.reg, d.rm), (Some(10), Some(RegOrMem::Reg(9))));
    }

    #[test]
    fn test_decode_rejects_register_form_of_memory_only_instructions() {
        // 0f c7 f0 is RDRAND eax (mod = 11 of group 9): not VMPTRLD.
        let e = decode_vmx(&[0x0f, 0xc7, 0xf0], ExecMode::Long64, 0).unwrap_err();
        assert!(matches!(e, DecodeError::NotVmx { .. }), "{e}");
    }

    #[test]
    fn test_decode_sib_and_displacement() {
        // vmptrld [rbx+rcx*8+10h]
        let bytes = [0x0f, 0xc7, 0x74, 0xcb, 0x10];
        assert_eq!(iced_text(&bytes, 64), "vmptrld qword ptr [rbx+rcx*8+10h]");
        let d = decode_vmx(&bytes, ExecMode::Long64, 0).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.base, AddrBase::Gpr(3));
        assert_eq!(m.index, Some(1));
        assert_eq!(m.scale, 8);
        assert_eq!(m.segment, SegReg::Ds);
        assert_eq!(m.address_size, 64);
        let mut s = long64();
        s.gprs.set(3, 0x2000);
        s.gprs.set(1, 3);
        assert_eq!(m.effective_address(&s), 0x2000 + 24 + 0x10);
        // Negative displacement wraps as on hardware.
        let d = decode_vmx(&[0x0f, 0xc7, 0x73, 0xf8], ExecMode::Long64, 0).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.effective_address(&s), 0x2000 - 8);
    }

    #[test]
    fn test_decode_address_size_prefix_truncates_effective_address() {
        // 67: [eax] in 64-bit mode.
        let d = decode_vmx(&[0x67, 0x0f, 0xc7, 0x30], ExecMode::Long64, 0).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.address_size, 32);
        let mut s = long64();
        s.gprs.set(0, 0xffff_ffff_0000_1000);
        assert_eq!(m.effective_address(&s), 0x1000);
        // Without the prefix the full RAX is used.
        let d = decode_vmx(&[0x0f, 0xc7, 0x30], ExecMode::Long64, 0).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.effective_address(&s), 0xffff_ffff_0000_1000);
    }

    #[test]
    fn test_decode_rip_relative_is_absolute() {
        // vmptrld [rip+0x100] at 0x4000, length 7.
        let bytes = [0x0f, 0xc7, 0x35, 0x00, 0x01, 0x00, 0x00];
        let d = decode_vmx(&bytes, ExecMode::Long64, 0x4000).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.base, AddrBase::Rip);
        assert_eq!(m.effective_address(&long64()), 0x4000 + 7 + 0x100);
    }

    #[test]
    fn test_decode_16_and_32_bit_modes() {
        // 32-bit: vmread eax, ebx; operand size 32.
        let d = decode_vmx(&[0x0f, 0x78, 0xd8], ExecMode::Protected { bits: 32 }, 0).unwrap();
        assert_eq!(d.operand_size, 32);
        // 16-bit: vmptrld [bx+si] (modrm 0x30 = [bx+si] with reg 6).
        let bytes = [0x0f, 0xc7, 0x30];
        assert_eq!(iced_text(&bytes, 16), "vmptrld qword ptr [bx+si]");
        let d = decode_vmx(&bytes, ExecMode::Protected { bits: 16 }, 0).unwrap();
        let Some(RegOrMem::Mem(m)) = d.rm else {
            panic!("memory operand expected")
        };
        assert_eq!(m.address_size, 16);
        let mut s = prot32();
        s.gprs.set(3, 0xfff0);
        s.gprs.set(6, 0x20);
        assert_eq!(m.effective_address(&s), 0x10, "16-bit wrap-around");
    }

    #[test]
    fn test_decode_errors_are_typed() {
        assert!(matches!(
            decode_vmx(&[0x90], ExecMode::Long64, 0),
            Err(DecodeError::NotVmx { .. })
        ));
        assert!(matches!(
            decode_vmx(&[0x0f, 0xc7], ExecMode::Long64, 0),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode_vmx(&[], ExecMode::Long64, 0),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode_vmx(&[0x0f, 0x0b], ExecMode::Long64, 0),
            Err(DecodeError::NotVmx { .. })
        ));
        // 0x06 (PUSH ES) is invalid in 64-bit mode.
        assert_eq!(iced_text(&[0x06], 64), "(bad)");
        assert!(matches!(
            decode_vmx(&[0x06, 0x90, 0x90, 0x90], ExecMode::Long64, 0),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn test_exec_mode_of_state() {
        assert_eq!(ExecMode::of(&long64()), ExecMode::Long64);
        assert_eq!(ExecMode::of(&prot32()), ExecMode::Protected { bits: 32 });
        let mut s = long64();
        s.cs.ar = 0xc09b;
        assert_eq!(ExecMode::of(&s), ExecMode::Compatibility { bits: 32 });
        let mut s = prot32();
        s.cr0 = 0;
        assert_eq!(ExecMode::of(&s), ExecMode::Real);
        let mut s = prot32();
        s.rflags |= VcpuState::RFLAGS_VM;
        assert_eq!(ExecMode::of(&s), ExecMode::Virtual8086);
    }

    #[test]
    fn test_vmptrld_reads_pointer_and_completes() {
        let mut s = prot32();
        s.gprs.set(0, 0x3000);
        s.rflags = 0x2 | 0x8d5;
        let mut mem = FlatMemory::new(0x10000);
        mem.write_u64(0x3000, 0x5000).unwrap();
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        let step = emulate_vmx(&mut s, &[0x0f, 0xc7, 0x30], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::Completed {
                kind: VmxInstruction::Vmptrld,
                outcome: VmxOutcome::Succeed
            }
        );
        assert_eq!(m.requests, vec![VmxRequest::Vmptrld { ptr: 0x5000 }]);
        assert_eq!(s.rip, 0x1003);
        assert_eq!(s.rflags, 0x2);
    }

    #[test]
    fn test_vmfail_sets_flags_and_advances_rip() {
        let mut s = long64();
        let mut mem = FlatMemory::new(0x10000);
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::FailValid(
            VmInstructionError::VmlaunchNonClearVmcs,
        )));
        let step = emulate_vmx(&mut s, &[0x0f, 0x01, 0xc2], true, &mut m, &mut mem).unwrap();
        assert!(matches!(step, VmxStep::Completed { .. }));
        assert_eq!(s.rflags, 0x2 | vmcs12::outcome::RFLAGS_ZF);
        assert_eq!(s.rip, 0x1003);
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::FailInvalid));
        emulate_vmx(&mut s, &[0x0f, 0x01, 0xc2], true, &mut m, &mut mem).unwrap();
        assert_eq!(s.rflags, 0x2 | vmcs12::outcome::RFLAGS_CF);
        assert_eq!(s.rip, 0x1006);
    }

    #[test]
    fn test_vmread_to_register_and_memory() {
        let mut mem = FlatMemory::new(0x10000);
        // vmread rax, rbx
        let mut s = long64();
        s.gprs.set(3, 0x681e);
        let mut m = Scripted::new(VmxResponse::Value(VmxOutcome::Succeed, 0xdead_beef_cafe));
        emulate_vmx(&mut s, &[0x0f, 0x78, 0xd8], true, &mut m, &mut mem).unwrap();
        assert_eq!(m.requests, vec![VmxRequest::Vmread { encoding: 0x681e }]);
        assert_eq!(s.gprs.get(0), 0xdead_beef_cafe);
        // vmread [rcx], rbx writes 8 bytes in 64-bit mode.
        s.gprs.set(1, 0x2000);
        emulate_vmx(&mut s, &[0x0f, 0x78, 0x19], true, &mut m, &mut mem).unwrap();
        assert_eq!(mem.read_u64(0x2000).unwrap(), 0xdead_beef_cafe);
        // 32-bit mode: 4 bytes, the next 4 untouched.
        let mut s = prot32();
        s.gprs.set(1, 0x3000);
        mem.write_u64(0x3000, u64::MAX).unwrap();
        emulate_vmx(&mut s, &[0x0f, 0x78, 0x19], true, &mut m, &mut mem).unwrap();
        assert_eq!(mem.read_u64(0x3000).unwrap(), 0xffff_ffff_beef_cafe);
    }

    #[test]
    fn test_failed_vmread_writes_nothing() {
        let mut mem = FlatMemory::new(0x10000);
        let mut s = long64();
        s.gprs.set(0, 0x1234);
        let fail = VmxOutcome::FailValid(VmInstructionError::UnsupportedVmcsComponent);
        let mut m = Scripted::new(VmxResponse::Value(fail, 0x5555));
        let step = emulate_vmx(&mut s, &[0x0f, 0x78, 0xd8], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::Completed {
                kind: VmxInstruction::Vmread,
                outcome: fail
            }
        );
        assert_eq!(s.gprs.get(0), 0x1234);
    }

    #[test]
    fn test_vmwrite_value_from_memory_32bit_is_4_bytes() {
        let mut mem = FlatMemory::new(0x10000);
        mem.write_u64(0x2000, 0x1111_2222_3333_4444).unwrap();
        let mut s = prot32();
        s.gprs.set(3, 0x4002); // field encoding in EBX
        s.gprs.set(0, 0x2000);
        // vmwrite ebx, [eax]
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        emulate_vmx(&mut s, &[0x0f, 0x79, 0x18], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            m.requests,
            vec![VmxRequest::Vmwrite {
                encoding: 0x4002,
                value: 0x3333_4444
            }]
        );
    }

    #[test]
    fn test_vmptrst_stores_pointer() {
        let mut mem = FlatMemory::new(0x10000);
        let mut s = long64();
        s.gprs.set(0, 0x2008);
        let mut m = Scripted::new(VmxResponse::Value(VmxOutcome::Succeed, 0x7000));
        emulate_vmx(&mut s, &[0x0f, 0xc7, 0x38], true, &mut m, &mut mem).unwrap();
        assert_eq!(mem.read_u64(0x2008).unwrap(), 0x7000);
    }

    #[test]
    fn test_invept_reads_type_and_descriptor() {
        let mut mem = FlatMemory::new(0x10000);
        mem.write_u64(0x2000, 0xabc0_001e).unwrap();
        mem.write_u64(0x2008, 0).unwrap();
        let mut s = long64();
        s.gprs.set(0, 1);
        s.gprs.set(3, 0x2000);
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        emulate_vmx(
            &mut s,
            &[0x66, 0x0f, 0x38, 0x80, 0x03],
            true,
            &mut m,
            &mut mem,
        )
        .unwrap();
        assert_eq!(
            m.requests,
            vec![VmxRequest::Invept {
                ty: 1,
                descriptor: [0xabc0_001e, 0]
            }]
        );
        assert_eq!(s.rip, 0x1005);
    }

    #[test]
    fn test_ud_and_gp_come_before_memory_faults() {
        let mut mem = FlatMemory::new(0x10000);
        // EAX points outside RAM: would be an error if it were read.
        let mut s = prot32();
        s.gprs.set(0, 0x20000);
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        m.in_vmx = false;
        let step = emulate_vmx(&mut s, &[0x0f, 0xc7, 0x30], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::Fault {
                kind: VmxInstruction::Vmptrld,
                fault: VmxFault::InvalidOpcode
            }
        );
        // CPL 3 in VMX operation: #GP, RIP unchanged, nothing executed.
        m.in_vmx = true;
        s.cs.ar |= 3 << 5;
        let step = emulate_vmx(&mut s, &[0x0f, 0xc7, 0x30], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::Fault {
                kind: VmxInstruction::Vmptrld,
                fault: VmxFault::GeneralProtection
            }
        );
        assert_eq!(s.rip, 0x1000);
        assert!(m.requests.is_empty());
        // CPL 0: now the operand is read, and it is outside RAM.
        s.cs.ar &= !(3 << 5);
        let e = emulate_vmx(&mut s, &[0x0f, 0xc7, 0x30], true, &mut m, &mut mem).unwrap_err();
        assert!(matches!(e, EmulError::OutsideRam { .. }), "{e}");
    }

    #[test]
    fn test_vmxon_needs_virtual_vmxe() {
        let mut mem = FlatMemory::new(0x10000);
        let mut s = long64();
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        m.in_vmx = false;
        let vmxon = [0xf3, 0x0f, 0xc7, 0x30];
        let step = emulate_vmx(&mut s, &vmxon, false, &mut m, &mut mem).unwrap();
        assert!(matches!(
            step,
            VmxStep::Fault {
                fault: VmxFault::InvalidOpcode,
                ..
            }
        ));
        let step = emulate_vmx(&mut s, &vmxon, true, &mut m, &mut mem).unwrap();
        assert!(matches!(step, VmxStep::Completed { .. }));
        assert_eq!(insn_context(&s, true).cr4 & CR4_VMXE, CR4_VMXE);
        assert_eq!(insn_context(&s, false).cr4 & CR4_VMXE, 0);
    }

    #[test]
    fn test_vmx_in_real_compat_and_vmfunc_is_ud() {
        let mut mem = FlatMemory::new(0x10000);
        let mut m = Scripted::new(VmxResponse::Outcome(VmxOutcome::Succeed));
        let mut real = prot32();
        real.cr0 = 0;
        real.cs.ar = 0x93;
        let mut compat = long64();
        compat.cs.ar = 0xc09b;
        for mut s in [real, compat] {
            let step = emulate_vmx(&mut s, &[0x0f, 0x01, 0xc4], true, &mut m, &mut mem).unwrap();
            assert_eq!(
                step,
                VmxStep::Fault {
                    kind: VmxInstruction::Vmxoff,
                    fault: VmxFault::InvalidOpcode
                }
            );
        }
        let mut s = long64();
        let step = emulate_vmx(&mut s, &[0x0f, 0x01, 0xd4], true, &mut m, &mut mem).unwrap();
        assert!(matches!(
            step,
            VmxStep::Fault {
                fault: VmxFault::InvalidOpcode,
                ..
            }
        ));
        assert!(m.requests.is_empty());
    }

    #[test]
    fn test_segment_limit_gives_gp_or_ss() {
        let mut s = prot32();
        s.ds.limit = 0x2fff;
        s.gprs.set(0, 0x2ffc); // 8 bytes at 0x2ffc cross the limit
        let op = MemOperand {
            segment: SegReg::Ds,
            base: AddrBase::Gpr(0),
            index: None,
            scale: 1,
            displacement: 0,
            address_size: 32,
        };
        assert_eq!(
            linear_address(&s, &op, 8, Access::Read),
            Err(VmxFault::GeneralProtection)
        );
        assert_eq!(linear_address(&s, &op, 4, Access::Read), Ok(0x2ffc));
        let ss_op = MemOperand {
            segment: SegReg::Ss,
            ..op
        };
        s.ss.limit = 0x2fff;
        assert_eq!(
            linear_address(&s, &ss_op, 8, Access::Read),
            Err(VmxFault::StackFault)
        );
        // Segment base is added, modulo 4 GiB.
        s.ds.base = 0xffff_f000;
        s.ds.limit = 0xffff_ffff;
        assert_eq!(linear_address(&s, &op, 8, Access::Read), Ok(0x1ffc));
    }

    #[test]
    fn test_segment_type_checks() {
        let mut s = prot32();
        let op = MemOperand {
            segment: SegReg::Ds,
            base: AddrBase::None,
            index: None,
            scale: 1,
            displacement: 0x100,
            address_size: 32,
        };
        s.ds.ar = 0xc091; // read-only data
        assert_eq!(linear_address(&s, &op, 8, Access::Read), Ok(0x100));
        assert_eq!(
            linear_address(&s, &op, 8, Access::Write),
            Err(VmxFault::GeneralProtection)
        );
        s.ds.ar = 0xc093 | Segment::AR_UNUSABLE;
        assert_eq!(
            linear_address(&s, &op, 8, Access::Read),
            Err(VmxFault::GeneralProtection)
        );
        // Expand-down: offsets above the limit are valid.
        s.ds.ar = 0xc097;
        s.ds.limit = 0xfff;
        assert_eq!(
            linear_address(&s, &op, 8, Access::Read),
            Err(VmxFault::GeneralProtection)
        );
        let high = MemOperand {
            displacement: 0x2000,
            ..op
        };
        assert_eq!(linear_address(&s, &high, 8, Access::Read), Ok(0x2000));
    }

    #[test]
    fn test_64bit_noncanonical_operand_is_gp_and_fs_base_applies() {
        let mut s = long64();
        let op = MemOperand {
            segment: SegReg::Ds,
            base: AddrBase::None,
            index: None,
            scale: 1,
            displacement: 0x0000_8000_0000_0000,
            address_size: 64,
        };
        assert_eq!(
            linear_address(&s, &op, 8, Access::Read),
            Err(VmxFault::GeneralProtection)
        );
        // DS base is ignored in 64-bit mode, FS base is not.
        s.ds.base = 0x1000;
        s.fs.base = 0x5000;
        let ds = MemOperand {
            displacement: 0x10,
            ..op
        };
        assert_eq!(linear_address(&s, &ds, 8, Access::Read), Ok(0x10));
        let fs = MemOperand {
            segment: SegReg::Fs,
            ..ds
        };
        assert_eq!(linear_address(&s, &fs, 8, Access::Read), Ok(0x5010));
        // fs: vmptrld [rax] decodes with the FS override.
        let d = decode_vmx(&[0x64, 0x0f, 0xc7, 0x30], ExecMode::Long64, 0).unwrap();
        assert!(matches!(
            d.rm,
            Some(RegOrMem::Mem(MemOperand {
                segment: SegReg::Fs,
                ..
            }))
        ));
    }

    #[test]
    fn test_enter_l2_and_entry_failure_leave_rip() {
        let mut mem = FlatMemory::new(0x10000);
        let mut s = long64();
        let mut m = Scripted::new(VmxResponse::EnterL2 { launch: true });
        let step = emulate_vmx(&mut s, &[0x0f, 0x01, 0xc2], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::EnterL2 {
                kind: VmxInstruction::Vmlaunch
            }
        );
        assert_eq!(s.rip, 0x1000);
        let mut m = Scripted::new(VmxResponse::EntryFailure {
            basic_reason: 33,
            qualification: 0,
        });
        let step = emulate_vmx(&mut s, &[0x0f, 0x01, 0xc3], true, &mut m, &mut mem).unwrap();
        assert_eq!(
            step,
            VmxStep::EntryFailure {
                kind: VmxInstruction::Vmresume,
                basic_reason: 33,
                qualification: 0
            }
        );
        assert_eq!(s.rip, 0x1000);
    }

    #[test]
    fn test_fetch_insn_bytes_from_cs_rip() {
        let mut mem = FlatMemory::new(0x2000);
        mem.write(0x1ffd, &[0x0f, 0x01, 0xc2]).unwrap();
        let mut s = prot32();
        s.rip = 0x1ffd;
        // The page after the instruction is outside RAM: only 3 bytes.
        let bytes = fetch_insn_bytes(&s, &mut mem).unwrap().unwrap();
        assert_eq!(bytes, vec![0x0f, 0x01, 0xc2]);
        assert_eq!(
            decode_vmx(&bytes, ExecMode::of(&s), s.rip).unwrap().kind,
            VmxInstruction::Vmlaunch
        );
        s.rip = 0x5000;
        assert!(fetch_insn_bytes(&s, &mut mem).is_err());
    }

    #[test]
    fn test_fault_vectors() {
        assert_eq!(fault_vector(VmxFault::InvalidOpcode), (6, None, None));
        assert_eq!(
            fault_vector(VmxFault::GeneralProtection),
            (13, Some(0), None)
        );
        assert_eq!(fault_vector(VmxFault::StackFault), (12, Some(0), None));
        assert_eq!(
            fault_vector(VmxFault::PageFault {
                linear_address: 0x1234,
                error_code: 2
            }),
            (14, Some(2), Some(0x1234))
        );
    }

    /// A 64-bit L1 with 4-level paging over a 1 MiB RAM: identity 4 KiB
    /// pages for 0..0x80000 except the page at 0x40000 (not present), and
    /// linear 0x9000_0000 mapped read-only to 0x50000.
    fn paged64() -> (VcpuState, FlatMemory) {
        let mut mem = FlatMemory::new(0x10_0000);
        let (pml4, pdpt, pd, pt, pt2) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64, 0x5000u64);
        mem.write_u64(pml4, pdpt | 3).unwrap();
        mem.write_u64(pdpt, pd | 3).unwrap();
        mem.write_u64(pd, pt | 3).unwrap();
        for i in 0..0x80u64 {
            if i != 0x40 {
                mem.write_u64(pt + i * 8, (i << 12) | 3).unwrap();
            }
        }
        // 0x9000_0000: PDPT index 2, PD index 128, PT index 0.
        let pd2 = 0x6000u64;
        mem.write_u64(pdpt + 2 * 8, pd2 | 3).unwrap();
        mem.write_u64(pd2 + 128 * 8, pt2 | 3).unwrap();
        mem.write_u64(pt2, 0x50000 | 1).unwrap();
        let mut s = long64();
        s.cr0 = CR0_PE | (1 << 5) | (1 << 31) | (1 << 16);
        s.cr3 = pml4;
        s.cr4 = 1 << 5;
        (s, mem)
    }

    fn run(s: &mut VcpuState, cpu: &mut VmxCpu, mem: &mut FlatMemory, bytes: &[u8]) -> VmxStep {
        emulate_vmx(s, bytes, true, cpu, mem).unwrap()
    }

    fn ok(kind: VmxInstruction) -> VmxStep {
        VmxStep::Completed {
            kind,
            outcome: VmxOutcome::Succeed,
        }
    }

    #[test]
    fn test_real_vmxcpu_sequence_through_paging() {
        let (mut s, mut mem) = paged64();
        let mut cpu = VmxCpu::new(vmcs12::VmxCapabilities::default());
        let rev = cpu.caps().vmcs_revision_id();
        mem.write_u32(0x10000, rev).unwrap(); // VMXON region
        mem.write_u32(0x11000, rev).unwrap(); // VMCS region
        mem.write_u64(0x20000, 0x10000).unwrap();
        mem.write_u64(0x20008, 0x11000).unwrap();
        // vmxon [rax]
        s.gprs.set(0, 0x20000);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0xf3, 0x0f, 0xc7, 0x30]),
            ok(VmxInstruction::Vmxon)
        );
        // VMXON again, operand outside RAM: not read, VMfailInvalid (no
        // current VMCS yet) rather than an error or #PF.
        s.gprs.set(0, 0x7fff_0000);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0xf3, 0x0f, 0xc7, 0x30]),
            VmxStep::Completed {
                kind: VmxInstruction::Vmxon,
                outcome: VmxOutcome::FailInvalid
            }
        );
        // vmclear [rax]; vmptrld [rax]
        s.gprs.set(0, 0x20008);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x66, 0x0f, 0xc7, 0x30]),
            ok(VmxInstruction::Vmclear)
        );
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0xc7, 0x30]),
            ok(VmxInstruction::Vmptrld)
        );
        // vmwrite rbx, rax: GUEST_RIP (0x681e) = 0x1234_5678_9abc
        s.gprs.set(3, 0x681e);
        s.gprs.set(0, 0x1234_5678_9abc);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x79, 0xd8]),
            ok(VmxInstruction::Vmwrite)
        );
        // vmread [rcx], rbx
        s.gprs.set(1, 0x30000);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x78, 0x19]),
            ok(VmxInstruction::Vmread)
        );
        assert_eq!(mem.read_u64(0x30000).unwrap(), 0x1234_5678_9abc);
        // vmptrst [rcx]
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0xc7, 0x39]),
            ok(VmxInstruction::Vmptrst)
        );
        assert_eq!(mem.read_u64(0x30000).unwrap(), 0x11000);
        // vmwrite to a read-only field (VM_EXIT_REASON 0x4402): VMfailValid(13).
        s.gprs.set(3, 0x4402);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x79, 0xd8]),
            VmxStep::Completed {
                kind: VmxInstruction::Vmwrite,
                outcome: VmxOutcome::FailValid(VmInstructionError::VmwriteReadOnlyComponent)
            }
        );
        assert_eq!(s.rflags & 0x8d5, vmcs12::outcome::RFLAGS_ZF);
        // vmcall in root operation: VMfailValid(1), error in the VMCS.
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x01, 0xc1]),
            VmxStep::Completed {
                kind: VmxInstruction::Vmcall,
                outcome: VmxOutcome::FailValid(VmInstructionError::VmcallInVmxRoot)
            }
        );
        let vmcs = cpu.current_vmcs().unwrap();
        assert_eq!(vmcs.get(VmcsField::VM_INSTRUCTION_ERROR), 1);
        // vmxoff; then vmcall is #UD and vmread is #UD.
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x01, 0xc4]),
            ok(VmxInstruction::Vmxoff)
        );
        let rip = s.rip;
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x01, 0xc1]),
            VmxStep::Fault {
                kind: VmxInstruction::Vmcall,
                fault: VmxFault::InvalidOpcode
            }
        );
        assert_eq!(s.rip, rip);
    }

    #[test]
    fn test_operand_on_missing_page_is_page_fault_with_cr2() {
        let (mut s, mut mem) = paged64();
        let mut cpu = VmxCpu::new(vmcs12::VmxCapabilities::default());
        let rev = cpu.caps().vmcs_revision_id();
        mem.write_u32(0x10000, rev).unwrap();
        mem.write_u64(0x20000, 0x10000).unwrap();
        s.gprs.set(0, 0x20000);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0xf3, 0x0f, 0xc7, 0x30]),
            ok(VmxInstruction::Vmxon)
        );
        // vmptrld [rax] with RAX in the not-present page: #PF, W/R = 0, P = 0.
        s.gprs.set(0, 0x40010);
        let before = s;
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0xc7, 0x30]),
            VmxStep::Fault {
                kind: VmxInstruction::Vmptrld,
                fault: VmxFault::PageFault {
                    linear_address: 0x40010,
                    error_code: 0
                }
            }
        );
        assert_eq!(s, before);
        // vmptrst [rax] to the read-only page: #PF with P and W/R set,
        // and the first bytes are not written.
        s.gprs.set(0, 0x9000_0000);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0xc7, 0x38]),
            VmxStep::Fault {
                kind: VmxInstruction::Vmptrst,
                fault: VmxFault::PageFault {
                    linear_address: 0x9000_0000,
                    error_code: 0b11
                }
            }
        );
        // An 8-byte write that crosses into the missing page faults there
        // (CR2 = the first byte in that page) and writes nothing.
        mem.write_u64(0x3fffc, 0).unwrap();
        s.gprs.set(0, 0x3fffc);
        s.gprs.set(3, 0x681e);
        // vmread [rax], rbx: needs a current VMCS, so VMfailInvalid, no write.
        let step = run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x78, 0x18]);
        assert_eq!(
            step,
            VmxStep::Completed {
                kind: VmxInstruction::Vmread,
                outcome: VmxOutcome::FailInvalid
            }
        );
        // Same with a current VMCS: the write faults on the second page.
        mem.write_u32(0x11000, rev).unwrap();
        mem.write_u64(0x20008, 0x11000).unwrap();
        s.gprs.set(0, 0x20008);
        assert_eq!(
            run(&mut s, &mut cpu, &mut mem, &[0x0f, 0xc7, 0x30]),
            ok(VmxInstruction::Vmptrld)
        );
        s.gprs.set(0, 0x3fffc);
        let step = run(&mut s, &mut cpu, &mut mem, &[0x0f, 0x78, 0x18]);
        assert_eq!(
            step,
            VmxStep::Fault {
                kind: VmxInstruction::Vmread,
                fault: VmxFault::PageFault {
                    linear_address: 0x40000,
                    error_code: 0b10
                }
            }
        );
        assert_eq!(mem.read_u64(0x3fffc).unwrap(), 0);
    }

    #[test]
    fn test_fetch_insn_bytes_through_paging() {
        let (mut s, mut mem) = paged64();
        mem.write(0x3fffd, &[0x0f, 0x01, 0xc2]).unwrap();
        s.rip = 0x3fffd;
        // The next page is not present: only the 3 bytes of this page.
        assert_eq!(
            fetch_insn_bytes(&s, &mut mem).unwrap().unwrap(),
            vec![0x0f, 0x01, 0xc2]
        );
        s.rip = 0x40000;
        assert!(matches!(
            fetch_insn_bytes(&s, &mut mem).unwrap(),
            Err(VmxFault::PageFault {
                linear_address: 0x40000,
                ..
            })
        ));
    }

    proptest! {
        /// Guest-controlled bytes, registers and mode never panic, and a
        /// fault or error never moves RIP.
        #[test]
        fn test_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..20),
            regs in proptest::array::uniform16(any::<u64>()),
            long in any::<bool>(),
            rip in any::<u64>(),
        ) {
            let mut s = if long { long64() } else { prot32() };
            s.gprs.regs = regs;
            s.rip = if long { rip } else { rip & 0xffff_ffff };
            let before = s;
            let mut mem = FlatMemory::new(0x4000);
            let mut m = Scripted::new(VmxResponse::Value(VmxOutcome::Succeed, 1));
            match emulate_vmx(&mut s, &bytes, true, &mut m, &mut mem) {
                Ok(VmxStep::Completed { .. }) => {
                    let mode = ExecMode::of(&before);
                    let d = decode_vmx(&bytes, mode, before.rip).unwrap();
                    let mask = size_mask(mode.bitness());
                    prop_assert_eq!(s.rip, before.rip.wrapping_add(u64::from(d.len)) & mask);
                }
                Ok(_) | Err(_) => prop_assert_eq!(s.rip, before.rip),
            }
        }

        /// VMX opcodes with random ModRM/SIB/displacement bytes, random
        /// registers and small register values (so operands often land in
        /// RAM): never a panic; completed instructions advance RIP by their
        /// length, everything else leaves the state alone.
        #[test]
        fn test_vmx_opcodes_with_random_operands(
            head in 0usize..9,
            tail in proptest::collection::vec(any::<u8>(), 0..12),
            regs in proptest::array::uniform16(0u64..0x5000),
            long in any::<bool>(),
        ) {
            let heads: [&[u8]; 9] = [
                &[0x0f, 0xc7], &[0xf3, 0x0f, 0xc7], &[0x66, 0x0f, 0xc7], &[0x0f, 0x78],
                &[0x0f, 0x79], &[0x66, 0x0f, 0x38, 0x80], &[0x66, 0x0f, 0x38, 0x81],
                &[0x67, 0x0f, 0x78], &[0x64, 0x0f, 0x79],
            ];
            let mut bytes = heads[head].to_vec();
            bytes.extend_from_slice(&tail);
            let mut s = if long { long64() } else { prot32() };
            s.gprs.regs = regs;
            let before = s;
            let mut mem = FlatMemory::new(0x4000);
            let mut m = Scripted::new(VmxResponse::Value(VmxOutcome::Succeed, 0xabcd));
            match emulate_vmx(&mut s, &bytes, true, &mut m, &mut mem) {
                Ok(VmxStep::Completed { .. }) => {
                    let mode = ExecMode::of(&before);
                    let d = decode_vmx(&bytes, mode, before.rip).unwrap();
                    prop_assert_eq!(s.rip, before.rip + u64::from(d.len));
                    prop_assert_eq!(m.requests.len(), 1);
                }
                Ok(_) | Err(_) => {
                    prop_assert_eq!(s.rip, before.rip);
                    prop_assert_eq!(s.gprs, before.gprs);
                }
            }
        }

        /// The effective address matches base + index * scale + disp,
        /// truncated to the address size.
        #[test]
        fn test_effective_address_matches_reference(
            base in any::<u64>(), index in any::<u64>(), disp in any::<i32>(),
            scale_log in 0u8..4, a32 in any::<bool>(),
        ) {
            let mut s = long64();
            s.gprs.set(3, base);
            s.gprs.set(6, index);
            let scale = 1u8 << scale_log;
            let sib = (scale_log << 6) | (6 << 3) | 3;
            let mut bytes = Vec::new();
            if a32 { bytes.push(0x67); }
            bytes.extend_from_slice(&[0x0f, 0xc7, 0xb4, sib]);
            bytes.extend_from_slice(&disp.to_le_bytes());
            let d = decode_vmx(&bytes, ExecMode::Long64, 0).unwrap();
            let Some(RegOrMem::Mem(m)) = d.rm else { panic!("memory operand expected") };
            let full = base.wrapping_add(index.wrapping_mul(u64::from(scale))).wrapping_add(disp as i64 as u64);
            let expect = if a32 { full & 0xffff_ffff } else { full };
            prop_assert_eq!(m.effective_address(&s), expect);
            prop_assert_eq!(usize::from(d.len), bytes.len());
        }
    }
}
