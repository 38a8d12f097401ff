//! Precise mode: instruction exits KVM hides from userspace (CPUID, VMCALL,
//! CR/DR accesses, ...), found by decoding ahead of L2 (issue #9).
//! OWNER: helper "precise".

use vmcs12::GuestPhysMemory;

use super::debug::DebugHit;
use super::{FlushPending, L2Host, L2Step, Nested, NestedError};

/// Precise mode's state for the current L2.
#[derive(Debug, Clone, Default)]
pub(super) struct Precise {}

impl<V: FlushPending> Nested<V> {
    /// Before each L2 run: sets `self.debug.req.precise_stop` /
    /// `single_step`, or synthesizes an exit at RIP right away.
    pub(super) fn precise_before_run(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }

    /// A debug exit that may be precise mode's stop or step.
    pub(super) fn precise_on_debug(
        &mut self,
        _hit: DebugHit,
        _pc: u64,
        _mem: &mut dyn GuestPhysMemory,
        _host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }
}
