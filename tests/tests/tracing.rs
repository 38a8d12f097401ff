//! Issue #6 end to end: VMCS field events in every direction on a real
//! run, `--trace-json`, `--timeline` + `timeline-svg`, `--record` +
//! `replay`, golden recordings, `vmcs show/diff/extract`, and the cost of
//! the hooks with tracing off.
//!
//! Golden recordings (`tests/golden/*.nvmxrec`) hold the inputs and outputs
//! of `decide`/`prepare_vmcs12` for every L2 exit of a run. Replay compares
//! what the functions compute now with what the file says they computed,
//! so the check does not depend on the L1 image the tree builds today (its
//! addresses may move): a golden only fails when the reflection logic
//! changes. `UPDATE_GOLDEN=1 cargo test -p nested-tests --test tracing`
//! records them again from the current L1 (do it when a change of
//! behaviour is intended, and read the replay diff first).

use std::path::{Path, PathBuf};

use l0_vmm::cli::{run_kernel, BootOptions, ExitConvention, TraceArgs};
use l0_vmm::devices::CaptureSink;
use l0_vmm::trace::{self, CapturedEvent};
use nested_exit::record::{self, Recording, ReplayFns};
use nested_exit::{Decision, Disposition, Exit, L0Policy};
use nested_tests::{cli, kvm_or_skip, L1_GUEST_ELF, L1_MEM_MIB, RUN_TIMEOUT};
use vmcs12::{GuestPhysMemory, Vmcs12, VmcsField};

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvmx-tracing-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn demo_options(mode: &str, trace: TraceArgs) -> BootOptions {
    BootOptions {
        mem_mib: L1_MEM_MIB,
        cmdline: format!("test={mode}"),
        timeout: Some(RUN_TIMEOUT),
        exit_convention: ExitConvention::Demo,
        trace,
        ..BootOptions::default()
    }
}

fn field_events<'a>(ev: &'a [CapturedEvent], dir: &str) -> Vec<&'a CapturedEvent> {
    ev.iter()
        .filter(|e| e.target == trace::TARGET_FIELD && e.get("dir") == Some(dir))
        .collect()
}

fn hex(s: Option<&str>) -> u64 {
    let s = s.expect("field present");
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex value")
}

