//! Tracing nested VMX (issue #6): every VMCS data movement, every L2 exit,
//! every trapped VMX instruction and every L1/L2 run interval as a
//! `tracing` event or span; the options that turn them on (`--trace`,
//! `--trace-json`, `--record`, `--timeline`, `--dump-vmcs`) and the
//! commands that read what they wrote (`replay`, `timeline-svg`, `vmcs`).
//!
//! Targets (filter on them with any `tracing` subscriber):
//!
//! | target | level | what |
//! | --- | --- | --- |
//! | `nvmx::exit` | INFO | an L2 exit: reason, qualification, level, decision, explanation |
//! | `nvmx::field` | DEBUG | a VMCS field moved: `dir`, SDM name, encoding, old and new value |
//! | `nvmx::insn` | DEBUG | a VMX instruction of L1: operands and outcome |
//! | `nvmx::run` | DEBUG | spans `L1` / `L2` around each `KVM_RUN` of that level |
//!
//! With no subscriber interested, each hook costs one callsite check
//! (`tracing::enabled!`); the work behind it (vmcs12 copies and diffs,
//! operand formatting) is done only when the check passes.
//! [`disabled_hook_cost_ns`] measures what the checks cost per exit.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nested_exit::record::{self, Recording, RecordingMeta};
use nested_exit::{Decision, Exit, VcpuState};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;
use vmcs12::controls::ExitControls;
use vmcs12::snapshot::{decode_vmcs12, encode_vmcs12, SnapshotError};
use vmcs12::{FieldKind, Vmcs12, VmcsField};

use crate::devices::OutputSink;
use crate::nested::{FlushPending, Nested};
use crate::timeline::{self, SvgOptions, TimelineError, TimelineRecorder};

/// Target of L2 exit events.
pub const TARGET_EXIT: &str = "nvmx::exit";
/// Target of VMCS field events.
pub const TARGET_FIELD: &str = "nvmx::field";
/// Target of VMX instruction events.
pub const TARGET_INSN: &str = "nvmx::insn";
/// Target of the L1/L2 run spans.
pub const TARGET_RUN: &str = "nvmx::run";

/// A value printed as `0x...` (events carry hex strings, as the SDM does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A field encoding printed as `0x681e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding(pub u32);

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

/// Which way a VMCS field value moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// L1's VMWRITE into vmcs12 (old = the field before, new = after).
    Vmwrite,
    /// L1's VMREAD from vmcs12 (old = the destination before, new = the
    /// value read).
    Vmread,
    /// VM entry: a guest-state field of vmcs12 that L0 loads into the L2
    /// vCPU (prepare_vmcs02), when it differs from the previous entry.
    Vmcs12ToL2,
    /// VM exit: prepare_vmcs12 wrote L2's state and the exit information
    /// into vmcs12 (old = before the exit, new = after).
    L2ToVmcs12,
    /// VM exit: load_vmcs12_host_state gave L1's vCPU a host-state field
    /// (old = the vCPU's value before, new = after).
    HostToL1,
}

