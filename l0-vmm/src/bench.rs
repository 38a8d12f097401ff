//! `l0-vmm bench`: what precise mode costs (issue #9).
//!
//! Each workload is an L2 program run by the built-in L1 in scenario mode
//! (`scenario.rs`: L1 builds the VMCS, launches L2 and handles its exits by
//! advancing RIP) on KVM, twice with different loop counts; the difference
//! between the two runs removes the boot and setup cost. Printed per
//! workload and precise-mode setting: L2 instructions retired per `KVM_RUN`
//! of the L2 vCPU (each run ends in one KVM exit), per `KVM_RUN` of both
//! vCPUs, and the wall time per loop iteration (for the CPUID and VMCALL
//! loops: one exit reflected to L1 and L1's VMRESUME).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::{run_kernel, BootOptions};
use crate::devices::{CaptureSink, OutputSink};
use crate::l1_image::L1_GUEST_ELF;
use crate::precise_decode::{self, PreciseMode};
use crate::scenario::{compile, image_with_scenario};

/// One L2 program.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Short name.
    pub name: &'static str,
    /// What it shows.
    pub what: &'static str,
    /// L2 code; `{N}` is replaced by the loop count.
    pub code: &'static str,
    /// Instructions L2 retires per iteration (an instruction that exits to
    /// L1 counts: L1 completes it).
    pub per_iteration: u64,
    /// Exit reasons L1 advances over (scenario `on_exit` names).
    pub l1_handles: &'static [&'static str],
    /// Loop counts of the two runs (precise on, precise off).
    pub counts_on: (u64, u64),
    /// Loop counts with precise mode off.
    pub counts_off: (u64, u64),
}

/// The workloads `l0-vmm bench` runs.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "compute",
        what: "ALU loop (add, xor, imul, dec, jnz): no exit L1 asks for",
        code: "    mov ecx, {N}\nl:  add eax, ecx\n    xor ebx, eax\n    imul edx, ebx, 3\n    dec ecx\n    jnz l\n    hlt\n",
        per_iteration: 5,
        l1_handles: &[],
        counts_on: (200_000, 2_000_000),
        counts_off: (200_000, 2_000_000),
    },
    Workload {
        name: "call-ret",
        what: "the same ALU work in a function called every iteration (RET is a transfer L0 steps)",
        code: "    mov ecx, {N}\nl:  call f\n    dec ecx\n    jnz l\n    hlt\nf:  add eax, ecx\n    xor ebx, eax\n    imul edx, ebx, 3\n    ret\n",
        per_iteration: 7,
        l1_handles: &[],
        counts_on: (500, 5_000),
        counts_off: (200_000, 2_000_000),
    },
    Workload {
        name: "cpuid",
        what: "CPUID-heavy loop (mov eax, 0; cpuid; add; dec; jnz): every CPUID exits to L1",
        code: "    mov r9, {N}\nl:  mov eax, 0\n    cpuid\n    add r10, 1\n    dec r9\n    jnz l\n    hlt\n",
        per_iteration: 5,
        l1_handles: &["cpuid"],
        counts_on: (100, 1_000),
        counts_off: (10_000, 100_000),
    },
    Workload {
        name: "vmcall",
        what: "VMCALL loop: precise mode stops at it; off, the VMCALL watchdog kicks the vCPU",
        code: "    mov r9, {N}\nl:  vmcall\n    dec r9\n    jnz l\n    hlt\n",
        per_iteration: 3,
        l1_handles: &["vmcall"],
        counts_on: (100, 1_000),
        counts_off: (10, 100),
    },
];

/// The measurement of one workload under one precise-mode setting.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// Workload name.
    pub name: &'static str,
    /// The setting.
    pub precise: PreciseMode,
    /// Extra loop iterations of the second run.
    pub iterations: u64,
    /// Extra L2 instructions retired.
    pub l2_instructions: u64,
    /// Extra `KVM_RUN`s of the L2 vCPU.
    pub l2_runs: u64,
    /// Extra `KVM_RUN`s of the L1 vCPU.
    pub l1_runs: u64,
    /// Extra exits reflected to L1.
    pub reflected: u64,
    /// Extra wall time.
    pub wall: Duration,
}

impl BenchRow {
    /// L2 instructions retired per L2 `KVM_RUN`.
    pub fn per_l2_exit(&self) -> f64 {
        self.l2_instructions as f64 / self.l2_runs.max(1) as f64
    }

    /// L2 instructions retired per `KVM_RUN` of either vCPU.
    pub fn per_exit(&self) -> f64 {
        self.l2_instructions as f64 / (self.l2_runs + self.l1_runs).max(1) as f64
    }

    /// Wall time per loop iteration in microseconds.
    pub fn us_per_iteration(&self) -> f64 {
        self.wall.as_secs_f64() * 1e6 / self.iterations.max(1) as f64
    }
}

/// What one run gave.
#[derive(Debug, Clone, Copy, Default)]
struct RunCounts {
    l2_runs: u64,
    l1_runs: u64,
    reflected: u64,
    wall: Duration,
}

fn scenario_text(w: &Workload, n: u64) -> String {
    let mut on_exit: Vec<String> = w
        .l1_handles
        .iter()
        .map(|r| format!("{{ reason = \"{r}\" }}"))
        .collect();
    on_exit.push("{ reason = \"hlt\", action = \"stop\" }".into());
    format!(
        "name = \"bench-{}\"\n[l1]\nmax_exits = {}\non_exit = [{}]\n[l2]\ncode = \"\"\"\n{}\"\"\"\n",
        w.name,
        n.saturating_add(16).min(u64::from(u32::MAX)),
        on_exit.join(", "),
        w.code.replace("{N}", &n.to_string())
    )
}