#[test]
fn test_demo_field_events_cover_every_direction_with_names_and_values() {
    if !kvm_or_skip() {
        return;
    }
    let (report, ev) = trace::capture(|| {
        run_kernel(
            L1_GUEST_ELF,
            &demo_options("demo", TraceArgs::default()),
            Box::new(CaptureSink::new()),
        )
        .expect("demo boots")
    });
    assert_eq!(report.exit_code, 0, "demo passes: {:?}", report.end);

    // L1 VMWRITE: the link pointer L1 writes is all ones (SDM 26.3.1.5).
    let writes = field_events(&ev, "vmwrite");
    let link = writes
        .iter()
        .find(|e| e.get("field") == Some("VMCS_LINK_POINTER"))
        .expect("VMWRITE VMCS_LINK_POINTER traced");
    assert_eq!(link.get("encoding"), Some("0x2800"));
    assert_eq!(link.get("old"), Some("0x0"));
    assert_eq!(link.get("new"), Some("0xffffffffffffffff"));
    let host_rip = hex(writes
        .iter()
        .rev()
        .find(|e| e.get("field") == Some("HOST_RIP"))
        .expect("VMWRITE HOST_RIP traced")
        .get("new"));

    // L1 VMREAD of the exit reason after the first reflected exit (OUT to
    // the UART, reason 30).
    let reads = field_events(&ev, "vmread");
    assert!(
        reads
            .iter()
            .any(|e| e.get("field") == Some("VM_EXIT_REASON")
                && e.get("encoding") == Some("0x4402")
                && e.get("new") == Some("0x1e")),
        "VMREAD VM_EXIT_REASON = 0x1e traced"
    );

    // vmcs12 -> L2 at the first entry: GUEST_RIP as L1 last wrote it
    // before VMLAUNCH.
    let entries = field_events(&ev, "vmcs12->l2");
    let entry_rip = entries
        .iter()
        .find(|e| e.get("field") == Some("GUEST_RIP"))
        .expect("GUEST_RIP loaded into L2 at entry");
    let launch = ev
        .iter()
        .position(|e| e.target == trace::TARGET_INSN && e.get("insn") == Some("vmlaunch"))
        .expect("VMLAUNCH traced");
    let rip_written = ev[..launch]
        .iter()
        .rev()
        .find(|e| e.get("dir") == Some("vmwrite") && e.get("field") == Some("GUEST_RIP"))
        .expect("GUEST_RIP written before VMLAUNCH");
    assert_eq!(entry_rip.get("new"), rip_written.get("new"));
    assert!(entries.iter().all(|e| e
        .get("field")
        .is_some_and(|f| f.starts_with("GUEST_") || f == "VMCS_LINK_POINTER")));

    // L2 -> vmcs12: the first reflected exit writes reason 30 and the I/O
    // qualification of OUT DX, AL to 0x3f8 (SDM Table 28-5: port in 31:16,
    // bit 6 = 0 for a DX operand, bit 3 = 0 for OUT, size 0 = 1 byte).
    let saves = field_events(&ev, "l2->vmcs12");
    let reason = saves
        .iter()
        .find(|e| e.get("field") == Some("VM_EXIT_REASON"))
        .expect("VM_EXIT_REASON written by prepare_vmcs12");
    assert_eq!(reason.get("new"), Some("0x1e"));
    let qual = saves
        .iter()
        .find(|e| e.get("field") == Some("EXIT_QUALIFICATION"))
        .expect("EXIT_QUALIFICATION written");
    assert_eq!(hex(qual.get("new")), 0x3f8 << 16);

    // vmcs12 host state -> L1: RIP lands at HOST_RIP.
    let host = field_events(&ev, "host->l1");
    let rip = host
        .iter()
        .find(|e| e.get("field") == Some("HOST_RIP"))
        .expect("HOST_RIP loaded into L1");
    assert_eq!(hex(rip.get("new")), host_rip);
    assert!(host.iter().any(|e| e.get("field") == Some("HOST_CR3")));

    // One exit event per L2 exit, inside an L2 run span, with the decision.
    let exits: Vec<_> = ev
        .iter()
        .filter(|e| e.target == trace::TARGET_EXIT)
        .collect();
    let counted: u64 = report
        .stats
        .l2_exits
        .iter()
        .map(|(_, _, l0, l1)| l0 + l1)
        .sum();
    assert_eq!(exits.len() as u64, counted);
    let reflected = exits
        .iter()
        .filter(|e| e.get("handler") == Some("L1"))
        .count() as u64;
    let by_l1: u64 = report.stats.l2_exits.iter().map(|r| r.3).sum();
    assert_eq!(reflected, by_l1);
    let kept = exits
        .iter()
        .find(|e| e.get("handler") == Some("L0"))
        .expect("an exit L0 kept (port 0xe9)");
    assert_eq!(kept.get("reason"), Some("I/O instruction"));
    assert_eq!(hex(kept.get("qualification")) >> 16, 0xe9);
    assert!(kept.get("explanation").is_some_and(|x| x.contains("0xe9")));
    assert!(exits
        .iter()
        .all(|e| e.spans == ["L2"] && e.get("level") == Some("L2")));

    // VMX instructions with operands and outcome.
    let vmxon = ev
        .iter()
        .find(|e| e.target == trace::TARGET_INSN && e.get("insn") == Some("vmxon"))
        .expect("VMXON traced");
    assert_eq!(vmxon.get("outcome"), Some("Succeed"));
    assert!(ev.iter().any(|e| e.get("insn") == Some("vmwrite")
        && e.get("operands")
            .is_some_and(|o| o.contains("field GUEST_RIP (0x681e)"))));
}

