//! End-to-end suites: shared helpers.
//!
//! The suites in `tests/` boot kernels on the in-process L0
//! ([`l0_vmm::cli::run_kernel`]) with a [`CaptureSink`], then parse what
//! each level printed. The formats are those of `docs/l1-guest.md`
//! ("Output formats") and `docs/platform.md`; the parsers here are written
//! from those documents, not from the L1 source, so a format change that
//! breaks the documented contract fails the suites.
//!
//! Every helper that needs KVM returns `None` after
//! [`l0_vmm::test_support::kvm_or_skip`] said "skip" (it panics instead
//! when `REQUIRE_KVM=1`).

use std::sync::OnceLock;
use std::time::Duration;

use l0_vmm::cli::{run_kernel, BootOptions, VmxTrapPath};
use l0_vmm::devices::CaptureSink;
use l0_vmm::l1_run::{RunEnd, RunReport};

pub use l0_vmm::l1_image::L1_GUEST_ELF;
pub use l0_vmm::test_support::kvm_or_skip;

/// RAM given to the L1 hypervisor in these suites (L1 needs >= 16 MiB).
pub const L1_MEM_MIB: u64 = 64;

/// Upper bound for one run; a healthy run takes well under a second.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Process exit code for a debug-exit write of `v` to port 0xf4
/// (isa-debug-exit convention, docs/platform.md).
pub fn debug_exit_code(v: u32) -> i32 {
    ((v << 1) | 1) as i32
}

/// One finished run: how it ended and every line the sink received.
#[derive(Debug, Clone)]
pub struct Run {
    /// The command line the kernel was booted with.
    pub cmdline: String,
    /// L0's report (end, counters).
    pub report: RunReport,
    /// All output lines, prefixes included.
    pub lines: Vec<String>,
}

impl Run {
    /// Lines printed at `prefix` (`"[L0] "`, `"[L1] "`, `"[L2] "`) with the
    /// prefix removed.
    pub fn at(&self, prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    }

    /// L1's lines (UART output of the L1 kernel).
    pub fn l1(&self) -> Vec<&str> {
        self.at("[L1] ")
    }

    /// Lines of L1's guest that L0 printed itself (ports L1 does not intercept).
    pub fn l2(&self) -> Vec<&str> {
        self.at("[L2] ")
    }

    /// L0's own lines (load line, errors, summary).
    pub fn l0(&self) -> Vec<&str> {
        self.at("[L0] ")
    }

    /// The whole output, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "cmdline {:?}, end {:?}\n{}",
            self.cmdline,
            self.report.end,
            self.lines.join("\n")
        )
    }

    /// Every `exit reason=...` line L1 printed, in order.
    pub fn exits(&self) -> Vec<ExitLine> {
        self.l1().into_iter().filter_map(ExitLine::parse).collect()
    }

    /// Every `check NAME: ...` line L1 printed, in order.
    pub fn checks(&self) -> Vec<CheckLine> {
        self.l1().into_iter().filter_map(CheckLine::parse).collect()
    }

    /// The single `check NAME` line; panics (with the output) when it is
    /// missing or printed more than once.
    pub fn check(&self, name: &str) -> CheckLine {
        let found: Vec<CheckLine> = self
            .checks()
            .into_iter()
            .filter(|c| c.name == name)
            .collect();
        match found.as_slice() {
            [one] => one.clone(),
            [] => panic!("no `check {name}:` line in the output:\n{}", self.dump()),
            _ => panic!(
                "`check {name}:` printed {} times:\n{}",
                found.len(),
                self.dump()
            ),
        }
    }

    /// The `result test=MODE: P passed, F failed` line.
    pub fn result(&self) -> Option<ResultLine> {
        self.l1().into_iter().find_map(ResultLine::parse)
    }

    /// The status from L1's last line `L1: exit status S`.
    pub fn l1_exit_status(&self) -> Option<u32> {
        self.l1()
            .into_iter()
            .find_map(|l| l.strip_prefix("L1: exit status ")?.trim().parse().ok())
    }

    /// The L2 exit row of the summary for a basic exit reason:
    /// (handled by L0, reflected to L1); (0, 0) when there is no row.
    pub fn l2_exit_counts(&self, reason: u16) -> (u64, u64) {
        self.report
            .stats
            .l2_exits
            .iter()
            .find(|(r, ..)| *r == reason)
            .map_or((0, 0), |(_, _, l0, l1)| (*l0, *l1))
    }

    /// How often L0 trapped the VMX instruction `mnemonic` (lower case,
    /// as in the summary), 0 when not listed.
    pub fn vmx_count(&self, mnemonic: &str) -> u64 {
        self.report
            .stats
            .vmx_instructions
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(mnemonic))
            .map(|(_, n)| *n)
            .sum()
    }

    /// L1 exits (handled by L0) of `kind` as counted in the summary.
    pub fn l1_exit_count(&self, kind: &str) -> u64 {
        self.report.stats.l1_exits.get(kind).copied().unwrap_or(0)
    }
}

