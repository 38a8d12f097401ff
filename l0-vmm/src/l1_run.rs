//! The L1 run loop.
//!
//! Runs L1's vCPU and handles each exit: port I/O goes to the devices,
//! RDMSR/WRMSR of the VMX MSRs to [`VmxMsrHandler`], VMX instructions
//! (KVM emulation failures) to the nesting code ([`Nested::handle_vmx_exit`],
//! which also runs L2 until an exit is reflected to L1). HLT, a triple fault,
//! the debug-exit port, a `--timeout` or any error end the run with a
//! message; nothing the guest does panics L0. At the end a summary table
//! gives the exits by reason and handler, the trapped VMX instructions,
//! the vCPU ioctl counts and the wall time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use nested_exit::{Segment, VcpuState};
use serde::Serialize;

use crate::devices::{Devices, IoOutcome, Level, MsrAccess};
use crate::hv::{IoctlCounters, Vcpu, VmExit};
use crate::l1_image::abi;
use crate::l1_intercept::{
    decode_mov_to_cr4, mov_to_cr4, read_frame, unwind, Cr4Context, Cr4Verdict, Hit, L1Intercepts,
    CR4_VMXE,
};
use crate::memory::{GuestRam, RamView};
use crate::msr::VmxMsrHandler;
use crate::nested::{
    FlushPending, HostAction, L2Host, Nested, VmcallWatchdogStats, VmxExitOutcome,
};
use crate::vmx_emul::{
    access_linear, fetch_insn_bytes, vmx_instruction_at, Access, VmxInstruction,
};

/// Process exit code when L1 halted with nothing to wake it.
pub const EXIT_HALTED: i32 = 0;
/// Process exit code for a triple fault.
pub const EXIT_TRIPLE_FAULT: i32 = 2;
/// Process exit code for an L0 error (EX_SOFTWARE).
pub const EXIT_ERROR: i32 = 70;
/// Process exit code for `--timeout` (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;
/// `l0-vmm demo` exit code when L1 ended without writing a status to the
/// debug-exit port (it halted).
pub const EXIT_DEMO_NO_STATUS: i32 = 1;

/// The #UD exception vector.
const UD_VECTOR: u8 = 6;

/// Number of VMX instruction kinds ([`VmxInstruction::ALL`]).
const VMX_KINDS: usize = VmxInstruction::ALL.len();

/// How L1's VMX instructions reach L0 (both paths are supported; docs/platform.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
pub enum VmxTrapPath {
    /// This host's native path: KVM cannot emulate the instruction and
    /// exits with an emulation failure, RIP at it; L0 emulates it there.
    #[default]
    #[value(name = "emulation")]
    EmulationFailure,
    /// The path of a host whose KVM raises #UD for VMX instructions in the
    /// guest: L0 turns the emulation failure at a VMX instruction into a
    /// #UD injected into L1; L1's #UD handler writes its trap frame's
    /// address to port 0x0e0e, and L0 emulates from the frame.
    #[value(name = "ud")]
    InvalidOpcode,
}

/// How the end of a run maps to the process exit code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum ExitConvention {
    /// QEMU's isa-debug-exit: [`RunEnd::exit_code`] ((V << 1) | 1 for a
    /// write of V to port 0xf4).
    #[default]
    Qemu,
    /// `l0-vmm demo`: [`RunEnd::demo_exit_code`] (0 iff L1 wrote its pass
    /// status 0 to port 0xf4).
    Demo,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RunEnd {
    /// The guest wrote V to port 0xf4: exit code (V << 1) | 1.
    DebugExit(i32),
    /// L1 executed HLT and nothing can wake it (no interrupt sources).
    Halted,
    /// L1 triple-faulted (KVM_EXIT_SHUTDOWN); the dump was printed.
    TripleFault,
    /// The timeout expired.
    Timeout(Duration),
    /// L0 could not continue; the message says why.
    Error(String),
}

impl RunEnd {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunEnd::DebugExit(c) => *c,
            RunEnd::Halted => EXIT_HALTED,
            RunEnd::TripleFault => EXIT_TRIPLE_FAULT,
            RunEnd::Timeout(_) => EXIT_TIMEOUT,
            RunEnd::Error(_) => EXIT_ERROR,
        }
    }

    /// The exit code of `l0-vmm demo`: 0 when the guest wrote
    /// `abi::EXIT_STATUS_PASS` (0) to port 0xf4, non-zero for any other
    /// status ((V << 1) | 1) and any other end.
    pub fn demo_exit_code(&self) -> i32 {
        const PASS: i32 = ((abi::EXIT_STATUS_PASS as i32) << 1) | 1;
        match self {
            RunEnd::DebugExit(PASS) => 0,
            RunEnd::Halted => EXIT_DEMO_NO_STATUS,
            other => other.exit_code(),
        }
    }

    /// The exit code under `convention`.
    pub fn exit_code_for(&self, convention: ExitConvention) -> i32 {
        match convention {
            ExitConvention::Qemu => self.exit_code(),
            ExitConvention::Demo => self.demo_exit_code(),
        }
    }

    /// One line describing the end.
    pub fn describe(&self) -> String {
        match self {
            RunEnd::DebugExit(c) => format!(
                "debug exit: guest wrote {:#x} to port 0xf4",
                (*c as u32) >> 1
            ),
            RunEnd::Halted => "L1 halted with nothing to wake it (no interrupt sources)".into(),
            RunEnd::TripleFault => "L1 triple fault (KVM_EXIT_SHUTDOWN)".into(),
            RunEnd::Timeout(d) => format!("timeout after {:.3} s", d.as_secs_f64()),
            RunEnd::Error(m) => format!("error: {m}"),
        }
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunStats {
    /// L1 exits by kind (all handled by L0).
    pub l1_exits: BTreeMap<&'static str, u64>,
    /// L2 exits: (basic reason, name, handled by L0, reflected to L1).
    pub l2_exits: Vec<(u16, String, u64, u64)>,
    /// Trapped VMX instructions by mnemonic.
    pub vmx_instructions: Vec<(String, u64)>,
    /// Trapped VMX instructions by mnemonic and by the path they reached
    /// L0 on (every instruction counted once, on the path L0 emulated it).
    pub vmx_by_path: Vec<VmxPathRow>,
    /// L1 vCPU ioctls.
    pub l1_ioctls: IoctlCounters,
    /// L2 vCPU ioctls (when L2 ran on a vCPU whose counters L0 can read).
    pub l2_ioctls: Option<IoctlCounters>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Accesses to ports no device claims.
    pub unhandled_ports: BTreeMap<u16, u64>,
    /// L2 VMCALLs the VMCALL watchdog turned into exit 18, with timing.
    pub vmcall_watchdog: VmcallWatchdogStats,
    /// Exception intercepts, precise mode and event counters
    /// (`Nested::hidden_exit_rows`).
    pub hidden_exits: Vec<(String, u64)>,
}

/// One VMX instruction kind, by trap path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmxPathRow {
    /// Mnemonic (`vmxon`, ...).
    pub name: String,
    /// Emulated at a KVM emulation-failure exit of L1.
    pub emulation_failure: u64,
    /// Emulated from a trap frame L1's #UD handler sent to port 0x0e0e.
    pub trap_port: u64,
    /// Emulated at L1's #UD handler, caught by L0's breakpoint there
    /// (`l1_intercept.rs`; L1 without the trap port).
    #[serde(default)]
    pub ud_breakpoint: u64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// How it ended.
    pub end: RunEnd,
    /// Counters.
    pub stats: RunStats,
    /// The process exit code (`end` under the run's [`ExitConvention`]).
    pub exit_code: i32,
}

/// Run options.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// End the run after this long.
    pub timeout: Option<Duration>,
    /// Reads the L2 vCPU's ioctl counters for the summary.
    pub l2_counters: Option<crate::kvm::CounterHandle>,
    /// The path L1's VMX instructions take to L0.
    pub vmx_trap: VmxTrapPath,
    /// How the end maps to the exit code.
    pub exit_convention: ExitConvention,
}

/// Source of MSR values for L2 accesses L1 does not intercept (the L2 VM
/// sends every MSR access to L0).
pub trait MsrBackend {
    /// RDMSR: the value, or `None` for #GP.
    fn rdmsr(&mut self, index: u32) -> Option<u64>;
    /// WRMSR: `false` for #GP.
    fn wrmsr(&mut self, index: u32, value: u64) -> bool;
}

/// KVM's own MSR emulation, through a vCPU of a VM without an MSR filter.
impl MsrBackend for crate::kvm::KvmVcpu {
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        self.get_msr(index).ok().flatten()
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        self.set_msr(index, value).unwrap_or(false)
    }
}

/// L1's platform as L0 presents it: devices, the VMX MSRs, and an MSR
/// backend for the rest. Implements the nesting code's [`L2Host`].
pub struct Platform<'a> {
    /// Devices and console.
    pub devices: &'a mut Devices,
    /// The VMX capability MSRs.
    pub vmx_msrs: &'a VmxMsrHandler,
    /// Other MSRs (None: they raise #GP).
    pub msrs: Option<&'a mut dyn MsrBackend>,
}

impl std::fmt::Debug for Platform<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl L2Host for Platform<'_> {
    fn l2_io_out(&mut self, port: u16, size: u8, data: u32) -> HostAction {
        match self.devices.io_out(Level::L2, port, size, data) {
            IoOutcome::Handled => HostAction::Continue,
            IoOutcome::Exit(c) => HostAction::Stop(c),
        }
    }

    fn l2_io_in(&mut self, port: u16, size: u8) -> u32 {
        self.devices.io_in(Level::L2, port, size)
    }

    fn l2_rdmsr(&mut self, index: u32) -> Option<u64> {
        // L2's CPUID has no VMX: its VMX MSRs do not exist (#GP).
        if crate::msr::is_vmx_msr(index) && index != crate::msr::IA32_FEATURE_CONTROL {
            return None;
        }
        self.msrs.as_mut().and_then(|m| m.rdmsr(index))
    }

    fn l2_wrmsr(&mut self, index: u32, value: u64) -> bool {
        if crate::msr::is_vmx_msr(index) {
            return false;
        }
        self.msrs.as_mut().is_some_and(|m| m.wrmsr(index, value))
    }
}

