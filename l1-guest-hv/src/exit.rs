//! What L1 prints about VM exits and VMX outcomes. The formats are a
//! contract with the end-to-end tests (see `docs/l1-guest.md`):
//!
//! ```text
//! exit reason=30 (I/O) qual=0x3f80000 rip=0x10a2c4 len=1
//! exit reason=33 (invalid-guest-state) qual=0x0 rip=0x10a2c4 len=0 entry-failure
//! check vmptrld-bad-revision: expected VMfailValid(11) got VMfailValid(11) ok
//! ```

use core::fmt;
use vmcs12::{VmxFault, VmxOutcome};

use crate::text::{Dec, Emit, FmtSink, Hex, Sink};

/// VM_EXIT_REASON bit 31: VM-entry failure.
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// Basic exit reason numbers L1 handles (SDM Vol. 3, Appendix C).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u16 = 0;
    /// Triple fault.
    pub const TRIPLE_FAULT: u16 = 2;
    /// CPUID.
    pub const CPUID: u16 = 10;
    /// HLT.
    pub const HLT: u16 = 12;
    /// I/O instruction.
    pub const IO: u16 = 30;
    /// RDMSR.
    pub const RDMSR: u16 = 31;
    /// WRMSR.
    pub const WRMSR: u16 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const INVALID_GUEST_STATE: u16 = 33;
    /// VM-entry failure due to MSR loading.
    pub const MSR_LOAD_FAIL: u16 = 34;
    /// EPT violation.
    pub const EPT_VIOLATION: u16 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u16 = 49;
}

/// Short name of a basic exit reason, without spaces (for parsing).
pub fn reason_name(basic: u16) -> &'static str {
    match basic {
        0 => "exception-or-NMI",
        1 => "external-interrupt",
        2 => "triple-fault",
        3 => "INIT",
        4 => "SIPI",
        5 => "I/O-SMI",
        6 => "other-SMI",
        7 => "interrupt-window",
        8 => "NMI-window",
        9 => "task-switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "CR-access",
        29 => "MOV-DR",
        30 => "I/O",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "invalid-guest-state",
        34 => "MSR-loading",
        36 => "MWAIT",
        37 => "monitor-trap-flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "machine-check",
        43 => "TPR-below-threshold",
        44 => "APIC-access",
        45 => "virtualized-EOI",
        46 => "GDTR/IDTR-access",
        47 => "LDTR/TR-access",
        48 => "EPT-violation",
        49 => "EPT-misconfig",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "preemption-timer",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC-write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "PML-full",
        63 => "XSAVES",
        64 => "XRSTORS",
        _ => "unknown",
    }
}

/// The per-exit line L1 prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitLine {
    /// VM_EXIT_REASON (full 32 bits).
    pub reason: u32,
    /// EXIT_QUALIFICATION.
    pub qualification: u64,
    /// GUEST_RIP.
    pub rip: u64,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub instruction_len: u32,
}

impl ExitLine {
    /// Bits 15:0 of the exit reason.
    pub fn basic(&self) -> u16 {
        self.reason as u16
    }

    /// Whether bit 31 (VM-entry failure) is set.
    pub fn entry_failure(&self) -> bool {
        self.reason & EXIT_REASON_ENTRY_FAILURE != 0
    }
}

impl Emit for ExitLine {
    fn emit(&self, out: &mut dyn Sink) {
        out.put("exit reason=");
        Dec(self.basic().into()).emit(out);
        out.put(" (");
        out.put(reason_name(self.basic()));
        out.put(") qual=");
        Hex(self.qualification).emit(out);
        out.put(" rip=");
        Hex(self.rip).emit(out);
        out.put(" len=");
        Dec(self.instruction_len.into()).emit(out);
        if self.entry_failure() {
            out.put(" entry-failure");
        }
    }
}

impl fmt::Display for ExitLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        FmtSink::write(f, self)
    }
}

/// An I/O-instruction exit qualification (SDM 28.2.1, Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQualification {
    /// Access size in bytes (1, 2 or 4).
    pub size: u8,
    /// IN (true) or OUT (false).
    pub is_in: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// Port given as an immediate (true) or in DX (false).
    pub immediate: bool,
    /// Port number.
    pub port: u16,
}

