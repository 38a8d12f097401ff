//! L2 exits: which ones L0 reflects to L1 and with what exit information
//! (`test=demo` and `test=rip-change`, docs/l1-guest.md), and the run
//! summary's counters.
//!
//! The addresses of L2's instructions come from the L1 image's symbol
//! table (`l2_puts`, `l2_demo`, `l2_rip_change`, `l2_rip_target`) and are
//! decoded with iced-x86, so "GUEST_RIP points at the OUT" is checked
//! against the real code, not against a number copied from a run.

use std::sync::OnceLock;

use iced_x86::Mnemonic;
use l0_vmm::l1_run::summary_lines;
use nested_tests::{
    assert_all_checks_passed, cached_l1, io_qualification, reason, Cached, Elf, ExitLine, Run,
    L1_GUEST_ELF,
};

static DEMO: Cached = OnceLock::new();
static RIP_CHANGE: Cached = OnceLock::new();

fn demo() -> Option<&'static Run> {
    cached_l1(&DEMO, "demo")
}

fn rip_change() -> Option<&'static Run> {
    cached_l1(&RIP_CHANGE, "rip-change")
}

/// What L2 writes to the intercepted port 0x3f8 in `demo`.
const DEMO_UART_TEXT: [&str; 2] = ["hello from L2\n", "L2 done, halting\n"];
/// What L2 writes to port 0xe9 (not in L1's I/O bitmap).
const DEMO_E9_TEXT: &str = "L2 via port 0xe9 (not intercepted by L1)\n";
/// What L2 prints from the RIP L1 chose in `rip-change`.
const RIP_CHANGE_TEXT: &str = "L2 continues at the RIP L1 chose\n";

/// OUT DX, AL to 0x3f8: SDM Table 28-5 (size 1, OUT, not string, no REP,
/// DX operand, port 0x3f8).
fn out_dx_al_3f8() -> u64 {
    io_qualification(1, false, false, false, false, 0x3f8)
}

/// Addresses and lengths of the instructions `m` in the code at `symbol`.
fn insns(symbol: &str, m: Mnemonic) -> Vec<(u64, usize)> {
    let elf = Elf::new(L1_GUEST_ELF).expect("L1 image is ELF64");
    let code = elf.disassemble(symbol, 4096);
    assert!(
        !code.is_empty(),
        "symbol {symbol} missing from the L1 image's .symtab"
    );
    code.into_iter()
        .filter(|&(_, _, x)| x == m)
        .map(|(a, l, _)| (a, l))
        .collect()
}

/// The first instruction `m` at or after `symbol`.
fn first(symbol: &str, m: Mnemonic) -> (u64, usize) {
    insns(symbol, m)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no {m:?} in {symbol}"))
}

fn exits_of(run: &Run, r: u32) -> Vec<ExitLine> {
    run.exits().into_iter().filter(|e| e.reason == r).collect()
}

#[test]
fn test_demo_passes_all_l1_checks() {
    let Some(run) = demo() else { return };
    assert_all_checks_passed(run, "demo");
    assert_eq!(run.result().map(|r| r.passed), Some(6), "{}", run.dump());
}

/// The full exit sequence L1 sees: 14 OUTs ("hello from L2\n"), RDMSR,
/// WRMSR, RDMSR of the intercepted 0x1b, 17 OUTs ("L2 done, halting\n"),
/// HLT. Nothing for port 0xe9 or MSR 0x277, which L1 does not intercept.
#[test]
fn test_demo_exit_sequence_seen_by_l1() {
    let Some(run) = demo() else { return };
    let mut want = vec![reason::IO; DEMO_UART_TEXT[0].len()];
    want.extend([reason::RDMSR, reason::WRMSR, reason::RDMSR]);
    want.extend(vec![reason::IO; DEMO_UART_TEXT[1].len()]);
    want.push(reason::HLT);
    let got: Vec<u32> = run.exits().iter().map(|e| e.reason).collect();
    assert_eq!(got, want, "{}", run.dump());
    assert!(run.exits().iter().all(|e| !e.entry_failure));
    let handled = format!("L1: {} exits handled", want.len());
    assert!(run.l1().contains(&handled.as_str()), "{}", run.dump());
}

