//! Architectural outcomes of VMX instructions (SDM Vol. 3, 31.2 and 31.4).

use serde::{Deserialize, Serialize};

/// VM-instruction error numbers (SDM Vol. 3, 31.4, Table 31-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum VmInstructionError {
    /// 1: VMCALL executed in VMX root operation.
    VmcallInVmxRoot = 1,
    /// 2: VMCLEAR with invalid physical address.
    VmclearInvalidAddress = 2,
    /// 3: VMCLEAR with VMXON pointer.
    VmclearVmxonPointer = 3,
    /// 4: VMLAUNCH with non-clear VMCS.
    VmlaunchNonClearVmcs = 4,
    /// 5: VMRESUME with non-launched VMCS.
    VmresumeNonLaunchedVmcs = 5,
    /// 6: VMRESUME after VMXOFF.
    VmresumeAfterVmxoff = 6,
    /// 7: VM entry with invalid control field(s).
    EntryInvalidControlFields = 7,
    /// 8: VM entry with invalid host-state field(s).
    EntryInvalidHostStateFields = 8,
    /// 9: VMPTRLD with invalid physical address.
    VmptrldInvalidAddress = 9,
    /// 10: VMPTRLD with VMXON pointer.
    VmptrldVmxonPointer = 10,
    /// 11: VMPTRLD with incorrect VMCS revision identifier.
    VmptrldIncorrectRevisionId = 11,
    /// 12: VMREAD/VMWRITE from/to unsupported VMCS component.
    UnsupportedVmcsComponent = 12,
    /// 13: VMWRITE to read-only VMCS component.
    VmwriteReadOnlyComponent = 13,
    /// 15: VMXON executed in VMX root operation.
    VmxonInVmxRoot = 15,
    /// 16: VM entry with invalid executive-VMCS pointer.
    EntryInvalidExecutiveVmcsPointer = 16,
    /// 17: VM entry with non-launched executive VMCS.
    EntryNonLaunchedExecutiveVmcs = 17,
    /// 18: VM entry with executive-VMCS pointer not VMXON pointer.
    EntryExecutiveVmcsPointerNotVmxon = 18,
    /// 19: VMCALL with non-clear VMCS.
    VmcallNonClearVmcs = 19,
    /// 20: VMCALL with invalid VM-exit control fields.
    VmcallInvalidExitControls = 20,
    /// 22: VMCALL with incorrect MSEG revision identifier.
    VmcallIncorrectMsegRevisionId = 22,
    /// 23: VMXOFF under dual-monitor treatment of SMIs and SMM.
    VmxoffUnderDualMonitor = 23,
    /// 24: VMCALL with invalid SMM-monitor features.
    VmcallInvalidSmmMonitorFeatures = 24,
    /// 25: VM entry with invalid VM-execution control fields in executive VMCS.
    EntryInvalidExecutiveControls = 25,
    /// 26: VM entry with events blocked by MOV SS.
    EntryEventsBlockedByMovSs = 26,
    /// 28: Invalid operand to INVEPT/INVVPID.
    InvalidInveptInvvpidOperand = 28,
}

impl VmInstructionError {
    /// The number stored in the VM-instruction error field.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// Decodes an error number.
    pub fn from_number(n: u32) -> Option<Self> {
        use VmInstructionError::*;
        Some(match n {
            1 => VmcallInVmxRoot,
            2 => VmclearInvalidAddress,
            3 => VmclearVmxonPointer,
            4 => VmlaunchNonClearVmcs,
            5 => VmresumeNonLaunchedVmcs,
            6 => VmresumeAfterVmxoff,
            7 => EntryInvalidControlFields,
            8 => EntryInvalidHostStateFields,
            9 => VmptrldInvalidAddress,
            10 => VmptrldVmxonPointer,
            11 => VmptrldIncorrectRevisionId,
            12 => UnsupportedVmcsComponent,
            13 => VmwriteReadOnlyComponent,
            15 => VmxonInVmxRoot,
            16 => EntryInvalidExecutiveVmcsPointer,
            17 => EntryNonLaunchedExecutiveVmcs,
            18 => EntryExecutiveVmcsPointerNotVmxon,
            19 => VmcallNonClearVmcs,
            20 => VmcallInvalidExitControls,
            22 => VmcallIncorrectMsegRevisionId,
            23 => VmxoffUnderDualMonitor,
            24 => VmcallInvalidSmmMonitorFeatures,
            25 => EntryInvalidExecutiveControls,
            26 => EntryEventsBlockedByMovSs,
            28 => InvalidInveptInvvpidOperand,
            _ => return None,
        })
    }
}

