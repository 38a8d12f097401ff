//! The platform a kernel sees under `l0-vmm run` (issue #10, "The platform
//! L1 sees"; docs/platform.md): the Multiboot test kernel
//! `tests/kernels/platform.rs` reads fw_cfg, its command line (QEMU's
//! `-append`) and its first module (QEMU's `-initrd`), programs the local
//! APIC timer one-shot and periodic, takes the interrupts on its IDT, and
//! exits through port 0xf4 with a 32-bit write.
//!
//! The run is assembled from the same public pieces `cli::run_kernel`
//! uses (loader with modules, L1 VM with its irqchip, devices with fw_cfg,
//! `run_l1`), without nesting: the kernel executes no VMX instruction.

use std::sync::Arc;
use std::time::Duration;

use l0_vmm::devices::{CaptureSink, Devices};
use l0_vmm::hv::Vcpu;
use l0_vmm::kvm::{KvmVcpu, KvmVm};
use l0_vmm::l1_run::{run_l1, Platform, RunConfig, RunEnd, RunReport};
use l0_vmm::loader::{load_kernel_with_modules, BootModule, KernelFormat};
use l0_vmm::memory::GuestRam;
use l0_vmm::msr::VmxMsrHandler;
use l0_vmm::nested::Nested;
use l0_vmm::test_support::kvm_or_skip;
use vmcs12::VmxCapabilities;

const MEM_MIB: u64 = 64;

struct PlatformRun {
    report: RunReport,
    lines: Vec<String>,
    unhandled: Vec<String>,
}

impl PlatformRun {
    /// The kernel's `platform: ` lines, without prefixes.
    fn kernel(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("[L1] platform: "))
            .collect()
    }

    /// The kernel line starting with `key`.
    fn line(&self, key: &str) -> &str {
        self.kernel()
            .into_iter()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no `{key}` line in:\n{}", self.lines.join("\n")))
    }
}

