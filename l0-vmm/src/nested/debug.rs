//! The L2 vCPU's debug hardware, shared by every user (lead-owned).
//!
//! KVM gives L0 four instruction breakpoints (DR0-DR3) and single-step on
//! the L2 vCPU; several features want them at once: exception-handler
//! breakpoints (`intercept.rs`, including the #PF handler for EPT holes),
//! precise mode's next stop (`precise.rs`), the monitor trap flag and
//! stepping over a breakpoint (`events.rs`, here). Each user writes its
//! wish into [`L2DebugRequests`]; [`Nested::apply_l2_debug`] combines them
//! before every `KVM_RUN` (handlers first, precise stop last; a precise
//! stop without a free slot becomes single-step) and issues
//! `KVM_SET_GUEST_DEBUG` only when the result changed. A `KVM_EXIT_DEBUG`
//! is mapped back to its users by [`Nested::on_l2_debug`].

use crate::hv::{GuestDebug, VmExit};

use super::{l2_err, FlushPending, L2Host, L2Step, Nested, NestedError};
use vmcs12::GuestPhysMemory;

/// What each user wants of the L2 vCPU's debug hardware for the next run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct L2DebugRequests {
    /// Exception-handler breakpoints `(vector, linear address)`, most
    /// important first (only the first four get a register).
    pub handlers: Vec<(u8, u64)>,
    /// Precise mode's next stop (a linear address).
    pub precise_stop: Option<u64>,
    /// Single-step wanted for the next run (MTF, a control transfer in
    /// precise mode).
    pub single_step: bool,
}

/// What a debug register serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DebugSlot {
    /// The handler of this exception vector.
    Handler(u8),
    /// Precise mode's stop.
    PreciseStop,
}

/// The combined state: what is programmed and why.
#[derive(Debug, Clone)]
pub(super) struct L2Debug {
    /// The requests of every user.
    pub req: L2DebugRequests,
    /// What the vCPU holds now (`None`: unknown, program at the next run).
    pub applied: Option<GuestDebug>,
    /// Which request each DR0-DR3 serves in `applied`.
    pub slots: [Option<DebugSlot>; 4],
    /// The vCPU has no debug hardware (test fakes): users do without.
    pub unsupported: bool,
}

impl Default for L2Debug {
    /// A new vCPU has guest debugging off.
    fn default() -> Self {
        Self {
            req: L2DebugRequests::default(),
            applied: Some(GuestDebug::OFF),
            slots: [None; 4],
            unsupported: false,
        }
    }
}

/// Which users a `KVM_EXIT_DEBUG` concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct DebugHit {
    /// The exception vector whose handler breakpoint fired.
    pub handler: Option<u8>,
    /// Precise mode's stop was reached.
    pub precise_stop: bool,
    /// A single step completed (DR6.BS).
    pub single_step: bool,
}

/// DR6.BS: the debug exception came from single-stepping (SDM 18.2.3).
const DR6_BS: u64 = 1 << 14;

impl L2Debug {
    /// Combines the requests into register contents.
    pub fn combine(req: &L2DebugRequests) -> (GuestDebug, [Option<DebugSlot>; 4]) {
        let mut dbg = GuestDebug::OFF;
        let mut slots = [None; 4];
        let mut n = 0;
        for &(vector, addr) in &req.handlers {
            if n == 4 {
                break;
            }
            if dbg.breakpoints[..n].contains(&Some(addr)) {
                continue;
            }
            dbg.breakpoints[n] = Some(addr);
            slots[n] = Some(DebugSlot::Handler(vector));
            n += 1;
        }
        dbg.single_step = req.single_step;
        if let Some(stop) = req.precise_stop {
            if n < 4 {
                dbg.breakpoints[n] = Some(stop);
                slots[n] = Some(DebugSlot::PreciseStop);
            } else {
                dbg.single_step = true;
            }
        }
        (dbg, slots)
    }

    /// Maps DR6 (and the PC, for a stop that shares an address) to users.
    pub fn hit(&self, pc: u64, dr6: u64) -> DebugHit {
        let mut hit = DebugHit {
            single_step: dr6 & DR6_BS != 0,
            ..DebugHit::default()
        };
        let Some(applied) = self.applied else {
            return hit;
        };
        for (i, slot) in self.slots.iter().enumerate() {
            let fired = dr6 & (1 << i) != 0 || applied.breakpoints[i] == Some(pc);
            match (fired, slot) {
                (true, Some(DebugSlot::Handler(v))) => hit.handler = Some(*v),
                (true, Some(DebugSlot::PreciseStop)) => hit.precise_stop = true,
                _ => {}
            }
        }
        hit
    }
}

/// Kick deadlines for the L2 vCPU's `KVM_RUN`, by user; the earliest wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct L2Kick {
    /// The VMCALL watchdog (`watchdog.rs`).
    pub watchdog: Option<std::time::Duration>,
    /// Timers and interrupt polling (`events.rs`).
    pub events: Option<std::time::Duration>,
    /// What the vCPU has now (`None`: unknown).
    pub applied: Option<Option<std::time::Duration>>,
}