/// Every OUT L2 makes to 0x3f8 reaches L1 with the SDM exit qualification,
/// VM_EXIT_INSTRUCTION_LEN 1 and GUEST_RIP at the OUT itself (KVM reports
/// the RIP after it; L0 must recover the start).
#[test]
fn test_intercepted_out_exit_information() {
    let Some(run) = demo() else { return };
    let (out_rip, out_len) = first("l2_puts", Mnemonic::Out);
    assert_eq!(out_len, 1, "l2_puts uses `out dx, al`");
    let elf = Elf::new(L1_GUEST_ELF).unwrap();
    assert_eq!(
        elf.bytes_at(out_rip, 1),
        Some(&[0xee][..]),
        "OUT DX, AL opcode"
    );
    let io = exits_of(run, reason::IO);
    let chars: usize = DEMO_UART_TEXT.iter().map(|t| t.len()).sum();
    assert_eq!(io.len(), chars, "{}", run.dump());
    for e in &io {
        assert_eq!(e.qualification, out_dx_al_3f8(), "{e:?}");
        assert_eq!(e.qualification, 0x03f8_0000);
        assert_eq!(e.len, 1, "{e:?}");
        assert_eq!(e.rip, out_rip, "GUEST_RIP must point at the OUT: {e:?}");
    }
}

/// L1 forwards the bytes to its console as `L2> ` lines; L0 never prints
/// that text itself.
#[test]
fn test_intercepted_console_text_arrives_through_l1() {
    let Some(run) = demo() else { return };
    let forwarded: Vec<&str> = run
        .l1()
        .into_iter()
        .filter_map(|l| l.strip_prefix("L2> "))
        .collect();
    assert_eq!(
        forwarded,
        ["hello from L2", "L2 done, halting"],
        "{}",
        run.dump()
    );
    assert!(
        run.l2().iter().all(|l| !l.contains("hello from L2")),
        "{}",
        run.dump()
    );
}

/// OUT to 0xe9 is not in L1's I/O bitmap: L0 handles it (a `[L2] ` line),
/// and L1 never sees an exit for it.
#[test]
fn test_out_to_unintercepted_port_is_handled_by_l0() {
    let Some(run) = demo() else { return };
    assert_eq!(run.l2(), [DEMO_E9_TEXT.trim_end()], "{}", run.dump());
    for e in exits_of(run, reason::IO) {
        assert_eq!(
            e.qualification >> 16,
            0x3f8,
            "L1 saw an exit for another port: {e:?}"
        );
    }
    assert!(
        run.l1().iter().all(|l| !l.contains("0xe9 (not")),
        "{}",
        run.dump()
    );
    // Summary: one L0-handled I/O exit per byte to 0xe9, one reflected
    // exit per byte to 0x3f8.
    let uart: usize = DEMO_UART_TEXT.iter().map(|t| t.len()).sum();
    assert_eq!(
        run.l2_exit_counts(30),
        (DEMO_E9_TEXT.len() as u64, uart as u64),
        "{}",
        run.dump()
    );
}

/// RDMSR/WRMSR of 0x1b (in L1's MSR bitmap) are reflected with the SDM
/// exit information (qualification 0, length 2, RIP at the instruction);
/// RDMSR 0x277 (not in the bitmap) is answered by L0.
#[test]
fn test_msr_accesses_reflected_per_msr_bitmap() {
    let Some(run) = demo() else { return };
    let rdmsrs = insns("l2_demo", Mnemonic::Rdmsr);
    assert_eq!(rdmsrs.len(), 3, "l2_demo reads 0x1b, 0x1b, 0x277");
    let wrmsr = first("l2_demo", Mnemonic::Wrmsr);
    let rd = exits_of(run, reason::RDMSR);
    assert_eq!(
        rd.iter().map(|e| e.rip).collect::<Vec<_>>(),
        [rdmsrs[0].0, rdmsrs[1].0],
        "only the two reads of 0x1b reach L1\n{}",
        run.dump()
    );
    let wr = exits_of(run, reason::WRMSR);
    assert_eq!(wr.iter().map(|e| e.rip).collect::<Vec<_>>(), [wrmsr.0]);
    for e in rd.iter().chain(&wr) {
        assert_eq!((e.qualification, e.len), (0, 2), "{e:?}");
    }
    assert!(run.exits().iter().all(|e| e.rip != rdmsrs[2].0));
    // L1's answers reached L2's RDX:RAX, and L2's WRMSR value reached L1.
    let l1 = run.l1();
    for line in [
        "L1: rdmsr 0x1b -> 0x4c314d530000001b",
        "L1: wrmsr 0x1b <- 0x4c314d530000001c",
        "L1: rdmsr 0x1b -> 0x4c314d530000001c",
    ] {
        assert!(l1.contains(&line), "{line}\n{}", run.dump());
    }
    assert_eq!(run.check("rdmsr-intercepted").got, "0x4c314d530000001b");
    assert_eq!(run.check("wrmsr-intercepted").got, "0x4c314d530000001c");
    let platform = run.check("rdmsr-not-intercepted");
    assert!(platform.ok && platform.got != "0x0" && platform.got != "0x4c314d530000001b");
    // Summary: RDMSR 1 by L0 (0x277), 2 reflected; WRMSR 1 reflected.
    assert_eq!(run.l2_exit_counts(31), (1, 2), "{}", run.dump());
    assert_eq!(run.l2_exit_counts(32), (0, 1), "{}", run.dump());
}

