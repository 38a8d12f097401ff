//! Scenario files (issue 7): exit-reflection regression tests as data.
//!
//! A scenario (TOML) says how L1 sets up the VMCS, what L2 runs (assembly
//! text, see [`asm`]) and what must be observed. [`run_scenario_file`]
//! encodes it with the layout shared with L1 (`l1-guest-hv/src/scenario.rs`,
//! included here as [`layout`]), boots the built-in L1 with `test=scenario`
//! on KVM, reads back what L1 recorded with VMREAD and compares it with the
//! expectations. Format, layout and a tutorial: `docs/scenarios.md`.

#[path = "scenario/asm.rs"]
pub mod asm;
#[allow(missing_docs, dead_code)]
#[path = "../../l1-guest-hv/src/scenario.rs"]
pub mod layout;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;
use vmcs12::controls::{
    EntryControls, ExitControls, PinBased, PrimaryProcBased, SecondaryProcBased,
};
use vmcs12::VmcsField;

use crate::cli::{run_kernel, BootOptions};
use crate::devices::{CaptureSink, OutputSink};
use crate::l1_image::L1_GUEST_ELF;
use layout as lay;

/// A scenario file that cannot be used: the file, the line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{file}:{line}: {message}")]
pub struct ScenarioError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// A number, or a string holding a number or a name (label, field, ...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A TOML integer.
    Num(i64),
    /// A string: `"0x..."`, a name or a label.
    Str(String),
}

/// A list of names or numbers, or one number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Bits {
    /// The whole value.
    Num(i64),
    /// Names (SDM/Linux names of bits) or numbers, OR-ed.
    List(Vec<Value>),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Short name (defaults to the file name).
    pub name: Option<String>,
    /// What the scenario shows.
    pub description: Option<String>,
    /// The scenario is expected to FAIL (a documentation example).
    #[serde(default)]
    pub expect_fail: bool,
    /// L1's side.
    #[serde(default)]
    pub l1: L1Spec,
    /// The L2 program.
    pub l2: L2Spec,
    /// What must be observed.
    #[serde(default)]
    pub expect: Expect,
}

/// VMCS controls; a given word replaces the default for that word.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controls {
    /// Pin-based controls.
    pub pin: Option<Spanned<Bits>>,
    /// Primary processor-based controls.
    pub primary: Option<Spanned<Bits>>,
    /// Secondary processor-based controls.
    pub secondary: Option<Spanned<Bits>>,
    /// VM-exit controls.
    pub exit: Option<Spanned<Bits>>,
    /// VM-entry controls.
    pub entry: Option<Spanned<Bits>>,
    /// Write the controls as given, without adjusting them to the
    /// capability MSRs.
    #[serde(default)]
    pub raw: bool,
}

/// MSR-bitmap contents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrBitmap {
    /// MSRs whose RDMSR exits.
    #[serde(default)]
    pub read: Vec<Spanned<Value>>,
    /// MSRs whose WRMSR exits.
    #[serde(default)]
    pub write: Vec<Spanned<Value>>,
}

/// One page of the identity EPT with other rights.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoleSpec {
    /// Guest-physical address (rounded down to the page) or a label.
    pub gpa: Spanned<Value>,
    /// Rights: a subset of "rwx" ("" = not present).
    pub rights: Spanned<String>,
}

/// One VMWRITE.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldWrite {
    /// Field name (`GUEST_RFLAGS`) or encoding.
    pub field: Spanned<Value>,
    /// Value (number or label).
    pub value: Spanned<Value>,
    /// `write` (default: the field becomes `value`), `or` (its current
    /// value OR `value`) or `clear` (its current value AND NOT `value`).
    pub mode: Option<Spanned<String>>,
}

/// L1's local-APIC timer (`[l1] lapic_timer`), one-shot, armed right
/// before the first VMLAUNCH.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LapicTimerSpec {
    /// Interrupt vector (16-255).
    pub vector: Spanned<u32>,
    /// Initial count (timer ticks: KVM's APIC bus runs at 1 GHz, so at
    /// divide 1 one tick is 1 ns).
    pub count: u32,
    /// Divider: 1, 2, 4, ..., 128 (default 1).
    pub divide: Option<Spanned<u32>>,
}

/// An event L1 injects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectSpec {
    /// `external-interrupt`, `nmi`, `hardware-exception`,
    /// `software-interrupt`, `privileged-software-exception`,
    /// `software-exception`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// Vector.
    pub vector: u8,
    /// Error code (delivered when given).
    pub error_code: Option<u32>,
    /// VM_ENTRY_INSTRUCTION_LEN (software events).
    #[serde(default)]
    pub length: u32,
}

/// L1's handling of one exit reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnExit {
    /// Exit reason (name or number) or `any`.
    pub reason: Spanned<Value>,
    /// `advance` (default), `resume`, `jump`, `stop`.
    #[serde(default)]
    pub action: Option<Spanned<String>>,
    /// Target of `jump` (label or address).
    pub target: Option<Spanned<Value>>,
    /// Collect an OUT's AL as console output.
    #[serde(default)]
    pub console: bool,
    /// Value an IN or RDMSR gets.
    pub answer: Option<Spanned<Value>>,
    /// Event to inject before resuming.
    pub inject: Option<InjectSpec>,
    /// VMWRITE before resuming.
    pub set: Option<FieldWrite>,
}

/// A VMX instruction L1 executes itself, with its expected outcome
/// (`[[l1.vmx]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmxOpSpec {
    /// `vmxon`, `vmxoff`, `vmclear`, `vmptrld`, `vmptrst`, `vmread`,
    /// `vmwrite`, `vmlaunch`, `vmresume`, `invept`, `invvpid`,
    /// `mov-ss-vmlaunch`.
    pub op: Spanned<String>,
    /// `setup` (after VMXON, no current VMCS), `launch` (default: the VMCS
    /// is built, before the first VMLAUNCH) or `end` (after L2's run).
    pub phase: Option<Spanned<String>>,
    /// Memory operand: `vmxon`, `vmcs`, `spare-vmcs`, `bad-revision`
    /// (optionally `+N`), a number or a label.
    pub address: Option<Spanned<Value>>,
    /// VMREAD/VMWRITE field (name or encoding).
    pub field: Option<Spanned<Value>>,
    /// VMWRITE value.
    pub value: Option<Spanned<Value>>,
    /// INVEPT/INVVPID type.
    #[serde(rename = "type")]
    pub kind: Option<Spanned<Value>>,
    /// INVEPT/INVVPID descriptor (two quadwords; default zeros).
    pub descriptor: Option<Vec<Spanned<Value>>>,
    /// `VMsucceed`, `VMfailInvalid`, `VMfailValid(N)` or `fault(#UD)`.
    pub expect: Spanned<String>,
    /// VMREAD/VMPTRST value, or the VM_EXIT_REASON after a VMLAUNCH or
    /// VMRESUME that entered.
    pub result: Option<Spanned<Value>>,
}

/// L1's side of the scenario.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L1Spec {
    /// VMCS controls.
    #[serde(default)]
    pub controls: Controls,
    /// Ports whose accesses exit (numbers or `"A-B"` ranges).
    #[serde(default)]
    pub io_bitmap: Vec<Spanned<Value>>,
    /// MSR bitmap.
    #[serde(default)]
    pub msr_bitmap: MsrBitmap,
    /// EXCEPTION_BITMAP (number or list of vectors).
    pub exception_bitmap: Option<Spanned<Bits>>,
    /// CR0_GUEST_HOST_MASK.
    pub cr0_mask: Option<Spanned<Value>>,
    /// CR0_READ_SHADOW.
    pub cr0_shadow: Option<Spanned<Value>>,
    /// CR4_GUEST_HOST_MASK.
    pub cr4_mask: Option<Spanned<Value>>,
    /// CR4_READ_SHADOW.
    pub cr4_shadow: Option<Spanned<Value>>,
    /// `none` (default in long mode) or `identity`.
    pub ept: Option<Spanned<String>>,
    /// Pages of the identity EPT with other rights.
    #[serde(default)]
    pub ept_holes: Vec<HoleSpec>,
    /// Unrestricted guest (default: on for real and protected mode).
    pub unrestricted_guest: Option<bool>,
    /// VMWRITEs after the VMCS is built (last word on any field).
    #[serde(default)]
    pub vmcs: Vec<FieldWrite>,
    /// What L1 does per exit reason (default: stop).
    #[serde(default)]
    pub on_exit: Vec<OnExit>,
    /// L1 stops after this many exits (default 64).
    pub max_exits: Option<u32>,
    /// VMX instructions L1 executes itself, with expected outcomes.
    #[serde(default)]
    pub vmx: Vec<VmxOpSpec>,
    /// L1's local-APIC timer, armed before the first VMLAUNCH.
    pub lapic_timer: Option<LapicTimerSpec>,
}

/// The L2 program.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2Spec {
    /// `real`, `protected` or `long` (default).
    pub mode: Option<Spanned<String>>,
    /// Load address (default 0x500000, real mode 0x8000).
    pub load_address: Option<u64>,
    /// Entry label or address (default: the first byte).
    pub entry: Option<Spanned<Value>>,
    /// Initial registers (`rax = 1`, ...).
    #[serde(default)]
    pub registers: BTreeMap<String, Spanned<Value>>,
    /// The program (Intel syntax, `docs/scenarios.md`).
    pub code: Spanned<String>,
}

/// An I/O exit qualification, by field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IoQual {
    /// Port.
    pub port: Option<u16>,
    /// Access size in bytes.
    pub size: Option<u8>,
    /// `in` or `out`.
    pub direction: Option<String>,
    /// String instruction.
    pub string: Option<bool>,
    /// REP prefixed.
    pub rep: Option<bool>,
    /// Port from an immediate.
    pub immediate: Option<bool>,
}

/// A qualification: exact value or I/O fields.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Qual {
    /// The whole value.
    Value(Value),
    /// I/O fields.
    Io(IoQual),
}

/// One exit L1 must observe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectExit {
    /// Basic exit reason (name or number).
    pub reason: Spanned<Value>,
    /// Bit 31 (VM-entry failure) set.
    #[serde(default)]
    pub entry_failure: bool,
    /// Exit qualification.
    pub qualification: Option<Spanned<Qual>>,
    /// GUEST_RIP (label, `label+N` or address).
    pub rip: Option<Spanned<Value>>,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub length: Option<u32>,
    /// VM_EXIT_INTR_INFO.
    pub intr_info: Option<Spanned<Value>>,
    /// GUEST_PHYSICAL_ADDRESS.
    pub gpa: Option<Spanned<Value>>,
    /// GUEST_LINEAR_ADDRESS.
    pub gla: Option<Spanned<Value>>,
    /// VM_EXIT_INTR_ERROR_CODE.
    pub error_code: Option<Spanned<Value>>,
    /// VMX_PREEMPTION_TIMER_VALUE after the exit: a number, or a
    /// comparison `"> 0"`, `">= N"`, `"< N"`, `"<= N"`, `"!= N"`, or an
    /// inclusive range `"A..B"`.
    pub preemption_timer: Option<Spanned<Value>>,
    /// GUEST_ACTIVITY_STATE after the exit (0 active, 1 HLT).
    pub activity_state: Option<u32>,
}

/// Exits L0 must handle itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectL0 {
    /// Basic exit reason.
    pub reason: Spanned<Value>,
    /// How many (exactly).
    pub count: u64,
}

/// Memory contents after the run (`[[expect.memory]]`): exactly one of
/// `bytes`, `text`, `word`, `dword`, `qword`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemSpec {
    /// Guest-physical address (= L2-physical: L1's EPT is the identity)
    /// or a label.
    pub address: Spanned<Value>,
    /// Bytes.
    pub bytes: Option<Vec<u8>>,
    /// ASCII text.
    pub text: Option<String>,
    /// A little-endian 16-bit value.
    pub word: Option<Spanned<Value>>,
    /// A little-endian 32-bit value.
    pub dword: Option<Spanned<Value>>,
    /// A little-endian 64-bit value.
    pub qword: Option<Spanned<Value>>,
}

