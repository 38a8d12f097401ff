//! The raw VM-exit information record: what a VMX CPU writes into the
//! VM-exit information fields (SDM 24.9), before any decoding.

use serde::{Deserialize, Serialize};

/// VM-exit information, as 32/64-bit values in VMCS format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// VM_EXIT_REASON: basic reason in bits 15:0, bit 31 = VM-entry failure.
    pub reason: u32,
    /// EXIT_QUALIFICATION.
    pub qualification: u64,
    /// GUEST_LINEAR_ADDRESS (where the SDM defines one).
    pub guest_linear_address: u64,
    /// GUEST_PHYSICAL_ADDRESS (EPT violation and misconfiguration).
    pub guest_physical_address: u64,
    /// VM_EXIT_INTR_INFO.
    pub intr_info: u32,
    /// VM_EXIT_INTR_ERROR_CODE.
    pub intr_error_code: u32,
    /// IDT_VECTORING_INFO_FIELD.
    pub idt_vectoring_info: u32,
    /// IDT_VECTORING_ERROR_CODE.
    pub idt_vectoring_error_code: u32,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub instruction_len: u32,
    /// VMX_INSTRUCTION_INFO.
    pub instruction_info: u32,
    /// I/O RCX/RSI/RDI/RIP (SMI after I/O only; kept for completeness).
    pub io_rcx: u64,
    /// I/O RSI.
    pub io_rsi: u64,
    /// I/O RDI.
    pub io_rdi: u64,
    /// I/O RIP.
    pub io_rip: u64,
}

impl ExitInfo {
    /// VM_EXIT_REASON bit 31: VM-entry failure.
    pub const REASON_ENTRY_FAILURE: u32 = 1 << 31;

    /// Basic exit reason (bits 15:0).
    pub fn basic_reason(&self) -> u16 {
        self.reason as u16
    }
}
