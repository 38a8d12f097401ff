//! The KVM backend: VMs over the shared guest RAM and a `hv::Vcpu` on a
//! KVM vCPU.
//!
//! Layering (after Firecracker): [`KvmVcpu::run`] is a thin wrapper around
//! `KVM_RUN` (EINTR becomes [`VmExit::Interrupted`]) followed by one flat
//! match turning the borrowed `kvm_ioctls::VcpuExit` into the owned
//! [`VmExit`]; nothing borrowed from `kvm_run` leaves this file. Register
//! state lives in `kvm_run` sync regs (KVM_CAP_SYNC_REGS: regs, sregs,
//! events), so `get_state`/`set_state` of GPRs and segment/control
//! registers cost no ioctl; MSRs and debug registers use ioctls only when
//! the [`SyncPolicy`] asks for them or their value changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_enable_cap, kvm_guest_debug, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, Msrs, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MEM_READONLY, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_PIT_SPEAKER_DUMMY, KVM_VCPUEVENT_VALID_PAYLOAD, KVM_X86_SHADOW_INT_MOV_SS,
    KVM_X86_SHADOW_INT_STI,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use nested_exit::{DescriptorTable, Gprs, PendingEvent, Segment, VcpuState, VmxMsrs};
use vmcs12::VmxCapabilities;

use crate::cpuid;
use crate::hv::{IoctlCounters, Vcpu, VmExit};
use crate::memory::GuestRam;
use crate::msr;

/// Address KVM uses for the real-mode TSS pages on Intel hosts: three pages
/// just below the 4 GiB boundary, above any RAM this VMM maps.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// `KVM_EXIT_*` numbers used for [`VmExit::Unsupported`].
const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_MEMORY_FAULT: u32 = 39;

/// MSR indices kept in [`VmxMsrs`] (SDM Vol. 4, table 2-2).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_DEBUGCTL: u32 = 0x1d9;
const MSR_IA32_PAT: u32 = 0x277;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const STATE_MSRS: [u32; 6] = [
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_DEBUGCTL,
    MSR_IA32_PAT,
    MSR_KERNEL_GS_BASE,
];

/// VMCS interruption types (SDM 24.8.3), bits 10:8 of the info field.
const INTR_TYPE_EXT_INTR: u32 = 0;
const INTR_TYPE_NMI: u32 = 2;
const INTR_TYPE_HARD_EXCEPTION: u32 = 3;
const INTR_TYPE_SOFT_INTR: u32 = 4;
const INTR_INFO_DELIVER_CODE: u32 = 1 << 11;
const INTR_INFO_VALID: u32 = 1 << 31;

/// Interruptibility-state bits (SDM 24.4.2, Table 24-3).
const INTERRUPTIBILITY_STI: u32 = 1 << 0;
const INTERRUPTIBILITY_MOV_SS: u32 = 1 << 1;
const INTERRUPTIBILITY_NMI: u32 = 1 << 3;

/// The interrupt controller of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChip {
    /// None: APIC accesses exit as MMIO, HLT exits to userspace, and
    /// `request_interrupt_window` / `KVM_INTERRUPT` inject interrupts.
    None,
    /// `KVM_CREATE_IRQCHIP` (PIC, IOAPIC and local APIC in the kernel)
    /// plus `KVM_CREATE_PIT2`. `request_interrupt_window` is ignored and
    /// `KVM_INTERRUPT` fails (ENXIO) with an in-kernel PIC.
    InKernel,
    /// `KVM_CAP_SPLIT_IRQCHIP`: the local APIC in the kernel; no PIC,
    /// IOAPIC or PIT (KVM_CREATE_PIT2 needs the in-kernel PIC).
    /// `request_interrupt_window` and `KVM_INTERRUPT` keep working.
    Split,
}

impl IrqChip {
    /// Whether the local APIC (and so HLT) is handled inside KVM.
    pub fn lapic_in_kernel(self) -> bool {
        !matches!(self, IrqChip::None)
    }
}

/// The interrupt controller of L1's VM (why: `docs/platform.md`, "Local
/// APIC and timers"): the split irqchip gives L1 a local APIC and its
/// timer while KVM's interrupt-window exits and `KVM_INTERRUPT` stay usable
/// on L1's vCPU.
pub const L1_IRQCHIP: IrqChip = IrqChip::Split;

/// IOAPIC routes reserved with the split irqchip.
const SPLIT_IRQCHIP_ROUTES: u64 = 24;

/// Whether x2APIC works with an in-kernel local APIC on this host
/// (measured by `test_kvm_x2apic_msrs_answer`): leaf 1 ECX.x2APIC is set
/// only then.
pub const X2APIC_WORKS: bool = true;

/// Leaf 1 ECX bit 21: x2APIC (SDM Vol. 2A, CPUID, Table 3-10).
pub const CPUID_1_ECX_X2APIC: u32 = 1 << 21;

/// How long one KVM_RUN of a vCPU with an in-kernel local APIC may last
/// before L0 looks whether the guest halted with nothing to wake it.
pub const HALT_CHECK_PERIOD: Duration = Duration::from_millis(10);

/// Local APIC register offsets (SDM Vol. 3, 11.4.1, Table 11-1).
const APIC_IRR: usize = 0x200;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_TIMER_MODE_SHIFT: u32 = 17;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
const RFLAGS_IF: u64 = 1 << 9;

fn set_x2apic(entries: &mut [kvm_bindings::kvm_cpuid_entry2], on: bool) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        if on {
            e.ecx |= CPUID_1_ECX_X2APIC;
        } else {
            e.ecx &= !CPUID_1_ECX_X2APIC;
        }
    }
}

/// Userspace MSR exits for the filter's MSRs and for MSRs KVM does not
/// implement (L0 answers those with #GP and lists them).
fn enable_user_space_msr_unknown(vm: &VmFd) -> Result<(), KvmError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN);
    vm.enable_cap(&cap)
        .map_err(|e| KvmError::Msr(msr::MsrError::EnableCap(e)))
}

/// A local-APIC register (32 bits at `offset`) of a `KVM_GET_LAPIC` page.
pub fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, d) in b.iter_mut().enumerate() {
        *d = l.regs.get(offset + i).map_or(0, |&v| v as u8);
    }
    u32::from_le_bytes(b)
}

/// Signal that kicks a vCPU out of KVM_RUN (halt check, run deadline).
fn halt_kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn halt_kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Nanoseconds since a process-wide origin (monotonic).
fn mono_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Why the watcher kicked a KVM_RUN (bits of [`RunShared::kick`]).
const KICK_HALT: u64 = 1;
const KICK_DEADLINE: u64 = 2;
const KICK_REASON_BITS: u32 = 2;
/// A kicked KVM_RUN that has not ended after this long is kicked again.
const KICK_RETRY_NS: u64 = 1_000_000;

/// What a KVM_RUN that failed with EINTR learns from the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KickSeen {
    /// Not the watcher: someone else's signal (or `immediate_exit`).
    None,
    /// A kick meant for an earlier KVM_RUN that had already returned.
    Stale,
    /// This KVM_RUN lasted [`HALT_CHECK_PERIOD`].
    Halt,
    /// This `run()` call outlasted the deadline of `set_kick_after`.
    Deadline,
}

/// State shared between a vCPU and its watcher thread. The vCPU side only
/// touches atomics on each KVM_RUN (plus a futex wake when the watcher is
/// parked with nothing to time).
#[derive(Debug, Default)]
struct RunShared {
    /// Incremented at every KVM_RUN entry.
    run_seq: AtomicU64,
    /// Inside KVM_RUN now.
    in_run: AtomicBool,
    /// The thread calling KVM_RUN (`pthread_t`).
    thread: AtomicU64,
    /// [`mono_ns`] when the current `run()` call began (its first KVM_RUN).
    call_start: AtomicU64,
    /// [`mono_ns`] when the current KVM_RUN began.
    ioctl_start: AtomicU64,
    /// Deadline of `set_kick_after` in ns (0: none).
    kick_after: AtomicU64,
    /// Kick a KVM_RUN that lasts [`HALT_CHECK_PERIOD`] (in-kernel LAPIC).
    halt_check: AtomicBool,
    /// The last kick: `run_seq << KICK_REASON_BITS | reasons` (0: none or
    /// consumed).
    kick: AtomicU64,
    /// The watcher waits on `wake` with nothing to time.
    parked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl RunShared {
    /// Wakes the watcher if it is parked (or `always`).
    fn nudge(&self, always: bool) {
        if always || self.parked.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_one();
        }
    }

    /// The watcher thread: sleeps until the earliest deadline of the
    /// current KVM_RUN (or parks when there is none), then signals the
    /// vCPU thread, again every [`KICK_RETRY_NS`] until that KVM_RUN ends.
    fn watch(&self) {
        // The KVM_RUN kicked last: (run_seq, when, why).
        let mut kicked: Option<(u64, u64, u64)> = None;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let seq = self.run_seq.load(Ordering::SeqCst);
            let in_run = self.in_run.load(Ordering::SeqCst);
            let mut due: Option<(u64, u64)> = None;
            let kicked_seq = kicked.map(|k| k.0);
            if let Some((_, at, why)) = kicked.filter(|k| in_run && k.0 == seq) {
                // A signal that arrived between `enter` and the KVM_RUN
                // syscall ran its handler in userspace and did not stop
                // the run: kick again until that KVM_RUN ends.
                due = Some((at.saturating_add(KICK_RETRY_NS), why));
            } else if in_run {
                let after = self.kick_after.load(Ordering::SeqCst);
                let mut add = |at: u64, why: u64| {
                    due = Some(match due {
                        Some((t, w)) if t < at => (t, w),
                        Some((t, w)) if t == at => (t, w | why),
                        _ => (at, why),
                    });
                };
                if after != 0 {
                    add(
                        self.call_start.load(Ordering::SeqCst).saturating_add(after),
                        KICK_DEADLINE,
                    );
                }
                if self.halt_check.load(Ordering::SeqCst) {
                    let period = u64::try_from(HALT_CHECK_PERIOD.as_nanos()).unwrap_or(u64::MAX);
                    add(
                        self.ioctl_start
                            .load(Ordering::SeqCst)
                            .saturating_add(period),
                        KICK_HALT,
                    );
                }
            }
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            // `nudge` notifies under the lock: a stop that came after the
            // check at the top is seen here, or its wake-up reaches the
            // wait below (else `Drop` would wait out the whole timeout).
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match due {
                Some((at, why)) => {
                    let now = mono_ns();
                    if now < at {
                        // A new KVM_RUN, a new deadline or stop wakes us
                        // early; then everything is looked at again.
                        let _ = self
                            .wake
                            .wait_timeout(guard, Duration::from_nanos(at - now));
                        continue;
                    }
                    drop(guard);
                    if self.run_seq.load(Ordering::SeqCst) != seq
                        || !self.in_run.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    self.kick
                        .store(seq << KICK_REASON_BITS | why, Ordering::SeqCst);
                    kicked = Some((seq, mono_ns(), why));
                    let t = self.thread.load(Ordering::SeqCst) as libc::pthread_t;
                    // SAFETY: `t` is the thread that entered KVM_RUN
                    // `seq`, still inside it at the re-check just above; it
                    // owns the vCPU, which joins this thread before it is
                    // dropped, and L0 runs each vCPU on one thread, so `t`
                    // has not exited. The signal has a no-op handler. A
                    // signal that lands after that KVM_RUN returned either
                    // interrupts a syscall Rust retries or the next
                    // KVM_RUN, which sees a stale kick and re-enters.
                    unsafe { libc::pthread_kill(t, halt_kick_signal()) };
                }
                None => {
                    // Nothing to time: park until the next KVM_RUN, a new
                    // setting or stop (re-checked under the lock, so the
                    // wake-up of `nudge` cannot be lost).
                    self.parked.store(true, Ordering::SeqCst);
                    let changed = self.stop.load(Ordering::SeqCst)
                        || self.run_seq.load(Ordering::SeqCst) != seq
                        || self.in_run.load(Ordering::SeqCst) != in_run
                        || (in_run
                            && kicked_seq != Some(seq)
                            && (self.kick_after.load(Ordering::SeqCst) != 0
                                || self.halt_check.load(Ordering::SeqCst)));
                    let guard = if changed {
                        guard
                    } else {
                        self.wake.wait(guard).unwrap_or_else(|e| e.into_inner())
                    };
                    self.parked.store(false, Ordering::SeqCst);
                    drop(guard);
                }
            }
        }
    }
}

