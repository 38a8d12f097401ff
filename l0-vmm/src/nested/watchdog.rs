//! The VMCALL watchdog for L2 (issue #9): KVM never returns from `KVM_RUN`
//! on a VMCALL; a kick after a while lets L0 see RIP on it and turn it into
//! exit 18. OWNER: helper "watchdog".

use nested_exit::VcpuState;
use vmcs12::GuestPhysMemory;

use super::{FlushPending, L2Step, Nested, NestedError};

/// The watchdog's setting and counters.
#[derive(Debug, Clone, Default)]
pub(super) struct Watchdog {}

impl<V: FlushPending> Nested<V> {
    /// At VM entry: sets `self.kick.watchdog`.
    pub(super) fn watchdog_on_entry(
        &mut self,
        _l2: &VcpuState,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        Ok(())
    }

    /// L0's kick ended L2's `KVM_RUN`: a VMCALL at RIP becomes exit 18.
    pub(super) fn watchdog_on_kicked(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }
}