/// Expectations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The exits L1 observes, in order (all of them).
    pub l1_exits: Option<Vec<ExpectExit>>,
    /// Exits L0 absorbs, by reason.
    #[serde(default)]
    pub l0_exits: Vec<ExpectL0>,
    /// Final L2 registers.
    #[serde(default)]
    pub registers: BTreeMap<String, Spanned<Value>>,
    /// Console output L1 collected (`console = true` actions).
    pub console: Option<String>,
    /// Outcome of the failing VMLAUNCH/VMRESUME (`VMfailValid(7)`, ...).
    pub vmx_outcome: Option<Spanned<String>>,
    /// Memory contents after the run.
    #[serde(default)]
    pub memory: Vec<MemSpec>,
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    text.get(..span.start.min(text.len()))
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// An exit reason by short name.
pub const REASONS: &[(u16, &str)] = &[
    (0, "exception"),
    (1, "external-interrupt"),
    (2, "triple-fault"),
    (7, "interrupt-window"),
    (8, "nmi-window"),
    (9, "task-switch"),
    (10, "cpuid"),
    (12, "hlt"),
    (14, "invlpg"),
    (16, "rdtsc"),
    (18, "vmcall"),
    (19, "vmclear"),
    (20, "vmlaunch"),
    (21, "vmptrld"),
    (22, "vmptrst"),
    (23, "vmread"),
    (24, "vmresume"),
    (25, "vmwrite"),
    (26, "vmxoff"),
    (27, "vmxon"),
    (28, "cr-access"),
    (29, "dr-access"),
    (30, "io"),
    (31, "rdmsr"),
    (32, "wrmsr"),
    (33, "invalid-guest-state"),
    (34, "msr-loading"),
    (36, "mwait"),
    (37, "monitor-trap-flag"),
    (39, "monitor"),
    (40, "pause"),
    (48, "ept-violation"),
    (49, "ept-misconfig"),
    (50, "invept"),
    (52, "preemption-timer"),
    (53, "invvpid"),
    (54, "wbinvd"),
    (55, "xsetbv"),
    (59, "vmfunc"),
];

/// The short name of a basic exit reason.
pub fn reason_name(r: u16) -> String {
    REASONS
        .iter()
        .find(|(n, _)| *n == r)
        .map_or_else(|| format!("reason-{r}"), |(_, s)| (*s).to_string())
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Context for turning values into numbers.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    labels: &'a BTreeMap<String, u64>,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ScenarioError {
        ScenarioError {
            file: self.file.to_path_buf(),
            line: line_of(self.text, span),
            message: message.into(),
        }
    }

    /// A number, or `label[+-N]`.
    fn value(&self, v: &Spanned<Value>) -> Result<u64, ScenarioError> {
        match v.get_ref() {
            Value::Num(n) => Ok(*n as u64),
            Value::Str(s) => self.expr(s).ok_or_else(|| {
                self.err(
                    v.span(),
                    format!("`{s}` is neither a number nor a label of the L2 program"),
                )
            }),
        }
    }

    fn expr(&self, s: &str) -> Option<u64> {
        if let Some(n) = parse_num(s) {
            return Some(n);
        }
        let (name, off) = match s.find(['+', '-']) {
            Some(i) => {
                let n = parse_num(&s[i + 1..])?;
                let off = if s.as_bytes()[i] == b'-' {
                    n.wrapping_neg()
                } else {
                    n
                };
                (s[..i].trim(), off)
            }
            None => (s.trim(), 0),
        };
        self.labels.get(name).map(|a| a.wrapping_add(off))
    }

    fn reason(&self, v: &Spanned<Value>) -> Result<u32, ScenarioError> {
        match v.get_ref() {
            Value::Num(n) => Ok(*n as u32),
            Value::Str(s) if s == "any" => Ok(lay::ANY_REASON),
            Value::Str(s) => {
                let norm = s.to_ascii_lowercase().replace(['_', ' ', '/'], "-");
                REASONS
                    .iter()
                    .find(|(_, n)| *n == norm)
                    .map(|(r, _)| u32::from(*r))
                    .or_else(|| parse_num(s).map(|n| n as u32))
                    .ok_or_else(|| {
                        let known: Vec<&str> = REASONS.iter().map(|(_, n)| *n).collect();
                        self.err(
                            v.span(),
                            format!(
                                "unknown exit reason `{s}`; use a number or one of {}",
                                known.join(", ")
                            ),
                        )
                    })
            }
        }
    }

    fn field(&self, v: &Spanned<Value>) -> Result<u32, ScenarioError> {
        match v.get_ref() {
            Value::Num(n) => Ok(*n as u32),
            Value::Str(s) => VmcsField::ALL
                .iter()
                .find(|f| f.name().eq_ignore_ascii_case(s))
                .map(|f| f.encoding())
                .or_else(|| parse_num(s).map(|n| n as u32))
                .ok_or_else(|| {
                    self.err(
                        v.span(),
                        format!("unknown VMCS field `{s}`: use the SDM/Linux name (GUEST_RIP) or the encoding"),
                    )
                }),
        }
    }

    fn bits(
        &self,
        b: &Spanned<Bits>,
        names: &[(&str, u32)],
        what: &str,
    ) -> Result<u32, ScenarioError> {
        match b.get_ref() {
            Bits::Num(n) => Ok(*n as u32),
            Bits::List(items) => {
                let mut v = 0u32;
                for item in items {
                    v |= match item {
                        Value::Num(n) => *n as u32,
                        Value::Str(s) => {
                            let norm = s.to_ascii_uppercase().replace('-', "_");
                            names
                                .iter()
                                .find(|(n, _)| *n == norm)
                                .map(|(_, b)| *b)
                                .or_else(|| parse_num(s).map(|n| n as u32))
                                .ok_or_else(|| {
                                    let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                                    self.err(
                                        b.span(),
                                        format!(
                                            "unknown {what} control `{s}`; known: {}",
                                            known.join(", ")
                                        ),
                                    )
                                })?
                        }
                    };
                }
                Ok(v)
            }
        }
    }
}

macro_rules! flag_names {
    ($t:ty) => {
        <$t>::all()
            .iter_names()
            .map(|(n, f)| (n, f.bits()))
            .collect::<Vec<(&'static str, u32)>>()
    };
}

/// A scenario ready to run: the encoded bytes and what to compare.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Name.
    pub name: String,
    /// The file.
    pub file: PathBuf,
    /// Whether failing is the expected result.
    pub expect_fail: bool,
    /// The encoded scenario (`layout`).
    pub blob: Vec<u8>,
    /// The assembled program.
    pub program: asm::Assembled,
    /// Expected L1 exits.
    pub l1_exits: Option<Vec<WantExit>>,
    /// Expected L0-handled exits: (reason, count).
    pub l0_exits: Vec<(u16, u64)>,
    /// Expected final registers: (name, index, value).
    pub registers: Vec<(String, usize, u64)>,
    /// Expected console text.
    pub console: Option<String>,
    /// Expected outcome of a failing VM entry instruction.
    pub vmx_outcome: Option<u32>,
    /// Expected outcomes of the `[[l1.vmx]]` operations, in table order.
    pub vmx_ops: Vec<WantOp>,
    /// Expected memory contents.
    pub memory: Vec<WantMem>,
}

/// The expected outcome of one `[[l1.vmx]]` operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantOp {
    /// What it is, for the diff (`vmclear vmcs+0x10 (setup), line 12`).
    pub what: String,
    /// Results code of the outcome (0 VMsucceed, as `vmx_outcome` else).
    pub outcome: u32,
    /// Expected value (VMREAD, VMPTRST, exit reason after an entry).
    pub value: Option<u64>,
}

/// Expected memory contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantMem {
    /// Guest-physical address.
    pub addr: u64,
    /// How the file named it (`result`, `0x600000`).
    pub what: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// One expected L1 exit, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantExit {
    /// Full exit reason (bit 31 included).
    pub reason: u32,
    /// Qualification: mask and value.
    pub qualification: Option<(u64, u64)>,
    /// GUEST_RIP.
    pub rip: Option<u64>,
    /// Instruction length.
    pub length: Option<u32>,
    /// VM_EXIT_INTR_INFO.
    pub intr_info: Option<u32>,
    /// GUEST_PHYSICAL_ADDRESS.
    pub gpa: Option<u64>,
    /// GUEST_LINEAR_ADDRESS.
    pub gla: Option<u64>,
    /// VM_EXIT_INTR_ERROR_CODE.
    pub error_code: Option<u32>,
    /// VMX_PREEMPTION_TIMER_VALUE.
    pub preemption_timer: Option<Cmp>,
    /// GUEST_ACTIVITY_STATE.
    pub activity_state: Option<u32>,
}

/// A check of a number: equal, a comparison or an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `== n` (a plain number in the file).
    Eq(u64),
    /// `!= n`.
    Ne(u64),
    /// `> n`.
    Gt(u64),
    /// `>= n`.
    Ge(u64),
    /// `< n`.
    Lt(u64),
    /// `<= n`.
    Le(u64),
    /// `a..b`, both included.
    Range(u64, u64),
}

impl Cmp {
    /// Parses `"> 0"`, `"<= 0x100"`, `"1..5"` or a number.
    pub fn parse(s: &str) -> Option<Cmp> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once("..") {
            let (a, b) = (parse_num(a)?, parse_num(b)?);
            return (a <= b).then_some(Cmp::Range(a, b));
        }
        for (op, make) in [
            (">=", Cmp::Ge as fn(u64) -> Cmp),
            ("<=", Cmp::Le),
            ("!=", Cmp::Ne),
            ("==", Cmp::Eq),
            (">", Cmp::Gt),
            ("<", Cmp::Lt),
        ] {
            if let Some(rest) = s.strip_prefix(op) {
                return parse_num(rest).map(make);
            }
        }
        parse_num(s).map(Cmp::Eq)
    }

    /// Whether `v` passes.
    pub fn matches(self, v: u64) -> bool {
        match self {
            Cmp::Eq(n) => v == n,
            Cmp::Ne(n) => v != n,
            Cmp::Gt(n) => v > n,
            Cmp::Ge(n) => v >= n,
            Cmp::Lt(n) => v < n,
            Cmp::Le(n) => v <= n,
            Cmp::Range(a, b) => (a..=b).contains(&v),
        }
    }
}

impl std::fmt::Display for Cmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmp::Eq(n) => write!(f, "{n:#x}"),
            Cmp::Ne(n) => write!(f, "!={n:#x}"),
            Cmp::Gt(n) => write!(f, ">{n:#x}"),
            Cmp::Ge(n) => write!(f, ">={n:#x}"),
            Cmp::Lt(n) => write!(f, "<{n:#x}"),
            Cmp::Le(n) => write!(f, "<={n:#x}"),
            Cmp::Range(a, b) => write!(f, "{a:#x}..{b:#x}"),
        }
    }
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

fn gpr_index(name: &str) -> Option<usize> {
    GPR_NAMES.iter().position(|n| n.eq_ignore_ascii_case(name))
}

fn io_qual(q: &IoQual) -> Result<(u64, u64), String> {
    let mut mask = 0u64;
    let mut val = 0u64;
    if let Some(s) = q.size {
        if ![1, 2, 4].contains(&s) {
            return Err(format!("I/O size {s}: use 1, 2 or 4"));
        }
        mask |= 7;
        val |= u64::from(s - 1);
    }
    if let Some(d) = &q.direction {
        mask |= 1 << 3;
        match d.as_str() {
            "in" => val |= 1 << 3,
            "out" => {}
            other => return Err(format!("direction `{other}`: use \"in\" or \"out\"")),
        }
    }
    for (flag, bit) in [(q.string, 4), (q.rep, 5), (q.immediate, 6)] {
        if let Some(f) = flag {
            mask |= 1 << bit;
            val |= u64::from(f) << bit;
        }
    }
    if let Some(p) = q.port {
        mask |= 0xffff << 16;
        val |= u64::from(p) << 16;
    }
    Ok((mask, val))
}

