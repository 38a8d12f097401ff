//! The command line (`l0-vmm demo | run | fields`) and the in-process
//! entry points the end-to-end tests use ([`run_kernel`], [`main_with_args`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmcs12::{VmcsField, VmxCapabilities, VmxCpu};

use crate::devices::{Devices, OutputSink, StdoutSink};
use crate::hv::Vcpu;
use crate::kvm::{KvmError, KvmVm, SyncPolicy};
use crate::l1_image;
use crate::l1_run::{run_l1, Platform, RunConfig, RunReport, EXIT_ERROR};
pub use crate::l1_run::{ExitConvention, VmxTrapPath};
use crate::loader::{load_kernel_with_modules, BootModule, KernelFormat, LoadError};
use crate::memory::{GuestRam, MemoryError};
use crate::msr::VmxMsrHandler;
use crate::nested::Nested;
pub use crate::trace::{ToolCommand, TraceArgs};
use crate::trace::{TraceError, TraceSelection, TraceSession};

/// Default guest RAM in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Default timeout of `l0-vmm demo`, in seconds.
pub const DEFAULT_DEMO_TIMEOUT: u64 = 60;
/// Default of `--vmcall-watchdog-ms` ([`crate::nested::DEFAULT_VMCALL_WATCHDOG`]).
pub const DEFAULT_VMCALL_WATCHDOG_MS: u64 = 5;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "l0-vmm",
    version,
    about = "L0 VMM on KVM that emulates VMX for an L1 hypervisor"
)]
pub struct Cli {
    /// Log L0 internals to stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the built-in L1 hypervisor (Multiboot, command line `test=demo`).
    Demo {
        /// L1 test mode: the command line becomes `test=NAME`. Without it
        /// the demo runs `test=demo` (I/O reflection) and then `test=ept`
        /// (L2 on an EPT with holes that L1 fills on demand).
        #[arg(long)]
        test: Option<String>,
        /// End the run after SECS seconds.
        #[arg(long, default_value_t = DEFAULT_DEMO_TIMEOUT)]
        timeout: u64,
        /// RAM and VMX trap path.
        #[command(flatten)]
        machine: MachineArgs,
        /// Tracing, recording, timeline.
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Boot a kernel file (Multiboot v1 or ELF64).
    Run {
        /// The kernel.
        #[arg(long)]
        kernel: PathBuf,
        /// Kernel command line (QEMU's `-append`).
        #[arg(long, visible_alias = "append", default_value = "")]
        cmdline: String,
        /// First Multiboot module (QEMU's `-initrd`): "FILE [ARGS]"; the
        /// file is the first word, the module string all of it.
        #[arg(long, value_name = "FILE [ARGS]")]
        initrd: Option<String>,
        /// At the end, list every port, MMIO address and MSR the kernel
        /// touched that L0 does not emulate.
        #[arg(long)]
        report_unhandled: bool,
        /// End the run after SECS seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// RAM and VMX trap path.
        #[command(flatten)]
        machine: MachineArgs,
        /// Tracing, recording, timeline.
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Print the VMCS field catalogue.
    Fields {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run scenario files (docs/scenarios.md) on KVM: PASS/FAIL per file; exit status 0 only when all pass.
    Scenario {
        /// The scenario files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print a readable trace of every run to stderr: L2 exits, VMCS fields, or all.
        #[arg(long, value_enum, value_name = "WHAT")]
        trace: Option<TraceSelection>,
        /// Write the trace of every run as JSON lines to FILE.
        #[arg(long, value_name = "FILE")]
        trace_json: Option<PathBuf>,
    },
    /// Precise-mode bench (docs/precise-mode.md): L2 instructions retired per KVM exit with precise mode on and off.
    Bench,
    /// Replay, timeline-svg, vmcs.
    #[command(flatten)]
    Tools(ToolCommand),
}

/// The machine options `demo` and `run` share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct MachineArgs {
    /// Guest RAM in MiB (2-4096).
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// How L1's VMX instructions reach L0: KVM emulation-failure exits
    /// (`emulation`), or a #UD L0 injects, forwarded by L1's handler to the
    /// trap port 0x0e0e (`ud`).
    #[arg(long, value_enum, default_value_t = VmxTrapPath::EmulationFailure)]
    pub vmx_trap: VmxTrapPath,
    /// VMCALL watchdog (docs/vmcall-watchdog.md): a vCPU still inside
    /// KVM_RUN after MS milliseconds is kicked, and a VMCALL at its RIP
    /// becomes exit 18 (L2) or the SDM outcome (L1); 0 turns it off.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_VMCALL_WATCHDOG_MS)]
    pub vmcall_watchdog_ms: u64,
}

impl MachineArgs {
    /// Boot options for `cmdline`, `timeout` and `exit_convention` on this
    /// machine.
    fn boot_options(
        self,
        cmdline: String,
        timeout: Option<Duration>,
        exit_convention: ExitConvention,
    ) -> BootOptions {
        BootOptions {
            mem_mib: self.mem,
            cmdline,
            timeout,
            vmx_trap: self.vmx_trap,
            exit_convention,
            trace: TraceArgs::default(),
            initrd: None,
            report_unhandled: false,
            vmcall_watchdog: (self.vmcall_watchdog_ms > 0)
                .then(|| Duration::from_millis(self.vmcall_watchdog_ms)),
        }
    }
}

/// Errors before the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel could not be loaded.
    #[error("cannot load the kernel: {0}")]
    Load(#[from] LoadError),
    /// KVM setup.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The kernel file could not be read.
    #[error("cannot read kernel file {path}: {source}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A trace, recording, timeline or snapshot file.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// --mem out of range.
    #[error("--mem {0} MiB is out of range: use 2 to 4096 (an even number)")]
    BadMem(u64),
    /// `demo` was asked to run no L1 test mode.
    #[error("the demo has no part to run: pass --test NAME (see docs/l1-guest.md)")]
    NoDemoPart,
}

/// What to boot and how. Build it with `..Default::default()`: fields
/// may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// Run timeout.
    pub timeout: Option<Duration>,
    /// How L1's VMX instructions reach L0.
    pub vmx_trap: VmxTrapPath,
    /// How the end of the run maps to [`RunReport::exit_code`].
    pub exit_convention: ExitConvention,
    /// `--trace`, `--trace-json`, `--record`, `--timeline`, `--dump-vmcs`.
    pub trace: TraceArgs,
    /// `--initrd`: the first Multiboot module.
    pub initrd: Option<BootModule>,
    /// `--report-unhandled`: list what the guest touched that L0 does not
    /// emulate at the end of the run.
    pub report_unhandled: bool,
    /// `--vmcall-watchdog-ms`: kick L1's and L2's vCPUs after this long
    /// in KVM_RUN to catch a VMCALL (`None`: off).
    pub vmcall_watchdog: Option<Duration>,
}

impl Default for BootOptions {
    /// 128 MiB, empty command line, no timeout, emulation-failure path,
    /// QEMU exit codes.
    fn default() -> Self {
        Self {
            mem_mib: DEFAULT_MEM_MIB,
            cmdline: String::new(),
            timeout: None,
            vmx_trap: VmxTrapPath::default(),
            exit_convention: ExitConvention::default(),
            trace: TraceArgs::default(),
            initrd: None,
            report_unhandled: false,
            vmcall_watchdog: Some(crate::nested::DEFAULT_VMCALL_WATCHDOG),
        }
    }
}

/// Boots `image` in a fresh L1 VM (with nesting) and runs it to the end,
/// printing through `sink`.
pub fn run_kernel(
    image: &[u8],
    opts: &BootOptions,
    sink: Box<dyn OutputSink>,
) -> Result<RunReport, VmmError> {
    if !(2..=4096).contains(&opts.mem_mib) || !opts.mem_mib.is_multiple_of(2) {
        return Err(VmmError::BadMem(opts.mem_mib));
    }
    let ram = Arc::new(GuestRam::new(opts.mem_mib << 20)?);
    let kernel = load_kernel_with_modules(&ram, image, &opts.cmdline, opts.initrd.as_slice())?;
    let caps = VmxCapabilities::l0_default();
    let l1_vm = KvmVm::new_l1(ram.clone(), &caps)?;
    let mut l1 = l1_vm.create_vcpu(0)?;
    // Nothing L0 does with L1's state reads its SYSENTER/PAT/DEBUGCTL/
    // KERNEL_GS_BASE MSRs or debug registers (VMX instructions do not, and a
    // VM exit loads them from vmcs12's host state), so `get_state` skips
    // those two ioctls; writes stay exact (see `SyncPolicy`). L2's vCPU
    // keeps the exact policy: prepare_vmcs12 saves its MSRs.
    l1.set_sync_policy(SyncPolicy {
        msrs: false,
        debugregs: false,
    });
    let base = l1.get_state()?;
    l1.set_state(&kernel.entry_state(&base))?;
    let l2_vm = KvmVm::new_l2(ram.clone())?;
    l2_vm.filter_all_msrs()?;
    let l2 = l2_vm.create_vcpu(0)?;
    let l2_counters = l2.counter_handle();
    // KVM's own MSR emulation answers L2's MSR accesses that L1 does not
    // intercept: a vCPU of a third VM without a filter.
    let msr_vm = KvmVm::new_l2(ram.clone())?;
    let mut msr_vcpu = msr_vm.create_vcpu(0)?;
    let mut nested = Nested::new(VmxCpu::new(caps.clone()), l2);
    // A VMCALL hangs KVM_RUN on this host: kick both vCPUs after a while.
    l1.set_kick_after(opts.vmcall_watchdog)?;
    nested.set_vmcall_watchdog(opts.vmcall_watchdog);
    // Nested rebuilds the L2 VM's memslots from L1's EPT.
    nested.attach_l2_vm(l2_vm);
    // L1's local APIC, polled while L2 runs: L1's timer interrupts exit to
    // L1 or are delivered in L2 (external-interrupt exiting).
    if l1_vm.irqchip() != crate::kvm::IrqChip::None {
        nested.attach_l1_lapic(Box::new(l1.lapic_handle()?));
    }
    // fw_cfg reports the machine: RAM size and one CPU.
    let mut devices = Devices::for_machine(sink, ram.size(), 1);
    let format = match kernel.format {
        KernelFormat::Multiboot => "Multiboot",
        KernelFormat::Elf64 => "ELF64",
    };
    devices.console.l0_line(&format!(
        "loaded {format} kernel [{:#x}, {:#x}), entry {:#x}, {} MiB RAM, cmdline {:?}",
        kernel.image.0, kernel.image.1, kernel.entry, opts.mem_mib, opts.cmdline
    ));
    let vmx_msrs = VmxMsrHandler::new(caps);
    let mut platform = Platform {
        devices: &mut devices,
        vmx_msrs: &vmx_msrs,
        msrs: Some(&mut msr_vcpu),
    };
    let cfg = RunConfig {
        timeout: opts.timeout,
        l2_counters: Some(l2_counters),
        vmx_trap: opts.vmx_trap,
        exit_convention: opts.exit_convention,
    };
    let session = TraceSession::start(&opts.trace, format!("cmdline {:?}", opts.cmdline))?;
    session.attach(&mut nested);
    let report = run_l1(&mut l1, Some(&mut nested), &ram, &mut platform, &cfg);
    for line in session.finish(&mut nested)? {
        devices.console.l0_line(&line);
    }
    if opts.report_unhandled {
        let lines = devices.unhandled_report();
        if lines.is_empty() {
            devices
                .console
                .l0_line("unhandled: none (every port, MMIO address and MSR touched is emulated)");
        }
        for line in lines {
            devices.console.l0_line(&line);
        }
    }
    devices.console.flush();
    Ok(report)
}

/// One line per field: encoding, name, width, kind, access.
pub fn fields_table() -> String {
    let mut s = format!(
        "{:<8} {:<40} {:<8} {:<10} {}\n",
        "encoding", "name", "width", "kind", "access"
    );
    for f in VmcsField::ALL {
        s.push_str(&format!(
            "{:#06x}   {:<40} {:<8} {:<10} {}\n",
            f.encoding(),
            f.name(),
            f.width().name(),
            f.kind().name(),
            if f.is_read_only() {
                "read-only"
            } else {
                "read-write"
            }
        ));
    }
    s
}

/// The catalogue as a JSON array of objects.
pub fn fields_json() -> String {
    let v: Vec<serde_json::Value> = VmcsField::ALL
        .iter()
        .map(|f| {
            serde_json::json!({
                "encoding": format!("{:#06x}", f.encoding()),
                "name": f.name(),
                "width": f.width().name(),
                "kind": f.kind().name(),
                "read_only": f.is_read_only(),
                "description": f.description(),
            })
        })
        .collect();
    serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("\"JSON error: {e}\""))
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the CLI with `args` (including the program name), printing guest
/// output to `sink`; returns the process exit code.
pub fn main_with_args<I, T>(args: I, sink: Box<dyn OutputSink>) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.verbose);
    let mut sink = sink;
    let result = match cli.command {
        Command::Fields { json } => {
            let text = if json { fields_json() } else { fields_table() };
            for line in text.lines() {
                sink.write_line(line);
            }
            return 0;
        }
        Command::Tools(tool) => return crate::trace::run_tool(&tool, &mut *sink),
        Command::Bench => return crate::bench::run(&mut *sink),
        Command::Scenario {
            files,
            trace,
            trace_json,
        } => {
            // One subscriber for all the runs (each run_kernel inside gets
            // no trace options, so it keeps this one).
            let args = TraceArgs {
                trace,
                trace_json,
                ..TraceArgs::default()
            };
            let _session = match TraceSession::start(&args, "scenario") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("[L0] error: {e}");
                    return EXIT_ERROR;
                }
            };
            return crate::scenario::run_files(&files, &mut *sink);
        }
        Command::Demo {
            test,
            timeout,
            machine,
            trace,
        } => {
            let parts: Vec<String> = match test {
                Some(t) => vec![t],
                None => DEMO_PARTS.iter().map(|p| p.to_string()).collect(),
            };
            run_demo_parts(&parts, timeout, machine, trace, sink)
        }
        Command::Run {
            kernel,
            cmdline,
            initrd,
            report_unhandled,
            timeout,
            machine,
            trace,
        } => match (
            std::fs::read(&kernel),
            initrd.as_deref().map(BootModule::from_spec).transpose(),
        ) {
            (Ok(image), Ok(initrd)) => run_kernel(
                &image,
                &BootOptions {
                    trace,
                    initrd,
                    report_unhandled,
                    ..machine.boot_options(
                        cmdline,
                        timeout.map(Duration::from_secs),
                        ExitConvention::Qemu,
                    )
                },
                sink,
            ),
            (Err(source), _) => Err(VmmError::ReadKernel {
                path: kernel,
                source,
            }),
            (_, Err(e)) => Err(VmmError::Load(e)),
        },
    };
    match result {
        Ok(report) => report.exit_code,
        Err(e) => {
            eprintln!("[L0] error: {e}");
            EXIT_ERROR
        }
    }
}

