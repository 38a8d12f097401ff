//! Booting: the built-in L1 hypervisor, the ELF64 and the Multiboot test
//! kernels (built by `tests/build.rs`), and what each sees of the platform
//! (docs/platform.md: command line, memory sizes, the VMX capability MSRs
//! through L0's MSR filter, the debug-exit code).

use std::sync::OnceLock;

use l0_vmm::l1_run::RunEnd;
use nested_tests::{boot, cached_l1, debug_exit_code, kvm_or_skip, Cached, Run};
use vmcs12::VmxCapabilities;

static DEMO: Cached = OnceLock::new();

fn demo() -> Option<&'static Run> {
    cached_l1(&DEMO, "demo")
}

fn elf64_kernel() -> Vec<u8> {
    std::fs::read(env!("TEST_KERNEL_ELF64")).expect("tests/build.rs built the ELF64 test kernel")
}

fn multiboot_kernel() -> Vec<u8> {
    std::fs::read(env!("TEST_KERNEL_MULTIBOOT"))
        .expect("tests/build.rs built the Multiboot test kernel")
}

#[test]
fn test_l1_boots_as_multiboot_and_prints() {
    let Some(run) = demo() else { return };
    let l0 = run.l0();
    assert!(
        l0.first()
            .is_some_and(|l| l.starts_with("loaded Multiboot kernel [0x100000, ")
                && l.ends_with(", 64 MiB RAM, cmdline \"test=demo\"")),
        "{}",
        run.dump()
    );
    let l1 = run.l1();
    assert_eq!(
        l1.first(),
        Some(&"L1: tiny VMX hypervisor"),
        "{}",
        run.dump()
    );
    // L1 read the command line and mem_upper from the Multiboot information.
    assert!(
        l1.contains(&"L1: cmdline \"test=demo\" memory 64 MiB"),
        "{}",
        run.dump()
    );
    // CPUID.1:ECX.VMX is set for L1 (docs/platform.md, CPUID).
    assert!(l1.contains(&"cpuid.1:ecx.vmx = 1"), "{}", run.dump());
    // KVM refuses CR4.VMXE on this host with #GP; L0 sees the fault at
    // L1's #GP handler (breakpoint), completes the write and keeps VMXE
    // virtual, so L1 sees its `mov cr4` succeed (docs/l1-intercepts.md).
    assert!(
        l1.iter().any(|l| l.starts_with("CR4.VMXE: set")),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.l1().last(),
        Some(&"L1: exit status 0"),
        "{}",
        run.dump()
    );
}

/// Every capability MSR L1 read through L0's MSR filter has the value of
/// the `vmcs12` model L0 is built on (IA32_FEATURE_CONTROL locked with
/// VMXON outside SMX = 0x5, SDM 23.7).
#[test]
fn test_l1_reads_the_vmx_msrs_of_the_model() {
    let Some(run) = demo() else { return };
    let caps = VmxCapabilities::l0_default();
    let mut seen = Vec::new();
    for line in run.l1() {
        let Some(rest) = line.strip_prefix("msr ") else {
            continue;
        };
        // msr NAME (0xIDX) = 0xVALUE
        let (_, rest) = rest.split_once(" (0x").expect("msr line format");
        let (index, value) = rest.split_once(") = 0x").expect("msr line format");
        let index = u32::from_str_radix(index, 16).expect("hex index");
        let value = u64::from_str_radix(value, 16).expect("hex value");
        assert_eq!(
            Some(value),
            caps.read_msr(index),
            "MSR {index:#x} as L1 read it differs from the model"
        );
        seen.push(index);
    }
    assert!(seen.contains(&0x3a), "IA32_FEATURE_CONTROL read: {seen:x?}");
    assert_eq!(caps.read_msr(0x3a), Some(0x5));
    // BASIC, the four TRUE_ controls (BASIC bit 55), secondary controls,
    // MISC, CR0/CR4 FIXED0/1 and EPT_VPID_CAP.
    for index in [
        0x480, 0x48d, 0x48e, 0x48f, 0x490, 0x48b, 0x485, 0x486, 0x487, 0x488, 0x489, 0x48c,
    ] {
        assert!(
            seen.contains(&index),
            "L1 did not print MSR {index:#x}: {seen:x?}"
        );
    }
}

