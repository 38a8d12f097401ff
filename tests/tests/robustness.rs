//! Guest misbehaviour ends a run with a clear message, never a panic:
//! tiny Multiboot kernels built here as bytes (a.out kludge header + a few
//! instructions, entered in 32-bit protected mode with an empty IDT, so
//! any exception escalates to a triple fault), and images L0 must refuse.

use l0_vmm::cli::{run_kernel, BootOptions};
use l0_vmm::devices::CaptureSink;
use l0_vmm::l1_run::{RunEnd, EXIT_ERROR, EXIT_TRIPLE_FAULT};
use nested_tests::{boot, kvm_or_skip, multiboot_kludge_image, Run};

const LOAD: u32 = 0x10_0000;
/// Entry = first code byte, right after the 32-byte header.
const ENTRY: u32 = LOAD + 32;

fn run_code(code: &[u8]) -> Run {
    boot(&multiboot_kludge_image(LOAD, code), "", 16).expect("the image loads")
}

/// The triple-fault report: end, exit code 2, `[L0]` message with a
/// register dump whose RIP is `rip`.
fn assert_triple_fault_at(run: &Run, rip: u64) {
    assert_eq!(run.report.end, RunEnd::TripleFault, "{}", run.dump());
    assert_eq!(run.report.exit_code, EXIT_TRIPLE_FAULT);
    let text = run.lines.join("\n");
    assert!(text.contains("L1 triple fault"), "{text}");
    assert!(
        text.contains(&format!("rip={rip:#018x}")),
        "register dump with rip={rip:#x} expected:\n{text}"
    );
    assert!(
        run.l0()
            .contains(&"end: L1 triple fault (KVM_EXIT_SHUTDOWN)"),
        "{text}"
    );
}

/// UD2 with no IDT: #UD cannot be delivered -> #GP -> #DF -> shutdown.
#[test]
fn test_ud2_without_idt_triple_faults_with_register_dump() {
    if !kvm_or_skip() {
        return;
    }
    let run = run_code(&[0x0f, 0x0b]);
    assert_triple_fault_at(&run, u64::from(ENTRY));
}

/// A jump into garbage (0xff 0xff: FF /7 is an invalid opcode).
#[test]
fn test_jump_into_garbage_triple_faults() {
    if !kvm_or_skip() {
        return;
    }
    // jmp short +2 over two NOPs, into 0xff bytes.
    let code = [0xeb, 0x02, 0x90, 0x90, 0xff, 0xff, 0xff, 0xff];
    let run = run_code(&code);
    assert_triple_fault_at(&run, u64::from(ENTRY) + 4);
}

/// A jump far outside RAM (no memory there: fetching reads all ones, an
/// invalid instruction, or KVM cannot emulate it): the run ends with a
/// triple fault or an L0 error that says what happened, not a panic.
#[test]
fn test_jump_outside_ram_ends_cleanly() {
    if !kvm_or_skip() {
        return;
    }
    // mov eax, 0xfee00000; jmp eax
    let code = [0xb8, 0x00, 0x00, 0xe0, 0xfe, 0xff, 0xe0];
    let run = run_code(&code);
    match &run.report.end {
        RunEnd::TripleFault => assert_triple_fault_at(&run, 0xfee0_0000),
        RunEnd::Error(msg) => {
            // The message names the address L1 tried to execute, and is
            // printed as the end of the run.
            assert!(msg.contains("0xfee00000"), "{msg}");
            assert_eq!(run.report.exit_code, EXIT_ERROR);
            let end = format!("end: error: {msg}");
            assert!(run.l0().contains(&end.as_str()), "{}", run.dump());
        }
        other => panic!("unexpected end {other:?}\n{}", run.dump()),
    }
}

/// A kernel that spins ends at the timeout (exit code 124).
#[test]
fn test_spinning_kernel_times_out() {
    if !kvm_or_skip() {
        return;
    }
    let sink = CaptureSink::new();
    let report = run_kernel(
        &multiboot_kludge_image(LOAD, &[0xeb, 0xfe]),
        &BootOptions {
            mem_mib: 16,
            cmdline: String::new(),
            timeout: Some(std::time::Duration::from_millis(300)),
            ..BootOptions::default()
        },
        Box::new(sink.clone()),
    )
    .expect("loads");
    assert!(matches!(report.end, RunEnd::Timeout(_)), "{report:?}");
    assert_eq!(report.exit_code, 124);
    assert!(sink
        .lines()
        .iter()
        .any(|l| l.starts_with("[L0] end: timeout after")));
}

/// Images that are not kernels are refused before anything runs, with an
/// error message (no panic): garbage, a Multiboot header with a bad
/// checksum, an entry point outside the loaded image.
#[test]
fn test_bad_images_are_refused_with_a_message() {
    let opts = BootOptions {
        mem_mib: 16,
        cmdline: String::new(),
        timeout: Some(std::time::Duration::from_secs(5)),
        ..BootOptions::default()
    };
    let refuse = |image: &[u8]| -> String {
        match run_kernel(image, &opts, Box::new(CaptureSink::new())) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("a bad image ran: {r:?}"),
        }
    };
    assert!(refuse(&[0x90; 64]).contains("cannot load the kernel"));
    assert!(refuse(&[]).contains("cannot load the kernel"));
    let mut bad_checksum = multiboot_kludge_image(LOAD, &[0xf4]);
    bad_checksum[8] ^= 1;
    assert!(refuse(&bad_checksum).contains("cannot load the kernel"));
    let mut bad_entry = multiboot_kludge_image(LOAD, &[0xf4]);
    bad_entry[28..32].copy_from_slice(&0x0800_0000u32.to_le_bytes());
    assert!(refuse(&bad_entry).contains("cannot load the kernel"));
}