impl Direction {
    /// The `dir` value of the event (no spaces, so the text log stays
    /// `key=value`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Vmwrite => "vmwrite",
            Direction::Vmread => "vmread",
            Direction::Vmcs12ToL2 => "vmcs12->l2",
            Direction::L2ToVmcs12 => "l2->vmcs12",
            Direction::HostToL1 => "host->l1",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether VMCS field events are wanted now (the guard in front of every
/// vmcs12 copy and diff on the exit path).
#[inline]
pub fn fields_enabled() -> bool {
    tracing::enabled!(target: "nvmx::field", Level::DEBUG)
}

/// Whether VMX instruction events are wanted now.
#[inline]
pub fn insns_enabled() -> bool {
    tracing::enabled!(target: "nvmx::insn", Level::DEBUG)
}

/// One VMCS field moved.
#[inline]
pub fn field(dir: Direction, field: VmcsField, old: u64, new: u64) {
    tracing::debug!(
        target: "nvmx::field",
        dir = %dir,
        field = %field.name(),
        encoding = %Encoding(field.encoding()),
        old = %Hex(old),
        new = %Hex(new),
        "vmcs"
    );
}

/// One event per field that differs between `before` and `after` and
/// passes `keep`.
pub fn fields_diff(
    dir: Direction,
    before: &Vmcs12,
    after: &Vmcs12,
    keep: impl Fn(VmcsField) -> bool,
) -> usize {
    let mut n = 0;
    for (f, old, new) in before.diff(after) {
        if keep(f) {
            field(dir, f, old, new);
            n += 1;
        }
    }
    n
}

/// Guest-state fields: what L0 loads into the L2 vCPU at entry.
pub fn is_guest_state(f: VmcsField) -> bool {
    f.kind() == FieldKind::Guest
}

/// Reads one register of a vCPU state.
type StateValue = fn(&VcpuState) -> u64;

/// The host-state fields load_vmcs12_host_state always loads, with the
/// vCPU register each one lands in (SDM 28.5.1, 28.5.2). `HOST_CR4`'s
/// VMXE stays virtual (L0 clears it in the vCPU afterwards).
const HOST_FIELDS: &[(VmcsField, StateValue)] = &[
    (VmcsField::HOST_CR0, |s| s.cr0),
    (VmcsField::HOST_CR3, |s| s.cr3),
    (VmcsField::HOST_CR4, |s| s.cr4),
    (VmcsField::HOST_RSP, |s| s.gprs.regs[4]),
    (VmcsField::HOST_RIP, |s| s.rip),
    (VmcsField::HOST_ES_SELECTOR, |s| u64::from(s.es.selector)),
    (VmcsField::HOST_CS_SELECTOR, |s| u64::from(s.cs.selector)),
    (VmcsField::HOST_SS_SELECTOR, |s| u64::from(s.ss.selector)),
    (VmcsField::HOST_DS_SELECTOR, |s| u64::from(s.ds.selector)),
    (VmcsField::HOST_FS_SELECTOR, |s| u64::from(s.fs.selector)),
    (VmcsField::HOST_GS_SELECTOR, |s| u64::from(s.gs.selector)),
    (VmcsField::HOST_TR_SELECTOR, |s| u64::from(s.tr.selector)),
    (VmcsField::HOST_FS_BASE, |s| s.fs.base),
    (VmcsField::HOST_GS_BASE, |s| s.gs.base),
    (VmcsField::HOST_TR_BASE, |s| s.tr.base),
    (VmcsField::HOST_GDTR_BASE, |s| s.gdtr.base),
    (VmcsField::HOST_IDTR_BASE, |s| s.idtr.base),
    (VmcsField::HOST_IA32_SYSENTER_CS, |s| {
        u64::from(s.msrs.sysenter_cs)
    }),
    (VmcsField::HOST_IA32_SYSENTER_ESP, |s| s.msrs.sysenter_esp),
    (VmcsField::HOST_IA32_SYSENTER_EIP, |s| s.msrs.sysenter_eip),
];

/// The host-state MSR fields loaded only under a VM-exit control.
const HOST_MSR_FIELDS: &[(VmcsField, ExitControls, StateValue)] = &[
    (VmcsField::HOST_IA32_PAT, ExitControls::LOAD_PAT, |s| {
        s.msrs.pat
    }),
    (VmcsField::HOST_IA32_EFER, ExitControls::LOAD_EFER, |s| {
        s.msrs.efer
    }),
    (
        VmcsField::HOST_IA32_PERF_GLOBAL_CTRL,
        ExitControls::LOAD_PERF_GLOBAL_CTRL,
        |s| s.msrs.perf_global_ctrl,
    ),
];

/// The host-state fields vmcs12 gave L1's vCPU at a VM exit: one event
/// per field used (the MSR ones only when their "load" exit control is
/// set), old = the vCPU before, new = after. Returns the number of events.
pub fn host_state_loaded(vmcs12: &Vmcs12, before: &VcpuState, after: &VcpuState) -> usize {
    let mut n = 0;
    for (f, get) in HOST_FIELDS {
        field(Direction::HostToL1, *f, get(before), get(after));
        n += 1;
    }
    let controls = ExitControls::from_bits_truncate(vmcs12.get32(VmcsField::VM_EXIT_CONTROLS));
    for (f, control, get) in HOST_MSR_FIELDS {
        if controls.contains(*control) {
            field(Direction::HostToL1, *f, get(before), get(after));
            n += 1;
        }
    }
    n
}

/// An L2 exit and what L0 decided.
#[inline]
pub fn l2_exit(exit: &Exit, rip: u64, decision: &Decision) {
    tracing::info!(
        target: "nvmx::exit",
        level = %"L2",
        reason = %exit.name(),
        basic_reason = exit.basic_reason(),
        qualification = %Hex(exit.to_info().qualification),
        rip = %Hex(rip),
        handler = %if decision.reflects() { "L1" } else { "L0" },
        explanation = %decision.explanation,
        "L2 exit"
    );
}

/// A VM-entry failure reflected to L1 without running L2 (SDM 27.8).
#[inline]
pub fn entry_failure(exit: &Exit, rip: u64) {
    tracing::info!(
        target: "nvmx::exit",
        level = %"L2",
        reason = %exit.name(),
        basic_reason = exit.basic_reason(),
        qualification = %Hex(exit.to_info().qualification),
        rip = %Hex(rip),
        handler = %"L1",
        explanation = %"a VM-entry failure after the checks is reflected to L1 without decide (SDM 27.8)",
        "L2 exit"
    );
}

/// A VMX instruction of L1: `operands` and `outcome` in words.
#[inline]
pub fn vmx_insn(name: &str, rip: u64, operands: &str, outcome: &str) {
    tracing::debug!(
        target: "nvmx::insn",
        insn = %name,
        rip = %Hex(rip),
        operands = %operands,
        outcome = %outcome,
        "VMX instruction"
    );
}

/// The span of one L2 run interval (`KVM_RUN` of the L2 vCPU and L0's
/// handling of the exit it returned); `entry` numbers the VM entries.
#[inline]
pub fn l2_run_span(entry: u64) -> tracing::Span {
    tracing::debug_span!(target: "nvmx::run", "L2", entry)
}

/// The span of one L1 run interval (`KVM_RUN` of L1's vCPU).
#[inline]
pub fn l1_run_span() -> tracing::Span {
    tracing::debug_span!(target: "nvmx::run", "L1")
}

// ---------------------------------------------------------------------------
// Options and session
// ---------------------------------------------------------------------------

/// What `--trace` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum TraceSelection {
    /// L2 exits (reason, qualification, decision, explanation).
    Exits,
    /// VMCS field movements in all four directions.
    Fields,
    /// Exits, fields, VMX instructions, run spans and L0's debug log.
    All,
}

impl TraceSelection {
    /// The per-layer filter of this selection (warnings of L0 always pass).
    pub fn targets(self) -> Targets {
        let base = Targets::new()
            .with_target("l0_vmm", Level::WARN)
            .with_target("nested_exit", Level::WARN);
        match self {
            TraceSelection::Exits => base.with_target("nvmx::exit", Level::TRACE),
            TraceSelection::Fields => base.with_target("nvmx::field", Level::TRACE),
            TraceSelection::All => base
                .with_target("nvmx", Level::TRACE)
                .with_target("l0_vmm", Level::DEBUG)
                .with_target("nested_exit", Level::DEBUG),
        }
    }
}

/// The tracing options `demo`, `run` and `scenario` share.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TraceArgs {
    /// Print a readable trace to stderr: L2 exits, VMCS fields, or all.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub trace: Option<TraceSelection>,
    /// Write the trace as JSON lines to FILE (everything, or what --trace selects).
    #[arg(long, value_name = "FILE")]
    pub trace_json: Option<PathBuf>,
    /// Record every L2 exit to FILE for `l0-vmm replay`.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Write a Chrome trace-event timeline (L0/L1/L2 tracks) to FILE.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
    /// Write the current vmcs12 at the end of the run as a snapshot to FILE
    /// (`l0-vmm vmcs show FILE`).
    #[arg(long, value_name = "FILE")]
    pub dump_vmcs: Option<PathBuf>,
}