/// `VMfailInvalid`, `VMfailValid(n)`, `fault(#UD)` -> the results code.
fn outcome_code(s: &str) -> Option<u32> {
    let s = s.trim();
    if s == "VMsucceed" {
        return Some(0);
    }
    if s == "VMfailInvalid" {
        return Some(1);
    }
    if let Some(n) = s
        .strip_prefix("VMfailValid(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return n.parse::<u32>().ok().map(|n| 0x100 | n);
    }
    match s {
        "fault(#UD)" => Some(0x206),
        "fault(#GP)" => Some(0x20d),
        "fault(#SS)" => Some(0x20c),
        "fault(#PF)" => Some(0x20e),
        _ => None,
    }
}

fn op_outcome_text(code: u32) -> String {
    match code {
        0 => "VMsucceed".into(),
        c => outcome_text(c),
    }
}

fn outcome_text(code: u32) -> String {
    match code {
        0 => "none (VM entry happened)".into(),
        1 => "VMfailInvalid".into(),
        c if c & 0x300 == 0x100 => format!("VMfailValid({})", c & 0xff),
        c => format!("fault(vector {})", c & 0xff),
    }
}

fn set_bit(page: &mut [u8], byte: usize, bit: u32) {
    if let Some(b) = page.get_mut(byte) {
        *b |= 1 << bit;
    }
}

/// Parses and compiles a scenario (`file` is only used in messages).
pub fn compile(text: &str, file: &Path) -> Result<Compiled, ScenarioError> {
    let sf: ScenarioFile = toml::from_str(text).map_err(|e| ScenarioError {
        file: file.to_path_buf(),
        line: e.span().map_or(1, |s| line_of(text, s)),
        message: e.message().trim().to_string(),
    })?;
    let empty = BTreeMap::new();
    let pre = Ctx {
        file,
        text,
        labels: &empty,
    };
    let mode = match sf
        .l2
        .mode
        .as_ref()
        .map(|m| (m.get_ref().as_str(), m.span()))
    {
        None | Some(("long", _)) => lay::StartMode::Long,
        Some(("protected", _)) => lay::StartMode::Protected,
        Some(("real", _)) => lay::StartMode::Real,
        Some((other, span)) => {
            return Err(pre.err(
                span,
                format!("mode `{other}`: use \"real\", \"protected\" or \"long\""),
            ))
        }
    };
    let load = sf
        .l2
        .load_address
        .unwrap_or(if mode == lay::StartMode::Real {
            lay::DEFAULT_REAL_CODE_ADDR
        } else {
            lay::DEFAULT_CODE_ADDR
        });
    // The code string starts on the line of `code = `; a multi-line
    // string starts one line later.
    let code_span = sf.l2.code.span();
    let code_line = line_of(text, code_span.clone())
        + usize::from(
            text.get(code_span.start..)
                .is_some_and(|t| t.starts_with("\"\"\"\n") || t.starts_with("'''\n")),
        );
    let program =
        asm::assemble(sf.l2.code.get_ref(), load, mode.bitness()).map_err(|e| ScenarioError {
            file: file.to_path_buf(),
            line: code_line + e.line - 1,
            message: format!("L2 program: {}", e.message),
        })?;
    if program.bytes.is_empty() {
        return Err(pre.err(code_span, "the L2 program is empty"));
    }
    let end = load + program.bytes.len() as u64;
    let overlaps = |a: u64, len: u64| load < a + len && end > a;
    if load < 0x1000
        || end > lay::CODE_END
        || overlaps(0x10_0000, 0x10_0000)
        || overlaps(lay::SCENARIO_ADDR, 0x10_0000)
    {
        return Err(pre.err(
            code_span,
            format!(
                "L2 code [{load:#x}, {end:#x}) must lie in 0x1000-0x100000 or 0x500000-0x800000 (L1's image is at 1 MiB, the scenario at 4 MiB)"
            ),
        ));
    }
    let cx = Ctx {
        file,
        text,
        labels: &program.labels,
    };
    let entry_rip = match &sf.l2.entry {
        Some(e) => cx.value(e)?,
        None => load,
    };
    let l1 = &sf.l1;
    let ept_identity = match l1.ept.as_ref().map(|e| (e.get_ref().as_str(), e.span())) {
        None => mode != lay::StartMode::Long || !l1.ept_holes.is_empty(),
        Some(("none", _)) => false,
        Some(("identity", _)) => true,
        Some((other, span)) => {
            return Err(cx.err(span, format!("ept `{other}`: use \"none\" or \"identity\"")))
        }
    };
    let ug = l1
        .unrestricted_guest
        .unwrap_or(mode != lay::StartMode::Long);
    let c = &l1.controls;
    let pin = match &c.pin {
        Some(b) => cx.bits(b, &flag_names!(PinBased), "pin-based")?,
        None => 0,
    };
    let primary = match &c.primary {
        Some(b) => cx.bits(b, &flag_names!(PrimaryProcBased), "primary")?,
        None => (PrimaryProcBased::HLT_EXITING
            | PrimaryProcBased::USE_IO_BITMAPS
            | PrimaryProcBased::USE_MSR_BITMAPS)
            .bits(),
    };
    let mut secondary = match &c.secondary {
        Some(b) => cx.bits(b, &flag_names!(SecondaryProcBased), "secondary")?,
        None => 0,
    };
    if ug {
        secondary |= SecondaryProcBased::UNRESTRICTED_GUEST.bits();
    }
    let exit = match &c.exit {
        Some(b) => cx.bits(b, &flag_names!(ExitControls), "exit")?,
        None => {
            (ExitControls::HOST_ADDR_SPACE_SIZE | ExitControls::SAVE_EFER | ExitControls::LOAD_EFER)
                .bits()
        }
    };
    let entry = match &c.entry {
        Some(b) => cx.bits(b, &flag_names!(EntryControls), "entry")?,
        None => {
            let mut e = EntryControls::LOAD_EFER;
            if mode == lay::StartMode::Long {
                e |= EntryControls::IA32E_MODE_GUEST;
            }
            e.bits()
        }
    };
    let exception_bitmap = match &l1.exception_bitmap {
        None => 0,
        Some(b) => match b.get_ref() {
            Bits::Num(n) => *n as u32,
            Bits::List(v) => {
                let mut m = 0u32;
                for x in v {
                    match x {
                        Value::Num(n) if (0..32).contains(n) => m |= 1 << n,
                        _ => return Err(cx.err(b.span(), "exception_bitmap list: vectors 0-31")),
                    }
                }
                m
            }
        },
    };
    // Bitmaps (SDM 25.6.4, 25.6.9).
    let mut io = vec![0u8; lay::IO_BITMAPS_LEN];
    for p in &l1.io_bitmap {
        let (lo, hi) = match p.get_ref() {
            Value::Num(n) => (*n, *n),
            Value::Str(s) => {
                let r = s
                    .split_once('-')
                    .and_then(|(a, b)| Some((parse_num(a)? as i64, parse_num(b)? as i64)));
                r.or_else(|| parse_num(s).map(|n| (n as i64, n as i64)))
                    .ok_or_else(|| {
                        cx.err(p.span(), format!("port `{s}`: use a number or \"A-B\""))
                    })?
            }
        };
        if lo < 0 || hi > 0xffff || lo > hi {
            return Err(cx.err(p.span(), "ports are 0-0xffff"));
        }
        for port in lo..=hi {
            set_bit(&mut io, port as usize / 8, port as u32 % 8);
        }
    }
    let mut msr = vec![0u8; lay::MSR_BITMAP_LEN];
    for (list, write) in [(&l1.msr_bitmap.read, false), (&l1.msr_bitmap.write, true)] {
        for m in list {
            let v = cx.value(m)? as u32;
            let base = match v {
                0..=0x1fff => 0,
                0xc000_0000..=0xc000_1fff => 1024,
                _ => {
                    return Err(cx.err(
                        m.span(),
                        format!("MSR {v:#x} has no bit in the MSR bitmap (0-0x1fff, 0xc0000000-0xc0001fff); its accesses always exit"),
                    ))
                }
            };
            let idx = (v & 0x1fff) as usize;
            set_bit(
                &mut msr,
                base + if write { 2048 } else { 0 } + idx / 8,
                idx as u32 % 8,
            );
        }
    }
    let mut holes = Vec::new();
    for h in &l1.ept_holes {
        let mut perms = 0u64;
        for ch in h.rights.get_ref().chars() {
            perms |= match ch {
                'r' => 1,
                'w' => 2,
                'x' => 4,
                _ => return Err(cx.err(h.rights.span(), "rights: a subset of \"rwx\"")),
            };
        }
        holes.push(lay::EptHole {
            gpa: cx.value(&h.gpa)? & !0xfff,
            perms,
        });
    }
    let mut writes = Vec::new();
    for (f, v) in [
        (VmcsField::CR0_GUEST_HOST_MASK, &l1.cr0_mask),
        (VmcsField::CR0_READ_SHADOW, &l1.cr0_shadow),
        (VmcsField::CR4_GUEST_HOST_MASK, &l1.cr4_mask),
        (VmcsField::CR4_READ_SHADOW, &l1.cr4_shadow),
    ] {
        if let Some(v) = v {
            writes.push(lay::VmcsWrite {
                encoding: f.encoding(),
                mode: lay::WRITE_SET,
                value: cx.value(v)?,
            });
        }
    }
    for w in &l1.vmcs {
        writes.push(lay::VmcsWrite {
            encoding: cx.field(&w.field)?,
            mode: write_mode(&cx, w)?,
            value: cx.value(&w.value)?,
        });
    }
    let lapic_timer = match &l1.lapic_timer {
        None => lay::LapicTimer::default(),
        Some(t) => lapic_timer(&cx, t)?,
    };
    let mut actions = Vec::new();
    for a in &l1.on_exit {
        let reason = cx.reason(&a.reason)?;
        let next = match a.action.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("advance", _)) => lay::Next::Advance,
            Some(("resume", _)) => lay::Next::Resume,
            Some(("jump", _)) => lay::Next::Jump,
            Some(("stop", _)) => lay::Next::Stop,
            Some((other, span)) => {
                return Err(cx.err(
                    span,
                    format!("action `{other}`: use advance, resume, jump or stop"),
                ))
            }
        };
        let mut act = lay::Action::default_for(reason);
        act.next = next;
        if next == lay::Next::Jump {
            let t = a
                .target
                .as_ref()
                .ok_or_else(|| cx.err(a.reason.span(), "action \"jump\" needs `target`"))?;
            act.target = cx.value(t)?;
        }
        if a.console {
            act.flags |= lay::ACT_CONSOLE;
        }
        if let Some(v) = &a.answer {
            act.flags |= lay::ACT_ANSWER;
            act.answer = cx.value(v)?;
        }
        if let Some(i) = &a.inject {
            let kind = match i.kind.get_ref().as_str() {
                "external-interrupt" => 0,
                "nmi" => 2,
                "hardware-exception" => 3,
                "software-interrupt" => 4,
                "privileged-software-exception" => 5,
                "software-exception" => 6,
                other => return Err(cx.err(i.kind.span(), format!("event type `{other}`"))),
            };
            act.flags |= lay::ACT_INJECT;
            // SDM 25.8.3: vector, type, deliver-error-code, valid.
            act.inject_info =
                u32::from(i.vector) | kind << 8 | u32::from(i.error_code.is_some()) << 11 | 1 << 31;
            act.inject_error = i.error_code.unwrap_or(0);
            act.inject_len = i.length;
        }
        if let Some(s) = &a.set {
            act.flags |= lay::ACT_SET_FIELD;
            act.flags |= match write_mode(&cx, s)? {
                lay::WRITE_OR => lay::ACT_SET_OR,
                lay::WRITE_CLEAR => lay::ACT_SET_CLEAR,
                _ => 0,
            };
            act.field = cx.field(&s.field)?;
            act.value = cx.value(&s.value)?;
        }
        actions.push(act);
    }
    let (ops, want_ops) = compile_vmx_ops(&cx, &l1.vmx)?;
    let (ranges, memory) = compile_memory(&cx, &sf.expect.memory)?;
    let mut gprs = [0u64; 16];
    for (name, v) in &sf.l2.registers {
        let i = gpr_index(name)
            .ok_or_else(|| cx.err(v.span(), format!("unknown register `{name}` (rax..r15)")))?;
        gprs[i] = cx.value(v)?;
    }
    let mut flags = 0;
    if ept_identity || ug {
        flags |= lay::FLAG_EPT;
    }
    if c.raw {
        flags |= lay::FLAG_RAW_CONTROLS;
    }
    // Encode: header, code, actions, writes, holes, I/O bitmaps, MSR bitmap.
    let mut blob = vec![0u8; lay::HEADER_LEN];
    let table = |blob: &mut Vec<u8>, bytes: &[u8], count: usize| {
        let t = lay::Table {
            offset: blob.len() as u32,
            count: count as u32,
        };
        blob.extend_from_slice(bytes);
        while !blob.len().is_multiple_of(8) {
            blob.push(0);
        }
        t
    };
    let code_t = table(&mut blob, &program.bytes, program.bytes.len());
    let enc = |n: usize, len: usize, f: &dyn Fn(usize, &mut [u8])| {
        let mut v = vec![0u8; n * len];
        for (i, c) in v.chunks_exact_mut(len).enumerate() {
            f(i, c);
        }
        v
    };
    let actions_b = enc(actions.len(), lay::ACTION_LEN, &|i, c| actions[i].encode(c));
    let actions_t = table(&mut blob, &actions_b, actions.len());
    let writes_b = enc(writes.len(), lay::WRITE_LEN, &|i, c| writes[i].encode(c));
    let writes_t = table(&mut blob, &writes_b, writes.len());
    let holes_b = enc(holes.len(), lay::HOLE_LEN, &|i, c| holes[i].encode(c));
    let holes_t = table(&mut blob, &holes_b, holes.len());
    let io_t = table(&mut blob, &io, io.len());
    let msr_t = table(&mut blob, &msr, msr.len());
    let ops_b = enc(ops.len(), lay::VMX_OP_LEN, &|i, c| ops[i].encode(c));
    let ops_t = table(&mut blob, &ops_b, ops.len());
    let mem_b = enc(ranges.len(), lay::MEM_RANGE_LEN, &|i, c| {
        ranges[i].encode(c)
    });
    let mem_t = table(&mut blob, &mem_b, ranges.len());
    if blob.len() > lay::SCENARIO_MAX {
        return Err(pre.err(
            0..0,
            format!(
                "encoded scenario is {} bytes, more than {}",
                blob.len(),
                lay::SCENARIO_MAX
            ),
        ));
    }
    let header = lay::Header {
        total_len: blob.len() as u32,
        flags,
        mode,
        pin,
        primary,
        secondary,
        exit,
        entry,
        exception_bitmap,
        max_exits: l1.max_exits.unwrap_or(64),
        code_addr: load,
        entry_rip,
        code: code_t,
        actions: actions_t,
        writes: writes_t,
        holes: holes_t,
        io_bitmaps: io_t,
        msr_bitmap: msr_t,
        gprs,
        vmx_ops: ops_t,
        memory: mem_t,
        lapic_timer,
    };
    header.encode(&mut blob);
    // Expectations.
    let ex = &sf.expect;
    let l1_exits = match &ex.l1_exits {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for e in list {
                let basic = cx.reason(&e.reason)?;
                let qualification = match &e.qualification {
                    None => None,
                    Some(q) => Some(match q.get_ref() {
                        Qual::Value(v) => (u64::MAX, cx.value(&Spanned::new(q.span(), v.clone()))?),
                        Qual::Io(io) => io_qual(io).map_err(|m| cx.err(q.span(), m))?,
                    }),
                };
                let opt = |v: &Option<Spanned<Value>>| v.as_ref().map(|v| cx.value(v)).transpose();
                let preemption_timer = match &e.preemption_timer {
                    None => None,
                    Some(v) => Some(match v.get_ref() {
                        Value::Num(n) => Cmp::Eq(*n as u64),
                        Value::Str(s) => Cmp::parse(s).ok_or_else(|| {
                            cx.err(
                                v.span(),
                                format!("preemption_timer `{s}`: use a number, \"> N\", \">= N\", \"< N\", \"<= N\", \"!= N\" or \"A..B\""),
                            )
                        })?,
                    }),
                };
                out.push(WantExit {
                    reason: basic | if e.entry_failure { 1 << 31 } else { 0 },
                    qualification,
                    rip: opt(&e.rip)?,
                    length: e.length,
                    intr_info: opt(&e.intr_info)?.map(|v| v as u32),
                    gpa: opt(&e.gpa)?,
                    gla: opt(&e.gla)?,
                    error_code: opt(&e.error_code)?.map(|v| v as u32),
                    preemption_timer,
                    activity_state: e.activity_state,
                });
            }
            Some(out)
        }
    };
    let mut l0_exits = Vec::new();
    for e in &ex.l0_exits {
        l0_exits.push((cx.reason(&e.reason)? as u16, e.count));
    }
    let mut registers = Vec::new();
    for (name, v) in &ex.registers {
        let i = gpr_index(name)
            .or_else(|| (name == "rip").then_some(16))
            .or_else(|| (name == "rflags").then_some(17))
            .ok_or_else(|| {
                cx.err(
                    v.span(),
                    format!("unknown register `{name}` (rax..r15, rip, rflags)"),
                )
            })?;
        registers.push((name.clone(), i, cx.value(v)?));
    }
    let vmx_outcome = match &ex.vmx_outcome {
        None => None,
        Some(s) => Some(outcome_code(s.get_ref()).ok_or_else(|| {
            cx.err(
                s.span(),
                "vmx_outcome: VMfailInvalid, VMfailValid(N) or fault(#UD|#GP|#SS|#PF)",
            )
        })?),
    };
    let name = sf.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map_or("scenario".into(), |s| s.to_string_lossy().into_owned())
    });
    Ok(Compiled {
        name,
        file: file.to_path_buf(),
        expect_fail: sf.expect_fail,
        blob,
        program,
        l1_exits,
        l0_exits,
        registers,
        console: ex.console.clone(),
        vmx_outcome,
        vmx_ops: want_ops,
        memory,
    })
}