#[test]
fn test_trace_json_lines_parse_and_hold_field_and_exit_events() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("json");
    let path = dir.join("trace.jsonl");
    let p = path.to_str().unwrap();
    let (code, _) = cli(&["demo", "--mem", "64", "--trace-json", p]);
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&path).expect("JSON trace written");
    let mut targets = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {n} is not JSON ({e}): {line}"));
        targets.insert(v["target"].as_str().unwrap_or("").to_string());
        if v["target"] == "nvmx::field" {
            assert!(v["fields"]["field"].is_string() && v["fields"]["encoding"].is_string());
        }
    }
    for t in ["nvmx::field", "nvmx::exit", "nvmx::insn"] {
        assert!(targets.contains(t), "{t} in {targets:?}");
    }
    // --trace exits narrows the JSON too.
    let (code, _) = cli(&["demo", "--mem", "64", "--trace", "exits", "--trace-json", p]);
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().count() > 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_ne!(v["target"], "nvmx::field", "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_timeline_of_demo_has_three_tracks_and_draws() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("timeline");
    let json = dir.join("t.json");
    let svg = dir.join("t.svg");
    let (code, lines) = cli(&["demo", "--mem", "64", "--timeline", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{lines:?}");
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let events = v["traceEvents"]
        .as_array()
        .or_else(|| v.as_array())
        .expect("trace events array");
    let mut names = std::collections::BTreeMap::new();
    for e in events {
        if e["ph"] == "M" && e["name"] == "thread_name" {
            names.insert(
                e["tid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap(),
            );
        }
    }
    assert_eq!(
        names.values().copied().collect::<Vec<_>>(),
        ["L0", "L1", "L2"]
    );
    for (tid, name) in &names {
        let runs = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["tid"].as_u64() == Some(*tid))
            .count();
        assert!(runs > 0, "no intervals on {name}");
    }
    let l2 = names.iter().find(|(_, n)| **n == "L2").unwrap().0;
    let instants = events
        .iter()
        .filter(|e| e["ph"] == "i" && e["tid"].as_u64() == Some(*l2))
        .count();
    let flows = events.iter().filter(|e| e["ph"] == "s").count();
    let finishes = events.iter().filter(|e| e["ph"] == "f").count();
    assert!(
        instants > 0 && flows > 0 && flows <= instants,
        "{instants} exits, {flows} arrows"
    );
    assert_eq!(flows, finishes);
    let said = lines
        .iter()
        .find(|l| l.contains("timeline ("))
        .expect("timeline line");
    assert!(said.contains(&format!("{instants} exits")), "{said}");
    let (code, out) = cli(&[
        "timeline-svg",
        json.to_str().unwrap(),
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out:?}");
    let pic = std::fs::read_to_string(&svg).unwrap();
    assert!(pic.starts_with("<?xml") && pic.contains("<svg") && pic.contains("L2"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records `mode` to `path` through the CLI.
fn record(mode: &str, path: &Path) {
    let (code, lines) = cli(&[
        "demo",
        "--test",
        mode,
        "--mem",
        "64",
        "--record",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "test={mode} passes:\n{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("L2 exits to")), "{lines:?}");
}

#[test]
fn test_record_then_replay_demo_matches() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("record");
    let path = dir.join("demo.nvmxrec");
    record("demo", &path);
    let rec = Recording::load(&path).expect("recording loads");
    assert!(rec.records.len() > 10, "{} records", rec.records.len());
    assert!(rec
        .records
        .iter()
        .any(|r| r.decision.disposition == record::RecordedDisposition::HandleInL0));
    assert!(rec.records.iter().any(|r| r.prepare.is_some()));
    let (code, out) = cli(&["replay", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out:?}");
    assert!(
        out.iter().any(|l| l.contains("all match the recording")),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const GOLDEN: &[(&str, &str)] = &[("demo", "demo.nvmxrec"), ("ept", "ept.nvmxrec")];

/// Every golden recording still replays clean with today's decide and
/// prepare_vmcs12 (`UPDATE_GOLDEN=1` records them again first).
#[test]
fn test_golden_recordings_replay_clean() {
    if std::env::var_os("UPDATE_GOLDEN").is_some() && kvm_or_skip() {
        for (mode, file) in GOLDEN {
            record(mode, &golden_dir().join(file));
        }
    }
    for (_, file) in GOLDEN {
        let path = golden_dir().join(file);
        let rec = Recording::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!rec.records.is_empty());
        let report = record::replay(&rec);
        assert!(
            report.is_clean(),
            "{} no longer replays: decide/prepare_vmcs12 changed behaviour \
             (if intended, UPDATE_GOLDEN=1):\n{report}",
            path.display()
        );
        let (code, out) = cli(&["replay", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{out:?}");
    }
}

fn golden_demo() -> Recording {
    Recording::load(&golden_dir().join("demo.nvmxrec")).expect("golden demo recording")
}

/// A decide that never reflects: L0 keeps every exit.
fn never_reflect(exit: &Exit, v: &Vmcs12, mem: &dyn GuestPhysMemory, p: &L0Policy) -> Decision {
    let d = nested_exit::decide(exit, v, mem, p);
    Decision {
        disposition: Disposition::HandleInL0,
        ..d
    }
}

/// A prepare_vmcs12 that forgets the exit qualification.
fn no_qualification(
    v: &mut Vmcs12,
    l2: &nested_exit::VcpuState,
    info: &nested_exit::ExitInfo,
    timer: u32,
    msrs: &dyn nested_exit::transfer::MsrAccess,
    mem: &mut dyn GuestPhysMemory,
) -> Result<(), nested_exit::VmxAbort> {
    let before = v.get(VmcsField::EXIT_QUALIFICATION);
    let r = nested_exit::prepare_vmcs12(v, l2, info, timer, msrs, mem);
    v.set(VmcsField::EXIT_QUALIFICATION, before);
    r
}

#[test]
fn test_altered_decision_rule_fails_replay_naming_fields() {
    let rec = golden_demo();
    let report = record::replay_with(
        &rec,
        ReplayFns {
            decide: never_reflect,
            ..ReplayFns::default()
        },
    );
    assert!(!report.is_clean());
    let text = report.to_string();
    println!("{text}");
    assert!(text.contains("recorded reflected to L1"), "{text}");
    assert!(text.contains("replayed handled in L0"), "{text}");
    assert!(text.contains("VM_EXIT_REASON (0x4402)"), "{text}");
    // Exits L0 kept in the recording still match.
    let kept = rec
        .records
        .iter()
        .filter(|r| r.decision.disposition == record::RecordedDisposition::HandleInL0)
        .count();
    assert!(kept > 0);
    assert_eq!(report.diffs.len(), rec.records.len() - kept);
}

#[test]
fn test_altered_prepare_vmcs12_fails_replay_naming_the_field() {
    let rec = golden_demo();
    let report = record::replay_with(
        &rec,
        ReplayFns {
            prepare_vmcs12: no_qualification,
            ..ReplayFns::default()
        },
    );
    let text = report.to_string();
    println!("{text}");
    assert!(!report.is_clean());
    assert!(
        text.contains("EXIT_QUALIFICATION (0x6400): recorded 0x3f80000"),
        "{text}"
    );
    assert!(!text.contains("VM_EXIT_REASON"), "{text}");
}

#[test]
fn test_corrupted_recordings_are_rejected_with_a_message() {
    let golden = golden_dir().join("demo.nvmxrec");
    let bytes = std::fs::read(&golden).unwrap();
    let dir = scratch("corrupt");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("flipped", {
            let mut b = bytes.clone();
            let n = b.len() - 100;
            b[n] ^= 0x40;
            b
        }),
        ("version", {
            let mut b = bytes.clone();
            b[8] = 0x7f;
            b
        }),
        ("trailing", {
            let mut b = bytes.clone();
            b.extend_from_slice(b"junk");
            b
        }),
    ];
    for (name, b) in cases {
        assert!(Recording::decode(&b).is_err(), "{name} decodes");
        let p = dir.join(name);
        std::fs::write(&p, &b).unwrap();
        let (code, out) = cli(&["replay", p.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {out:?}");
        assert!(
            out.iter().any(|l| l.starts_with("error: ")),
            "{name}: {out:?}"
        );
    }
    let (code, out) = cli(&["replay", dir.join("missing").to_str().unwrap()]);
    assert_eq!(code, 2, "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_vmcs_show_diff_and_extract_commands() {
    let dir = scratch("vmcs");
    let golden = golden_dir().join("demo.nvmxrec");
    let g = golden.to_str().unwrap();
    let before = dir.join("before.snap");
    let after = dir.join("after.snap");
    let rec = golden_demo();
    let seq = rec
        .records
        .iter()
        .find(|r| r.prepare.is_some())
        .expect("a reflected exit")
        .seq
        .to_string();
    let (c1, _) = cli(&[
        "vmcs",
        "extract",
        g,
        &seq,
        "--before",
        before.to_str().unwrap(),
    ]);
    let (c2, _) = cli(&["vmcs", "extract", g, &seq, after.to_str().unwrap()]);
    assert_eq!((c1, c2), (0, 0));
    let (code, out) = cli(&["vmcs", "show", after.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        out.iter().any(|l| l.starts_with("0x4402 VM_EXIT_REASON")),
        "{out:?}"
    );
    assert!(out.last().unwrap().contains("non-zero fields"));
    let (code, out) = cli(&[
        "vmcs",
        "diff",
        before.to_str().unwrap(),
        after.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "the exit changed vmcs12: {out:?}");
    assert!(out.iter().all(|l| l.contains(" -> ")), "{out:?}");
    let (code, out) = cli(&[
        "vmcs",
        "diff",
        after.to_str().unwrap(),
        after.to_str().unwrap(),
    ]);
    assert_eq!((code, out), (0, vec!["identical".to_string()]));
    let (code, out) = cli(&["vmcs", "extract", g, "999999", after.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(out[0].contains("exit #999999"), "{out:?}");
    std::fs::write(&before, b"garbage").unwrap();
    let (code, out) = cli(&["vmcs", "show", before.to_str().unwrap()]);
    assert_eq!(code, 2, "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_dump_vmcs_at_the_end_of_a_run() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("dump");
    let snap = dir.join("end.snap");
    let (code, _) = cli(&["demo", "--mem", "64", "--dump-vmcs", snap.to_str().unwrap()]);
    assert_eq!(code, 0);
    let v = trace::read_snapshot(&snap).expect("snapshot written");
    assert_eq!(v.get(VmcsField::VMCS_LINK_POINTER), u64::MAX);
    assert_ne!(v.get(VmcsField::HOST_RIP), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cost of the hooks with tracing off, next to the cost of an L2 exit
/// (printed; run with `--nocapture`). No timing assertion: the numbers go
/// to docs/tracing.md.
#[test]
fn test_print_tracing_off_cost_per_exit() {
    if !kvm_or_skip() {
        return;
    }
    let run = |trace_all: bool| {
        let start = std::time::Instant::now();
        let report = if trace_all {
            trace::capture(|| {
                run_kernel(
                    L1_GUEST_ELF,
                    &demo_options("demo", TraceArgs::default()),
                    Box::new(CaptureSink::new()),
                )
            })
            .0
        } else {
            run_kernel(
                L1_GUEST_ELF,
                &demo_options("demo", TraceArgs::default()),
                Box::new(CaptureSink::new()),
            )
        }
        .expect("demo boots");
        let exits: u64 = report.stats.l2_exits.iter().map(|r| r.2 + r.3).sum();
        (start.elapsed().as_secs_f64(), exits)
    };
    let _ = run(false);
    let (off, exits) =
        (0..3)
            .map(|_| run(false))
            .fold((f64::MAX, 0), |a, b| if b.0 < a.0 { b } else { a });
    let on = (0..3).map(|_| run(true).0).fold(f64::MAX, f64::min);
    let hook_ns = trace::disabled_hook_cost_ns(1_000_000);
    let per_exit_ns = off * 1e9 / exits.max(1) as f64;
    println!(
        "tracing off: demo {:.1} ms, {exits} L2 exits, {:.0} ns of run per L2 exit; \
         hooks with no subscriber {hook_ns:.1} ns per exit ({:.4}% of an exit); \
         all events captured: demo {:.1} ms ({:.2}x)",
        off * 1e3,
        per_exit_ns,
        100.0 * hook_ns / per_exit_ns,
        on * 1e3,
        on / off
    );
    assert!(hook_ns.is_finite() && per_exit_ns > 0.0);
}

#[test]
fn test_scenario_runs_write_a_json_trace() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("scenario");
    let json = dir.join("s.jsonl");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/any-reason-action.toml");
    let (code, out) = cli(&[
        "scenario",
        file.to_str().unwrap(),
        "--trace-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out:?}");
    let text = std::fs::read_to_string(&json).unwrap();
    let exits: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|v: &serde_json::Value| v["target"] == "nvmx::exit")
        .collect();
    assert!(!exits.is_empty(), "{text}");
    assert!(exits.iter().all(|v| v["fields"]["handler"].is_string()));
    let _ = std::fs::remove_dir_all(&dir);
}