/// Signal used to kick a vCPU out of KVM_RUN when the timeout expires.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Kicks the run loop's thread with a signal once the timeout expires
/// (KVM_RUN then returns EINTR), and again every 20 ms until stopped, so a
/// signal that lands just before KVM_RUN is not lost.
struct Watchdog {
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(timeout: Duration) -> Option<Self> {
        static INIT: Once = Once::new();
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        INIT.call_once(|| {
            match vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
                Ok(()) => INSTALLED.store(true, Ordering::SeqCst),
                Err(e) => tracing::warn!("cannot install the timeout signal handler: {e}"),
            }
        });
        if !INSTALLED.load(Ordering::SeqCst) {
            // Without the handler the signal would kill the process: rely on
            // the deadline checks between exits only.
            return None;
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let fired = Arc::new(AtomicBool::new(false));
        let (stop, rx) = mpsc::channel::<()>();
        let f = fired.clone();
        let thread = std::thread::spawn(move || {
            let mut wait = timeout;
            loop {
                match rx.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {
                        f.store(true, Ordering::SeqCst);
                        // SAFETY: `target` is the run-loop thread, which
                        // stops and joins this thread before it returns, so
                        // it is alive; the signal has a no-op handler.
                        unsafe { libc::pthread_kill(target, kick_signal()) };
                        wait = Duration::from_millis(20);
                    }
                    _ => return,
                }
            }
        });
        Some(Self {
            stop,
            thread: Some(thread),
            fired,
        })
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A register dump of `s`, several lines.
pub fn register_dump(s: &VcpuState) -> String {
    let g = &s.gprs.regs;
    let seg = |n: &str, x: &Segment| {
        format!(
            "{n}={:04x} base={:#x} limit={:#x} ar={:#x}",
            x.selector, x.base, x.limit, x.ar
        )
    };
    [
        format!(
            "rip={:#018x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.rip, s.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.msrs.efer
        ),
        format!(
            "rax={:#x} rcx={:#x} rdx={:#x} rbx={:#x} rsp={:#x} rbp={:#x} rsi={:#x} rdi={:#x}",
            g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
        ),
        format!(
            "r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
        ),
        seg("cs", &s.cs),
        seg("ss", &s.ss),
        seg("ds", &s.ds),
        seg("tr", &s.tr),
        format!(
            "gdtr={:#x}/{:#x} idtr={:#x}/{:#x} interruptibility={:#x} pending_event={:?}",
            s.gdtr.base,
            s.gdtr.limit,
            s.idtr.base,
            s.idtr.limit,
            s.interruptibility,
            s.pending_event
        ),
    ]
    .join("\n")
}

/// Lines of the end-of-run summary.
pub fn summary_lines(report: &RunReport) -> Vec<String> {
    let s = &report.stats;
    let mut out = vec![
        "---- run summary ----".to_string(),
        format!("end: {}", report.end.describe()),
        format!("exit code: {}", report.exit_code),
        format!("wall time: {:.3} s", s.wall.as_secs_f64()),
        format!(
            "L1 vCPU ioctls: KVM_RUN {}, other {}",
            s.l1_ioctls.kvm_run, s.l1_ioctls.other
        ),
        match s.l2_ioctls {
            Some(c) => format!("L2 vCPU ioctls: KVM_RUN {}, other {}", c.kvm_run, c.other),
            None => "L2 vCPU ioctls: not measured".to_string(),
        },
        format!("{:<24} {:>10}", "L1 exit (handled by L0)", "count"),
    ];
    for (k, n) in &s.l1_exits {
        out.push(format!("{k:<24} {n:>10}"));
    }
    if !s.l2_exits.is_empty() {
        out.push(format!(
            "{:<6} {:<28} {:>8} {:>8}",
            "reason", "L2 exit", "by L0", "by L1"
        ));
        for (r, name, l0, l1) in &s.l2_exits {
            out.push(format!("{r:<6} {name:<28} {l0:>8} {l1:>8}"));
        }
    }
    if !s.vmx_instructions.is_empty() {
        let (ef, tp) = s.vmx_by_path.iter().fold((0, 0), |(a, b), r| {
            (a + r.emulation_failure, b + r.trap_port)
        });
        let bp: u64 = s.vmx_by_path.iter().map(|r| r.ud_breakpoint).sum();
        let bp = if bp > 0 {
            format!(", #UD breakpoint {bp}")
        } else {
            String::new()
        };
        out.push(format!(
            "VMX instructions by path: emulation-failure exit {ef}, #UD trap port {tp}{bp}"
        ));
        out.push(format!(
            "{:<16} {:>8} {:>18} {:>18}",
            "VMX instruction", "trapped", "emulation-failure", "#UD trap port"
        ));
        for (k, n) in &s.vmx_instructions {
            let (ef, tp) = s
                .vmx_by_path
                .iter()
                .find(|r| r.name == *k)
                .map_or((0, 0), |r| (r.emulation_failure, r.trap_port));
            out.push(format!("{k:<16} {n:>8} {ef:>18} {tp:>18}"));
        }
    }
    for (p, n) in &s.unhandled_ports {
        out.push(format!("unclaimed port {p:#x}: {n} accesses"));
    }
    out.extend(vmcall_watchdog_line(&s.vmcall_watchdog));
    for (what, n) in &s.hidden_exits {
        out.push(format!("{what:<44} {n:>8}"));
    }
    out
}

fn bump(m: &mut BTreeMap<&'static str, u64>, k: &'static str) {
    *m.entry(k).or_insert(0) += 1;
}

/// When a run must end: the watchdog fired or the timeout passed.
struct Deadline {
    watchdog: Option<Watchdog>,
    timeout: Option<Duration>,
    start: Instant,
}

impl Deadline {
    fn expired(&self) -> bool {
        self.watchdog.as_ref().is_some_and(|w| w.fired())
            || self.timeout.is_some_and(|t| self.start.elapsed() >= t)
    }
}

/// VMX instructions emulated on each path, by [`VmxInstruction::index`].
#[derive(Debug, Default)]
struct PathCounts {
    emulation_failure: [u64; VMX_KINDS],
    trap_port: [u64; VMX_KINDS],
    ud_breakpoint: [u64; VMX_KINDS],
}

impl PathCounts {
    /// Adds what `n` counted since `before` to `path`.
    fn add<L2: FlushPending>(
        path: &mut [u64; VMX_KINDS],
        before: &[u64; VMX_KINDS],
        n: &Nested<L2>,
    ) {
        let after = &n.stats().vmx_instructions;
        for ((p, b), a) in path.iter_mut().zip(before).zip(after) {
            *p += a.saturating_sub(*b);
        }
    }