/// One watcher thread per vCPU (started with the vCPU when it has an
/// in-kernel local APIC, or by the first `set_kick_after`). It kicks the
/// vCPU's KVM_RUN with a signal in two cases:
///
/// - Halt check: with an in-kernel local APIC, HLT never reaches
///   userspace: KVM blocks the vCPU inside KVM_RUN until an interrupt
///   arrives. A KVM_RUN that lasted [`HALT_CHECK_PERIOD`] is kicked;
///   [`KvmVcpu::run`] then reports [`VmExit::Hlt`] if the guest is halted
///   and nothing can wake it (IF = 0 and no NMI, or no interrupt pending
///   and no timer armed), and otherwise re-enters KVM_RUN (the guest does
///   not notice).
/// - Run deadline ([`KvmVcpu::set_kick_after`]): a `run()` call still
///   inside KVM_RUN that long after it began returns [`VmExit::Kicked`]
///   (a VMCALL hangs KVM_RUN on this host, see kvm-host-facts.md).
///
/// The watcher sleeps until the earliest deadline of the current KVM_RUN
/// and parks when there is none; it never polls.
#[derive(Debug)]
struct RunWatch {
    shared: Arc<RunShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunWatch {
    fn start(halt_check: bool) -> Result<Self, KvmError> {
        static INIT: Once = Once::new();
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        INIT.call_once(|| {
            if vmm_sys_util::signal::register_signal_handler(halt_kick_signal(), halt_kick_handler)
                .is_ok()
            {
                INSTALLED.store(true, Ordering::SeqCst);
            }
        });
        if !INSTALLED.load(Ordering::SeqCst) {
            return Err(KvmError::HaltWatch(
                "cannot install the vCPU kick signal handler".into(),
            ));
        }
        let shared = Arc::new(RunShared::default());
        shared.halt_check.store(halt_check, Ordering::SeqCst);
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("l0-run-watch".into())
            .spawn(move || sh.watch())
            .map_err(|e| KvmError::HaltWatch(format!("cannot start the vCPU watcher: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn set_kick_after(&self, after: Option<Duration>) {
        let ns = after.map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        self.shared.kick_after.store(ns, Ordering::SeqCst);
        self.shared.nudge(true);
    }

    fn halt_check(&self) -> bool {
        self.shared.halt_check.load(Ordering::SeqCst)
    }

    /// Before each KVM_RUN; `first`: the first of a `run()` call.
    fn enter(&self, first: bool) {
        let sh = &self.shared;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        sh.thread.store(me as u64, Ordering::SeqCst);
        let now = mono_ns();
        if first {
            sh.call_start.store(now, Ordering::SeqCst);
        }
        sh.ioctl_start.store(now, Ordering::SeqCst);
        sh.run_seq.fetch_add(1, Ordering::SeqCst);
        sh.in_run.store(true, Ordering::SeqCst);
        sh.nudge(false);
    }

    fn leave(&self) {
        self.shared.in_run.store(false, Ordering::SeqCst);
    }

    /// After KVM_RUN failed with EINTR: whether (and why) the watcher
    /// kicked it.
    fn take_kick(&self) -> KickSeen {
        let k = self.shared.kick.swap(0, Ordering::SeqCst);
        if k == 0 {
            return KickSeen::None;
        }
        if k >> KICK_REASON_BITS != self.shared.run_seq.load(Ordering::SeqCst) {
            return KickSeen::Stale;
        }
        if k & KICK_DEADLINE != 0 {
            KickSeen::Deadline
        } else {
            KickSeen::Halt
        }
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.nudge(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Errors of the KVM backend, one per failing operation.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}; check that KVM is available and this user may open /dev/kvm"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU failed: {0}")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    SetMemslot {
        /// Slot number.
        slot: u32,
        /// Error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A memslot does not fit in guest RAM.
    #[error("memslot {slot} (RAM offset {ram_offset:#x}, size {size:#x}) is outside guest RAM or not page aligned")]
    BadMemslot {
        /// Slot number.
        slot: u32,
        /// Offset in guest RAM.
        ram_offset: u64,
        /// Size.
        size: u64,
    },
    /// KVM_RUN failed with something other than EINTR.
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM_GET_REGS / KVM_GET_SREGS / KVM_GET_VCPU_EVENTS failed.
    #[error("reading the vCPU registers (KVM_GET_REGS/SREGS/VCPU_EVENTS) failed: {0}")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSRS failed or returned fewer MSRs than asked.
    #[error("KVM_GET_MSRS failed: {0}")]
    GetMsrs(String),
    /// KVM_SET_MSRS failed or set fewer MSRs than asked.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(String),
    /// KVM_GET_DEBUGREGS failed.
    #[error("KVM_GET_DEBUGREGS failed: {0}")]
    GetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_DEBUGREGS failed.
    #[error("KVM_SET_DEBUGREGS failed: {0}")]
    SetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_VCPU_EVENTS failed.
    #[error("KVM_SET_VCPU_EVENTS failed: {0}")]
    SetEvents(#[source] kvm_ioctls::Error),
    /// KVM_SET_GUEST_DEBUG failed.
    #[error("KVM_SET_GUEST_DEBUG failed: {0}")]
    SetGuestDebug(#[source] kvm_ioctls::Error),
    /// The CPUID could not be set up.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// The MSR filter could not be installed.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// Creating the interrupt controller failed.
    #[error("{0} failed: {1}; this KVM cannot give the guest a local APIC")]
    Irqchip(&'static str, #[source] kvm_ioctls::Error),
    /// The vCPU watcher (halt check, run deadline) could not start.
    #[error("{0}")]
    HaltWatch(String),
    /// KVM_GET_LAPIC / KVM_GET_MP_STATE / KVM_SET_MP_STATE failed.
    #[error("{0} failed: {1}")]
    ApicState(&'static str, #[source] kvm_ioctls::Error),
}

/// One KVM memslot: a window of guest RAM mapped at a guest-physical
/// address of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical address in this VM.
    pub gpa: u64,
    /// Offset of the window in [`GuestRam`].
    pub ram_offset: u64,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// Map read-only (writes exit as MMIO).
    pub read_only: bool,
}

/// Which VM this is: decides the CPUID its vCPUs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRole {
    /// L1's VM: CPUID says VMX.
    L1,
    /// The VM L2 runs in: CPUID without VMX.
    L2,
}

/// A KVM VM whose memory is (windows of) the shared [`GuestRam`].
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    ram: Arc<GuestRam>,
    role: VmRole,
    slots: BTreeMap<u32, MemSlot>,
    irqchip: IrqChip,
}

impl KvmVm {
    fn new(ram: Arc<GuestRam>, role: VmRole) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        if let Err(e) = vm.set_tss_address(TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR failed ({e}); not needed by this backend");
        }
        let mut me = Self {
            kvm,
            vm,
            ram,
            role,
            slots: BTreeMap::new(),
            irqchip: IrqChip::None,
        };
        let size = me.ram.size();
        me.set_memslot(MemSlot {
            slot: 0,
            gpa: 0,
            ram_offset: 0,
            size,
            read_only: false,
        })?;
        Ok(me)
    }

    /// L1's VM: all of RAM at guest-physical 0, and RDMSR/WRMSR of
    /// IA32_FEATURE_CONTROL and the IA32_VMX_* MSRs exit to L0.
    ///
    /// The VM gets the interrupt controller [`L1_IRQCHIP`] (a local APIC
    /// L1 can program; see `docs/platform.md` for the choice), and MSRs
    /// KVM does not know exit to L0 too (`KVM_MSR_EXIT_REASON_UNKNOWN`),
    /// so L0 can list them; L0 answers them with #GP as KVM would.
    pub fn new_l1(ram: Arc<GuestRam>, caps: &VmxCapabilities) -> Result<Self, KvmError> {
        Self::new_l1_with(ram, caps, L1_IRQCHIP)
    }

    /// [`KvmVm::new_l1`] with an explicit interrupt controller (tests and
    /// measurements of the alternatives).
    pub fn new_l1_with(
        ram: Arc<GuestRam>,
        _caps: &VmxCapabilities,
        irqchip: IrqChip,
    ) -> Result<Self, KvmError> {
        let mut vm = Self::new(ram, VmRole::L1)?;
        vm.create_irqchip(irqchip)?;
        enable_user_space_msr_unknown(&vm.vm)?;
        msr::install_msr_filter(&vm.vm, msr::VMX_MSR_RANGES)?;
        Ok(vm)
    }

    /// Creates the interrupt controller `kind` (before any vCPU exists).
    pub fn create_irqchip(&mut self, kind: IrqChip) -> Result<(), KvmError> {
        match kind {
            IrqChip::None => {}
            IrqChip::InKernel => {
                self.vm
                    .create_irq_chip()
                    .map_err(|e| KvmError::Irqchip("KVM_CREATE_IRQCHIP", e))?;
                // The speaker port 0x61 stays in userspace (reads as all
                // ones there); the PIT's channel 2 gate is then fixed.
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                self.vm
                    .create_pit2(pit)
                    .map_err(|e| KvmError::Irqchip("KVM_CREATE_PIT2", e))?;
            }
            IrqChip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                // IOAPIC routes reserved for a userspace IOAPIC (KVM's
                // default pin count); L0 emulates none.
                cap.args[0] = SPLIT_IRQCHIP_ROUTES;
                self.vm
                    .enable_cap(&cap)
                    .map_err(|e| KvmError::Irqchip("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e))?;
            }
        }
        self.irqchip = kind;
        Ok(())
    }

    /// The interrupt controller this VM has.
    pub fn irqchip(&self) -> IrqChip {
        self.irqchip
    }

    /// The VM L2 runs in: a second VM whose memslot 0 aliases the same
    /// RAM mapping (replace it with [`KvmVm::set_memslot`] /
    /// [`KvmVm::remove_memslot`] for EPT-style mappings).
    pub fn new_l2(ram: Arc<GuestRam>) -> Result<Self, KvmError> {
        Self::new(ram, VmRole::L2)
    }

    /// The guest RAM this VM maps.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The raw VM fd (for ioctls this type does not wrap).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The role this VM was created for.
    pub fn role(&self) -> VmRole {
        self.role
    }

    /// Current memslots, by slot number.
    pub fn memslots(&self) -> impl Iterator<Item = &MemSlot> {
        self.slots.values()
    }

    /// Adds or replaces a memslot. The window must lie inside guest RAM
    /// and be page aligned.
    pub fn set_memslot(&mut self, s: MemSlot) -> Result<(), KvmError> {
        let bad = KvmError::BadMemslot {
            slot: s.slot,
            ram_offset: s.ram_offset,
            size: s.size,
        };
        let page = crate::memory::PAGE_SIZE;
        if s.size == 0
            || !s.size.is_multiple_of(page)
            || !s.ram_offset.is_multiple_of(page)
            || !s.gpa.is_multiple_of(page)
        {
            return Err(bad);
        }
        if self.ram.check_range(s.ram_offset, s.size).is_err() {
            return Err(bad);
        }
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if s.read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: self.ram.host_addr() + s.ram_offset,
        };
        // SAFETY: the host range [host_addr + ram_offset, + size) lies inside
        // the live guest RAM mapping (checked above), and this VM holds an
        // Arc of that mapping, so it outlives the memslot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| {
            KvmError::SetMemslot {
                slot: s.slot,
                source,
            }
        })?;
        self.slots.insert(s.slot, s);
        Ok(())
    }

    /// Removes a memslot (size 0 in KVM's terms). Unknown slots are a no-op.
    pub fn remove_memslot(&mut self, slot: u32) -> Result<(), KvmError> {
        let Some(s) = self.slots.get(&slot).copied() else {
            return Ok(());
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: s.gpa,
            memory_size: 0,
            userspace_addr: self.ram.host_addr() + s.ram_offset,
        };
        // SAFETY: deleting a slot makes KVM drop its reference to the host
        // range; no new host memory is exposed.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|source| KvmError::SetMemslot { slot, source })?;
        self.slots.remove(&slot);
        Ok(())
    }

    /// Makes RDMSR/WRMSR of the MSR ranges `(base, count)` exit to
    /// userspace as [`VmExit::RdMsr`]/[`VmExit::WrMsr`] (replaces the
    /// VM's previous filter).
    pub fn install_msr_filter(&self, ranges: &[(u32, u32)]) -> Result<(), KvmError> {
        msr::enable_user_space_msr(&self.vm)?;
        msr::install_msr_filter(&self.vm, ranges)?;
        Ok(())
    }

    /// Makes every RDMSR/WRMSR of this VM's vCPUs exit to userspace
    /// (a default-deny filter), so L0 can decide each one (L2's VM).
    pub fn filter_all_msrs(&self) -> Result<(), KvmError> {
        msr::enable_user_space_msr(&self.vm)?;
        msr::install_deny_all_filter(&self.vm)?;
        Ok(())
    }

    /// Creates vCPU `id` with the CPUID of this VM's role.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, KvmError> {
        let fd = self.vm.create_vcpu(id).map_err(KvmError::CreateVcpu)?;
        let mut counters = IoctlCounters::default();
        let entries = cpuid::supported(&self.kvm)?;
        let mut cpuid = match self.role {
            VmRole::L1 => cpuid::l1_cpuid(entries)?,
            VmRole::L2 => cpuid::l2_cpuid(entries)?,
        };
        set_x2apic(&mut cpuid, self.irqchip.lapic_in_kernel() && X2APIC_WORKS);
        cpuid::set(&fd, &cpuid)?;
        counters.other += 1;
        let mut vcpu = KvmVcpu::new(fd, self.ram.clone(), counters, self.vm.run_size())?;
        if self.irqchip.lapic_in_kernel() {
            vcpu.watch = Some(RunWatch::start(true)?);
        }
        Ok(vcpu)
    }
}

/// Ioctl counters shared with [`CounterHandle`]s.
#[derive(Debug, Default)]
struct SharedCounters {
    kvm_run: AtomicU64,
    other: AtomicU64,
}

impl SharedCounters {
    fn bump_run(&self) {
        self.kvm_run.fetch_add(1, Ordering::Relaxed);
    }

    fn bump_other(&self) {
        self.other.fetch_add(1, Ordering::Relaxed);
    }

    fn add(&self, c: IoctlCounters) {
        self.kvm_run.fetch_add(c.kvm_run, Ordering::Relaxed);
        self.other.fetch_add(c.other, Ordering::Relaxed);
    }

    fn get(&self) -> IoctlCounters {
        IoctlCounters {
            kvm_run: self.kvm_run.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
}

/// Reads a [`KvmVcpu`]'s ioctl counters from anywhere.
#[derive(Debug, Clone)]
pub struct CounterHandle(Arc<SharedCounters>);

impl CounterHandle {
    /// The counters now.
    pub fn get(&self) -> IoctlCounters {
        self.0.get()
    }
}

/// Which parts of the state `get_state` reads with ioctls.
///
/// A part that is not read comes from the copy L0 last wrote or read,
/// which may be stale if the guest changed it without an exit. Writes stay
/// exact either way: when `set_state` changes such a part, L0 first reads
/// KVM's values and only replaces the fields the caller changed relative
/// to the copy it was given (one extra ioctl, only when something changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Read SYSENTER_CS/ESP/EIP, DEBUGCTL, PAT, KERNEL_GS_BASE with
    /// KVM_GET_MSRS on every `get_state` (a guest may write them without
    /// an exit).
    pub msrs: bool,
    /// Read DR0-3/DR6/DR7 with KVM_GET_DEBUGREGS on every `get_state`.
    pub debugregs: bool,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            msrs: true,
            debugregs: true,
        }
    }
}

/// The answer the last exit is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    IoIn {
        data_offset: usize,
        size: usize,
        count: usize,
        next: usize,
    },
    MmioRead {
        len: usize,
    },
    RdMsr,
    WrMsr,
}