/// `mode` of a VMCS write: `write` (default), `or`, `clear`.
fn write_mode(cx: &Ctx<'_>, w: &FieldWrite) -> Result<u32, ScenarioError> {
    match w.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("write", _)) => Ok(lay::WRITE_SET),
        Some(("or", _)) => Ok(lay::WRITE_OR),
        Some(("clear", _)) => Ok(lay::WRITE_CLEAR),
        Some((other, span)) => Err(cx.err(
            span,
            format!("mode `{other}`: use \"write\", \"or\" or \"clear\""),
        )),
    }
}

/// `[l1] lapic_timer` -> the registers L1 writes (one-shot, SDM 11.5.4).
fn lapic_timer(cx: &Ctx<'_>, t: &LapicTimerSpec) -> Result<lay::LapicTimer, ScenarioError> {
    let vector = *t.vector.get_ref();
    if !(16..=255).contains(&vector) {
        return Err(cx.err(
            t.vector.span(),
            format!("lapic_timer vector {vector}: use 16-255 (0-15 are illegal APIC vectors)"),
        ));
    }
    // Figure 11-10: bits 3, 1:0 of TDCR; 0b111 divides by 1.
    let tdcr = match t.divide.as_ref().map(|d| (*d.get_ref(), d.span())) {
        None | Some((1, _)) => 0xb,
        Some((2, _)) => 0x0,
        Some((4, _)) => 0x1,
        Some((8, _)) => 0x2,
        Some((16, _)) => 0x3,
        Some((32, _)) => 0x8,
        Some((64, _)) => 0x9,
        Some((128, _)) => 0xa,
        Some((d, span)) => {
            return Err(cx.err(
                span,
                format!("lapic_timer divide {d}: use 1, 2, 4, 8, 16, 32, 64 or 128"),
            ))
        }
    };
    Ok(lay::LapicTimer {
        armed: 1,
        lvt: vector,
        tdcr,
        tmict: t.count,
    })
}

/// The memory operand of a VMX op: `vmcs+0x10`, `vmxon`, a number, a label.
fn op_address(cx: &Ctx<'_>, v: &Spanned<Value>) -> Result<(u32, u64), ScenarioError> {
    if let Value::Str(s) = v.get_ref() {
        let t = s.trim();
        for (base, name) in lay::BASE_NAMES.iter().enumerate().skip(1) {
            let Some(rest) = t.strip_prefix(name) else {
                continue;
            };
            let rest = rest.trim();
            let off = if rest.is_empty() {
                Some(0)
            } else if let Some(n) = rest.strip_prefix('+') {
                parse_num(n)
            } else {
                rest.strip_prefix('-')
                    .and_then(parse_num)
                    .map(u64::wrapping_neg)
            };
            if let Some(off) = off {
                return Ok((base as u32, off));
            }
        }
    }
    Ok((lay::BASE_ABSOLUTE, cx.value(v)?))
}

fn compile_vmx_ops(
    cx: &Ctx<'_>,
    specs: &[VmxOpSpec],
) -> Result<(Vec<lay::VmxOp>, Vec<WantOp>), ScenarioError> {
    let mut ops = Vec::new();
    let mut want = Vec::new();
    for o in specs {
        let name = o.op.get_ref().to_ascii_lowercase();
        let op = lay::OP_NAMES
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| {
                cx.err(
                    o.op.span(),
                    format!(
                        "unknown VMX op `{name}`; use one of {}",
                        lay::OP_NAMES.join(", ")
                    ),
                )
            })? as u32;
        let phase = match &o.phase {
            None => lay::PHASE_LAUNCH,
            Some(p) => lay::PHASE_NAMES
                .iter()
                .position(|n| *n == p.get_ref().as_str())
                .ok_or_else(|| cx.err(p.span(), "phase: use \"setup\", \"launch\" or \"end\""))?
                as u32,
        };
        fn need<'v>(
            cx: &Ctx<'_>,
            o: &VmxOpSpec,
            v: &'v Option<Spanned<Value>>,
            what: &str,
        ) -> Result<&'v Spanned<Value>, ScenarioError> {
            v.as_ref().ok_or_else(|| {
                cx.err(
                    o.op.span(),
                    format!("VMX op `{}` needs `{what}`", o.op.get_ref()),
                )
            })
        }
        let mut rec = lay::VmxOp {
            op,
            phase,
            base: lay::BASE_ABSOLUTE,
            a: 0,
            b: 0,
            c: 0,
        };
        let mut what = name.clone();
        match op {
            lay::OP_VMXON | lay::OP_VMCLEAR | lay::OP_VMPTRLD => {
                let a = need(cx, o, &o.address, "address")?;
                (rec.base, rec.a) = op_address(cx, a)?;
                let shown = match a.get_ref() {
                    Value::Num(n) => format!("{n:#x}"),
                    Value::Str(s) => s.clone(),
                };
                let _ = write!(what, " {shown}");
            }
            lay::OP_VMREAD | lay::OP_VMWRITE => {
                let f = need(cx, o, &o.field, "field")?;
                rec.a = u64::from(cx.field(f)?);
                let shown = match f.get_ref() {
                    Value::Num(n) => format!("{n:#x}"),
                    Value::Str(s) => s.clone(),
                };
                let _ = write!(what, " {shown}");
                if op == lay::OP_VMWRITE {
                    rec.b = cx.value(need(cx, o, &o.value, "value")?)?;
                    let _ = write!(what, " <- {:#x}", rec.b);
                }
            }
            lay::OP_INVEPT | lay::OP_INVVPID => {
                rec.a = cx.value(need(cx, o, &o.kind, "type")?)?;
                let d = o.descriptor.as_deref().unwrap_or(&[]);
                if d.len() > 2 {
                    return Err(cx.err(o.op.span(), "descriptor: at most two quadwords"));
                }
                if let Some(v) = d.first() {
                    rec.b = cx.value(v)?;
                }
                if let Some(v) = d.get(1) {
                    rec.c = cx.value(v)?;
                }
                let _ = write!(what, " type {} [{:#x}, {:#x}]", rec.a, rec.b, rec.c);
            }
            _ => {}
        }
        let outcome = outcome_code(o.expect.get_ref()).ok_or_else(|| {
            cx.err(
                o.expect.span(),
                "expect: VMsucceed, VMfailInvalid, VMfailValid(N) or fault(#UD|#GP|#SS|#PF)",
            )
        })?;
        let value = o.result.as_ref().map(|v| cx.value(v)).transpose()?;
        let _ = write!(
            what,
            " ({}, line {})",
            lay::PHASE_NAMES[phase as usize],
            line_of(cx.text, o.op.span())
        );
        ops.push(rec);
        want.push(WantOp {
            what,
            outcome,
            value,
        });
    }
    if ops.len() > lay::MAX_VMX_OPS {
        return Err(cx.err(
            0..0,
            format!("{} VMX ops: at most {}", ops.len(), lay::MAX_VMX_OPS),
        ));
    }
    Ok((ops, want))
}