    fn rows(&self) -> Vec<VmxPathRow> {
        VmxInstruction::ALL
            .iter()
            .map(|k| VmxPathRow {
                name: k.name().to_string(),
                emulation_failure: self.emulation_failure[k.index()],
                trap_port: self.trap_port[k.index()],
                ud_breakpoint: self.ud_breakpoint[k.index()],
            })
            .filter(|r| r.emulation_failure + r.trap_port + r.ud_breakpoint > 0)
            .collect()
    }
}

/// Runs L1 until it ends; prints the end and the summary through the
/// devices' console and returns the report.
///
/// `nested` is the nesting state (None: VMX instructions end the run).
pub fn run_l1<V: Vcpu, L2: FlushPending>(
    l1: &mut V,
    mut nested: Option<&mut Nested<L2>>,
    ram: &GuestRam,
    platform: &mut Platform<'_>,
    cfg: &RunConfig,
) -> RunReport {
    let deadline = Deadline {
        watchdog: cfg.timeout.and_then(Watchdog::start),
        timeout: cfg.timeout,
        start: Instant::now(),
    };
    let mut stats = RunStats::default();
    let mut paths = PathCounts::default();
    let mut warned_trap_port = false;
    // RIP of a VMX instruction the emulation path answered with #UD: when
    // L1's #UD handler offers it on the trap port, it is genuine.
    let mut decided_ud: Option<u64> = None;
    // Breakpoints on L1's #GP/#UD handlers (l1_intercept.rs).
    let mut icpt = L1Intercepts::new(cfg.vmx_trap == VmxTrapPath::InvalidOpcode);
    let end = loop {
        if deadline.expired() {
            break RunEnd::Timeout(deadline.start.elapsed());
        }
        // Tracing: the L1 run span and timeline interval (docs/tracing.md).
        let span = nested.as_deref_mut().map(|n| n.l1_entering());
        let run = l1.run();
        if let Some(n) = nested.as_deref_mut() {
            n.l1_left(&run);
        }
        drop(span);
        let exit = match run {
            Ok(e) => e,
            Err(e) => break RunEnd::Error(format!("running L1 failed: {e}")),
        };
        if let Some(n) = nested.as_deref_mut() {
            let mut ctx = InterceptCtx {
                ram,
                platform: &mut *platform,
                deadline: &deadline,
                paths: &mut paths,
                decided_ud: &mut decided_ud,
                counts: &mut stats.l1_exits,
            };
            match l1_intercept_exit(&mut icpt, n, l1, &exit, &mut ctx) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(end) => break end,
            }
        }
        match exit {
            VmExit::IoOut { port, size, data } => {
                bump(&mut stats.l1_exits, "io-out");
                if port == abi::VMX_TRAP_PORT {
                    bump(&mut stats.l1_exits, "vmx-trap-port");
                    icpt.note_trap_port();
                    let Some(n) = nested.as_deref_mut() else {
                        if !warned_trap_port {
                            platform.devices.console.l0_line(&format!(
                                "L1 #UD trap frame at {data:#x} (port {port:#x}) but nesting is off: L1 sees a genuine #UD"
                            ));
                            warned_trap_port = true;
                        }
                        continue;
                    };
                    let before = n.stats().vmx_instructions;
                    let genuine = decided_ud.take();
                    let r = trap_exit(n, l1, u64::from(data), genuine, ram, platform, &deadline);
                    PathCounts::add(&mut paths.trap_port, &before, n);
                    if let Err(end) = r {
                        break end;
                    }
                    continue;
                }
                if let IoOutcome::Exit(code) = platform.devices.io_out(Level::L1, port, size, data)
                {
                    break RunEnd::DebugExit(code);
                }
            }
            VmExit::IoIn { port, size } => {
                bump(&mut stats.l1_exits, "io-in");
                let v = platform.devices.io_in(Level::L1, port, size);
                l1.complete_io_in(v);
            }
            VmExit::MmioRead { gpa, len } => {
                bump(&mut stats.l1_exits, "mmio-read");
                let v = platform.devices.mmio_read(Level::L1, gpa, len);
                l1.complete_mmio_read(&v);
            }
            VmExit::MmioWrite { gpa, data } => {
                bump(&mut stats.l1_exits, "mmio-write");
                platform.devices.mmio_write(Level::L1, gpa, &data);
            }
            VmExit::RdMsr { index } => {
                bump(&mut stats.l1_exits, "rdmsr");
                let v = platform.vmx_msrs.rdmsr(index);
                if v.is_none() {
                    platform
                        .devices
                        .note_unhandled_msr(Level::L1, index, MsrAccess::Read);
                }
                l1.complete_rdmsr(v);
            }
            VmExit::WrMsr { index, data } => {
                bump(&mut stats.l1_exits, "wrmsr");
                let ok = platform.vmx_msrs.wrmsr(index, data);
                // The VMX MSRs refuse writes by design (emulated #GP).
                if !ok && !crate::msr::is_vmx_msr(index) {
                    platform
                        .devices
                        .note_unhandled_msr(Level::L1, index, MsrAccess::Write);
                }
                l1.complete_wrmsr(ok);
            }
            VmExit::Hlt => {
                bump(&mut stats.l1_exits, "hlt");
                break RunEnd::Halted;
            }
            VmExit::Shutdown => {
                bump(&mut stats.l1_exits, "shutdown");
                let mut msg = String::from("L1 triple fault (KVM_EXIT_SHUTDOWN): register dump");
                match l1.get_state() {
                    Ok(s) => {
                        msg.push('\n');
                        msg.push_str(&register_dump(&s));
                    }
                    Err(e) => msg.push_str(&format!(" unavailable: {e}")),
                }
                if let Some(v) = nested.as_ref().and_then(|n| n.current_vmcs12()) {
                    msg.push_str("\ncurrent vmcs12 (non-zero fields):");
                    for (f, val) in v.non_zero() {
                        msg.push_str(&format!("\n  {:<40} {val:#x}", f.name()));
                    }
                }
                platform.devices.console.l0_line(&msg);
                break RunEnd::TripleFault;
            }
            VmExit::EmulationFailure { insn_bytes } => {
                bump(&mut stats.l1_exits, "emulation-failure");
                decided_ud = None;
                let Some(n) = nested.as_deref_mut() else {
                    break RunEnd::Error(format!(
                        "L1 executed an instruction KVM cannot run (bytes {insn_bytes:02x?}) and nesting is off"
                    ));
                };
                if cfg.vmx_trap == VmxTrapPath::InvalidOpcode {
                    match inject_ud_at_vmx(l1, &insn_bytes, ram) {
                        Ok(true) => {
                            bump(&mut stats.l1_exits, "vmx-ud-injected");
                            continue;
                        }
                        Ok(false) => {}
                        Err(m) => break RunEnd::Error(m),
                    }
                }
                let before = n.stats().vmx_instructions;
                let _ = n.take_last_fault();
                let r = vmx_exit(n, l1, &insn_bytes, ram, platform, &deadline);
                PathCounts::add(&mut paths.emulation_failure, &before, n);
                decided_ud = n
                    .take_last_fault()
                    .and_then(|(rip, v)| (v == UD_VECTOR).then_some(rip));
                if let Err(end) = r {
                    break end;
                }
            }
            VmExit::InternalError { suberror } => {
                bump(&mut stats.l1_exits, "internal-error");
                break RunEnd::Error(format!(
                    "KVM internal error (suberror {suberror}) while running L1"
                ));
            }
            VmExit::FailEntry { reason } => {
                bump(&mut stats.l1_exits, "fail-entry");
                break RunEnd::Error(format!(
                    "KVM could not enter L1 (hardware entry failure reason {reason:#x}); the L1 register state is invalid"
                ));
            }
            VmExit::Debug { pc, .. } => {
                bump(&mut stats.l1_exits, "debug");
                tracing::debug!("L1 debug exit at {pc:#x}");
            }
            VmExit::IrqWindowOpen => bump(&mut stats.l1_exits, "irq-window"),
            VmExit::Interrupted => bump(&mut stats.l1_exits, "interrupted"),
            VmExit::Kicked => {
                bump(&mut stats.l1_exits, "kicked");
                match l1_vmcall_on_kick(nested.as_deref_mut(), l1, ram, platform, &deadline) {
                    Ok(Some(ud)) => {
                        bump(&mut stats.l1_exits, "vmcall-watchdog");
                        decided_ud = ud;
                    }
                    Ok(None) => {}
                    Err(end) => break end,
                }
            }
            VmExit::Unsupported(n) => {
                bump(&mut stats.l1_exits, "unsupported");
                break RunEnd::Error(format!("unexpected KVM exit {n} while running L1"));
            }
        }
    };
    let wall = deadline.start.elapsed();
    drop(deadline);
    platform.devices.console.flush();
    stats.wall = wall;
    stats.l1_ioctls = l1.counters();
    stats.l2_ioctls = cfg.l2_counters.as_ref().map(|h| h.get());
    stats.unhandled_ports = platform.devices.unhandled.clone();
    if let Some(n) = nested.as_ref() {
        let ns = n.stats();
        stats.l2_exits = ns
            .exit_rows()
            .into_iter()
            .map(|(r, name, a, b)| (r, name.to_string(), a, b))
            .collect();
        stats.vmx_instructions = ns
            .vmx_rows()
            .into_iter()
            .map(|(k, c)| (k.to_string(), c))
            .collect();
        stats.vmx_by_path = paths.rows();
        stats.vmcall_watchdog = n.vmcall_watchdog_stats();
        stats.hidden_exits = n.hidden_exit_rows();
    }
    let exit_code = end.exit_code_for(cfg.exit_convention);
    let report = RunReport {
        end,
        stats,
        exit_code,
    };
    for l in summary_lines(&report) {
        platform.devices.console.l0_line(&l);
    }
    report
}

/// The VMCALL watchdog's kick ended L1's `KVM_RUN` (a VMCALL hangs it on
/// this host). When L1's RIP is on a VMCALL, L1 gets the SDM's outcome
/// (SDM 31.3, VMCALL; L0 documents no hypercall interface in its CPUID
/// leaves, so none applies): the VMX emulation gives #UD outside VMX
/// operation, VMfailValid(1) with a current VMCS, else VMfailInvalid, and
/// RIP advances past it. Without nesting L1 is never in VMX operation: #UD.
/// `Ok(None)`: not a VMCALL, L1 goes on; `Ok(Some(ud))`: handled, `ud` is
/// the RIP of a #UD L0 decided (genuine when L1's handler offers it on the
/// trap port).
fn l1_vmcall_on_kick<V: Vcpu, L2: FlushPending>(
    nested: Option<&mut Nested<L2>>,
    l1: &mut V,
    ram: &GuestRam,
    platform: &mut Platform<'_>,
    deadline: &Deadline,
) -> Result<Option<Option<u64>>, RunEnd> {
    let state = l1
        .get_state()
        .map_err(|e| RunEnd::Error(format!("reading L1's state after a kick failed: {e}")))?;
    // An event still to be delivered comes before the instruction at RIP.
    if state.pending_event.is_some()
        || vmx_instruction_at(&state, &[], &mut RamView(ram)) != Some(VmxInstruction::Vmcall)
    {
        return Ok(None);
    }
    tracing::debug!(rip = state.rip, "VMCALL watchdog: L1 is on a VMCALL");
    match nested {
        Some(n) => {
            let _ = n.take_last_fault();
            // Empty bytes: the emulation fetches them at CS:RIP itself.
            vmx_exit(n, l1, &[], ram, platform, deadline)?;
            Ok(Some(
                n.take_last_fault()
                    .and_then(|(rip, v)| (v == UD_VECTOR).then_some(rip)),
            ))
        }
        None => {
            l1.inject_exception(UD_VECTOR, None)
                .map_err(|e| RunEnd::Error(format!("injecting #UD into L1 failed: {e}")))?;
            Ok(Some(None))
        }
    }
}

/// The summary line of the VMCALL watchdog, when it caught a VMCALL of L2.
fn vmcall_watchdog_line(s: &VmcallWatchdogStats) -> Option<String> {
    let mean = s.mean()?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Some(format!(
        "VMCALL watchdog: {} L2 VMCALLs became exit 18, VM entry to exit {:.3} ms mean ({:.3} min, {:.3} max), {} kicks",
        s.vmcalls,
        ms(mean),
        ms(s.min),
        ms(s.max),
        s.kicks
    ))
}

