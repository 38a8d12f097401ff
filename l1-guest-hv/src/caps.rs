//! Capability MSRs as a hypervisor reads them (SDM Vol. 3, Appendix A) and
//! the control adjustment every real hypervisor does:
//! `value = (wanted | allowed0) & allowed1`.

// The capability MSR indices are the ones L0 answers (one table in vmcs12).
pub use vmcs12::msr::{
    IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1,
    IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP,
    IA32_VMX_EXIT_CTLS, IA32_VMX_MISC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS,
    IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_TRUE_EXIT_CTLS,
    IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS, IA32_VMX_VMCS_ENUM, IA32_VMX_VMFUNC,
};
/// IA32_EFER.
pub const IA32_EFER: u32 = 0xc000_0080;
/// IA32_APIC_BASE (the MSR the demo's L2 reads through L1's MSR bitmap).
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_PAT (an MSR the demo's L2 reads without L1 intercepting it).
pub const IA32_PAT: u32 = 0x277;

/// IA32_FEATURE_CONTROL bit 0: lock.
pub const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
/// IA32_FEATURE_CONTROL bit 2: VMXON allowed outside SMX operation.
pub const FEATURE_CONTROL_VMXON_OUTSIDE_SMX: u64 = 1 << 2;

/// What to do with IA32_FEATURE_CONTROL before VMXON (SDM 24.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureControlAction {
    /// Locked with VMXON outside SMX enabled: nothing to do.
    Ready,
    /// Unlocked: write this value (lock + enable) first.
    Write(u64),
    /// Locked without VMXON outside SMX: VMXON will #GP; VMX is off.
    LockedOff,
}

/// Decides the IA32_FEATURE_CONTROL step from its current value.
pub fn feature_control_action(value: u64) -> FeatureControlAction {
    if value & FEATURE_CONTROL_LOCKED == 0 {
        FeatureControlAction::Write(
            value | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX,
        )
    } else if value & FEATURE_CONTROL_VMXON_OUTSIDE_SMX != 0 {
        FeatureControlAction::Ready
    } else {
        FeatureControlAction::LockedOff
    }
}

/// IA32_VMX_BASIC decoded (SDM A.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxBasic {
    /// Bits 30:0: VMCS revision identifier.
    pub revision_id: u32,
    /// Bits 44:32: bytes to allocate for the VMXON region and each VMCS.
    pub region_size: u32,
    /// Bit 48: physical addresses limited to 32 bits.
    pub addr_32bit: bool,
    /// Bits 53:50: memory type for VMCS accesses (6 = write-back).
    pub memory_type: u8,
    /// Bit 54: INS/OUTS exits report VMX_INSTRUCTION_INFO.
    pub ins_outs_info: bool,
    /// Bit 55: the IA32_VMX_TRUE_*_CTLS MSRs exist and should be used.
    pub true_controls: bool,
}

impl VmxBasic {
    /// Decodes the MSR value.
    pub fn from_msr(value: u64) -> Self {
        Self {
            revision_id: (value & 0x7fff_ffff) as u32,
            region_size: ((value >> 32) & 0x1fff) as u32,
            addr_32bit: value & (1 << 48) != 0,
            memory_type: ((value >> 50) & 0xf) as u8,
            ins_outs_info: value & (1 << 54) != 0,
            true_controls: value & (1 << 55) != 0,
        }
    }

    /// The capability MSRs to read for pin, primary, exit and entry
    /// controls: the TRUE_ ones when bit 55 says they exist (SDM A.2).
    pub fn control_msrs(&self) -> [u32; 4] {
        if self.true_controls {
            [
                IA32_VMX_TRUE_PINBASED_CTLS,
                IA32_VMX_TRUE_PROCBASED_CTLS,
                IA32_VMX_TRUE_EXIT_CTLS,
                IA32_VMX_TRUE_ENTRY_CTLS,
            ]
        } else {
            [
                IA32_VMX_PINBASED_CTLS,
                IA32_VMX_PROCBASED_CTLS,
                IA32_VMX_EXIT_CTLS,
                IA32_VMX_ENTRY_CTLS,
            ]
        }
    }
}

/// A control value adjusted to a capability MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdjustedControl {
    /// The value to write: wanted bits plus must-be-1 bits, minus
    /// must-be-0 bits.
    pub value: u32,
    /// Wanted bits the CPU does not allow (dropped from `value`).
    pub missing: u32,
}

/// Adjusts a wanted control value to a capability MSR whose low half is the
/// allowed-0 settings (a 1 bit must be 1) and whose high half the allowed-1
/// settings (a 0 bit must be 0) (SDM A.3.1).
pub fn adjust_control(wanted: u32, cap_msr: u64) -> AdjustedControl {
    let allowed0 = cap_msr as u32;
    let allowed1 = (cap_msr >> 32) as u32;
    let value = (wanted | allowed0) & allowed1;
    AdjustedControl {
        value,
        missing: wanted & !value,
    }
}

/// Whether `value` satisfies a capability MSR (what VM entry checks).
pub fn control_is_valid(value: u32, cap_msr: u64) -> bool {
    let allowed0 = cap_msr as u32;
    let allowed1 = (cap_msr >> 32) as u32;
    value & allowed0 == allowed0 && value & !allowed1 == 0
}