fn compile_memory(
    cx: &Ctx<'_>,
    specs: &[MemSpec],
) -> Result<(Vec<lay::MemRange>, Vec<WantMem>), ScenarioError> {
    let mut ranges = Vec::new();
    let mut want = Vec::new();
    let mut total = 0usize;
    for m in specs {
        let addr = cx.value(&m.address)?;
        let mut forms: Vec<Vec<u8>> = Vec::new();
        if let Some(b) = &m.bytes {
            forms.push(b.clone());
        }
        if let Some(t) = &m.text {
            forms.push(t.as_bytes().to_vec());
        }
        for (v, n) in [(&m.word, 2), (&m.dword, 4), (&m.qword, 8)] {
            if let Some(v) = v {
                forms.push(cx.value(v)?.to_le_bytes()[..n].to_vec());
            }
        }
        let bytes = match forms.len() {
            1 => forms.remove(0),
            _ => {
                return Err(cx.err(
                    m.address.span(),
                    "memory: give exactly one of `bytes`, `text`, `word`, `dword`, `qword`",
                ))
            }
        };
        if bytes.is_empty()
            || addr
                .checked_add(bytes.len() as u64)
                .is_none_or(|e| e > lay::CODE_END)
        {
            return Err(cx.err(
                m.address.span(),
                format!(
                    "memory at {addr:#x}: the range must be non-empty and below {:#x}",
                    lay::CODE_END
                ),
            ));
        }
        total += bytes.len();
        if total > lay::RESULTS_MEMORY_MAX {
            return Err(cx.err(
                m.address.span(),
                format!("memory: at most {} bytes in all", lay::RESULTS_MEMORY_MAX),
            ));
        }
        let what = match m.address.get_ref() {
            Value::Num(n) => format!("{n:#x}"),
            Value::Str(s) => format!("{s} = {addr:#x}"),
        };
        ranges.push(lay::MemRange {
            addr,
            len: bytes.len() as u32,
        });
        want.push(WantMem { addr, what, bytes });
    }
    Ok((ranges, want))
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The built-in L1 image with the scenario appended so that a Multiboot
/// loader puts it at `SCENARIO_ADDR`: the a.out-kludge `load_end_addr`
/// is moved past it (the gap is zero-filled, which also covers L1's .bss,
/// so `bss_end_addr` becomes 0).
pub fn image_with_scenario(image: &[u8], blob: &[u8]) -> Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x1bad_b002;
    let rd = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let off = (0..8192usize.min(image.len()))
        .step_by(4)
        .find(|&o| rd(image, o) == Some(MAGIC))
        .ok_or("the L1 image has no Multiboot header")?;
    let field = |i: usize| rd(image, off + 12 + 4 * i).ok_or("truncated Multiboot header");
    let (header_addr, load_addr) = (field(0)?, field(1)?);
    let start = (off as u64)
        .checked_sub(u64::from(header_addr - load_addr))
        .ok_or("bad Multiboot address fields")? as usize;
    let target = (lay::SCENARIO_ADDR - u64::from(load_addr)) as usize;
    let mut out = image.get(..start).ok_or("bad image")?.to_vec();
    let body = image.get(start..).unwrap_or(&[]);
    let load_end = field(2)?;
    let used = if load_end == 0 {
        body.len()
    } else {
        (load_end - load_addr) as usize
    };
    if used > target {
        return Err("L1's image reaches the scenario address".into());
    }
    out.extend_from_slice(body.get(..used).ok_or("bad load_end_addr")?);
    out.resize(start + target, 0);
    out.extend_from_slice(blob);
    let new_end = (lay::SCENARIO_ADDR as usize + blob.len()) as u32;
    out[off + 20..off + 24].copy_from_slice(&new_end.to_le_bytes());
    out[off + 24..off + 28].copy_from_slice(&0u32.to_le_bytes());
    Ok(out)
}

/// What one scenario run showed.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// The file.
    pub file: PathBuf,
    /// Observed = expected.
    pub matched: bool,
    /// `matched != expect_fail`.
    pub passed: bool,
    /// Expected-vs-observed lines (`-` expected, `+` observed) on a mismatch,
    /// or the error that stopped the run.
    pub diff: String,
    /// The observed exits as L1 recorded them.
    pub observed: Vec<lay::ExitRecord>,
    /// The full console output of the run.
    pub log: Vec<String>,
}

/// Parses the `scenario-results OFFSET HEX` lines L1 printed.
pub fn results_from_console(lines: &[String]) -> Vec<u8> {
    let mut area = vec![0u8; lay::RESULTS_LEN];
    for l in lines {
        let Some(rest) = l.split("scenario-results ").nth(1) else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(off), Some(hex)) = (it.next(), it.next()) else {
            continue;
        };
        // L1 prints these lines: an offset beyond the area (or beyond
        // usize) is ignored, not added to.
        let Some(off) = parse_num(off).and_then(|o| usize::try_from(o).ok()) else {
            continue;
        };
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let byte = std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok());
            let slot = off.checked_add(i).and_then(|at| area.get_mut(at));
            if let (Some(b), Some(slot)) = (byte, slot) {
                *slot = b;
            }
        }
    }
    area
}

fn show_exit(r: &lay::ExitRecord, labels: &BTreeMap<String, u64>) -> String {
    let rip = labels
        .iter()
        .filter(|(_, a)| **a <= r.rip && r.rip - **a < 0x100)
        .max_by_key(|(_, a)| **a)
        .map(|(l, a)| {
            if *a == r.rip {
                format!(" ({l})")
            } else {
                format!(" ({l}+{})", r.rip - a)
            }
        })
        .unwrap_or_default();
    let mut s = format!(
        "reason={} ({}){} qual={:#x} rip={:#x}{} len={} intr_info={:#x} gpa={:#x} gla={:#x}",
        r.reason & 0xffff,
        reason_name(r.reason as u16),
        if r.reason & 1 << 31 != 0 {
            " entry-failure"
        } else {
            ""
        },
        r.qualification,
        r.rip,
        rip,
        r.instruction_len,
        r.intr_info,
        r.gpa,
        r.gla
    );
    // Shown when not 0 (most exits), to keep the common line short.
    for (name, v) in [
        ("error_code", r.intr_error),
        ("preemption_timer", r.preemption_timer),
        ("activity", r.activity_state),
    ] {
        if v != 0 {
            let _ = write!(s, " {name}={v:#x}");
        }
    }
    s
}

fn show_want(w: &WantExit) -> String {
    let mut s = format!(
        "reason={} ({}){}",
        w.reason & 0xffff,
        reason_name(w.reason as u16),
        if w.reason & 1 << 31 != 0 {
            " entry-failure"
        } else {
            ""
        }
    );
    if let Some((m, v)) = w.qualification {
        if m == u64::MAX {
            let _ = write!(s, " qual={v:#x}");
        } else {
            let _ = write!(s, " qual&{m:#x}={v:#x}");
        }
    }
    if let Some(r) = w.rip {
        let _ = write!(s, " rip={r:#x}");
    }
    if let Some(l) = w.length {
        let _ = write!(s, " len={l}");
    }
    if let Some(i) = w.intr_info {
        let _ = write!(s, " intr_info={i:#x}");
    }
    if let Some(g) = w.gpa {
        let _ = write!(s, " gpa={g:#x}");
    }
    if let Some(g) = w.gla {
        let _ = write!(s, " gla={g:#x}");
    }
    if let Some(e) = w.error_code {
        let _ = write!(s, " error_code={e:#x}");
    }
    if let Some(t) = w.preemption_timer {
        let _ = write!(s, " preemption_timer={t}");
    }
    if let Some(a) = w.activity_state {
        let _ = write!(s, " activity={a:#x}");
    }
    s
}

fn exit_matches(w: &WantExit, r: &lay::ExitRecord) -> bool {
    w.reason == r.reason
        && w.qualification
            .is_none_or(|(m, v)| r.qualification & m == v)
        && w.rip.is_none_or(|x| x == r.rip)
        && w.length.is_none_or(|x| x == r.instruction_len)
        && w.intr_info.is_none_or(|x| x == r.intr_info)
        && w.gpa.is_none_or(|x| x == r.gpa)
        && w.gla.is_none_or(|x| x == r.gla)
        && w.error_code.is_none_or(|x| x == r.intr_error)
        && w.preemption_timer
            .is_none_or(|c| c.matches(r.preemption_timer.into()))
        && w.activity_state.is_none_or(|x| x == r.activity_state)
}

/// What a run observed, for [`compare`].
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The results area as L1 left it.
    pub results: Vec<u8>,
    /// L2 exits by basic reason: (handled by L0, reflected to L1).
    pub l2_exits: BTreeMap<u16, (u64, u64)>,
}