impl TraceArgs {
    /// Whether any option is given.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// Why tracing output could not be set up or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file could not be created or written.
    #[error("cannot {action} {path}: {source} (check the directory exists and is writable)")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A recording could not be written or read.
    #[error(transparent)]
    Record(#[from] record::RecordError),
    /// A timeline could not be written or read.
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// A vmcs12 snapshot could not be written or read.
    #[error("vmcs12 snapshot {path}: {source}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SnapshotError,
    },
    /// `--dump-vmcs` was given but L1 never made a VMCS current.
    #[error("--dump-vmcs {0}: L1 has no current VMCS at the end of the run, nothing written")]
    NoCurrentVmcs(PathBuf),
    /// `vmcs extract` named an exit the recording does not have.
    #[error("the recording has {records} exit records; exit #{seq} is not one of them")]
    NoSuchExit {
        /// Asked for.
        seq: u64,
        /// How many there are.
        records: usize,
    },
}

/// The tracing of one run: the installed subscriber (thread-local, so
/// in-process tests do not see each other's), and what to write at the end.
pub struct TraceSession {
    guard: Option<tracing::subscriber::DefaultGuard>,
    args: TraceArgs,
    description: String,
}

impl fmt::Debug for TraceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceSession")
            .field("subscriber", &self.guard.is_some())
            .field("args", &self.args)
            .finish()
    }
}

