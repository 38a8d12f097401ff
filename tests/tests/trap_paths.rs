//! The two ways a VMX instruction of L1 reaches L0 (docs/platform.md):
//!
//! 1. emulation failure (the default on this host): KVM cannot emulate the
//!    instruction and exits to L0 with RIP at it; L0 emulates it.
//! 2. #UD trap port (`VmxTrapPath::InvalidOpcode`, `--vmx-trap ud`): L0
//!    injects #UD into L1 instead; L1's #UD handler writes its trap frame's
//!    address to port 0x0e0e and L0 emulates the instruction from the frame.
//!
//! Both must give L1 the same results: the same check lines in
//! `test=vmx-errors` and the same exit lines in `test=demo`.

use std::sync::OnceLock;

use l0_vmm::cli::VmxTrapPath;
use nested_tests::{
    assert_all_checks_passed, cached_l1_on, cli, kvm_or_skip, summary_row, Cached, Run,
};

static DEMO: Cached = OnceLock::new();
static VMX_ERRORS: Cached = OnceLock::new();
static DEMO_UD: Cached = OnceLock::new();
static VMX_ERRORS_UD: Cached = OnceLock::new();

const EMULATION: VmxTrapPath = VmxTrapPath::EmulationFailure;
const UD: VmxTrapPath = VmxTrapPath::InvalidOpcode;

/// VMX instructions L0 emulated after an exit or a trap, by either path
/// (L1's VMCALLs hang KVM_RUN and reach L0 through the VMCALL watchdog
/// instead, counted as `vmcall-watchdog`: docs/vmcall-watchdog.md).
fn trapped_total(run: &Run) -> u64 {
    let all: u64 = run
        .report
        .stats
        .vmx_instructions
        .iter()
        .map(|(_, n)| n)
        .sum();
    all - run.l1_exit_count("vmcall-watchdog")
}

/// (emulated after an emulation-failure exit, emulated from a trap frame).
fn by_path(run: &Run) -> (u64, u64) {
    run.report
        .stats
        .vmx_by_path
        .iter()
        .fold((0, 0), |(a, b), r| {
            (a + r.emulation_failure, b + r.trap_port)
        })
}

/// Default path: every VMX instruction L0 emulated came in as a KVM
/// emulation failure, none through a trap frame, and L0 injected no #UD
/// in place of emulating.
fn assert_emulation_path(run: &Run) {
    let trapped = trapped_total(run);
    // Bring-up alone is VMXON + VMCLEAR + VMPTRLD + VMWRITEs + VMLAUNCH.
    assert!(trapped > 10, "{}", run.dump());
    assert_eq!(by_path(run), (trapped, 0), "{}", run.dump());
    assert_eq!(
        run.l1_exit_count("emulation-failure"),
        trapped,
        "{}",
        run.dump()
    );
    assert_eq!(run.l1_exit_count("vmx-ud-injected"), 0, "{}", run.dump());
}

/// #UD path: each VMX-instruction emulation failure became an injected
/// #UD, each #UD came back once through port 0x0e0e, and every emulated
/// instruction was emulated from a trap frame. `vmcall_uds`: VMCALLs that
/// reached L0 through the VMCALL watchdog and got #UD; L1's handler offers
/// each on the port too, and L0 leaves it alone (genuine).
fn assert_ud_path(run: &Run, vmcall_uds: u64) {
    let trapped = trapped_total(run);
    assert!(trapped > 10, "{}", run.dump());
    assert_eq!(by_path(run), (0, trapped), "{}", run.dump());
    let ef = run.l1_exit_count("emulation-failure");
    let injected = run.l1_exit_count("vmx-ud-injected");
    let port = run.l1_exit_count("vmx-trap-port");
    assert_eq!(injected, ef, "{}", run.dump());
    assert_eq!(port, injected + vmcall_uds, "{}", run.dump());
    assert_eq!(port, trapped + vmcall_uds, "{}", run.dump());
}

#[test]
fn test_emulation_failure_path_demo() {
    let Some(run) = cached_l1_on(&DEMO, "demo", EMULATION) else {
        return;
    };
    assert_all_checks_passed(run, "demo");
    assert_emulation_path(run);
    assert_eq!(run.l1_exit_count("vmx-trap-port"), 0, "{}", run.dump());
}