/// Compares a run with the expectations; the diff is empty on a match.
pub fn compare(c: &Compiled, obs: &Observed) -> (Vec<lay::ExitRecord>, String) {
    let mut diff = String::new();
    let header = match lay::ResultsHeader::decode(&obs.results) {
        Ok(h) => h,
        Err(_) => {
            return (
                Vec::new(),
                "  L1 wrote no results: the run ended before L1 finished the scenario (see the log's `[L0] end:` line)\n".into(),
            );
        }
    };
    let n = (header.exits as usize).min(lay::MAX_EXIT_RECORDS);
    let exits: Vec<lay::ExitRecord> = (0..n)
        .map(|i| {
            let o = lay::exit_record_offset(i);
            lay::ExitRecord::decode(obs.results.get(o..o + lay::EXIT_RECORD_LEN).unwrap_or(&[]))
        })
        .collect();
    if header.status == lay::STATUS_BAD_SCENARIO || header.status == lay::STATUS_SETUP_FAILED {
        let _ = writeln!(
            diff,
            "  L1 could not set up the scenario (status {}); see the log",
            header.status
        );
    }
    if let Some(want) = &c.l1_exits {
        let mismatch =
            want.len() != exits.len() || want.iter().zip(&exits).any(|(w, r)| !exit_matches(w, r));
        if mismatch {
            let _ = writeln!(diff, "  L1 exits (- expected, + observed):");
            for i in 0..want.len().max(exits.len()) {
                match (want.get(i), exits.get(i)) {
                    (Some(w), Some(r)) if exit_matches(w, r) => {
                        let _ = writeln!(diff, "     #{i} {}", show_exit(r, &c.program.labels));
                    }
                    (w, r) => {
                        if let Some(w) = w {
                            let _ = writeln!(diff, "  -  #{i} {}", show_want(w));
                        }
                        if let Some(r) = r {
                            let _ = writeln!(diff, "  +  #{i} {}", show_exit(r, &c.program.labels));
                        }
                    }
                }
            }
        }
    }
    for (reason, count) in &c.l0_exits {
        let got = obs.l2_exits.get(reason).map_or(0, |e| e.0);
        if got != *count {
            let _ = writeln!(
                diff,
                "  L0-handled {} exits: - expected {count}, + observed {got}",
                reason_name(*reason)
            );
        }
    }
    for (name, i, want) in &c.registers {
        let got = match i {
            16 => header.rip,
            17 => header.rflags,
            i => header.gprs.get(*i).copied().unwrap_or(0),
        };
        if got != *want {
            let _ = writeln!(
                diff,
                "  register {name}: - expected {want:#x}, + observed {got:#x}"
            );
        }
    }
    if let Some(want) = &c.console {
        let off = lay::RESULTS_CONSOLE_OFF;
        let bytes = obs
            .results
            .get(off..off + header.console_len as usize)
            .unwrap_or(&[]);
        let got = String::from_utf8_lossy(bytes);
        if got != *want {
            let _ = writeln!(
                diff,
                "  console: - expected {want:?}\n           + observed {got:?}"
            );
        }
    }
    for (i, w) in c.vmx_ops.iter().enumerate() {
        let o = lay::op_result_offset(i);
        let r = lay::OpResult::decode(obs.results.get(o..o + lay::OP_RESULT_LEN).unwrap_or(&[]));
        if r.done == 0 {
            let _ = writeln!(
                diff,
                "  vmx op #{i} {}: - expected {}, + not executed (its phase never came; see the log)",
                w.what,
                op_outcome_text(w.outcome)
            );
            continue;
        }
        if r.outcome != w.outcome {
            let _ = writeln!(
                diff,
                "  vmx op #{i} {}: - expected {}, + observed {}",
                w.what,
                op_outcome_text(w.outcome),
                op_outcome_text(r.outcome)
            );
        }
        if let Some(v) = w.value.filter(|v| *v != r.value) {
            let _ = writeln!(
                diff,
                "  vmx op #{i} {} result: - expected {v:#x}, + observed {:#x}",
                w.what, r.value
            );
        }
    }
    let mut at = lay::RESULTS_MEMORY_OFF;
    for w in &c.memory {
        let end = at + w.bytes.len();
        let copied = at - lay::RESULTS_MEMORY_OFF + w.bytes.len() <= header.memory_len as usize;
        let got = obs.results.get(at..end).unwrap_or(&[]);
        at = end;
        if !copied {
            let _ = writeln!(
                diff,
                "  memory at {}: not copied by L1 (the run ended before L1 finished)",
                w.what
            );
        } else if got != w.bytes.as_slice() {
            let marks: String = w
                .bytes
                .iter()
                .zip(got)
                .map(|(a, b)| if a == b { "   " } else { "^^ " })
                .collect();
            let _ = writeln!(
                diff,
                "  memory at {}, {} bytes (- expected, + observed):\n  -  {}\n  +  {}\n     {}",
                w.what,
                w.bytes.len(),
                hex_bytes(&w.bytes),
                hex_bytes(got),
                marks.trim_end()
            );
        }
    }
    match c.vmx_outcome {
        Some(want) if want != header.launch_outcome => {
            let _ = writeln!(
                diff,
                "  VM-entry instruction: - expected {}, + observed {}",
                outcome_text(want),
                outcome_text(header.launch_outcome)
            );
        }
        None if header.status == lay::STATUS_ENTRY_FAILED => {
            let _ = writeln!(
                diff,
                "  VM-entry instruction failed unexpectedly: {}",
                outcome_text(header.launch_outcome)
            );
        }
        _ => {}
    }
    (exits, diff)
}

/// Runs a compiled scenario on KVM with the built-in L1.
pub fn run_compiled(c: &Compiled, timeout: Duration) -> ScenarioResult {
    let fail = |diff: String, log: Vec<String>| ScenarioResult {
        name: c.name.clone(),
        file: c.file.clone(),
        matched: false,
        passed: c.expect_fail,
        diff,
        observed: Vec::new(),
        log,
    };
    let image = match image_with_scenario(L1_GUEST_ELF, &c.blob) {
        Ok(i) => i,
        Err(e) => return fail(format!("  cannot build the L1 image: {e}\n"), Vec::new()),
    };
    let sink = CaptureSink::new();
    let opts = BootOptions {
        mem_mib: 64,
        cmdline: "test=scenario".into(),
        timeout: Some(timeout),
        ..Default::default()
    };
    let report = match run_kernel(&image, &opts, Box::new(sink.clone())) {
        Ok(r) => r,
        Err(e) => return fail(format!("  the run failed: {e}\n"), sink.lines()),
    };
    let log = sink.lines();
    let mut obs = Observed {
        results: results_from_console(&log),
        ..Default::default()
    };
    for (reason, _, l0, l1) in &report.stats.l2_exits {
        obs.l2_exits.insert(*reason, (*l0, *l1));
    }
    let (observed, diff) = compare(c, &obs);
    let matched = diff.is_empty();
    ScenarioResult {
        name: c.name.clone(),
        file: c.file.clone(),
        matched,
        passed: matched != c.expect_fail,
        diff,
        observed,
        log,
    }
}

/// Reads, compiles and runs one scenario file.
pub fn run_scenario_file(path: &Path) -> Result<ScenarioResult, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the file: {e}"),
    })?;
    let c = compile(&text, path)?;
    Ok(run_compiled(&c, Duration::from_secs(30)))
}