/// `--vmx-trap ud`: when the instruction KVM could not emulate is a VMX
/// instruction, injects #UD into L1 at it, as a KVM without nested VMX
/// does, and returns true. VMCALL is left to the emulation path (on such a
/// host it is a hypercall, not a #UD).
fn inject_ud_at_vmx<V: Vcpu>(
    l1: &mut V,
    insn_bytes: &[u8],
    ram: &GuestRam,
) -> Result<bool, String> {
    let state = l1
        .get_state()
        .map_err(|e| format!("reading L1's state failed: {e}"))?;
    match vmx_instruction_at(&state, insn_bytes, &mut RamView(ram)) {
        None | Some(VmxInstruction::Vmcall) => Ok(false),
        Some(_) => {
            l1.inject_exception(UD_VECTOR, None)
                .map_err(|e| format!("injecting #UD into L1 failed: {e}"))?;
            Ok(true)
        }
    }
}

/// What the L1-intercept hooks need of the run loop.
struct InterceptCtx<'a, 'p> {
    ram: &'a GuestRam,
    platform: &'a mut Platform<'p>,
    deadline: &'a Deadline,
    paths: &'a mut PathCounts,
    decided_ud: &'a mut Option<u64>,
    counts: &'a mut BTreeMap<&'static str, u64>,
}

fn l1_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RunEnd + '_ {
    move |e| RunEnd::Error(format!("{what} L1's vCPU failed: {e}"))
}

/// Programs L1's debug hardware and records it.
fn program_l1_debug<V: Vcpu>(
    icpt: &mut L1Intercepts,
    l1: &mut V,
    dbg: crate::hv::GuestDebug,
) -> Result<(), RunEnd> {
    let ok = l1
        .program_guest_debug(&dbg)
        .map_err(l1_err("programming the debug registers of"))?;
    icpt.applied(dbg, ok);
    Ok(())
}

/// The L1-intercept hook, run on every L1 exit before the run loop looks
/// at it (l1_intercept.rs, docs/l1-intercepts.md): follows L1's IDT to
/// keep the #GP/#UD handler breakpoints on, and handles their hits.
/// `Ok(true)`: the exit was L0's own (a handler hit or the step past one).
fn l1_intercept_exit<V: Vcpu, L2: FlushPending>(
    icpt: &mut L1Intercepts,
    n: &mut Nested<L2>,
    l1: &mut V,
    exit: &VmExit,
    ctx: &mut InterceptCtx<'_, '_>,
) -> Result<bool, RunEnd> {
    let VmExit::Debug { pc, dr6 } = *exit else {
        if icpt.follows_idt() {
            let state = l1.get_state().map_err(l1_err("reading"))?;
            let mut mem = RamView(ctx.ram);
            if let Some(want) = icpt.refresh(&state, &mut mem, abi::VMX_TRAP_PORT) {
                program_l1_debug(icpt, l1, want)?;
                n.set_vmxe_observable(icpt.gp_armed());
            }
        }
        return Ok(false);
    };
    let handled = match icpt.classify(pc, dr6) {
        Hit::Other => return Ok(false),
        Hit::StepDone => {
            bump(ctx.counts, "l1-handler-step");
            let dbg = icpt.rearm();
            program_l1_debug(icpt, l1, dbg)?;
            return Ok(true);
        }
        Hit::GeneralProtection => {
            bump(ctx.counts, "gp-breakpoint");
            l1_gp_hit(n, l1, ctx)?
        }
        Hit::InvalidOpcode => {
            bump(ctx.counts, "ud-breakpoint");
            l1_ud_hit(n, l1, ctx)?
        }
    };
    if !handled {
        // L1's handler gets the exception: one step past the breakpoint.
        let dbg = icpt.step_over();
        program_l1_debug(icpt, l1, dbg)?;
    }
    Ok(true)
}

/// L1's state before the exception whose handler breakpoint fired (the
/// frame unwound), if the frame can be unwound and, for `error_code`
/// `Some(e)`, carries error code `e`; `None`: L1's handler gets it.
fn l1_state_before_fault<V: Vcpu>(
    l1: &mut V,
    ctx: &mut InterceptCtx<'_, '_>,
    what: &str,
    error_code: Option<u32>,
) -> Result<Option<VcpuState>, RunEnd> {
    let handler = l1.get_state().map_err(l1_err("reading"))?;
    let mut mem = RamView(ctx.ram);
    let with_error_code = error_code.is_some();
    let unwound = read_frame(&handler, &mut mem, with_error_code).and_then(|f| {
        if f.error_code == error_code || !with_error_code {
            unwind(&handler, &f).map(Some)
        } else {
            Ok(None)
        }
    });
    match unwound {
        Ok(s) => Ok(s),
        Err(e) => {
            tracing::debug!("L1 {what} not unwound: {e}");
            Ok(None)
        }
    }
}

/// L1's #GP handler was hit: completes a `mov cr4` that sets CR4.VMXE
/// (KVM refuses it) when the SDM allows it; `Ok(false)`: L1's handler
/// gets the #GP.
fn l1_gp_hit<V: Vcpu, L2: FlushPending>(
    n: &mut Nested<L2>,
    l1: &mut V,
    ctx: &mut InterceptCtx<'_, '_>,
) -> Result<bool, RunEnd> {
    // KVM's #GP for CR4.VMXE has error code 0.
    let Some(pre) = l1_state_before_fault(l1, ctx, "#GP", Some(0))? else {
        return Ok(false);
    };
    let mut mem = RamView(ctx.ram);
    let Ok(Ok(bytes)) = fetch_insn_bytes(&pre, &mut mem) else {
        return Ok(false);
    };
    let Some(mov) = decode_mov_to_cr4(&pre, &bytes) else {
        return Ok(false);
    };
    // Without VMXE KVM would have taken the write: this #GP is L1's own.
    if mov.value & CR4_VMXE == 0 {
        return Ok(false);
    }
    let caps = n.cpu().caps();
    let rules = Cr4Context {
        old: n.l1_visible_cr4(pre.cr4),
        vmx_operation: matches!(
            n.cpu().vmx_operation(),
            vmcs12::vmx::VmxOperation::Root { .. }
        ),
        long_mode: pre.msrs.efer & VcpuState::EFER_LMA != 0,
        cr3: pre.cr3,
        cpl: (pre.cs.selector & 3) as u8,
        fixed0: caps.cr4_fixed0(),
        fixed1: caps.cr4_fixed1(),
    };
    match mov_to_cr4(&rules, mov.value) {
        Cr4Verdict::GeneralProtection => Ok(false),
        Cr4Verdict::Complete { hw, vmxe } => {
            let mut s = pre;
            s.cr4 = hw;
            s.rip = pre.rip.wrapping_add(mov.len);
            if pre.msrs.efer & VcpuState::EFER_LMA == 0 {
                s.rip &= 0xffff_ffff;
            }
            l1.set_state(&s).map_err(l1_err("writing"))?;
            n.set_vmxe(vmxe);
            bump(ctx.counts, "cr4-vmxe-write");
            tracing::debug!(
                rip = pre.rip,
                cr4 = mov.value,
                "L1 mov cr4 with VMXE completed"
            );
            Ok(true)
        }
    }
}

/// L1's #UD handler was hit (`--vmx-trap ud`, L1 without the trap port):
/// emulates the VMX instruction at the faulting RIP from the unwound
/// state; `Ok(false)`: L1's handler gets the #UD.
fn l1_ud_hit<V: Vcpu, L2: FlushPending>(
    n: &mut Nested<L2>,
    l1: &mut V,
    ctx: &mut InterceptCtx<'_, '_>,
) -> Result<bool, RunEnd> {
    let Some(pre) = l1_state_before_fault(l1, ctx, "#UD", None)? else {
        return Ok(false);
    };
    let mut mem = RamView(ctx.ram);
    // A #UD L0 itself gave as the instruction's outcome is genuine.
    if *ctx.decided_ud == Some(pre.rip) {
        *ctx.decided_ud = None;
        return Ok(false);
    }
    match vmx_instruction_at(&pre, &[], &mut mem) {
        None | Some(VmxInstruction::Vmcall) => return Ok(false),
        Some(_) => {}
    }
    l1.set_state(&pre).map_err(l1_err("writing"))?;
    bump(ctx.counts, "vmx-ud-breakpoint");
    let before = n.stats().vmx_instructions;
    let _ = n.take_last_fault();
    let r = vmx_exit(n, l1, &[], ctx.ram, ctx.platform, ctx.deadline);
    PathCounts::add(&mut ctx.paths.ud_breakpoint, &before, n);
    *ctx.decided_ud = n
        .take_last_fault()
        .and_then(|(rip, v)| (v == UD_VECTOR).then_some(rip));
    r.map(|()| true)
}

/// GPRs in the trap frame, in frame order, with their VMX register numbers.
const FRAME_GPRS: [(u64, usize); 15] = [
    (abi::trap_frame::RAX, 0),
    (abi::trap_frame::RCX, 1),
    (abi::trap_frame::RDX, 2),
    (abi::trap_frame::RBX, 3),
    (abi::trap_frame::RBP, 5),
    (abi::trap_frame::RSI, 6),
    (abi::trap_frame::RDI, 7),
    (abi::trap_frame::R8, 8),
    (abi::trap_frame::R9, 9),
    (abi::trap_frame::R10, 10),
    (abi::trap_frame::R11, 11),
    (abi::trap_frame::R12, 12),
    (abi::trap_frame::R13, 13),
    (abi::trap_frame::R14, 14),
    (abi::trap_frame::R15, 15),
];

/// Number of u64 slots in a trap frame.
const FRAME_WORDS: usize = (abi::trap_frame::SIZE / 8) as usize;