/// The L1 test modes `l0-vmm demo` runs when no `--test` is given: I/O
/// reflection first, then nested EPT with pages L1 maps on demand.
pub const DEMO_PARTS: [&str; 2] = ["demo", "ept"];

/// One output sink shared by the runs of a multi-part `demo`.
#[derive(Clone)]
struct SharedSink(std::sync::Arc<std::sync::Mutex<Box<dyn OutputSink>>>);

impl OutputSink for SharedSink {
    fn write_line(&mut self, line: &str) {
        if let Ok(mut sink) = self.0.lock() {
            sink.write_line(line);
        }
    }
}

/// Runs the built-in L1 once per mode in `parts`, stopping at the first
/// part that fails; the report of the last run decides the exit code.
/// With several parts, the trace files (`--trace-json`, `--record`,
/// `--timeline`, `--dump-vmcs`) are written for the first part only, so
/// one run never overwrites another's file.
fn run_demo_parts(
    parts: &[String],
    timeout: u64,
    machine: MachineArgs,
    trace: TraceArgs,
    sink: Box<dyn OutputSink>,
) -> Result<RunReport, VmmError> {
    let shared = SharedSink(std::sync::Arc::new(std::sync::Mutex::new(sink)));
    let mut last = None;
    for (i, part) in parts.iter().enumerate() {
        let trace = if i == 0 {
            trace.clone()
        } else {
            TraceArgs {
                trace: trace.trace,
                ..TraceArgs::default()
            }
        };
        if parts.len() > 1 {
            let mut out = shared.clone();
            out.write_line(&format!(
                "[L0] ==== demo part {}/{}: built-in L1 with test={part} ====",
                i + 1,
                parts.len()
            ));
            if i > 0 && trace != TraceArgs::default() {
                out.write_line("[L0] (trace files were written for part 1; use --test NAME to trace another part)");
            }
        }
        let report = run_kernel(
            l1_image::L1_GUEST_ELF,
            &BootOptions {
                trace,
                ..machine.boot_options(
                    format!("test={part}"),
                    Some(Duration::from_secs(timeout)),
                    ExitConvention::Demo,
                )
            },
            Box::new(shared.clone()),
        )?;
        let failed = report.exit_code != 0;
        last = Some(report);
        if failed {
            break;
        }
    }
    last.ok_or(VmmError::NoDemoPart)
}