/// `l0-vmm scenario FILE...`: runs each file and writes `PASS`/`FAIL` per
/// file (with the diff when there is one) and a total line to `out`;
/// returns the process exit status: 0 only when every file passes.
pub fn run_files(paths: &[PathBuf], out: &mut dyn OutputSink) -> i32 {
    let mut failed = 0;
    for p in paths {
        let mut text = String::new();
        match run_scenario_file(p) {
            Ok(r) => {
                let verdict = match (r.passed, r.matched) {
                    (true, true) => "PASS",
                    (true, false) => "PASS (failed as expected)",
                    (false, _) => "FAIL",
                };
                let _ = writeln!(text, "{verdict} {} ({})", r.name, r.file.display());
                text.push_str(&r.diff);
                if !r.passed {
                    failed += 1;
                }
            }
            Err(e) => {
                let _ = writeln!(text, "FAIL {e}");
                failed += 1;
            }
        }
        for line in text.lines() {
            out.write_line(line);
        }
    }
    out.write_line(&format!(
        "{} scenarios, {} passed, {failed} failed",
        paths.len(),
        paths.len() - failed
    ));
    i32::from(failed != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenarios_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios")
    }

    const MINIMAL: &str = "[l2]\ncode = \"\"\"\nstart:\n  out 0x80, al\n  hlt\n\"\"\"\n";

    fn compile_str(text: &str) -> Result<Compiled, ScenarioError> {
        compile(text, Path::new("t.toml"))
    }

    #[test]
    fn test_minimal_scenario_compiles_with_defaults() {
        let c = compile_str(MINIMAL).unwrap();
        let h = lay::Header::decode(&c.blob).unwrap();
        assert_eq!(h.mode, lay::StartMode::Long);
        assert_eq!(h.code_addr, lay::DEFAULT_CODE_ADDR);
        assert_eq!(h.entry_rip, lay::DEFAULT_CODE_ADDR);
        assert_eq!(lay::Header::bytes(&c.blob, h.code, 1), [0xe6, 0x80, 0xf4]);
        assert_ne!(h.primary & PrimaryProcBased::HLT_EXITING.bits(), 0);
        assert_ne!(h.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        assert_eq!(h.flags & lay::FLAG_EPT, 0);
        assert_eq!(c.program.labels["start"], lay::DEFAULT_CODE_ADDR);
    }

    #[test]
    fn test_unknown_field_is_rejected_with_its_line() {
        let e =
            compile_str(&format!("{MINIMAL}[l1]\nio_bitmap = [1]\nfrobnicate = 1\n")).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("frobnicate"), "{e}");
        assert!(e.to_string().starts_with("t.toml:9: "), "{e}");
    }

    #[test]
    fn test_assembler_error_names_the_file_line() {
        let e = compile_str("name = \"x\"\n[l2]\ncode = \"\"\"\n  nop\n  bogus eax\n\"\"\"\n")
            .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("bogus"), "{e}");
    }

    #[test]
    fn test_semantic_errors_name_the_line() {
        let e = compile_str(&format!(
            "{MINIMAL}[expect]\nl1_exits = [\n  {{ reason = \"io\", rip = \"nowhere\" }},\n]\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("nowhere"), "{e}");
        let e = compile_str(&format!(
            "{MINIMAL}[l1]\non_exit = [{{ reason = \"frob\" }}]\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        let e = compile_str(&format!(
            "{MINIMAL}[l1.controls]\nprimary = [\"HLT_EXITING\", \"NOPE\"]\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("NOPE"), "{e}");
        let e =
            compile_str(&format!("{MINIMAL}[l1.msr_bitmap]\nread = [0x40000000]\n")).unwrap_err();
        assert!(e.message.contains("no bit"), "{e}");
    }

    #[test]
    fn test_bitmaps_controls_and_actions_are_encoded() {
        let text = format!(
            "{MINIMAL}[l1]\nio_bitmap = [0x80, \"0x8000-0x8001\"]\nexception_bitmap = [6, 14]\n\
             msr_bitmap = {{ read = [0x1b, 0xc0000080], write = [\"0xc0000081\"] }}\n\
             controls = {{ primary = [\"HLT_EXITING\", \"UNCOND_IO_EXITING\"] }}\n\
             on_exit = [{{ reason = \"io\", action = \"jump\", target = \"start\", answer = 7 }}]\n\
             vmcs = [{{ field = \"GUEST_RFLAGS\", value = 0 }}]\n"
        );
        let c = compile_str(&text).unwrap();
        let h = lay::Header::decode(&c.blob).unwrap();
        let io = lay::Header::bytes(&c.blob, h.io_bitmaps, 1);
        assert_eq!(io[0x10], 1); // port 0x80
        assert_eq!(io[4096], 3); // 0x8000, 0x8001 in bitmap B
        assert_eq!(io.iter().map(|b| b.count_ones()).sum::<u32>(), 3);
        let msr = lay::Header::bytes(&c.blob, h.msr_bitmap, 1);
        assert_eq!(msr[3], 1 << 3); // read-low 0x1b
        assert_eq!(msr[1024 + 16], 1); // read-high 0xc0000080
        assert_eq!(msr[3072 + 16], 2); // write-high 0xc0000081
        assert_eq!(h.exception_bitmap, (1 << 6) | (1 << 14));
        assert_eq!(
            h.primary,
            (PrimaryProcBased::HLT_EXITING | PrimaryProcBased::UNCOND_IO_EXITING).bits()
        );
        let a = lay::Action::decode(lay::Header::bytes(&c.blob, h.actions, lay::ACTION_LEN));
        assert_eq!(
            (a.reason, a.next, a.target, a.answer),
            (30, lay::Next::Jump, lay::DEFAULT_CODE_ADDR, 7)
        );
        let w = lay::VmcsWrite::decode(lay::Header::bytes(&c.blob, h.writes, lay::WRITE_LEN));
        assert_eq!(w.encoding, VmcsField::GUEST_RFLAGS.encoding());
    }

    #[test]
    fn test_image_with_scenario_puts_the_blob_at_the_scenario_address() {
        let c = compile_str(MINIMAL).unwrap();
        let img = image_with_scenario(L1_GUEST_ELF, &c.blob).unwrap();
        let ram = std::sync::Arc::new(crate::memory::GuestRam::new(16 << 20).unwrap());
        crate::loader::load_kernel(&ram, &img, "").unwrap();
        let mut back = vec![0u8; c.blob.len()];
        ram.read_bytes(lay::SCENARIO_ADDR, &mut back).unwrap();
        assert_eq!(back, c.blob);
        assert!(image_with_scenario(b"no header", &c.blob).is_err());
    }

    #[test]
    fn test_results_from_console_and_compare_diff() {
        let c = compile_str(&format!(
            "{MINIMAL}[expect]\nl1_exits = [{{ reason = \"io\", rip = \"start\", length = 2 }}, {{ reason = \"hlt\" }}]\n\
             registers = {{ rax = 5 }}\n"
        ))
        .unwrap();
        let mut area = vec![0u8; lay::RESULTS_LEN];
        let mut h = lay::ResultsHeader {
            exits: 2,
            ..Default::default()
        };
        h.gprs[0] = 5;
        h.encode(&mut area);
        let io = lay::ExitRecord {
            reason: 30,
            instruction_len: 2,
            rip: lay::DEFAULT_CODE_ADDR,
            ..Default::default()
        };
        io.encode(&mut area[lay::exit_record_offset(0)..]);
        let hlt = lay::ExitRecord {
            reason: 12,
            instruction_len: 1,
            rip: lay::DEFAULT_CODE_ADDR + 2,
            ..Default::default()
        };
        hlt.encode(&mut area[lay::exit_record_offset(1)..]);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let lines: Vec<String> = (0..lay::exit_record_offset(2))
            .step_by(64)
            .map(|o| {
                format!(
                    "[L1] scenario-results {o:#x} {}",
                    hex(&area[o..(o + 64).min(lay::exit_record_offset(2))])
                )
            })
            .collect();
        let back = results_from_console(&lines);
        assert_eq!(
            &back[..lay::exit_record_offset(2)],
            &area[..lay::exit_record_offset(2)]
        );
        let obs = Observed {
            results: back,
            ..Default::default()
        };
        let (exits, diff) = compare(&c, &obs);
        assert_eq!(exits.len(), 2);
        assert!(diff.is_empty(), "{diff}");
        // Observed RAX differs and the HLT exit is missing: both in the diff.
        let mut area2 = area.clone();
        let mut h2 = h;
        h2.gprs[0] = 6;
        h2.exits = 1;
        h2.encode(&mut area2);
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area2,
                ..Default::default()
            },
        );
        assert!(
            diff.contains("register rax: - expected 0x5, + observed 0x6"),
            "{diff}"
        );
        assert!(diff.contains("-  #1 reason=12 (hlt)"), "{diff}");
        assert!(
            diff.contains("     #0 reason=30 (io) qual=0x0 rip=0x500000 (start) len=2"),
            "{diff}"
        );
    }

    #[test]
    fn test_run_files_reports_unreadable_and_malformed_files() {
        let dir = std::env::temp_dir().join(format!("scenario-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[l2]\ncode = 5\n").unwrap();
        let missing = dir.join("missing.toml");
        let sink = CaptureSink::new();
        let mut out: Box<dyn OutputSink> = Box::new(sink.clone());
        let status = run_files(&[bad.clone(), missing], &mut *out);
        assert_eq!(status, 1);
        let lines = sink.lines();
        assert!(
            lines[0].starts_with(&format!("FAIL {}:2: ", bad.display())),
            "{lines:?}"
        );
        assert!(lines[1].contains("cannot read the file"), "{lines:?}");
        assert!(
            lines[2].ends_with("2 scenarios, 0 passed, 2 failed"),
            "{lines:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_vmx_ops_are_encoded_and_checked() {
        let text = format!(
            "{MINIMAL}[l1]\nvmx = [\n\
             {{ op = \"vmclear\", address = \"vmcs+0x10\", expect = \"VMfailValid(2)\" }},\n\
             {{ op = \"vmread\", phase = \"end\", field = \"VM_INSTRUCTION_ERROR\", expect = \"VMsucceed\", result = 2 }},\n\
             {{ op = \"invept\", phase = \"setup\", type = 1, descriptor = [7, 9], expect = \"VMfailInvalid\" }},\n]\n"
        );
        let c = compile_str(&text).unwrap();
        let h = lay::Header::decode(&c.blob).unwrap();
        let ops: Vec<lay::VmxOp> = lay::Header::bytes(&c.blob, h.vmx_ops, lay::VMX_OP_LEN)
            .chunks_exact(lay::VMX_OP_LEN)
            .map(lay::VmxOp::decode)
            .collect();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            (ops[0].op, ops[0].phase, ops[0].base, ops[0].a),
            (lay::OP_VMCLEAR, lay::PHASE_LAUNCH, lay::BASE_VMCS, 0x10)
        );
        assert_eq!(
            (ops[1].op, ops[1].phase, ops[1].a),
            (
                lay::OP_VMREAD,
                lay::PHASE_END,
                u64::from(VmcsField::VM_INSTRUCTION_ERROR.encoding())
            )
        );
        assert_eq!((ops[2].a, ops[2].b, ops[2].c), (1, 7, 9));
        assert_eq!(c.vmx_ops[0].outcome, 0x102);
        assert_eq!(c.vmx_ops[1].value, Some(2));
        // Observed: op 0 as expected, op 1 read 3, op 2 never ran.
        let mut area = vec![0u8; lay::RESULTS_LEN];
        lay::ResultsHeader::default().encode(&mut area);
        let put = |area: &mut Vec<u8>, i: usize, r: lay::OpResult| {
            r.encode(&mut area[lay::op_result_offset(i)..]);
        };
        put(
            &mut area,
            0,
            lay::OpResult {
                done: 1,
                outcome: 0x102,
                value: 0,
            },
        );
        put(
            &mut area,
            1,
            lay::OpResult {
                done: 1,
                outcome: 0,
                value: 3,
            },
        );
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area.clone(),
                ..Default::default()
            },
        );
        assert!(!diff.contains("#0"), "{diff}");
        assert!(
            diff.contains("vmx op #1 vmread VM_INSTRUCTION_ERROR (end, line 10) result: - expected 0x2, + observed 0x3"),
            "{diff}"
        );
        assert!(diff.contains("vmx op #2 invept type 1 [0x7, 0x9] (setup, line 11): - expected VMfailInvalid, + not executed"), "{diff}");
        put(
            &mut area,
            1,
            lay::OpResult {
                done: 1,
                outcome: 0,
                value: 2,
            },
        );
        put(
            &mut area,
            2,
            lay::OpResult {
                done: 1,
                outcome: 1,
                value: 0,
            },
        );
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area,
                ..Default::default()
            },
        );
        assert!(diff.is_empty(), "{diff}");
    }

    #[test]
    fn test_bad_vmx_ops_are_rejected_with_their_line() {
        for (op, msg) in [
            (
                "{ op = \"vmfrob\", expect = \"VMsucceed\" }",
                "unknown VMX op",
            ),
            (
                "{ op = \"vmclear\", expect = \"VMsucceed\" }",
                "needs `address`",
            ),
            (
                "{ op = \"vmread\", expect = \"VMsucceed\" }",
                "needs `field`",
            ),
            ("{ op = \"vmxoff\", expect = \"maybe\" }", "expect:"),
            (
                "{ op = \"vmxoff\", phase = \"later\", expect = \"VMsucceed\" }",
                "phase",
            ),
            (
                "{ op = \"vmread\", field = \"NOPE\", expect = \"VMsucceed\" }",
                "unknown VMCS field",
            ),
        ] {
            let e = compile_str(&format!("{MINIMAL}[l1]\nvmx = [\n{op},\n]\n")).unwrap_err();
            assert_eq!(e.line, 9, "{e}");
            assert!(e.message.contains(msg), "{msg}: {e}");
        }
    }

    #[test]
    fn test_memory_expectations_are_encoded_and_diffed() {
        let c = compile_str(&format!(
            "{MINIMAL}[expect]\nmemory = [{{ address = \"start\", bytes = [0xe6, 0x80] }}, {{ address = 0x600000, dword = 0x11223344 }}]\n"
        ))
        .unwrap();
        let h = lay::Header::decode(&c.blob).unwrap();
        let r = lay::MemRange::decode(lay::Header::bytes(&c.blob, h.memory, lay::MEM_RANGE_LEN));
        assert_eq!((r.addr, r.len), (lay::DEFAULT_CODE_ADDR, 2));
        assert_eq!(c.memory[1].bytes, [0x44, 0x33, 0x22, 0x11]);
        let mut area = vec![0u8; lay::RESULTS_LEN];
        let mut hd = lay::ResultsHeader {
            memory_len: 6,
            ..Default::default()
        };
        hd.encode(&mut area);
        let m = lay::RESULTS_MEMORY_OFF;
        area[m..m + 6].copy_from_slice(&[0xe6, 0x80, 0x44, 0x33, 0x22, 0x11]);
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area.clone(),
                ..Default::default()
            },
        );
        assert!(diff.is_empty(), "{diff}");
        area[m + 3] = 0x99;
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area.clone(),
                ..Default::default()
            },
        );
        assert!(
            diff.contains("memory at 0x600000, 4 bytes (- expected, + observed):\n  -  44 33 22 11\n  +  44 99 22 11\n        ^^"),
            "{diff}"
        );
        hd.memory_len = 2;
        hd.encode(&mut area);
        let (_, diff) = compare(
            &c,
            &Observed {
                results: area,
                ..Default::default()
            },
        );
        assert!(diff.contains("not copied by L1"), "{diff}");
        for (spec, msg) in [
            ("{ address = 0x600000 }", "exactly one"),
            (
                "{ address = 0x600000, bytes = [1], text = \"a\" }",
                "exactly one",
            ),
            ("{ address = 0x7fffff, dword = 1 }", "below"),
        ] {
            let e = compile_str(&format!("{MINIMAL}[expect]\nmemory = [{spec}]\n")).unwrap_err();
            assert!(e.message.contains(msg), "{msg}: {e}");
        }
    }

    #[test]
    fn test_cmp_parses_numbers_comparisons_and_ranges() {
        assert_eq!(Cmp::parse("0x10"), Some(Cmp::Eq(16)));
        assert_eq!(Cmp::parse("> 0"), Some(Cmp::Gt(0)));
        assert_eq!(Cmp::parse(">=5"), Some(Cmp::Ge(5)));
        assert_eq!(Cmp::parse("< 0x100"), Some(Cmp::Lt(0x100)));
        assert_eq!(Cmp::parse("<= 7"), Some(Cmp::Le(7)));
        assert_eq!(Cmp::parse("!= 0"), Some(Cmp::Ne(0)));
        assert_eq!(Cmp::parse("1..0x10"), Some(Cmp::Range(1, 16)));
        assert_eq!(Cmp::parse("5..1"), None, "empty range");
        assert_eq!(Cmp::parse("> x"), None);
        assert_eq!(Cmp::parse("soon"), None);
        assert!(Cmp::Gt(0).matches(1) && !Cmp::Gt(0).matches(0));
        assert!(Cmp::Range(1, 3).matches(3) && !Cmp::Range(1, 3).matches(4));
        assert!(Cmp::Ne(2).matches(3) && !Cmp::Ne(2).matches(2));
        assert!(Cmp::Le(2).matches(2) && !Cmp::Lt(2).matches(2));
        assert_eq!(Cmp::Range(1, 16).to_string(), "0x1..0x10");
    }

    #[test]
    fn test_timer_fields_lapic_timer_and_write_modes_are_encoded_and_checked() {
        let text = format!(
            "{MINIMAL}[l1]\nlapic_timer = {{ vector = 0x40, count = 5000, divide = 16 }}\n\
             vmcs = [{{ field = \"CPU_BASED_VM_EXEC_CONTROL\", value = 0x8000000, mode = \"or\" }}]\n\
             on_exit = [{{ reason = \"monitor-trap-flag\", action = \"resume\", set = {{ field = \"CPU_BASED_VM_EXEC_CONTROL\", value = 0x8000000, mode = \"clear\" }} }}]\n\
             [expect]\nl1_exits = [{{ reason = \"preemption-timer\", preemption_timer = \"> 0\", activity_state = 1, error_code = 3 }}]\n"
        );
        let c = compile_str(&text).unwrap();
        let h = lay::Header::decode(&c.blob).unwrap();
        assert_eq!(
            h.lapic_timer,
            lay::LapicTimer {
                armed: 1,
                lvt: 0x40,
                tdcr: 0x3,
                tmict: 5000
            }
        );
        let w = lay::VmcsWrite::decode(lay::Header::bytes(&c.blob, h.writes, lay::WRITE_LEN));
        assert_eq!((w.mode, w.value), (lay::WRITE_OR, 0x800_0000));
        let a = lay::Action::decode(lay::Header::bytes(&c.blob, h.actions, lay::ACTION_LEN));
        assert_eq!(
            a.flags,
            lay::ACT_SET_FIELD | lay::ACT_SET_CLEAR,
            "clear is a modifier of set"
        );
        assert_eq!(a.value, 0x800_0000);
        // Without `lapic_timer` L1 leaves its APIC alone.
        let plain = lay::Header::decode(&compile_str(MINIMAL).unwrap().blob).unwrap();
        assert_eq!(plain.lapic_timer.armed, 0);
        let mut area = vec![0u8; lay::RESULTS_LEN];
        lay::ResultsHeader {
            exits: 1,
            ..Default::default()
        }
        .encode(&mut area);
        let mut rec = lay::ExitRecord {
            reason: 52,
            preemption_timer: 0x1234,
            activity_state: 1,
            intr_error: 3,
            ..Default::default()
        };
        rec.encode(&mut area[lay::exit_record_offset(0)..]);
        let obs = |area: &Vec<u8>| Observed {
            results: area.clone(),
            ..Default::default()
        };
        assert!(compare(&c, &obs(&area)).1.is_empty());
        rec.preemption_timer = 0;
        rec.activity_state = 0;
        rec.encode(&mut area[lay::exit_record_offset(0)..]);
        let (_, diff) = compare(&c, &obs(&area));
        assert!(
            diff.contains("-  #0 reason=52 (preemption-timer) error_code=0x3 preemption_timer=>0x0 activity=0x1"),
            "{diff}"
        );
        assert!(diff.contains("+  #0 reason=52 (preemption-timer) qual=0x0 rip=0x0 len=0 intr_info=0x0 gpa=0x0 gla=0x0 error_code=0x3\n"), "{diff}");
    }

    #[test]
    fn test_bad_timer_fields_are_rejected_with_their_line() {
        for (l1, msg) in [
            ("lapic_timer = { vector = 3, count = 1 }", "16-255"),
            (
                "lapic_timer = { vector = 64, count = 1, divide = 3 }",
                "divide 3",
            ),
            (
                "vmcs = [{ field = \"GUEST_RIP\", value = 1, mode = \"xor\" }]",
                "mode `xor`",
            ),
        ] {
            let e = compile_str(&format!("{MINIMAL}[l1]\n{l1}\n")).unwrap_err();
            assert_eq!(e.line, 8, "{e}");
            assert!(e.message.contains(msg), "{msg}: {e}");
        }
        let e = compile_str(&format!(
            "{MINIMAL}[expect]\nl1_exits = [{{ reason = 52, preemption_timer = \"about 3\" }}]\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("preemption_timer `about 3`"), "{e}");
    }

    /// The rows between `<!-- NAME:begin -->` and `<!-- NAME:end -->` of
    /// docs/scenarios.md, split into trimmed cells.
    fn doc_table(name: &str) -> Vec<Vec<String>> {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/scenarios.md"),
        )
        .unwrap();
        let begin = format!("<!-- {name}:begin -->");
        let end = format!("<!-- {name}:end -->");
        let start = doc
            .find(&begin)
            .unwrap_or_else(|| panic!("{begin} missing"));
        let stop = doc.find(&end).unwrap_or_else(|| panic!("{end} missing"));
        doc[start + begin.len()..stop]
            .lines()
            .filter(|l| l.starts_with('|') && !l.starts_with("| ---") && !l.starts_with("| #"))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    /// The scenario names quoted in a table cell (`name`); none in a cell
    /// that starts with `n/a` or `gap` (it may quote files as examples).
    fn cell_files(cell: &str) -> Vec<String> {
        if cell.starts_with("n/a") || cell.starts_with("gap") {
            return Vec::new();
        }
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    fn compile_suite_file(stem: &str) -> Compiled {
        let path = scenarios_dir().join(format!("{stem}.toml"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("coverage table names {}: {e}", path.display()));
        compile(&text, &path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn test_coverage_table_matches_the_suite_and_the_exit_matrix() {
        let rows = doc_table("coverage");
        assert!(rows.len() >= 10, "{rows:?}");
        let mut listed = std::collections::BTreeSet::new();
        for row in &rows {
            let [num, _, reflected, by_l0] = row.as_slice() else {
                panic!("coverage row needs 4 cells: {row:?}");
            };
            let reason: u16 = num.parse().unwrap_or_else(|_| panic!("bad reason {num}"));
            listed.insert(reason);
            for (cell, l0) in [(reflected, false), (by_l0, true)] {
                let files = cell_files(cell);
                if files.is_empty() {
                    assert!(
                        cell.starts_with("n/a") || cell.starts_with("gap"),
                        "reason {reason}: a cell without scenarios must say `n/a` or `gap` and why: {cell:?}"
                    );
                }
                for f in files {
                    let c = compile_suite_file(&f);
                    let ok = if l0 {
                        c.l0_exits.iter().any(|(r, n)| *r == reason && *n > 0)
                    } else {
                        c.l1_exits
                            .iter()
                            .flatten()
                            .any(|w| w.reason & 0xffff == u32::from(reason))
                    };
                    assert!(
                        ok,
                        "{f}.toml does not expect exit {reason} {}",
                        if l0 {
                            "handled by L0 (l0_exits, count > 0)"
                        } else {
                            "in l1_exits"
                        }
                    );
                }
            }
        }
        // Every reason docs/exit-matrix.md marks supported has a row.
        let matrix = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/exit-matrix.md"),
        )
        .unwrap();
        for line in matrix.lines() {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if let (Some(n), Some(sup)) = (cells.first(), cells.get(2)) {
                if let (Ok(n), true) = (n.parse::<u16>(), sup.starts_with("yes")) {
                    assert!(
                        listed.contains(&n),
                        "exit {n} is supported in docs/exit-matrix.md but has no row in the coverage table of docs/scenarios.md"
                    );
                }
            }
        }
    }

    #[test]
    fn test_vmx_error_table_covers_every_error_the_model_produces() {
        use vmcs12::VmInstructionError;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources: String = [
            "vmcs12/src/vmx.rs",
            "vmcs12/src/entry.rs",
            "l0-vmm/src/vmx_emul.rs",
        ]
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap_or_default())
        .collect();
        let mut rows = BTreeMap::new();
        for row in doc_table("vmx-errors") {
            let n: u32 = row[0]
                .parse()
                .unwrap_or_else(|_| panic!("bad error {row:?}"));
            rows.insert(n, row[2].clone());
        }
        for n in 1..64 {
            let Some(e) = VmInstructionError::from_number(n) else {
                continue;
            };
            let produced = sources.contains(&format!("VmInstructionError::{e:?}"));
            let Some(cell) = rows.get(&n) else {
                assert!(
                    !produced,
                    "VMfailValid({n}) ({e:?}) is produced but not in the vmx-errors table"
                );
                continue;
            };
            let files = cell_files(cell);
            if files.is_empty() {
                assert!(
                    !produced && (cell.starts_with("n/a") || cell.starts_with("gap")),
                    "VMfailValid({n}): produced by the model, so it needs a scenario: {cell:?}"
                );
            }
            for f in files {
                let c = compile_suite_file(&f);
                let want = 0x100 | n;
                assert!(
                    c.vmx_outcome == Some(want) || c.vmx_ops.iter().any(|o| o.outcome == want),
                    "{f}.toml does not expect VMfailValid({n})"
                );
            }
        }
    }

    #[test]
    fn test_scenario_suite_on_kvm() {
        if !crate::test_support::kvm_or_skip() {
            return;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(
            std::env::var("SCENARIO_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| scenarios_dir()),
        )
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
        files.sort();
        assert!(!files.is_empty());
        let mut failures = Vec::new();
        for f in &files {
            match run_scenario_file(f) {
                Ok(r) if r.passed => {
                    eprintln!("PASS {} ({} exits observed)", f.display(), r.observed.len());
                    if std::env::var_os("SCENARIO_LOG").is_some() {
                        eprintln!("{}", r.log.join("\n"));
                    }
                }
                Ok(r) => failures.push(format!(
                    "{}:\n{}\n{}",
                    f.display(),
                    r.diff,
                    r.log.join("\n")
                )),
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn test_results_from_console_ignores_offsets_beyond_the_area() {
        let lines = vec![
            format!("[L1] scenario-results {:#x} ffff", u64::MAX),
            format!("[L1] scenario-results {:#x} 11", lay::RESULTS_LEN),
            "[L1] scenario-results 0x2 abzz33".to_string(),
        ];
        let area = results_from_console(&lines);
        assert_eq!(area.len(), lay::RESULTS_LEN);
        // Only the in-area, well-formed pairs land: 0xab at 2, 0x33 at 4.
        assert_eq!(&area[..6], &[0, 0, 0xab, 0, 0x33, 0]);
        assert!(area[6..].iter().all(|b| *b == 0));
    }

    /// A scenario expecting every kind of result L1 reports.
    fn compile_all_expectations() -> Compiled {
        compile_str(&format!(
            "{MINIMAL}[l1]\nvmx = [{{ op = \"vmread\", phase = \"end\", field = \"VM_INSTRUCTION_ERROR\", expect = \"VMsucceed\", result = 2 }}]\n\
             [expect]\nl1_exits = [{{ reason = \"io\", rip = \"start\" }}, {{ reason = \"hlt\" }}]\n\
             registers = {{ rax = 5, rip = 1 }}\nconsole = \"hi\"\n\
             memory = [{{ address = \"start\", bytes = [0xe6, 0x80] }}, {{ address = 0x600000, dword = 1 }}]\n"
        ))
        .unwrap()
    }

    proptest::proptest! {
        /// L1 writes the results area and prints the lines: no offset or
        /// text it prints panics L0.
        #[test]
        fn test_results_from_console_never_panics(
            offs in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..4),
            hex in "[0-9a-fA-Fxz ]{0,40}",
        ) {
            let lines: Vec<String> = offs
                .iter()
                .map(|o| format!("[L1] scenario-results {o:#x} {hex}"))
                .collect();
            proptest::prop_assert_eq!(results_from_console(&lines).len(), lay::RESULTS_LEN);
        }

        /// Any header L1 leaves (counts and lengths up to u32::MAX) and any
        /// area size compare without a panic.
        #[test]
        fn test_compare_never_panics_on_any_results_area(
            words in proptest::collection::vec(proptest::prelude::any::<u32>(), 48),
            len in 0usize..(lay::RESULTS_LEN + 64),
            fill in proptest::prelude::any::<u8>(),
        ) {
            let c = compile_all_expectations();
            let mut area = vec![fill; len];
            for (i, w) in words.iter().enumerate() {
                lay::put_u32(&mut area, 8 + 4 * i, *w);
            }
            lay::put_u64(&mut area, 0, lay::RESULTS_MAGIC);
            let (exits, _) = compare(&c, &Observed { results: area, ..Default::default() });
            proptest::prop_assert!(exits.len() <= lay::MAX_EXIT_RECORDS);
        }
    }
}
