//! `test=vmx-errors`: every VMX instruction outcome L1 provokes, as L1
//! sees it through L0's emulation (docs/l1-guest.md, "vmx-errors sequence").
//!
//! L1 runs the mode once per test binary; each test then checks one
//! `check NAME: expected E got G ok` line against the outcome the SDM
//! defines, written here independently of L1 (SDM Vol. 3C, 31.2
//! "Conventions" for VMfailInvalid/VMfailValid, 31.4 Table 31-1 for the
//! error numbers, 31.3 for each instruction). A check passes only if what
//! L1 *got* is that value; L1's own `ok` is not trusted alone.

use std::sync::OnceLock;

use nested_tests::{assert_all_checks_passed, cached_l1, Cached, Elf, Run, L1_GUEST_ELF};
use vmcs12::VmxCapabilities;

static RUN: Cached = OnceLock::new();

fn run() -> Option<&'static Run> {
    cached_l1(&RUN, "vmx-errors")
}

/// Address of an L1 static whose (mangled) symbol name contains `name`.
fn l1_static(name: &str) -> u64 {
    let elf = Elf::new(L1_GUEST_ELF).expect("L1 image is ELF64");
    let hits: Vec<u64> = elf
        .symbols()
        .into_iter()
        // Both Rust manglings spell a path segment as <length><name>.
        .filter(|(n, _)| n.contains(&format!("{}{name}", name.len())))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(hits.len(), 1, "symbol {name} in the L1 image: {hits:x?}");
    hits[0]
}

fn hexs(v: u64) -> String {
    format!("{v:#x}")
}

/// VMfailValid(n) as L1 prints it.
fn valid(n: u32) -> String {
    format!("VMfailValid({n})")
}

const SUCCEED: &str = "VMsucceed";
const FAIL_INVALID: &str = "VMfailInvalid";
const UD: &str = "fault(#UD)";

/// Asserts the check exists once and that both what L1 expected and what
/// it got are `want`.
fn assert_check(name: &str, want: &str) {
    let Some(run) = run() else { return };
    let c = run.check(name);
    assert_eq!(
        c.got,
        want,
        "check {name}: L0 gave the wrong outcome\n{}",
        run.dump()
    );
    assert_eq!(c.expected, want, "check {name}: L1 expects something else");
    assert!(c.ok, "{c:?}");
}

/// One test per check line: (test name, check name, outcome per the SDM).
macro_rules! checks {
    ($($test:ident: $name:literal => $want:expr;)*) => {
        $(
            #[test]
            fn $test() {
                assert_check($name, &$want);
            }
        )*
        /// Every check name, in the order L1 runs them.
        const ALL_CHECKS: &[&str] = &[$($name),*];
    };
}

fn caps() -> VmxCapabilities {
    VmxCapabilities::l0_default()
}

/// IA32_VMX_MISC bit 29: VMWRITE may write read-only fields (SDM A.6).
fn vmwrite_any_field() -> bool {
    caps().read_msr(0x485).is_some_and(|m| m & (1 << 29) != 0)
}

