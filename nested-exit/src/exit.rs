//! The decoded VM-exit model: one variant per basic exit reason of SDM
//! Vol. 3 Appendix C ("VMX Basic Exit Reasons", Table C-1), each carrying
//! its decoded exit qualification and the exit information that goes with
//! it (SDM 28.2.1 "Basic VM-Exit Information", 28.2.2, 28.2.4, 28.2.5).
//!
//! [`Exit::from_info`] decodes the raw [`ExitInfo`] (plus what is not in it,
//! [`ExitContext`]); [`Exit::to_info`] encodes it back. Reason numbers the
//! SDM does not define (35, 38, 42, 71 and anything above 79) are
//! [`ExitDecodeError::UnknownReason`].
//!
//! What `to_info` does not reproduce: the IDT-vectoring fields (not
//! modelled here; `prepare_vmcs12` takes them from the original
//! [`ExitInfo`]), the I/O RCX/RSI/RDI/RIP fields (SMI only), and the
//! instruction length of exits that carry none here (EPT violation,
//! APIC access, window and timer exits).

use bitflags::bitflags;
use serde::{Deserialize, Serialize};

use crate::exit_info::ExitInfo;
use crate::state::Gprs;

/// Why a raw exit record does not decode into an [`Exit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExitDecodeError {
    /// Basic reason not listed in SDM Appendix C.
    #[error("basic exit reason {0} is not defined in SDM Appendix C; check the VM_EXIT_REASON value L0 read")]
    UnknownReason(u16),
    /// Bit 31 of VM_EXIT_REASON disagrees with the basic reason.
    #[error("exit reason {reason:#x}: bit 31 (VM-entry failure) must be set exactly for basic reasons 33, 34 and 41")]
    EntryFailureBit {
        /// The full VM_EXIT_REASON.
        reason: u32,
    },
    /// VM_EXIT_INTR_INFO is not valid or uses a reserved type.
    #[error("VM-exit interruption information {0:#x} is not valid for this exit (valid bit 31 clear or reserved type 1)")]
    InvalidInterruptionInfo(u32),
    /// A control-register exit names a CR other than 0, 3, 4 or 8.
    #[error(
        "control-register access qualification names CR{0}; only CR0, CR3, CR4 and CR8 cause exits"
    )]
    InvalidControlRegister(u8),
    /// An I/O exit has a size encoding other than 0, 1 or 3.
    #[error("I/O qualification size field {0} is reserved; only 0 (1 byte), 1 (2 bytes) and 3 (4 bytes) exist")]
    InvalidIoSize(u8),
    /// An APIC-access exit has a reserved access type.
    #[error("APIC-access qualification access type {0} is reserved (valid: 0-3, 10, 15)")]
    InvalidApicAccessType(u8),
    /// Instruction information with a reserved address size.
    #[error("instruction information address size {0} is reserved (valid: 0 = 16-bit, 1 = 32-bit, 2 = 64-bit)")]
    InvalidAddressSize(u8),
    /// Instruction information with a reserved segment register.
    #[error("instruction information segment register {0} is reserved (valid: 0-5 = ES..GS)")]
    InvalidSegment(u8),
}

// ---------------------------------------------------------------------------
// Interruption information (SDM 24.9.2, Table 24-19)
// ---------------------------------------------------------------------------

/// Interruption type, bits 10:8 of the interruption-information format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterruptionType {
    /// 0: external interrupt.
    ExternalInterrupt,
    /// 2: non-maskable interrupt.
    Nmi,
    /// 3: hardware exception.
    HardwareException,
    /// 4: software interrupt (INT n).
    SoftwareInterrupt,
    /// 5: privileged software exception (INT1).
    PrivilegedSoftwareException,
    /// 6: software exception (INT3, INTO).
    SoftwareException,
    /// 7: other event.
    OtherEvent,
}

impl InterruptionType {
    fn from_bits(t: u32) -> Option<Self> {
        Some(match t {
            0 => Self::ExternalInterrupt,
            2 => Self::Nmi,
            3 => Self::HardwareException,
            4 => Self::SoftwareInterrupt,
            5 => Self::PrivilegedSoftwareException,
            6 => Self::SoftwareException,
            7 => Self::OtherEvent,
            _ => return None,
        })
    }

    fn bits(self) -> u32 {
        match self {
            Self::ExternalInterrupt => 0,
            Self::Nmi => 2,
            Self::HardwareException => 3,
            Self::SoftwareInterrupt => 4,
            Self::PrivilegedSoftwareException => 5,
            Self::SoftwareException => 6,
            Self::OtherEvent => 7,
        }
    }
}

/// Decoded VM_EXIT_INTR_INFO (+ VM_EXIT_INTR_ERROR_CODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterruptionInfo {
    /// Bits 7:0.
    pub vector: u8,
    /// Bits 10:8.
    pub kind: InterruptionType,
    /// The error code, present when bit 11 is set.
    pub error_code: Option<u32>,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking_iret: bool,
}

impl InterruptionInfo {
    const VALID: u32 = 1 << 31;
    const HAS_ERROR_CODE: u32 = 1 << 11;
    const NMI_UNBLOCKING: u32 = 1 << 12;

    /// Decodes a valid interruption-information field and its error code.
    pub fn decode(info: u32, error_code: u32) -> Result<Self, ExitDecodeError> {
        if info & Self::VALID == 0 {
            return Err(ExitDecodeError::InvalidInterruptionInfo(info));
        }
        let kind = InterruptionType::from_bits((info >> 8) & 7)
            .ok_or(ExitDecodeError::InvalidInterruptionInfo(info))?;
        Ok(Self {
            vector: info as u8,
            kind,
            error_code: (info & Self::HAS_ERROR_CODE != 0).then_some(error_code),
            nmi_unblocking_iret: info & Self::NMI_UNBLOCKING != 0,
        })
    }

    /// Encodes `(VM_EXIT_INTR_INFO, VM_EXIT_INTR_ERROR_CODE)`.
    pub fn encode(&self) -> (u32, u32) {
        let mut info = Self::VALID | u32::from(self.vector) | (self.kind.bits() << 8);
        if self.error_code.is_some() {
            info |= Self::HAS_ERROR_CODE;
        }
        if self.nmi_unblocking_iret {
            info |= Self::NMI_UNBLOCKING;
        }
        (info, self.error_code.unwrap_or(0))
    }
}

bitflags! {
    /// Exit qualification of a debug exception (SDM 28.2.1, Table 28-1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DebugQualification: u64 {
        /// B0: breakpoint condition 0 met.
        const B0 = 1 << 0;
        /// B1.
        const B1 = 1 << 1;
        /// B2.
        const B2 = 1 << 2;
        /// B3.
        const B3 = 1 << 3;
        /// BD: debug-register access detected.
        const BD = 1 << 13;
        /// BS: single step.
        const BS = 1 << 14;
        /// RTM region.
        const RTM = 1 << 16;
    }
}

/// The exit qualification of exit reason 0 (SDM 28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionQualification {
    /// #PF: the faulting linear address (what CR2 would hold).
    PageFault {
        /// Linear address.
        cr2: u64,
    },
    /// #DB: the DR6-style bits.
    Debug(DebugQualification),
    /// Every other exception and NMI: the qualification is undefined (0).
    None,
}

// ---------------------------------------------------------------------------
// Exit qualifications
// ---------------------------------------------------------------------------

/// Source of a task switch (Table 28-2, bits 31:30).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskSwitchSource {
    /// 0: CALL instruction.
    Call,
    /// 1: IRET instruction.
    Iret,
    /// 2: JMP instruction.
    Jmp,
    /// 3: task gate in the IDT.
    IdtTaskGate,
}

/// Exit qualification for task switches (SDM Table 28-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskSwitchQualification {
    /// Bits 15:0: selector of the new TSS.
    pub selector: u16,
    /// Bits 31:30.
    pub source: TaskSwitchSource,
}

impl TaskSwitchQualification {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Self {
        let source = match (q >> 30) & 3 {
            0 => TaskSwitchSource::Call,
            1 => TaskSwitchSource::Iret,
            2 => TaskSwitchSource::Jmp,
            _ => TaskSwitchSource::IdtTaskGate,
        };
        Self {
            selector: q as u16,
            source,
        }
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        let s = match self.source {
            TaskSwitchSource::Call => 0,
            TaskSwitchSource::Iret => 1,
            TaskSwitchSource::Jmp => 2,
            TaskSwitchSource::IdtTaskGate => 3,
        };
        u64::from(self.selector) | (s << 30)
    }
}

/// A control register that can cause a MOV-CR exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ControlReg {
    /// CR0.
    Cr0,
    /// CR3.
    Cr3,
    /// CR4.
    Cr4,
    /// CR8.
    Cr8,
}

impl ControlReg {
    /// The CR number.
    pub fn number(self) -> u8 {
        match self {
            Self::Cr0 => 0,
            Self::Cr3 => 3,
            Self::Cr4 => 4,
            Self::Cr8 => 8,
        }
    }
}

/// Access type of a control-register exit (Table 28-3, bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CrAccessType {
    /// 0: MOV to CR.
    MovToCr,
    /// 1: MOV from CR.
    MovFromCr,
    /// 2: CLTS.
    Clts,
    /// 3: LMSW.
    Lmsw,
}

/// LMSW operand type (Table 28-3, bit 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LmswOperand {
    /// 0: register.
    Register,
    /// 1: memory.
    Memory,
}