impl TraceSession {
    /// Installs the `--trace` / `--trace-json` subscriber for this thread
    /// (none when neither is given). `description` is what runs (stored in
    /// a recording).
    pub fn start(args: &TraceArgs, description: impl Into<String>) -> Result<Self, TraceError> {
        let text = args.trace.map(|sel| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_span_events(if sel == TraceSelection::All {
                    FmtSpan::CLOSE
                } else {
                    FmtSpan::NONE
                })
                .with_filter(sel.targets())
        });
        let json = match &args.trace_json {
            Some(path) => {
                let file = std::fs::File::create(path).map_err(|source| TraceError::Io {
                    action: "create",
                    path: path.clone(),
                    source,
                })?;
                let sel = args.trace.unwrap_or(TraceSelection::All);
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_writer(Mutex::new(file))
                        .with_filter(sel.targets()),
                )
            }
            None => None,
        };
        let guard = (text.is_some() || json.is_some()).then(|| {
            let subscriber = tracing_subscriber::registry().with(text).with(json);
            let guard = tracing::subscriber::set_default(subscriber);
            // See `capture`: no callsite keeps a stale "never".
            tracing::callsite::rebuild_interest_cache();
            guard
        });
        Ok(Self {
            guard,
            args: args.clone(),
            description: description.into(),
        })
    }

    /// The options.
    pub fn args(&self) -> &TraceArgs {
        &self.args
    }

    /// Gives `nested` its exit recorder (`--record`) and timeline
    /// recorder (`--timeline`).
    pub fn attach<V: FlushPending>(&self, nested: &mut Nested<V>) {
        if self.args.record.is_some() {
            nested.start_recording(RecordingMeta {
                producer: format!("l0-vmm {}", env!("CARGO_PKG_VERSION")),
                description: self.description.clone(),
            });
        }
        if self.args.timeline.is_some() {
            nested.start_timeline(TimelineRecorder::new());
        }
    }

    /// Writes the recording, the timeline and the vmcs12 snapshot, and
    /// removes the subscriber. Returns lines for L0's console (what was
    /// written, exits that could not be recorded).
    pub fn finish<V: FlushPending>(
        mut self,
        nested: &mut Nested<V>,
    ) -> Result<Vec<String>, TraceError> {
        self.guard.take();
        let mut notes = Vec::new();
        if let (Some(path), Some(rec)) = (&self.args.record, nested.take_recorder()) {
            for s in rec.skipped() {
                notes.push(format!("warning: {s}"));
            }
            rec.save(path)?;
            notes.push(format!(
                "recorded {} L2 exits to {}",
                rec.recording().records.len(),
                path.display()
            ));
        }
        if let (Some(path), Some(t)) = (&self.args.timeline, nested.take_timeline()) {
            let tl = t.finish();
            timeline::write_chrome_trace(&tl, path)?;
            notes.push(format!(
                "timeline ({} intervals, {} exits) written to {}",
                tl.intervals.len(),
                tl.exits.len(),
                path.display()
            ));
        }
        if let Some(path) = &self.args.dump_vmcs {
            let v = nested
                .current_vmcs12()
                .ok_or_else(|| TraceError::NoCurrentVmcs(path.clone()))?;
            write_snapshot(v, path)?;
            notes.push(format!("current vmcs12 written to {}", path.display()));
        }
        Ok(notes)
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// The commands that read what a traced run wrote.
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum ToolCommand {
    /// Re-run decide and prepare_vmcs12 on a recording (--record) without
    /// KVM; exit 0 only when every exit matches.
    Replay {
        /// The recording.
        file: PathBuf,
    },
    /// Draw a --timeline JSON file as an SVG picture.
    TimelineSvg {
        /// The timeline JSON.
        input: PathBuf,
        /// The SVG to write.
        output: PathBuf,
        /// Picture width in pixels.
        #[arg(long)]
        width: Option<f64>,
        /// Draw from this time on (µs since the start of the run).
        #[arg(long, value_name = "US")]
        start_us: Option<f64>,
        /// Draw up to this time (µs since the start of the run).
        #[arg(long, value_name = "US")]
        end_us: Option<f64>,
    },
    /// Show, compare or extract vmcs12 snapshots.
    Vmcs {
        /// What to do.
        #[command(subcommand)]
        command: VmcsCommand,
    },
}

/// `l0-vmm vmcs ...`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum VmcsCommand {
    /// Print every non-zero field of a snapshot.
    Show {
        /// A vmcs12 snapshot (--dump-vmcs, `vmcs extract`).
        snapshot: PathBuf,
    },
    /// Print the fields that differ (exit 0: identical, 1: they differ).
    Diff {
        /// First snapshot.
        a: PathBuf,
        /// Second snapshot.
        b: PathBuf,
    },
    /// Write the vmcs12 of one recorded exit as a snapshot.
    Extract {
        /// The recording.
        recording: PathBuf,
        /// The exit number (`exit #N` in replay and trace output).
        seq: u64,
        /// The vmcs12 before the exit (default: after it).
        #[arg(long)]
        before: bool,
        /// The snapshot to write.
        output: PathBuf,
    },
}