/// A KVM vCPU driven through [`Vcpu`].
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    _ram: Arc<GuestRam>,
    counters: Arc<SharedCounters>,
    policy: SyncPolicy,
    /// MSRs as KVM holds them (last read or written).
    msrs: VmxMsrs,
    /// Debug registers as KVM holds them.
    debugregs: kvm_debugregs,
    /// Events as KVM holds them (sync copy after a run, or the last set).
    events: kvm_vcpu_events,
    pending: Pending,
    /// Queued OUT elements of a string OUT (`rep outs`), delivered one per
    /// `run()` without entering KVM.
    out_queue: std::collections::VecDeque<VmExit>,
    single_step: bool,
    /// Size of the kvm_run mapping (bounds the I/O data area).
    run_size: usize,
    /// `kvm_run.immediate_exit` as last set.
    immediate_exit: bool,
    /// Halt detection with an in-kernel local APIC and the run deadline
    /// (one watcher thread, started when first needed).
    watch: Option<RunWatch>,
}

impl KvmVcpu {
    fn new(
        fd: VcpuFd,
        ram: Arc<GuestRam>,
        mut counters: IoctlCounters,
        run_size: usize,
    ) -> Result<Self, KvmError> {
        let mut me = Self {
            fd,
            run_size,
            immediate_exit: false,
            watch: None,
            _ram: ram,
            counters: Arc::new(SharedCounters::default()),
            policy: SyncPolicy::default(),
            msrs: VmxMsrs::default(),
            debugregs: kvm_debugregs::default(),
            events: kvm_vcpu_events::default(),
            pending: Pending::None,
            out_queue: Default::default(),
            single_step: false,
        };
        // Prime the sync-regs area: KVM fills it only after the first run.
        let regs = me.fd.get_regs().map_err(KvmError::GetRegs)?;
        let sregs = me.fd.get_sregs().map_err(KvmError::GetRegs)?;
        let events = me.fd.get_vcpu_events().map_err(KvmError::GetRegs)?;
        counters.other += 3;
        me.counters.add(counters);
        me.fd.set_sync_valid_reg(SyncReg::Register);
        me.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        me.fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        let s = me.fd.sync_regs_mut();
        s.regs = regs;
        s.sregs = sregs;
        s.events = events;
        me.events = events;
        me.msrs = me.read_msrs()?;
        me.debugregs = me.read_debugregs()?;
        Ok(me)
    }

    /// Chooses which state `get_state` refreshes with ioctls.
    pub fn set_sync_policy(&mut self, policy: SyncPolicy) {
        self.policy = policy;
    }

    /// Turns single-stepping (`KVM_GUESTDBG_SINGLESTEP`) on or off: each
    /// instruction then exits as [`VmExit::Debug`].
    pub fn set_single_step(&mut self, on: bool) -> Result<(), KvmError> {
        let dbg = kvm_guest_debug {
            control: if on {
                KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
            } else {
                0
            },
            ..Default::default()
        };
        self.counters.bump_other();
        self.fd
            .set_guest_debug(&dbg)
            .map_err(KvmError::SetGuestDebug)?;
        self.single_step = on;
        Ok(())
    }

    /// Programs `KVM_SET_GUEST_DEBUG` from `dbg` (DR0-DR3 execute
    /// breakpoints and single-step; all off clears guest debugging).
    pub fn apply_guest_debug(&mut self, dbg: &crate::hv::GuestDebug) -> Result<(), KvmError> {
        use kvm_bindings::{kvm_guest_debug_arch, KVM_GUESTDBG_USE_HW_BP};
        let mut control = 0;
        if !dbg.is_off() {
            control |= KVM_GUESTDBG_ENABLE;
        }
        if dbg.single_step {
            control |= KVM_GUESTDBG_SINGLESTEP;
        }
        let mut debugreg = [0u64; 8];
        if dbg.breakpoints.iter().any(Option::is_some) {
            control |= KVM_GUESTDBG_USE_HW_BP;
            for (i, bp) in dbg.breakpoints.iter().enumerate() {
                debugreg[i] = bp.unwrap_or(0);
            }
            debugreg[7] = dbg.dr7();
        }
        let k = kvm_guest_debug {
            control,
            arch: kvm_guest_debug_arch { debugreg },
            ..Default::default()
        };
        self.counters.bump_other();
        self.fd
            .set_guest_debug(&k)
            .map_err(KvmError::SetGuestDebug)?;
        self.single_step = dbg.single_step;
        Ok(())
    }

    /// Elements of the current string OUT already performed by KVM and
    /// not yet returned by `run()`.
    pub fn out_elements_queued(&self) -> u32 {
        u32::try_from(self.out_queue.len()).unwrap_or(u32::MAX)
    }

    /// Sets `immediate_exit`: the next `run()` returns
    /// [`VmExit::Interrupted`] without entering the guest.
    /// Queued elements of a string OUT are discarded by such a run.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.immediate_exit = on;
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Makes `run()` return [`VmExit::Kicked`] when a call is still inside
    /// KVM_RUN `after` it began (`None`: never); stays in force for every
    /// later `run()`. Starts the vCPU's watcher thread on first use (the
    /// same thread does the halt check of an in-kernel local APIC).
    pub fn set_kick_after(&mut self, after: Option<Duration>) -> Result<(), KvmError> {
        match (&self.watch, after) {
            (Some(w), _) => w.set_kick_after(after),
            (None, None) => {}
            (None, Some(_)) => {
                let w = RunWatch::start(false)?;
                w.set_kick_after(after);
                self.watch = Some(w);
            }
        }
        Ok(())
    }

    /// KVM_GET_MSRS of one MSR: `None` if KVM does not implement it.
    pub fn get_msr(&mut self, index: u32) -> Result<Option<u64>, KvmError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| KvmError::GetMsrs(format!("{e:?}")))?;
        self.counters.bump_other();
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|e| KvmError::GetMsrs(e.to_string()))?;
        Ok((n == 1).then(|| msrs.as_slice().first().map_or(0, |e| e.data)))
    }

    /// KVM_SET_MSRS of one MSR: `false` if KVM refuses the value.
    pub fn set_msr(&mut self, index: u32, data: u64) -> Result<bool, KvmError> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|e| KvmError::SetMsrs(format!("{e:?}")))?;
        self.counters.bump_other();
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| KvmError::SetMsrs(e.to_string()))?;
        Ok(n == 1)
    }

    /// A handle that reads this vCPU's ioctl counters, also after the vCPU
    /// moved elsewhere (e.g. into the nesting state).
    pub fn counter_handle(&self) -> CounterHandle {
        CounterHandle(self.counters.clone())
    }

    /// The raw vCPU fd (for ioctls this type does not wrap).
    pub fn vcpu_fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn read_msrs(&mut self) -> Result<VmxMsrs, KvmError> {
        let entries: Vec<kvm_msr_entry> = STATE_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| KvmError::GetMsrs(format!("{e:?}")))?;
        self.counters.bump_other();
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|e| KvmError::GetMsrs(e.to_string()))?;
        if n != STATE_MSRS.len() {
            return Err(KvmError::GetMsrs(format!(
                "KVM returned {n} of {} MSRs",
                STATE_MSRS.len()
            )));
        }
        let mut out = self.msrs;
        for e in msrs.as_slice() {
            match e.index {
                MSR_IA32_SYSENTER_CS => out.sysenter_cs = e.data as u32,
                MSR_IA32_SYSENTER_ESP => out.sysenter_esp = e.data,
                MSR_IA32_SYSENTER_EIP => out.sysenter_eip = e.data,
                MSR_IA32_DEBUGCTL => out.debugctl = e.data,
                MSR_IA32_PAT => out.pat = e.data,
                MSR_KERNEL_GS_BASE => out.kernel_gs_base = e.data,
                _ => {}
            }
        }
        Ok(out)
    }

    fn write_msrs(&mut self, m: &VmxMsrs) -> Result<(), KvmError> {
        let entries = [
            (MSR_IA32_SYSENTER_CS, u64::from(m.sysenter_cs)),
            (MSR_IA32_SYSENTER_ESP, m.sysenter_esp),
            (MSR_IA32_SYSENTER_EIP, m.sysenter_eip),
            (MSR_IA32_DEBUGCTL, m.debugctl),
            (MSR_IA32_PAT, m.pat),
            (MSR_KERNEL_GS_BASE, m.kernel_gs_base),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::SetMsrs(format!("{e:?}")))?;
        self.counters.bump_other();
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| KvmError::SetMsrs(e.to_string()))?;
        if n != entries.len() {
            let failed = entries.get(n).map_or(0, |e| e.index);
            return Err(KvmError::SetMsrs(format!(
                "KVM refused MSR {failed:#x} (value {:#x})",
                entries.get(n).map_or(0, |e| e.data)
            )));
        }
        Ok(())
    }

    fn read_debugregs(&mut self) -> Result<kvm_debugregs, KvmError> {
        self.counters.bump_other();
        self.fd.get_debug_regs().map_err(KvmError::GetDebugRegs)
    }

    /// Reads the exit data of `KVM_EXIT_INTERNAL_ERROR` from `kvm_run`.
    fn internal_error_exit(&mut self) -> VmExit {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after KVM_RUN reported
        // KVM_EXIT_INTERNAL_ERROR, which makes `internal` (and, for the
        // emulation suberror, its `emulation_failure` view) the valid
        // union member; both are plain integer structs.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return VmExit::InternalError {
                suberror: internal.suberror,
            };
        }
        // SAFETY: as above: suberror EMULATION selects `emulation_failure`.
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        let mut insn_bytes = Vec::new();
        if ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
            // SAFETY: the flag says the instruction-bytes view is filled in;
            // it is a plain byte struct.
            let b = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(b.insn_size).min(b.insn_bytes.len());
            insn_bytes.extend_from_slice(&b.insn_bytes[..n]);
        }
        VmExit::EmulationFailure { insn_bytes }
    }
}

