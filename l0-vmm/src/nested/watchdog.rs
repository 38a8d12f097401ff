//! The VMCALL watchdog for L2 (issue #9): KVM never returns from `KVM_RUN`
//! on a VMCALL (kvm-host-facts.md); L0 has the L2 vCPU kicked when one
//! `run()` lasts longer than the setting, and when L2's RIP then sits on a
//! VMCALL, L0 synthesizes exit 18 (SDM 26.1.2: VMCALL in VMX non-root
//! operation always exits; length 3, GUEST_RIP at the VMCALL) and decides
//! and reflects it like any other exit. Any other kick is ignored: L2
//! simply goes on. See docs/vmcall-watchdog.md.
//!
//! This is the fallback when precise mode does not see the VMCALL coming;
//! it does not depend on precise mode.

use std::time::{Duration, Instant};

use iced_x86::Code;
use nested_exit::{Exit, VcpuState};
use vmcs12::GuestPhysMemory;

use super::{decode_one, l2_err, read_code, FlushPending, L2Step, Nested, NestedError, Observed};
use crate::ept_slots::L2PhysView;
use crate::vmx_emul::ExecMode;

/// Default VMCALL watchdog: a VMCALL of L2 or L1 reaches L0 this long
/// (plus the kick's lateness, ~0.1-0.3 ms here) after the run began.
pub const DEFAULT_VMCALL_WATCHDOG: Duration = Duration::from_millis(5);

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// VMCALLs the watchdog turned into exits, and how long they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmcallWatchdogStats {
    /// Kicks of the L2 vCPU that reached the watchdog.
    pub kicks: u64,
    /// Of those, kicks that found L2 on a VMCALL (exit 18 synthesized).
    pub vmcalls: u64,
    /// For those: time from the VM entry that started L2 to the kick
    /// (the watchdog delay, its lateness and what L2 ran before the VMCALL).
    pub total: Duration,
    /// Shortest such time.
    pub min: Duration,
    /// Longest such time.
    pub max: Duration,
}

impl VmcallWatchdogStats {
    /// Mean time from VM entry to the synthesized exit 18.
    pub fn mean(&self) -> Option<Duration> {
        u32::try_from(self.vmcalls)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| self.total / n)
    }

    fn add(&mut self, d: Duration) {
        self.min = if self.vmcalls == 0 {
            d
        } else {
            self.min.min(d)
        };
        self.max = self.max.max(d);
        self.total += d;
        self.vmcalls += 1;
    }
}

/// The watchdog's setting and counters.
#[derive(Debug, Clone)]
pub(super) struct Watchdog {
    /// How long one L2 `run()` may last before L0 looks at RIP (`None`:
    /// off).
    setting: Option<Duration>,
    /// When L0 last entered L2 (VMLAUNCH/VMRESUME).
    entered: Option<Instant>,
    stats: VmcallWatchdogStats,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self {
            setting: Some(DEFAULT_VMCALL_WATCHDOG),
            entered: None,
            stats: VmcallWatchdogStats::default(),
        }
    }
}

/// The length of the VMCALL at the start of `bytes` (segment or REX
/// prefixes are ignored), decoded in `mode`; `None` if it is something
/// else, or a VMCALL with a LOCK, REP/REPNE or operand-size prefix, which
/// raises #UD instead of exiting (SDM Vol. 2, VMCALL, "Use of Prefixes").
fn vmcall_len(bytes: &[u8], mode: ExecMode, rip: u64) -> Option<u32> {
    let insn = decode_one(bytes, mode, rip)?;
    if insn.code() != Code::Vmcall {
        return None;
    }
    let len = insn.len();
    let prefixes = bytes.get(..len.saturating_sub(3)).unwrap_or_default();
    if prefixes
        .iter()
        .any(|b| matches!(b, 0x66 | 0xf0 | 0xf2 | 0xf3))
    {
        return None;
    }
    Some(len as u32)
}

impl<V: FlushPending> Nested<V> {
    /// Sets the VMCALL watchdog of L2 (`None`: off; default
    /// [`DEFAULT_VMCALL_WATCHDOG`]). Takes effect at the next VM entry.
    pub fn set_vmcall_watchdog(&mut self, after: Option<Duration>) {
        self.watchdog.setting = after;
    }

    /// The VMCALL watchdog's setting.
    pub fn vmcall_watchdog(&self) -> Option<Duration> {
        self.watchdog.setting
    }

    /// What the VMCALL watchdog did so far.
    pub fn vmcall_watchdog_stats(&self) -> VmcallWatchdogStats {
        self.watchdog.stats
    }

