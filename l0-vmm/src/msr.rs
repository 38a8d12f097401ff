//! The VMX capability MSRs, answered by L0.
//!
//! KVM_CAP_X86_USER_SPACE_MSR (exit reason "filter") plus a
//! KVM_X86_SET_MSR_FILTER that denies IA32_FEATURE_CONTROL (0x3a) and
//! IA32_VMX_BASIC..IA32_VMX_VMFUNC (0x480-0x491) makes every RDMSR/WRMSR
//! of them exit to userspace. [`VmxMsrHandler`] answers reads from
//! `vmcs12::VmxCapabilities::read_msr` and refuses writes with #GP: the
//! capability MSRs are read-only and IA32_FEATURE_CONTROL is locked
//! (SDM Vol. 3, 24.7 and Appendix A; Vol. 4, table 2-2).

use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use vmcs12::VmxCapabilities;

/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_VMX_BASIC, the first VMX capability MSR.
pub const IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_VMFUNC, the last VMX capability MSR this L0 reports.
pub const IA32_VMX_VMFUNC: u32 = 0x491;

/// The MSR ranges `(base, count)` that exit to L0 in L1's VM.
pub const VMX_MSR_RANGES: &[(u32, u32)] = &[
    (IA32_FEATURE_CONTROL, 1),
    (IA32_VMX_BASIC, IA32_VMX_VMFUNC - IA32_VMX_BASIC + 1),
];

/// Errors setting up MSR exits.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) failed.
    #[error("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) failed: {0}; this KVM cannot send MSR accesses to userspace")]
    EnableCap(#[source] kvm_ioctls::Error),
    /// KVM_X86_SET_MSR_FILTER failed.
    #[error("KVM_X86_SET_MSR_FILTER failed: {0}")]
    SetFilter(#[source] kvm_ioctls::Error),
    /// Too many ranges for one filter.
    #[error("{0} MSR filter ranges given; KVM accepts at most 16")]
    TooManyRanges(usize),
}

/// Turns on userspace MSR exits for accesses the filter denies.
pub fn enable_user_space_msr(vm: &VmFd) -> Result<(), MsrError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap).map_err(MsrError::EnableCap)
}

/// Installs a filter (default allow) denying every MSR in `ranges`, so
/// those accesses exit to userspace.
pub fn install_msr_filter(vm: &VmFd, ranges: &[(u32, u32)]) -> Result<(), MsrError> {
    if ranges.len() > 16 {
        return Err(MsrError::TooManyRanges(ranges.len()));
    }
    // A 0 bit denies the access: all-zero bitmaps deny the whole range.
    let bitmaps: Vec<Vec<u8>> = ranges
        .iter()
        .map(|&(_, n)| vec![0u8; n.div_ceil(8) as usize])
        .collect();
    let r: Vec<MsrFilterRange<'_>> = ranges
        .iter()
        .zip(&bitmaps)
        .map(|(&(base, msr_count), bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &r)
        .map_err(MsrError::SetFilter)
}

/// Installs a default-deny filter: every filterable RDMSR/WRMSR exits to
/// userspace. KVM rejects a filter with no ranges, so it carries one
/// (also denying) range over the VMX MSRs.
pub fn install_deny_all_filter(vm: &VmFd) -> Result<(), MsrError> {
    let bitmap = [0u8; 3];
    let r = [MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: IA32_VMX_BASIC,
        msr_count: IA32_VMX_VMFUNC - IA32_VMX_BASIC + 1,
        bitmap: &bitmap,
    }];
    vm.set_msr_filter(MsrFilterDefaultAction::DENY, &r)
        .map_err(MsrError::SetFilter)
}

/// Whether `index` is one of the MSRs this module answers.
pub fn is_vmx_msr(index: u32) -> bool {
    VMX_MSR_RANGES
        .iter()
        .any(|&(base, n)| index >= base && index - base < n)
}

/// Answers L1's accesses to the VMX MSRs.
#[derive(Debug, Clone)]
pub struct VmxMsrHandler {
    caps: VmxCapabilities,
}

impl VmxMsrHandler {
    /// A handler reporting `caps`.
    pub fn new(caps: VmxCapabilities) -> Self {
        Self { caps }
    }

    /// The capabilities reported.
    pub fn caps(&self) -> &VmxCapabilities {
        &self.caps
    }

    /// RDMSR: `Some(value)`, or `None` to raise #GP (an index this L0
    /// does not implement).
    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        if !is_vmx_msr(index) {
            return None;
        }
        self.caps.read_msr(index)
    }

    /// WRMSR: always refused (#GP). The capability MSRs are read-only and
    /// IA32_FEATURE_CONTROL is locked (bit 0), so a write faults as on
    /// hardware (SDM Vol. 3, 24.7).
    pub fn wrmsr(&self, index: u32, _value: u64) -> bool {
        let _ = index;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_vmx_msr_ranges_cover_exactly_the_vmx_msrs() {
        assert!(is_vmx_msr(0x3a));
        assert!(is_vmx_msr(0x480));
        assert!(is_vmx_msr(0x491));
        assert!(!is_vmx_msr(0x39));
        assert!(!is_vmx_msr(0x3b));
        assert!(!is_vmx_msr(0x47f));
        assert!(!is_vmx_msr(0x492));
    }

    #[test]
    fn test_rdmsr_answers_from_caps_read_msr() {
        let caps = VmxCapabilities::default();
        let h = VmxMsrHandler::new(caps.clone());
        let basic = h.rdmsr(IA32_VMX_BASIC).expect("IA32_VMX_BASIC readable");
        assert_eq!(basic, caps.read_msr(IA32_VMX_BASIC).unwrap());
        assert_eq!(basic & 0x7fff_ffff, u64::from(caps.vmcs_revision_id()));
        let fc = h.rdmsr(IA32_FEATURE_CONTROL).expect("feature control");
        assert_eq!(fc & 1, 1, "IA32_FEATURE_CONTROL must be locked");
        assert_eq!(h.rdmsr(0x10), None, "not a VMX MSR");
    }

    #[test]
    fn test_wrmsr_is_refused() {
        let h = VmxMsrHandler::new(VmxCapabilities::default());
        assert!(!h.wrmsr(IA32_FEATURE_CONTROL, 5));
        assert!(!h.wrmsr(IA32_VMX_BASIC, 0));
    }

    proptest! {
        #[test]
        fn test_is_vmx_msr_matches_reference(i in 0u32..0x1000) {
            let reference = i == 0x3a || (0x480..=0x491).contains(&i);
            prop_assert_eq!(is_vmx_msr(i), reference);
        }
    }
}