/// Converts a KVM segment to the VMCS-format record (SDM 24.4.1).
pub fn segment_from_kvm(s: &kvm_segment) -> Segment {
    let ar = u32::from(s.type_ & 0xf)
        | u32::from(s.s & 1) << 4
        | u32::from(s.dpl & 3) << 5
        | u32::from(s.present & 1) << 7
        | u32::from(s.avl & 1) << 12
        | u32::from(s.l & 1) << 13
        | u32::from(s.db & 1) << 14
        | u32::from(s.g & 1) << 15
        | u32::from(s.unusable & 1) << 16;
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        ar,
    }
}

/// Converts a VMCS-format segment to KVM's layout.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    let bit = |n: u32| ((s.ar >> n) & 1) as u8;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (s.ar & 0xf) as u8,
        s: bit(4),
        dpl: ((s.ar >> 5) & 3) as u8,
        present: bit(7),
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: bit(16),
        padding: 0,
    }
}

/// GPRs in KVM's order <-> the VMX register numbering.
pub fn gprs_from_kvm(r: &kvm_regs) -> Gprs {
    Gprs {
        regs: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
    }
}

/// Builds `kvm_regs` from the record.
pub fn regs_to_kvm(s: &VcpuState) -> kvm_regs {
    let g = &s.gprs.regs;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    }
}

/// Builds `kvm_sregs` from the record, keeping the fields VcpuState does
/// not model (APIC base, pending-interrupt bitmap) from `base`.
pub fn sregs_to_kvm(s: &VcpuState, base: &kvm_sregs) -> kvm_sregs {
    let dt = |d: &DescriptorTable| kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    };
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldtr),
        gdt: dt(&s.gdtr),
        idt: dt(&s.idtr),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.msrs.efer,
        apic_base: base.apic_base,
        interrupt_bitmap: base.interrupt_bitmap,
    }
}

/// Builds the record from KVM's structures.
pub fn state_from_kvm(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    events: &kvm_vcpu_events,
    msrs: &VmxMsrs,
    dr: &kvm_debugregs,
) -> VcpuState {
    let dt = |d: &kvm_dtable| DescriptorTable {
        base: d.base,
        limit: d.limit,
    };
    let (interruptibility, pending_event) = events_to_vmx(events);
    VcpuState {
        gprs: gprs_from_kvm(regs),
        rip: regs.rip,
        rflags: regs.rflags,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        cr8: sregs.cr8,
        dr0_3: dr.db,
        dr6: dr.dr6,
        dr7: dr.dr7,
        es: segment_from_kvm(&sregs.es),
        cs: segment_from_kvm(&sregs.cs),
        ss: segment_from_kvm(&sregs.ss),
        ds: segment_from_kvm(&sregs.ds),
        fs: segment_from_kvm(&sregs.fs),
        gs: segment_from_kvm(&sregs.gs),
        ldtr: segment_from_kvm(&sregs.ldt),
        tr: segment_from_kvm(&sregs.tr),
        gdtr: dt(&sregs.gdt),
        idtr: dt(&sregs.idt),
        msrs: VmxMsrs {
            efer: sregs.efer,
            ..*msrs
        },
        interruptibility,
        activity: 0,
        pending_dbg_exceptions: 0,
        pending_event,
    }
}

/// KVM events -> VMX interruptibility state and the pending event.
pub fn events_to_vmx(e: &kvm_vcpu_events) -> (u32, Option<PendingEvent>) {
    let mut intr = 0;
    if u32::from(e.interrupt.shadow) & KVM_X86_SHADOW_INT_STI != 0 {
        intr |= INTERRUPTIBILITY_STI;
    }
    if u32::from(e.interrupt.shadow) & KVM_X86_SHADOW_INT_MOV_SS != 0 {
        intr |= INTERRUPTIBILITY_MOV_SS;
    }
    if e.nmi.masked != 0 {
        intr |= INTERRUPTIBILITY_NMI;
    }
    let ev = if e.exception.injected != 0 || e.exception.pending != 0 {
        let code = if e.exception.has_error_code != 0 {
            INTR_INFO_DELIVER_CODE
        } else {
            0
        };
        Some(PendingEvent {
            info: u32::from(e.exception.nr)
                | INTR_TYPE_HARD_EXCEPTION << 8
                | code
                | INTR_INFO_VALID,
            error_code: e.exception.error_code,
            instruction_len: 0,
        })
    } else if e.nmi.injected != 0 {
        Some(PendingEvent {
            info: 2 | INTR_TYPE_NMI << 8 | INTR_INFO_VALID,
            error_code: 0,
            instruction_len: 0,
        })
    } else if e.interrupt.injected != 0 {
        let ty = if e.interrupt.soft != 0 {
            INTR_TYPE_SOFT_INTR
        } else {
            INTR_TYPE_EXT_INTR
        };
        Some(PendingEvent {
            info: u32::from(e.interrupt.nr) | ty << 8 | INTR_INFO_VALID,
            error_code: 0,
            instruction_len: 0,
        })
    } else {
        None
    };
    (intr, ev)
}

/// VMX interruptibility state and pending event -> KVM events, keeping the
/// fields VMX does not model (SMM, SIPI, pending NMI) from `base`.
pub fn events_from_vmx(
    interruptibility: u32,
    ev: Option<&PendingEvent>,
    base: &kvm_vcpu_events,
) -> kvm_vcpu_events {
    let mut e = *base;
    e.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
    e.exception_has_payload = 0;
    e.exception_payload = 0;
    let mut shadow = 0u32;
    if interruptibility & INTERRUPTIBILITY_STI != 0 {
        shadow |= KVM_X86_SHADOW_INT_STI;
    }
    if interruptibility & INTERRUPTIBILITY_MOV_SS != 0 {
        shadow |= KVM_X86_SHADOW_INT_MOV_SS;
    }
    e.interrupt.shadow = shadow as u8;
    e.nmi.masked = u8::from(interruptibility & INTERRUPTIBILITY_NMI != 0);
    e.exception.injected = 0;
    e.exception.pending = 0;
    e.exception.nr = 0;
    e.exception.has_error_code = 0;
    e.exception.error_code = 0;
    e.interrupt.injected = 0;
    e.interrupt.nr = 0;
    e.interrupt.soft = 0;
    e.nmi.injected = 0;
    if let Some(p) = ev.filter(|p| p.info & INTR_INFO_VALID != 0) {
        let vector = (p.info & 0xff) as u8;
        match (p.info >> 8) & 7 {
            INTR_TYPE_NMI => e.nmi.injected = 1,
            INTR_TYPE_EXT_INTR => {
                e.interrupt.injected = 1;
                e.interrupt.nr = vector;
            }
            INTR_TYPE_SOFT_INTR => {
                e.interrupt.injected = 1;
                e.interrupt.nr = vector;
                e.interrupt.soft = 1;
            }
            // Hardware, software and privileged software exceptions.
            _ => {
                e.exception.injected = 1;
                e.exception.nr = vector;
                e.exception.has_error_code = u8::from(p.info & INTR_INFO_DELIVER_CODE != 0);
                e.exception.error_code = p.error_code;
            }
        }
    }
    e
}

/// The MSRs to write when the caller changed `want` relative to the copy
/// `given` it was handed: changed fields from `want`, the others from
/// KVM's current values `real`.
pub fn merge_msrs(given: &VmxMsrs, want: &VmxMsrs, real: &VmxMsrs) -> VmxMsrs {
    fn pick<T: PartialEq + Copy>(g: T, w: T, r: T) -> T {
        if w == g {
            r
        } else {
            w
        }
    }
    VmxMsrs {
        efer: want.efer,
        pat: pick(given.pat, want.pat, real.pat),
        debugctl: pick(given.debugctl, want.debugctl, real.debugctl),
        sysenter_cs: pick(given.sysenter_cs, want.sysenter_cs, real.sysenter_cs),
        sysenter_esp: pick(given.sysenter_esp, want.sysenter_esp, real.sysenter_esp),
        sysenter_eip: pick(given.sysenter_eip, want.sysenter_eip, real.sysenter_eip),
        kernel_gs_base: pick(
            given.kernel_gs_base,
            want.kernel_gs_base,
            real.kernel_gs_base,
        ),
        // Not kept in KVM MSRs by this backend: the caller's values.
        ..*want
    }
}

/// Whether two event records agree on everything `events_from_vmx` sets.
fn events_equal(a: &kvm_vcpu_events, b: &kvm_vcpu_events) -> bool {
    a.interrupt.shadow == b.interrupt.shadow
        && a.nmi.masked == b.nmi.masked
        && a.nmi.injected == b.nmi.injected
        && a.exception.injected == b.exception.injected
        && a.exception.pending == b.exception.pending
        && a.exception.nr == b.exception.nr
        && a.exception.has_error_code == b.exception.has_error_code
        && a.exception.error_code == b.exception.error_code
        && a.interrupt.injected == b.interrupt.injected
        && a.interrupt.nr == b.interrupt.nr
        && a.interrupt.soft == b.interrupt.soft
}

impl Vcpu for KvmVcpu {
    type Error = KvmError;