/// A fault a VMX instruction raises instead of completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmxFault {
    /// #UD: invalid opcode (outside VMX operation, wrong mode, ...).
    InvalidOpcode,
    /// #GP(0): CPL > 0, bad operand, ...
    GeneralProtection,
    /// #PF on a memory operand: faulting linear address and error code.
    PageFault {
        /// Linear address that faulted (goes to CR2).
        linear_address: u64,
        /// Page-fault error code.
        error_code: u32,
    },
    /// #SS(0) on a stack-segment memory operand.
    StackFault,
}

/// The architectural outcome of one VMX instruction (SDM 31.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmxOutcome {
    /// VMsucceed: CF = PF = AF = ZF = SF = OF = 0.
    Succeed,
    /// VMfailInvalid: CF = 1, other arithmetic flags 0 (no current VMCS).
    FailInvalid,
    /// VMfailValid: ZF = 1, other arithmetic flags 0; the error number is
    /// stored in the VM-instruction error field of the current VMCS.
    FailValid(VmInstructionError),
    /// The instruction faults; RIP does not advance.
    Fault(VmxFault),
}

/// RFLAGS bits that VMsucceed/VMfail write (CF, PF, AF, ZF, SF, OF).
pub const RFLAGS_VMX_ARITH_MASK: u64 = 0x8d5;
/// RFLAGS.CF.
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS.ZF.
pub const RFLAGS_ZF: u64 = 1 << 6;

impl VmxOutcome {
    /// The RFLAGS value after the instruction, given the value before it.
    /// A fault leaves RFLAGS as it was.
    pub fn apply_to_rflags(self, rflags: u64) -> u64 {
        let cleared = rflags & !RFLAGS_VMX_ARITH_MASK;
        match self {
            VmxOutcome::Succeed => cleared,
            VmxOutcome::FailInvalid => cleared | RFLAGS_CF,
            VmxOutcome::FailValid(_) => cleared | RFLAGS_ZF,
            VmxOutcome::Fault(_) => rflags,
        }
    }

    /// Decodes the outcome an L1 observes from RFLAGS after the instruction
    /// (the error number must then be read from VM_INSTRUCTION_ERROR).
    pub fn from_rflags(rflags: u64, error: u32) -> Self {
        if rflags & RFLAGS_CF != 0 {
            VmxOutcome::FailInvalid
        } else if rflags & RFLAGS_ZF != 0 {
            match VmInstructionError::from_number(error) {
                Some(e) => VmxOutcome::FailValid(e),
                None => VmxOutcome::FailInvalid,
            }
        } else {
            VmxOutcome::Succeed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_error_numbers_round_trip() {
        for n in 0..64 {
            if let Some(e) = VmInstructionError::from_number(n) {
                assert_eq!(e.number(), n);
            }
        }
        assert_eq!(VmInstructionError::VmptrldIncorrectRevisionId.number(), 11);
        assert_eq!(VmInstructionError::InvalidInveptInvvpidOperand.number(), 28);
    }

    #[test]
    fn test_rflags_for_each_outcome() {
        let before = 0x2 | RFLAGS_VMX_ARITH_MASK;
        assert_eq!(VmxOutcome::Succeed.apply_to_rflags(before), 0x2);
        assert_eq!(VmxOutcome::FailInvalid.apply_to_rflags(before), 0x3);
        assert_eq!(
            VmxOutcome::FailValid(VmInstructionError::VmxonInVmxRoot).apply_to_rflags(before),
            0x42
        );
        assert_eq!(
            VmxOutcome::Fault(VmxFault::GeneralProtection).apply_to_rflags(before),
            before
        );
    }
}