/// HLT (HLT exiting on) is reflected, RIP at the HLT, length 1.
#[test]
fn test_hlt_reflected() {
    let Some(run) = demo() else { return };
    let hlt = first("l2_demo", Mnemonic::Hlt);
    let last = run.exits().last().cloned().expect("exits");
    assert_eq!(
        (
            last.reason,
            last.name.as_str(),
            last.qualification,
            last.rip,
            last.len
        ),
        (reason::HLT, "HLT", 0, hlt.0, 1),
        "{}",
        run.dump()
    );
    assert_eq!(run.l2_exit_counts(12), (0, 1));
}

/// The summary agrees with what L1 saw: per reason, the reflected count is
/// the number of L1's exit lines; one VMLAUNCH and one VMRESUME per exit L1
/// resumed; KVM_RUN counted on both vCPUs (at least one L2 KVM_RUN per L2
/// exit); every trapped VMX instruction arrived on one of the two paths.
#[test]
fn test_summary_counters_match_l1() {
    let Some(run) = demo() else { return };
    let s = &run.report.stats;
    let exits = run.exits();
    for (r, name, _, by_l1) in &s.l2_exits {
        let seen = exits.iter().filter(|e| e.reason == u32::from(*r)).count() as u64;
        assert_eq!(*by_l1, seen, "reason {r} ({name})\n{}", run.dump());
    }
    let reflected: u64 = s.l2_exits.iter().map(|r| r.3).sum();
    assert_eq!(reflected, exits.len() as u64);
    assert_eq!(run.vmx_count("vmlaunch"), 1);
    assert_eq!(run.vmx_count("vmresume"), exits.len() as u64 - 1);
    assert!(s.l1_ioctls.kvm_run > 0, "{s:?}");
    let l2 = s.l2_ioctls.expect("L2 ioctls measured");
    let all_l2_exits: u64 = s.l2_exits.iter().map(|r| r.2 + r.3).sum();
    assert!(l2.kvm_run >= all_l2_exits, "{l2:?} < {all_l2_exits} exits");
    let trapped: u64 = s.vmx_instructions.iter().map(|(_, n)| n).sum();
    assert_eq!(
        trapped,
        run.l1_exit_count("emulation-failure") + run.l1_exit_count("vmx-trap-port"),
        "{}",
        run.dump()
    );
    // The printed table is the report's.
    let printed: Vec<&str> = run.l0();
    let table = summary_lines(&run.report);
    let start = printed.len() - table.len();
    assert_eq!(printed[start..], table, "{}", run.dump());
}

/// `rip-change`: on the first I/O exit L1 writes GUEST_RIP = l2_rip_target
/// without advancing past the OUT; L2 continues there.
#[test]
fn test_rip_change_l2_continues_at_l1s_rip() {
    let Some(run) = rip_change() else { return };
    assert_all_checks_passed(run, "rip-change");
    let (out_rip, _) = first("l2_rip_change", Mnemonic::Out);
    let target = Elf::new(L1_GUEST_ELF)
        .unwrap()
        .symbol("l2_rip_target")
        .expect("l2_rip_target symbol");
    let exits = run.exits();
    // The OUT is `b0 40 ee`: 0x40 could be a REX prefix of the OUT, but
    // the instruction starts at 0xee (SDM: length 1).
    assert_eq!(
        (
            exits[0].reason,
            exits[0].qualification,
            exits[0].rip,
            exits[0].len
        ),
        (reason::IO, out_dx_al_3f8(), out_rip, 1),
        "{}",
        run.dump()
    );
    let line = format!("L1: GUEST_RIP {out_rip:#x} -> {target:#x}");
    assert!(run.l1().contains(&line.as_str()), "{line}\n{}", run.dump());
    // Next: the OUTs of l2_puts called from the target, then HLT there.
    let (puts_out, _) = first("l2_puts", Mnemonic::Out);
    let hlt = first("l2_rip_target", Mnemonic::Hlt);
    assert_eq!(exits.len(), 1 + RIP_CHANGE_TEXT.len() + 1, "{}", run.dump());
    assert!(exits[1..=RIP_CHANGE_TEXT.len()]
        .iter()
        .all(|e| e.reason == reason::IO && e.rip == puts_out));
    assert_eq!(
        exits.last().map(|e| (e.reason, e.rip)),
        Some((reason::HLT, hlt.0))
    );
    let forwarded: Vec<&str> = run
        .l1()
        .into_iter()
        .filter_map(|l| l.strip_prefix("L2> "))
        .collect();
    assert_eq!(forwarded, [RIP_CHANGE_TEXT.trim_end()], "{}", run.dump());
    assert!(
        run.lines.iter().all(|l| !l.contains("WRONG")),
        "{}",
        run.dump()
    );
}