fn boot(append: &str, initrd: Option<BootModule>) -> Option<PlatformRun> {
    if !kvm_or_skip() {
        return None;
    }
    let image = std::fs::read(env!("TEST_KERNEL_PLATFORM"))
        .expect("tests/build.rs built the platform test kernel");
    let ram = Arc::new(GuestRam::new(MEM_MIB << 20).expect("guest RAM"));
    let modules: Vec<BootModule> = initrd.into_iter().collect();
    let kernel = load_kernel_with_modules(&ram, &image, append, &modules).expect("loads");
    assert_eq!(kernel.format, KernelFormat::Multiboot);
    let caps = VmxCapabilities::l0_default();
    let vm = KvmVm::new_l1(ram.clone(), &caps).expect("L1 VM");
    let mut l1 = vm.create_vcpu(0).expect("vCPU");
    let base = l1.get_state().expect("state");
    l1.set_state(&kernel.entry_state(&base))
        .expect("entry state");
    let cap = CaptureSink::new();
    let mut devices = Devices::for_machine(Box::new(cap.clone()), ram.size(), 1);
    let vmx_msrs = VmxMsrHandler::new(caps);
    let mut platform = Platform {
        devices: &mut devices,
        vmx_msrs: &vmx_msrs,
        msrs: None,
    };
    let cfg = RunConfig {
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let report = run_l1(
        &mut l1,
        None::<&mut Nested<KvmVcpu>>,
        &ram,
        &mut platform,
        &cfg,
    );
    let unhandled = devices.unhandled_report();
    Some(PlatformRun {
        report,
        lines: cap.lines(),
        unhandled,
    })
}

fn initrd() -> BootModule {
    BootModule {
        bytes: b"hello from the initrd\nsecond line\n".to_vec(),
        string: "initrd.txt mode=test".into(),
    }
}

#[test]
fn test_platform_kernel_sees_qemu_conventions_fw_cfg_and_lapic_timer() {
    let Some(run) = boot("exit=5 console=ttyS0", Some(initrd())) else {
        return;
    };
    let dump = run.lines.join("\n");
    assert_eq!(run.report.end, RunEnd::DebugExit(11), "{dump}");
    assert_eq!(run.report.exit_code, 11, "(5 << 1) | 1 from a 32-bit OUT");
    assert_eq!(run.line("cmdline="), "cmdline=\"exit=5 console=ttyS0\"");
    assert_eq!(
        run.line("mem_lower="),
        format!("mem_lower=639 KiB mem_upper={} KiB", (MEM_MIB - 1) * 1024)
    );
    assert_eq!(run.line("fw_cfg signature="), "fw_cfg signature=QEMU");
    assert_eq!(run.line("fw_cfg id="), "fw_cfg id=1");
    assert_eq!(run.line("fw_cfg ram="), format!("fw_cfg ram={MEM_MIB} MiB"));
    assert_eq!(run.line("fw_cfg cpus="), "fw_cfg cpus=1");
    assert_eq!(run.line("fw_cfg unknown"), "fw_cfg unknown key=0x0");
    assert_eq!(run.line("modules="), "modules=1");
    let m = run.line("module[0] start=");
    assert!(
        m.ends_with(" len=34 string=\"initrd.txt mode=test\""),
        "{m}"
    );
    assert_eq!(
        run.line("module[0] first line="),
        "module[0] first line=\"hello from the initrd\""
    );
    assert_eq!(run.line("cpuid x2apic="), "cpuid x2apic=true");
    assert_eq!(run.line("lapic version="), "lapic version=0x14");
    assert_eq!(run.line("lapic icr"), "lapic icr idle after INIT/SIPI=true");
    assert_eq!(
        run.line("lapic one-shot"),
        "lapic one-shot ticks=1 fired=true current count=0"
    );
    let periodic = run.line("lapic periodic ticks=");
    let ticks: u32 = periodic
        .trim_start_matches("lapic periodic ticks=")
        .split(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        (3..6).contains(&ticks) && periodic.ends_with(" fired=true"),
        "{periodic}"
    );
    assert_eq!(run.line("exit status"), "exit status 5");
    assert!(
        run.unhandled.is_empty(),
        "the kernel only touches emulated ports: {:?}",
        run.unhandled
    );
}

#[test]
fn test_platform_kernel_without_initrd_has_no_module_and_exits_zero() {
    let Some(run) = boot("", None) else { return };
    let dump = run.lines.join("\n");
    assert_eq!(run.report.end, RunEnd::DebugExit(1), "{dump}");
    assert_eq!(run.line("cmdline="), "cmdline=\"\"");
    assert_eq!(run.line("modules="), "modules=0");
    assert!(
        !run.kernel().iter().any(|l| l.starts_with("module[0]")),
        "{dump}"
    );
}

#[test]
fn test_platform_kernel_touching_unemulated_things_is_listed_not_stopped() {
    let Some(run) = boot("unhandled exit=1", None) else {
        return;
    };
    let dump = run.lines.join("\n");
    assert_eq!(
        run.report.end,
        RunEnd::DebugExit(3),
        "the run goes on: {dump}"
    );
    assert_eq!(
        run.line("unhandled port"),
        "unhandled port 0x61=0xff mmio=0xffffffff msr #GP=1 value=0x0"
    );
    assert_eq!(run.report.stats.unhandled_ports.get(&0x61), Some(&1));
    assert!(
        run.unhandled
            .contains(&"unhandled port 0x61: 1 access".to_string()),
        "{:?}",
        run.unhandled
    );
    // The timer still works after the probes.
    assert_eq!(
        run.line("lapic one-shot"),
        "lapic one-shot ticks=1 fired=true current count=0"
    );
}

#[test]
fn test_fw_cfg_ram_size_follows_the_machine() {
    if !kvm_or_skip() {
        return;
    }
    // A second machine size: fw_cfg's RAM item is not a constant.
    let image = std::fs::read(env!("TEST_KERNEL_PLATFORM")).expect("built");
    let ram = Arc::new(GuestRam::new(32 << 20).expect("guest RAM"));
    let kernel = load_kernel_with_modules(&ram, &image, "", &[]).expect("loads");
    let caps = VmxCapabilities::l0_default();
    let vm = KvmVm::new_l1(ram.clone(), &caps).expect("L1 VM");
    let mut l1 = vm.create_vcpu(0).expect("vCPU");
    let base = l1.get_state().expect("state");
    l1.set_state(&kernel.entry_state(&base)).expect("entry");
    let cap = CaptureSink::new();
    let mut devices = Devices::for_machine(Box::new(cap.clone()), ram.size(), 1);
    let vmx_msrs = VmxMsrHandler::new(caps);
    let mut platform = Platform {
        devices: &mut devices,
        vmx_msrs: &vmx_msrs,
        msrs: None,
    };
    let cfg = RunConfig {
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let r = run_l1(
        &mut l1,
        None::<&mut Nested<KvmVcpu>>,
        &ram,
        &mut platform,
        &cfg,
    );
    assert_eq!(r.end, RunEnd::DebugExit(1));
    assert!(
        cap.lines()
            .iter()
            .any(|l| l == "[L1] platform: fw_cfg ram=32 MiB"),
        "{:?}",
        cap.lines()
    );
}

#[test]
fn test_run_cli_takes_append_initrd_and_reports_unhandled() {
    if !kvm_or_skip() {
        return;
    }
    let file = std::env::temp_dir().join(format!("l0-vmm-platform-initrd-{}", std::process::id()));
    std::fs::write(&file, b"initrd via the CLI\nrest\n").expect("temp file");
    let spec = format!("{} x=1", file.display());
    let cap = CaptureSink::new();
    let code = l0_vmm::cli::main_with_args(
        [
            "l0-vmm",
            "run",
            "--kernel",
            env!("TEST_KERNEL_PLATFORM"),
            "--mem",
            "64",
            "--timeout",
            "30",
            "--append",
            "unhandled exit=2",
            "--initrd",
            &spec,
            "--report-unhandled",
        ],
        Box::new(cap.clone()),
    );
    let _ = std::fs::remove_file(&file);
    let lines = cap.lines();
    let dump = lines.join("\n");
    assert_eq!(code, 5, "(2 << 1) | 1: {dump}");
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(has("[L1] platform: cmdline=\"unhandled exit=2\""), "{dump}");
    assert!(has("[L1] platform: fw_cfg ram=64 MiB"), "{dump}");
    assert!(
        has("[L1] platform: module[0] first line=\"initrd via the CLI\""),
        "{dump}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[L1] platform: module[0] start=")
                && l.ends_with(&format!(" len=24 string=\"{spec}\""))),
        "{dump}"
    );
    for want in [
        "[L0] unhandled port 0x61: 1 access",
        "[L0] unhandled mmio 0xfec00000: 1 access",
        "[L0] unhandled mmio 0xfec00010: 1 access",
        "[L0] unhandled msr 0x1234 read: 1 access",
    ] {
        assert!(has(want), "missing {want:?} in:\n{dump}");
    }
}

#[test]
fn test_run_cli_without_report_unhandled_prints_no_list() {
    if !kvm_or_skip() {
        return;
    }
    let cap = CaptureSink::new();
    let code = l0_vmm::cli::main_with_args(
        [
            "l0-vmm",
            "run",
            "--kernel",
            env!("TEST_KERNEL_PLATFORM"),
            "--timeout",
            "30",
            "--cmdline",
            "unhandled",
        ],
        Box::new(cap.clone()),
    );
    assert_eq!(code, 1);
    assert!(
        !cap.lines().iter().any(|l| l.starts_with("[L0] unhandled ")),
        "{:?}",
        cap.lines()
    );
    // A missing --initrd file is an error before the guest runs.
    let code = l0_vmm::cli::main_with_args(
        [
            "l0-vmm",
            "run",
            "--kernel",
            env!("TEST_KERNEL_PLATFORM"),
            "--initrd",
            "/nonexistent/initrd",
        ],
        Box::new(CaptureSink::new()),
    );
    assert_eq!(code, l0_vmm::l1_run::EXIT_ERROR);
}