/// Exit status of a command that failed on its input (as `replay` on a
/// corrupted recording).
pub const EXIT_BAD_INPUT: i32 = 2;

/// Runs a [`ToolCommand`], printing through `sink`; returns the exit code.
pub fn run_tool(cmd: &ToolCommand, sink: &mut dyn OutputSink) -> i32 {
    match tool(cmd, sink) {
        Ok(code) => code,
        Err(e) => {
            sink.write_line(&format!("error: {e}"));
            EXIT_BAD_INPUT
        }
    }
}

fn tool(cmd: &ToolCommand, sink: &mut dyn OutputSink) -> Result<i32, TraceError> {
    match cmd {
        ToolCommand::Replay { file } => {
            let rec = Recording::load(file)?;
            let report = record::replay(&rec);
            sink.write_line(&format!(
                "recording {}: {} ({}), {} exits",
                file.display(),
                rec.meta.producer,
                rec.meta.description,
                rec.records.len()
            ));
            for line in report.to_string().lines() {
                sink.write_line(line);
            }
            Ok(if report.is_clean() { 0 } else { 1 })
        }
        ToolCommand::TimelineSvg {
            input,
            output,
            width,
            start_us,
            end_us,
        } => {
            let mut options = SvgOptions::default();
            if let Some(w) = width {
                options.width = *w;
            }
            let ns = |us: &f64| (us * 1000.0).max(0.0) as u64;
            options.start_ns = start_us.as_ref().map(ns);
            options.end_ns = end_us.as_ref().map(ns);
            timeline::timeline_svg_command(input, output, &options)?;
            sink.write_line(&format!("wrote {}", output.display()));
            Ok(0)
        }
        ToolCommand::Vmcs { command } => {
            match command {
                VmcsCommand::Show { snapshot } => {
                    let v = read_snapshot(snapshot)?;
                    for line in show_lines(&v) {
                        sink.write_line(&line);
                    }
                    Ok(0)
                }
                VmcsCommand::Diff { a, b } => {
                    let (va, vb) = (read_snapshot(a)?, read_snapshot(b)?);
                    let lines = diff_lines(&va, &vb);
                    for line in &lines {
                        sink.write_line(line);
                    }
                    if lines.is_empty() {
                        sink.write_line("identical");
                        Ok(0)
                    } else {
                        Ok(1)
                    }
                }
                VmcsCommand::Extract {
                    recording,
                    seq,
                    before,
                    output,
                } => {
                    let rec = Recording::load(recording)?;
                    let r = rec.records.iter().find(|r| r.seq == *seq).ok_or(
                        TraceError::NoSuchExit {
                            seq: *seq,
                            records: rec.records.len(),
                        },
                    )?;
                    let v = if *before {
                        &r.vmcs12_before
                    } else {
                        &r.vmcs12_after
                    };
                    write_snapshot(v, output)?;
                    sink.write_line(&format!(
                        "exit #{seq} ({}): vmcs12 {} written to {}",
                        r.reason_name(),
                        if *before { "before" } else { "after" },
                        output.display()
                    ));
                    Ok(0)
                }
            }
        }
    }
}