/// Boots `image` on the in-process L0 with the given command line and RAM.
/// Errors before the guest runs (bad image, KVM setup) come back as text.
pub fn boot(image: &[u8], cmdline: &str, mem_mib: u64) -> Result<Run, String> {
    boot_with(
        image,
        BootOptions {
            mem_mib,
            cmdline: cmdline.to_string(),
            timeout: Some(RUN_TIMEOUT),
            ..BootOptions::default()
        },
    )
}

/// Boots `image` with explicit options.
pub fn boot_with(image: &[u8], opts: BootOptions) -> Result<Run, String> {
    let sink = CaptureSink::new();
    let report = run_kernel(image, &opts, Box::new(sink.clone()))
        .map_err(|e| format!("run_kernel({opts:?}) failed before the guest ran: {e}"))?;
    Ok(Run {
        cmdline: opts.cmdline,
        report,
        lines: sink.lines(),
    })
}

/// Runs the `l0-vmm` command line in-process (`args` without the program
/// name) and returns the exit code and every line the sink received.
pub fn cli(args: &[&str]) -> (i32, Vec<String>) {
    let sink = CaptureSink::new();
    let mut argv = vec!["l0-vmm"];
    argv.extend_from_slice(args);
    let code = l0_vmm::cli::main_with_args(argv, Box::new(sink.clone()));
    (code, sink.lines())
}

/// A count row of the printed `[L0] ` summary: the line whose first word
/// is `key` and whose last word is a number (e.g. `vmx-trap-port   1`).
pub fn summary_row(lines: &[String], key: &str) -> Option<u64> {
    lines.iter().rev().find_map(|l| {
        let mut words = l.strip_prefix("[L0] ")?.split_whitespace();
        if words.next()? != key {
            return None;
        }
        words.last()?.parse().ok()
    })
}

/// Boots the built-in L1 hypervisor with `test=MODE`, VMX instructions
/// trapped on `path`; `None` when KVM is unavailable (skip the test).
pub fn boot_l1(mode: &str, path: VmxTrapPath) -> Option<Result<Run, String>> {
    if !kvm_or_skip() {
        return None;
    }
    Some(boot_with(
        L1_GUEST_ELF,
        BootOptions {
            mem_mib: L1_MEM_MIB,
            cmdline: format!("test={mode}"),
            timeout: Some(RUN_TIMEOUT),
            vmx_trap: path,
            ..BootOptions::default()
        },
    ))
}