#[test]
fn test_elf64_kernel_boots_in_64_bit_mode_with_cmdline_and_ram() {
    if !kvm_or_skip() {
        return;
    }
    let run = boot(&elf64_kernel(), "exit=5 hello world", 32).expect("boot");
    assert!(
        run.l0()
            .first()
            .is_some_and(|l| l.starts_with("loaded ELF64 kernel")),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.l1(),
        [
            "elf64 test kernel: hello from 64-bit mode, cmdline=\"exit=5 hello world\" ram=32 MiB exit=5"
        ],
        "{}",
        run.dump()
    );
    // isa-debug-exit: (5 << 1) | 1 = 11.
    assert_eq!(run.report.end, RunEnd::DebugExit(11), "{}", run.dump());
    assert_eq!(run.report.exit_code, debug_exit_code(5));
}

#[test]
fn test_multiboot_kernel_sees_cmdline_and_memory_sizes() {
    if !kvm_or_skip() {
        return;
    }
    let run = boot(&multiboot_kernel(), "exit=6 bar", 32).expect("boot");
    assert!(
        run.l0()
            .first()
            .is_some_and(|l| l.starts_with("loaded Multiboot kernel")),
        "{}",
        run.dump()
    );
    // Multiboot info: mem_lower = 639 KiB, mem_upper = (RAM - 1 MiB) / 1 KiB
    // = 31 * 1024 for 32 MiB (docs/platform.md).
    assert_eq!(
        run.l1(),
        [
            "multiboot test kernel: cmdline=\"exit=6 bar\"",
            "multiboot test kernel: mem_lower=639 KiB mem_upper=31744 KiB memory=32 MiB",
            "multiboot test kernel: exit status 6",
        ],
        "{}",
        run.dump()
    );
    assert_eq!(run.report.end, RunEnd::DebugExit(13), "{}", run.dump());
}

/// Default exit status and a different RAM size: the values move with the
/// options, so they are not hard-coded in the kernel or L0.
#[test]
fn test_multiboot_kernel_default_exit_and_other_ram_size() {
    if !kvm_or_skip() {
        return;
    }
    let run = boot(&multiboot_kernel(), "", 18).expect("boot");
    assert_eq!(
        run.l1(),
        [
            "multiboot test kernel: cmdline=\"\"",
            "multiboot test kernel: mem_lower=639 KiB mem_upper=17408 KiB memory=18 MiB",
            "multiboot test kernel: exit status 0",
        ],
        "{}",
        run.dump()
    );
    assert_eq!(run.report.end, RunEnd::DebugExit(debug_exit_code(0)));
    assert_eq!(run.report.exit_code, 1);
}

/// The run summary of a plain kernel: KVM_RUN counted, no L2 activity.
#[test]
fn test_plain_kernel_summary_has_no_nested_activity() {
    if !kvm_or_skip() {
        return;
    }
    let run = boot(&elf64_kernel(), "exit=1", 16).expect("boot");
    let s = &run.report.stats;
    assert!(s.l1_ioctls.kvm_run > 0, "{s:?}");
    assert!(s.l2_exits.is_empty(), "{s:?}");
    assert!(s.vmx_instructions.is_empty(), "{s:?}");
    assert_eq!(run.l1_exit_count("emulation-failure"), 0, "{s:?}");
    let l0 = run.l0();
    assert!(l0.contains(&"---- run summary ----"), "{}", run.dump());
    assert!(
        l0.iter()
            .any(|l| l.starts_with("end: debug exit: guest wrote 0x1 to port 0xf4")),
        "{}",
        run.dump()
    );
    assert_eq!(run.report.exit_code, 3);
}