/// A trap frame as bytes in L1's memory.
type FrameBytes = [u8; FRAME_WORDS * 8];

/// What became of the instruction a trap frame describes.
#[derive(Debug, Clone, PartialEq)]
enum TrapResult {
    /// Nothing set (not a VMX instruction, or nothing done yet).
    Untouched,
    /// Emulated: write this state back into the frame.
    Emulated(Box<VcpuState>),
    /// L1's whole state was replaced (a VM exit to L1's host state).
    Replaced,
    /// The instruction raises #UD: L1's handler treats its #UD as genuine.
    GenuineUd,
    /// The instruction raises this fault (vector, error code): L1's #UD
    /// handler was unwound and the fault injected at the instruction.
    Injected(u8, Option<u32>),
    /// The instruction raises this fault, but the handler's frame cannot
    /// be unwound (its CS/SS differ from the handler's): L1 sees #UD.
    NotDeliverable(u8, Option<u32>),
}

/// L1's vCPU as seen at the instruction that raised the #UD described by
/// a trap frame (`l1_image::abi::trap_frame`): GPRs, RIP, RFLAGS and RSP
/// come from the frame. A `set_state` that only completes the instruction
/// (same control registers and segments, same RSP, RIP 1-15 bytes further)
/// is kept for the frame; anything else (a VM exit loading L1's host
/// state) goes to the real vCPU, and L1 never returns to its handler.
/// A fault other than #UD unwinds the handler: L1's vCPU gets the frame's
/// state back and the fault is injected there, as the CPU would have
/// delivered it instead of the #UD.
struct TrapFrameVcpu<'a, V: Vcpu> {
    l1: &'a mut V,
    frame: [u64; FRAME_WORDS],
    given: Option<VcpuState>,
    result: TrapResult,
}

impl<V: Vcpu> TrapFrameVcpu<'_, V> {
    fn field(&self, off: u64) -> u64 {
        self.frame.get((off / 8) as usize).copied().unwrap_or(0)
    }

    fn completes_instruction(g: &VcpuState, n: &VcpuState) -> bool {
        let advance = n.rip.wrapping_sub(g.rip);
        (1..=15).contains(&advance)
            && n.gprs.regs[4] == g.gprs.regs[4]
            && n.cr0 == g.cr0
            && n.cr3 == g.cr3
            && n.cr4 == g.cr4
            && n.cs == g.cs
            && n.ss == g.ss
            && n.msrs.efer == g.msrs.efer
    }

    /// Whether the frame's state can be loaded into L1's vCPU as is: the
    /// #UD did not change CS or SS (same privilege level).
    fn unwindable(&self, g: &VcpuState) -> bool {
        self.field(abi::trap_frame::CS) == u64::from(g.cs.selector)
            && self.field(abi::trap_frame::SS) == u64::from(g.ss.selector)
    }
}

impl<V: Vcpu> Vcpu for TrapFrameVcpu<'_, V> {
    type Error = V::Error;

    fn run(&mut self) -> Result<VmExit, V::Error> {
        self.l1.run()
    }

    fn get_state(&mut self) -> Result<VcpuState, V::Error> {
        let mut s = self.l1.get_state()?;
        for (off, reg) in FRAME_GPRS {
            s.gprs.regs[reg] = self.field(off);
        }
        s.gprs.regs[4] = self.field(abi::trap_frame::RSP);
        s.rip = self.field(abi::trap_frame::RIP);
        s.rflags = self.field(abi::trap_frame::RFLAGS);
        self.given = Some(s);
        Ok(s)
    }

    fn set_state(&mut self, state: &VcpuState) -> Result<(), V::Error> {
        match &self.given {
            Some(g) if Self::completes_instruction(g, state) => {
                self.result = TrapResult::Emulated(Box::new(*state));
                Ok(())
            }
            _ => {
                self.result = TrapResult::Replaced;
                self.l1.set_state(state)
            }
        }
    }

    fn complete_io_in(&mut self, data: u32) {
        self.l1.complete_io_in(data)
    }

    fn complete_mmio_read(&mut self, data: &[u8]) {
        self.l1.complete_mmio_read(data)
    }

    fn complete_rdmsr(&mut self, value: Option<u64>) {
        self.l1.complete_rdmsr(value)
    }

    fn complete_wrmsr(&mut self, ok: bool) {
        self.l1.complete_wrmsr(ok)
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), V::Error> {
        if vector == UD_VECTOR {
            self.result = TrapResult::GenuineUd;
            return Ok(());
        }
        let Some(g) = self.given.filter(|g| self.unwindable(g)) else {
            self.result = TrapResult::NotDeliverable(vector, error_code);
            return Ok(());
        };
        // A #PF comes with a set_state (CR2) that already replaced L1's
        // state with the frame's; otherwise unwind here.
        if self.result != TrapResult::Replaced {
            self.l1.set_state(&g)?;
        }
        self.l1.inject_exception(vector, error_code)?;
        self.result = TrapResult::Injected(vector, error_code);
        Ok(())
    }

    fn counters(&self) -> IoctlCounters {
        self.l1.counters()
    }
}

/// Copies `buf` from or to L1's linear address `addr` (through L1's
/// paging); a message if L1's state or mapping does not allow it.
fn l1_linear<V: Vcpu>(
    l1: &mut V,
    ram: &GuestRam,
    addr: u64,
    buf: &mut [u8],
    access: Access,
) -> Result<(), String> {
    let s = l1.get_state().map_err(|e| e.to_string())?;
    let mut mem = RamView(ram);
    match access_linear(&s, &mut mem, addr, buf, access) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(f)) => Err(format!(
            "L1's trap frame at {addr:#x} is not accessible ({f:?})"
        )),
        Err(e) => Err(format!("L1's trap frame at {addr:#x}: {e}")),
    }
}

fn frame_from_bytes(raw: &FrameBytes) -> [u64; FRAME_WORDS] {
    let mut frame = [0u64; FRAME_WORDS];
    for (slot, chunk) in frame.iter_mut().zip(raw.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(b);
    }
    frame
}

fn frame_to_bytes(frame: &[u64; FRAME_WORDS]) -> FrameBytes {
    let mut raw = [0u8; FRAME_WORDS * 8];
    for (chunk, v) in raw.chunks_exact_mut(8).zip(frame) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    raw
}

/// L1's #UD trap port: emulates the VMX instruction the frame at
/// `frame_addr` describes and, when it completes in place, writes the
/// registers back into the frame with status EMULATED (L1 then IRETQs past
/// it). `genuine_at` is the RIP of an instruction L0 already answered with
/// #UD on the emulation path: that frame is left alone (status 0).
/// `Err(end)` ends the run.
fn trap_exit<V: Vcpu, L2: FlushPending>(
    n: &mut Nested<L2>,
    l1: &mut V,
    frame_addr: u64,
    genuine_at: Option<u64>,
    ram: &GuestRam,
    platform: &mut Platform<'_>,
    deadline: &Deadline,
) -> Result<(), RunEnd> {
    let mut raw: FrameBytes = [0u8; FRAME_WORDS * 8];
    if let Err(m) = l1_linear(l1, ram, frame_addr, &mut raw, Access::Read) {
        platform
            .devices
            .console
            .l0_line(&format!("{m}: L1 sees a genuine #UD"));
        return Ok(());
    }
    let frame = frame_from_bytes(&raw);
    let mut tv = TrapFrameVcpu {
        l1,
        frame,
        given: None,
        result: TrapResult::Untouched,
    };
    let rip = tv.field(abi::trap_frame::RIP);
    if genuine_at == Some(rip) {
        return Ok(());
    }
    let mut mem = RamView(ram);
    let r = n
        .handle_vmx_exit(&mut tv, &[], &mut mem, platform)
        .map_err(|e| RunEnd::Error(e.to_string()))
        .and_then(|o| settle(n, &mut tv, o, &mut mem, platform, deadline));
    let TrapFrameVcpu {
        l1, frame, result, ..
    } = tv;
    match result {
        TrapResult::Emulated(s) => {
            let mut f = frame;
            let mut put = |off: u64, v: u64| {
                if let Some(slot) = f.get_mut((off / 8) as usize) {
                    *slot = v;
                }
            };
            for (off, reg) in FRAME_GPRS {
                put(off, s.gprs.regs[reg]);
            }
            put(abi::trap_frame::RIP, s.rip);
            put(abi::trap_frame::RFLAGS, s.rflags);
            put(abi::trap_frame::STATUS, abi::TRAP_STATUS_EMULATED);
            l1_linear(l1, ram, frame_addr, &mut frame_to_bytes(&f), Access::Write)
                .map_err(RunEnd::Error)?;
        }
        TrapResult::NotDeliverable(vector, code) => {
            platform.devices.console.l0_line(&format!(
                "VMX instruction at {rip:#x} (via L1's #UD trap) raises vector {vector} (error code {code:?}), but L1's #UD frame cannot be unwound (CS/SS changed); L1 sees #UD"
            ));
        }
        TrapResult::Injected(vector, code) => {
            tracing::debug!(rip, vector, ?code, "trap-port VMX fault injected into L1");
        }
        TrapResult::Untouched | TrapResult::Replaced | TrapResult::GenuineUd => {}
    }
    r.and_then(|o| match o {
        VmxExitOutcome::Stop(code) => Err(RunEnd::DebugExit(code)),
        _ => Ok(()),
    })
}

