//! Exception-bitmap exits from L2 (exit reason 0) through breakpoints on
//! L2's exception handlers (issue #9). OWNER: helper "intercept".

use nested_exit::VcpuState;
use vmcs12::GuestPhysMemory;

use super::{FlushPending, L2Host, L2Step, Nested, NestedError};

/// Which of L2's exception handlers carry a breakpoint, and why.
#[derive(Debug, Clone, Default)]
pub(super) struct Intercepts {}

impl<V: FlushPending> Nested<V> {
    /// At VM entry (and when L2's IDT may have changed): the handler
    /// breakpoints to request in `self.debug.req.handlers`.
    pub(super) fn intercept_on_entry(
        &mut self,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        self.arm_pf_intercept(l2, mem)
    }

    /// The breakpoint on the handler of `vector` fired at `pc`.
    pub(super) fn intercept_on_handler_hit(
        &mut self,
        vector: u8,
        _pc: u64,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        if vector == 14 {
            return self.handle_pf_breakpoint(mem, host).map(Some);
        }
        Ok(None)
    }
}