/// The binary's entry: `std::env::args`, stdout.
pub fn main() -> i32 {
    main_with_args(std::env::args_os(), Box::new(StdoutSink))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::CaptureSink;
    use crate::loader::images::elf64;
    use crate::test_support::kvm_or_skip;

    #[test]
    fn test_fields_table_lists_every_field() {
        let t = fields_table();
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), VmcsField::COUNT + 1);
        let g = lines
            .iter()
            .find(|l| l.contains(" GUEST_CR0 "))
            .expect("GUEST_CR0 listed");
        assert!(g.starts_with("0x6800"), "{g}");
        assert!(g.contains("natural") && g.contains("guest") && g.contains("read-write"));
        let r = lines
            .iter()
            .find(|l| l.contains(" VM_EXIT_REASON "))
            .expect("VM_EXIT_REASON listed");
        assert!(r.starts_with("0x4402") && r.contains("exit-info") && r.contains("read-only"));
    }

    #[test]
    fn test_fields_json_round_trips() {
        let v: serde_json::Value = serde_json::from_str(&fields_json()).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), VmcsField::COUNT);
        let f = a
            .iter()
            .find(|o| o["name"] == "VMCS_LINK_POINTER")
            .expect("VMCS_LINK_POINTER present");
        assert_eq!(f["encoding"], "0x2800");
        assert_eq!(f["width"], "64");
        assert_eq!(f["kind"], "guest");
        assert_eq!(f["read_only"], false);
        let r = a
            .iter()
            .find(|o| o["name"] == "EXIT_QUALIFICATION")
            .unwrap();
        assert_eq!(r["read_only"], true);
    }

    #[test]
    fn test_cli_parses_subcommands() {
        let c = Cli::try_parse_from([
            "l0-vmm",
            "run",
            "--kernel",
            "k",
            "--mem",
            "64",
            "--cmdline",
            "a b",
            "--timeout",
            "5",
        ])
        .unwrap();
        match c.command {
            Command::Run {
                kernel,
                cmdline,
                timeout,
                machine,
                trace,
                ..
            } => {
                assert_eq!(trace, TraceArgs::default());
                assert_eq!(kernel, PathBuf::from("k"));
                assert_eq!((cmdline.as_str(), timeout), ("a b", Some(5)));
                assert_eq!(
                    machine,
                    MachineArgs {
                        mem: 64,
                        vmx_trap: VmxTrapPath::EmulationFailure,
                        vmcall_watchdog_ms: DEFAULT_VMCALL_WATCHDOG_MS,
                    }
                );
            }
            c => panic!("parsed {c:?}"),
        }
        assert!(
            Cli::try_parse_from(["l0-vmm", "run"]).is_err(),
            "--kernel is required"
        );
        assert!(matches!(
            Cli::try_parse_from(["l0-vmm", "fields", "--json"])
                .unwrap()
                .command,
            Command::Fields { json: true }
        ));
    }

    #[test]
    fn test_run_kernel_rejects_bad_mem_and_bad_files() {
        let sink = || Box::new(CaptureSink::new());
        let opts = |mem| BootOptions {
            mem_mib: mem,
            ..Default::default()
        };
        assert!(matches!(
            run_kernel(&[], &opts(3), sink()),
            Err(VmmError::BadMem(3))
        ));
        assert!(matches!(
            run_kernel(&[], &opts(8192), sink()),
            Err(VmmError::BadMem(8192))
        ));
        assert!(matches!(
            run_kernel(b"not a kernel", &opts(16), sink()),
            Err(VmmError::Load(LoadError::UnknownFormat))
        ));
        let code = main_with_args(
            ["l0-vmm", "run", "--kernel", "/nonexistent/kernel"],
            Box::new(CaptureSink::new()),
        );
        assert_eq!(code, EXIT_ERROR);
    }

    #[test]
    fn test_run_kernel_elf64_prints_and_exits() {
        if !kvm_or_skip() {
            return;
        }
        // mov dx, 0x3f8; mov al, 'o'; out dx, al; mov al, 'k'; out dx, al;
        // mov al, 10; out dx, al; mov al, 0x15; out 0xf4, al
        let code = [
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0xb0, 10, 0xee, 0xb0, 0x15,
            0xe6, 0xf4, 0xf4,
        ];
        let cap = CaptureSink::new();
        let r = run_kernel(
            &elf64(0x20_0000, &code, 0),
            &BootOptions {
                mem_mib: 16,
                cmdline: "x".into(),
                timeout: Some(Duration::from_secs(10)),
                ..Default::default()
            },
            Box::new(cap.clone()),
        )
        .unwrap();
        assert_eq!(r.end.exit_code(), 0x2b);
        let lines = cap.lines();
        assert!(lines.iter().any(|l| l == "[L1] ok"), "{lines:?}");
        assert!(lines[0].starts_with("[L0] loaded ELF64 kernel"));
    }

    #[test]
    fn test_run_kernel_multiboot_gets_magic_and_memory_info() {
        if !kvm_or_skip() {
            return;
        }
        // 32-bit: cmp eax, 0x2badb002; jne hlt; mov eax, [ebx+8]
        // (mem_upper); shr eax, 10; out 0xf4, eax; hlt
        let code = [
            0x3d, 0x02, 0xb0, 0xad, 0x2b, 0x75, 0x08, 0x8b, 0x43, 0x08, 0xc1, 0xe8, 0x0a, 0xe7,
            0xf4, 0xf4,
        ];
        let r = run_kernel(
            &crate::loader::images::multiboot_kludge(0x10_0000, &code, 0),
            &BootOptions {
                mem_mib: 16,
                timeout: Some(Duration::from_secs(10)),
                ..Default::default()
            },
            Box::new(CaptureSink::new()),
        )
        .unwrap();
        // mem_upper = 15 MiB in KiB; >> 10 = 15; exit code (15 << 1) | 1.
        assert_eq!(r.end, crate::l1_run::RunEnd::DebugExit(31));
    }

    #[test]
    fn test_run_kernel_timeout_ends_a_spinning_guest() {
        if !kvm_or_skip() {
            return;
        }
        // jmp $
        let cap = CaptureSink::new();
        let r = run_kernel(
            &elf64(0x20_0000, &[0xeb, 0xfe], 0),
            &BootOptions {
                mem_mib: 16,
                timeout: Some(Duration::from_millis(200)),
                ..Default::default()
            },
            Box::new(cap),
        )
        .unwrap();
        assert_eq!(r.end.exit_code(), crate::l1_run::EXIT_TIMEOUT);
    }

    #[test]
    fn test_cli_parses_vmx_trap_path() {
        let demo = |args: &[&str]| {
            let mut v = vec!["l0-vmm", "demo"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).map(|c| c.command) {
                Ok(Command::Demo { machine, .. }) => Ok(machine.vmx_trap),
                Ok(c) => panic!("parsed {c:?}"),
                Err(e) => Err(e),
            }
        };
        assert_eq!(demo(&[]).unwrap(), VmxTrapPath::EmulationFailure);
        assert_eq!(
            demo(&["--vmx-trap", "emulation"]).unwrap(),
            VmxTrapPath::EmulationFailure
        );
        assert_eq!(
            demo(&["--vmx-trap", "ud"]).unwrap(),
            VmxTrapPath::InvalidOpcode
        );
        assert!(demo(&["--vmx-trap", "int3"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["l0-vmm", "run", "--kernel", "k", "--vmx-trap", "ud"])
                .unwrap()
                .command,
            Command::Run {
                machine: MachineArgs {
                    vmx_trap: VmxTrapPath::InvalidOpcode,
                    ..
                },
                ..
            }
        ));
        assert_eq!(
            BootOptions::default().vmx_trap,
            VmxTrapPath::EmulationFailure
        );
        assert_eq!(BootOptions::default().exit_convention, ExitConvention::Qemu);
    }

    #[test]
    fn test_fields_go_through_the_sink() {
        let cap = CaptureSink::new();
        assert_eq!(
            main_with_args(["l0-vmm", "fields"], Box::new(cap.clone())),
            0
        );
        let lines = cap.lines();
        assert_eq!(lines.len(), VmcsField::COUNT + 1);
        assert!(lines[0].starts_with("encoding"), "{lines:?}");
        let cap = CaptureSink::new();
        assert_eq!(
            main_with_args(["l0-vmm", "fields", "--json"], Box::new(cap.clone())),
            0
        );
        let v: serde_json::Value = serde_json::from_str(&cap.lines().join("\n")).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(VmcsField::COUNT));
    }

    /// `l0-vmm demo` in-process: (exit code, lines).
    fn demo(args: &[&str]) -> (i32, Vec<String>) {
        let cap = CaptureSink::new();
        let mut v = vec!["l0-vmm", "demo", "--mem", "32", "--timeout", "30"];
        v.extend_from_slice(args);
        (main_with_args(v, Box::new(cap.clone())), cap.lines())
    }

    /// A count row of the summary (`[L0] NAME ... N`).
    fn row(lines: &[String], key: &str) -> u64 {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("[L0] "))
            .find(|l| l.split_whitespace().next() == Some(key))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn test_demo_exit_code_is_zero_only_when_l1_passes() {
        if !kvm_or_skip() {
            return;
        }
        let (code, lines) = demo(&[]);
        assert_eq!(code, 0, "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l == "[L1] result test=demo: 6 passed, 0 failed"));
        assert!(lines.iter().any(|l| l == "[L0] exit code: 0"));
        assert_eq!(row(&lines, "vmx-trap-port"), 0);
        // An unknown test mode: L1 writes EXIT_STATUS_FAIL (1) -> 3.
        let (code, lines) = demo(&["--test", "no-such-test"]);
        assert_eq!(code, 3, "{lines:#?}");
    }

    #[test]
    fn test_demo_without_test_runs_io_reflection_then_ept_parts() {
        if !kvm_or_skip() {
            return;
        }
        let (code, lines) = demo(&[]);
        assert_eq!(code, 0, "{lines:#?}");
        let pos = |needle: &str| {
            lines
                .iter()
                .position(|l| l == needle)
                .unwrap_or_else(|| panic!("no line {needle:?} in {lines:#?}"))
        };
        let p1 = pos("[L0] ==== demo part 1/2: built-in L1 with test=demo ====");
        let r1 = pos("[L1] result test=demo: 6 passed, 0 failed");
        let p2 = pos("[L0] ==== demo part 2/2: built-in L1 with test=ept ====");
        let r2 = pos("[L1] result test=ept: 48 passed, 0 failed");
        assert!(p1 < r1 && r1 < p2 && p2 < r2, "{lines:#?}");
        // A single part when --test is given.
        let (code, lines) = demo(&["--test", "demo"]);
        assert_eq!(code, 0, "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("==== demo part")));
    }

    #[test]
    fn test_cli_vmcall_watchdog_option() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["l0-vmm", "demo"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).unwrap().command {
                Command::Demo { machine, .. } => {
                    machine
                        .boot_options(String::new(), None, ExitConvention::Demo)
                        .vmcall_watchdog
                }
                c => panic!("parsed {c:?}"),
            }
        };
        assert_eq!(parse(&[]), Some(Duration::from_millis(5)));
        assert_eq!(BootOptions::default().vmcall_watchdog, parse(&[]));
        assert_eq!(
            parse(&["--vmcall-watchdog-ms", "2"]),
            Some(Duration::from_millis(2))
        );
        assert_eq!(parse(&["--vmcall-watchdog-ms", "0"]), None);
        assert!(Cli::try_parse_from(["l0-vmm", "demo", "--vmcall-watchdog-ms", "x"]).is_err());
    }

    /// `--vmx-trap ud`: every VMX instruction's emulation failure becomes a
    /// #UD in L1, comes back on the trap port and is emulated from there.
    #[test]
    fn test_demo_and_vmx_errors_pass_on_the_ud_trap_path() {
        if !kvm_or_skip() {
            return;
        }
        // vmx-errors: `vmcall-outside-vmx` gets its #UD through the VMCALL
        // watchdog (KVM hangs on VMCALL); L1's handler offers that #UD on
        // the trap port too and L0 leaves it alone.
        for (mode, result, vmcall_uds) in [
            ("demo", "[L1] result test=demo: 6 passed, 0 failed", 0),
            (
                "vmx-errors",
                "[L1] result test=vmx-errors: 44 passed, 0 failed",
                1,
            ),
        ] {
            let (code, lines) = demo(&["--test", mode, "--vmx-trap", "ud"]);
            assert_eq!(code, 0, "{mode}: {lines:#?}");
            assert!(lines.iter().any(|l| l == result), "{lines:#?}");
            let injected = row(&lines, "vmx-ud-injected");
            assert!(injected > 10, "{lines:#?}");
            assert_eq!(row(&lines, "emulation-failure"), injected, "{lines:#?}");
            assert_eq!(
                row(&lines, "vmx-trap-port"),
                injected + vmcall_uds,
                "{lines:#?}"
            );
            let by_path = lines
                .iter()
                .find_map(|l| l.strip_prefix("[L0] VMX instructions by path: "))
                .expect("by-path line");
            assert_eq!(
                by_path,
                format!("emulation-failure exit 0, #UD trap port {injected}"),
                "{lines:#?}"
            );
        }
    }
}
