//! Capability MSRs: what this L0 advertises to L1 (SDM Vol. 3, Appendix A).
//!
//! Skeleton: the full set of IA32_VMX_* values and their allowed-0/allowed-1
//! settings is filled in by the capability work; the accessors below are the
//! interface the rest of the crate relies on.

use serde::{Deserialize, Serialize};

/// VMCS revision identifier this model reports in IA32_VMX_BASIC[30:0].
pub const VMCS_REVISION_ID: u32 = 0x0000_1312;

/// The VMX capabilities the L0 offers to L1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmxCapabilities {
    /// Physical-address width (MAXPHYADDR) of the virtual CPU.
    pub phys_addr_width: u8,
    /// IA32_VMX_MISC bit 29: VMWRITE may write any field, including the
    /// VM-exit information fields.
    pub vmwrite_any_field: bool,
}

impl Default for VmxCapabilities {
    fn default() -> Self {
        Self {
            phys_addr_width: 39,
            vmwrite_any_field: false,
        }
    }
}

impl VmxCapabilities {
    /// VMCS revision identifier.
    pub fn vmcs_revision_id(&self) -> u32 {
        VMCS_REVISION_ID
    }

    /// Whether `pa` fits the physical-address width.
    pub fn pa_in_width(&self, pa: u64) -> bool {
        pa >> self.phys_addr_width == 0
    }
}