fn run_once(w: &Workload, n: u64, mode: PreciseMode) -> Result<RunCounts, String> {
    let text = scenario_text(w, n);
    let c = compile(&text, Path::new("bench.toml")).map_err(|e| e.to_string())?;
    let image = image_with_scenario(L1_GUEST_ELF, &c.blob)?;
    let opts = BootOptions {
        mem_mib: 64,
        cmdline: "test=scenario".into(),
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let before = precise_decode::thread_default();
    precise_decode::set_thread_default(mode);
    let start = Instant::now();
    let report = run_kernel(&image, &opts, Box::new(CaptureSink::new()));
    let wall = start.elapsed();
    precise_decode::set_thread_default(before);
    let report = report.map_err(|e| e.to_string())?;
    let reflected = report.stats.l2_exits.iter().map(|r| r.3).sum();
    Ok(RunCounts {
        l2_runs: report.stats.l2_ioctls.map_or(0, |c| c.kvm_run),
        l1_runs: report.stats.l1_ioctls.kvm_run,
        reflected,
        wall,
    })
}

/// Runs `w` twice under `mode` and returns the difference.
pub fn measure(w: &Workload, mode: PreciseMode) -> Result<BenchRow, String> {
    let (small, big) = match mode {
        PreciseMode::On => w.counts_on,
        PreciseMode::Off => w.counts_off,
    };
    let a = run_once(w, small, mode)?;
    let b = run_once(w, big, mode)?;
    let iterations = big - small;
    Ok(BenchRow {
        name: w.name,
        precise: mode,
        iterations,
        l2_instructions: iterations * w.per_iteration,
        l2_runs: b.l2_runs.saturating_sub(a.l2_runs),
        l1_runs: b.l1_runs.saturating_sub(a.l1_runs),
        reflected: b.reflected.saturating_sub(a.reflected),
        wall: b.wall.saturating_sub(a.wall),
    })
}

/// One line per row.
pub fn format_row(r: &BenchRow) -> String {
    format!(
        "{:<9} precise {:<3}  {:>9} iter  {:>12.1} L2 instr/L2 exit  {:>12.1} instr/exit (L1+L2)  {:>8} L2 runs  {:>7} reflected  {:>9.2} us/iter",
        r.name,
        match r.precise {
            PreciseMode::On => "on",
            PreciseMode::Off => "off",
        },
        r.iterations,
        r.per_l2_exit(),
        r.per_exit(),
        r.l2_runs,
        r.reflected,
        r.us_per_iteration()
    )
}

/// `l0-vmm bench`: every workload with precise mode on and off; returns
/// the process exit status (0 unless a run failed).
pub fn run(out: &mut dyn OutputSink) -> i32 {
    out.write_line(
        "precise-mode bench: differences between two runs of each L2 loop (boot cost removed)",
    );
    let mut status = 0;
    for w in WORKLOADS {
        out.write_line(&format!("{}: {}", w.name, w.what));
        for mode in [PreciseMode::On, PreciseMode::Off] {
            match measure(w, mode) {
                Ok(r) => out.write_line(&format!("  {}", format_row(&r))),
                Err(e) => {
                    status = 1;
                    out.write_line(&format!("  {} precise {mode:?}: failed: {e}", w.name));
                }
            }
        }
    }
    out.write_line(
        "us/iter of cpuid/vmcall with precise on = one exit reflected to L1 and resumed; with precise off CPUID never reaches L1 (KVM answers it)",
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_workload_compiles_as_a_scenario() {
        for w in WORKLOADS {
            let text = scenario_text(w, 10);
            compile(&text, Path::new("bench.toml")).unwrap_or_else(|e| panic!("{}: {e}", w.name));
        }
    }

    #[test]
    fn test_row_ratios() {
        let r = BenchRow {
            name: "x",
            precise: PreciseMode::On,
            iterations: 10,
            l2_instructions: 50,
            l2_runs: 10,
            l1_runs: 15,
            reflected: 10,
            wall: Duration::from_micros(100),
        };
        assert_eq!(r.per_l2_exit(), 5.0);
        assert_eq!(r.per_exit(), 2.0);
        assert_eq!(r.us_per_iteration(), 10.0);
        assert!(format_row(&r).contains("precise on"));
    }

    /// On KVM: precise mode keeps the compute loop at >= 5 L2 instructions
    /// per L2 exit (the goal of issue #9) and CPUID reaches L1 every time.
    #[test]
    fn test_kvm_bench_goals() {
        if !crate::test_support::kvm_or_skip() {
            return;
        }
        let w = Workload {
            counts_on: (2_000, 20_000),
            ..WORKLOADS[0]
        };
        let compute = measure(&w, PreciseMode::On).unwrap();
        assert!(compute.per_l2_exit() >= 5.0, "{}", format_row(&compute));
        let w = Workload {
            counts_on: (10, 60),
            ..WORKLOADS[2]
        };
        let cpuid = measure(&w, PreciseMode::On).unwrap();
        assert_eq!(cpuid.reflected, 50, "{}", format_row(&cpuid));
    }
}