impl IoQualification {
    /// Decodes the qualification; `None` for a size encoding the SDM does
    /// not define (bits 2:0 must be 0, 1 or 3).
    pub fn decode(qual: u64) -> Option<Self> {
        let size = match qual & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return None,
        };
        Some(Self {
            size,
            is_in: qual & (1 << 3) != 0,
            string: qual & (1 << 4) != 0,
            rep: qual & (1 << 5) != 0,
            immediate: qual & (1 << 6) != 0,
            port: (qual >> 16) as u16,
        })
    }
}

/// Displays a VMX outcome the way the `check` lines print it:
/// `VMsucceed`, `VMfailInvalid`, `VMfailValid(11)`, `fault(#UD)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowOutcome(pub VmxOutcome);

impl Emit for ShowOutcome {
    fn emit(&self, out: &mut dyn Sink) {
        match self.0 {
            VmxOutcome::Succeed => out.put("VMsucceed"),
            VmxOutcome::FailInvalid => out.put("VMfailInvalid"),
            VmxOutcome::FailValid(e) => {
                out.put("VMfailValid(");
                Dec(e.number().into()).emit(out);
                out.put(")");
            }
            VmxOutcome::Fault(VmxFault::InvalidOpcode) => out.put("fault(#UD)"),
            VmxOutcome::Fault(VmxFault::GeneralProtection) => out.put("fault(#GP)"),
            VmxOutcome::Fault(VmxFault::StackFault) => out.put("fault(#SS)"),
            VmxOutcome::Fault(VmxFault::PageFault { .. }) => out.put("fault(#PF)"),
        }
    }
}

impl fmt::Display for ShowOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        FmtSink::write(f, self)
    }
}

/// `0x...` for a value, the outcome otherwise (VMREAD/VMPTRST results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowResult(pub Result<u64, VmxOutcome>);

impl fmt::Display for ShowResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        FmtSink::write(f, self)
    }
}

impl Emit for ShowResult {
    fn emit(&self, out: &mut dyn Sink) {
        match self.0 {
            Ok(v) => Hex(v).emit(out),
            Err(o) => ShowOutcome(o).emit(out),
        }
    }
}

