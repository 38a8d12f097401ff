//! VM-entry checks (SDM Vol. 3, 27.2-27.3). Skeleton: the rule set is filled
//! in by the entry-check work; the signature is the interface.

use crate::caps::VmxCapabilities;
use crate::mem::GuestPhysMemory;
use crate::vmcs::Vmcs12;

/// Why a VM entry failed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryCheckFailure {
    /// A check on VMX controls failed: VMfailValid(7).
    #[error("VM-entry control check failed")]
    Control,
    /// A check on the host-state area failed: VMfailValid(8).
    #[error("VM-entry host-state check failed")]
    HostState,
    /// A check on the guest-state area failed: VM-entry failure, exit
    /// reason 33 with bit 31 set, and this exit qualification.
    #[error("VM-entry guest-state check failed (qualification {0})")]
    GuestState(u64),
}

/// Runs every VM-entry check on `vmcs` in the SDM's order: controls,
/// host state, then guest state.
pub fn check_vm_entry(
    vmcs: &Vmcs12,
    caps: &VmxCapabilities,
    mem: &dyn GuestPhysMemory,
) -> Result<(), EntryCheckFailure> {
    let _ = (vmcs, caps, mem);
    Ok(())
}