checks! {
    // 1. VMX root operation, no current VMCS: VMfailInvalid (SDM 31.2).
    test_vmptrst_without_current_vmcs_stores_all_ones: "vmptrst-none" => hexs(u64::MAX);
    test_vmread_without_current_vmcs_fails_invalid: "vmread-no-current-vmcs" => FAIL_INVALID;
    test_vmwrite_without_current_vmcs_fails_invalid: "vmwrite-no-current-vmcs" => FAIL_INVALID;
    test_vmlaunch_without_current_vmcs_fails_invalid: "vmlaunch-no-current-vmcs" => FAIL_INVALID;
    test_vmxon_in_root_without_current_vmcs_fails_invalid: "vmxon-in-root-no-current" => FAIL_INVALID;
    test_vmclear_unaligned_without_current_vmcs_fails_invalid: "vmclear-unaligned-no-current" => FAIL_INVALID;
    // VMCALL in VMX root operation is VMfail(1) (SDM 31.3 VMCALL): here
    // VMfailInvalid. It reaches L0 through the VMCALL watchdog.
    test_vmcall_in_root_without_current_vmcs_fails_invalid: "vmcall-no-current-vmcs" => FAIL_INVALID;
    // 2. With VMCS A current: VMfailValid(n), Table 31-1.
    test_vmclear_succeeds: "vmclear" => SUCCEED;
    test_vmptrld_succeeds: "vmptrld" => SUCCEED;
    test_vmptrst_stores_the_current_vmcs: "vmptrst" => hexs(l1_static("VMCS_A"));
    test_vmcall_in_root_is_error_1: "vmcall-in-root" => valid(1);
    test_vmxon_in_root_is_error_15: "vmxon-twice" => valid(15);
    test_vmclear_of_vmxon_pointer_is_error_3: "vmclear-vmxon-pointer" => valid(3);
    test_vmptrld_of_vmxon_pointer_is_error_10: "vmptrld-vmxon-pointer" => valid(10);
    test_vmclear_unaligned_is_error_2: "vmclear-unaligned" => valid(2);
    test_vmptrld_unaligned_is_error_9: "vmptrld-unaligned" => valid(9);
    test_vmclear_beyond_maxphyaddr_is_error_2: "vmclear-beyond-maxphyaddr" => valid(2);
    test_vmptrld_beyond_maxphyaddr_is_error_9: "vmptrld-beyond-maxphyaddr" => valid(9);
    test_vmptrld_wrong_revision_is_error_11: "vmptrld-bad-revision" => valid(11);
    test_vm_instruction_error_field_reads_11: "vm-instruction-error-field" => hexs(11);
    test_failed_vmptrld_keeps_current_vmcs: "current-vmcs-kept-after-failure" => hexs(l1_static("VMCS_A"));
    test_vmread_unsupported_field_is_error_12: "vmread-unsupported-field" => valid(12);
    test_vmwrite_unsupported_field_is_error_12: "vmwrite-unsupported-field" => valid(12);
    test_vmwrite_read_only_field_is_error_13: "vmwrite-read-only" =>
        if vmwrite_any_field() { SUCCEED.to_string() } else { valid(13) };
    test_vmwrite_guest_rip_succeeds: "vmwrite-guest-rip" => SUCCEED;
    test_vmread_returns_the_written_guest_rip: "vmread-guest-rip" => hexs(0x1234_5678);
    test_vmresume_of_clear_vmcs_is_error_5: "vmresume-clear-vmcs" => valid(5);
    // L0 advertises INVEPT/INVVPID (EPT_VPID_CAP bits 20/32): a type the
    // CPU does not support is error 28.
    test_invept_unsupported_type_is_error_28: "invept-bad-type" => valid(28);
    test_invvpid_unsupported_type_is_error_28: "invvpid-bad-type" => valid(28);
    // 3. VM entry checks (SDM 27.2, 27.3): control, host state, guest state.
    test_vmlaunch_bad_control_is_error_7: "vmlaunch-bad-control" => valid(7);
    test_vmlaunch_bad_host_state_is_error_8: "vmlaunch-bad-host-state" => valid(8);
    test_vmlaunch_bad_guest_state_exits_with_reason_33_bit_31:
        "vmlaunch-bad-guest-state" => hexs(0x8000_0000 | 33);
    test_vmlaunch_ok_exits_on_hlt: "vmlaunch-ok" => hexs(12);
    test_vmlaunch_of_launched_vmcs_is_error_4: "vmlaunch-launched-vmcs" => valid(4);
    test_vmresume_of_launched_vmcs_exits_on_hlt: "vmresume-launched" => hexs(12);
    // 4. VMCLEAR of the current VMCS makes it not current (SDM 31.3 VMCLEAR).
    test_vmclear_of_current_vmcs_succeeds: "vmclear-current" => SUCCEED;
    test_vmread_after_vmclear_fails_invalid: "vmread-after-vmclear" => FAIL_INVALID;
    test_vmptrld_after_vmclear_succeeds: "vmptrld-again" => SUCCEED;
    test_vmresume_after_vmclear_is_error_5: "vmresume-after-vmclear" => valid(5);
    // 5. Outside VMX operation VMREAD and VMCALL raise #UD; VMXON works again.
    test_vmxoff_succeeds: "vmxoff" => SUCCEED;
    test_vmread_outside_vmx_operation_raises_ud: "vmread-outside-vmx" => UD;
    test_vmcall_outside_vmx_operation_raises_ud: "vmcall-outside-vmx" => UD;
    test_vmxon_after_vmxoff_succeeds: "vmxon-again" => SUCCEED;
    test_vmxoff_again_succeeds: "vmxoff-again" => SUCCEED;
}

#[test]
fn test_caps_advertise_invept_invvpid_and_read_only_vm_exit_info() {
    // The expectations above assume L0's default capabilities; if the
    // model changes, this says which expectation to revisit.
    let ept_vpid = caps().read_msr(0x48c).expect("EPT_VPID_CAP");
    assert_ne!(ept_vpid & (1 << 20), 0, "INVEPT supported");
    assert_ne!(ept_vpid & (1 << 32), 0, "INVVPID supported");
    assert!(
        !vmwrite_any_field(),
        "MISC bit 29 clear: VM-exit info is read-only"
    );
}

/// Exactly the documented checks, in order, all passed, status 0.
#[test]
fn test_vmx_errors_runs_every_check_in_order() {
    let Some(run) = run() else { return };
    let names: Vec<String> = run.checks().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ALL_CHECKS, "{}", run.dump());
    assert_eq!(ALL_CHECKS.len(), 44);
    let result = run.result().expect("result line");
    assert_eq!((result.passed, result.failed), (44, 0), "{}", run.dump());
    assert_all_checks_passed(run, "vmx-errors");
}

/// L0 counted every VMX instruction L1 executed in this mode (summary
/// table): VMLAUNCH 6 times (no current VMCS, bad control, bad host
/// state, bad guest state, ok, launched), VMRESUME 3 times, VMXON 4
/// (bring-up, in root, twice, again), VMXOFF 2, VMPTRST 3.
#[test]
fn test_vmx_errors_instruction_counts() {
    let Some(run) = run() else { return };
    for (insn, n) in [
        ("vmlaunch", 6),
        ("vmresume", 3),
        ("vmxon", 4),
        ("vmxoff", 2),
        ("vmptrst", 3),
        ("invept", 1),
        ("invvpid", 1),
    ] {
        assert_eq!(run.vmx_count(insn), n, "{insn}\n{}", run.dump());
    }
    // Two launches reached L2 and both exits (HLT) were reflected to L1.
    assert_eq!(run.l2_exit_counts(12), (0, 2), "{}", run.dump());
}

/// L1's VMXON region is where L1 says it is (VMXON's operand went through
/// L1's paging to the right guest-physical address).
#[test]
fn test_vmxon_region_address() {
    let Some(run) = run() else { return };
    let line = format!("vmxon {:#x}: VMsucceed", l1_static("VMXON_REGION"));
    assert!(run.l1().contains(&line.as_str()), "{line}\n{}", run.dump());
}
