//! How long an L2 VMCALL takes to reach L1 through the VMCALL watchdog
//! (issue #9, docs/vmcall-watchdog.md), next to an intercepted `out` as the
//! reference for an exit KVM reports at once.
//!
//! Two numbers:
//! - inside L0, for each VMCALL: the time from the VM entry (L1's
//!   VMRESUME) until L0 has exit 18 for L1 ([`VmcallWatchdogStats`]); L2
//!   reaches the VMCALL a few instructions after the entry, so this is the
//!   VMCALL's exit latency: the watchdog delay plus the kick's lateness;
//! - end to end: the built-in L1 runs a scenario (docs/scenarios.md) whose
//!   L2 executes the instruction in a loop that L1 resumes past, with `n`
//!   and `2n` iterations (fastest of three runs each); `(t(2n) - t(n)) / n`
//!   is one exit round trip (L2 runs into it, L0 reflects exit 18 or 30, L1
//!   handles it, prints its exit line and VMRESUMEs), without the boot.
//!
//! The watchdog runs have precise mode off (it would see the VMCALL coming
//! and never let L2 hang on it); one more pair of runs has it on, for
//! comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::{run_kernel, BootOptions};
use crate::devices::CaptureSink;
use crate::l1_image::L1_GUEST_ELF;
use crate::nested::VmcallWatchdogStats;
use crate::precise_decode::{self, PreciseMode};
use crate::scenario::{compile, image_with_scenario};

/// One exit round trip, measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmcallBench {
    /// The watchdog setting used.
    pub watchdog: Option<Duration>,
    /// Iterations of the shorter run.
    pub n: u32,
    /// An L2 VMCALL until L1 resumes L2 past it (end to end).
    pub vmcall: Duration,
    /// An intercepted `out 0x80, al` until L1 resumes L2 past it.
    pub io_out: Duration,
    /// An L2 VMCALL with precise mode on (caught by decoding ahead).
    pub vmcall_precise: Duration,
    /// Inside L0: VM entry to exit 18, per VMCALL (the `2n` runs).
    pub latency: VmcallWatchdogStats,
}

impl std::fmt::Display for VmcallBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let wd = self
            .watchdog
            .map_or_else(|| "off".to_string(), |d| format!("{d:?}"));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "VMCALL exit via the watchdog ({wd}): VM entry to exit 18 {:.3} ms mean ({:.3} min, {:.3} max, {} VMCALLs); round trip to L1 and back {:.3} ms; VMCALL in precise mode {:.3} ms; intercepted OUT {:.3} ms (n = {})",
            ms(self.latency.mean().unwrap_or_default()),
            ms(self.latency.min),
            ms(self.latency.max),
            self.latency.vmcalls,
            ms(self.vmcall),
            ms(self.vmcall_precise),
            ms(self.io_out),
            self.n
        )
    }
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum VmcallBenchError {
    /// The generated scenario did not compile (a bug here).
    #[error("the benchmark scenario does not compile: {0}")]
    Scenario(String),
    /// L0 could not start.
    #[error("cannot boot L1: {0}")]
    Boot(String),
    /// The run did not end as the scenario says (a VMCALL got lost?).
    #[error("the {what} run with {n} iterations did not finish: {end}; try a longer watchdog or a larger timeout")]
    Run {
        /// Which loop.
        what: &'static str,
        /// Iterations.
        n: u32,
        /// How it ended.
        end: String,
    },
}

/// The L2 loop: `insn` `n` times (RCX counts down), then HLT; L1 advances
/// past each exit of `reason` and stops at the HLT.
fn scenario(insn: &str, reason: &str, io_bitmap: &str, n: u32) -> String {
    format!(
        r#"
[l1]
{io_bitmap}
max_exits = {max}
on_exit = [{{ reason = "{reason}", action = "advance" }}, {{ reason = "hlt", action = "stop" }}]

[l2]
registers = {{ rcx = {n} }}
code = """
l:  {insn}
    dec rcx
    jnz l
    hlt
"""

[expect]
registers = {{ rcx = 0 }}
"#,
        max = n.saturating_add(8)
    )
}

/// Wall time of one run of the loop, and the watchdog's counters.
fn time_run(
    what: &'static str,
    text: &str,
    n: u32,
    watchdog: Option<Duration>,
    precise: PreciseMode,
) -> Result<(Duration, VmcallWatchdogStats), VmcallBenchError> {
    let c =
        compile(text, Path::new(what)).map_err(|e| VmcallBenchError::Scenario(e.to_string()))?;
    let image = image_with_scenario(L1_GUEST_ELF, &c.blob).map_err(VmcallBenchError::Scenario)?;
    let opts = BootOptions {
        mem_mib: 64,
        cmdline: "test=scenario".into(),
        timeout: Some(Duration::from_secs(120)),
        vmcall_watchdog: watchdog,
        ..Default::default()
    };
    let sink = CaptureSink::new();
    let before = precise_decode::thread_default();
    precise_decode::set_thread_default(precise);
    let t = Instant::now();
    let report = run_kernel(&image, &opts, Box::new(sink.clone()));
    let took = t.elapsed();
    precise_decode::set_thread_default(before);
    let report = report.map_err(|e| VmcallBenchError::Boot(e.to_string()))?;
    let l2_exits: u64 = report.stats.l2_exits.iter().map(|r| r.3).sum();
    if l2_exits < u64::from(n) {
        return Err(VmcallBenchError::Run {
            what,
            n,
            end: format!("{} after {l2_exits} exits to L1", report.end.describe()),
        });
    }
    Ok((took, report.stats.vmcall_watchdog))
}

/// Runs of each length (the fastest counts: noise only adds time).
const RUNS: usize = 3;