/// Exit qualification for control-register accesses (SDM Table 28-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CrAccess {
    /// Bits 3:0: the control register.
    pub cr: ControlReg,
    /// Bits 5:4.
    pub access: CrAccessType,
    /// Bit 6 (LMSW only).
    pub lmsw_operand: LmswOperand,
    /// Bits 11:8: the general-purpose register of MOV CR (0 = RAX ... 15 = R15).
    pub gpr: u8,
    /// Bits 31:16: LMSW source data.
    pub lmsw_source: u16,
}

impl CrAccess {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Result<Self, ExitDecodeError> {
        let n = (q & 0xf) as u8;
        let cr = match n {
            0 => ControlReg::Cr0,
            3 => ControlReg::Cr3,
            4 => ControlReg::Cr4,
            8 => ControlReg::Cr8,
            _ => return Err(ExitDecodeError::InvalidControlRegister(n)),
        };
        let access = match (q >> 4) & 3 {
            0 => CrAccessType::MovToCr,
            1 => CrAccessType::MovFromCr,
            2 => CrAccessType::Clts,
            _ => CrAccessType::Lmsw,
        };
        let lmsw_operand = if q & (1 << 6) != 0 {
            LmswOperand::Memory
        } else {
            LmswOperand::Register
        };
        Ok(Self {
            cr,
            access,
            lmsw_operand,
            gpr: ((q >> 8) & 0xf) as u8,
            lmsw_source: (q >> 16) as u16,
        })
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        let access = match self.access {
            CrAccessType::MovToCr => 0,
            CrAccessType::MovFromCr => 1,
            CrAccessType::Clts => 2,
            CrAccessType::Lmsw => 3,
        };
        let mem = matches!(self.lmsw_operand, LmswOperand::Memory) as u64;
        u64::from(self.cr.number())
            | (access << 4)
            | (mem << 6)
            | (u64::from(self.gpr & 0xf) << 8)
            | (u64::from(self.lmsw_source) << 16)
    }
}

/// Direction of a MOV DR (Table 28-4, bit 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DrDirection {
    /// 0: MOV to DR.
    ToDr,
    /// 1: MOV from DR.
    FromDr,
}

/// Exit qualification for MOV DR (SDM Table 28-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DrAccess {
    /// Bits 2:0: the debug register.
    pub dr: u8,
    /// Bit 4.
    pub direction: DrDirection,
    /// Bits 11:8: the general-purpose register.
    pub gpr: u8,
}

impl DrAccess {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Self {
        Self {
            dr: (q & 7) as u8,
            direction: if q & (1 << 4) != 0 {
                DrDirection::FromDr
            } else {
                DrDirection::ToDr
            },
            gpr: ((q >> 8) & 0xf) as u8,
        }
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        let dir = matches!(self.direction, DrDirection::FromDr) as u64;
        u64::from(self.dr & 7) | (dir << 4) | (u64::from(self.gpr & 0xf) << 8)
    }
}

/// Size of an I/O access (Table 28-5, bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IoSize {
    /// 0: 1 byte.
    One,
    /// 1: 2 bytes.
    Two,
    /// 3: 4 bytes.
    Four,
}

impl IoSize {
    /// The access size in bytes.
    pub fn bytes(self) -> u16 {
        match self {
            Self::One => 1,
            Self::Two => 2,
            Self::Four => 4,
        }
    }
}

/// Direction of an I/O access (Table 28-5, bit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IoDirection {
    /// 0: OUT.
    Out,
    /// 1: IN.
    In,
}

/// Operand encoding of an I/O instruction (Table 28-5, bit 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IoOperand {
    /// 0: port in DX.
    Dx,
    /// 1: immediate port.
    Immediate,
}

/// Exit qualification for I/O instructions (SDM Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoQualification {
    /// Bits 2:0.
    pub size: IoSize,
    /// Bit 3.
    pub direction: IoDirection,
    /// Bit 4: INS/OUTS.
    pub string: bool,
    /// Bit 5: REP prefixed.
    pub rep: bool,
    /// Bit 6.
    pub operand: IoOperand,
    /// Bits 31:16: the port.
    pub port: u16,
}

impl IoQualification {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Result<Self, ExitDecodeError> {
        let size = match q & 7 {
            0 => IoSize::One,
            1 => IoSize::Two,
            3 => IoSize::Four,
            s => return Err(ExitDecodeError::InvalidIoSize(s as u8)),
        };
        Ok(Self {
            size,
            direction: if q & (1 << 3) != 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            },
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            operand: if q & (1 << 6) != 0 {
                IoOperand::Immediate
            } else {
                IoOperand::Dx
            },
            port: (q >> 16) as u16,
        })
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        let size = match self.size {
            IoSize::One => 0,
            IoSize::Two => 1,
            IoSize::Four => 3,
        };
        size | ((matches!(self.direction, IoDirection::In) as u64) << 3)
            | ((self.string as u64) << 4)
            | ((self.rep as u64) << 5)
            | ((matches!(self.operand, IoOperand::Immediate) as u64) << 6)
            | (u64::from(self.port) << 16)
    }
}

bitflags! {
    /// Exit qualification for EPT violations (SDM Table 28-7).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptViolationQualification: u64 {
        /// Bit 0: the access was a data read.
        const READ = 1 << 0;
        /// Bit 1: the access was a data write.
        const WRITE = 1 << 1;
        /// Bit 2: the access was an instruction fetch.
        const FETCH = 1 << 2;
        /// Bit 3: the guest-physical address was readable.
        const READABLE = 1 << 3;
        /// Bit 4: the guest-physical address was writable.
        const WRITABLE = 1 << 4;
        /// Bit 5: executable (supervisor-mode executable with mode-based execute control).
        const EXECUTABLE = 1 << 5;
        /// Bit 6: user-mode executable (mode-based execute control).
        const USER_EXECUTABLE = 1 << 6;
        /// Bit 7: the guest-linear-address field is valid.
        const GLA_VALID = 1 << 7;
        /// Bit 8 (with bit 7): 1 = access to the translated address, 0 = paging-structure access.
        const TRANSLATED_ACCESS = 1 << 8;
        /// Bit 9: user-mode linear address (advanced VM-exit information).
        const USER_LINEAR = 1 << 9;
        /// Bit 10: read/write linear address (advanced VM-exit information).
        const WRITABLE_LINEAR = 1 << 10;
        /// Bit 11: execute-disable linear address (advanced VM-exit information).
        const XD_LINEAR = 1 << 11;
        /// Bit 12: NMI unblocking due to IRET.
        const NMI_UNBLOCKING = 1 << 12;
        /// Bit 13: shadow-stack access.
        const SHADOW_STACK = 1 << 13;
        /// Bit 14: supervisor shadow-stack page.
        const SUPERVISOR_SHADOW_STACK = 1 << 14;
        /// Bit 15: guest-paging verification.
        const PAGING_VERIFICATION = 1 << 15;
        /// Bit 16: asynchronous to instruction execution.
        const ASYNCHRONOUS = 1 << 16;
    }
}

/// Whether an EPT violation hit the final translation or a paging structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearAccessKind {
    /// Bit 8 = 1: access to the guest-physical address the linear address translates to.
    Translated,
    /// Bit 8 = 0: access to a guest paging-structure entry.
    PagingStructure,
}

impl EptViolationQualification {
    /// Decodes the qualification (undefined bits are dropped).
    pub fn decode(q: u64) -> Self {
        Self::from_bits_truncate(q)
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        self.bits()
    }

    /// Bit 8 interpreted, only when bit 7 says a linear address exists.
    pub fn linear_access(&self) -> Option<LinearAccessKind> {
        if !self.contains(Self::GLA_VALID) {
            return None;
        }
        Some(if self.contains(Self::TRANSLATED_ACCESS) {
            LinearAccessKind::Translated
        } else {
            LinearAccessKind::PagingStructure
        })
    }
}

/// Access type of an APIC-access exit (Table 28-6, bits 15:12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApicAccessType {
    /// 0: linear access for a data read during instruction execution.
    LinearRead,
    /// 1: linear access for a data write during instruction execution.
    LinearWrite,
    /// 2: linear access for an instruction fetch.
    LinearFetch,
    /// 3: linear access during event delivery.
    LinearEventDelivery,
    /// 10: guest-physical access during event delivery.
    PhysicalEventDelivery,
    /// 15: guest-physical access for an instruction fetch or during execution.
    PhysicalFetchOrExecution,
}

/// Exit qualification for APIC-access exits (SDM Table 28-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApicAccessQualification {
    /// Bits 11:0: page offset (linear accesses).
    pub offset: u16,
    /// Bits 15:12.
    pub access: ApicAccessType,
    /// Bit 16: asynchronous to instruction execution.
    pub asynchronous: bool,
}

impl ApicAccessQualification {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Result<Self, ExitDecodeError> {
        let t = ((q >> 12) & 0xf) as u8;
        let access = match t {
            0 => ApicAccessType::LinearRead,
            1 => ApicAccessType::LinearWrite,
            2 => ApicAccessType::LinearFetch,
            3 => ApicAccessType::LinearEventDelivery,
            10 => ApicAccessType::PhysicalEventDelivery,
            15 => ApicAccessType::PhysicalFetchOrExecution,
            _ => return Err(ExitDecodeError::InvalidApicAccessType(t)),
        };
        Ok(Self {
            offset: (q & 0xfff) as u16,
            access,
            asynchronous: q & (1 << 16) != 0,
        })
    }