impl L2Kick {
    /// The earliest wanted deadline.
    pub fn earliest(&self) -> Option<std::time::Duration> {
        match (self.watchdog, self.events) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl<V: FlushPending> Nested<V> {
    /// Sets the L2 vCPU's kick deadline from the requests (the earliest).
    pub(super) fn apply_l2_kick(&mut self) -> Result<(), NestedError> {
        let want = self.kick.earliest();
        if self.kick.applied == Some(want) {
            return Ok(());
        }
        self.l2.set_kick_after(want).map_err(l2_err)?;
        self.kick.applied = Some(want);
        Ok(())
    }

    /// Programs the L2 vCPU's debug hardware from the requests (no ioctl
    /// when nothing changed).
    pub(super) fn apply_l2_debug(&mut self) -> Result<(), NestedError> {
        if self.debug.unsupported {
            return Ok(());
        }
        let (dbg, slots) = L2Debug::combine(&self.debug.req);
        if self.debug.applied == Some(dbg) {
            return Ok(());
        }
        if !self.l2.set_guest_debug(&dbg).map_err(l2_err)? {
            self.debug.unsupported = true;
            self.debug.applied = None;
            self.debug.slots = [None; 4];
            return Ok(());
        }
        self.debug.applied = Some(dbg);
        self.debug.slots = slots;
        Ok(())
    }

    /// Runs exactly one L2 instruction with every breakpoint off (to get
    /// past a breakpoint L0 set); the next `apply_l2_debug` re-arms. An
    /// exit other than the step is returned for the usual handling.
    pub(super) fn step_l2_once(&mut self) -> Result<VmExit, NestedError> {
        if self.debug.unsupported {
            return self.l2.run().map_err(l2_err);
        }
        let step = GuestDebug {
            single_step: true,
            ..GuestDebug::OFF
        };
        if self.debug.applied != Some(step) {
            if !self.l2.set_guest_debug(&step).map_err(l2_err)? {
                self.debug.unsupported = true;
                return self.l2.run().map_err(l2_err);
            }
            self.debug.applied = Some(step);
            self.debug.slots = [None; 4];
        }
        // The vCPU keeps the step setting: the next apply_l2_debug re-arms
        // (one ioctl, only if the requests differ from it).
        self.l2.run().map_err(l2_err)
    }

    /// A `KVM_EXIT_DEBUG` of the L2 vCPU: each user whose breakpoint or
    /// step it is gets it, exception handlers first (an exception was
    /// delivered: the instruction did not complete), then precise mode,
    /// then the monitor trap flag. A debug exit nobody claims (a stale
    /// breakpoint) resumes L2.
    pub(super) fn on_l2_debug(
        &mut self,
        pc: u64,
        dr6: u64,
        mem: &mut dyn GuestPhysMemory,
        host: &mut dyn L2Host,
    ) -> Result<L2Step, NestedError> {
        let hit = self.debug.hit(pc, dr6);
        if let Some(vector) = hit.handler {
            if let Some(step) = self.intercept_on_handler_hit(vector, pc, mem, host)? {
                return Ok(step);
            }
        }
        if let Some(step) = self.precise_on_debug(hit, pc, mem, host)? {
            return Ok(step);
        }
        if let Some(step) = self.events_on_debug(hit, pc, mem, host)? {
            return Ok(step);
        }
        tracing::trace!(pc, dr6, "L2 debug exit claimed by no user: resumed");
        Ok(L2Step::Resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_handlers_take_registers_before_the_precise_stop() {
        let req = L2DebugRequests {
            handlers: vec![(14, 0x1000), (6, 0x2000)],
            precise_stop: Some(0x3000),
            single_step: false,
        };
        let (dbg, slots) = L2Debug::combine(&req);
        assert_eq!(
            dbg.breakpoints,
            [Some(0x1000), Some(0x2000), Some(0x3000), None]
        );
        assert_eq!(slots[2], Some(DebugSlot::PreciseStop));
        assert!(!dbg.single_step);
        assert_eq!(dbg.dr7(), 0x400 | 0b1_0101);
    }

    #[test]
    fn test_precise_stop_without_a_register_single_steps() {
        let req = L2DebugRequests {
            handlers: vec![(0, 1), (1, 2), (3, 3), (6, 4), (13, 5)],
            precise_stop: Some(0x3000),
            single_step: false,
        };
        let (dbg, slots) = L2Debug::combine(&req);
        assert!(dbg.breakpoints.iter().all(Option::is_some));
        assert!(!slots.contains(&Some(DebugSlot::Handler(13))));
        assert!(dbg.single_step);
    }

    #[test]
    fn test_shared_handler_address_uses_one_register() {
        let req = L2DebugRequests {
            handlers: vec![(13, 0x1000), (14, 0x1000)],
            ..L2DebugRequests::default()
        };
        let (dbg, _) = L2Debug::combine(&req);
        assert_eq!(dbg.breakpoints, [Some(0x1000), None, None, None]);
    }

    #[test]
    fn test_hit_maps_dr6_to_users() {
        let req = L2DebugRequests {
            handlers: vec![(14, 0x1000)],
            precise_stop: Some(0x3000),
            single_step: false,
        };
        let (dbg, slots) = L2Debug::combine(&req);
        let d = L2Debug {
            req,
            applied: Some(dbg),
            slots,
            unsupported: false,
        };
        assert_eq!(d.hit(0x1000, 1).handler, Some(14));
        let stop = d.hit(0x3000, 2);
        assert!(stop.precise_stop && stop.handler.is_none() && !stop.single_step);
        let step = d.hit(0x5000, DR6_BS);
        assert!(step.single_step && !step.precise_stop && step.handler.is_none());
    }
}