/// Cost of one exit round trip of `insn`: (t(2n) - t(n)) / n, and the
/// watchdog's counters of the last `2n` run.
fn per_exit(
    what: &'static str,
    insn: &str,
    reason: &str,
    io_bitmap: &str,
    n: u32,
    watchdog: Option<Duration>,
    precise: PreciseMode,
) -> Result<(Duration, VmcallWatchdogStats), VmcallBenchError> {
    let fastest = |k: u32| -> Result<(Duration, VmcallWatchdogStats), VmcallBenchError> {
        let text = scenario(insn, reason, io_bitmap, k);
        let mut best: Option<(Duration, VmcallWatchdogStats)> = None;
        for _ in 0..RUNS {
            let r = time_run(what, &text, k, watchdog, precise)?;
            best = Some(match best {
                Some(b) if b.0 <= r.0 => (b.0, r.1),
                _ => r,
            });
        }
        Ok(best.unwrap_or_default())
    };
    let (short, _) = fastest(n)?;
    let (long, stats) = fastest(n.saturating_mul(2))?;
    Ok((long.saturating_sub(short) / n.max(1), stats))
}

/// Measures an L2 VMCALL exit through the VMCALL watchdog set to
/// `watchdog` (precise mode off) and, for reference, the same VMCALL in
/// precise mode and an intercepted OUT, `n` and `2n` times each (fastest of
/// three), on KVM. Takes 18 boots of L1 plus 6n VMCALL waits.
pub fn measure_vmcall_watchdog(
    watchdog: Duration,
    n: u32,
) -> Result<VmcallBench, VmcallBenchError> {
    let n = n.max(1);
    let wd = Some(watchdog);
    let off = PreciseMode::Off;
    let (vmcall, latency) = per_exit("vmcall", "vmcall", "vmcall", "", n, wd, off)?;
    let (vmcall_precise, _) = per_exit("vmcall", "vmcall", "vmcall", "", n, wd, PreciseMode::On)?;
    let out = "out 0x80, al";
    let (io_out, _) = per_exit("out", out, "io", "io_bitmap = [0x80]", n, wd, off)?;
    Ok(VmcallBench {
        watchdog: Some(watchdog),
        n,
        vmcall,
        io_out,
        vmcall_precise,
        latency,
    })
}

/// Inside L0 only: one boot whose L2 executes `n` VMCALLs with precise
/// mode off; VM entry to exit 18 for each (the watchdog delay plus the
/// kick's lateness).
pub fn measure_vmcall_latency(
    watchdog: Duration,
    n: u32,
) -> Result<VmcallWatchdogStats, VmcallBenchError> {
    let n = n.max(1);
    let text = scenario("vmcall", "vmcall", "", n);
    let (_, stats) = time_run("vmcall", &text, n, Some(watchdog), PreciseMode::Off)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::kvm_or_skip;

    #[test]
    fn test_benchmark_scenarios_compile() {
        for (insn, reason, bitmap) in [
            ("vmcall", "vmcall", ""),
            ("out 0x80, al", "io", "io_bitmap = [0x80]"),
        ] {
            let text = scenario(insn, reason, bitmap, 10);
            compile(&text, Path::new("bench")).unwrap();
        }
    }

    /// Inside L0 every VMCALL waits at least the watchdog delay and not
    /// much more (`-- --nocapture` prints the numbers).
    #[test]
    fn test_kvm_vmcall_exit_takes_about_the_watchdog_delay() {
        if !kvm_or_skip() {
            return;
        }
        for ms in [2, 5] {
            let wd = Duration::from_millis(ms);
            let s = measure_vmcall_latency(wd, 20).unwrap();
            let mean = s.mean().unwrap_or_default();
            eprintln!("watchdog {wd:?}: VM entry to exit 18 {mean:?} mean, {:?} min, {:?} max, {} VMCALLs, {} kicks", s.min, s.max, s.vmcalls, s.kicks);
            assert_eq!(s.vmcalls, 20, "{s:?}");
            assert!(s.min >= wd, "{s:?}");
            // Very generous: tests run in parallel on a loaded 2-core
            // machine (measured there: 2 ms -> 3-19 ms mean). A lost kick
            // would hang L2 until the run's timeout.
            assert!(mean < wd + Duration::from_millis(100), "{s:?}");
        }
    }

    /// The suite runs with precise mode on, which catches VMCALL before L2
    /// hangs on it: here the `vmcall-*` scenarios run with it off, so
    /// every VMCALL goes through the watchdog (L0 kicks L2's vCPU).
    #[test]
    fn test_kvm_vmcall_scenarios_pass_through_the_watchdog() {
        if !kvm_or_skip() {
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmcall-") && n.ends_with(".toml"))
            })
            .collect();
        files.sort();
        assert!(files.len() >= 4, "{files:?}");
        let before = precise_decode::thread_default();
        precise_decode::set_thread_default(PreciseMode::Off);
        let results: Vec<_> = files
            .iter()
            .map(|f| crate::scenario::run_scenario_file(f).map(|r| (r.passed, r.diff)))
            .collect();
        precise_decode::set_thread_default(before);
        for (f, r) in files.iter().zip(results) {
            let (passed, diff) = r.unwrap();
            assert!(passed, "{}:\n{diff}", f.display());
        }
    }

    /// The whole comparison (18 boots; `cargo test -p l0-vmm --lib
    /// vmcall_bench -- --ignored --nocapture`): only printed, the
    /// end-to-end numbers depend on the machine's load.
    #[test]
    #[ignore]
    fn test_kvm_print_vmcall_benchmark() {
        if !kvm_or_skip() {
            return;
        }
        let b = measure_vmcall_watchdog(Duration::from_millis(5), 10).unwrap();
        eprintln!("{b}");
        assert_eq!(b.latency.vmcalls, 20, "{b}");
    }
}