/// Runs the L1 hypervisor in `mode` (default trap path) once per test
/// binary and shares the result between the tests that look at it.
/// `None` = skip (no KVM).
pub fn cached_l1(cell: &'static Cached, mode: &str) -> Option<&'static Run> {
    cached_l1_on(cell, mode, VmxTrapPath::EmulationFailure)
}

/// [`cached_l1`] with the VMX-instruction trap path chosen.
pub fn cached_l1_on(cell: &'static Cached, mode: &str, path: VmxTrapPath) -> Option<&'static Run> {
    // kvm_or_skip() first, in every test, so REQUIRE_KVM=1 fails each one.
    if !kvm_or_skip() {
        return None;
    }
    match cell.get_or_init(|| boot_l1(mode, path)) {
        None => None,
        Some(Ok(run)) => Some(run),
        Some(Err(e)) => panic!("{e}"),
    }
}

/// Asserts that L1 finished `mode` with every check passed: the result
/// line, `L1: exit status 0` and the debug exit (0 << 1) | 1.
pub fn assert_all_checks_passed(run: &Run, mode: &str) {
    let result = run
        .result()
        .unwrap_or_else(|| panic!("no result line:\n{}", run.dump()));
    assert_eq!(result.mode, mode, "{}", run.dump());
    assert_eq!(result.failed, 0, "{}", run.dump());
    assert!(result.passed > 0, "{}", run.dump());
    let failed: Vec<_> = run.checks().into_iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty(),
        "failed checks {failed:?}\n{}",
        run.dump()
    );
    assert_eq!(run.l1_exit_status(), Some(0), "{}", run.dump());
    assert_eq!(
        run.report.end,
        RunEnd::DebugExit(debug_exit_code(0)),
        "{}",
        run.dump()
    );
}

/// `exit reason=<d> (<name>) qual=0x<h> rip=0x<h> len=<d>[ entry-failure]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitLine {
    /// Basic exit reason (bits 15:0).
    pub reason: u32,
    /// L1's name for it.
    pub name: String,
    /// EXIT_QUALIFICATION.
    pub qualification: u64,
    /// GUEST_RIP at the exit.
    pub rip: u64,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub len: u32,
    /// Bit 31 of the exit reason.
    pub entry_failure: bool,
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

impl ExitLine {
    /// Parses one L1 line (prefix already removed).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("exit reason=")?;
        let (reason, rest) = rest.split_once(" (")?;
        let (name, rest) = rest.split_once(") qual=")?;
        let mut words = rest.split(' ');
        let qualification = hex(words.next()?)?;
        let rip = hex(words.next()?.strip_prefix("rip=")?)?;
        let len = words.next()?.strip_prefix("len=")?.parse().ok()?;
        let entry_failure = match words.next() {
            None => false,
            Some("entry-failure") => true,
            Some(_) => return None,
        };
        if words.next().is_some() || name.contains(' ') {
            return None;
        }
        Some(Self {
            reason: reason.parse().ok()?,
            name: name.to_string(),
            qualification,
            rip,
            len,
            entry_failure,
        })
    }
}

/// `check <name>: expected <E> got <G> ok|FAIL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// Check name.
    pub name: String,
    /// What L1 expected.
    pub expected: String,
    /// What L1 got.
    pub got: String,
    /// `ok` (true) or `FAIL`.
    pub ok: bool,
}

impl CheckLine {
    /// Parses one L1 line (prefix already removed).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("check ")?;
        let (name, rest) = rest.split_once(": expected ")?;
        let (rest, ok) = if let Some(r) = rest.strip_suffix(" ok") {
            (r, true)
        } else {
            (rest.strip_suffix(" FAIL")?, false)
        };
        let (expected, got) = rest.split_once(" got ")?;
        Some(Self {
            name: name.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
            ok,
        })
    }
}

/// `result test=<mode>: <P> passed, <F> failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLine {
    /// The mode.
    pub mode: String,
    /// Passed checks.
    pub passed: u32,
    /// Failed checks.
    pub failed: u32,
}

