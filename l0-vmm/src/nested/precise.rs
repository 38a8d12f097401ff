//! Precise mode: instruction exits KVM hides from userspace (CPUID, VMCALL,
//! CR/DR accesses, ...), found by decoding ahead of L2 (issue #9).
//! OWNER: helper "precise".
//!
//! Before each L2 run L0 plans with [`crate::precise_decode::plan`]: an
//! instruction breakpoint on the one instruction ahead that needs L0 (or
//! none), a single step over a control transfer or an exit L1 does not
//! want, or, when RIP is at an exiting instruction, the exit right away
//! (through `decide`, like every other exit). `docs/precise-mode.md`.

use vmcs12::GuestPhysMemory;

use super::debug::DebugHit;
use super::{l2_err, mode_mask, FlushPending, L2Host, L2Step, Nested, NestedError, Observed};
use crate::ept_slots::L2PhysView;
use crate::precise_decode::{self, AtRip, Plan, PreciseMode, PreciseStats};
use crate::vmx_emul::ExecMode;

/// Instructions decoded ahead per plan at most.
const PLAN_BUDGET: usize = 256;

/// Precise mode's state for the current L2.
#[derive(Debug, Clone)]
pub(super) struct Precise {
    mode: PreciseMode,
    /// Precise mode armed a single step for the next run.
    stepping: bool,
    /// `debug.req.single_step` before precise mode armed its step.
    saved_single_step: bool,
    /// `stats.l2_entries` at the last plan (a new entry: `l2_cached` is
    /// exactly what the vCPU holds).
    seen_entries: u64,
    /// The "precise mode off" trace line was written.
    off_noted: bool,
    stats: PreciseStats,
}

impl Default for Precise {
    fn default() -> Self {
        Self {
            mode: precise_decode::thread_default(),
            stepping: false,
            saved_single_step: false,
            seen_entries: 0,
            off_noted: false,
            stats: PreciseStats::default(),
        }
    }
}

impl<V: FlushPending> Nested<V> {
    /// Turns precise mode on or off for this L1 vCPU (default: on, or the
    /// thread default of `precise_decode::set_thread_default`).
    pub fn set_precise(&mut self, mode: PreciseMode) {
        self.precise.mode = mode;
        self.precise.off_noted = false;
        if mode == PreciseMode::Off {
            self.debug.req.precise_stop = None;
            self.end_precise_step();
        }
    }

    /// The precise-mode setting.
    pub fn precise_mode(&self) -> PreciseMode {
        self.precise.mode
    }

    /// Precise mode's counters.
    pub fn precise_stats(&self) -> PreciseStats {
        self.precise.stats
    }

    fn end_precise_step(&mut self) {
        if self.precise.stepping {
            self.precise.stepping = false;
            self.debug.req.single_step = self.precise.saved_single_step;
        }
    }

    fn arm_precise_step(&mut self) {
        self.debug.req.precise_stop = None;
        if !self.precise.stepping {
            self.precise.saved_single_step = self.debug.req.single_step;
            self.precise.stepping = true;
        }
        self.debug.req.single_step = true;
        self.precise.stats.steps += 1;
    }

    /// Before each L2 run: sets `self.debug.req.precise_stop` /
    /// `single_step`, or synthesizes an exit at RIP right away.
    pub(super) fn precise_before_run(
        &mut self,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        // A step that ended with another exit than the debug trap.
        self.end_precise_step();
        if self.precise.mode == PreciseMode::Off {
            self.debug.req.precise_stop = None;
            if !self.precise.off_noted {
                self.precise.off_noted = true;
                if let Some(v) = self.cpu.current_vmcs() {
                    tracing::info!(
                        hidden = %precise_decode::hidden_exits(v).join(", "),
                        "precise mode is off: L2 runs at KVM speed and L1 will not see these exits (VMCALL: the watchdog)"
                    );
                }
            }
            return Ok(None);
        }
        let state = match self.l2_cached {
            Some(s) if self.stats.l2_entries != self.precise.seen_entries => s,
            _ => self.l2.get_state().map_err(l2_err)?,
        };
        self.precise.seen_entries = self.stats.l2_entries;
        let ept = self.l2_ept()?;
        let vmcs12 = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        let (plan, decoded) = {
            let mut view = L2PhysView {
                mem: &mut *mem,
                ept,
            };
            precise_decode::plan(&state, &mut view, vmcs12, &self.policy, PLAN_BUDGET)
        };
        self.precise.stats.plans += 1;
        self.precise.stats.decoded += decoded as u64;
        tracing::trace!(rip = state.rip, ?plan, "precise mode plan");
        // The vCPU runs after a `None`: what L0 cached of it goes stale.
        let run = |n: &mut Self| {
            n.l2_cached = None;
            Ok(None)
        };
        match plan {
            Plan::Free => {
                self.debug.req.precise_stop = None;
                self.precise.stats.free_runs += 1;
                run(self)
            }
            Plan::Stop { linear, .. } => {
                self.debug.req.precise_stop = Some(linear);
                self.precise.stats.stops_armed += 1;
                run(self)
            }
            Plan::AtRip(AtRip::Step) => {
                self.arm_precise_step();
                run(self)
            }
            Plan::AtRip(AtRip::InvalidOpcode) => {
                // SDM 26.3: RDTSCP with "enable RDTSCP" 0 is #UD.
                self.l2.inject_exception(6, None).map_err(l2_err)?;
                self.precise.stats.injected_ud += 1;
                self.arm_precise_step();
                run(self)
            }
            Plan::AtRip(AtRip::EmulateRead { dest, value, len }) => {
                let mut s = state;
                dest.write(&mut s, value);
                s.rip = s.rip.wrapping_add(len) & mode_mask(ExecMode::of(&s));
                self.l2.set_state(&s).map_err(l2_err)?;
                self.l2_cached = None;
                self.precise.stats.emulated_reads += 1;
                tracing::debug!(
                    rip = state.rip,
                    value,
                    "L2 read CR0/CR4: L0 returned the read-shadow view"
                );
                Ok(Some(L2Step::Resume))
            }
            Plan::AtRip(AtRip::Exit(exit)) => {
                let observed = Observed {
                    exit,
                    l2: state,
                    kvm_pending: false,
                };
                if self.decide_observed(&observed, mem)? {
                    self.precise.stats.reflected += 1;
                    self.debug.req.precise_stop = None;
                    self.l2_cached = None;
                    return Ok(Some(L2Step::Reflect(Box::new(observed))));
                }
                // L1 does not want it: the instruction runs under KVM.
                self.precise.stats.kept_by_l0 += 1;
                self.arm_precise_step();
                run(self)
            }
        }
    }

    /// A debug exit that may be precise mode's stop or step.
    pub(super) fn precise_on_debug(
        &mut self,
        hit: DebugHit,
        _pc: u64,
        _mem: &mut dyn GuestPhysMemory,
        _host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        // Another user's single step (the monitor trap flag) completed
        // in the same exit: leave the exit to it after taking ours.
        let others_step = if self.precise.stepping {
            self.precise.saved_single_step
        } else {
            self.debug.req.single_step
        };
        let ours_step = hit.single_step && self.precise.stepping;
        if !hit.precise_stop && !ours_step {
            return Ok(None);
        }
        if hit.precise_stop {
            self.precise.stats.stop_hits += 1;
        }
        self.end_precise_step();
        self.l2_cached = None;
        if hit.single_step && others_step {
            return Ok(None);
        }
        Ok(Some(L2Step::Resume))
    }
}
