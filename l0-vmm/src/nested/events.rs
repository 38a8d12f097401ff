//! Time and interrupts in nesting (issue #10): monitor trap flag,
//! VMX-preemption timer, interrupt and NMI windows, external interrupts,
//! interruptibility and activity state. OWNER: helper "events".
//!
//! How each rule is made exact on this host (docs/platform.md, "Time and
//! interrupts in nesting"):
//! - Instruction boundaries (MTF, interrupt and NMI windows) come from
//!   single-stepping the L2 vCPU: KVM's single-step exits at every boundary,
//!   including the one after STI and MOV SS (measured), with the blocking
//!   state in `kvm_vcpu_events`. `request_interrupt_window` is one
//!   instruction late after STI (kvm-host-facts.md), so it is not used for
//!   exit 7.
//! - Time (preemption timer, L1's LAPIC timer) comes from L0's clock: the
//!   L2 `KVM_RUN` is kicked at the earliest deadline (`self.kick.events`).
//! - L1's interrupts are read from L1's in-kernel local APIC
//!   ([`L1Lapic`], attached with [`Nested::attach_l1_lapic`]) at VM entry
//!   and at every kick while L2 runs.

use std::time::{Duration, Instant};

use nested_exit::state::PendingEvent;
use nested_exit::{Exit, VcpuState};
use vmcs12::controls::{ExitControls, PinBased, PrimaryProcBased};
use vmcs12::{GuestPhysMemory, VmcsField};

use super::debug::DebugHit;
use super::{
    l2_err, read_code, BoxError, FlushPending, L2Host, L2Step, Nested, NestedError, Observed,
};

/// Interruptibility state (SDM 24.4.2, Table 24-3).
const BLOCKING_STI: u32 = 1 << 0;
const BLOCKING_MOV_SS: u32 = 1 << 1;
const BLOCKING_NMI: u32 = 1 << 3;
/// Activity state HLT.
const ACTIVITY_HLT: u32 = 1;
/// RFLAGS.IF and RFLAGS.TF.
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_TF: u64 = 1 << 8;
/// Pending debug exceptions / DR6: BS (single step, SDM 24.4.2).
const PENDING_DBG_BS: u64 = 1 << 14;
/// Interruption information: valid (type 0, external interrupt).
const INTR_VALID: u32 = 1 << 31;

/// How often L0 looks at L1's local APIC while L2 runs, for interrupts
/// other than its timer (whose expiry L0 computes exactly).
pub const L1_APIC_POLL: Duration = Duration::from_millis(10);
/// Longest L0 waits for a halted L2 before handing control back to the
/// run loop (`L2Interrupted`, so `--timeout` and signals are seen).
const HALT_SLICE: Duration = Duration::from_millis(10);
/// TSC rate assumed when the vCPU backend does not report one (fakes).
pub const DEFAULT_TSC_KHZ: u32 = 1_000_000;
/// The xAPIC EOI register at the default APIC base (SDM 11.4.1).
const APIC_EOI_GPA: u64 = 0xfee0_00b0;
/// KVM's APIC bus: one LAPIC timer tick per nanosecond at divide-by-1
/// (measured on this host: TMCCT fell by 1.124e6 in 1.117 ms).
const APIC_BUS_NS: u64 = 1;

/// L1's local APIC as the L2 path sees it: the 1 KiB register page of
/// `KVM_GET_LAPIC` / `KVM_SET_LAPIC` (KVM: [`crate::kvm::LapicHandle`]).
pub trait L1Lapic {
    /// The register page.
    fn get(&mut self) -> Result<[u8; 1024], BoxError>;
    /// Writes the register page back.
    fn set(&mut self, regs: &[u8; 1024]) -> Result<(), BoxError>;
}

impl L1Lapic for crate::kvm::LapicHandle {
    fn get(&mut self) -> Result<[u8; 1024], BoxError> {
        crate::kvm::LapicHandle::get(self).map_err(|e| Box::new(e) as BoxError)
    }
    fn set(&mut self, regs: &[u8; 1024]) -> Result<(), BoxError> {
        crate::kvm::LapicHandle::set(self, regs).map_err(|e| Box::new(e) as BoxError)
    }
}

/// Local APIC register offsets (SDM 11.4.1, Table 11-1).
mod apic {
    pub const TPR: usize = 0x80;
    pub const SVR: usize = 0xf0;
    pub const ISR: usize = 0x100;
    pub const IRR: usize = 0x200;
    pub const LVTT: usize = 0x320;
    pub const TMICT: usize = 0x380;
    pub const TMCCT: usize = 0x390;
    pub const TDCR: usize = 0x3e0;
    pub const LVT_MASKED: u32 = 1 << 16;
    pub const SVR_ENABLE: u32 = 1 << 8;
}