/// The two genuine #UDs of `vmx-errors` (VMREAD and VMCALL after VMXOFF)
/// are injected by L0; L1's handler offers each on the trap port, L0 leaves
/// status 0 there (not emulated again), so L1 sees the #UD.
#[test]
fn test_emulation_failure_path_vmx_errors() {
    let Some(run) = cached_l1_on(&VMX_ERRORS, "vmx-errors", EMULATION) else {
        return;
    };
    assert_all_checks_passed(run, "vmx-errors");
    assert_emulation_path(run);
    assert_eq!(run.check("vmread-outside-vmx").got, "fault(#UD)");
    assert_eq!(run.check("vmcall-outside-vmx").got, "fault(#UD)");
    assert_eq!(run.l1_exit_count("vmx-trap-port"), 2, "{}", run.dump());
    // The three VMCALL checks each reached L0 through the VMCALL watchdog.
    assert_eq!(run.l1_exit_count("vmcall-watchdog"), 3, "{}", run.dump());
    assert_eq!(run.vmx_count("vmcall"), 3, "{}", run.dump());
}

/// `vmx-errors` on the #UD path: the same 44 check lines as on the
/// emulation-failure path.
#[test]
fn test_ud_trap_path_vmx_errors() {
    let Some(run) = cached_l1_on(&VMX_ERRORS_UD, "vmx-errors", UD) else {
        return;
    };
    let Some(reference) = cached_l1_on(&VMX_ERRORS, "vmx-errors", EMULATION) else {
        return;
    };
    assert_all_checks_passed(run, "vmx-errors");
    assert_eq!(run.checks().len(), 44, "{}", run.dump());
    assert_eq!(run.checks(), reference.checks(), "{}", run.dump());
    // `vmcall-outside-vmx`.
    assert_ud_path(run, 1);
}

/// `demo` on the #UD path: L1 sees exactly the exit lines of the default
/// path (reasons, qualifications, RIPs, lengths) and L0 still prints L2's
/// port 0xe9 output.
#[test]
fn test_ud_trap_path_demo_matches_emulation_path() {
    let Some(run) = cached_l1_on(&DEMO_UD, "demo", UD) else {
        return;
    };
    let Some(reference) = cached_l1_on(&DEMO, "demo", EMULATION) else {
        return;
    };
    assert_all_checks_passed(run, "demo");
    assert_eq!(run.exits(), reference.exits(), "{}", run.dump());
    assert_eq!(run.l2(), reference.l2(), "{}", run.dump());
    assert_eq!(run.checks(), reference.checks(), "{}", run.dump());
    assert_ud_path(run, 0);
    // Same instructions emulated, whatever the path.
    assert_eq!(
        run.report.stats.vmx_instructions,
        reference.report.stats.vmx_instructions
    );
}

/// The CLI option: `--vmx-trap ud` selects the #UD path, `emulation` (the
/// default) the other; `demo` exits 0 when L1 reported success.
#[test]
fn test_cli_vmx_trap_option() {
    if !kvm_or_skip() {
        return;
    }
    for (path, injected) in [("ud", true), ("emulation", false)] {
        let (code, lines) = cli(&[
            "demo",
            "--test",
            "demo",
            "--mem",
            "64",
            "--timeout",
            "30",
            "--vmx-trap",
            path,
        ]);
        let dump = lines.join("\n");
        assert_eq!(code, 0, "--vmx-trap {path}\n{dump}");
        assert!(lines.contains(&"[L1] result test=demo: 6 passed, 0 failed".to_string()));
        let ef = summary_row(&lines, "emulation-failure").unwrap_or(0);
        let ud = summary_row(&lines, "vmx-ud-injected").unwrap_or(0);
        assert!(ef > 10, "{dump}");
        assert_eq!(
            ud,
            if injected { ef } else { 0 },
            "--vmx-trap {path}\n{dump}"
        );
    }
    let (code, _) = cli(&["demo", "--vmx-trap", "sometimes"]);
    assert_ne!(code, 0, "an unknown trap path is refused");
}