    /// Encodes the qualification.
    pub fn encode(&self) -> u64 {
        let t: u64 = match self.access {
            ApicAccessType::LinearRead => 0,
            ApicAccessType::LinearWrite => 1,
            ApicAccessType::LinearFetch => 2,
            ApicAccessType::LinearEventDelivery => 3,
            ApicAccessType::PhysicalEventDelivery => 10,
            ApicAccessType::PhysicalFetchOrExecution => 15,
        };
        u64::from(self.offset & 0xfff) | (t << 12) | ((self.asynchronous as u64) << 16)
    }
}

// ---------------------------------------------------------------------------
// VM-exit instruction information (SDM 28.2.5, Tables 28-10, 28-11, 28-13, 28-14)
// ---------------------------------------------------------------------------

/// Address size of a memory operand (bits 9:7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressSize {
    /// 0: 16-bit.
    Bits16,
    /// 1: 32-bit.
    Bits32,
    /// 2: 64-bit.
    Bits64,
}

/// Segment register of a memory operand (bits 17:15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SegmentReg {
    /// 0.
    Es,
    /// 1.
    Cs,
    /// 2.
    Ss,
    /// 3.
    Ds,
    /// 4.
    Fs,
    /// 5.
    Gs,
}

/// The common layout of VMX_INSTRUCTION_INFO for descriptor-table and VMX
/// instructions: scaling 1:0, reg1 6:3, address size 9:7, register operand
/// 10, operand size 11, segment 17:15, index 21:18 (+ invalid 22), base
/// 26:23 (+ invalid 27), reg2 31:28.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstructionInfo {
    /// Bits 1:0: scale factor exponent (0 = 1 ... 3 = 8).
    pub scaling: u8,
    /// Bits 6:3: register operand 1 (VMREAD/VMWRITE, LLDT/LTR/SLDT/STR register form).
    pub reg1: u8,
    /// Bits 9:7.
    pub address_size: AddressSize,
    /// Bit 10: the operand is a register, not memory.
    pub register_operand: bool,
    /// Bit 11: operand size (SGDT/SIDT/LGDT/LIDT: 1 = 32-bit).
    pub operand_size_32: bool,
    /// Bits 17:15.
    pub segment: SegmentReg,
    /// Bits 21:18 unless bit 22 (index invalid) is set.
    pub index: Option<u8>,
    /// Bits 26:23 unless bit 27 (base invalid) is set.
    pub base: Option<u8>,
    /// Bits 31:28: register operand 2 (VMREAD/VMWRITE, INVEPT/INVVPID/INVPCID type register).
    pub reg2: u8,
}

impl InstructionInfo {
    /// Decodes the instruction-information field.
    pub fn decode(v: u32) -> Result<Self, ExitDecodeError> {
        let asz = ((v >> 7) & 7) as u8;
        let address_size = match asz {
            0 => AddressSize::Bits16,
            1 => AddressSize::Bits32,
            2 => AddressSize::Bits64,
            _ => return Err(ExitDecodeError::InvalidAddressSize(asz)),
        };
        let seg = ((v >> 15) & 7) as u8;
        let segment = match seg {
            0 => SegmentReg::Es,
            1 => SegmentReg::Cs,
            2 => SegmentReg::Ss,
            3 => SegmentReg::Ds,
            4 => SegmentReg::Fs,
            5 => SegmentReg::Gs,
            _ => return Err(ExitDecodeError::InvalidSegment(seg)),
        };
        Ok(Self {
            scaling: (v & 3) as u8,
            reg1: ((v >> 3) & 0xf) as u8,
            address_size,
            register_operand: v & (1 << 10) != 0,
            operand_size_32: v & (1 << 11) != 0,
            segment,
            index: (v & (1 << 22) == 0).then_some(((v >> 18) & 0xf) as u8),
            base: (v & (1 << 27) == 0).then_some(((v >> 23) & 0xf) as u8),
            reg2: ((v >> 28) & 0xf) as u8,
        })
    }

    /// Encodes the instruction-information field.
    pub fn encode(&self) -> u32 {
        let asz = match self.address_size {
            AddressSize::Bits16 => 0,
            AddressSize::Bits32 => 1,
            AddressSize::Bits64 => 2,
        };
        let seg = match self.segment {
            SegmentReg::Es => 0,
            SegmentReg::Cs => 1,
            SegmentReg::Ss => 2,
            SegmentReg::Ds => 3,
            SegmentReg::Fs => 4,
            SegmentReg::Gs => 5,
        };
        let index = match self.index {
            Some(i) => u32::from(i & 0xf) << 18,
            None => 1 << 22,
        };
        let base = match self.base {
            Some(b) => u32::from(b & 0xf) << 23,
            None => 1 << 27,
        };
        u32::from(self.scaling & 3)
            | (u32::from(self.reg1 & 0xf) << 3)
            | (asz << 7)
            | ((self.register_operand as u32) << 10)
            | ((self.operand_size_32 as u32) << 11)
            | (seg << 15)
            | index
            | base
            | (u32::from(self.reg2 & 0xf) << 28)
    }
}

/// A VMX (or INVPCID) instruction executed by L2 that carries operand
/// information: instruction information plus the displacement the SDM puts
/// in the exit qualification (SDM 28.2.1, 28.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstructionExit {
    /// VMX_INSTRUCTION_INFO.
    pub info: InstructionInfo,
    /// Exit qualification: the memory operand's displacement (0 for register operands).
    pub displacement: u64,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub len: u32,
}

/// Which descriptor-table instruction exited (bits 29:28 of the instruction information).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DescriptorTableInstruction {
    /// SGDT (reason 46, identity 0).
    Sgdt,
    /// SIDT (reason 46, identity 1).
    Sidt,
    /// LGDT (reason 46, identity 2).
    Lgdt,
    /// LIDT (reason 46, identity 3).
    Lidt,
    /// SLDT (reason 47, identity 0).
    Sldt,
    /// STR (reason 47, identity 1).
    Str,
    /// LLDT (reason 47, identity 2).
    Lldt,
    /// LTR (reason 47, identity 3).
    Ltr,
}

/// A descriptor-table exit (reasons 46 and 47, SDM Tables 28-10 and 28-11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTableExit {
    /// The instruction (its identity bits 29:28 are not kept in `info.reg2`).
    pub instruction: DescriptorTableInstruction,
    /// Operand information (`reg2` holds only bits 31:30, which are undefined).
    pub info: InstructionInfo,
    /// Exit qualification: displacement of the memory operand.
    pub displacement: u64,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub len: u32,
}

impl DescriptorTableExit {
    fn decode(ldtr_tr: bool, info: &ExitInfo) -> Result<Self, ExitDecodeError> {
        use DescriptorTableInstruction as D;
        let mut decoded = InstructionInfo::decode(info.instruction_info)?;
        let id = decoded.reg2 & 3;
        decoded.reg2 &= 0xc;
        let instruction = match (ldtr_tr, id) {
            (false, 0) => D::Sgdt,
            (false, 1) => D::Sidt,
            (false, 2) => D::Lgdt,
            (false, _) => D::Lidt,
            (true, 0) => D::Sldt,
            (true, 1) => D::Str,
            (true, 2) => D::Lldt,
            (true, _) => D::Ltr,
        };
        Ok(Self {
            instruction,
            info: decoded,
            displacement: info.qualification,
            len: info.instruction_len,
        })
    }

    fn identity(&self) -> u8 {
        use DescriptorTableInstruction as D;
        match self.instruction {
            D::Sgdt | D::Sldt => 0,
            D::Sidt | D::Str => 1,
            D::Lgdt | D::Lldt => 2,
            D::Lidt | D::Ltr => 3,
        }
    }

    fn encode_info(&self) -> u32 {
        let mut i = self.info;
        i.reg2 = (i.reg2 & 0xc) | self.identity();
        i.encode()
    }
}

// ---------------------------------------------------------------------------
// The exit
// ---------------------------------------------------------------------------

/// What L0 knows about an exit that the VM-exit information fields do not
/// hold (the L2's registers at the time of the exit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitContext {
    /// L2's ECX for RDMSR/WRMSR: the MSR index.
    pub msr_index: u32,
    /// For MOV to CR: the value of the source register (the CR's new value).
    pub cr_source: u64,
    /// L2's RAX (ENCLS/ENCLV/PCONFIG leaf).
    pub rax: u64,
    /// For VMREAD/VMWRITE: the field encoding from the register operand
    /// (used with VMCS shadowing to consult the VMREAD/VMWRITE bitmaps).
    pub vmcs_field: u64,
    /// L2's IA32_XSS (XSAVES/XRSTORS consult the XSS-exiting bitmap).
    pub xss: u64,
}

impl ExitContext {
    /// Builds the context from L2's registers at the exit: ECX is the MSR
    /// index, EAX the leaf; for a control-register exit (28) the source is
    /// the GPR named in the qualification (bits 11:8); for VMREAD/VMWRITE
    /// (23/25) the field encoding is in the register named by bits 31:28 of
    /// the instruction information. `xss` is L2's IA32_XSS.
    pub fn from_registers(info: &ExitInfo, gprs: &Gprs, xss: u64) -> Self {
        let reason = info.basic_reason();
        let cr_source = if reason == 28 {
            gprs.get(((info.qualification >> 8) & 0xf) as u8)
        } else {
            0
        };
        let vmcs_field = if matches!(reason, 23 | 25) {
            gprs.get((info.instruction_info >> 28) as u8)
        } else {
            0
        };
        Self {
            msr_index: gprs.get(1) as u32,
            cr_source,
            rax: gprs.get(0),
            vmcs_field,
            xss,
        }
    }
}