/// Writes `v` as a vmcs12 snapshot file.
pub fn write_snapshot(v: &Vmcs12, path: &Path) -> Result<(), TraceError> {
    let blob = encode_vmcs12(v).map_err(|source| TraceError::Snapshot {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, blob).map_err(|source| TraceError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a vmcs12 snapshot file.
pub fn read_snapshot(path: &Path) -> Result<Vmcs12, TraceError> {
    let blob = std::fs::read(path).map_err(|source| TraceError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    decode_vmcs12(&blob).map_err(|source| TraceError::Snapshot {
        path: path.to_path_buf(),
        source,
    })
}

/// `vmcs show`: one line per non-zero field (encoding, SDM name, value),
/// then how many fields are zero.
pub fn show_lines(v: &Vmcs12) -> Vec<String> {
    let mut out: Vec<String> = v
        .non_zero()
        .map(|(f, val)| format!("{:#06x} {:<40} {val:#x}", f.encoding(), f.name()))
        .collect();
    let zero = VmcsField::COUNT - out.len();
    out.push(format!(
        "{} non-zero fields, {zero} fields are zero",
        out.len()
    ));
    out
}

/// `vmcs diff`: one line per differing field (encoding, SDM name, A's
/// value, B's value).
pub fn diff_lines(a: &Vmcs12, b: &Vmcs12) -> Vec<String> {
    a.diff(b)
        .map(|(f, x, y)| format!("{:#06x} {:<40} {x:#x} -> {y:#x}", f.encoding(), f.name()))
        .collect()
}

// ---------------------------------------------------------------------------
// Capturing events in-process
// ---------------------------------------------------------------------------

/// One captured event: its target, level and fields as text (hex values
/// as the event wrote them, strings without quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedEvent {
    /// The target (`nvmx::field`, ...).
    pub target: String,
    /// The level.
    pub level: Level,
    /// Field name -> value; the message is under `message`.
    pub fields: std::collections::BTreeMap<String, String>,
    /// Names of the spans the event happened in, outermost first.
    pub spans: Vec<String>,
}

impl CapturedEvent {
    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct CaptureLayer(std::sync::Arc<Mutex<Vec<CapturedEvent>>>);

struct FieldText<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S> Layer<S> for CaptureLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = std::collections::BTreeMap::new();
        event.record(&mut FieldText(&mut fields));
        let spans = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().map(|s| s.name().to_string()).collect())
            .unwrap_or_default();
        if let Ok(mut v) = self.0.lock() {
            v.push(CapturedEvent {
                target: event.metadata().target().to_string(),
                level: *event.metadata().level(),
                fields,
                spans,
            });
        }
    }
}

/// Runs `f` with a subscriber on this thread that captures every
/// `nvmx::*` event (all levels) and returns them with `f`'s result (tests
/// and tools that want the events as data).
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<CapturedEvent>) {
    // One capture at a time in a process: two scoped subscribers that come
    // and go on parallel test threads race on tracing-core's interest cache.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let layer = CaptureLayer::default();
    let events = layer.0.clone();
    let subscriber = tracing_subscriber::registry()
        .with(layer.with_filter(Targets::new().with_target("nvmx", Level::TRACE)));
    let r = tracing::subscriber::with_default(subscriber, || {
        // A callsite first hit by another thread while this subscriber was
        // being registered can keep a cached "never" interest (a
        // tracing-core registration race); recompute them all now.
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let v = events.lock().map(|g| g.clone()).unwrap_or_default();
    (r, v)
}

// ---------------------------------------------------------------------------
// Cost with tracing off
// ---------------------------------------------------------------------------

/// Nanoseconds per exit that the hooks on one reflected L2 exit cost with
/// no subscriber interested: the L2 span, the exit event, the field and
/// instruction guards (`iterations` rounds, measured in this process).
/// Compare with the wall time per exit of a run (`RunStats.wall` / exits).
pub fn disabled_hook_cost_ns(iterations: u32) -> f64 {
    let exit = Exit::Hlt { len: 1 };
    let decision = Decision {
        disposition: nested_exit::decide::Disposition::ReflectToL1,
        explanation: String::from("HLT exits because L1 set \"HLT exiting\""),
    };
    let start = std::time::Instant::now();
    let mut taken = 0u64;
    for i in 0..iterations {
        let span = l2_run_span(u64::from(i)).entered();
        l2_exit(std::hint::black_box(&exit), u64::from(i), &decision);
        // One guard per direction a reflected exit crosses, plus the
        // instruction guard of the VMRESUME that follows.
        for _ in 0..3 {
            taken += u64::from(std::hint::black_box(fields_enabled()));
        }
        taken += u64::from(std::hint::black_box(insns_enabled()));
        drop(span);
    }
    let ns = start.elapsed().as_nanos() as f64;
    std::hint::black_box(taken);
    ns / f64::from(iterations.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fields_diff_emits_changed_fields_with_names_and_values() {
        let mut a = Vmcs12::new();
        a.set(VmcsField::GUEST_RIP, 0x1000);
        let mut b = a.clone();
        b.set(VmcsField::GUEST_RIP, 0x1002);
        b.set(VmcsField::VM_EXIT_REASON, 12);
        let (n, ev) = capture(|| {
            assert!(fields_enabled());
            fields_diff(Direction::L2ToVmcs12, &a, &b, |_| true)
        });
        assert_eq!(n, 2);
        assert_eq!(ev.len(), 2);
        let rip = ev
            .iter()
            .find(|e| e.get("field") == Some("GUEST_RIP"))
            .expect("GUEST_RIP event");
        assert_eq!(rip.target, TARGET_FIELD);
        assert_eq!(rip.get("dir"), Some("l2->vmcs12"));
        assert_eq!(rip.get("encoding"), Some("0x681e"));
        assert_eq!(rip.get("old"), Some("0x1000"));
        assert_eq!(rip.get("new"), Some("0x1002"));
    }

    #[test]
    fn test_fields_diff_keeps_only_selected_fields() {
        let a = Vmcs12::new();
        let mut b = a.clone();
        b.set(VmcsField::GUEST_RIP, 0x1002);
        b.set(VmcsField::HOST_RIP, 0x5000);
        let (n, ev) = capture(|| fields_diff(Direction::Vmcs12ToL2, &a, &b, is_guest_state));
        assert_eq!(n, 1);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].get("field"), Some("GUEST_RIP"));
    }

    #[test]
    fn test_guards_are_off_without_subscriber_and_follow_the_filter() {
        assert!(!fields_enabled());
        assert!(!insns_enabled());
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(TraceSelection::Exits.targets()),
        );
        tracing::subscriber::with_default(sub, || {
            assert!(!fields_enabled());
            assert!(tracing::enabled!(target: "nvmx::exit", Level::INFO));
        });
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(TraceSelection::Fields.targets()),
        );
        tracing::subscriber::with_default(sub, || {
            assert!(fields_enabled());
            assert!(!insns_enabled());
        });
    }

    #[test]
    fn test_host_state_events_follow_exit_controls() {
        let mut v = Vmcs12::new();
        let before = VcpuState::default();
        let mut after = before;
        after.rip = 0x7000;
        after.msrs.efer = 0x500;
        let (plain, ev) = capture(|| host_state_loaded(&v, &before, &after));
        assert_eq!(plain, HOST_FIELDS.len());
        assert!(!ev.iter().any(|e| e.get("field") == Some("HOST_IA32_EFER")));
        let rip = ev
            .iter()
            .find(|e| e.get("field") == Some("HOST_RIP"))
            .unwrap();
        assert_eq!(rip.get("new"), Some("0x7000"));
        assert_eq!(rip.get("old"), Some("0x0"));
        assert_eq!(rip.get("dir"), Some("host->l1"));
        v.set(
            VmcsField::VM_EXIT_CONTROLS,
            u64::from(ExitControls::LOAD_EFER.bits()),
        );
        let (with_efer, ev) = capture(|| host_state_loaded(&v, &before, &after));
        assert_eq!(with_efer, HOST_FIELDS.len() + 1);
        assert!(ev
            .iter()
            .any(|e| e.get("field") == Some("HOST_IA32_EFER") && e.get("new") == Some("0x500")));
    }

    #[test]
    fn test_exit_event_names_reason_decision_and_span() {
        let exit = Exit::Hlt { len: 1 };
        let decision = Decision {
            disposition: nested_exit::decide::Disposition::ReflectToL1,
            explanation: "HLT exiting".into(),
        };
        let ((), ev) = capture(|| {
            let _s = l2_run_span(3).entered();
            l2_exit(&exit, 0x1000, &decision);
        });
        assert_eq!(ev.len(), 1);
        let e = &ev[0];
        assert_eq!(e.target, TARGET_EXIT);
        assert_eq!(e.get("reason"), Some("HLT"));
        assert_eq!(e.get("basic_reason"), Some("12"));
        assert_eq!(e.get("handler"), Some("L1"));
        assert_eq!(e.get("explanation"), Some("HLT exiting"));
        assert_eq!(e.spans, vec!["L2".to_string()]);
    }

    #[test]
    fn test_vmcs_show_and_diff_name_fields() {
        let mut a = Vmcs12::new();
        a.set(VmcsField::GUEST_RIP, 0x1000);
        let lines = show_lines(&a);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("0x681e GUEST_RIP"), "{}", lines[0]);
        assert!(lines[0].ends_with("0x1000"));
        let mut b = a.clone();
        b.set(VmcsField::EXIT_QUALIFICATION, 0x3f80000);
        let d = diff_lines(&a, &b);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("EXIT_QUALIFICATION") && d[0].ends_with("0x0 -> 0x3f80000"));
        assert!(diff_lines(&a, &a).is_empty());
    }

    #[test]
    fn test_snapshot_files_round_trip_and_reject_garbage() {
        let dir = std::env::temp_dir().join(format!("h16-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("v.snap");
        let mut a = Vmcs12::new();
        a.set(VmcsField::HOST_RIP, 0xffff_8000_0000_1000);
        write_snapshot(&a, &p).unwrap();
        assert_eq!(read_snapshot(&p).unwrap(), a);
        std::fs::write(&p, b"not a snapshot at all, definitely").unwrap();
        let e = read_snapshot(&p).unwrap_err();
        assert!(matches!(e, TraceError::Snapshot { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_disabled_hooks_are_cheap_to_call() {
        // No timing assertion: only that the measurement runs and is finite.
        let ns = disabled_hook_cost_ns(1000);
        assert!(ns.is_finite());
    }
}