    /// At VM entry: sets `self.kick.watchdog`.
    pub(super) fn watchdog_on_entry(
        &mut self,
        _l2: &VcpuState,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), NestedError> {
        self.kick.watchdog = self.watchdog.setting;
        self.watchdog.entered = Some(Instant::now());
        Ok(())
    }

    /// L0's kick ended L2's `KVM_RUN`: a VMCALL at RIP becomes exit 18,
    /// decided (and recorded, traced, counted) like a KVM exit. `None`:
    /// not a VMCALL, L2 resumes.
    pub(super) fn watchdog_on_kicked(
        &mut self,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        // events_on_kicked may have read the state of this exit already;
        // taken, so that nothing trusts it once L2 runs on.
        let cached = self.l2_cached.take();
        if self.watchdog.setting.is_none() {
            return Ok(None);
        }
        self.watchdog.stats.kicks += 1;
        let l2 = match cached {
            Some(s) => s,
            None => self.l2.get_state().map_err(l2_err)?,
        };
        // An event KVM still has to deliver comes before the instruction
        // at RIP (SDM 6.9): let L2 run into it first.
        if l2.pending_event.is_some() {
            return Ok(None);
        }
        let Some(len) = self.vmcall_at_rip(&l2, mem)? else {
            return Ok(None);
        };
        if let Some(t) = self.watchdog.entered {
            self.watchdog.stats.add(t.elapsed());
        }
        tracing::debug!(rip = l2.rip, len, "VMCALL watchdog: L2 is on a VMCALL");
        let observed = Observed {
            exit: Exit::Vmcall { len },
            l2,
            kvm_pending: false,
        };
        // VMCALL exits unconditionally (SDM 26.1.2): `decide` reflects it.
        if !self.decide_observed(&observed, mem)? {
            return Err(NestedError::Unsupported(format!(
                "L0's policy keeps L2's VMCALL at {:#x}, but L0 has no hypercalls to handle it with",
                observed.l2.rip
            )));
        }
        self.l2_cached = None;
        Ok(Some(L2Step::Reflect(Box::new(observed))))
    }

    /// The length of the VMCALL at L2's CS:RIP, read through L2's paging
    /// (and L1's EPT when vmcs12 enables it); `None` if the bytes are not
    /// a VMCALL or cannot be read.
    fn vmcall_at_rip(
        &self,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<u32>, NestedError> {
        let mut view = L2PhysView {
            mem,
            ept: self.l2_ept()?,
        };
        let mode = ExecMode::of(l2);
        // A full-length read can fail at the end of a page where a short
        // VMCALL still fits: try the plain 3-byte form then.
        let found = [MAX_INSN_LEN, 3].iter().find_map(|&n| {
            read_code(l2, &mut view, l2.rip, n).and_then(|b| vmcall_len(&b, mode, l2.rip))
        });
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vmcall_len_decodes_vmcall_and_rejects_others() {
        for mode in [
            ExecMode::Long64,
            ExecMode::Protected { bits: 32 },
            ExecMode::Real,
        ] {
            assert_eq!(vmcall_len(&[0x0f, 0x01, 0xc1, 0x90], mode, 0x1000), Some(3));
            // VMLAUNCH, VMRESUME, VMMCALL (AMD), NOP: not VMCALL.
            for other in [
                [0x0f, 0x01, 0xc2],
                [0x0f, 0x01, 0xc3],
                [0x0f, 0x01, 0xd9],
                [0x90, 0x0f, 0x01],
            ] {
                assert_eq!(vmcall_len(&other, mode, 0x1000), None, "{other:02x?}");
            }
        }
        // A truncated VMCALL is not one.
        assert_eq!(vmcall_len(&[0x0f, 0x01], ExecMode::Long64, 0), None);
        // Segment and REX prefixes are ignored; operand size, LOCK and REP
        // make it #UD, not an exit.
        let m = ExecMode::Long64;
        assert_eq!(vmcall_len(&[0x2e, 0x0f, 0x01, 0xc1], m, 0), Some(4));
        assert_eq!(vmcall_len(&[0x48, 0x0f, 0x01, 0xc1], m, 0), Some(4));
        for p in [0x66, 0xf0, 0xf2, 0xf3] {
            assert_eq!(vmcall_len(&[p, 0x0f, 0x01, 0xc1], m, 0), None, "{p:#x}");
        }
    }

    #[test]
    fn test_watchdog_stats_mean_min_max() {
        let mut s = VmcallWatchdogStats::default();
        assert_eq!(s.mean(), None);
        s.add(Duration::from_millis(6));
        s.add(Duration::from_millis(4));
        assert_eq!(s.vmcalls, 2);
        assert_eq!(s.mean(), Some(Duration::from_millis(5)));
        assert_eq!(s.min, Duration::from_millis(4));
        assert_eq!(s.max, Duration::from_millis(6));
    }
}