impl ResultLine {
    /// Parses one L1 line (prefix already removed).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("result test=")?;
        let (mode, rest) = rest.split_once(": ")?;
        let (passed, rest) = rest.split_once(" passed, ")?;
        let failed = rest.strip_suffix(" failed")?;
        Some(Self {
            mode: mode.to_string(),
            passed: passed.parse().ok()?,
            failed: failed.parse().ok()?,
        })
    }
}

/// Basic exit reasons (SDM Vol. 3D, Appendix C).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u32 = 0;
    /// HLT.
    pub const HLT: u32 = 12;
    /// I/O instruction.
    pub const IO: u32 = 30;
    /// RDMSR.
    pub const RDMSR: u32 = 31;
    /// WRMSR.
    pub const WRMSR: u32 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const INVALID_GUEST_STATE: u32 = 33;
}

/// The exit qualification of an I/O instruction (SDM Vol. 3C, 28.2.1,
/// Table 28-5), built from its parts: bits 2:0 size - 1, bit 3 direction
/// (1 = IN), bit 4 string, bit 5 REP, bit 6 operand encoding
/// (0 = DX, 1 = immediate), bits 31:16 port.
pub fn io_qualification(
    size: u8,
    is_in: bool,
    string: bool,
    rep: bool,
    imm: bool,
    port: u16,
) -> u64 {
    u64::from(size.saturating_sub(1) & 7)
        | u64::from(is_in) << 3
        | u64::from(string) << 4
        | u64::from(rep) << 5
        | u64::from(imm) << 6
        | u64::from(port) << 16
}

/// The parts of an ELF64 section header the symbol lookup needs.
#[derive(Debug, Clone, Copy)]
struct Section {
    ty: u32,
    offset: usize,
    size: usize,
    link: usize,
    entsize: usize,
}

/// A read-only view of an ELF64 file: symbols and loaded bytes.
#[derive(Debug, Clone, Copy)]
pub struct Elf<'a> {
    data: &'a [u8],
}

impl<'a> Elf<'a> {
    /// Checks the ELF64 little-endian identification.
    pub fn new(data: &'a [u8]) -> Option<Self> {
        (data.get(..6)? == b"\x7fELF\x02\x01").then_some(Self { data })
    }

    fn uint(&self, off: usize, n: usize) -> Option<u64> {
        let b = self.data.get(off..off.checked_add(n)?)?;
        Some(b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
    }

    fn usize_at(&self, off: usize, n: usize) -> Option<usize> {
        usize::try_from(self.uint(off, n)?).ok()
    }

    /// Section headers.
    fn sections(&self) -> Option<Vec<Section>> {
        let shoff = self.usize_at(0x28, 8)?;
        let shentsize = self.usize_at(0x3a, 2)?;
        let shnum = self.usize_at(0x3c, 2)?;
        (0..shnum)
            .map(|i| {
                let s = shoff.checked_add(i.checked_mul(shentsize)?)?;
                Some(Section {
                    ty: u32::try_from(self.uint(s + 4, 4)?).ok()?,
                    offset: self.usize_at(s + 0x18, 8)?,
                    size: self.usize_at(s + 0x20, 8)?,
                    link: self.usize_at(s + 0x28, 4)?,
                    entsize: self.usize_at(s + 0x38, 8)?,
                })
            })
            .collect()
    }

    /// Every (name, value) in the symbol table (`.symtab`, SHT_SYMTAB = 2).
    pub fn symbols(&self) -> Vec<(String, u64)> {
        let Some(sections) = self.sections() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for sym in &sections {
            // SHT_SYMTAB; Elf64_Sym is 24 bytes.
            if sym.ty != 2 || sym.entsize < 24 {
                continue;
            }
            let Some(strings) = sections.get(sym.link) else {
                continue;
            };
            let Some(strtab) = self
                .data
                .get(strings.offset..strings.offset.saturating_add(strings.size))
            else {
                continue;
            };
            for i in 0..sym.size / sym.entsize {
                let e = sym.offset + i * sym.entsize;
                let (Some(name_off), Some(value)) = (self.usize_at(e, 4), self.uint(e + 8, 8))
                else {
                    continue;
                };
                let Some(name) = strtab.get(name_off..) else {
                    continue;
                };
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                if end > 0 {
                    out.push((String::from_utf8_lossy(&name[..end]).into_owned(), value));
                }
            }
        }
        out
    }

    /// The address of symbol `name`.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols()
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
    }