/// A bit position `value` may not set (allowed-1 is 0), for provoking
/// VMfailValid(7); `None` when the CPU allows every bit.
pub fn forbidden_bit(cap_msr: u64) -> Option<u32> {
    let allowed1 = (cap_msr >> 32) as u32;
    (0..32).find(|bit| allowed1 & (1 << bit) == 0)
}

/// Applies the CR0/CR4 fixed bits of VMX operation: bits set in FIXED0
/// must be 1, bits clear in FIXED1 must be 0 (SDM A.7, A.8).
pub fn apply_fixed(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// IA32_VMX_EPT_VPID_CAP bit 20: INVEPT supported.
pub fn invept_supported(ept_vpid_cap: u64) -> bool {
    ept_vpid_cap & (1 << 20) != 0
}

/// IA32_VMX_EPT_VPID_CAP bit 32: INVVPID supported.
pub fn invvpid_supported(ept_vpid_cap: u64) -> bool {
    ept_vpid_cap & (1 << 32) != 0
}

/// IA32_VMX_MISC bit 29: VMWRITE may write the VM-exit information fields.
pub fn vmwrite_any_field(misc: u64) -> bool {
    misc & (1 << 29) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_basic_decodes_fields() {
        // Revision 0x12, 4 KiB regions, WB, INS/OUTS info, TRUE controls.
        let msr = 0x00da_1000_0000_0012u64;
        let b = VmxBasic::from_msr(msr);
        assert_eq!(b.revision_id, 0x12);
        assert_eq!(b.region_size, 0x1000);
        assert_eq!(b.memory_type, 6);
        assert!(b.ins_outs_info);
        assert!(b.true_controls);
        assert!(!b.addr_32bit);
        assert_eq!(b.control_msrs()[0], IA32_VMX_TRUE_PINBASED_CTLS);
    }

    #[test]
    fn test_basic_without_true_controls_uses_legacy_msrs() {
        let b = VmxBasic::from_msr(0x0018_1000_8000_0001);
        assert_eq!(b.revision_id, 1, "bit 31 is not part of the revision");
        assert!(!b.true_controls);
        assert_eq!(b.control_msrs()[3], IA32_VMX_ENTRY_CTLS);
    }

    #[test]
    fn test_adjust_sets_must_be_one_and_drops_forbidden() {
        // allowed0 = 0x16 (bits 1,2,4 must be 1), allowed1 = 0xff.
        let cap = (0xffu64 << 32) | 0x16;
        let a = adjust_control(0x101, cap);
        assert_eq!(a.value, 0x17);
        assert_eq!(a.missing, 0x100);
        assert!(control_is_valid(a.value, cap));
        assert!(!control_is_valid(0x101, cap));
    }

    #[test]
    fn test_forbidden_bit() {
        assert_eq!(forbidden_bit(0xffff_fffe_0000_0000), Some(0));
        assert_eq!(forbidden_bit(0xffff_ffff_0000_0000), None);
        assert_eq!(forbidden_bit(0x7fff_ffff_0000_0000), Some(31));
    }

    #[test]
    fn test_feature_control_actions() {
        assert_eq!(feature_control_action(0x5), FeatureControlAction::Ready);
        assert_eq!(
            feature_control_action(0x0),
            FeatureControlAction::Write(0x5)
        );
        assert_eq!(feature_control_action(0x1), FeatureControlAction::LockedOff);
    }

    #[test]
    fn test_fixed_bits() {
        // CR0 with PE|PG|NE fixed to 1 and nothing forbidden.
        assert_eq!(apply_fixed(0x33, 0x8000_0021, 0xffff_ffff), 0x8000_0033);
        // CR4 VMXE forced on, bit 22 forbidden.
        assert_eq!(apply_fixed(0x40_0620, 0x2000, 0x3f_ffff), 0x2620);
    }

    #[test]
    fn test_ept_vpid_and_misc_bits() {
        assert!(invept_supported(1 << 20));
        assert!(!invept_supported(1 << 21));
        assert!(invvpid_supported(1 << 32));
        assert!(!invvpid_supported(0));
        assert!(vmwrite_any_field(1 << 29));
        assert!(!vmwrite_any_field(1 << 28));
    }

    proptest! {
        #[test]
        fn prop_adjusted_control_is_valid_when_caps_consistent(
            wanted: u32, allowed0: u32, extra: u32,
        ) {
            // A consistent MSR allows every must-be-1 bit.
            let allowed1 = allowed0 | extra;
            let cap = (u64::from(allowed1) << 32) | u64::from(allowed0);
            let a = adjust_control(wanted, cap);
            prop_assert!(control_is_valid(a.value, cap));
            // Reference: bit by bit.
            for bit in 0..32 {
                let m = 1u32 << bit;
                let want = if allowed0 & m != 0 { true } else { allowed1 & m != 0 && wanted & m != 0 };
                prop_assert_eq!(a.value & m != 0, want);
            }
            prop_assert_eq!(a.missing, wanted & !allowed1);
        }
    }
}