fn reg(l: &[u8; 1024], off: usize) -> u32 {
    l.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn set_reg(l: &mut [u8; 1024], off: usize, v: u32) {
    if let Some(b) = l.get_mut(off..off + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

/// Bit `vector` of the 256-bit register (IRR/ISR) at `base`.
fn vec_bit(l: &[u8; 1024], base: usize, vector: u8) -> bool {
    let v = usize::from(vector);
    reg(l, base + 0x10 * (v / 32)) & (1 << (v % 32)) != 0
}

fn set_vec_bit(l: &mut [u8; 1024], base: usize, vector: u8, on: bool) {
    let v = usize::from(vector);
    let off = base + 0x10 * (v / 32);
    let mut r = reg(l, off);
    if on {
        r |= 1 << (v % 32);
    } else {
        r &= !(1 << (v % 32));
    }
    set_reg(l, off, r);
}

fn highest(l: &[u8; 1024], base: usize) -> Option<u8> {
    (0..=255u8).rev().find(|&v| vec_bit(l, base, v))
}

/// The LAPIC timer's divisor (SDM 11.5.4, Figure 11-10).
fn timer_divisor(tdcr: u32) -> u64 {
    let v = (tdcr & 3) | ((tdcr & 8) >> 1);
    1 << ((v + 1) & 7)
}

/// What L1's local APIC holds for L0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct L1ApicView {
    /// The interrupt the APIC would deliver now (highest IRR above the
    /// processor priority, SDM 11.8.3.1), counting a one-shot timer that
    /// expired (KVM keeps an expired timer outside IRR until L1's vCPU
    /// runs: measured).
    pub deliverable: Option<u8>,
    /// The one-shot timer expired and is not yet in IRR.
    pub timer_expired: bool,
    /// Time until the armed timer fires (one-shot or periodic).
    pub timer_in: Option<Duration>,
}

/// Reads the view from the register page.
pub(super) fn l1_apic_view(l: &[u8; 1024]) -> L1ApicView {
    let lvtt = reg(l, apic::LVTT);
    let mode = (lvtt >> 17) & 3;
    let armed = lvtt & apic::LVT_MASKED == 0 && reg(l, apic::TMICT) != 0 && mode < 2;
    let tmcct = reg(l, apic::TMCCT);
    let timer_expired = armed && mode == 0 && tmcct == 0;
    let timer_in = (armed && tmcct != 0).then(|| {
        Duration::from_nanos(u64::from(tmcct) * timer_divisor(reg(l, apic::TDCR)) * APIC_BUS_NS)
    });
    let mut best = highest(l, apic::IRR);
    if timer_expired {
        let v = (lvtt & 0xff) as u8;
        best = best.max(Some(v));
    }
    let enabled = reg(l, apic::SVR) & apic::SVR_ENABLE != 0;
    let tpr = reg(l, apic::TPR) & 0xff;
    let isrv = highest(l, apic::ISR).map_or(0, u32::from);
    let ppr = if (tpr >> 4) >= (isrv >> 4) {
        tpr
    } else {
        isrv & 0xf0
    };
    let deliverable = best.filter(|&v| enabled && (u32::from(v) >> 4) > (ppr >> 4));
    L1ApicView {
        deliverable,
        timer_expired,
        timer_in,
    }
}

/// The interrupt `vector` is taken by the CPU: IRR -> ISR (SDM 11.8.4). An
/// expired one-shot timer becomes that interrupt: TMICT and TMCCT are set
/// to 0 so that `KVM_SET_LAPIC` (which drops KVM's pending timer count and
/// restarts the timer from TMCCT) does not fire it again. L1 then reads
/// TMICT = 0 where hardware keeps the initial count (docs/platform.md).
pub(super) fn acknowledge(l: &mut [u8; 1024], vector: u8) {
    fold_expired_timer(l);
    set_vec_bit(l, apic::IRR, vector, false);
    set_vec_bit(l, apic::ISR, vector, true);
}

/// An expired one-shot timer becomes its IRR bit (left pending for L1).
pub(super) fn fold_expired_timer(l: &mut [u8; 1024]) {
    if l1_apic_view(l).timer_expired {
        let v = (reg(l, apic::LVTT) & 0xff) as u8;
        set_vec_bit(l, apic::IRR, v, true);
        set_reg(l, apic::TMICT, 0);
        set_reg(l, apic::TMCCT, 0);
    }
}

/// Timers and pending events of the current L2.
pub(super) struct Events {
    /// L1's local APIC, when attached.
    l1_lapic: Option<Box<dyn L1Lapic>>,
    /// The TSC rate in kHz (`None`: not asked yet).
    tsc_khz: Option<u32>,
    /// vmcs12's controls at the last entry.
    pin: PinBased,
    primary: PrimaryProcBased,
    exit_ctl: ExitControls,
    /// The monitor trap flag is on for this entry.
    mtf: bool,
    /// The VMX-preemption timer fires at this instant.
    preemption_deadline: Option<Instant>,
    /// VMX_PREEMPTION_TIMER_VALUE as L1 wrote it (kept when the timer is
    /// not active).
    preemption_value: u32,
    /// When L1's LAPIC timer fires (from TMCCT at the last look).
    l1_timer_at: Option<Instant>,
    /// When L0 looks at L1's LAPIC next.
    l1_poll_at: Option<Instant>,
    /// An L1 interrupt waits for the next instruction boundary where L2
    /// can take it (its interrupt window without external-interrupt
    /// exiting, the end of STI/MOV-SS blocking with it).
    deliver_in_l2: Option<u8>,
    /// L2 is in the HLT activity state: L0 does not run it.
    halted: bool,
    /// L2's state before the current single step (RIP, RFLAGS).
    step_from: Option<VcpuState>,
    /// Whether the single step L0 asked for is events' own.
    stepping: bool,
    /// Counters for tests and the summary.
    pub stats: EventStats,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            l1_lapic: None,
            tsc_khz: None,
            pin: PinBased::empty(),
            primary: PrimaryProcBased::empty(),
            exit_ctl: ExitControls::empty(),
            mtf: false,
            preemption_deadline: None,
            preemption_value: 0,
            l1_timer_at: None,
            l1_poll_at: None,
            deliver_in_l2: None,
            halted: false,
            step_from: None,
            stepping: false,
            stats: EventStats::default(),
        }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("l1_lapic", &self.l1_lapic.is_some())
            .field("mtf", &self.mtf)
            .field("preemption_deadline", &self.preemption_deadline)
            .field("halted", &self.halted)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What the event logic did (for tests and the run summary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Single steps taken for MTF or a window.
    pub steps: u64,
    /// L1 interrupts delivered through L2's IDT.
    pub delivered_in_l2: u64,
    /// L1 interrupts acknowledged in L1's LAPIC.
    pub acknowledged: u64,
    /// Looks at L1's LAPIC.
    pub l1_apic_reads: u64,
    /// Times L0 waited for a halted L2.
    pub halt_waits: u64,
    /// EOIs of L2 forwarded to L1's local APIC.
    pub l2_eois: u64,
}

/// Why L2 must leave before (or instead of) running on.
fn window_exit(ev: &Events, s: &VcpuState) -> Option<Exit> {
    let mov_ss = s.interruptibility & BLOCKING_MOV_SS != 0;
    let sti = s.interruptibility & BLOCKING_STI != 0;
    // SDM 26.7.6: NMI-window exiting needs virtual NMIs; the window is open
    // without virtual-NMI blocking and without MOV-SS blocking.
    if ev.primary.contains(PrimaryProcBased::NMI_WINDOW_EXITING)
        && ev.pin.contains(PinBased::VIRTUAL_NMIS)
        && s.interruptibility & BLOCKING_NMI == 0
        && !mov_ss
    {
        return Some(Exit::NmiWindow);
    }
    // SDM 26.7.5: the interrupt window is open with RFLAGS.IF = 1 and no
    // blocking by STI or MOV SS (also in the HLT state, which it ends).
    if ev.primary.contains(PrimaryProcBased::INTR_WINDOW_EXITING)
        && s.rflags & RFLAGS_IF != 0
        && !sti
        && !mov_ss
    {
        return Some(Exit::InterruptWindow);
    }
    None
}

/// Whether L2 can take an external interrupt through its IDT now.
fn l2_takes_interrupt(s: &VcpuState) -> bool {
    s.rflags & RFLAGS_IF != 0
        && s.interruptibility & (BLOCKING_STI | BLOCKING_MOV_SS) == 0
        && s.pending_event.is_none_or(|e| e.info & INTR_VALID == 0)
}

/// Preemption-timer ticks -> wall time at `tsc_khz` (SDM 26.5.1: the timer
/// counts down by 1 every 2^rate TSC ticks).
pub(super) fn preemption_duration(value: u32, rate: u8, tsc_khz: u32) -> Duration {
    let tsc = u128::from(value) << rate.min(31);
    let ns = tsc * 1_000_000 / u128::from(tsc_khz.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Wall time left -> preemption-timer ticks (rounded up: the timer has not
/// reached 0 while time is left).
pub(super) fn preemption_ticks(left: Duration, rate: u8, tsc_khz: u32) -> u32 {
    let tsc = left.as_nanos() * u128::from(tsc_khz) / 1_000_000;
    let unit = 1u128 << rate.min(31);
    u32::try_from(tsc.div_ceil(unit)).unwrap_or(u32::MAX)
}

impl<V: FlushPending> Nested<V> {
    /// Gives the L2 path L1's local APIC (KVM: `l1.lapic_handle()`), so that
    /// L1's interrupts (its LAPIC timer) reach L1 or L2 while L2 runs.
    pub fn attach_l1_lapic(&mut self, lapic: Box<dyn L1Lapic>) {
        self.events.l1_lapic = Some(lapic);
    }

    /// What the event logic did so far.
    pub fn event_stats(&self) -> EventStats {
        self.events.stats
    }

    fn tsc_khz(&mut self) -> Result<u32, NestedError> {
        if let Some(k) = self.events.tsc_khz {
            return Ok(k);
        }
        let k = self
            .l2
            .tsc_khz()
            .map_err(l2_err)?
            .unwrap_or(DEFAULT_TSC_KHZ);
        self.events.tsc_khz = Some(k);
        Ok(k)
    }

    /// Looks at L1's LAPIC (if attached): the deliverable interrupt and
    /// when the timer fires.
    fn read_l1_apic(&mut self) -> Result<Option<([u8; 1024], L1ApicView)>, NestedError> {
        let Some(l) = self.events.l1_lapic.as_mut() else {
            return Ok(None);
        };
        let regs = l.get().map_err(NestedError::L1Vcpu)?;
        self.events.stats.l1_apic_reads += 1;
        let view = l1_apic_view(&regs);
        let now = Instant::now();
        self.events.l1_timer_at = view.timer_in.map(|d| now + d);
        self.events.l1_poll_at = Some(now + L1_APIC_POLL);
        Ok(Some((regs, view)))
    }

    fn write_l1_apic(&mut self, regs: &[u8; 1024]) -> Result<(), NestedError> {
        if let Some(l) = self.events.l1_lapic.as_mut() {
            l.set(regs).map_err(NestedError::L1Vcpu)?;
        }
        Ok(())
    }

    fn synthesized(&mut self, exit: Exit, l2: VcpuState) -> L2Step {
        // The vCPU ran since the last set_state: its state is not known.
        self.l2_cached = None;
        let observed = Observed {
            exit,
            l2,
            kvm_pending: false,
        };
        self.note_synthesized(&observed);
        tracing::debug!(
            reason = observed.exit.basic_reason(),
            rip = l2.rip,
            "L0 synthesized an L2 exit"
        );
        L2Step::Reflect(Box::new(observed))
    }

    /// The L1 interrupt (if any) that is due now: an exit 1 (external-
    /// interrupt exiting), or delivery through L2's IDT.
    fn l1_interrupt_step(&mut self, l2: &mut VcpuState) -> Result<Option<L2Step>, NestedError> {
        let Some((mut regs, view)) = self.read_l1_apic()? else {
            return Ok(None);
        };
        let Some(vector) = view.deliverable else {
            return Ok(None);
        };
        if self.events.pin.contains(PinBased::EXT_INTR_EXITING) {
            // SDM 25.2: RFLAGS.IF does not matter; blocking by STI or MOV
            // SS still holds the interrupt for one instruction.
            if l2.interruptibility & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
                // Looked at again after the next instruction.
                self.events.deliver_in_l2 = Some(vector);
                self.events.stepping = true;
                return Ok(None);
            }
            self.events.deliver_in_l2 = None;
            let ack = self
                .events
                .exit_ctl
                .contains(ExitControls::ACK_INTR_ON_EXIT);
            if ack {
                acknowledge(&mut regs, vector);
                self.events.stats.acknowledged += 1;
            } else {
                // Stays pending in L1's LAPIC; an expired timer moves into
                // IRR so that L0 and L1 see the same single interrupt.
                fold_expired_timer(&mut regs);
            }
            self.write_l1_apic(&regs)?;
            let exit = Exit::ExternalInterrupt {
                vector: ack.then_some(vector),
            };
            return Ok(Some(self.synthesized(exit, *l2)));
        }
        if l2_takes_interrupt(l2) {
            // As hardware without external-interrupt exiting: the CPU takes
            // the interrupt from L1's APIC (IRR -> ISR) and vectors it
            // through the current (L2's) IDT.
            acknowledge(&mut regs, vector);
            self.write_l1_apic(&regs)?;
            self.events.stats.acknowledged += 1;
            self.events.stats.delivered_in_l2 += 1;
            l2.pending_event = Some(PendingEvent {
                info: INTR_VALID | u32::from(vector),
                error_code: 0,
                instruction_len: 0,
            });
            l2.activity = 0;
            self.events.halted = false;
            self.events.deliver_in_l2 = None;
            self.l2.set_state(l2).map_err(l2_err)?;
            self.l2_cached = None;
            return Ok(Some(L2Step::Resume));
        }
        // Wait for L2's interrupt window, one instruction at a time.
        self.events.deliver_in_l2 = Some(vector);
        self.events.stepping = true;
        Ok(None)
    }

    /// At VM entry, after the L2 vCPU got its state: an exit due before
    /// L2's first instruction (preemption timer 0, open windows), if any.
    ///
    /// Priority (SDM 26.7, Linux `vmx_check_nested_events`): VMX-preemption
    /// timer 0, then an L1 interrupt with external-interrupt exiting, then
    /// NMI window, then interrupt window. With an event injected by this
    /// entry the windows are looked at after its delivery (they are closed
    /// by an interrupt gate anyway).
    pub(super) fn events_on_entry(
        &mut self,
        l2: &VcpuState,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<Observed>, NestedError> {
        let vmcs12 = self.cpu.current_vmcs().ok_or(NestedError::NoCurrentVmcs)?;
        let ev = &mut self.events;
        ev.pin = PinBased::from_bits_retain(vmcs12.get32(VmcsField::PIN_BASED_VM_EXEC_CONTROL));
        ev.primary =
            PrimaryProcBased::from_bits_retain(vmcs12.get32(VmcsField::CPU_BASED_VM_EXEC_CONTROL));
        ev.exit_ctl = ExitControls::from_bits_retain(vmcs12.get32(VmcsField::VM_EXIT_CONTROLS));
        ev.preemption_value = vmcs12.get32(VmcsField::VMX_PREEMPTION_TIMER_VALUE);
        ev.mtf = ev.primary.contains(PrimaryProcBased::MONITOR_TRAP_FLAG);
        ev.halted = l2.activity == ACTIVITY_HLT;
        ev.deliver_in_l2 = None;
        ev.step_from = None;
        ev.preemption_deadline = None;
        ev.l1_timer_at = None;
        ev.l1_poll_at = None;
        let injecting = l2.pending_event.is_some_and(|e| e.info & INTR_VALID != 0);
        let mut at_entry = *l2;
        if self.events.pin.contains(PinBased::PREEMPTION_TIMER) {
            let value = self.events.preemption_value;
            if value == 0 {
                // SDM 26.7.4: a VM exit before any instruction of L2.
                return Ok(Some(self.entry_exit(Exit::PreemptionTimer, at_entry)));
            }
            let rate = self.cpu.caps().preemption_timer_rate;
            let khz = self.tsc_khz()?;
            // L1 picks the value: a deadline past what `Instant` holds is
            // one that never comes.
            self.events.preemption_deadline =
                Instant::now().checked_add(preemption_duration(value, rate, khz));
        }
        if !injecting && self.events.l1_lapic.is_some() {
            if let Some(step) = self.l1_interrupt_step(&mut at_entry)? {
                return Ok(match step {
                    L2Step::Reflect(o) => Some(self.entry_exit(o.exit, o.l2)),
                    _ => None,
                });
            }
        }
        if !injecting {
            if let Some(exit) = window_exit(&self.events, &at_entry) {
                return Ok(Some(self.entry_exit(exit, at_entry)));
            }
        }
        Ok(None)
    }

    /// An exit before L2's first instruction: counted as an L1 exit.
    fn entry_exit(&mut self, exit: Exit, l2: VcpuState) -> Observed {
        let observed = Observed {
            exit,
            l2,
            kvm_pending: false,
        };
        self.note_synthesized(&observed);
        observed
    }

    /// An exit these rules make up goes through `decide` like every other
    /// one, so the trace, the recorder, the timeline and the statistics see
    /// it. Its reasons (1, 7, 8, 37, 52, 12 after a step) are decided by
    /// controls alone: no guest memory is read.
    fn note_synthesized(&mut self, observed: &Observed) {
        let mut no_memory = vmcs12::FlatMemory::new(0);
        match self.decide_observed(observed, &mut no_memory) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                exit = observed.exit.name(),
                "an exit made up for L1's controls is L0's by decide: reflected anyway"
            ),
            Err(e) => tracing::warn!(%e, "cannot record a made-up L2 exit"),
        }
    }

    /// Before each L2 run (kick deadline, interrupt window request).
    pub(super) fn events_before_run(&mut self) -> Result<Option<L2Step>, NestedError> {
        let now = Instant::now();
        let timer_due = self.events.preemption_deadline.is_some_and(|d| now >= d);
        if timer_due {
            let l2 = self.events_l2_state()?;
            return Ok(Some(self.synthesized(Exit::PreemptionTimer, l2)));
        }
        let apic_due = self.events.l1_lapic.is_some()
            && (self.events.halted
                || self.events.deliver_in_l2.is_some()
                || self.events.l1_poll_at.is_none_or(|t| now >= t)
                || self.events.l1_timer_at.is_some_and(|t| now >= t));
        // L2's state, read once for this run: nothing below changes the
        // vCPU unless it returns.
        let mut state = None;
        if apic_due {
            let mut l2 = self.events_l2_state_once(&mut state)?;
            if let Some(step) = self.l1_interrupt_step(&mut l2)? {
                return Ok(Some(step));
            }
        }
        if self.events.halted {
            return self.wait_halted().map(Some);
        }
        if let Some(before) = self.events.step_from.take() {
            // The last stepped run ended in an exit L0 completed (an OUT
            // to an L0 port, say): KVM loses the step trap across it
            // (measured), so this boundary is looked at here.
            let now = self.events_l2_state_once(&mut state)?;
            if now.rip != before.rip || now.cs.selector != before.cs.selector {
                if self.events.mtf {
                    return Ok(Some(self.synthesized(Exit::MonitorTrapFlag, now)));
                }
                if let Some(exit) = window_exit(&self.events, &now) {
                    return Ok(Some(self.synthesized(exit, now)));
                }
            }
        }
        // Single-step while MTF is on, or while L0 waits for a window that
        // is closed (exact boundaries; see the module documentation).
        let windows = self.events.primary.intersects(
            PrimaryProcBased::INTR_WINDOW_EXITING | PrimaryProcBased::NMI_WINDOW_EXITING,
        ) || self.events.deliver_in_l2.is_some();
        let step = self.events.mtf || windows;
        self.events.stepping = step;
        self.debug.req.single_step = step;
        if step {
            self.events.step_from = Some(self.events_l2_state_once(&mut state)?);
        } else {
            self.events.step_from = None;
        }
        // Kick at the earliest deadline.
        let deadlines = [
            self.events.preemption_deadline,
            self.events.l1_timer_at,
            self.events.l1_poll_at,
        ];
        self.kick.events = deadlines.into_iter().flatten().min().map(|t| {
            t.saturating_duration_since(Instant::now())
                .max(Duration::from_micros(1))
        });
        Ok(None)
    }

    fn events_l2_state(&mut self) -> Result<VcpuState, NestedError> {
        let mut s = self.l2.get_state().map_err(l2_err)?;
        if self.events.halted {
            s.activity = ACTIVITY_HLT;
        }
        Ok(s)
    }

    /// [`Self::events_l2_state`] through `slot`: one `get_state` for
    /// several looks at an L2 vCPU that does not run in between.
    fn events_l2_state_once(
        &mut self,
        slot: &mut Option<VcpuState>,
    ) -> Result<VcpuState, NestedError> {
        if let Some(s) = *slot {
            return Ok(s);
        }
        let s = self.events_l2_state()?;
        *slot = Some(s);
        Ok(s)
    }

    /// L2 is halted: wait (without spinning) for its next deadline, at
    /// most [`HALT_SLICE`], then let the run loop look again.
    fn wait_halted(&mut self) -> Result<L2Step, NestedError> {
        self.events.stats.halt_waits += 1;
        let now = Instant::now();
        let until = [
            self.events.preemption_deadline,
            self.events.l1_timer_at,
            self.events.l1_poll_at,
            Some(now + HALT_SLICE),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
        std::thread::sleep(until.saturating_duration_since(now));
        if Instant::now() >= now + HALT_SLICE {
            return Ok(L2Step::Interrupted);
        }
        Ok(L2Step::Resume)
    }

    /// A debug exit that may be the monitor trap flag's step.
    pub(super) fn events_on_debug(
        &mut self,
        hit: DebugHit,
        _pc: u64,
        mem: &mut dyn GuestPhysMemory,
        _host: &mut dyn L2Host,
    ) -> Result<Option<L2Step>, NestedError> {
        if !hit.single_step || !self.events.stepping {
            return Ok(None);
        }
        self.l2_cached = None;
        self.events.stats.steps += 1;
        let mut l2 = self.l2.get_state().map_err(l2_err)?;
        let before = self.events.step_from.take();
        // KVM's single-step completes a HLT without halting (measured): the
        // CPU is in the HLT state after it.
        let was_hlt = before.is_some_and(|b| {
            l2.rip == b.rip.wrapping_add(1)
                && read_code(&b, mem, b.rip, 1).is_some_and(|c| c == [0xf4])
        });
        if was_hlt {
            if self.events.primary.contains(PrimaryProcBased::HLT_EXITING) {
                // L1 intercepts HLT: exit 12 at the HLT, which for L1 did
                // not execute (the vCPU is set from vmcs12 at the next entry).
                if let Some(b) = before {
                    let mut at = l2;
                    at.rip = b.rip;
                    return Ok(Some(self.synthesized(Exit::Hlt { len: 1 }, at)));
                }
            }
            l2.activity = ACTIVITY_HLT;
            self.events.halted = true;
        }
        if self.events.mtf {
            // SDM 25.5.2: MTF exit after the instruction, before a pending
            // single-step #DB of L2's own (RFLAGS.TF), which is recorded in
            // the pending debug exceptions (SDM 27.3.4).
            if before.is_some_and(|b| b.rflags & RFLAGS_TF != 0) {
                l2.pending_dbg_exceptions |= PENDING_DBG_BS;
            }
            return Ok(Some(self.synthesized(Exit::MonitorTrapFlag, l2)));
        }
        if before.is_some_and(|b| b.rflags & RFLAGS_TF != 0) {
            // L0's step used the trap flag; L2's own #DB trap is delivered.
            l2.dr6 |= PENDING_DBG_BS;
            self.l2.set_state(&l2).map_err(l2_err)?;
            self.l2.inject_exception(1, None).map_err(l2_err)?;
            return Ok(Some(L2Step::Resume));
        }
        if self
            .events
            .preemption_deadline
            .is_some_and(|d| Instant::now() >= d)
        {
            return Ok(Some(self.synthesized(Exit::PreemptionTimer, l2)));
        }
        if let Some(exit) = window_exit(&self.events, &l2) {
            return Ok(Some(self.synthesized(exit, l2)));
        }
        if self.events.deliver_in_l2.is_some() {
            if let Some(step) = self.l1_interrupt_step(&mut l2)? {
                return Ok(Some(step));
            }
        }
        Ok(Some(L2Step::Resume))
    }

    /// L0's kick ended L2's `KVM_RUN` (timer deadline, interrupt polling).
    pub(super) fn events_on_kicked(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        self.l2_cached = None;
        let now = Instant::now();
        if self.events.preemption_deadline.is_some_and(|d| now >= d) {
            let l2 = self.events_l2_state()?;
            return Ok(Some(self.synthesized(Exit::PreemptionTimer, l2)));
        }
        if self.events.l1_lapic.is_some() {
            let raw = self.l2.get_state().map_err(l2_err)?;
            let mut l2 = raw;
            if self.events.halted {
                l2.activity = ACTIVITY_HLT;
            }
            if let Some(step) = self.l1_interrupt_step(&mut l2)? {
                return Ok(Some(step));
            }
            // Unchanged: the watchdog, next on this exit, reads it from here.
            self.l2_cached = Some(raw);
        }
        // Not ours (the VMCALL watchdog's, or an early deadline).
        Ok(None)
    }

    /// `KVM_EXIT_IRQ_WINDOW_OPEN` of the L2 vCPU (not requested by this
    /// L0: windows are found by single-stepping).
    pub(super) fn events_on_irq_window(
        &mut self,
        _mem: &mut dyn GuestPhysMemory,
    ) -> Result<Option<L2Step>, NestedError> {
        Ok(Some(L2Step::Resume))
    }

    /// L2 executed HLT that L1 does not intercept: L2 enters the HLT
    /// activity state; L0 waits for what wakes it (an L1 interrupt, the
    /// preemption timer) without running it.
    pub(super) fn events_on_l2_hlt(&mut self) -> Result<L2Step, NestedError> {
        self.l2_cached = None;
        self.events.halted = true;
        Ok(L2Step::Resume)
    }

    /// A write of L2 to L1-physical memory with no device behind it (no
    /// EPT: L2's physical space is L1's). A write to the EOI register of
    /// the local APIC page (0xfee000b0) ends the highest in-service
    /// interrupt of L1's APIC, as on hardware, where such a write reaches
    /// the one APIC there is (SDM 11.8.5). Returns whether it was an EOI.
    pub(super) fn events_on_l2_mmio_write(
        &mut self,
        gpa: u64,
        _data: &[u8],
    ) -> Result<bool, NestedError> {
        if gpa != APIC_EOI_GPA {
            return Ok(false);
        }
        let Some((mut regs, _)) = self.read_l1_apic()? else {
            return Ok(false);
        };
        if let Some(v) = highest(&regs, apic::ISR) {
            set_vec_bit(&mut regs, apic::ISR, v, false);
            self.write_l1_apic(&regs)?;
            self.events.stats.l2_eois += 1;
        }
        Ok(true)
    }

    /// An exit is about to be reflected: the timers and steps stop; returns
    /// the VMX-preemption timer value prepare_vmcs12 stores under "save
    /// VMX-preemption timer value" (SDM 27.3.4).
    pub(super) fn events_on_reflect(&mut self, observed: &Observed) -> Result<u32, NestedError> {
        let ev = &mut self.events;
        let deadline = ev.preemption_deadline.take();
        ev.halted = false;
        ev.stepping = false;
        ev.step_from = None;
        ev.deliver_in_l2 = None;
        self.debug.req.single_step = false;
        self.kick.events = None;
        if observed.exit.is_entry_failure() {
            return Ok(0);
        }
        let active = self.events.pin.contains(PinBased::PREEMPTION_TIMER);
        let save = self
            .events
            .exit_ctl
            .contains(ExitControls::SAVE_PREEMPTION_TIMER);
        let value = match (active, save) {
            // SDM 27.3.4: what is left; 0 when the timer caused the exit.
            (true, true) => match (&observed.exit, deadline) {
                (Exit::PreemptionTimer, _) | (_, None) => 0,
                (_, Some(d)) => {
                    let rate = self.cpu.caps().preemption_timer_rate;
                    let khz = self.tsc_khz()?;
                    preemption_ticks(d.saturating_duration_since(Instant::now()), rate, khz)
                }
            },
            // Not active: the field keeps L1's value (Linux nested.c).
            _ => self.events.preemption_value,
        };
        // prepare_vmcs12 stores it under "save VMX-preemption timer value".
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> [u8; 1024] {
        let mut l = [0u8; 1024];
        set_reg(&mut l, apic::SVR, 0x1ff);
        set_reg(&mut l, apic::LVTT, 0x40);
        set_reg(&mut l, apic::TDCR, 0xb);
        l
    }

    #[test]
    fn test_expired_one_shot_timer_is_deliverable() {
        let mut l = page();
        set_reg(&mut l, apic::TMICT, 1000);
        assert_eq!(l1_apic_view(&l).deliverable, Some(0x40));
        assert!(l1_apic_view(&l).timer_expired);
        set_reg(&mut l, apic::TMCCT, 500);
        let v = l1_apic_view(&l);
        assert_eq!(v.deliverable, None);
        assert_eq!(v.timer_in, Some(Duration::from_nanos(500)));
    }

    #[test]
    fn test_masked_or_disabled_apic_delivers_nothing() {
        let mut l = page();
        set_reg(&mut l, apic::TMICT, 1000);
        set_reg(&mut l, apic::LVTT, 0x40 | apic::LVT_MASKED);
        assert_eq!(l1_apic_view(&l).deliverable, None);
        let mut l = page();
        set_vec_bit(&mut l, apic::IRR, 0x50, true);
        assert_eq!(l1_apic_view(&l).deliverable, Some(0x50));
        set_reg(&mut l, apic::SVR, 0xff);
        assert_eq!(l1_apic_view(&l).deliverable, None);
    }

    #[test]
    fn test_priority_blocks_lower_class() {
        let mut l = page();
        set_vec_bit(&mut l, apic::IRR, 0x41, true);
        set_vec_bit(&mut l, apic::ISR, 0x45, true);
        assert_eq!(l1_apic_view(&l).deliverable, None, "same class in service");
        set_vec_bit(&mut l, apic::IRR, 0x51, true);
        assert_eq!(l1_apic_view(&l).deliverable, Some(0x51));
        set_reg(&mut l, apic::TPR, 0x60);
        assert_eq!(l1_apic_view(&l).deliverable, None, "TPR above");
    }

    #[test]
    fn test_acknowledge_moves_irr_to_isr_and_stops_the_timer() {
        let mut l = page();
        set_reg(&mut l, apic::TMICT, 1000);
        acknowledge(&mut l, 0x40);
        assert!(!vec_bit(&l, apic::IRR, 0x40));
        assert!(vec_bit(&l, apic::ISR, 0x40));
        assert_eq!(reg(&l, apic::TMICT), 0);
        assert_eq!(l1_apic_view(&l).deliverable, None);
        let mut l = page();
        set_reg(&mut l, apic::TMICT, 1000);
        fold_expired_timer(&mut l);
        assert!(vec_bit(&l, apic::IRR, 0x40));
        assert!(!vec_bit(&l, apic::ISR, 0x40));
    }

    #[test]
    fn test_timer_divisor_follows_tdcr() {
        assert_eq!(timer_divisor(0xb), 1);
        assert_eq!(timer_divisor(0x0), 2);
        assert_eq!(timer_divisor(0x3), 16);
        assert_eq!(timer_divisor(0xa), 128);
    }

    #[test]
    fn test_preemption_timer_conversions_round_trip() {
        // rate 5, 1 GHz TSC: one tick = 32 ns.
        assert_eq!(
            preemption_duration(1000, 5, 1_000_000),
            Duration::from_nanos(32_000)
        );
        assert_eq!(
            preemption_ticks(Duration::from_nanos(32_000), 5, 1_000_000),
            1000
        );
        assert_eq!(preemption_ticks(Duration::from_nanos(1), 5, 1_000_000), 1);
        assert_eq!(preemption_ticks(Duration::ZERO, 5, 1_000_000), 0);
    }

    #[test]
    fn test_window_rules() {
        let mut ev = Events {
            primary: PrimaryProcBased::INTR_WINDOW_EXITING,
            ..Events::default()
        };
        let mut s = VcpuState {
            rflags: 2 | RFLAGS_IF,
            ..VcpuState::default()
        };
        assert_eq!(window_exit(&ev, &s), Some(Exit::InterruptWindow));
        s.interruptibility = BLOCKING_STI;
        assert_eq!(window_exit(&ev, &s), None, "STI blocking");
        s.interruptibility = 0;
        s.rflags = 2;
        assert_eq!(window_exit(&ev, &s), None, "IF = 0");
        ev.primary = PrimaryProcBased::NMI_WINDOW_EXITING;
        assert_eq!(window_exit(&ev, &s), None, "needs virtual NMIs");
        ev.pin = PinBased::VIRTUAL_NMIS;
        assert_eq!(window_exit(&ev, &s), Some(Exit::NmiWindow));
        s.interruptibility = BLOCKING_NMI;
        assert_eq!(window_exit(&ev, &s), None, "virtual-NMI blocking");
    }
}