    /// `len` bytes of the loaded image at physical address `addr`
    /// (through the `PT_LOAD` program headers; bss is not in the file).
    pub fn bytes_at(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let phoff = self.usize_at(0x20, 8)?;
        let phentsize = self.usize_at(0x36, 2)?;
        let phnum = self.usize_at(0x38, 2)?;
        for i in 0..phnum {
            let p = phoff.checked_add(i.checked_mul(phentsize)?)?;
            if self.uint(p, 4)? != 1 {
                continue;
            }
            let (offset, paddr, filesz) = (
                self.uint(p + 8, 8)?,
                self.uint(p + 0x18, 8)?,
                self.uint(p + 0x20, 8)?,
            );
            let end = addr.checked_add(len as u64)?;
            if addr >= paddr && end <= paddr.checked_add(filesz)? {
                let start = usize::try_from(offset.checked_add(addr - paddr)?).ok()?;
                return self.data.get(start..start.checked_add(len)?);
            }
        }
        None
    }

    /// Decodes the 64-bit code of symbol `name`: from its address up to
    /// the next higher symbol (at most `max` bytes); returns (address,
    /// length, mnemonic) of each instruction.
    pub fn disassemble(&self, name: &str, max: usize) -> Vec<(u64, usize, iced_x86::Mnemonic)> {
        let symbols = self.symbols();
        let Some(addr) = symbols.iter().find_map(|(n, v)| (n == name).then_some(*v)) else {
            return Vec::new();
        };
        let next = symbols
            .iter()
            .map(|&(_, v)| v)
            .filter(|&v| v > addr)
            .min()
            .unwrap_or(u64::MAX);
        let len = usize::try_from(next - addr).unwrap_or(max).min(max);
        let Some(code) = (1..=len).rev().find_map(|n| self.bytes_at(addr, n)) else {
            return Vec::new();
        };
        iced_x86::Decoder::with_ip(64, code, addr, iced_x86::DecoderOptions::NONE)
            .into_iter()
            .take_while(|i| !i.is_invalid())
            .map(|i| (i.ip(), i.len(), i.mnemonic()))
            .collect()
    }
}

/// A Multiboot v1 image with the a.out kludge (header flags bit 16):
/// header at file offset 0, everything loaded at `load_addr`, `code`
/// right after the 32-byte header, entry = first byte of `code`.
/// Multiboot 0.6.96, 3.1.1-3.1.3.
pub fn multiboot_kludge_image(load_addr: u32, code: &[u8]) -> Vec<u8> {
    const MAGIC: u32 = 0x1bad_b002;
    // Bit 1: memory information; bit 16: address fields valid.
    const FLAGS: u32 = 0x0001_0002;
    let checksum = 0u32.wrapping_sub(MAGIC).wrapping_sub(FLAGS);
    let header_len = 32u32;
    let load_end = load_addr + header_len + code.len() as u32;
    let mut image = Vec::new();
    for word in [
        MAGIC,
        FLAGS,
        checksum,
        load_addr, // header_addr: the header is the first thing loaded
        load_addr,
        load_end,
        load_end, // bss_end_addr: no bss
        load_addr + header_len,
    ] {
        image.extend_from_slice(&word.to_le_bytes());
    }
    image.extend_from_slice(code);
    image
}