    fn run(&mut self) -> Result<VmExit, KvmError> {
        if self.immediate_exit {
            // The caller takes the last exit over and only wants pending
            // completions applied: queued string-I/O elements are dropped.
            self.out_queue.clear();
            if let Pending::IoIn { count, .. } = &mut self.pending {
                *count = 0;
            }
        }
        if let Some(e) = self.out_queue.pop_front() {
            return Ok(e);
        }
        if let Pending::IoIn { count, next, .. } = self.pending {
            if next > 0 && next < count {
                // More elements of a string IN (`rep ins`) to answer.
                return Ok(self.io_in_exit_again());
            }
        }
        self.pending = Pending::None;
        let mut first = true;
        let exit = loop {
            self.counters.bump_run();
            if let Some(w) = &self.watch {
                w.enter(first);
            }
            first = false;
            let res = self.fd.run();
            if let Some(w) = &self.watch {
                w.leave();
            }
            match res {
                Ok(exit) => break exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    let (seen, halt_check) = self
                        .watch
                        .as_ref()
                        .map_or((KickSeen::None, false), |w| (w.take_kick(), w.halt_check()));
                    match seen {
                        // A late signal meant for an earlier KVM_RUN.
                        KickSeen::Stale => continue,
                        KickSeen::Halt | KickSeen::Deadline
                            if halt_check && self.idle_halted()? =>
                        {
                            self.events = self.fd.sync_regs().events;
                            return Ok(VmExit::Hlt);
                        }
                        // Busy or waiting for an interrupt that will come:
                        // the guest goes on as if nothing happened.
                        KickSeen::Halt => continue,
                        KickSeen::Deadline => {
                            self.events = self.fd.sync_regs().events;
                            return Ok(VmExit::Kicked);
                        }
                        KickSeen::None => {
                            self.events = self.fd.sync_regs().events;
                            return Ok(VmExit::Interrupted);
                        }
                    }
                }
                Err(e) => return Err(KvmError::Run(e)),
            }
        };
        let mut pending = Pending::None;
        let mut out_bytes = None;
        let owned = match exit {
            VcpuExit::IoOut(_, data) => {
                out_bytes = Some(data.to_vec());
                None
            }
            VcpuExit::IoIn(..) => None,
            VcpuExit::MmioRead(gpa, data) => {
                pending = Pending::MmioRead { len: data.len() };
                Some(VmExit::MmioRead {
                    gpa,
                    len: data.len() as u8,
                })
            }
            VcpuExit::MmioWrite(gpa, data) => Some(VmExit::MmioWrite {
                gpa,
                data: data.to_vec(),
            }),
            VcpuExit::Hlt => Some(VmExit::Hlt),
            VcpuExit::Shutdown => Some(VmExit::Shutdown),
            VcpuExit::InternalError => None,
            VcpuExit::X86Rdmsr(m) => {
                pending = Pending::RdMsr;
                Some(VmExit::RdMsr { index: m.index })
            }
            VcpuExit::X86Wrmsr(m) => {
                pending = Pending::WrMsr;
                Some(VmExit::WrMsr {
                    index: m.index,
                    data: m.data,
                })
            }
            VcpuExit::Debug(arch) => Some(VmExit::Debug {
                pc: arch.pc,
                dr6: arch.dr6,
            }),
            VcpuExit::IrqWindowOpen => Some(VmExit::IrqWindowOpen),
            VcpuExit::Intr => Some(VmExit::Interrupted),
            VcpuExit::FailEntry(reason, _cpu) => Some(VmExit::FailEntry { reason }),
            VcpuExit::MemoryFault { .. } => Some(VmExit::Unsupported(KVM_EXIT_MEMORY_FAULT)),
            _ => None,
        };
        self.events = self.fd.sync_regs().events;
        let exit_reason = self.fd.get_kvm_run().exit_reason;
        let owned = match owned {
            Some(e) => e,
            None if exit_reason == KVM_EXIT_IO => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the valid
                // union member (a plain integer struct).
                let io = unsafe { run.__bindgen_anon_1.io };
                let size = usize::from(io.size).clamp(1, 4);
                match out_bytes {
                    Some(bytes) => {
                        // A string OUT (`rep outs`) carries `count` elements:
                        // deliver them one per run() call, in order.
                        let mut it = bytes.chunks(size).map(|c| VmExit::IoOut {
                            port: io.port,
                            size: c.len() as u8,
                            data: le_u32(c),
                        });
                        let first = it.next().unwrap_or(VmExit::IoOut {
                            port: io.port,
                            size: io.size,
                            data: 0,
                        });
                        self.out_queue.extend(it);
                        first
                    }
                    None => {
                        pending = Pending::IoIn {
                            data_offset: io.data_offset as usize,
                            size,
                            count: io.count as usize,
                            next: 0,
                        };
                        VmExit::IoIn {
                            port: io.port,
                            size: io.size,
                        }
                    }
                }
            }
            None if exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                self.internal_error_exit()
            }
            None => VmExit::Unsupported(exit_reason),
        };
        self.pending = pending;
        Ok(owned)
    }

    fn get_state(&mut self) -> Result<VcpuState, KvmError> {
        if self.policy.msrs {
            self.msrs = self.read_msrs()?;
        }
        if self.policy.debugregs {
            self.debugregs = self.read_debugregs()?;
        }
        let s = self.fd.sync_regs();
        Ok(state_from_kvm(
            &s.regs,
            &s.sregs,
            &self.events,
            &self.msrs,
            &self.debugregs,
        ))
    }

    fn set_state(&mut self, state: &VcpuState) -> Result<(), KvmError> {
        let cur = self.fd.sync_regs();
        let regs = regs_to_kvm(state);
        let sregs = sregs_to_kvm(state, &cur.sregs);
        let regs_dirty = regs != cur.regs;
        let sregs_dirty = sregs != cur.sregs;
        let msrs = VmxMsrs {
            efer: self.msrs.efer,
            ..state.msrs
        };
        if msrs != self.msrs {
            let msrs = if self.policy.msrs {
                msrs
            } else {
                let real = self.read_msrs()?;
                merge_msrs(&self.msrs, &msrs, &real)
            };
            self.write_msrs(&msrs)?;
            self.msrs = msrs;
        }
        self.msrs.efer = state.msrs.efer;
        let mut dr = kvm_debugregs {
            db: state.dr0_3,
            dr6: state.dr6,
            dr7: state.dr7,
            ..self.debugregs
        };
        if dr != self.debugregs {
            if !self.policy.debugregs {
                let real = self.read_debugregs()?;
                let pick =
                    |given: u64, want: u64, real: u64| if want == given { real } else { want };
                for i in 0..4 {
                    dr.db[i] = pick(self.debugregs.db[i], dr.db[i], real.db[i]);
                }
                dr.dr6 = pick(self.debugregs.dr6, dr.dr6, real.dr6);
                dr.dr7 = pick(self.debugregs.dr7, dr.dr7, real.dr7);
            }
            self.counters.bump_other();
            self.fd
                .set_debug_regs(&dr)
                .map_err(KvmError::SetDebugRegs)?;
            self.debugregs = dr;
        }
        let ev = events_from_vmx(
            state.interruptibility,
            state.pending_event.as_ref(),
            &self.events,
        );
        if !events_equal(&ev, &self.events) {
            self.counters.bump_other();
            self.fd.set_vcpu_events(&ev).map_err(KvmError::SetEvents)?;
            self.events = ev;
        }
        let s = self.fd.sync_regs_mut();
        if regs_dirty {
            s.regs = regs;
        }
        if sregs_dirty {
            s.sregs = sregs;
        }
        if regs_dirty {
            self.fd.set_sync_dirty_reg(SyncReg::Register);
        }
        if sregs_dirty {
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        Ok(())
    }

    fn complete_io_in(&mut self, data: u32) {
        let Pending::IoIn {
            data_offset,
            size,
            count,
            next,
        } = self.pending
        else {
            tracing::warn!("complete_io_in without a pending IN exit: ignored");
            return;
        };
        let bytes = data.to_le_bytes();
        let n = size.min(bytes.len());
        let off = data_offset.saturating_add(next.saturating_mul(size));
        let run_size = self.run_size;
        let base = (self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run).cast::<u8>();
        if next < count && off.saturating_add(n) <= run_size {
            // SAFETY: KVM_EXIT_IO described `count * size` bytes at
            // `data_offset` inside the kvm_run mapping of `run_size` bytes;
            // the destination [off, off + n) was checked against that size.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(off), n) };
        } else {
            tracing::warn!("IN completion outside the kvm_run I/O area: ignored");
        }
        self.pending = Pending::IoIn {
            data_offset,
            size,
            count,
            next: next + 1,
        };
    }

    fn complete_mmio_read(&mut self, data: &[u8]) {
        let Pending::MmioRead { len } = self.pending else {
            tracing::warn!("complete_mmio_read without a pending MMIO read: ignored");
            return;
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the pending state says the last exit was KVM_EXIT_MMIO
        // (a read), so `mmio` is the valid union member.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let n = len.min(data.len()).min(mmio.data.len());
        mmio.data[..n].copy_from_slice(&data[..n]);
        self.pending = Pending::None;
    }

    fn complete_rdmsr(&mut self, value: Option<u64>) {
        if self.pending != Pending::RdMsr {
            tracing::warn!("complete_rdmsr without a pending RDMSR exit: ignored");
            return;
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the pending state says the last exit was
        // KVM_EXIT_X86_RDMSR, so `msr` is the valid union member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match value {
            Some(v) => {
                msr.data = v;
                msr.error = 0;
            }
            None => msr.error = 1,
        }
        self.pending = Pending::None;
    }

    fn complete_wrmsr(&mut self, ok: bool) {
        if self.pending != Pending::WrMsr {
            tracing::warn!("complete_wrmsr without a pending WRMSR exit: ignored");
            return;
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the pending state says the last exit was
        // KVM_EXIT_X86_WRMSR, so `msr` is the valid union member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        msr.error = u8::from(!ok);
        self.pending = Pending::None;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), KvmError> {
        let mut e = self.events;
        e.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
        e.exception.injected = 1;
        e.exception.pending = 0;
        e.exception.nr = vector;
        e.exception.has_error_code = u8::from(error_code.is_some());
        e.exception.error_code = error_code.unwrap_or(0);
        self.counters.bump_other();
        self.fd.set_vcpu_events(&e).map_err(KvmError::SetEvents)?;
        self.events = e;
        Ok(())
    }

    fn counters(&self) -> IoctlCounters {
        self.counters.get()
    }

    fn program_guest_debug(&mut self, dbg: &crate::hv::GuestDebug) -> Result<bool, KvmError> {
        self.apply_guest_debug(dbg)?;
        Ok(true)
    }
}

impl KvmVcpu {
    /// KVM_GET_LAPIC (the in-kernel local APIC's register page; TMCCT is
    /// the current count).
    pub fn get_lapic(&mut self) -> Result<kvm_lapic_state, KvmError> {
        self.counters.bump_other();
        self.fd
            .get_lapic()
            .map_err(|e| KvmError::ApicState("KVM_GET_LAPIC", e))
    }

    /// Whether an interrupt is pending in the local APIC or its timer is
    /// armed (something will wake a halted guest with IF = 1).
    pub fn lapic_event_coming(&mut self) -> Result<bool, KvmError> {
        let l = self.get_lapic()?;
        if (0..8).any(|i| lapic_reg(&l, APIC_IRR + 0x10 * i) != 0) {
            return Ok(true);
        }
        let lvt = lapic_reg(&l, APIC_LVT_TIMER);
        if lvt & APIC_LVT_MASKED != 0 {
            return Ok(false);
        }
        Ok(match (lvt >> APIC_TIMER_MODE_SHIFT) & 3 {
            0 => lapic_reg(&l, APIC_TMCCT) != 0,
            1 => lapic_reg(&l, APIC_TMICT) != 0,
            2 => self.get_msr(IA32_TSC_DEADLINE)?.unwrap_or(0) != 0,
            _ => false,
        })
    }

    /// After a halt-check kick: true (and the vCPU made runnable past its
    /// HLT, as after `KVM_EXIT_HLT`) if the guest is halted and nothing
    /// can wake it.
    fn idle_halted(&mut self) -> Result<bool, KvmError> {
        self.counters.bump_other();
        let mp = self
            .fd
            .get_mp_state()
            .map_err(|e| KvmError::ApicState("KVM_GET_MP_STATE", e))?;
        if mp.mp_state != KVM_MP_STATE_HALTED {
            return Ok(false);
        }
        let s = self.fd.sync_regs();
        if s.events.nmi.pending != 0 || s.events.nmi.injected != 0 {
            return Ok(false);
        }
        if s.regs.rflags & RFLAGS_IF != 0 && self.lapic_event_coming()? {
            return Ok(false);
        }
        self.counters.bump_other();
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(|e| KvmError::ApicState("KVM_SET_MP_STATE", e))?;
        Ok(true)
    }

    fn io_in_exit_again(&mut self) -> VmExit {
        let run = self.fd.get_kvm_run();
        // SAFETY: a pending string IN means the last KVM exit was
        // KVM_EXIT_IO, so `io` is still the valid union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        VmExit::IoIn {
            port: io.port,
            size: io.size,
        }
    }
}

/// `KVM_GET_LAPIC` / `KVM_SET_LAPIC` (`_IOR`/`_IOW(KVMIO, 0x8e/0x8f, 1024)`).
const KVM_GET_LAPIC_IOCTL: libc::c_ulong = 0x8400_ae8e;
const KVM_SET_LAPIC_IOCTL: libc::c_ulong = 0x4400_ae8f;

/// Access to one vCPU's in-kernel local APIC through a duplicate of its
/// file descriptor, for code that does not own the [`KvmVcpu`] (the L2
/// path reads L1's pending interrupts while L1's vCPU is out of
/// `KVM_RUN`, on the same thread).
#[derive(Debug)]
pub struct LapicHandle {
    fd: std::os::fd::OwnedFd,
}

impl LapicHandle {
    /// KVM_GET_LAPIC: the 1 KiB register page.
    pub fn get(&self) -> Result<[u8; 1024], KvmError> {
        use std::os::fd::AsRawFd;
        let mut l = kvm_lapic_state::default();
        // SAFETY: KVM_GET_LAPIC writes exactly one kvm_lapic_state (1024
        // bytes) into the valid, exclusively borrowed buffer.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_LAPIC_IOCTL, &mut l) };
        if r < 0 {
            return Err(KvmError::ApicState(
                "KVM_GET_LAPIC",
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(l.regs.map(|b| b as u8))
    }

    /// KVM_SET_LAPIC with the 1 KiB register page.
    pub fn set(&self, regs: &[u8; 1024]) -> Result<(), KvmError> {
        use std::os::fd::AsRawFd;
        let l = kvm_lapic_state {
            regs: regs.map(|b| b as libc::c_char),
        };
        // SAFETY: KVM_SET_LAPIC reads one kvm_lapic_state from the valid
        // buffer and keeps no reference to it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_SET_LAPIC_IOCTL, &l) };
        if r < 0 {
            return Err(KvmError::ApicState(
                "KVM_SET_LAPIC",
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(())
    }
}

/// Interrupt and timer support of a vCPU (helper "events"): the interrupt
/// window of a vCPU without an in-kernel PIC, NMI injection, the TSC rate
/// and local APIC access.
impl KvmVcpu {
    /// Sets `kvm_run.request_interrupt_window`: with it KVM returns
    /// [`VmExit::IrqWindowOpen`] once the guest can take an interrupt
    /// (measured on this host: one instruction after the boundary where the
    /// window opened, see docs/platform.md).
    pub fn set_request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    /// `kvm_run.ready_for_interrupt_injection` of the last exit.
    pub fn ready_for_interrupt_injection(&mut self) -> bool {
        self.fd.get_kvm_run().ready_for_interrupt_injection != 0
    }

    /// KVM_NMI: queues an NMI for the guest.
    pub fn nmi(&mut self) -> Result<(), KvmError> {
        self.counters.bump_other();
        self.fd.nmi().map_err(|e| KvmError::ApicState("KVM_NMI", e))
    }

    /// KVM_GET_TSC_KHZ: the guest TSC's rate (`None` if KVM does not say).
    pub fn tsc_khz(&mut self) -> Result<Option<u32>, KvmError> {
        self.counters.bump_other();
        match self.fd.get_tsc_khz() {
            Ok(0) => Ok(None),
            Ok(khz) => Ok(Some(khz)),
            Err(e) if e.errno() == libc::EIO || e.errno() == libc::ENOTTY => Ok(None),
            Err(e) => Err(KvmError::ApicState("KVM_GET_TSC_KHZ", e)),
        }
    }

    /// KVM_SET_LAPIC.
    pub fn set_lapic(&mut self, l: &kvm_lapic_state) -> Result<(), KvmError> {
        self.counters.bump_other();
        self.fd
            .set_lapic(l)
            .map_err(|e| KvmError::ApicState("KVM_SET_LAPIC", e))
    }

    /// A handle on this vCPU's local APIC (a duplicated descriptor).
    pub fn lapic_handle(&self) -> Result<LapicHandle, KvmError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: dup of a descriptor this vCPU owns; the result is checked.
        let raw = unsafe { libc::dup(self.fd.as_raw_fd()) };
        if raw < 0 {
            return Err(KvmError::ApicState("dup", kvm_ioctls::Error::last()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        Ok(LapicHandle { fd })
    }
}

/// Little-endian value of up to four bytes.
fn le_u32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = b.len().min(4);
    v[..n].copy_from_slice(&b[..n]);
    u32::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{images::elf64, load_kernel};
    use crate::memory::RamView;
    use crate::test_support::kvm_or_skip;
    use std::sync::mpsc;
    use vmcs12::GuestPhysMemory;

    const CODE: u64 = 0x20_0000;

    /// RAM of 16 MiB with `code` loaded as an ELF64 kernel at 2 MiB, and a
    /// vCPU of a VM with `role` sitting at its entry in 64-bit mode.
    fn guest(ram: &Arc<GuestRam>, role: VmRole, code: &[u8]) -> (KvmVm, KvmVcpu) {
        let k = load_kernel(ram, &elf64(CODE, code, 0), "").unwrap();
        let vm = match role {
            VmRole::L1 => KvmVm::new_l1(ram.clone(), &VmxCapabilities::default()).unwrap(),
            VmRole::L2 => KvmVm::new_l2(ram.clone()).unwrap(),
        };
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let base = vcpu.get_state().unwrap();
        vcpu.set_state(&k.entry_state(&base)).unwrap();
        (vm, vcpu)
    }

    fn ram() -> Arc<GuestRam> {
        Arc::new(GuestRam::new(16 << 20).unwrap())
    }

    #[test]
    fn test_segment_conversion_round_trips() {
        for ar in [0xa09bu32, 0xc093, 0x8b, 0x1_0082, 0x1_0000, 0xf0ff] {
            let s = Segment {
                selector: 0x10,
                base: 0x1234_5678,
                limit: 0xfffff,
                ar: ar & 0x1_f0ff,
            };
            assert_eq!(segment_from_kvm(&segment_to_kvm(&s)), s);
        }
        let k = kvm_segment {
            type_: 0xb,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        assert_eq!(segment_from_kvm(&k).ar, 0xa09b);
        let unusable = kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        assert!(segment_from_kvm(&unusable).unusable());
        assert!(!segment_from_kvm(&k).unusable());
    }

    #[test]
    fn test_events_conversion_round_trips() {
        let base = kvm_vcpu_events::default();
        let cases = [
            (0u32, None),
            (INTERRUPTIBILITY_STI, None),
            (INTERRUPTIBILITY_MOV_SS | INTERRUPTIBILITY_NMI, None),
            (
                0,
                Some(PendingEvent {
                    info: 13 | 3 << 8 | INTR_INFO_DELIVER_CODE | INTR_INFO_VALID,
                    error_code: 0x18,
                    instruction_len: 0,
                }),
            ),
            (
                0,
                Some(PendingEvent {
                    info: 0x20 | INTR_INFO_VALID,
                    error_code: 0,
                    instruction_len: 0,
                }),
            ),
            (
                0,
                Some(PendingEvent {
                    info: 2 | 2 << 8 | INTR_INFO_VALID,
                    error_code: 0,
                    instruction_len: 0,
                }),
            ),
        ];
        for (intr, ev) in cases {
            let e = events_from_vmx(intr, ev.as_ref(), &base);
            assert_eq!(events_to_vmx(&e), (intr, ev));
        }
        // An invalid (bit 31 clear) event is no event.
        let e = events_from_vmx(
            0,
            Some(&PendingEvent {
                info: 13 | 3 << 8,
                error_code: 0,
                instruction_len: 0,
            }),
            &base,
        );
        assert_eq!(events_to_vmx(&e), (0, None));
    }

    #[test]
    fn test_regs_conversion_uses_vmx_register_numbering() {
        let mut s = VcpuState::default();
        for i in 0..16 {
            s.gprs.regs[i] = 0x100 + i as u64;
        }
        let r = regs_to_kvm(&s);
        assert_eq!((r.rax, r.rcx, r.rdx, r.rbx), (0x100, 0x101, 0x102, 0x103));
        assert_eq!((r.rsp, r.rbp, r.rsi, r.rdi), (0x104, 0x105, 0x106, 0x107));
        assert_eq!(r.r15, 0x10f);
        assert_eq!(gprs_from_kvm(&r), s.gprs);
    }

    #[test]
    fn test_kvm_vmx_instruction_is_an_emulation_failure_at_rip() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // nop; vmxoff
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &[0x90, 0x0f, 0x01, 0xc4, 0xf4]);
        let exit = vcpu.run().unwrap();
        assert!(
            matches!(exit, VmExit::EmulationFailure { .. }),
            "expected an emulation failure, got {exit:?}"
        );
        if let VmExit::EmulationFailure { insn_bytes } = &exit {
            eprintln!("emulation failure bytes reported by KVM: {insn_bytes:02x?}");
            if !insn_bytes.is_empty() {
                assert_eq!(&insn_bytes[..3], &[0x0f, 0x01, 0xc4]);
            }
        }
        assert_eq!(vcpu.get_state().unwrap().rip, CODE + 1);
        // Skipping it by writing RIP continues the guest.
        let mut s = vcpu.get_state().unwrap();
        s.rip += 3;
        vcpu.set_state(&s).unwrap();
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
    }

    #[test]
    fn test_kvm_out_exits_with_rip_after_and_in_is_completed() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // mov al, 0x41; out 0xe9, al; in al, 0xe9; out 0xe9, al; hlt
        let code = [0xb0, 0x41, 0xe6, 0xe9, 0xe4, 0xe9, 0xe6, 0xe9, 0xf4];
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &code);
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::IoOut {
                port: 0xe9,
                size: 1,
                data: 0x41
            }
        );
        assert_eq!(vcpu.get_state().unwrap().rip, CODE + 4);
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::IoIn {
                port: 0xe9,
                size: 1
            }
        );
        assert_eq!(
            vcpu.get_state().unwrap().rip,
            CODE + 4,
            "IN: RIP at the instruction"
        );
        vcpu.complete_io_in(0x77);
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::IoOut {
                port: 0xe9,
                size: 1,
                data: 0x77
            }
        );
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
        let c = vcpu.counters();
        assert_eq!(c.kvm_run, 4);
    }

    #[test]
    fn test_kvm_two_vms_share_memory() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // VM 1: mov byte [0x300000], 0x5a; hlt
        let (_vm1, mut v1) = guest(
            &ram,
            VmRole::L1,
            &[0xc6, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x5a, 0xf4],
        );
        assert_eq!(v1.run().unwrap(), VmExit::Hlt);
        assert_eq!(RamView(&ram).read_u32(0x30_0000), Ok(0x5a));
        // VM 2 (same RAM, loaded again at the same place): read it back.
        // mov al, [0x300000]; out 0xe9, al; hlt
        let (_vm2, mut v2) = guest(
            &ram,
            VmRole::L2,
            &[0x8a, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0xe6, 0xe9, 0xf4],
        );
        assert_eq!(
            v2.run().unwrap(),
            VmExit::IoOut {
                port: 0xe9,
                size: 1,
                data: 0x5a
            }
        );
    }

    #[test]
    fn test_kvm_sync_regs_round_trip_without_ioctls() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // add rax, rbx; hlt (an L2-role VM: no local APIC in the kernel,
        // so the HLT reaches userspace without a halt check's ioctls)
        let (_vm, mut vcpu) = guest(&ram, VmRole::L2, &[0x48, 0x01, 0xd8, 0xf4]);
        vcpu.set_sync_policy(SyncPolicy {
            msrs: false,
            debugregs: false,
        });
        let mut s = vcpu.get_state().unwrap();
        s.gprs.regs[0] = 40;
        s.gprs.regs[3] = 2;
        s.gprs.regs[15] = 0xdead_beef;
        s.cr2 = 0x1234_5000;
        let before = vcpu.counters();
        vcpu.set_state(&s).unwrap();
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
        let after = vcpu.get_state().unwrap();
        assert_eq!(
            vcpu.counters().other,
            before.other,
            "no ioctl besides KVM_RUN"
        );
        assert_eq!(after.gprs.regs[0], 42);
        assert_eq!(after.gprs.regs[15], 0xdead_beef);
        assert_eq!(after.cr2, 0x1234_5000, "sregs went through sync regs");
        assert_eq!(after.rip, CODE + 4);
        assert_eq!(after.cs, s.cs);
        assert_eq!(after.tr, s.tr);
        assert_eq!(after.msrs.efer, s.msrs.efer);
        // An unchanged state costs nothing either.
        vcpu.set_state(&after).unwrap();
        assert_eq!(vcpu.counters().other, before.other);
    }

    #[test]
    fn test_kvm_msrs_and_debugregs_round_trip() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &[0xf4]);
        let mut s = vcpu.get_state().unwrap();
        s.msrs.sysenter_cs = 0x10;
        s.msrs.sysenter_eip = 0xffff_8000_0000_1000;
        s.msrs.pat = 0x0007_0406_0007_0406;
        s.dr0_3[1] = 0x5000;
        s.dr7 = 0x400 | (1 << 2);
        vcpu.set_state(&s).unwrap();
        let back = vcpu.get_state().unwrap();
        assert_eq!(back.msrs.sysenter_cs, 0x10);
        assert_eq!(back.msrs.sysenter_eip, 0xffff_8000_0000_1000);
        assert_eq!(back.msrs.pat, 0x0007_0406_0007_0406);
        assert_eq!(back.dr0_3[1], 0x5000);
        assert_eq!(back.dr7 & 0xff, 1 << 2);
    }

    #[test]
    fn test_kvm_msr_filter_exits_for_vmx_msrs() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // mov ecx, 0x480; rdmsr; mov dx, 0xe9; out dx, eax; wrmsr; hlt
        let code = [
            0xb9, 0x80, 0x04, 0x00, 0x00, 0x0f, 0x32, 0x66, 0xba, 0xe9, 0x00, 0xef, 0x0f, 0x30,
            0xf4,
        ];
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &code);
        assert_eq!(vcpu.run().unwrap(), VmExit::RdMsr { index: 0x480 });
        vcpu.complete_rdmsr(Some(0x1122_3344_5566_7788));
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::IoOut {
                port: 0xe9,
                size: 4,
                data: 0x5566_7788
            }
        );
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::WrMsr {
                index: 0x480,
                // DX was overwritten by `mov dx, 0xe9`.
                data: 0x1122_00e9_5566_7788
            }
        );
        // Refusing it raises #GP; with no IDT that ends in a triple fault.
        vcpu.complete_wrmsr(false);
        assert_eq!(vcpu.run().unwrap(), VmExit::Shutdown);
    }

    #[test]
    fn test_kvm_msrs_outside_the_filter_do_not_exit() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // mov ecx, 0x277 (PAT); rdmsr; hlt
        let (_vm, mut vcpu) = guest(
            &ram,
            VmRole::L1,
            &[0xb9, 0x77, 0x02, 0, 0, 0x0f, 0x32, 0xf4],
        );
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
        // The L2 VM with the deny-all filter: the same read exits.
        let (vm2, mut v2) = guest(
            &ram,
            VmRole::L2,
            &[0xb9, 0x77, 0x02, 0, 0, 0x0f, 0x32, 0xf4],
        );
        vm2.filter_all_msrs().unwrap();
        assert_eq!(v2.run().unwrap(), VmExit::RdMsr { index: 0x277 });
        v2.complete_rdmsr(Some(7));
        assert_eq!(v2.run().unwrap(), VmExit::Hlt);
        assert_eq!(v2.get_state().unwrap().gprs.regs[0], 7);
    }

    #[test]
    fn test_kvm_injected_exception_reaches_the_guest() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // Guest: hlt at CODE; its #GP handler (IDT vector 13) at CODE+0x10
        // does `out 0xe9, al` then hlt.
        let mut code = vec![0xf4; 0x20];
        code[0x10..0x14].copy_from_slice(&[0xb0, 0x0d, 0xe6, 0xe9]);
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &code);
        // 64-bit interrupt gate for vector 13 in an IDT at 0x1_0000.
        let idt = 0x1_0000u64;
        let h = CODE + 0x10;
        let lo = (h & 0xffff)
            | (u64::from(crate::loader::SEL_CODE64) << 16)
            | (0x8e << 40)
            | ((h >> 16) & 0xffff) << 48;
        let mut m = RamView(&ram);
        m.write_u64(idt + 13 * 16, lo).unwrap();
        m.write_u64(idt + 13 * 16 + 8, h >> 32).unwrap();
        let mut s = vcpu.get_state().unwrap();
        s.idtr = DescriptorTable {
            base: idt,
            limit: 0xfff,
        };
        vcpu.set_state(&s).unwrap();
        vcpu.inject_exception(13, Some(0)).unwrap();
        assert_eq!(
            vcpu.run().unwrap(),
            VmExit::IoOut {
                port: 0xe9,
                size: 1,
                data: 13
            }
        );
    }

    #[test]
    fn test_kvm_string_io_is_delivered_element_by_element() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // mov esi, 0x200100; mov ecx, 3; mov dx, 0xe9; rep outsb;
        // mov edi, 0x200200; mov ecx, 2; rep insb; hlt
        let mut code = vec![
            0xbe, 0x00, 0x01, 0x20, 0x00, 0xb9, 0x03, 0x00, 0x00, 0x00, 0x66, 0xba, 0xe9, 0x00,
            0xf3, 0x6e, 0xbf, 0x00, 0x02, 0x20, 0x00, 0xb9, 0x02, 0x00, 0x00, 0x00, 0xf3, 0x6c,
            0xf4,
        ];
        code.resize(0x100, 0);
        code.extend_from_slice(b"abc");
        code.resize(0x210, 0);
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &code);
        let mut out = Vec::new();
        let mut ins = 0u8;
        loop {
            match vcpu.run().unwrap() {
                VmExit::IoOut {
                    port: 0xe9,
                    size: 1,
                    data,
                } => out.push(data as u8),
                VmExit::IoIn {
                    port: 0xe9,
                    size: 1,
                } => {
                    ins += 1;
                    vcpu.complete_io_in(u32::from(0x10 * ins));
                }
                VmExit::Hlt => break,
                e => panic!("unexpected exit {e:?}"),
            }
        }
        assert_eq!(out, b"abc");
        assert_eq!(ins, 2);
        let mut b = [0u8; 2];
        ram.read_bytes(0x20_0200, &mut b).unwrap();
        assert_eq!(b, [0x10, 0x20]);
    }

    #[test]
    fn test_merge_msrs_keeps_untouched_fields_from_kvm() {
        let given = VmxMsrs {
            pat: 1,
            sysenter_cs: 2,
            ..Default::default()
        };
        let want = VmxMsrs {
            sysenter_cs: 9,
            ..given
        };
        let real = VmxMsrs {
            pat: 5,
            sysenter_cs: 6,
            kernel_gs_base: 7,
            ..Default::default()
        };
        let m = merge_msrs(&given, &want, &real);
        assert_eq!((m.pat, m.sysenter_cs, m.kernel_gs_base), (5, 9, 7));
    }

    #[test]
    fn test_kvm_lazy_msr_policy_never_writes_stale_values() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // mov ecx, 0x174 (SYSENTER_CS); mov eax, 0x33; xor edx, edx; wrmsr; hlt
        let code = [
            0xb9, 0x74, 0x01, 0, 0, 0xb8, 0x33, 0, 0, 0, 0x31, 0xd2, 0x0f, 0x30, 0xf4,
        ];
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &code);
        vcpu.set_sync_policy(SyncPolicy {
            msrs: false,
            debugregs: false,
        });
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
        let mut s = vcpu.get_state().unwrap();
        assert_ne!(
            s.msrs.sysenter_cs, 0x33,
            "lazy: the guest's WRMSR is not seen"
        );
        s.msrs.sysenter_eip = 0x1234;
        vcpu.set_state(&s).unwrap();
        vcpu.set_sync_policy(SyncPolicy::default());
        let exact = vcpu.get_state().unwrap();
        assert_eq!(exact.msrs.sysenter_cs, 0x33, "the guest's value survives");
        assert_eq!(exact.msrs.sysenter_eip, 0x1234);
    }

    proptest::proptest! {
        #[test]
        fn test_segment_round_trip_matches_reference(
            sel: u16, base: u64, limit: u32, ar in 0u32..0x2_0000
        ) {
            // Reference: the VMCS AR bits KVM's segment can hold (type, S,
            // DPL, P, AVL, L, D/B, G, unusable); bits 11:8 are reserved.
            let s = Segment { selector: sel, base, limit, ar };
            let back = segment_from_kvm(&segment_to_kvm(&s));
            proptest::prop_assert_eq!(back, Segment { ar: ar & 0x1_f0ff, ..s });
        }
    }

    #[test]
    fn test_kvm_memslots_can_be_replaced() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let mut vm = KvmVm::new_l2(ram.clone()).unwrap();
        assert!(matches!(
            vm.set_memslot(MemSlot {
                slot: 1,
                gpa: 0x4000_0000,
                ram_offset: 32 << 20,
                size: 0x1000,
                read_only: false
            }),
            Err(KvmError::BadMemslot { .. })
        ));
        vm.remove_memslot(0).unwrap();
        vm.set_memslot(MemSlot {
            slot: 1,
            gpa: 0x4000_0000,
            ram_offset: 0x20_0000,
            size: 0x20_0000,
            read_only: false,
        })
        .unwrap();
        assert_eq!(vm.memslots().count(), 1);
    }

    /// The LAPIC probe guest (64-bit, at CODE; `/tmp` assembly in the
    /// comments): IDT at 0x30_0000 with vector 0x40 -> `handler`, which
    /// counts at 0x30_1000 and writes EOI. It enables the APIC (SVR 0x1ff),
    /// arms a one-shot timer (divide 1, vector 0x40, count 100000), `sti;
    /// hlt`, prints the count (byte), the version register, the ICR after
    /// an INIT and after a SIPI to all-but-self (dwords) on port 0xe9,
    /// then `cli; hlt`; after that `mov al, 0x55; out 0xe9, al; hlt`.
    const LAPIC_PROBE: [u8; 146] = [
        0x0f, 0x01, 0x1d, 0x81, 0x00, 0x00, 0x00, 0xbb, 0x00, 0x00, 0xe0, 0xfe, 0xc7, 0x83, 0xf0,
        0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00, 0xc7, 0x83, 0xe0, 0x03, 0x00, 0x00, 0x0b, 0x00,
        0x00, 0x00, 0xc7, 0x83, 0x20, 0x03, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0xc7, 0x83, 0x80,
        0x03, 0x00, 0x00, 0xa0, 0x86, 0x01, 0x00, 0xfb, 0xf4, 0x8b, 0x04, 0x25, 0x00, 0x10, 0x30,
        0x00, 0xe6, 0xe9, 0x8b, 0x43, 0x30, 0xe7, 0xe9, 0xc7, 0x83, 0x00, 0x03, 0x00, 0x00, 0x00,
        0x45, 0x0c, 0x00, 0x8b, 0x83, 0x00, 0x03, 0x00, 0x00, 0xe7, 0xe9, 0xc7, 0x83, 0x00, 0x03,
        0x00, 0x00, 0x10, 0x46, 0x0c, 0x00, 0x8b, 0x83, 0x00, 0x03, 0x00, 0x00, 0xe7, 0xe9, 0xfa,
        0xf4, 0xb0, 0x55, 0xe6, 0xe9, 0xf4, 0xff, 0x04, 0x25, 0x00, 0x10, 0x30, 0x00, 0xc7, 0x83,
        0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xcf, 0x66, 0x0f, 0x1f, 0x44, 0x00,
        0x00, 0xff, 0x0f, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    const LAPIC_PROBE_HANDLER: u64 = 0x6f;

    /// Maps [3 GiB, 4 GiB) with 2 MiB pages (PCD) in the loader's identity
    /// map (PD at 0x31_0000) and writes a 64-bit interrupt gate for
    /// `vector` -> `handler` into the IDT at 0x30_0000.
    fn map_apic_and_idt(ram: &GuestRam, vector: u64, handler: u64) {
        let mut view = RamView(ram);
        let ram = &mut view;
        let pd = 0x31_0000u64;
        ram.write_u64(crate::loader::PML4_ADDR + 0x1000 + 3 * 8, pd | 3)
            .unwrap();
        for i in 0..512u64 {
            ram.write_u64(pd + 8 * i, ((3 << 30) + (i << 21)) | 0x93)
                .unwrap();
        }
        let lo = (handler & 0xffff)
            | (u64::from(crate::loader::SEL_CODE64) << 16)
            | (0x8e << 40)
            | ((handler >> 16 & 0xffff) << 48);
        ram.write_u64(0x30_0000 + 16 * vector, lo).unwrap();
        ram.write_u64(0x30_0000 + 16 * vector + 8, handler >> 32)
            .unwrap();
    }

    /// Runs until HLT; returns the port-0xe9 OUTs (size, value).
    fn run_to_hlt(vcpu: &mut KvmVcpu) -> Vec<(u8, u32)> {
        let mut outs = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VmExit::Hlt => return outs,
                VmExit::IoOut {
                    port: 0xe9,
                    size,
                    data,
                } => outs.push((size, data)),
                VmExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    fn lapic_probe(chip: IrqChip) {
        let ram = ram();
        let k = load_kernel(&ram, &elf64(CODE, &LAPIC_PROBE, 0), "").unwrap();
        map_apic_and_idt(&ram, 0x40, CODE + LAPIC_PROBE_HANDLER);
        let vm = KvmVm::new_l1_with(ram.clone(), &VmxCapabilities::default(), chip).unwrap();
        assert_eq!(vm.irqchip(), chip);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let base = vcpu.get_state().unwrap();
        vcpu.set_state(&k.entry_state(&base)).unwrap();
        let t = std::time::Instant::now();
        let outs = run_to_hlt(&mut vcpu);
        eprintln!("{chip:?}: {outs:x?} in {:?}", t.elapsed());
        assert_eq!(outs.first(), Some(&(1, 1)), "one timer interrupt");
        let version = outs.get(1).map(|o| o.1).unwrap_or(0);
        assert_eq!(version & 0xff, 0x14, "APIC version 0x14: {version:#x}");
        assert_eq!(
            outs.get(2),
            Some(&(4, 0xc4500)),
            "ICR after INIT to all-but-self: delivery status idle"
        );
        assert_eq!(outs.get(3), Some(&(4, 0xc4610)), "ICR after SIPI");
        assert_eq!(outs.len(), 4);
        // `cli; hlt` was reported as a HLT; the guest continues after it.
        assert_eq!(run_to_hlt(&mut vcpu), vec![(1, 0x55)]);
    }

    #[test]
    fn test_kvm_split_irqchip_lapic_timer_interrupts_and_halts() {
        if !kvm_or_skip() {
            return;
        }
        lapic_probe(IrqChip::Split);
    }

    #[test]
    fn test_kvm_in_kernel_irqchip_lapic_timer_interrupts_and_halts() {
        if !kvm_or_skip() {
            return;
        }
        lapic_probe(IrqChip::InKernel);
    }

    #[test]
    fn test_kvm_l1_vm_has_the_chosen_irqchip() {
        if !kvm_or_skip() {
            return;
        }
        let vm = KvmVm::new_l1(ram(), &VmxCapabilities::default()).unwrap();
        assert_eq!(vm.irqchip(), L1_IRQCHIP);
        assert_eq!(KvmVm::new_l2(ram()).unwrap().irqchip(), IrqChip::None);
    }

    /// `sti; nop; nop; jmp $` with `request_interrupt_window`: which
    /// irqchips give KVM_EXIT_IRQ_WINDOW_OPEN.
    fn window_probe(chip: IrqChip) -> bool {
        let ram = ram();
        let (_vm, mut vcpu) = {
            let k =
                load_kernel(&ram, &elf64(CODE, &[0xfb, 0x90, 0x90, 0xeb, 0xfe], 0), "").unwrap();
            let vm = KvmVm::new_l1_with(ram.clone(), &VmxCapabilities::default(), chip).unwrap();
            let mut v = vm.create_vcpu(0).unwrap();
            let base = v.get_state().unwrap();
            v.set_state(&k.entry_state(&base)).unwrap();
            (vm, v)
        };
        vcpu.fd.get_kvm_run().request_interrupt_window = 1;
        // The halt watcher does not kick a busy guest out for good: stop
        // the probe with immediate_exit from a timer thread instead.
        let deadline = std::time::Instant::now() + Duration::from_millis(300);
        let mut opened = false;
        if chip.lapic_in_kernel() {
            // The watcher re-enters KVM_RUN for a busy guest; bound the
            // probe by polling with immediate exits.
            let (tx, rx) = mpsc::channel::<()>();
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() } as u64;
            let h = std::thread::spawn(move || {
                while rx.recv_timeout(Duration::from_millis(50)).is_err() {
                    // SAFETY: the test thread joins this thread before it
                    // returns; the signal has a no-op handler.
                    unsafe { libc::pthread_kill(me as libc::pthread_t, halt_kick_signal()) };
                }
            });
            while std::time::Instant::now() < deadline {
                match vcpu.run().unwrap() {
                    VmExit::IrqWindowOpen => {
                        opened = true;
                        break;
                    }
                    VmExit::Interrupted => {}
                    other => panic!("unexpected exit {other:?}"),
                }
            }
            let _ = tx.send(());
            let _ = h.join();
        } else {
            opened = vcpu.run().unwrap() == VmExit::IrqWindowOpen;
        }
        opened
    }

    #[test]
    fn test_kvm_interrupt_window_exit_needs_a_userspace_pic() {
        if !kvm_or_skip() {
            return;
        }
        assert!(
            window_probe(IrqChip::Split),
            "split irqchip: window exits work"
        );
        assert!(
            !window_probe(IrqChip::InKernel),
            "in-kernel PIC ignores request_interrupt_window"
        );
    }

    /// `cpuid(1)` ECX; set IA32_APIC_BASE.EXTD|EN; x2APIC version (0x803)
    /// and ID (0x802); ICR (0x830) INIT to all-but-self, read back; each
    /// printed as a dword on port 0xe9; hlt.
    const X2APIC_PROBE: [u8; 62] = [
        0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x89, 0xc8, 0xe7, 0xe9, 0xb9, 0x1b, 0x00, 0x00,
        0x00, 0x0f, 0x32, 0x0d, 0x00, 0x0c, 0x00, 0x00, 0x0f, 0x30, 0xb9, 0x03, 0x08, 0x00, 0x00,
        0x0f, 0x32, 0xe7, 0xe9, 0xb9, 0x02, 0x08, 0x00, 0x00, 0x0f, 0x32, 0xe7, 0xe9, 0xb9, 0x30,
        0x08, 0x00, 0x00, 0xb8, 0x00, 0x45, 0x0c, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0x0f, 0x32, 0xe7,
        0xe9, 0xf4,
    ];

    #[test]
    fn test_kvm_x2apic_msrs_answer() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let (_vm, mut vcpu) = guest(&ram, VmRole::L1, &X2APIC_PROBE);
        let outs = run_to_hlt(&mut vcpu);
        eprintln!("x2apic probe: {outs:x?}");
        let ecx = outs.first().map_or(0, |o| o.1);
        assert_eq!(
            ecx & CPUID_1_ECX_X2APIC != 0,
            X2APIC_WORKS,
            "CPUID advertises x2APIC iff it works"
        );
        assert_eq!(outs.get(1).map(|o| o.1 & 0xff), Some(0x14), "version");
        assert_eq!(outs.get(2).map(|o| o.1), Some(0), "x2APIC ID of vCPU 0");
        assert_eq!(outs.get(3).map(|o| o.1), Some(0xc4500), "ICR idle");
    }

    /// A vCPU of a VM with `chip` at `code` (64-bit mode).
    fn guest_with(ram: &Arc<GuestRam>, chip: IrqChip, code: &[u8]) -> (KvmVm, KvmVcpu) {
        let k = load_kernel(ram, &elf64(CODE, code, 0), "").unwrap();
        let vm = KvmVm::new_l1_with(ram.clone(), &VmxCapabilities::default(), chip).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let base = vcpu.get_state().unwrap();
        vcpu.set_state(&k.entry_state(&base)).unwrap();
        (vm, vcpu)
    }

    /// `inc rax; jmp` back to it: busy forever, and RAX shows progress.
    const BUSY_LOOP: [u8; 5] = [0x48, 0xff, 0xc0, 0xeb, 0xfb];
    /// `vmcall; out 0x80, al; hlt`.
    const VMCALL_THEN_OUT: [u8; 6] = [0x0f, 0x01, 0xc1, 0xe6, 0x80, 0xf4];
    /// A bound on a kick's lateness that a loaded 2-core machine keeps.
    const KICK_SLACK: Duration = Duration::from_millis(500);

    /// Runs a busy guest with a kick of `after` `n` times: each run returns
    /// Kicked no earlier than `after` and within [`KICK_SLACK`], and the
    /// guest goes on between kicks (on a loaded host a vCPU may get no CPU
    /// time within one short deadline, so progress is checked over all
    /// kicks). Returns the lateness of each kick.
    fn kick_busy_guest(vcpu: &mut KvmVcpu, after: Duration, n: usize) -> Vec<Duration> {
        vcpu.set_kick_after(Some(after)).unwrap();
        let mut late = Vec::new();
        let start_rax = vcpu.get_state().unwrap().gprs.get(0);
        let mut last_rax = start_rax;
        for _ in 0..n {
            let t = Instant::now();
            let exit = vcpu.run().unwrap();
            let took = t.elapsed();
            assert_eq!(exit, VmExit::Kicked);
            assert!(took >= after, "kicked after {took:?}, before {after:?}");
            assert!(took < after + KICK_SLACK, "kicked only after {took:?}");
            let s = vcpu.get_state().unwrap();
            assert!(s.gprs.get(0) >= last_rax, "the guest state is kept");
            assert!((CODE..CODE + 5).contains(&s.rip), "rip {:#x}", s.rip);
            last_rax = s.gprs.get(0);
            late.push(took - after);
        }
        assert!(last_rax > start_rax, "the guest ran between the kicks");
        late
    }

    fn print_lateness(what: &str, mut late: Vec<Duration>) {
        late.sort();
        let pick = |q: usize| late.get(late.len() * q / 100).copied().unwrap_or_default();
        eprintln!(
            "kick lateness ({what}, {} kicks): median {:?}, p90 {:?}, max {:?}",
            late.len(),
            pick(50),
            pick(90),
            late.last().copied().unwrap_or_default()
        );
    }

    #[test]
    fn test_kvm_kick_after_ends_a_busy_run_and_the_guest_continues() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let (_vm, mut vcpu) = guest(&ram, VmRole::L2, &BUSY_LOOP);
        let late = kick_busy_guest(&mut vcpu, Duration::from_millis(2), 50);
        print_lateness("no irqchip, 2 ms", late);
    }

    #[test]
    fn test_kvm_kick_after_works_with_the_halt_watch_of_an_in_kernel_lapic() {
        if !kvm_or_skip() {
            return;
        }
        for chip in [IrqChip::InKernel, IrqChip::Split] {
            let ram = ram();
            let (_vm, mut vcpu) = guest_with(&ram, chip, &BUSY_LOOP);
            // Shorter and longer than HALT_CHECK_PERIOD: the halt check
            // re-enters KVM_RUN for a busy guest without resetting the
            // deadline of the run() call.
            let late = kick_busy_guest(&mut vcpu, Duration::from_millis(2), 20);
            print_lateness(&format!("{chip:?}, 2 ms"), late);
            let late = kick_busy_guest(&mut vcpu, HALT_CHECK_PERIOD * 3, 3);
            print_lateness(&format!("{chip:?}, 30 ms"), late);
        }
    }

    #[test]
    fn test_kvm_vmcall_hangs_until_kicked_with_rip_at_the_vmcall() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let (_vm, mut vcpu) = guest(&ram, VmRole::L2, &VMCALL_THEN_OUT);
        vcpu.set_kick_after(Some(Duration::from_millis(2))).unwrap();
        let t = Instant::now();
        assert_eq!(vcpu.run().unwrap(), VmExit::Kicked);
        eprintln!("VMCALL kicked after {:?}", t.elapsed());
        let mut s = vcpu.get_state().unwrap();
        assert_eq!(s.rip, CODE, "RIP stays on the VMCALL");
        // Still stuck on it when run again, every time: no kick is lost
        // (a signal landing just before KVM_RUN is repeated).
        vcpu.set_kick_after(Some(Duration::from_micros(300)))
            .unwrap();
        let mut worst = Duration::ZERO;
        for _ in 0..300 {
            let t = Instant::now();
            assert_eq!(vcpu.run().unwrap(), VmExit::Kicked);
            worst = worst.max(t.elapsed());
            assert_eq!(vcpu.get_state().unwrap().rip, CODE);
        }
        eprintln!("300 VMCALL kicks of 300 us: longest run() {worst:?}");
        assert!(worst < KICK_SLACK, "{worst:?}");
        // Past it, the guest continues normally.
        s.rip = CODE + 3;
        vcpu.set_state(&s).unwrap();
        assert!(matches!(
            vcpu.run().unwrap(),
            VmExit::IoOut { port: 0x80, .. }
        ));
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
    }

    #[test]
    fn test_kvm_kick_off_leaves_exits_and_other_signals_alone() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        let (_vm, mut vcpu) = guest(&ram, VmRole::L2, &[0xe6, 0x80, 0xeb, 0xfe]);
        // A kick far away does not disturb a run that exits by itself.
        vcpu.set_kick_after(Some(Duration::from_secs(5))).unwrap();
        assert!(matches!(
            vcpu.run().unwrap(),
            VmExit::IoOut { port: 0x80, .. }
        ));
        // Kick off: a `jmp $` stays in KVM_RUN until someone else's signal,
        // which is Interrupted, not Kicked.
        vcpu.set_kick_after(None).unwrap();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: the test thread joins this thread before it returns;
            // the signal has a no-op handler (installed by the watcher).
            unsafe { libc::pthread_kill(me as libc::pthread_t, halt_kick_signal()) };
        });
        let t = Instant::now();
        let exit = vcpu.run().unwrap();
        h.join().unwrap();
        assert_eq!(exit, VmExit::Interrupted);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn test_kvm_idle_halt_is_reported_as_hlt_even_with_a_kick() {
        if !kvm_or_skip() {
            return;
        }
        let ram = ram();
        // `cli; hlt; out 0x80, al`: halted with nothing to wake it.
        let (_vm, mut vcpu) = guest_with(&ram, IrqChip::InKernel, &[0xfa, 0xf4, 0xe6, 0x80]);
        vcpu.set_kick_after(Some(Duration::from_millis(2))).unwrap();
        assert_eq!(vcpu.run().unwrap(), VmExit::Hlt);
        assert_eq!(vcpu.get_state().unwrap().rip, CODE + 2);
        assert!(matches!(
            vcpu.run().unwrap(),
            VmExit::IoOut { port: 0x80, .. }
        ));
    }
}
