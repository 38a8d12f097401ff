//! The CPUID the guests see.
//!
//! L1: `KVM_GET_SUPPORTED_CPUID` with leaf 1 ECX.VMX (bit 5) set, so L1
//! believes it may use VMX (L0 emulates it), and the hypervisor leaves
//! 0x40000000 (signature and max leaf) and 0x40000001 (L0 feature bits)
//! replacing KVM's own. L2: the same without VMX. Both keep leaf 1
//! ECX.hypervisor (bit 31) set. The entry lists are edited by pure
//! functions; only [`supported`] and [`set`] touch KVM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// Hypervisor CPUID leaf: EAX = max hypervisor leaf, EBX:ECX:EDX = signature.
pub const HV_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// Hypervisor CPUID leaf: EAX = [`HvFeatures`] bits.
pub const HV_LEAF_FEATURES: u32 = 0x4000_0001;
/// The 12-byte signature in EBX, ECX, EDX of leaf 0x40000000.
pub const HV_SIGNATURE: &[u8; 12] = b"NestedVMXLab";
/// Leaf 1 ECX bit 5: VMX (SDM Vol. 2A, CPUID, Table 3-10).
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Feature bits L0 reports in leaf 0x40000001 EAX.
pub mod hv_features {
    /// VMX instructions are emulated by L0 (they trap to L0 as KVM
    /// emulation failures or through L1's #UD trap port).
    pub const VMX_EMULATED: u32 = 1 << 0;
    /// CR4.VMXE is virtual: writing it may #GP; VMXON does not need it.
    pub const VIRTUAL_VMXE: u32 = 1 << 1;
    /// The isa-debug-exit port 0xf4 ends the run with (V << 1) | 1.
    pub const DEBUG_EXIT_PORT: u32 = 1 << 2;
    /// Port 0xe9 is a debug console printed by L0.
    pub const DEBUG_CONSOLE_E9: u32 = 1 << 3;
}

/// Errors building or setting the CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// The supported list has no leaf 1.
    #[error("KVM_GET_SUPPORTED_CPUID has no leaf 1; this KVM cannot describe the CPU")]
    NoLeaf1,
    /// Too many entries for KVM_SET_CPUID2.
    #[error("CPUID has {0} entries, more than KVM accepts ({KVM_MAX_CPUID_ENTRIES})")]
    TooMany(usize),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2 failed: {0}")]
    Set(#[source] kvm_ioctls::Error),
}

/// `KVM_GET_SUPPORTED_CPUID` as a plain list.
pub fn supported(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)?;
    Ok(c.as_slice().to_vec())
}

fn with_hv_leaves(
    mut entries: Vec<kvm_cpuid_entry2>,
    vmx: bool,
) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    let leaf1 = entries
        .iter_mut()
        .find(|e| e.function == 1)
        .ok_or(CpuidError::NoLeaf1)?;
    if vmx {
        leaf1.ecx |= CPUID_1_ECX_VMX;
    } else {
        leaf1.ecx &= !CPUID_1_ECX_VMX;
    }
    leaf1.ecx |= CPUID_1_ECX_HYPERVISOR;
    // Drop KVM's own paravirtual leaves (0x40000000-0x400000ff): this L0
    // is not KVM to its guests.
    entries.retain(|e| e.function & 0xffff_ff00 != HV_LEAF_SIGNATURE);
    let sig = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&HV_SIGNATURE[i * 4..i * 4 + 4]);
        u32::from_le_bytes(b)
    };
    entries.push(kvm_cpuid_entry2 {
        function: HV_LEAF_SIGNATURE,
        eax: HV_LEAF_FEATURES,
        ebx: sig(0),
        ecx: sig(1),
        edx: sig(2),
        ..Default::default()
    });
    let mut features = hv_features::DEBUG_EXIT_PORT | hv_features::DEBUG_CONSOLE_E9;
    if vmx {
        features |= hv_features::VMX_EMULATED | hv_features::VIRTUAL_VMXE;
    }
    entries.push(kvm_cpuid_entry2 {
        function: HV_LEAF_FEATURES,
        eax: features,
        ..Default::default()
    });
    if entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(CpuidError::TooMany(entries.len()));
    }
    Ok(entries)
}

/// L1's CPUID: VMX set, hypervisor leaves added.
pub fn l1_cpuid(supported: Vec<kvm_cpuid_entry2>) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    with_hv_leaves(supported, true)
}

/// L2's CPUID: VMX clear (L0 offers no nested-nested VMX), hypervisor
/// leaves added.
pub fn l2_cpuid(supported: Vec<kvm_cpuid_entry2>) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    with_hv_leaves(supported, false)
}

/// `KVM_SET_CPUID2` on a vCPU.
pub fn set(vcpu: &VcpuFd, entries: &[kvm_cpuid_entry2]) -> Result<(), CpuidError> {
    let c = CpuId::from_entries(entries).map_err(|_| CpuidError::TooMany(entries.len()))?;
    vcpu.set_cpuid2(&c).map_err(CpuidError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x0000_0001,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: 0x4b4d_564b,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0xffff,
                ..Default::default()
            },
        ]
    }

    fn leaf(e: &[kvm_cpuid_entry2], f: u32) -> Vec<kvm_cpuid_entry2> {
        e.iter().filter(|x| x.function == f).copied().collect()
    }

    #[test]
    fn test_l1_cpuid_sets_vmx_and_signature() {
        let e = l1_cpuid(base()).unwrap();
        let l1 = leaf(&e, 1);
        assert_eq!(l1.len(), 1);
        assert_eq!(l1[0].ecx & CPUID_1_ECX_VMX, CPUID_1_ECX_VMX);
        assert_ne!(l1[0].ecx & CPUID_1_ECX_HYPERVISOR, 0);
        let hv = leaf(&e, HV_LEAF_SIGNATURE);
        assert_eq!(hv.len(), 1, "KVM's own leaf must be replaced");
        let mut sig = Vec::new();
        for r in [hv[0].ebx, hv[0].ecx, hv[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, HV_SIGNATURE);
        assert_eq!(hv[0].eax, HV_LEAF_FEATURES);
        let f = leaf(&e, HV_LEAF_FEATURES);
        assert_eq!(f.len(), 1);
        assert_ne!(f[0].eax & hv_features::VMX_EMULATED, 0);
    }

    #[test]
    fn test_l2_cpuid_clears_vmx() {
        let mut b = base();
        b[1].ecx |= CPUID_1_ECX_VMX;
        let e = l2_cpuid(b).unwrap();
        assert_eq!(leaf(&e, 1)[0].ecx & CPUID_1_ECX_VMX, 0);
        assert_eq!(
            leaf(&e, HV_LEAF_FEATURES)[0].eax & hv_features::VMX_EMULATED,
            0
        );
    }

    #[test]
    fn test_cpuid_without_leaf1_is_an_error() {
        let b: Vec<_> = base().into_iter().filter(|e| e.function != 1).collect();
        assert!(matches!(l1_cpuid(b), Err(CpuidError::NoLeaf1)));
    }

    #[test]
    fn test_cpuid_too_many_entries_is_an_error() {
        let b = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            };
            KVM_MAX_CPUID_ENTRIES
        ];
        assert!(matches!(l1_cpuid(b), Err(CpuidError::TooMany(_))));
    }
}