/// Shares one result between the tests of a file (see [`cached_l1`]).
pub type Cached = OnceLock<Option<Result<Run, String>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_line_parses_the_documented_format() {
        let l = ExitLine::parse("exit reason=30 (I/O) qual=0x3f80000 rip=0x1000f5 len=1").unwrap();
        assert_eq!(
            l,
            ExitLine {
                reason: 30,
                name: "I/O".into(),
                qualification: 0x3f8_0000,
                rip: 0x1000f5,
                len: 1,
                entry_failure: false
            }
        );
        let f = ExitLine::parse(
            "exit reason=33 (invalid-guest-state) qual=0x0 rip=0x0 len=0 entry-failure",
        )
        .unwrap();
        assert!(f.entry_failure);
        assert_eq!(
            ExitLine::parse("exit reason=30 (I/O) qual=3f8 rip=0x1 len=1"),
            None
        );
        assert_eq!(
            ExitLine::parse("exit reason=30 (I/O) qual=0x1 rip=0x1 len=1 x"),
            None
        );
        assert_eq!(ExitLine::parse("L2> hello"), None);
    }

    #[test]
    fn test_check_and_result_lines_parse() {
        let c = CheckLine::parse(
            "check vmptrld-bad-revision: expected VMfailValid(11) got VMfailValid(11) ok",
        )
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.expected.as_str(), c.got.as_str(), c.ok),
            (
                "vmptrld-bad-revision",
                "VMfailValid(11)",
                "VMfailValid(11)",
                true
            )
        );
        let f = CheckLine::parse("check x: expected 0xb got VMfailInvalid FAIL").unwrap();
        assert!(!f.ok);
        assert_eq!(CheckLine::parse("check x: expected 1 got 2 maybe"), None);
        assert_eq!(
            ResultLine::parse("result test=demo: 6 passed, 0 failed"),
            Some(ResultLine {
                mode: "demo".into(),
                passed: 6,
                failed: 0
            })
        );
        assert_eq!(ResultLine::parse("result test=demo: 6 passed"), None);
    }

    #[test]
    fn test_io_qualification_matches_sdm_examples() {
        // OUT DX, AL to 0x3f8: size 1 -> 0, OUT, DX operand.
        assert_eq!(
            io_qualification(1, false, false, false, false, 0x3f8),
            0x03f8_0000
        );
        // IN EAX, 0x60 (immediate): size 4 -> 3, IN (bit 3), imm (bit 6).
        assert_eq!(
            io_qualification(4, true, false, false, true, 0x60),
            0x0060_004b
        );
        // REP OUTSW to DX=0x80: size 2 -> 1, string, rep.
        assert_eq!(
            io_qualification(2, false, true, true, false, 0x80),
            0x0080_0031
        );
    }

    #[test]
    fn test_multiboot_kludge_header_checksum() {
        let img = multiboot_kludge_image(0x10_0000, &[0xf4]);
        let w = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(w(0).wrapping_add(w(1)).wrapping_add(w(2)), 0);
        assert_eq!(w(7), 0x10_0020);
        assert_eq!(img.len(), 33);
    }

    #[test]
    fn test_elf_symbols_and_bytes_of_the_l1_image() {
        let elf = Elf::new(L1_GUEST_ELF).expect("the L1 image is ELF64");
        let demo = elf.symbol("l2_demo").expect("l2_demo in .symtab");
        assert!(elf.bytes_at(demo, 4).is_some());
        assert!(elf.bytes_at(u64::MAX - 1, 4).is_none());
        assert!(Elf::new(b"\x7fELF\x01\x01").is_none());
        let code = elf.disassemble("l2_puts", 4096);
        // l2_puts is `lodsb; test al, al; jz; out dx, al; jmp; ret`, and
        // the listing stops at the next symbol (l2_demo).
        assert_eq!(
            code.last().map(|c| c.2),
            Some(iced_x86::Mnemonic::Ret),
            "{code:?}"
        );
        assert!(
            code.iter().any(|&(_, _, m)| m == iced_x86::Mnemonic::Out),
            "{code:?}"
        );
    }
}