/// A decoded VM exit, one variant per basic exit reason (SDM Table C-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: exception or NMI.
    ExceptionOrNmi {
        /// VM_EXIT_INTR_INFO and error code.
        info: InterruptionInfo,
        /// The qualification (CR2 for #PF, DR6 bits for #DB).
        qualification: ExceptionQualification,
        /// Instruction length (software exceptions).
        len: u32,
    },
    /// 1: external interrupt.
    ExternalInterrupt {
        /// The vector when "acknowledge interrupt on exit" was set.
        vector: Option<u8>,
    },
    /// 2: triple fault.
    TripleFault,
    /// 3: INIT signal.
    InitSignal,
    /// 4: start-up IPI.
    StartupIpi {
        /// SIPI vector (qualification bits 7:0).
        vector: u8,
    },
    /// 5: I/O SMI.
    IoSmi {
        /// Raw qualification.
        qualification: u64,
    },
    /// 6: other SMI.
    OtherSmi {
        /// Raw qualification.
        qualification: u64,
    },
    /// 7: interrupt window.
    InterruptWindow,
    /// 8: NMI window.
    NmiWindow,
    /// 9: task switch.
    TaskSwitch {
        /// Table 28-2.
        qualification: TaskSwitchQualification,
        /// Instruction length (CALL/IRET/JMP sources).
        len: u32,
    },
    /// 10: CPUID.
    Cpuid {
        /// Instruction length.
        len: u32,
    },
    /// 11: GETSEC.
    Getsec {
        /// Instruction length.
        len: u32,
    },
    /// 12: HLT.
    Hlt {
        /// Instruction length.
        len: u32,
    },
    /// 13: INVD.
    Invd {
        /// Instruction length.
        len: u32,
    },
    /// 14: INVLPG.
    Invlpg {
        /// The linear-address operand (qualification).
        linear_address: u64,
        /// Instruction length.
        len: u32,
    },
    /// 15: RDPMC.
    Rdpmc {
        /// Instruction length.
        len: u32,
    },
    /// 16: RDTSC.
    Rdtsc {
        /// Instruction length.
        len: u32,
    },
    /// 17: RSM.
    Rsm {
        /// Instruction length.
        len: u32,
    },
    /// 18: VMCALL.
    Vmcall {
        /// Instruction length.
        len: u32,
    },
    /// 19: VMCLEAR.
    Vmclear(InstructionExit),
    /// 20: VMLAUNCH.
    Vmlaunch {
        /// Instruction length.
        len: u32,
    },
    /// 21: VMPTRLD.
    Vmptrld(InstructionExit),
    /// 22: VMPTRST.
    Vmptrst(InstructionExit),
    /// 23: VMREAD.
    Vmread {
        /// Operands.
        instr: InstructionExit,
        /// The field encoding from the register operand ([`ExitContext::vmcs_field`]).
        field: u64,
    },
    /// 24: VMRESUME.
    Vmresume {
        /// Instruction length.
        len: u32,
    },
    /// 25: VMWRITE.
    Vmwrite {
        /// Operands.
        instr: InstructionExit,
        /// The field encoding from the register operand ([`ExitContext::vmcs_field`]).
        field: u64,
    },
    /// 26: VMXOFF.
    Vmxoff {
        /// Instruction length.
        len: u32,
    },
    /// 27: VMXON.
    Vmxon(InstructionExit),
    /// 28: control-register access.
    CrAccess {
        /// Table 28-3.
        access: CrAccess,
        /// The value written by MOV to CR (from [`ExitContext::cr_source`]).
        written: Option<u64>,
        /// Instruction length.
        len: u32,
    },
    /// 29: MOV DR.
    MovDr {
        /// Table 28-4.
        access: DrAccess,
        /// Instruction length.
        len: u32,
    },
    /// 30: I/O instruction.
    Io {
        /// Table 28-5.
        io: IoQualification,
        /// Instruction length.
        len: u32,
    },
    /// 31: RDMSR.
    Rdmsr {
        /// ECX.
        msr: u32,
        /// Instruction length.
        len: u32,
    },
    /// 32: WRMSR.
    Wrmsr {
        /// ECX.
        msr: u32,
        /// Instruction length.
        len: u32,
    },
    /// 33: VM-entry failure due to invalid guest state.
    InvalidGuestState {
        /// 0, 2 (PDPTE), 3 (NMI injection) or 4 (VMCS link pointer) (SDM 27.8).
        qualification: u64,
    },
    /// 34: VM-entry failure due to MSR loading.
    MsrLoading {
        /// The failing entry of the VM-entry MSR-load area, numbered from 1.
        entry: u64,
    },
    /// 36: MWAIT.
    Mwait {
        /// Instruction length.
        len: u32,
    },
    /// 37: monitor trap flag.
    MonitorTrapFlag,
    /// 39: MONITOR.
    Monitor {
        /// Instruction length.
        len: u32,
    },
    /// 40: PAUSE.
    Pause {
        /// Instruction length.
        len: u32,
    },
    /// 41: VM-entry failure due to machine-check event.
    MachineCheckDuringEntry,
    /// 43: TPR below threshold.
    TprBelowThreshold,
    /// 44: APIC access.
    ApicAccess {
        /// Table 28-6.
        qualification: ApicAccessQualification,
    },
    /// 45: virtualized EOI.
    VirtualizedEoi {
        /// The vector whose EOI was virtualized.
        vector: u8,
    },
    /// 46: access to GDTR or IDTR.
    GdtrIdtrAccess(DescriptorTableExit),
    /// 47: access to LDTR or TR.
    LdtrTrAccess(DescriptorTableExit),
    /// 48: EPT violation.
    EptViolation {
        /// Table 28-7.
        qualification: EptViolationQualification,
        /// GUEST_PHYSICAL_ADDRESS.
        gpa: u64,
        /// GUEST_LINEAR_ADDRESS when qualification bit 7 is set.
        gla: Option<u64>,
    },
    /// 49: EPT misconfiguration.
    EptMisconfig {
        /// GUEST_PHYSICAL_ADDRESS.
        gpa: u64,
    },
    /// 50: INVEPT.
    Invept(InstructionExit),
    /// 51: RDTSCP.
    Rdtscp {
        /// Instruction length.
        len: u32,
    },
    /// 52: VMX-preemption timer expired.
    PreemptionTimer,
    /// 53: INVVPID.
    Invvpid(InstructionExit),
    /// 54: WBINVD or WBNOINVD.
    Wbinvd {
        /// Instruction length.
        len: u32,
    },
    /// 55: XSETBV.
    Xsetbv {
        /// Instruction length.
        len: u32,
    },
    /// 56: APIC write.
    ApicWrite {
        /// Page offset of the write (qualification bits 11:0).
        offset: u16,
    },
    /// 57: RDRAND.
    Rdrand {
        /// Raw instruction information (destination register 6:3, operand size 12:11).
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 58: INVPCID.
    Invpcid(InstructionExit),
    /// 59: VMFUNC.
    Vmfunc {
        /// Instruction length.
        len: u32,
    },
    /// 60: ENCLS.
    Encls {
        /// The leaf in EAX ([`ExitContext::rax`]).
        leaf: u32,
        /// Instruction length.
        len: u32,
    },
    /// 61: RDSEED.
    Rdseed {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 62: page-modification log full.
    PmlFull {
        /// Raw qualification (bit 12: NMI unblocking).
        qualification: u64,
    },
    /// 63: XSAVES.
    Xsaves {
        /// L2's IA32_XSS ([`ExitContext::xss`]).
        xss: u64,
        /// Instruction length.
        len: u32,
    },
    /// 64: XRSTORS.
    Xrstors {
        /// L2's IA32_XSS ([`ExitContext::xss`]).
        xss: u64,
        /// Instruction length.
        len: u32,
    },
    /// 65: PCONFIG.
    Pconfig {
        /// The leaf in EAX ([`ExitContext::rax`]).
        leaf: u32,
        /// Instruction length.
        len: u32,
    },
    /// 66: SPP-related event.
    SppEvent {
        /// Raw qualification.
        qualification: u64,
    },
    /// 67: UMWAIT.
    Umwait {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 68: TPAUSE.
    Tpause {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 69: LOADIWKEY.
    Loadiwkey {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 70: ENCLV.
    Enclv {
        /// The leaf in EAX ([`ExitContext::rax`]).
        leaf: u32,
        /// Instruction length.
        len: u32,
    },
    /// 72: ENQCMD PASID translation failure.
    EnqcmdPasidFailure {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 73: ENQCMDS PASID translation failure.
    EnqcmdsPasidFailure {
        /// Raw instruction information.
        info: u32,
        /// Instruction length.
        len: u32,
    },
    /// 74: bus lock.
    BusLock,
    /// 75: instruction timeout (notify window).
    InstructionTimeout {
        /// Raw qualification (bit 0: VM context invalid, bit 12: NMI unblocking).
        qualification: u64,
    },
    /// 76: SEAMCALL.
    Seamcall {
        /// Instruction length.
        len: u32,
    },
    /// 77: TDCALL.
    Tdcall {
        /// Instruction length.
        len: u32,
    },
    /// 78: RDMSRLIST.
    Rdmsrlist {
        /// Instruction length.
        len: u32,
    },
    /// 79: WRMSRLIST.
    Wrmsrlist {
        /// Instruction length.
        len: u32,
    },
}

/// Every basic reason defined by SDM Table C-1, ascending.
pub const DEFINED_REASONS: &[u16] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, 32, 33, 34, 36, 37, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52,
    53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 72, 73, 74, 75, 76, 77,
    78, 79,
];

impl Exit {
    /// Decodes a raw exit record. `ctx` supplies register values the
    /// VM-exit information fields do not hold.
    pub fn from_info(info: &ExitInfo, ctx: &ExitContext) -> Result<Exit, ExitDecodeError> {
        let reason = info.basic_reason();
        let failure = info.reason & ExitInfo::REASON_ENTRY_FAILURE != 0;
        // SDM 28.2.1: bit 31 is set only for VM-entry failures (33, 34, 41).
        if failure != matches!(reason, 33 | 34 | 41) {
            if !DEFINED_REASONS.contains(&reason) {
                return Err(ExitDecodeError::UnknownReason(reason));
            }
            return Err(ExitDecodeError::EntryFailureBit {
                reason: info.reason,
            });
        }
        let q = info.qualification;
        let len = info.instruction_len;
        let instr = || -> Result<InstructionExit, ExitDecodeError> {
            Ok(InstructionExit {
                info: InstructionInfo::decode(info.instruction_info)?,
                displacement: q,
                len,
            })
        };
        Ok(match reason {
            0 => {
                let i = InterruptionInfo::decode(info.intr_info, info.intr_error_code)?;
                let qualification = match (i.kind, i.vector) {
                    (InterruptionType::Nmi, _) => ExceptionQualification::None,
                    (_, 14) => ExceptionQualification::PageFault { cr2: q },
                    (_, 1) => {
                        ExceptionQualification::Debug(DebugQualification::from_bits_truncate(q))
                    }
                    _ => ExceptionQualification::None,
                };
                Exit::ExceptionOrNmi {
                    info: i,
                    qualification,
                    len,
                }
            }
            1 => Exit::ExternalInterrupt {
                vector: (info.intr_info & InterruptionInfo::VALID != 0)
                    .then_some(info.intr_info as u8),
            },
            2 => Exit::TripleFault,
            3 => Exit::InitSignal,
            4 => Exit::StartupIpi { vector: q as u8 },
            5 => Exit::IoSmi { qualification: q },
            6 => Exit::OtherSmi { qualification: q },
            7 => Exit::InterruptWindow,
            8 => Exit::NmiWindow,
            9 => Exit::TaskSwitch {
                qualification: TaskSwitchQualification::decode(q),
                len,
            },
            10 => Exit::Cpuid { len },
            11 => Exit::Getsec { len },
            12 => Exit::Hlt { len },
            13 => Exit::Invd { len },
            14 => Exit::Invlpg {
                linear_address: q,
                len,
            },
            15 => Exit::Rdpmc { len },
            16 => Exit::Rdtsc { len },
            17 => Exit::Rsm { len },
            18 => Exit::Vmcall { len },
            19 => Exit::Vmclear(instr()?),
            20 => Exit::Vmlaunch { len },
            21 => Exit::Vmptrld(instr()?),
            22 => Exit::Vmptrst(instr()?),
            23 => Exit::Vmread {
                instr: instr()?,
                field: ctx.vmcs_field,
            },
            24 => Exit::Vmresume { len },
            25 => Exit::Vmwrite {
                instr: instr()?,
                field: ctx.vmcs_field,
            },
            26 => Exit::Vmxoff { len },
            27 => Exit::Vmxon(instr()?),
            28 => {
                let access = CrAccess::decode(q)?;
                let written =
                    matches!(access.access, CrAccessType::MovToCr).then_some(ctx.cr_source);
                Exit::CrAccess {
                    access,
                    written,
                    len,
                }
            }
            29 => Exit::MovDr {
                access: DrAccess::decode(q),
                len,
            },
            30 => Exit::Io {
                io: IoQualification::decode(q)?,
                len,
            },
            31 => Exit::Rdmsr {
                msr: ctx.msr_index,
                len,
            },
            32 => Exit::Wrmsr {
                msr: ctx.msr_index,
                len,
            },
            33 => Exit::InvalidGuestState { qualification: q },
            34 => Exit::MsrLoading { entry: q },
            36 => Exit::Mwait { len },
            37 => Exit::MonitorTrapFlag,
            39 => Exit::Monitor { len },
            40 => Exit::Pause { len },
            41 => Exit::MachineCheckDuringEntry,
            43 => Exit::TprBelowThreshold,
            44 => Exit::ApicAccess {
                qualification: ApicAccessQualification::decode(q)?,
            },
            45 => Exit::VirtualizedEoi { vector: q as u8 },
            46 => Exit::GdtrIdtrAccess(DescriptorTableExit::decode(false, info)?),
            47 => Exit::LdtrTrAccess(DescriptorTableExit::decode(true, info)?),
            48 => {
                let qualification = EptViolationQualification::decode(q);
                Exit::EptViolation {
                    qualification,
                    gpa: info.guest_physical_address,
                    gla: qualification
                        .contains(EptViolationQualification::GLA_VALID)
                        .then_some(info.guest_linear_address),
                }
            }
            49 => Exit::EptMisconfig {
                gpa: info.guest_physical_address,
            },
            50 => Exit::Invept(instr()?),
            51 => Exit::Rdtscp { len },
            52 => Exit::PreemptionTimer,
            53 => Exit::Invvpid(instr()?),
            54 => Exit::Wbinvd { len },
            55 => Exit::Xsetbv { len },
            56 => Exit::ApicWrite {
                offset: (q & 0xfff) as u16,
            },
            57 => Exit::Rdrand {
                info: info.instruction_info,
                len,
            },
            58 => Exit::Invpcid(instr()?),
            59 => Exit::Vmfunc { len },
            60 => Exit::Encls {
                leaf: ctx.rax as u32,
                len,
            },
            61 => Exit::Rdseed {
                info: info.instruction_info,
                len,
            },
            62 => Exit::PmlFull { qualification: q },
            63 => Exit::Xsaves { xss: ctx.xss, len },
            64 => Exit::Xrstors { xss: ctx.xss, len },
            65 => Exit::Pconfig {
                leaf: ctx.rax as u32,
                len,
            },
            66 => Exit::SppEvent { qualification: q },
            67 => Exit::Umwait {
                info: info.instruction_info,
                len,
            },
            68 => Exit::Tpause {
                info: info.instruction_info,
                len,
            },
            69 => Exit::Loadiwkey {
                info: info.instruction_info,
                len,
            },
            70 => Exit::Enclv {
                leaf: ctx.rax as u32,
                len,
            },
            72 => Exit::EnqcmdPasidFailure {
                info: info.instruction_info,
                len,
            },
            73 => Exit::EnqcmdsPasidFailure {
                info: info.instruction_info,
                len,
            },
            74 => Exit::BusLock,
            75 => Exit::InstructionTimeout { qualification: q },
            76 => Exit::Seamcall { len },
            77 => Exit::Tdcall { len },
            78 => Exit::Rdmsrlist { len },
            79 => Exit::Wrmsrlist { len },
            other => return Err(ExitDecodeError::UnknownReason(other)),
        })
    }

    /// The basic exit reason (SDM Table C-1).
    pub fn basic_reason(&self) -> u16 {
        match self {
            Exit::ExceptionOrNmi { .. } => 0,
            Exit::ExternalInterrupt { .. } => 1,
            Exit::TripleFault => 2,
            Exit::InitSignal => 3,
            Exit::StartupIpi { .. } => 4,
            Exit::IoSmi { .. } => 5,
            Exit::OtherSmi { .. } => 6,
            Exit::InterruptWindow => 7,
            Exit::NmiWindow => 8,
            Exit::TaskSwitch { .. } => 9,
            Exit::Cpuid { .. } => 10,
            Exit::Getsec { .. } => 11,
            Exit::Hlt { .. } => 12,
            Exit::Invd { .. } => 13,
            Exit::Invlpg { .. } => 14,
            Exit::Rdpmc { .. } => 15,
            Exit::Rdtsc { .. } => 16,
            Exit::Rsm { .. } => 17,
            Exit::Vmcall { .. } => 18,
            Exit::Vmclear(_) => 19,
            Exit::Vmlaunch { .. } => 20,
            Exit::Vmptrld(_) => 21,
            Exit::Vmptrst(_) => 22,
            Exit::Vmread { .. } => 23,
            Exit::Vmresume { .. } => 24,
            Exit::Vmwrite { .. } => 25,
            Exit::Vmxoff { .. } => 26,
            Exit::Vmxon(_) => 27,
            Exit::CrAccess { .. } => 28,
            Exit::MovDr { .. } => 29,
            Exit::Io { .. } => 30,
            Exit::Rdmsr { .. } => 31,
            Exit::Wrmsr { .. } => 32,
            Exit::InvalidGuestState { .. } => 33,
            Exit::MsrLoading { .. } => 34,
            Exit::Mwait { .. } => 36,
            Exit::MonitorTrapFlag => 37,
            Exit::Monitor { .. } => 39,
            Exit::Pause { .. } => 40,
            Exit::MachineCheckDuringEntry => 41,
            Exit::TprBelowThreshold => 43,
            Exit::ApicAccess { .. } => 44,
            Exit::VirtualizedEoi { .. } => 45,
            Exit::GdtrIdtrAccess(_) => 46,
            Exit::LdtrTrAccess(_) => 47,
            Exit::EptViolation { .. } => 48,
            Exit::EptMisconfig { .. } => 49,
            Exit::Invept(_) => 50,
            Exit::Rdtscp { .. } => 51,
            Exit::PreemptionTimer => 52,
            Exit::Invvpid(_) => 53,
            Exit::Wbinvd { .. } => 54,
            Exit::Xsetbv { .. } => 55,
            Exit::ApicWrite { .. } => 56,
            Exit::Rdrand { .. } => 57,
            Exit::Invpcid(_) => 58,
            Exit::Vmfunc { .. } => 59,
            Exit::Encls { .. } => 60,
            Exit::Rdseed { .. } => 61,
            Exit::PmlFull { .. } => 62,
            Exit::Xsaves { .. } => 63,
            Exit::Xrstors { .. } => 64,
            Exit::Pconfig { .. } => 65,
            Exit::SppEvent { .. } => 66,
            Exit::Umwait { .. } => 67,
            Exit::Tpause { .. } => 68,
            Exit::Loadiwkey { .. } => 69,
            Exit::Enclv { .. } => 70,
            Exit::EnqcmdPasidFailure { .. } => 72,
            Exit::EnqcmdsPasidFailure { .. } => 73,
            Exit::BusLock => 74,
            Exit::InstructionTimeout { .. } => 75,
            Exit::Seamcall { .. } => 76,
            Exit::Tdcall { .. } => 77,
            Exit::Rdmsrlist { .. } => 78,
            Exit::Wrmsrlist { .. } => 79,
        }
    }

    /// Whether this is a VM-entry failure (VM_EXIT_REASON bit 31).
    pub fn is_entry_failure(&self) -> bool {
        matches!(self.basic_reason(), 33 | 34 | 41)
    }

    /// The SDM's name of the basic exit reason (Table C-1).
    pub fn name(&self) -> &'static str {
        reason_name(self.basic_reason()).unwrap_or("unknown")
    }

    /// Encodes the exit back into the VM-exit information fields. Fields
    /// the exit does not define are zero.
    pub fn to_info(&self) -> ExitInfo {
        let mut info = ExitInfo {
            reason: u32::from(self.basic_reason()),
            ..ExitInfo::default()
        };
        if self.is_entry_failure() {
            info.reason |= ExitInfo::REASON_ENTRY_FAILURE;
        }
        let put_instr = |info: &mut ExitInfo, i: &InstructionExit| {
            info.instruction_info = i.info.encode();
            info.qualification = i.displacement;
            info.instruction_len = i.len;
        };
        match self {
            Exit::ExceptionOrNmi {
                info: i,
                qualification,
                len,
            } => {
                let (ii, ec) = i.encode();
                info.intr_info = ii;
                info.intr_error_code = ec;
                info.instruction_len = *len;
                info.qualification = match qualification {
                    ExceptionQualification::PageFault { cr2 } => *cr2,
                    ExceptionQualification::Debug(d) => d.bits(),
                    ExceptionQualification::None => 0,
                };
            }
            Exit::ExternalInterrupt { vector } => {
                if let Some(v) = vector {
                    info.intr_info = InterruptionInfo::VALID | u32::from(*v);
                }
            }
            Exit::StartupIpi { vector } => info.qualification = u64::from(*vector),
            Exit::IoSmi { qualification }
            | Exit::OtherSmi { qualification }
            | Exit::InvalidGuestState { qualification }
            | Exit::PmlFull { qualification }
            | Exit::SppEvent { qualification }
            | Exit::InstructionTimeout { qualification } => info.qualification = *qualification,
            Exit::MsrLoading { entry } => info.qualification = *entry,
            Exit::TaskSwitch { qualification, len } => {
                info.qualification = qualification.encode();
                info.instruction_len = *len;
            }
            Exit::Invlpg {
                linear_address,
                len,
            } => {
                info.qualification = *linear_address;
                info.instruction_len = *len;
            }
            Exit::Vmclear(i)
            | Exit::Vmptrld(i)
            | Exit::Vmptrst(i)
            | Exit::Vmread { instr: i, .. }
            | Exit::Vmwrite { instr: i, .. }
            | Exit::Vmxon(i)
            | Exit::Invept(i)
            | Exit::Invvpid(i)
            | Exit::Invpcid(i) => put_instr(&mut info, i),
            Exit::CrAccess { access, len, .. } => {
                info.qualification = access.encode();
                info.instruction_len = *len;
            }
            Exit::MovDr { access, len } => {
                info.qualification = access.encode();
                info.instruction_len = *len;
            }
            Exit::Io { io, len } => {
                info.qualification = io.encode();
                info.instruction_len = *len;
            }
            Exit::ApicAccess { qualification } => info.qualification = qualification.encode(),
            Exit::VirtualizedEoi { vector } => info.qualification = u64::from(*vector),
            Exit::GdtrIdtrAccess(d) | Exit::LdtrTrAccess(d) => {
                info.instruction_info = d.encode_info();
                info.qualification = d.displacement;
                info.instruction_len = d.len;
            }
            Exit::EptViolation {
                qualification,
                gpa,
                gla,
            } => {
                info.qualification = qualification.encode();
                info.guest_physical_address = *gpa;
                info.guest_linear_address = gla.unwrap_or(0);
            }
            Exit::EptMisconfig { gpa } => info.guest_physical_address = *gpa,
            Exit::ApicWrite { offset } => info.qualification = u64::from(*offset),
            Exit::Rdrand { info: ii, len }
            | Exit::Rdseed { info: ii, len }
            | Exit::Umwait { info: ii, len }
            | Exit::Tpause { info: ii, len }
            | Exit::Loadiwkey { info: ii, len }
            | Exit::EnqcmdPasidFailure { info: ii, len }
            | Exit::EnqcmdsPasidFailure { info: ii, len } => {
                info.instruction_info = *ii;
                info.instruction_len = *len;
            }
            Exit::Cpuid { len }
            | Exit::Getsec { len }
            | Exit::Hlt { len }
            | Exit::Invd { len }
            | Exit::Rdpmc { len }
            | Exit::Rdtsc { len }
            | Exit::Rsm { len }
            | Exit::Vmcall { len }
            | Exit::Vmlaunch { len }
            | Exit::Vmresume { len }
            | Exit::Vmxoff { len }
            | Exit::Rdmsr { len, .. }
            | Exit::Wrmsr { len, .. }
            | Exit::Mwait { len }
            | Exit::Monitor { len }
            | Exit::Pause { len }
            | Exit::Rdtscp { len }
            | Exit::Wbinvd { len }
            | Exit::Xsetbv { len }
            | Exit::Vmfunc { len }
            | Exit::Encls { len, .. }
            | Exit::Xsaves { len, .. }
            | Exit::Xrstors { len, .. }
            | Exit::Pconfig { len, .. }
            | Exit::Enclv { len, .. }
            | Exit::Seamcall { len }
            | Exit::Tdcall { len }
            | Exit::Rdmsrlist { len }
            | Exit::Wrmsrlist { len } => info.instruction_len = *len,
            Exit::TripleFault
            | Exit::InitSignal
            | Exit::InterruptWindow
            | Exit::NmiWindow
            | Exit::MonitorTrapFlag
            | Exit::MachineCheckDuringEntry
            | Exit::TprBelowThreshold
            | Exit::PreemptionTimer
            | Exit::BusLock => {}
        }
        info
    }
}

/// The SDM name of a basic exit reason (Table C-1), `None` if undefined.
pub fn reason_name(reason: u16) -> Option<&'static str> {
    Some(match reason {
        0 => "Exception or non-maskable interrupt (NMI)",
        1 => "External interrupt",
        2 => "Triple fault",
        3 => "INIT signal",
        4 => "Start-up IPI (SIPI)",
        5 => "I/O system-management interrupt (SMI)",
        6 => "Other SMI",
        7 => "Interrupt window",
        8 => "NMI window",
        9 => "Task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "Control-register accesses",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure due to invalid guest state",
        34 => "VM-entry failure due to MSR loading",
        36 => "MWAIT",
        37 => "Monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure due to machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "Virtualized EOI",
        46 => "Access to GDTR or IDTR",
        47 => "Access to LDTR or TR",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD or WBNOINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "Page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        65 => "PCONFIG",
        66 => "SPP-related event",
        67 => "UMWAIT",
        68 => "TPAUSE",
        69 => "LOADIWKEY",
        70 => "ENCLV",
        72 => "ENQCMD PASID translation failure",
        73 => "ENQCMDS PASID translation failure",
        74 => "Bus lock",
        75 => "Instruction timeout",
        76 => "SEAMCALL",
        77 => "TDCALL",
        78 => "RDMSRLIST",
        79 => "WRMSRLIST",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEN: u32 = 3;

    fn info_with(reason: u32) -> ExitInfo {
        ExitInfo {
            reason,
            ..ExitInfo::default()
        }
    }

    fn sample_instruction_info() -> u32 {
        InstructionInfo {
            scaling: 2,
            reg1: 5,
            address_size: AddressSize::Bits64,
            register_operand: false,
            operand_size_32: false,
            segment: SegmentReg::Ds,
            index: Some(6),
            base: None,
            reg2: 0xc,
        }
        .encode()
    }

    /// A representative raw record for every defined reason, with only the
    /// fields that reason defines filled in.
    fn sample(reason: u16) -> ExitInfo {
        let mut i = info_with(u32::from(reason));
        let instr_len_reasons: &[u16] = &[
            0, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,
            30, 31, 32, 36, 39, 40, 46, 47, 50, 51, 53, 54, 55, 57, 58, 59, 60, 61, 63, 64, 65, 67,
            68, 69, 70, 72, 73, 76, 77, 78, 79,
        ];
        if instr_len_reasons.contains(&reason) {
            i.instruction_len = LEN;
        }
        match reason {
            0 => {
                i.intr_info = (1 << 31) | (1 << 11) | (3 << 8) | 14;
                i.intr_error_code = 6;
                i.qualification = 0xdead_b000;
            }
            1 => i.intr_info = (1 << 31) | 0x31,
            4 => i.qualification = 0x12,
            5 | 6 | 62 | 66 | 75 => i.qualification = 0x1000,
            9 => i.qualification = (3 << 30) | 0x28,
            14 => i.qualification = 0xffff_8000_0000_1000,
            19 | 21 | 22 | 23 | 25 | 27 | 50 | 53 | 58 => {
                i.instruction_info = sample_instruction_info();
                i.qualification = 0x40;
            }
            28 => i.qualification = 0x303,
            29 => i.qualification = 0x513,
            30 => i.qualification = 0x3f8_0000 | 0x8 | 0x3,
            33 => {
                i.reason |= ExitInfo::REASON_ENTRY_FAILURE;
                i.qualification = 2;
            }
            34 => {
                i.reason |= ExitInfo::REASON_ENTRY_FAILURE;
                i.qualification = 3;
            }
            41 => i.reason |= ExitInfo::REASON_ENTRY_FAILURE,
            44 => i.qualification = 0x1080,
            45 => i.qualification = 0x31,
            46 | 47 => {
                i.instruction_info = sample_instruction_info() & !(3 << 28) | (2 << 28);
                i.qualification = 0x10;
            }
            48 => {
                i.qualification = 0x182;
                i.guest_physical_address = 0x1234_5000;
                i.guest_linear_address = 0x7fff_0000;
            }
            49 => i.guest_physical_address = 0xfee0_0000,
            56 => i.qualification = 0x300,
            57 | 61 | 67 | 68 | 69 | 72 | 73 => i.instruction_info = 0x1008,
            _ => {}
        }
        i
    }

    #[test]
    fn test_every_defined_reason_round_trips() {
        for &r in DEFINED_REASONS {
            let raw = sample(r);
            let exit = Exit::from_info(&raw, &ExitContext::default())
                .unwrap_or_else(|e| panic!("reason {r}: {e}"));
            assert_eq!(exit.basic_reason(), r);
            assert_eq!(exit.to_info(), raw, "reason {r} ({})", exit.name());
            assert_eq!(Some(exit.name()), reason_name(r));
        }
    }

    #[test]
    fn test_unknown_reasons_are_typed_errors() {
        for r in [35u32, 38, 42, 71, 80, 0xffff] {
            assert_eq!(
                Exit::from_info(&info_with(r), &ExitContext::default()),
                Err(ExitDecodeError::UnknownReason(r as u16))
            );
            assert_eq!(reason_name(r as u16), None);
        }
    }

    #[test]
    fn test_entry_failure_bit_must_match_reason() {
        let ctx = ExitContext::default();
        assert_eq!(
            Exit::from_info(&info_with(33), &ctx),
            Err(ExitDecodeError::EntryFailureBit { reason: 33 })
        );
        let bad = (1 << 31) | 30;
        assert_eq!(
            Exit::from_info(&info_with(bad), &ctx),
            Err(ExitDecodeError::EntryFailureBit { reason: bad })
        );
        assert_eq!(
            Exit::from_info(&info_with((1 << 31) | 33), &ctx),
            Ok(Exit::InvalidGuestState { qualification: 0 })
        );
    }

    #[test]
    fn test_io_qualification_decodes_out_dx_al_and_in_eax_imm() {
        let out = IoQualification::decode(0x3f8_0000).unwrap();
        assert_eq!(out.size, IoSize::One);
        assert_eq!(out.direction, IoDirection::Out);
        assert_eq!(out.operand, IoOperand::Dx);
        assert_eq!(out.port, 0x3f8);
        assert!(!out.string && !out.rep);
        let inp = IoQualification::decode(0x60_0000 | 0x40 | 0x8 | 0x3).unwrap();
        assert_eq!(inp.size.bytes(), 4);
        assert_eq!(inp.direction, IoDirection::In);
        assert_eq!(inp.operand, IoOperand::Immediate);
        assert_eq!(inp.port, 0x60);
        let rep_outsw = IoQualification::decode(0x1f0_0000 | 0x30 | 0x1).unwrap();
        assert!(rep_outsw.string && rep_outsw.rep);
        assert_eq!(rep_outsw.size, IoSize::Two);
    }

    #[test]
    fn test_io_qualification_rejects_reserved_size() {
        assert_eq!(
            IoQualification::decode(0x3f8_0002),
            Err(ExitDecodeError::InvalidIoSize(2))
        );
        let raw = ExitInfo {
            qualification: 0x3f8_0007,
            ..info_with(30)
        };
        assert_eq!(
            Exit::from_info(&raw, &ExitContext::default()),
            Err(ExitDecodeError::InvalidIoSize(7))
        );
    }

    #[test]
    fn test_cr_access_decodes_mov_lmsw_and_rejects_cr2() {
        // mov cr3, rbx
        let m = CrAccess::decode(0x303).unwrap();
        assert_eq!(
            (m.cr, m.access, m.gpr),
            (ControlReg::Cr3, CrAccessType::MovToCr, 3)
        );
        // lmsw from memory, source 0x000b
        let l = CrAccess::decode((0xb << 16) | 0x70).unwrap();
        assert_eq!(l.access, CrAccessType::Lmsw);
        assert_eq!(l.lmsw_operand, LmswOperand::Memory);
        assert_eq!(l.lmsw_source, 0xb);
        assert_eq!(
            CrAccess::decode(0x2),
            Err(ExitDecodeError::InvalidControlRegister(2))
        );
    }

    #[test]
    fn test_mov_to_cr_and_msr_take_values_from_context() {
        let ctx = ExitContext {
            msr_index: 0xc000_0080,
            cr_source: 0x8005_0033,
            ..ExitContext::default()
        };
        let cr = ExitInfo {
            qualification: 0x0,
            ..info_with(28)
        };
        match Exit::from_info(&cr, &ctx).unwrap() {
            Exit::CrAccess { written, .. } => assert_eq!(written, Some(0x8005_0033)),
            e => panic!("{e:?}"),
        }
        let from = ExitInfo {
            qualification: 0x10,
            ..info_with(28)
        };
        match Exit::from_info(&from, &ctx).unwrap() {
            Exit::CrAccess { written, .. } => assert_eq!(written, None),
            e => panic!("{e:?}"),
        }
        assert_eq!(
            Exit::from_info(&info_with(32), &ctx),
            Ok(Exit::Wrmsr {
                msr: 0xc000_0080,
                len: 0
            })
        );
    }

    #[test]
    fn test_context_from_registers_picks_the_named_registers() {
        let mut g = Gprs::default();
        for n in 0..16u8 {
            g.set(n, 0x100 + u64::from(n));
        }
        let cr = ExitInfo {
            qualification: 0x300 | 0x4, // mov cr4, rbx
            ..info_with(28)
        };
        let ctx = ExitContext::from_registers(&cr, &g, 7);
        assert_eq!(ctx.cr_source, 0x103);
        assert_eq!(ctx.msr_index, 0x101);
        assert_eq!(ctx.rax, 0x100);
        assert_eq!(ctx.xss, 7);
        assert_eq!(ctx.vmcs_field, 0);
        let vmread = ExitInfo {
            instruction_info: 9 << 28,
            ..info_with(23)
        };
        let ctx = ExitContext::from_registers(&vmread, &g, 0);
        assert_eq!(ctx.vmcs_field, 0x109);
        assert_eq!(ctx.cr_source, 0);
    }

    #[test]
    fn test_exception_qualification_is_cr2_for_pf_and_dr6_for_db() {
        let pf = Exit::from_info(&sample(0), &ExitContext::default()).unwrap();
        match pf {
            Exit::ExceptionOrNmi {
                info,
                qualification,
                ..
            } => {
                assert_eq!(info.vector, 14);
                assert_eq!(info.error_code, Some(6));
                assert_eq!(
                    qualification,
                    ExceptionQualification::PageFault { cr2: 0xdead_b000 }
                );
            }
            e => panic!("{e:?}"),
        }
        let db = ExitInfo {
            intr_info: (1 << 31) | (3 << 8) | 1,
            qualification: (1 << 14) | 0x2,
            ..info_with(0)
        };
        match Exit::from_info(&db, &ExitContext::default()).unwrap() {
            Exit::ExceptionOrNmi {
                info,
                qualification,
                ..
            } => {
                assert_eq!(info.error_code, None);
                assert_eq!(
                    qualification,
                    ExceptionQualification::Debug(DebugQualification::BS | DebugQualification::B1)
                );
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn test_interruption_info_requires_valid_bit_and_known_type() {
        assert_eq!(
            InterruptionInfo::decode(0x30e, 0),
            Err(ExitDecodeError::InvalidInterruptionInfo(0x30e))
        );
        assert_eq!(
            InterruptionInfo::decode((1 << 31) | (1 << 8) | 3, 0),
            Err(ExitDecodeError::InvalidInterruptionInfo(
                (1 << 31) | (1 << 8) | 3
            ))
        );
        let nmi = InterruptionInfo::decode((1 << 31) | (2 << 8) | 2 | (1 << 12), 0).unwrap();
        assert_eq!(nmi.kind, InterruptionType::Nmi);
        assert!(nmi.nmi_unblocking_iret);
    }

    #[test]
    fn test_ept_violation_linear_address_only_when_valid() {
        let mut raw = sample(48);
        match Exit::from_info(&raw, &ExitContext::default()).unwrap() {
            Exit::EptViolation {
                qualification, gla, ..
            } => {
                assert_eq!(gla, Some(0x7fff_0000));
                assert!(qualification.contains(EptViolationQualification::WRITE));
                assert_eq!(
                    qualification.linear_access(),
                    Some(LinearAccessKind::Translated)
                );
            }
            e => panic!("{e:?}"),
        }
        raw.qualification = 0x2;
        match Exit::from_info(&raw, &ExitContext::default()).unwrap() {
            Exit::EptViolation {
                qualification, gla, ..
            } => {
                assert_eq!(gla, None);
                assert_eq!(qualification.linear_access(), None);
            }
            e => panic!("{e:?}"),
        }
        let paging = EptViolationQualification::decode(0x81);
        assert_eq!(
            paging.linear_access(),
            Some(LinearAccessKind::PagingStructure)
        );
    }

    #[test]
    fn test_descriptor_table_identity_names_the_instruction() {
        let raw = sample(47);
        match Exit::from_info(&raw, &ExitContext::default()).unwrap() {
            Exit::LdtrTrAccess(d) => assert_eq!(d.instruction, DescriptorTableInstruction::Lldt),
            e => panic!("{e:?}"),
        }
        match Exit::from_info(&sample(46), &ExitContext::default()).unwrap() {
            Exit::GdtrIdtrAccess(d) => assert_eq!(d.instruction, DescriptorTableInstruction::Lgdt),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn test_instruction_info_rejects_reserved_address_size_and_segment() {
        assert_eq!(
            InstructionInfo::decode(3 << 7),
            Err(ExitDecodeError::InvalidAddressSize(3))
        );
        assert_eq!(
            InstructionInfo::decode(6 << 15),
            Err(ExitDecodeError::InvalidSegment(6))
        );
        let raw = ExitInfo {
            instruction_info: 7 << 15,
            ..info_with(21)
        };
        assert_eq!(
            Exit::from_info(&raw, &ExitContext::default()),
            Err(ExitDecodeError::InvalidSegment(7))
        );
    }

    #[test]
    fn test_apic_access_rejects_reserved_type() {
        assert_eq!(
            ApicAccessQualification::decode(5 << 12),
            Err(ExitDecodeError::InvalidApicAccessType(5))
        );
        let q = ApicAccessQualification::decode(0xf000).unwrap();
        assert_eq!(q.access, ApicAccessType::PhysicalFetchOrExecution);
    }

    fn io_size() -> impl Strategy<Value = IoSize> {
        prop_oneof![Just(IoSize::One), Just(IoSize::Two), Just(IoSize::Four)]
    }

    fn cr() -> impl Strategy<Value = ControlReg> {
        prop_oneof![
            Just(ControlReg::Cr0),
            Just(ControlReg::Cr3),
            Just(ControlReg::Cr4),
            Just(ControlReg::Cr8)
        ]
    }

    fn cr_type() -> impl Strategy<Value = CrAccessType> {
        prop_oneof![
            Just(CrAccessType::MovToCr),
            Just(CrAccessType::MovFromCr),
            Just(CrAccessType::Clts),
            Just(CrAccessType::Lmsw)
        ]
    }

    fn apic_type() -> impl Strategy<Value = ApicAccessType> {
        prop_oneof![
            Just(ApicAccessType::LinearRead),
            Just(ApicAccessType::LinearWrite),
            Just(ApicAccessType::LinearFetch),
            Just(ApicAccessType::LinearEventDelivery),
            Just(ApicAccessType::PhysicalEventDelivery),
            Just(ApicAccessType::PhysicalFetchOrExecution)
        ]
    }

    fn intr_type() -> impl Strategy<Value = InterruptionType> {
        prop_oneof![
            Just(InterruptionType::ExternalInterrupt),
            Just(InterruptionType::Nmi),
            Just(InterruptionType::HardwareException),
            Just(InterruptionType::SoftwareInterrupt),
            Just(InterruptionType::PrivilegedSoftwareException),
            Just(InterruptionType::SoftwareException),
            Just(InterruptionType::OtherEvent)
        ]
    }

    fn seg() -> impl Strategy<Value = SegmentReg> {
        prop_oneof![
            Just(SegmentReg::Es),
            Just(SegmentReg::Cs),
            Just(SegmentReg::Ss),
            Just(SegmentReg::Ds),
            Just(SegmentReg::Fs),
            Just(SegmentReg::Gs)
        ]
    }

    fn asz() -> impl Strategy<Value = AddressSize> {
        prop_oneof![
            Just(AddressSize::Bits16),
            Just(AddressSize::Bits32),
            Just(AddressSize::Bits64)
        ]
    }

    proptest! {
        #[test]
        fn test_io_qualification_round_trips(size in io_size(), inp: bool, string: bool,
                rep: bool, imm: bool, port: u16) {
            let q = IoQualification {
                size,
                direction: if inp { IoDirection::In } else { IoDirection::Out },
                string,
                rep,
                operand: if imm { IoOperand::Immediate } else { IoOperand::Dx },
                port,
            };
            prop_assert_eq!(IoQualification::decode(q.encode()), Ok(q));
        }

        #[test]
        fn test_cr_access_round_trips(cr in cr(), access in cr_type(), mem: bool,
                gpr in 0u8..16, lmsw_source: u16) {
            let q = CrAccess {
                cr,
                access,
                lmsw_operand: if mem { LmswOperand::Memory } else { LmswOperand::Register },
                gpr,
                lmsw_source,
            };
            prop_assert_eq!(CrAccess::decode(q.encode()), Ok(q));
        }

        #[test]
        fn test_dr_access_round_trips(dr in 0u8..8, from: bool, gpr in 0u8..16) {
            let q = DrAccess {
                dr,
                direction: if from { DrDirection::FromDr } else { DrDirection::ToDr },
                gpr,
            };
            prop_assert_eq!(DrAccess::decode(q.encode()), q);
        }

        #[test]
        fn test_task_switch_round_trips(selector: u16, src in 0u8..4) {
            let source = match src {
                0 => TaskSwitchSource::Call,
                1 => TaskSwitchSource::Iret,
                2 => TaskSwitchSource::Jmp,
                _ => TaskSwitchSource::IdtTaskGate,
            };
            let q = TaskSwitchQualification { selector, source };
            prop_assert_eq!(TaskSwitchQualification::decode(q.encode()), q);
        }

        #[test]
        fn test_ept_violation_round_trips_defined_bits(raw: u64) {
            let q = EptViolationQualification::decode(raw);
            prop_assert_eq!(q.encode(), raw & 0x1_ffff);
            prop_assert_eq!(EptViolationQualification::decode(q.encode()), q);
        }

        #[test]
        fn test_apic_access_round_trips(offset in 0u16..0x1000, access in apic_type(),
                asynchronous: bool) {
            let q = ApicAccessQualification { offset, access, asynchronous };
            prop_assert_eq!(ApicAccessQualification::decode(q.encode()), Ok(q));
        }

        #[test]
        fn test_interruption_info_round_trips(vector: u8, kind in intr_type(),
                ec in proptest::option::of(any::<u32>()), nmi: bool) {
            let i = InterruptionInfo { vector, kind, error_code: ec, nmi_unblocking_iret: nmi };
            let (info, code) = i.encode();
            prop_assert_eq!(InterruptionInfo::decode(info, code), Ok(i));
        }

        #[test]
        fn test_instruction_info_round_trips(scaling in 0u8..4, reg1 in 0u8..16,
                address_size in asz(), register_operand: bool, operand_size_32: bool,
                segment in seg(), index in proptest::option::of(0u8..16),
                base in proptest::option::of(0u8..16), reg2 in 0u8..16) {
            let i = InstructionInfo {
                scaling, reg1, address_size, register_operand, operand_size_32,
                segment, index, base, reg2,
            };
            prop_assert_eq!(InstructionInfo::decode(i.encode()), Ok(i));
        }

        #[test]
        fn test_decode_never_panics_and_reencodes(reason in 0u32..100, fail: bool,
                q: u64, intr: u32, ii: u32) {
            let raw = ExitInfo {
                reason: reason | if fail { 1 << 31 } else { 0 },
                qualification: q,
                intr_info: intr,
                instruction_info: ii,
                ..ExitInfo::default()
            };
            if let Ok(e) = Exit::from_info(&raw, &ExitContext::default()) {
                let again = Exit::from_info(&e.to_info(), &ExitContext::default());
                prop_assert_eq!(again, Ok(e));
            }
        }
    }
}