/// Follows a VMX instruction's outcome through signals that interrupted
/// L2 (`continue_l2`), until it is final; `Err(end)` on a timeout or an
/// error.
fn settle<V: Vcpu, L2: FlushPending>(
    n: &mut Nested<L2>,
    l1: &mut V,
    mut outcome: VmxExitOutcome,
    mem: &mut RamView<'_>,
    platform: &mut Platform<'_>,
    deadline: &Deadline,
) -> Result<VmxExitOutcome, RunEnd> {
    while outcome == VmxExitOutcome::L2Interrupted {
        if deadline.expired() {
            return Err(RunEnd::Timeout(deadline.start.elapsed()));
        }
        outcome = n
            .continue_l2(l1, mem, platform)
            .map_err(|e| RunEnd::Error(e.to_string()))?;
    }
    Ok(outcome)
}

/// One trapped VMX instruction (emulation-failure path); `Err(end)` ends
/// the run.
fn vmx_exit<V: Vcpu, L2: FlushPending>(
    n: &mut Nested<L2>,
    l1: &mut V,
    insn_bytes: &[u8],
    ram: &GuestRam,
    platform: &mut Platform<'_>,
    deadline: &Deadline,
) -> Result<(), RunEnd> {
    let mut mem = RamView(ram);
    let outcome = n
        .handle_vmx_exit(l1, insn_bytes, &mut mem, platform)
        .map_err(|e| RunEnd::Error(e.to_string()))?;
    match settle(n, l1, outcome, &mut mem, platform, deadline)? {
        VmxExitOutcome::Stop(code) => Err(RunEnd::DebugExit(code)),
        VmxExitOutcome::NotVmx(e) => {
            let rip = l1.get_state().map(|s| s.rip).unwrap_or(u64::MAX);
            let where_ = if rip >= ram.size() {
                " (RIP is outside guest RAM: L1 jumped to unmapped memory)"
            } else {
                ""
            };
            Err(RunEnd::Error(format!(
                "KVM could not emulate L1's instruction at RIP {rip:#x}{where_} (bytes {insn_bytes:02x?}) and it is not a VMX instruction: {e}"
            )))
        }
        VmxExitOutcome::Continue | VmxExitOutcome::L2Interrupted => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::CaptureSink;
    use std::collections::VecDeque;
    use vmcs12::VmxCapabilities;

    /// A scripted L1 vCPU: returns the exits in order, records completions.
    #[derive(Debug, Default)]
    struct Scripted {
        exits: VecDeque<VmExit>,
        state: VcpuState,
        io_in: Vec<u32>,
        rdmsr: Vec<Option<u64>>,
        wrmsr: Vec<bool>,
        injected: Vec<(u8, Option<u32>)>,
        runs: u64,
        /// Sleep this long in each `run` (timeout tests).
        delay: Duration,
        /// Has debug hardware (`program_guest_debug` succeeds).
        debug_hw: bool,
        /// Every debug state programmed.
        debug: Vec<crate::hv::GuestDebug>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("script exhausted")]
    struct Exhausted;

    impl Vcpu for Scripted {
        type Error = Exhausted;
        fn run(&mut self) -> Result<VmExit, Exhausted> {
            std::thread::sleep(self.delay);
            self.runs += 1;
            self.exits.pop_front().ok_or(Exhausted)
        }
        fn get_state(&mut self) -> Result<VcpuState, Exhausted> {
            Ok(self.state)
        }
        fn set_state(&mut self, s: &VcpuState) -> Result<(), Exhausted> {
            self.state = *s;
            Ok(())
        }
        fn complete_io_in(&mut self, d: u32) {
            self.io_in.push(d);
        }
        fn complete_mmio_read(&mut self, _: &[u8]) {}
        fn complete_rdmsr(&mut self, v: Option<u64>) {
            self.rdmsr.push(v);
        }
        fn complete_wrmsr(&mut self, ok: bool) {
            self.wrmsr.push(ok);
        }
        fn inject_exception(&mut self, v: u8, e: Option<u32>) -> Result<(), Exhausted> {
            self.injected.push((v, e));
            Ok(())
        }
        fn counters(&self) -> IoctlCounters {
            IoctlCounters {
                kvm_run: self.runs,
                other: 0,
            }
        }
        fn program_guest_debug(&mut self, dbg: &crate::hv::GuestDebug) -> Result<bool, Exhausted> {
            if self.debug_hw {
                self.debug.push(*dbg);
            }
            Ok(self.debug_hw)
        }
    }

    /// As an L2 vCPU, a `Scripted` without exits fails every `run`.
    impl FlushPending for Scripted {
        fn flush_pending(&mut self) -> Result<(), Exhausted> {
            Ok(())
        }
    }

    /// Runs `l1` on a platform with `caps`' VMX MSRs and no other MSRs;
    /// returns the report and the printed lines.
    fn run_on(
        l1: &mut Scripted,
        nested: Option<&mut Nested<Scripted>>,
        ram: &GuestRam,
        caps: VmxCapabilities,
        cfg: &RunConfig,
    ) -> (RunReport, Vec<String>) {
        let cap = CaptureSink::new();
        let mut devices = Devices::new(Box::new(cap.clone()));
        let msrs = VmxMsrHandler::new(caps);
        let mut platform = Platform {
            devices: &mut devices,
            vmx_msrs: &msrs,
            msrs: None,
        };
        let r = run_l1(l1, nested, ram, &mut platform, cfg);
        (r, cap.lines())
    }

    fn run(exits: Vec<VmExit>, cfg: RunConfig) -> (RunReport, Scripted, Vec<String>) {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut v = Scripted {
            exits: exits.into(),
            ..Default::default()
        };
        let (r, lines) = run_on(&mut v, None, &ram, VmxCapabilities::default(), &cfg);
        (r, v, lines)
    }

    fn out(port: u16, b: u8) -> VmExit {
        VmExit::IoOut {
            port,
            size: 1,
            data: u32::from(b),
        }
    }

    #[test]
    fn test_run_prints_uart_and_ends_on_debug_exit() {
        let mut exits: Vec<_> = "hi\n".bytes().map(|b| out(0x3f8, b)).collect();
        exits.push(VmExit::IoIn {
            port: 0x3fd,
            size: 1,
        });
        exits.push(VmExit::IoOut {
            port: 0xf4,
            size: 4,
            data: 0x10,
        });
        exits.push(VmExit::Hlt);
        let (r, v, lines) = run(exits, RunConfig::default());
        assert_eq!(r.end, RunEnd::DebugExit(0x21));
        assert_eq!(r.end.exit_code(), 0x21);
        assert_eq!(lines[0], "[L1] hi");
        assert_eq!(v.io_in, vec![0x60]);
        assert_eq!(v.exits.len(), 1, "HLT after the debug exit is never run");
        assert_eq!(r.stats.l1_exits.get("io-out"), Some(&4));
        assert_eq!(r.stats.l1_ioctls.kvm_run, 5);
        assert!(lines.iter().any(|l| l.starts_with("[L0] end: debug exit")));
    }

    #[test]
    fn test_run_answers_vmx_msrs_and_refuses_writes() {
        let exits = vec![
            VmExit::RdMsr { index: 0x480 },
            VmExit::RdMsr { index: 0x3a },
            VmExit::WrMsr {
                index: 0x3a,
                data: 5,
            },
            VmExit::Hlt,
        ];
        let (r, v, _) = run(exits, RunConfig::default());
        assert_eq!(r.end, RunEnd::Halted);
        let caps = VmxCapabilities::default();
        assert_eq!(v.rdmsr, vec![caps.read_msr(0x480), caps.read_msr(0x3a)]);
        assert!(v.rdmsr.iter().all(Option::is_some));
        assert_eq!(v.wrmsr, vec![false]);
    }

    #[test]
    fn test_run_triple_fault_dumps_registers() {
        let (r, _, lines) = run(vec![VmExit::Shutdown], RunConfig::default());
        assert_eq!(r.end, RunEnd::TripleFault);
        assert_eq!(r.end.exit_code(), EXIT_TRIPLE_FAULT);
        assert!(lines.iter().any(|l| l.contains("triple fault")));
        assert!(lines.iter().any(|l| l.starts_with("[L0] rip=")));
    }

    #[test]
    fn test_run_vmx_instruction_without_nesting_is_an_error() {
        let (r, _, _) = run(
            vec![VmExit::EmulationFailure {
                insn_bytes: vec![0x0f, 0x01, 0xc4],
            }],
            RunConfig::default(),
        );
        match r.end {
            RunEnd::Error(m) => assert!(m.contains("nesting is off"), "{m}"),
            e => panic!("expected an error, got {e:?}"),
        }
    }

    /// A kick of L1's vCPU on a VMCALL (KVM hangs on it): without nesting
    /// L1 is outside VMX operation, so #UD at the VMCALL (SDM 31.3); a kick
    /// anywhere else changes nothing.
    #[test]
    fn test_kicked_l1_on_vmcall_gets_ud_without_nesting() {
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.write_bytes(0x1000, &[0x0f, 0x01, 0xc1, 0x90, 0x90, 0x90])
            .unwrap();
        let mut v = Scripted {
            exits: vec![VmExit::Kicked, VmExit::Hlt].into(),
            ..Default::default()
        };
        v.state.rip = 0x1000;
        let (r, _) = run_on(
            &mut v,
            None,
            &ram,
            VmxCapabilities::default(),
            &RunConfig::default(),
        );
        assert_eq!(r.end, RunEnd::Halted);
        assert_eq!(v.injected, vec![(UD_VECTOR, None)]);
        assert_eq!(r.stats.l1_exits.get("vmcall-watchdog"), Some(&1));
        // RIP on the NOP after it: nothing happens.
        let mut v = Scripted {
            exits: vec![VmExit::Kicked, VmExit::Hlt].into(),
            ..Default::default()
        };
        v.state.rip = 0x1003;
        let (r, _) = run_on(
            &mut v,
            None,
            &ram,
            VmxCapabilities::default(),
            &RunConfig::default(),
        );
        assert_eq!(r.end, RunEnd::Halted);
        assert!(v.injected.is_empty());
        assert_eq!(r.stats.l1_exits.get("kicked"), Some(&1));
        assert_eq!(r.stats.l1_exits.get("vmcall-watchdog"), None);
    }

    #[test]
    fn test_run_backend_error_ends_with_message() {
        let (r, _, _) = run(vec![], RunConfig::default());
        assert_eq!(
            r.end,
            RunEnd::Error("running L1 failed: script exhausted".into())
        );
        assert_eq!(r.end.exit_code(), EXIT_ERROR);
    }

    #[test]
    fn test_run_unexpected_exits_end_the_run() {
        let (r, _, _) = run(vec![VmExit::Unsupported(99)], RunConfig::default());
        assert!(matches!(r.end, RunEnd::Error(m) if m.contains("99")));
        let (r, _, _) = run(
            vec![VmExit::FailEntry { reason: 0x21 }],
            RunConfig::default(),
        );
        assert!(matches!(r.end, RunEnd::Error(m) if m.contains("0x21")));
    }

    #[test]
    fn test_run_times_out() {
        let t = Duration::from_millis(30);
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut v = Scripted {
            exits: vec![VmExit::Interrupted; 1_000_000].into(),
            delay: Duration::from_millis(1),
            ..Default::default()
        };
        let cfg = RunConfig {
            timeout: Some(t),
            ..Default::default()
        };
        let (r, _) = run_on(&mut v, None, &ram, VmxCapabilities::default(), &cfg);
        assert!(matches!(r.end, RunEnd::Timeout(d) if d >= t));
        assert_eq!(r.end.exit_code(), EXIT_TIMEOUT);
    }

    #[test]
    fn test_platform_sends_l2_console_to_l2_prefix() {
        let cap = CaptureSink::new();
        let mut devices = Devices::new(Box::new(cap.clone()));
        let msrs = VmxMsrHandler::new(VmxCapabilities::default());
        let mut p = Platform {
            devices: &mut devices,
            vmx_msrs: &msrs,
            msrs: None,
        };
        for b in b"L2 via 0xe9\n" {
            assert_eq!(p.l2_io_out(0xe9, 1, u32::from(*b)), HostAction::Continue);
        }
        assert_eq!(p.l2_io_out(0xf4, 1, 2), HostAction::Stop(5));
        assert_eq!(p.l2_rdmsr(0x480), None, "L2 has no VMX");
        assert_eq!(p.l2_rdmsr(0x1b), None, "no MSR backend: #GP");
        assert!(!p.l2_wrmsr(0x3a, 1));
        assert_eq!(cap.lines(), vec!["[L2] L2 via 0xe9"]);
    }

    const FRAME: u64 = 0x40_0000;

    fn trap_port_exit() -> VmExit {
        VmExit::IoOut {
            port: abi::VMX_TRAP_PORT,
            size: 4,
            data: FRAME as u32,
        }
    }

    /// L1 in 64-bit mode (identity paging) at `insn` (0x20_0000) with RAX =
    /// `rax`, whose #UD handler has a frame for that instruction at
    /// 0x40_0000 (CS/SS `cs_ss`); L1 makes the `exits`, then writes 0 to
    /// port 0xf4.
    fn trap_run_with(
        insn: &[u8],
        rax: u64,
        cs_ss: (u64, u64),
        exits: Vec<VmExit>,
        cfg: RunConfig,
    ) -> (RunReport, GuestRam, Scripted, Vec<String>) {
        use crate::loader::{images::elf64, load_kernel};
        use vmcs12::GuestPhysMemory;
        let ram = GuestRam::new(16 << 20).unwrap();
        let k = load_kernel(&ram, &elf64(0x20_0000, insn, 0x10), "").unwrap();
        let mut state = k.entry_state(&VcpuState::default());
        state.gprs.regs[0] = rax;
        let caps = VmxCapabilities::default();
        let mut m = RamView(&ram);
        // VMXON region with the right revision id.
        m.write_u32(0x30_0000, caps.vmcs_revision_id()).unwrap();
        // The VMXON operand: a pointer to the region.
        m.write_u64(0x31_0000, 0x30_0000).unwrap();
        for (off, v) in [
            (abi::trap_frame::RAX, rax),
            (abi::trap_frame::RIP, 0x20_0000),
            (abi::trap_frame::CS, cs_ss.0),
            (abi::trap_frame::RFLAGS, 0x2 | 0x41),
            (abi::trap_frame::RSP, 0x7_0000),
            (abi::trap_frame::SS, cs_ss.1),
            (abi::trap_frame::VECTOR, 6),
        ] {
            m.write_u64(FRAME + off, v).unwrap();
        }
        let mut exits = exits;
        exits.push(VmExit::IoOut {
            port: 0xf4,
            size: 4,
            data: 0,
        });
        let mut l1 = Scripted {
            exits: exits.into(),
            state,
            ..Default::default()
        };
        // The L2 vCPU has no exits: these tests never enter L2.
        let mut nested = Nested::new(vmcs12::VmxCpu::new(caps.clone()), Scripted::default());
        let (r, lines) = run_on(&mut l1, Some(&mut nested), &ram, caps, &cfg);
        (r, ram, l1, lines)
    }

    /// The #UD handler's trap for `insn` (as in `trap_run_with`, flat CS/SS
    /// of the ELF64 entry state).
    fn trap_run(insn: &[u8], rax: u64) -> (RunReport, GuestRam, Vec<String>) {
        let (r, ram, _, lines) = trap_run_with(
            insn,
            rax,
            (0x08, 0x10),
            vec![trap_port_exit()],
            RunConfig::default(),
        );
        (r, ram, lines)
    }

    fn status(ram: &GuestRam) -> u64 {
        use vmcs12::GuestPhysMemory;
        RamView(ram)
            .read_u64(FRAME + abi::trap_frame::STATUS)
            .unwrap()
    }

    #[test]
    fn test_trap_port_emulates_vmxon_into_the_frame() {
        use vmcs12::GuestPhysMemory;
        // vmxon [rax]
        let (r, ram, lines) = trap_run(&[0xf3, 0x0f, 0xc7, 0x30], 0x31_0000);
        assert_eq!(r.end, RunEnd::DebugExit(1), "{lines:?}");
        let m = RamView(&ram);
        assert_eq!(status(&ram), abi::TRAP_STATUS_EMULATED);
        assert_eq!(m.read_u64(FRAME + abi::trap_frame::RIP), Ok(0x20_0004));
        // VMsucceed clears CF and ZF.
        assert_eq!(
            m.read_u64(FRAME + abi::trap_frame::RFLAGS).unwrap() & 0x41,
            0
        );
        assert_eq!(m.read_u64(FRAME + abi::trap_frame::RAX), Ok(0x31_0000));
        assert_eq!(
            r.stats.vmx_by_path,
            vec![VmxPathRow {
                name: "vmxon".into(),
                emulation_failure: 0,
                trap_port: 1,
                ud_breakpoint: 0
            }]
        );
    }

    #[test]
    fn test_trap_port_leaves_genuine_ud_alone() {
        use vmcs12::GuestPhysMemory;
        // ud2 is not a VMX instruction: the status stays NOT_HANDLED.
        let (r, ram, _) = trap_run(&[0x0f, 0x0b], 0);
        assert_eq!(r.end, RunEnd::DebugExit(1));
        assert_eq!(status(&ram), abi::TRAP_STATUS_NOT_HANDLED);
        assert_eq!(
            RamView(&ram).read_u64(FRAME + abi::trap_frame::RIP),
            Ok(0x20_0000)
        );
        assert!(r.stats.vmx_by_path.is_empty());
    }

    #[test]
    fn test_trap_port_ud_fault_leaves_status_for_l1() {
        // vmxoff outside VMX operation raises #UD: L1's #UD is genuine.
        let (r, ram, l1, _) = trap_run_with(
            &[0x0f, 0x01, 0xc4],
            0,
            (0x08, 0x10),
            vec![trap_port_exit()],
            RunConfig::default(),
        );
        assert_eq!(r.end, RunEnd::DebugExit(1));
        assert_eq!(status(&ram), abi::TRAP_STATUS_NOT_HANDLED);
        assert!(l1.injected.is_empty(), "no second #UD: {:?}", l1.injected);
    }

    #[test]
    fn test_trap_port_other_fault_unwinds_the_handler_and_injects_it() {
        // vmxon [rax] with a non-canonical RAX: #GP(0) at the instruction.
        let (r, ram, l1, lines) = trap_run_with(
            &[0xf3, 0x0f, 0xc7, 0x30],
            0x8000_0000_0000_0000,
            (0x08, 0x10),
            vec![trap_port_exit()],
            RunConfig::default(),
        );
        assert_eq!(r.end, RunEnd::DebugExit(1), "{lines:?}");
        assert_eq!(l1.injected, vec![(13, Some(0))]);
        // L1's state is the frame's: the fault is delivered at the VMXON.
        assert_eq!(l1.state.rip, 0x20_0000);
        assert_eq!(l1.state.gprs.regs[4], 0x7_0000);
        assert_eq!(l1.state.rflags, 0x2 | 0x41);
        assert_eq!(status(&ram), abi::TRAP_STATUS_NOT_HANDLED);
    }

    #[test]
    fn test_trap_port_fault_with_other_cs_is_reported_not_injected() {
        let (r, ram, l1, lines) = trap_run_with(
            &[0xf3, 0x0f, 0xc7, 0x30],
            0x8000_0000_0000_0000,
            (0x33, 0x2b),
            vec![trap_port_exit()],
            RunConfig::default(),
        );
        assert_eq!(r.end, RunEnd::DebugExit(1));
        assert!(l1.injected.is_empty());
        assert_eq!(status(&ram), abi::TRAP_STATUS_NOT_HANDLED);
        assert!(
            lines.iter().any(|l| l.contains("raises vector 13")),
            "{lines:?}"
        );
    }

    #[test]
    fn test_ud_path_injects_ud_then_emulates_from_the_frame() {
        let vmxon = [0xf3, 0x0f, 0xc7, 0x30];
        let cfg = RunConfig {
            vmx_trap: VmxTrapPath::InvalidOpcode,
            ..Default::default()
        };
        let exits = vec![
            VmExit::EmulationFailure {
                insn_bytes: vmxon.to_vec(),
            },
            trap_port_exit(),
        ];
        let (r, ram, l1, lines) = trap_run_with(&vmxon, 0x31_0000, (0x08, 0x10), exits, cfg);
        assert_eq!(r.end, RunEnd::DebugExit(1), "{lines:?}");
        assert_eq!(l1.injected, vec![(UD_VECTOR, None)]);
        assert_eq!(status(&ram), abi::TRAP_STATUS_EMULATED);
        for k in ["emulation-failure", "vmx-ud-injected", "vmx-trap-port"] {
            assert_eq!(r.stats.l1_exits.get(k), Some(&1), "{k}");
        }
        assert_eq!(r.stats.vmx_by_path[0].trap_port, 1);
        assert_eq!(r.stats.vmx_by_path[0].emulation_failure, 0);
        // Not a VMX instruction: the emulation path reports it.
        let (r, _, l1, _) = trap_run_with(
            &[0x0f, 0x0b],
            0,
            (0x08, 0x10),
            vec![VmExit::EmulationFailure {
                insn_bytes: vec![0x0f, 0x0b],
            }],
            RunConfig {
                vmx_trap: VmxTrapPath::InvalidOpcode,
                ..Default::default()
            },
        );
        assert!(matches!(r.end, RunEnd::Error(m) if m.contains("not a VMX instruction")));
        assert!(l1.injected.is_empty());
    }

    #[test]
    fn test_emulation_path_ud_is_not_emulated_again_at_the_trap_port() {
        // vmxoff outside VMX operation: the emulation path injects #UD; L1's
        // handler offers it on the trap port, where it counts as genuine.
        let vmxoff = [0x0f, 0x01, 0xc4];
        let exits = vec![
            VmExit::EmulationFailure {
                insn_bytes: vmxoff.to_vec(),
            },
            trap_port_exit(),
        ];
        let (r, ram, l1, _) = trap_run_with(&vmxoff, 0, (0x08, 0x10), exits, RunConfig::default());
        assert_eq!(l1.injected, vec![(UD_VECTOR, None)]);
        assert_eq!(status(&ram), abi::TRAP_STATUS_NOT_HANDLED);
        assert_eq!(r.stats.l1_exits.get("vmx-trap-port"), Some(&1));
        assert_eq!(r.stats.vmx_instructions, vec![("vmxoff".to_string(), 1)]);
        assert_eq!(r.stats.vmx_by_path[0].emulation_failure, 1);
        assert_eq!(r.stats.vmx_by_path[0].trap_port, 0);
    }

    #[test]
    fn test_demo_exit_codes() {
        assert_eq!(RunEnd::DebugExit(1).demo_exit_code(), 0);
        assert_eq!(RunEnd::DebugExit(1).exit_code(), 1);
        assert_eq!(RunEnd::DebugExit(3).demo_exit_code(), 3);
        assert_eq!(RunEnd::Halted.demo_exit_code(), EXIT_DEMO_NO_STATUS);
        assert_eq!(RunEnd::Halted.exit_code(), EXIT_HALTED);
        assert_eq!(RunEnd::TripleFault.demo_exit_code(), EXIT_TRIPLE_FAULT);
        assert_eq!(RunEnd::DebugExit(1).exit_code_for(ExitConvention::Demo), 0);
        assert_eq!(RunEnd::DebugExit(1).exit_code_for(ExitConvention::Qemu), 1);
    }

    #[test]
    fn test_summary_lists_exits_and_vmx_instructions() {
        let mut stats = RunStats::default();
        stats.l1_exits.insert("io-out", 3);
        stats.l2_exits.push((30, "I/O instruction".into(), 1, 2));
        stats.vmx_instructions.push(("vmxon".into(), 1));
        stats.vmx_by_path.push(VmxPathRow {
            name: "vmxon".into(),
            emulation_failure: 0,
            trap_port: 1,
            ud_breakpoint: 0,
        });
        let lines = summary_lines(&RunReport {
            end: RunEnd::Halted,
            stats,
            exit_code: 0,
        });
        assert!(lines.iter().any(|l| l == "exit code: 0"));
        assert!(lines
            .iter()
            .any(|l| l == "VMX instructions by path: emulation-failure exit 0, #UD trap port 1"));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("io-out") && l.ends_with('3')));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("30") && l.contains("I/O")));
        assert!(lines.iter().any(|l| l.starts_with("vmxon")));
    }

    /// L1 (64-bit, identity paging) stopped at its #GP handler 0x21_0000
    /// (IDT at 0x22_0000) with a #GP frame at RSP 0x7_0000 for the
    /// instruction `insn` at 0x20_0000 (RAX = `rax`); L1 makes one OUT (L0
    /// arms the breakpoint), then the `hits`, then writes 0xf4.
    fn gp_hit_run(insn: &[u8], rax: u64, hits: Vec<VmExit>) -> (RunReport, Scripted, bool) {
        use crate::loader::{images::elf64, load_kernel};
        use vmcs12::GuestPhysMemory;
        let ram = GuestRam::new(16 << 20).unwrap();
        let k = load_kernel(&ram, &elf64(0x20_0000, insn, 0x10), "").unwrap();
        let mut state = k.entry_state(&VcpuState::default());
        let mut m = RamView(&ram);
        let handler: u64 = 0x21_0000;
        let gate = (handler & 0xffff)
            | (u64::from(state.cs.selector) << 16)
            | (0x8e00 << 32)
            | (((handler >> 16) & 0xffff) << 48);
        m.write_u64(0x22_0000 + 13 * 16, gate).unwrap();
        m.write_u64(0x22_0000 + 13 * 16 + 8, 0).unwrap();
        for (i, v) in [
            0,
            0x20_0000,
            u64::from(state.cs.selector),
            0x246,
            0x7_0100,
            u64::from(state.ss.selector),
        ]
        .into_iter()
        .enumerate()
        {
            m.write_u64(0x7_0000 + 8 * i as u64, v).unwrap();
        }
        state.idtr.base = 0x22_0000;
        state.idtr.limit = 32 * 16 - 1;
        state.rip = handler;
        state.rflags = 0x2;
        state.gprs.regs[0] = rax;
        state.gprs.regs[4] = 0x7_0000;
        let mut exits = vec![out(0x3f8, b'x')];
        exits.extend(hits);
        exits.push(VmExit::IoOut {
            port: 0xf4,
            size: 4,
            data: 0,
        });
        let mut l1 = Scripted {
            exits: exits.into(),
            state,
            debug_hw: true,
            ..Default::default()
        };
        let caps = VmxCapabilities::default();
        let mut nested = Nested::new(vmcs12::VmxCpu::new(caps.clone()), Scripted::default());
        let (r, _) = run_on(
            &mut l1,
            Some(&mut nested),
            &ram,
            caps,
            &RunConfig::default(),
        );
        (r, l1, nested.vmxe())
    }

    #[test]
    fn test_gp_breakpoint_completes_mov_cr4_with_vmxe() {
        // mov cr4, rax with RAX = CR4 | VMXE.
        let hit = VmExit::Debug {
            pc: 0x21_0000,
            dr6: 1,
        };
        let (r, l1, vmxe) = gp_hit_run(&[0x0f, 0x22, 0xe0], 0x2620, vec![hit]);
        assert_eq!(r.end, RunEnd::DebugExit(1));
        assert_eq!(
            l1.debug[0].breakpoints[0],
            Some(0x21_0000),
            "armed at the handler"
        );
        assert_eq!(l1.debug.len(), 1, "no step: L1 resumes after the mov");
        // The frame is unwound and the instruction completed.
        assert_eq!(l1.state.rip, 0x20_0003);
        assert_eq!(l1.state.gprs.regs[4], 0x7_0100);
        assert_eq!(l1.state.rflags, 0x246);
        assert_eq!(l1.state.cr4, 0x620, "VMXE stays virtual");
        assert!(vmxe);
        assert_eq!(r.stats.l1_exits.get("cr4-vmxe-write"), Some(&1));
    }

    #[test]
    fn test_gp_breakpoint_hands_other_faults_to_l1() {
        // mov cr4, rax with a reserved bit (15): the #GP stands. Then the
        // step past the handler's first instruction re-arms.
        let hits = vec![
            VmExit::Debug {
                pc: 0x21_0000,
                dr6: 1,
            },
            VmExit::Debug {
                pc: 0x21_0001,
                dr6: crate::l1_intercept::DR6_BS,
            },
        ];
        let (r, l1, vmxe) = gp_hit_run(&[0x0f, 0x22, 0xe0], 0xa620, hits);
        assert_eq!(r.end, RunEnd::DebugExit(1));
        assert!(!vmxe);
        assert_eq!(l1.state.rip, 0x21_0000, "L1 stays at its handler");
        assert_eq!(l1.state.cr4, 0x20, "CR4 untouched");
        let armed = l1.debug[0];
        assert!(l1.debug[1].single_step && l1.debug[1].breakpoints[0].is_none());
        assert_eq!(l1.debug[2], armed, "re-armed after the step");
        assert_eq!(r.stats.l1_exits.get("l1-handler-step"), Some(&1));
        assert_eq!(r.stats.l1_exits.get("cr4-vmxe-write"), None);
    }
}
