//! Time and interrupts in nesting (issue #10): monitor trap flag,
//! VMX-preemption timer, interrupt and NMI windows, external interrupts,
//! interruptibility and activity state. OWNER: helper "events".

use nested_exit::VcpuState;
use vmcs12::GuestPhysMemory;

use super::debug::DebugHit;
use super::{FlushPending, L2Host, L2Step, Nested, NestedError, Observed};

/// Timers and pending events of the current L2.
#[derive(Debug, Clone, Default)]
pub(super) struct Events {}

impl<V: FlushPending> Nested<V> {
    /// At VM entry, after the L2 vCPU got its state: an exit due before
    /// L2's first instruction (preemption timer 0, open windows), if any.
    pub(super) fn events_on_entry(
        &mut self,
        _l2: &VcpuState,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<Observed>, NestedError> {
        Ok(None)
    }

    /// Before each L2 run (kick deadline, interrupt window request).
    pub(super) fn events_before_run(&mut self) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }

    /// A debug exit that may be the monitor trap flag's step.
    pub(super) fn events_on_debug(
        &mut self,
        _hit: DebugHit,
        _pc: u64,
        _mem: &mut dyn GuestPhysMemory,
        _host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }

    /// L0's kick ended L2's `KVM_RUN` (timer deadline, interrupt polling).
    pub(super) fn events_on_kicked(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }

    /// `KVM_EXIT_IRQ_WINDOW_OPEN` of the L2 vCPU.
    pub(super) fn events_on_irq_window(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(None)
    }

    /// An exit is being reflected; vmcs12 already holds prepare_vmcs12's
    /// result (save the preemption timer, interruptibility, activity).
    pub(super) fn events_on_reflect(&mut self, _observed: &Observed) -> Result<(), NestedError> {
        Ok(())
    }
}