/// Collects the bytes L2 writes to its console into lines, so L1 prints
/// them as `L2> text`.
#[derive(Debug, Clone)]
pub struct LineBuffer {
    buf: [u8; 120],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; 120],
            len: 0,
        }
    }

    /// Adds a byte; returns a complete line (without the newline) when the
    /// byte ends one or fills the buffer (120 bytes). `\r` is dropped; other
    /// non-printable bytes become `.`.
    pub fn push(&mut self, byte: u8) -> Option<&str> {
        match byte {
            b'\n' => return Some(self.take()),
            b'\r' => return None,
            0x20..=0x7e => {}
            _ => return self.push(b'.'),
        }
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
        if self.len == self.buf.len() {
            // Full: hand the line out now rather than drop bytes.
            return Some(self.take());
        }
        None
    }

    /// Takes whatever is buffered (for the final partial line).
    pub fn take(&mut self) -> &str {
        let len = core::mem::take(&mut self.len);
        // Only printable ASCII is ever stored, so this is valid UTF-8.
        core::str::from_utf8(self.buf.get(..len).unwrap_or(&[])).unwrap_or("")
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The number written as `KEY0x<hex>` in a console line (how L2 reports
/// values, e.g. `#GP error=0x000000000000abc0`); `None` when the key is
/// missing or not followed by 1-16 hex digits.
pub fn hex_field(line: &str, key: &str) -> Option<u64> {
    // Plain byte loops: `str::find` and `from_str_radix` would pull SSE
    // code and `core::fmt` from the precompiled `core` (see `text.rs`).
    let (bytes, key) = (line.as_bytes(), key.as_bytes());
    let start = (0..bytes.len()).find(|&i| bytes.get(i..i + key.len()) == Some(key))? + key.len();
    let rest = bytes.get(start..)?.strip_prefix(b"0x")?;
    let mut value = 0u64;
    let mut digits = 0;
    for &b in rest {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        digits += 1;
        if digits > 16 {
            return None;
        }
        value = (value << 4) | u64::from(d);
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::String;
    use vmcs12::VmInstructionError;

    #[test]
    fn test_exit_line_format() {
        let line = ExitLine {
            reason: 30,
            qualification: 0x3f8_0000,
            rip: 0x10_a2c4,
            instruction_len: 1,
        };
        assert_eq!(
            format!("{line}"),
            "exit reason=30 (I/O) qual=0x3f80000 rip=0x10a2c4 len=1"
        );
    }

    #[test]
    fn test_entry_failure_line() {
        let line = ExitLine {
            reason: 33 | EXIT_REASON_ENTRY_FAILURE,
            qualification: 0,
            rip: 0x1000,
            instruction_len: 0,
        };
        assert!(line.entry_failure());
        assert_eq!(line.basic(), 33);
        assert_eq!(
            format!("{line}"),
            "exit reason=33 (invalid-guest-state) qual=0x0 rip=0x1000 len=0 entry-failure"
        );
    }

    #[test]
    fn test_reason_names_have_no_spaces() {
        for r in 0..80u16 {
            assert!(!reason_name(r).contains(' '), "{r}");
        }
        assert_eq!(reason_name(12), "HLT");
        assert_eq!(reason_name(35), "unknown");
    }

    #[test]
    fn test_io_qualification_decode() {
        let q = IoQualification::decode(0x3f8_0000).unwrap();
        assert_eq!(
            (q.port, q.size, q.is_in, q.immediate),
            (0x3f8, 1, false, false)
        );
        let q = IoQualification::decode(0x00e9_0048 | 3).unwrap();
        assert_eq!(
            (q.port, q.size, q.is_in, q.immediate),
            (0xe9, 4, true, true)
        );
        assert_eq!(IoQualification::decode(2), None);
        assert_eq!(IoQualification::decode(0x3f8_0004), None);
    }

    #[test]
    fn test_outcome_display() {
        let v = VmxOutcome::FailValid(VmInstructionError::VmptrldIncorrectRevisionId);
        assert_eq!(format!("{}", ShowOutcome(v)), "VMfailValid(11)");
        assert_eq!(format!("{}", ShowOutcome(VmxOutcome::Succeed)), "VMsucceed");
        assert_eq!(
            format!("{}", ShowOutcome(VmxOutcome::FailInvalid)),
            "VMfailInvalid"
        );
        assert_eq!(
            format!(
                "{}",
                ShowOutcome(VmxOutcome::Fault(VmxFault::InvalidOpcode))
            ),
            "fault(#UD)"
        );
        assert_eq!(format!("{}", ShowResult(Ok(0xb))), "0xb");
        assert_eq!(
            format!("{}", ShowResult(Err(VmxOutcome::FailInvalid))),
            "VMfailInvalid"
        );
    }

    #[test]
    fn test_line_buffer_splits_lines() {
        let mut b = LineBuffer::new();
        let mut lines: std::vec::Vec<String> = std::vec::Vec::new();
        for &c in b"hello\r\nfrom\x01L2\n" {
            if let Some(l) = b.push(c) {
                lines.push(l.into());
            }
        }
        assert_eq!(lines, ["hello", "from.L2"]);
        assert!(b.is_empty());
    }

    #[test]
    fn test_hex_field() {
        let line = "#GP error=0x000000000000abc0 rip=0x0000000000100a2c";
        assert_eq!(hex_field(line, "error="), Some(0xabc0));
        assert_eq!(hex_field(line, "rip="), Some(0x10_0a2c));
        assert_eq!(hex_field(line, "cs="), None);
        assert_eq!(hex_field("v=0x", "v="), None);
        assert_eq!(hex_field("v=12", "v="), None);
        assert_eq!(hex_field("v=0x12345678123456789", "v="), None);
        assert_eq!(hex_field("v=0xFFz", "v="), Some(0xff));
    }

    #[test]
    fn test_line_buffer_flushes_when_full() {
        let mut b = LineBuffer::new();
        for _ in 0..119 {
            assert_eq!(b.push(b'x'), None);
        }
        assert_eq!(b.push(b'y').map(|l| l.len()), Some(120));
        assert!(b.is_empty());
        assert_eq!(b.push(b'z'), None);
        assert_eq!(b.take(), "z");
    }
}
