//! Recording L2 exits and replaying them without KVM.
//!
//! A recording holds, for every L2 exit L0 saw, everything [`decide`] and
//! [`prepare_vmcs12`] read and everything they produced:
//!
//! - the exit as [`ExitInfo`] + [`ExitContext`] (decoded again with
//!   [`Exit::from_info`]), the vmcs12 before the exit, the L2 vCPU state
//!   L0 observed and L0's [`L0Policy`];
//! - the decision (disposition and explanation) and every guest-physical
//!   read `decide` made (the I/O, MSR, VMREAD/VMWRITE bitmap bytes, EPT
//!   entries): a [`MemoryLog`];
//! - for a reflected exit, the inputs of `prepare_vmcs12` (the L2 state
//!   it was given, the exit information, the preemption-timer value, each
//!   L2 MSR it read and each guest-physical read and write of the VM-exit
//!   MSR-store area) and its outcome (a VMX abort or not);
//! - the vmcs12 after the exit.
//!
//! [`replay`] feeds the recorded inputs to the functions again (the memory
//! logs become a [`ReplayMemory`] holding exactly the bytes that were read,
//! so the result does not depend on any live guest RAM) and reports every
//! difference field by field in a [`ReplayReport`].
//!
//! # File format
//!
//! | offset | size | content |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"NVMXREC\0"` |
//! | 8 | 2 | format version, little endian ([`RECORDING_FORMAT_VERSION`]) |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 4 | number of exit records, little endian |
//! | 16 | .. | frames: the [`RecordingMeta`] frame, then one frame per [`ExitRecord`] |
//!
//! A frame is a 4-byte little-endian payload length, the 8-byte FNV-1a 64
//! hash of the payload, then the payload: the value encoded with serde +
//! bincode 2 (`config::standard()`, allocation limit
//! [`RECORDING_MAX_FRAME`]). Decoding checks every header field, each
//! frame's length and hash and the decoded values' invariants, so a
//! truncated, corrupted or foreign file is a [`RecordError`], never a panic.
//!
//! [`decide`]: crate::decide::decide
//! [`prepare_vmcs12`]: crate::transfer::prepare_vmcs12

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmcs12::snapshot::fnv1a64;
use vmcs12::{GuestPhysMemory, OutOfRange, Vmcs12, VmcsField};

use crate::decide::EptExitDecision;
use crate::decide::{Decision, Disposition, L0Policy};
use crate::ept::{EptConfig, ViolationContext};
use crate::exit::{EptViolationQualification, Exit, ExitContext};
use crate::exit_info::ExitInfo;
use crate::state::VcpuState;
use crate::transfer::{MsrAccess, VmxAbort};
use crate::walk::AccessKind;

/// Magic bytes at the start of every recording.
pub const RECORDING_MAGIC: [u8; 8] = *b"NVMXREC\0";
/// Current recording format version; bump it when a recorded type changes
/// shape (a field added to `Vmcs12`'s catalogue does not: it is a vector).
pub const RECORDING_FORMAT_VERSION: u16 = 2;
/// Length of the fixed header.
pub const RECORDING_HEADER_LEN: usize = 16;
/// Length of a frame header (payload length + hash).
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest frame payload accepted (and bincode's allocation limit).
pub const RECORDING_MAX_FRAME: usize = 1 << 20;

/// CR4.VMXE (bit 13).
const CR4_VMXE: u64 = 1 << 13;

// ---------------------------------------------------------------------------
// Recorded values
// ---------------------------------------------------------------------------

/// [`Disposition`] as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordedDisposition {
    /// L0 handled the exit.
    HandleInL0,
    /// The exit was reflected to L1.
    ReflectToL1,
}

impl From<Disposition> for RecordedDisposition {
    fn from(d: Disposition) -> Self {
        match d {
            Disposition::HandleInL0 => Self::HandleInL0,
            Disposition::ReflectToL1 => Self::ReflectToL1,
        }
    }
}

impl fmt::Display for RecordedDisposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HandleInL0 => "handled in L0",
            Self::ReflectToL1 => "reflected to L1",
        })
    }
}

/// A [`Decision`] as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedDecision {
    /// Who handled the exit.
    pub disposition: RecordedDisposition,
    /// The explanation `decide` gave.
    pub explanation: String,
}

impl From<&Decision> for RecordedDecision {
    fn from(d: &Decision) -> Self {
        Self {
            disposition: d.disposition.into(),
            explanation: d.explanation.clone(),
        }
    }
}

/// [`L0Policy`] as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPolicy {
    /// `L0Policy::l0_ports`.
    pub l0_ports: Vec<u16>,
    /// `L0Policy::stale_gpa_pages`.
    pub stale_gpa_pages: Vec<u64>,
}

impl From<&L0Policy> for RecordedPolicy {
    fn from(p: &L0Policy) -> Self {
        Self {
            l0_ports: p.l0_ports.iter().copied().collect(),
            stale_gpa_pages: p.stale_gpa_pages.iter().copied().collect(),
        }
    }
}

impl RecordedPolicy {
    /// The policy `decide` was given.
    pub fn to_policy(&self) -> L0Policy {
        L0Policy {
            l0_ports: self.l0_ports.iter().copied().collect(),
            stale_gpa_pages: self.stale_gpa_pages.iter().copied().collect(),
        }
    }
}

/// One guest-physical access, in the order it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemAccess {
    /// A read of `len` bytes at `gpa`: the bytes, or `None` if it was
    /// outside guest RAM.
    Read {
        /// Start address.
        gpa: u64,
        /// Length.
        len: u32,
        /// What it returned.
        data: Option<Vec<u8>>,
    },
    /// A write of `data` at `gpa`; `ok` is false if it was outside guest RAM.
    Write {
        /// Start address.
        gpa: u64,
        /// Bytes written.
        data: Vec<u8>,
        /// Whether it succeeded.
        ok: bool,
    },
}

impl fmt::Display for MemAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemAccess::Read {
                gpa,
                len,
                data: Some(d),
            } => write!(f, "read {len} bytes at {gpa:#x} = {d:02x?}"),
            MemAccess::Read {
                gpa,
                len,
                data: None,
            } => write!(f, "read {len} bytes at {gpa:#x}: outside guest RAM"),
            MemAccess::Write { gpa, data, ok } => write!(
                f,
                "write {data:02x?} at {gpa:#x}{}",
                if *ok { "" } else { ": outside guest RAM" }
            ),
        }
    }
}

/// Every guest-physical access one function made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLog {
    /// Accesses in order.
    pub accesses: Vec<MemAccess>,
}

impl MemoryLog {
    /// The writes, in order.
    pub fn writes(&self) -> impl Iterator<Item = &MemAccess> {
        self.accesses
            .iter()
            .filter(|a| matches!(a, MemAccess::Write { .. }))
    }
}

/// One question `prepare_vmcs12` asked about an L2 MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsrQuery {
    /// `MsrAccess::read_msr(index)` and its answer.
    Read {
        /// MSR index.
        index: u32,
        /// Value, or `None` for #GP.
        value: Option<u64>,
    },
    /// `MsrAccess::can_write_msr(index, value)` and its answer.
    CanWrite {
        /// MSR index.
        index: u32,
        /// Value.
        value: u64,
        /// Answer.
        ok: bool,
    },
}

/// A [`VmxAbort`] as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedAbort {
    /// The VMX-abort indicator (SDM 28.7).
    pub indicator: u32,
    /// The abort's message.
    pub message: String,
}

impl From<&VmxAbort> for RecordedAbort {
    fn from(a: &VmxAbort) -> Self {
        Self {
            indicator: a.indicator(),
            message: a.to_string(),
        }
    }
}

/// The inputs and outcome of `prepare_vmcs12` for a reflected exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRecord {
    /// The L2 state it was given (with L1's virtual CR4.VMXE restored).
    pub l2: VcpuState,
    /// The exit information it was given.
    pub exit_info: ExitInfo,
    /// The VMX-preemption timer value it was given.
    pub preemption_timer_remaining: u32,
    /// Every L2 MSR question it asked, in order.
    pub msrs: Vec<MsrQuery>,
    /// Every guest-physical access it made (the VM-exit MSR-store area).
    pub memory: MemoryLog,
    /// The VMX abort it returned, if any.
    pub abort: Option<RecordedAbort>,
}

/// How L0 came to the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitSource {
    /// L2 ran and exited; `decide` chose who handles it.
    L2Exit,
    /// VMLAUNCH/VMRESUME failed after the checks (reason 33/34 with bit
    /// 31, SDM 27.8): reflected to L1 without `decide`.
    EntryFailure,
    /// An EPT fault L0 saw while vmcs12 enables EPT:
    /// [`crate::decide::decide_ept_violation`] walked L1's EPT (inputs in
    /// [`ExitRecord::ept`]) and reflected exit 48/49 or found L0's mapping
    /// stale (format version 2).
    EptViolation,
}

/// The access of an EPT fault, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordedAccess {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl From<AccessKind> for RecordedAccess {
    fn from(a: AccessKind) -> Self {
        match a {
            AccessKind::Read => RecordedAccess::Read,
            AccessKind::Write => RecordedAccess::Write,
            AccessKind::Fetch => RecordedAccess::Fetch,
        }
    }
}

impl From<RecordedAccess> for AccessKind {
    fn from(a: RecordedAccess) -> Self {
        match a {
            RecordedAccess::Read => AccessKind::Read,
            RecordedAccess::Write => AccessKind::Write,
            RecordedAccess::Fetch => AccessKind::Fetch,
        }
    }
}

/// The inputs of `decide_ept_violation` besides vmcs12 and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EptInputs {
    /// The L2-physical address of the fault.
    pub gpa: u64,
    /// The access.
    pub access: RecordedAccess,
    /// The guest-linear address (meaningful with `gla_valid`).
    pub gla: u64,
    /// `ViolationContext::guest_linear_address_valid`.
    pub gla_valid: bool,
    /// `ViolationContext::linear_translation`.
    pub linear_translation: bool,
    /// `ViolationContext::nmi_unblocking`.
    pub nmi_unblocking: bool,
    /// `EptConfig::execute_only`.
    pub execute_only: bool,
    /// `EptConfig::maxphyaddr`.
    pub maxphyaddr: u8,
}

impl EptInputs {
    fn context(&self) -> ViolationContext {
        ViolationContext {
            guest_linear_address_valid: self.gla_valid,
            linear_translation: self.linear_translation,
            nmi_unblocking: self.nmi_unblocking,
        }
    }

    fn config(&self) -> EptConfig {
        EptConfig {
            execute_only: self.execute_only,
            maxphyaddr: self.maxphyaddr,
        }
    }
}

/// One L2 exit, with everything needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// 0-based number of the exit in the run.
    pub seq: u64,
    /// Whether `decide` ran.
    pub source: ExitSource,
    /// The exit information L0 built.
    pub info: ExitInfo,
    /// The register context of the exit (MSR index, CR source, ...).
    pub context: ExitContext,
    /// vmcs12 before the exit.
    pub vmcs12_before: Vmcs12,
    /// The L2 vCPU state L0 observed (RIP at the exiting instruction).
    pub l2: VcpuState,
    /// L0's policy at the exit.
    pub policy: RecordedPolicy,
    /// What `decide` said (for an entry failure: reflected, without
    /// `decide`).
    pub decision: RecordedDecision,
    /// Every guest-physical read `decide` made.
    pub decide_memory: MemoryLog,
    /// `prepare_vmcs12`'s inputs and outcome; `None` when L0 handled the
    /// exit (then vmcs12 is not touched).
    pub prepare: Option<PrepareRecord>,
    /// For [`ExitSource::EptViolation`]: the other inputs of
    /// `decide_ept_violation`.
    pub ept: Option<EptInputs>,
    /// vmcs12 after the exit.
    pub vmcs12_after: Vmcs12,
}

impl ExitRecord {
    /// The decoded exit.
    pub fn exit(&self) -> Result<Exit, crate::exit::ExitDecodeError> {
        Exit::from_info(&self.info, &self.context)
    }

    /// The SDM name of the basic exit reason.
    pub fn reason_name(&self) -> &'static str {
        crate::exit::reason_name(self.info.basic_reason()).unwrap_or("unknown exit reason")
    }
}

/// The exit recorded for an EPT fault L0 resolved by rebuilding its own
/// mapping (L1 never sees it): an EPT violation with the access bit only.
pub fn stale_mapping_exit(access: AccessKind, gpa: u64) -> Exit {
    let qualification = match access {
        AccessKind::Read => EptViolationQualification::READ,
        AccessKind::Write => EptViolationQualification::WRITE,
        AccessKind::Fetch => EptViolationQualification::FETCH,
    };
    Exit::EptViolation {
        qualification,
        gpa,
        gla: None,
    }
}

/// The register context that makes [`Exit::from_info`] give `exit` back
/// from `exit.to_info()`: the values the exit carries that the VM-exit
/// information fields do not.
pub fn context_of(exit: &Exit) -> ExitContext {
    let mut ctx = ExitContext::default();
    match *exit {
        Exit::Rdmsr { msr, .. } | Exit::Wrmsr { msr, .. } => ctx.msr_index = msr,
        Exit::Vmread { field, .. } | Exit::Vmwrite { field, .. } => ctx.vmcs_field = field,
        Exit::CrAccess {
            written: Some(v), ..
        } => ctx.cr_source = v,
        Exit::Xsaves { xss, .. } | Exit::Xrstors { xss, .. } => ctx.xss = xss,
        Exit::Encls { leaf, .. } | Exit::Enclv { leaf, .. } | Exit::Pconfig { leaf, .. } => {
            ctx.rax = u64::from(leaf)
        }
        _ => {}
    }
    ctx
}

/// Free-form information about the run a recording comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMeta {
    /// What wrote it (e.g. `l0-vmm 0.1.0`).
    pub producer: String,
    /// What ran (e.g. `demo --test demo`).
    pub description: String,
}

/// A decoded recording.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    /// Where it comes from.
    pub meta: RecordingMeta,
    /// The exits, in order.
    pub records: Vec<ExitRecord>,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Which part of a recording an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The [`RecordingMeta`] frame.
    Meta,
    /// Exit record `n` (0-based).
    Record(u32),
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Meta => f.write_str("the metadata frame"),
            Frame::Record(n) => write!(f, "exit record {n}"),
        }
    }
}

/// Why a recording could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Shorter than the fixed header.
    #[error("recording is {len} bytes, shorter than its {RECORDING_HEADER_LEN}-byte header: the file is truncated or empty")]
    TooShort {
        /// File length.
        len: usize,
    },
    /// Wrong magic bytes.
    #[error("not an exit recording (magic {found:02x?}, expected \"NVMXREC\\0\"): pass a file written by --record")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Another format version.
    #[error("recording format version {found} is not supported (this build reads version {RECORDING_FORMAT_VERSION}): record the run again with this build")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
    },
    /// The reserved header bytes are not zero.
    #[error("recording header reserved bytes are {found:#06x}, not 0: the file is corrupted")]
    BadReserved {
        /// The reserved u16.
        found: u16,
    },
    /// The file ends inside a frame, or before the announced records.
    #[error("recording is truncated in {frame} at byte {offset}: {needed} bytes needed, {available} left (the run was cut off while writing, or the file was cut)")]
    Truncated {
        /// Frame being read.
        frame: Frame,
        /// Offset of the frame.
        offset: usize,
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes left in the file.
        available: usize,
    },
    /// A frame's hash does not match its payload.
    #[error("{frame} at byte {offset} is corrupted: payload hash {computed:#x} does not match the stored {stored:#x}")]
    Corrupted {
        /// Frame.
        frame: Frame,
        /// Offset of the frame.
        offset: usize,
        /// Hash in the frame header.
        stored: u64,
        /// Hash of the payload.
        computed: u64,
    },
    /// A frame announces more than [`RECORDING_MAX_FRAME`] bytes.
    #[error("{frame} at byte {offset} announces {len} bytes, over the {RECORDING_MAX_FRAME}-byte frame limit: the file is corrupted")]
    FrameTooLarge {
        /// Frame.
        frame: Frame,
        /// Offset of the frame.
        offset: usize,
        /// Announced length.
        len: usize,
    },
    /// bincode could not decode a frame.
    #[error("{frame} at byte {offset} does not decode ({message}): the file is corrupted or from an incompatible build")]
    Decode {
        /// Frame.
        frame: Frame,
        /// Offset of the frame.
        offset: usize,
        /// bincode's message.
        message: String,
    },
    /// bincode left bytes of a frame unread.
    #[error("{frame} at byte {offset} has {unread} unread payload bytes after its value: the file is corrupted")]
    TrailingFrameBytes {
        /// Frame.
        frame: Frame,
        /// Offset of the frame.
        offset: usize,
        /// Unread bytes.
        unread: usize,
    },
    /// Bytes after the last announced record.
    #[error("recording has {extra} bytes after its {records} announced records (from byte {offset}): the file is corrupted or two files were joined")]
    ExtraData {
        /// Records announced in the header.
        records: u32,
        /// Offset of the extra bytes.
        offset: usize,
        /// Their number.
        extra: usize,
    },
    /// A frame decodes to a value that breaks an invariant.
    #[error("{frame} is inconsistent: {message}")]
    Inconsistent {
        /// Frame.
        frame: Frame,
        /// What is wrong.
        message: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {frame}: {message}")]
    Encode {
        /// Frame.
        frame: Frame,
        /// Why.
        message: String,
    },
    /// Reading or writing the file failed.
    #[error("cannot {action} recording {path}: {message}")]
    Io {
        /// "read" or "write".
        action: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Encoding and decoding
// ---------------------------------------------------------------------------

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<RECORDING_MAX_FRAME>,
> {
    bincode::config::standard().with_limit::<RECORDING_MAX_FRAME>()
}

fn push_frame<T: Serialize>(out: &mut Vec<u8>, frame: Frame, value: &T) -> Result<(), RecordError> {
    let payload =
        bincode::serde::encode_to_vec(value, config()).map_err(|e| RecordError::Encode {
            frame,
            message: e.to_string(),
        })?;
    if payload.len() > RECORDING_MAX_FRAME {
        return Err(RecordError::Encode {
            frame,
            message: format!(
                "{} bytes exceed the {RECORDING_MAX_FRAME}-byte frame limit",
                payload.len()
            ),
        });
    }
    // Bounded by RECORDING_MAX_FRAME above, so it fits in u32.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Reads one frame at `*pos`, advancing it.
fn read_frame<T: DeserializeOwned>(
    bytes: &[u8],
    pos: &mut usize,
    frame: Frame,
) -> Result<T, RecordError> {
    let offset = *pos;
    let rest = bytes.get(offset..).unwrap_or(&[]);
    let truncated = |needed: usize| RecordError::Truncated {
        frame,
        offset,
        needed,
        available: rest.len(),
    };
    let head = rest
        .get(..FRAME_HEADER_LEN)
        .ok_or(truncated(FRAME_HEADER_LEN))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > RECORDING_MAX_FRAME {
        return Err(RecordError::FrameTooLarge { frame, offset, len });
    }
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&head[4..12]);
    let stored = u64::from_le_bytes(stored);
    let payload = rest
        .get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)
        .ok_or(truncated(FRAME_HEADER_LEN + len))?;
    let computed = fnv1a64(payload);
    if computed != stored {
        return Err(RecordError::Corrupted {
            frame,
            offset,
            stored,
            computed,
        });
    }
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(payload, config()).map_err(|e| {
            RecordError::Decode {
                frame,
                offset,
                message: e.to_string(),
            }
        })?;
    if used != payload.len() {
        return Err(RecordError::TrailingFrameBytes {
            frame,
            offset,
            unread: payload.len() - used,
        });
    }
    *pos = offset + FRAME_HEADER_LEN + len;
    Ok(value)
}

fn check_record(r: &ExitRecord, frame: Frame) -> Result<(), RecordError> {
    let bad = |message: &str| RecordError::Inconsistent {
        frame,
        message: message.to_string(),
    };
    if !r.vmcs12_before.is_well_formed() {
        return Err(bad(
            "vmcs12_before does not hold one in-width value per catalogue field",
        ));
    }
    if !r.vmcs12_after.is_well_formed() {
        return Err(bad(
            "vmcs12_after does not hold one in-width value per catalogue field",
        ));
    }
    if (r.source == ExitSource::EptViolation) != r.ept.is_some() {
        return Err(bad(
            "an EPT-violation record must carry the EPT walk inputs, and only it",
        ));
    }
    let logs = std::iter::once(&r.decide_memory).chain(r.prepare.as_ref().map(|p| &p.memory));
    for log in logs {
        for a in &log.accesses {
            if let MemAccess::Read {
                len, data: Some(d), ..
            } = a
            {
                if d.len() != *len as usize {
                    return Err(bad(
                        "a recorded read returned a different number of bytes than it asked for",
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Recording {
    /// Encodes the recording into the file format described in the module
    /// documentation.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let count = u32::try_from(self.records.len()).map_err(|_| RecordError::Encode {
            frame: Frame::Meta,
            message: format!("{} records exceed the u32 count", self.records.len()),
        })?;
        let mut out = Vec::with_capacity(RECORDING_HEADER_LEN + 4096 * self.records.len());
        out.extend_from_slice(&RECORDING_MAGIC);
        out.extend_from_slice(&RECORDING_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        push_frame(&mut out, Frame::Meta, &self.meta)?;
        for (i, r) in self.records.iter().enumerate() {
            push_frame(&mut out, Frame::Record(i as u32), r)?;
        }
        Ok(out)
    }

    /// Decodes a recording; any truncation, corruption or foreign file is
    /// a [`RecordError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let header = bytes
            .get(..RECORDING_HEADER_LEN)
            .ok_or(RecordError::TooShort { len: bytes.len() })?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[0..8]);
        if magic != RECORDING_MAGIC {
            return Err(RecordError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != RECORDING_FORMAT_VERSION {
            return Err(RecordError::UnsupportedVersion { found: version });
        }
        let reserved = u16::from_le_bytes([header[10], header[11]]);
        if reserved != 0 {
            return Err(RecordError::BadReserved { found: reserved });
        }
        let count = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let mut pos = RECORDING_HEADER_LEN;
        let meta: RecordingMeta = read_frame(bytes, &mut pos, Frame::Meta)?;
        // Every record frame is at least a frame header: do not trust the
        // count for the allocation.
        let plausible = bytes.len().saturating_sub(pos) / FRAME_HEADER_LEN;
        let mut records = Vec::with_capacity((count as usize).min(plausible));
        for i in 0..count {
            let frame = Frame::Record(i);
            let r: ExitRecord = read_frame(bytes, &mut pos, frame)?;
            check_record(&r, frame)?;
            records.push(r);
        }
        if pos != bytes.len() {
            return Err(RecordError::ExtraData {
                records: count,
                offset: pos,
                extra: bytes.len() - pos,
            });
        }
        Ok(Self { meta, records })
    }

    /// Writes the encoded recording to `path`.
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        let bytes = self.encode()?;
        std::fs::write(path, bytes).map_err(|e| RecordError::Io {
            action: "write",
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Reads and decodes the recording at `path`.
    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let bytes = std::fs::read(path).map_err(|e| RecordError::Io {
            action: "read",
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::decode(&bytes)
    }
}

// ---------------------------------------------------------------------------
// Recording wrappers
// ---------------------------------------------------------------------------

/// Guest memory that logs every access it passes on.
pub struct LoggingMemory<'a> {
    inner: &'a mut dyn GuestPhysMemory,
    log: RefCell<MemoryLog>,
}

impl<'a> LoggingMemory<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn GuestPhysMemory) -> Self {
        Self {
            inner,
            log: RefCell::new(MemoryLog::default()),
        }
    }

    /// The accesses made so far.
    pub fn into_log(self) -> MemoryLog {
        self.log.into_inner()
    }
}

impl GuestPhysMemory for LoggingMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let r = self.inner.read(gpa, buf);
        self.log.borrow_mut().accesses.push(MemAccess::Read {
            gpa,
            len: buf.len() as u32,
            data: r.is_ok().then(|| buf.to_vec()),
        });
        r
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        let r = self.inner.write(gpa, buf);
        self.log.get_mut().accesses.push(MemAccess::Write {
            gpa,
            data: buf.to_vec(),
            ok: r.is_ok(),
        });
        r
    }
}

/// L2 MSRs that log every question asked.
pub struct LoggingMsrs<'a> {
    inner: &'a dyn MsrAccess,
    log: RefCell<Vec<MsrQuery>>,
}

impl<'a> LoggingMsrs<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn MsrAccess) -> Self {
        Self {
            inner,
            log: RefCell::new(Vec::new()),
        }
    }

    /// The questions asked so far.
    pub fn into_log(self) -> Vec<MsrQuery> {
        self.log.into_inner()
    }
}

impl MsrAccess for LoggingMsrs<'_> {
    fn read_msr(&self, index: u32) -> Option<u64> {
        let value = self.inner.read_msr(index);
        self.log.borrow_mut().push(MsrQuery::Read { index, value });
        value
    }

    fn can_write_msr(&self, index: u32, value: u64) -> bool {
        let ok = self.inner.can_write_msr(index, value);
        self.log
            .borrow_mut()
            .push(MsrQuery::CanWrite { index, value, ok });
        ok
    }
}

/// Collects [`ExitRecord`]s during a run.
///
/// Per exit: [`Recorder::decide`] instead of `decide`, then for a
/// reflected exit [`Recorder::prepare_vmcs12`] instead of
/// `prepare_vmcs12`, then [`Recorder::finish_exit`] with the vmcs12 as it
/// is after the exit (for an exit L0 handles, right after `decide`).
/// Recording never changes what the wrapped functions return.
#[derive(Debug, Default)]
pub struct Recorder {
    recording: Recording,
    pending: Option<ExitRecord>,
    next_seq: u64,
    skipped: Vec<String>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new(meta: RecordingMeta) -> Self {
        Self {
            recording: Recording {
                meta,
                records: Vec::new(),
            },
            ..Self::default()
        }
    }

    /// Runs [`crate::decide::decide`] and remembers its inputs, the bytes
    /// it read and its decision for the exit in progress. `l2` is the L2
    /// state L0 observed.
    pub fn decide(
        &mut self,
        exit: &Exit,
        vmcs12: &Vmcs12,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        policy: &L0Policy,
    ) -> Decision {
        let logging = LoggingMemory::new(mem);
        let decision = crate::decide::decide(exit, vmcs12, &logging, policy);
        let seq = self.next_seq();
        self.begin(
            seq,
            ExitSource::L2Exit,
            exit,
            vmcs12,
            l2,
            policy,
            &decision,
            logging.into_log(),
        );
        decision
    }

    /// Runs [`crate::decide::decide_ept_violation`] and, when it returns
    /// an exit (reflected, or L0's stale mapping), starts its record like
    /// [`Recorder::decide`]; `NoL1Ept` is not an exit and is not recorded.
    /// A stale mapping is recorded as an EPT violation L0 handles.
    #[allow(clippy::too_many_arguments)]
    pub fn decide_ept_violation(
        &mut self,
        vmcs12: &Vmcs12,
        l2: &VcpuState,
        mem: &mut dyn GuestPhysMemory,
        gpa: u64,
        access: AccessKind,
        gla: u64,
        context: ViolationContext,
        config: EptConfig,
    ) -> EptExitDecision {
        let logging = LoggingMemory::new(mem);
        let result = crate::decide::decide_ept_violation(
            vmcs12, &logging, gpa, access, gla, context, config,
        );
        let exit = match &result {
            EptExitDecision::NoL1Ept(_) => return result,
            EptExitDecision::Reflect { exit, .. } => *exit,
            EptExitDecision::L0StaleMapping { .. } => stale_mapping_exit(access, gpa),
        };
        let seq = self.next_seq();
        self.begin(
            seq,
            ExitSource::EptViolation,
            &exit,
            vmcs12,
            l2,
            &L0Policy::default(),
            result.decision(),
            logging.into_log(),
        );
        if let Some(p) = self.pending.as_mut() {
            p.ept = Some(EptInputs {
                gpa,
                access: access.into(),
                gla,
                gla_valid: context.guest_linear_address_valid,
                linear_translation: context.linear_translation,
                nmi_unblocking: context.nmi_unblocking,
                execute_only: config.execute_only,
                maxphyaddr: config.maxphyaddr,
            });
        }
        result
    }

    /// Starts the record of a VM-entry failure that L0 reflects without
    /// `decide` (then [`Recorder::prepare_vmcs12`] and
    /// [`Recorder::finish_exit`] as for a reflected exit).
    pub fn entry_failure(&mut self, exit: &Exit, vmcs12: &Vmcs12, state: &VcpuState) {
        let seq = self.next_seq();
        let decision = Decision {
            disposition: Disposition::ReflectToL1,
            explanation:
                "a VM-entry failure after the checks is reflected to L1 without decide (SDM 27.8)"
                    .into(),
        };
        self.begin(
            seq,
            ExitSource::EntryFailure,
            exit,
            vmcs12,
            state,
            &L0Policy::default(),
            &decision,
            MemoryLog::default(),
        );
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(p) = self.pending.take() {
            self.skipped.push(format!(
                "exit {} ({}) was started but never finished",
                p.seq,
                p.reason_name()
            ));
        }
        seq
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        &mut self,
        seq: u64,
        source: ExitSource,
        exit: &Exit,
        vmcs12: &Vmcs12,
        l2: &VcpuState,
        policy: &L0Policy,
        decision: &Decision,
        decide_memory: MemoryLog,
    ) {
        let info = exit.to_info();
        let context = context_of(exit);
        match Exit::from_info(&info, &context) {
            Ok(back) if back == *exit => {
                self.pending = Some(ExitRecord {
                    seq,
                    source,
                    info,
                    context,
                    vmcs12_before: vmcs12.clone(),
                    l2: *l2,
                    policy: policy.into(),
                    decision: decision.into(),
                    decide_memory,
                    prepare: None,
                    ept: None,
                    vmcs12_after: vmcs12.clone(),
                });
            }
            Ok(back) => self.skipped.push(format!(
                "exit {seq} ({}) re-encodes as {back:?}: not recorded",
                exit.name()
            )),
            Err(e) => self.skipped.push(format!(
                "exit {seq} ({}) does not decode from its own encoding ({e}): not recorded",
                exit.name()
            )),
        }
    }

    /// Runs [`crate::transfer::prepare_vmcs12`] and remembers its inputs,
    /// the MSRs and memory it touched and its outcome for the exit in
    /// progress.
    pub fn prepare_vmcs12(
        &mut self,
        vmcs12: &mut Vmcs12,
        l2: &VcpuState,
        exit: &ExitInfo,
        preemption_timer_remaining: u32,
        l2_msrs: &dyn MsrAccess,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), VmxAbort> {
        let msrs = LoggingMsrs::new(l2_msrs);
        let mut logging = LoggingMemory::new(mem);
        let r = crate::transfer::prepare_vmcs12(
            vmcs12,
            l2,
            exit,
            preemption_timer_remaining,
            &msrs,
            &mut logging,
        );
        if let Some(p) = self.pending.as_mut() {
            p.prepare = Some(PrepareRecord {
                l2: *l2,
                exit_info: *exit,
                preemption_timer_remaining,
                msrs: msrs.into_log(),
                memory: logging.into_log(),
                abort: r.as_ref().err().map(RecordedAbort::from),
            });
        }
        r
    }

    /// Completes the exit in progress with the vmcs12 after it.
    pub fn finish_exit(&mut self, vmcs12_after: &Vmcs12) {
        if let Some(mut p) = self.pending.take() {
            p.vmcs12_after = vmcs12_after.clone();
            self.recording.records.push(p);
        }
    }

    /// Exits that could not be recorded, with the reason.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The records so far.
    pub fn recording(&self) -> &Recording {
        &self.recording
    }

    /// The finished recording (an exit in progress is dropped).
    pub fn into_recording(self) -> Recording {
        self.recording
    }

    /// Encodes the records so far and writes them to `path`.
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        self.recording.save(path)
    }
}

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

/// Guest memory rebuilt from a [`MemoryLog`]: it holds the bytes as they
/// were before the recorded function ran, only those, and answers an
/// access nobody recorded with an error that it remembers
/// ([`ReplayMemory::unrecorded`]).
#[derive(Debug, Clone, Default)]
pub struct ReplayMemory {
    bytes: BTreeMap<u64, u8>,
    failed_reads: BTreeSet<(u64, u32)>,
    failed_writes: BTreeSet<(u64, u32)>,
    writes: Vec<MemAccess>,
    unrecorded: RefCell<Vec<(u64, u32, bool)>>,
}

fn addrs(gpa: u64, len: usize) -> impl Iterator<Item = u64> {
    (0..len as u64).map(move |i| gpa.wrapping_add(i))
}

impl ReplayMemory {
    /// The memory the recorded accesses saw.
    pub fn from_log(log: &MemoryLog) -> Self {
        let mut m = Self::default();
        let mut written = BTreeSet::new();
        for a in &log.accesses {
            match a {
                MemAccess::Read {
                    gpa, data: Some(d), ..
                } => {
                    for (addr, &b) in addrs(*gpa, d.len()).zip(d) {
                        // A byte written earlier by the function is its
                        // own output, not the memory it started from.
                        if !written.contains(&addr) {
                            m.bytes.entry(addr).or_insert(b);
                        }
                    }
                }
                MemAccess::Read {
                    gpa,
                    len,
                    data: None,
                } => {
                    m.failed_reads.insert((*gpa, *len));
                }
                MemAccess::Write { gpa, data, ok } => {
                    let len = data.len() as u32;
                    if *ok {
                        written.extend(addrs(*gpa, data.len()));
                        // A write that succeeded proves the bytes exist;
                        // their old value was not observed, so it is
                        // taken as what was written (it is overwritten
                        // before anything reads it in replay too).
                        for (addr, &b) in addrs(*gpa, data.len()).zip(data) {
                            m.bytes.entry(addr).or_insert(b);
                        }
                    } else {
                        m.failed_writes.insert((*gpa, len));
                    }
                }
            }
        }
        m
    }

    /// Accesses made in replay that the recording has no answer for:
    /// `(gpa, len, is_write)`.
    pub fn unrecorded(&self) -> Vec<(u64, u32, bool)> {
        self.unrecorded.borrow().clone()
    }

    /// The writes made in replay, as [`MemAccess::Write`].
    pub fn writes(&self) -> &[MemAccess] {
        &self.writes
    }

    fn known(&self, gpa: u64, len: usize) -> bool {
        addrs(gpa, len).all(|a| self.bytes.contains_key(&a))
    }
}

impl GuestPhysMemory for ReplayMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: buf.len(),
        };
        if self.failed_reads.contains(&(gpa, buf.len() as u32)) {
            return Err(err);
        }
        if !self.known(gpa, buf.len()) {
            self.unrecorded
                .borrow_mut()
                .push((gpa, buf.len() as u32, false));
            return Err(err);
        }
        let len = buf.len();
        for (slot, a) in buf.iter_mut().zip(addrs(gpa, len)) {
            *slot = self.bytes.get(&a).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: buf.len(),
        };
        let ok =
            !self.failed_writes.contains(&(gpa, buf.len() as u32)) && self.known(gpa, buf.len());
        if !ok && !self.failed_writes.contains(&(gpa, buf.len() as u32)) {
            self.unrecorded
                .get_mut()
                .push((gpa, buf.len() as u32, true));
        }
        self.writes.push(MemAccess::Write {
            gpa,
            data: buf.to_vec(),
            ok,
        });
        if !ok {
            return Err(err);
        }
        for (a, &b) in addrs(gpa, buf.len()).zip(buf) {
            self.bytes.insert(a, b);
        }
        Ok(())
    }
}

/// L2 MSRs answered from a recorded [`MsrQuery`] list.
#[derive(Debug, Default)]
pub struct ReplayMsrs {
    reads: BTreeMap<u32, Option<u64>>,
    writes: BTreeMap<(u32, u64), bool>,
    unrecorded: RefCell<Vec<u32>>,
}

impl ReplayMsrs {
    /// The answers in `queries`.
    pub fn from_log(queries: &[MsrQuery]) -> Self {
        let mut m = Self::default();
        for q in queries {
            match *q {
                MsrQuery::Read { index, value } => {
                    m.reads.entry(index).or_insert(value);
                }
                MsrQuery::CanWrite { index, value, ok } => {
                    m.writes.entry((index, value)).or_insert(ok);
                }
            }
        }
        m
    }

    /// MSR indices asked in replay that the recording has no answer for.
    pub fn unrecorded(&self) -> Vec<u32> {
        self.unrecorded.borrow().clone()
    }
}

impl MsrAccess for ReplayMsrs {
    fn read_msr(&self, index: u32) -> Option<u64> {
        match self.reads.get(&index) {
            Some(v) => *v,
            None => {
                self.unrecorded.borrow_mut().push(index);
                None
            }
        }
    }

    fn can_write_msr(&self, index: u32, value: u64) -> bool {
        match self.writes.get(&(index, value)) {
            Some(ok) => *ok,
            None => {
                self.unrecorded.borrow_mut().push(index);
                false
            }
        }
    }
}

/// The signature of [`crate::decide::decide`].
pub type DecideFn = fn(&Exit, &Vmcs12, &dyn GuestPhysMemory, &L0Policy) -> Decision;
/// The signature of [`crate::decide::decide_ept_violation`].
pub type DecideEptFn = fn(
    &Vmcs12,
    &dyn GuestPhysMemory,
    u64,
    AccessKind,
    u64,
    ViolationContext,
    EptConfig,
) -> EptExitDecision;
/// The signature of [`crate::transfer::prepare_vmcs12`].
pub type PrepareFn = fn(
    &mut Vmcs12,
    &VcpuState,
    &ExitInfo,
    u32,
    &dyn MsrAccess,
    &mut dyn GuestPhysMemory,
) -> Result<(), VmxAbort>;

/// The functions a replay runs: the crate's own by default; tests pass
/// altered ones to check that replay catches a behaviour change.
#[derive(Clone, Copy)]
pub struct ReplayFns {
    /// Replaces `decide`.
    pub decide: DecideFn,
    /// Replaces `decide_ept_violation`.
    pub decide_ept_violation: DecideEptFn,
    /// Replaces `prepare_vmcs12`.
    pub prepare_vmcs12: PrepareFn,
}

impl Default for ReplayFns {
    fn default() -> Self {
        Self {
            decide: crate::decide::decide,
            decide_ept_violation: crate::decide::decide_ept_violation,
            prepare_vmcs12: crate::transfer::prepare_vmcs12,
        }
    }
}

impl fmt::Debug for ReplayFns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayFns")
    }
}

/// Which replayed function made an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `decide`.
    Decide,
    /// `prepare_vmcs12`.
    PrepareVmcs12,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Decide => "decide",
            Step::PrepareVmcs12 => "prepare_vmcs12",
        })
    }
}

/// One way a replayed exit differs from its recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The recorded exit information does not decode.
    ExitDecode {
        /// The decode error.
        message: String,
    },
    /// `decide` gave another disposition.
    Disposition {
        /// Recorded.
        recorded: RecordedDecision,
        /// Replayed.
        replayed: RecordedDecision,
    },
    /// Same disposition, another explanation.
    Explanation {
        /// Recorded.
        recorded: String,
        /// Replayed.
        replayed: String,
    },
    /// A vmcs12 field after the exit differs.
    Field {
        /// The field.
        field: VmcsField,
        /// Recorded value.
        recorded: u64,
        /// Replayed value.
        replayed: u64,
    },
    /// `prepare_vmcs12` ended with another VMX abort (or none).
    Abort {
        /// Recorded.
        recorded: Option<RecordedAbort>,
        /// Replayed.
        replayed: Option<RecordedAbort>,
    },
    /// The `n`th guest-memory write of `prepare_vmcs12` differs.
    MemoryWrite {
        /// 0-based number of the write.
        n: usize,
        /// Recorded write.
        recorded: Option<MemAccess>,
        /// Replayed write.
        replayed: Option<MemAccess>,
    },
    /// Replay accessed memory the recording did not.
    UnrecordedMemory {
        /// Function.
        step: Step,
        /// Address.
        gpa: u64,
        /// Length.
        len: u32,
        /// A write (else a read).
        write: bool,
    },
    /// Replay asked for an L2 MSR the recording did not.
    UnrecordedMsr {
        /// MSR index.
        index: u32,
    },
    /// `decide_ept_violation` built another exit from L1's EPT.
    ExitInfo {
        /// Recorded exit information.
        recorded: Box<ExitInfo>,
        /// Replayed exit information.
        replayed: Box<ExitInfo>,
    },
    /// `decide_ept_violation` found no EPT in vmcs12 where the recording
    /// had one.
    NoEpt {
        /// Its explanation.
        explanation: String,
    },
    /// Replay reflects an exit L0 handled at record time, so
    /// `prepare_vmcs12` ran without recorded MSR and memory answers (L2's
    /// MSRs came from its state; the field differences are indicative).
    ReflectedWithoutRecordedInputs,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::ExitDecode { message } => {
                write!(f, "the recorded exit does not decode: {message}")
            }
            Difference::ExitInfo { recorded, replayed } => write!(
                f,
                "exit built from L1's EPT: recorded reason {} qualification {:#x} GPA {:#x} GLA {:#x}, replayed reason {} qualification {:#x} GPA {:#x} GLA {:#x}",
                recorded.reason,
                recorded.qualification,
                recorded.guest_physical_address,
                recorded.guest_linear_address,
                replayed.reason,
                replayed.qualification,
                replayed.guest_physical_address,
                replayed.guest_linear_address
            ),
            Difference::NoEpt { explanation } => write!(
                f,
                "decide_ept_violation found no EPT in the recorded vmcs12 (\"{explanation}\")"
            ),
            Difference::Disposition { recorded, replayed } => write!(
                f,
                "decision: recorded {} (\"{}\"), replayed {} (\"{}\")",
                recorded.disposition,
                recorded.explanation,
                replayed.disposition,
                replayed.explanation
            ),
            Difference::Explanation { recorded, replayed } => write!(
                f,
                "explanation: recorded \"{recorded}\", replayed \"{replayed}\""
            ),
            Difference::Field {
                field,
                recorded,
                replayed,
            } => write!(
                f,
                "{} ({:#06x}): recorded {recorded:#x}, replayed {replayed:#x}",
                field.name(),
                field.encoding()
            ),
            Difference::Abort { recorded, replayed } => {
                let show = |a: &Option<RecordedAbort>| match a {
                    Some(a) => a.message.clone(),
                    None => "no abort".to_string(),
                };
                write!(
                    f,
                    "prepare_vmcs12 outcome: recorded {}, replayed {}",
                    show(recorded),
                    show(replayed)
                )
            }
            Difference::MemoryWrite {
                n,
                recorded,
                replayed,
            } => {
                let show = |a: &Option<MemAccess>| match a {
                    Some(a) => a.to_string(),
                    None => "none".to_string(),
                };
                write!(
                    f,
                    "memory write {n} of prepare_vmcs12: recorded {}, replayed {}",
                    show(recorded),
                    show(replayed)
                )
            }
            Difference::UnrecordedMemory {
                step,
                gpa,
                len,
                write,
            } => write!(
                f,
                "{step} {} {len} bytes at {gpa:#x}, which the recording has no value for",
                if *write { "wrote" } else { "read" }
            ),
            Difference::UnrecordedMsr { index } => write!(
                f,
                "prepare_vmcs12 asked for L2 MSR {index:#x}, which the recording has no value for"
            ),
            Difference::ReflectedWithoutRecordedInputs => f.write_str(
                "replay reflects an exit L0 handled when recording: prepare_vmcs12 ran with L2's MSRs from its state and no recorded memory",
            ),
        }
    }
}

/// The differences of one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitDiff {
    /// [`ExitRecord::seq`].
    pub seq: u64,
    /// The SDM name of the exit reason.
    pub reason: &'static str,
    /// The recorded disposition.
    pub recorded: RecordedDisposition,
    /// What differs.
    pub differences: Vec<Difference>,
}

/// The result of [`replay`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Exits replayed.
    pub exits: usize,
    /// Exits that differ, in order.
    pub diffs: Vec<ExitDiff>,
}

impl ReplayReport {
    /// Whether every exit replayed exactly as recorded.
    pub fn is_clean(&self) -> bool {
        self.diffs.is_empty()
    }

    /// Every difference, with the exit it belongs to.
    pub fn differences(&self) -> impl Iterator<Item = (&ExitDiff, &Difference)> {
        self.diffs
            .iter()
            .flat_map(|d| d.differences.iter().map(move |x| (d, x)))
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return writeln!(f, "replay: {} exits, all match the recording", self.exits);
        }
        writeln!(
            f,
            "replay: {} exits, {} differ from the recording",
            self.exits,
            self.diffs.len()
        )?;
        for d in &self.diffs {
            writeln!(
                f,
                "exit #{} {} (recorded: {}):",
                d.seq, d.reason, d.recorded
            )?;
            for x in &d.differences {
                writeln!(f, "  {x}")?;
            }
        }
        Ok(())
    }
}

/// Re-runs `decide` and `prepare_vmcs12` on every recorded exit and
/// reports the differences.
pub fn replay(recording: &Recording) -> ReplayReport {
    replay_with(recording, ReplayFns::default())
}

/// [`replay`] with other functions in place of `decide` and
/// `prepare_vmcs12`.
pub fn replay_with(recording: &Recording, fns: ReplayFns) -> ReplayReport {
    let mut report = ReplayReport {
        exits: recording.records.len(),
        diffs: Vec::new(),
    };
    for r in &recording.records {
        let differences = replay_one(r, fns);
        if !differences.is_empty() {
            report.diffs.push(ExitDiff {
                seq: r.seq,
                reason: r.reason_name(),
                recorded: r.decision.disposition,
                differences,
            });
        }
    }
    report
}

fn replay_one(r: &ExitRecord, fns: ReplayFns) -> Vec<Difference> {
    let mut out = Vec::new();
    let exit = match r.exit() {
        Ok(e) => e,
        Err(e) => {
            out.push(Difference::ExitDecode {
                message: e.to_string(),
            });
            return out;
        }
    };
    let mem = ReplayMemory::from_log(&r.decide_memory);
    let decision = match r.source {
        ExitSource::L2Exit => RecordedDecision::from(&(fns.decide)(
            &exit,
            &r.vmcs12_before,
            &mem,
            &r.policy.to_policy(),
        )),
        ExitSource::EntryFailure => r.decision.clone(),
        ExitSource::EptViolation => match &r.ept {
            Some(e) => {
                let result = (fns.decide_ept_violation)(
                    &r.vmcs12_before,
                    &mem,
                    e.gpa,
                    e.access.into(),
                    e.gla,
                    e.context(),
                    e.config(),
                );
                let exit_now = match &result {
                    EptExitDecision::Reflect { exit, .. } => Some(*exit),
                    EptExitDecision::L0StaleMapping { .. } => {
                        Some(stale_mapping_exit(e.access.into(), e.gpa))
                    }
                    EptExitDecision::NoL1Ept(d) => {
                        out.push(Difference::NoEpt {
                            explanation: d.explanation.clone(),
                        });
                        None
                    }
                };
                if let Some(x) = exit_now {
                    if x.to_info() != r.info {
                        out.push(Difference::ExitInfo {
                            recorded: Box::new(r.info),
                            replayed: Box::new(x.to_info()),
                        });
                    }
                }
                RecordedDecision::from(result.decision())
            }
            // check_record refuses this combination.
            None => r.decision.clone(),
        },
    };
    for (gpa, len, write) in mem.unrecorded() {
        out.push(Difference::UnrecordedMemory {
            step: Step::Decide,
            gpa,
            len,
            write,
        });
    }
    if decision.disposition != r.decision.disposition {
        out.push(Difference::Disposition {
            recorded: r.decision.clone(),
            replayed: decision.clone(),
        });
    } else if decision.explanation != r.decision.explanation {
        out.push(Difference::Explanation {
            recorded: r.decision.explanation.clone(),
            replayed: decision.explanation.clone(),
        });
    }
    let mut vmcs = r.vmcs12_before.clone();
    if decision.disposition == RecordedDisposition::ReflectToL1 {
        match &r.prepare {
            Some(p) => replay_prepare(p, &mut vmcs, fns, &mut out),
            None => {
                out.push(Difference::ReflectedWithoutRecordedInputs);
                // As L0's reflect path does: L2 ran without the virtual
                // CR4.VMXE, vmcs12 keeps L1's value.
                let mut l2 = r.l2;
                l2.cr4 |= r.vmcs12_before.get(VmcsField::GUEST_CR4) & CR4_VMXE;
                let mut mem = ReplayMemory::default();
                let result =
                    (fns.prepare_vmcs12)(&mut vmcs, &l2, &exit.to_info(), 0, &l2, &mut mem);
                for (gpa, len, write) in mem.unrecorded() {
                    out.push(Difference::UnrecordedMemory {
                        step: Step::PrepareVmcs12,
                        gpa,
                        len,
                        write,
                    });
                }
                if let Err(e) = result {
                    out.push(Difference::Abort {
                        recorded: None,
                        replayed: Some(RecordedAbort::from(&e)),
                    });
                }
            }
        }
    }
    for (field, recorded, replayed) in r.vmcs12_after.diff(&vmcs) {
        out.push(Difference::Field {
            field,
            recorded,
            replayed,
        });
    }
    out
}

fn replay_prepare(p: &PrepareRecord, vmcs: &mut Vmcs12, fns: ReplayFns, out: &mut Vec<Difference>) {
    let msrs = ReplayMsrs::from_log(&p.msrs);
    let mut mem = ReplayMemory::from_log(&p.memory);
    let result = (fns.prepare_vmcs12)(
        vmcs,
        &p.l2,
        &p.exit_info,
        p.preemption_timer_remaining,
        &msrs,
        &mut mem,
    );
    for index in msrs.unrecorded() {
        out.push(Difference::UnrecordedMsr { index });
    }
    for (gpa, len, write) in mem.unrecorded() {
        out.push(Difference::UnrecordedMemory {
            step: Step::PrepareVmcs12,
            gpa,
            len,
            write,
        });
    }
    let replayed = result.as_ref().err().map(RecordedAbort::from);
    if replayed != p.abort {
        out.push(Difference::Abort {
            recorded: p.abort.clone(),
            replayed,
        });
    }
    let recorded: Vec<&MemAccess> = p.memory.writes().collect();
    let replayed_w = mem.writes();
    for n in 0..recorded.len().max(replayed_w.len()) {
        let a = recorded.get(n).map(|w| (*w).clone());
        let b = replayed_w.get(n).cloned();
        if a != b {
            out.push(Difference::MemoryWrite {
                n,
                recorded: a,
                replayed: b,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{IoDirection, IoOperand, IoQualification, IoSize};
    use crate::state::msr_index;
    use proptest::prelude::*;
    use vmcs12::controls::PrimaryProcBased as P;
    use vmcs12::FlatMemory;

    const IO_A: u64 = 0x1000;
    const IO_B: u64 = 0x2000;
    const MSR_BITMAP: u64 = 0x3000;
    const MSR_STORE: u64 = 0x4000;
    const MSR_RDMSR_REFLECTED: u32 = 0x10;

    fn set_bit(mem: &mut FlatMemory, base: u64, bit: u64) {
        let gpa = base + bit / 8;
        let mut b = [0u8];
        mem.read(gpa, &mut b).unwrap();
        b[0] |= 1 << (bit % 8);
        mem.write(gpa, &b).unwrap();
    }

    /// L1's setup: I/O bitmaps with port 0x3f8 intercepted, an MSR bitmap
    /// intercepting RDMSR of 0x10, HLT exiting, and a one-entry VM-exit
    /// MSR-store area for IA32_SYSENTER_CS.
    fn setup() -> (Vmcs12, FlatMemory) {
        let mut mem = FlatMemory::new(0x10000);
        let mut v = Vmcs12::new();
        let proc = P::USE_IO_BITMAPS | P::USE_MSR_BITMAPS | P::HLT_EXITING;
        v.set(VmcsField::CPU_BASED_VM_EXEC_CONTROL, u64::from(proc.bits()));
        v.set(VmcsField::IO_BITMAP_A, IO_A);
        v.set(VmcsField::IO_BITMAP_B, IO_B);
        v.set(VmcsField::MSR_BITMAP, MSR_BITMAP);
        v.set(VmcsField::VM_EXIT_MSR_STORE_ADDR, MSR_STORE);
        v.set(VmcsField::VM_EXIT_MSR_STORE_COUNT, 1);
        v.set(VmcsField::GUEST_CR4, CR4_VMXE | 0x20);
        v.set(VmcsField::HOST_RIP, 0xffff_8000_0000_1000);
        set_bit(&mut mem, IO_A, 0x3f8);
        let bit = crate::decide::msr_bitmap_bit(MSR_RDMSR_REFLECTED, false).unwrap();
        set_bit(&mut mem, MSR_BITMAP, bit);
        mem.write_u64(MSR_STORE, u64::from(msr_index::IA32_SYSENTER_CS))
            .unwrap();
        (v, mem)
    }

    fn l2_state(rip: u64) -> VcpuState {
        let mut s = VcpuState {
            rip,
            rflags: 0x202,
            cr0: 0x8000_0031,
            cr3: 0x5000,
            cr4: 0x20,
            ..VcpuState::default()
        };
        s.gprs.regs[0] = 0x1234;
        s.msrs.sysenter_cs = 0x10;
        s.msrs.efer = VcpuState::EFER_LMA | VcpuState::EFER_LME;
        s
    }

    fn out(port: u16) -> Exit {
        Exit::Io {
            io: IoQualification {
                size: IoSize::One,
                direction: IoDirection::Out,
                string: false,
                rep: false,
                operand: IoOperand::Dx,
                port,
            },
            len: 1,
        }
    }

    /// What L0's exit path does with the recorder (nested.rs's order).
    fn run_exit(
        rec: &mut Recorder,
        vmcs: &mut Vmcs12,
        mem: &mut FlatMemory,
        exit: &Exit,
        observed: &VcpuState,
    ) -> Decision {
        let policy = L0Policy::default();
        let d = rec.decide(exit, vmcs, observed, mem, &policy);
        if d.reflects() {
            let mut l2 = *observed;
            l2.cr4 |= vmcs.get(VmcsField::GUEST_CR4) & CR4_VMXE;
            rec.prepare_vmcs12(vmcs, &l2, &exit.to_info(), 0, &l2, mem)
                .unwrap();
        }
        rec.finish_exit(vmcs);
        d
    }

    /// Four exits: OUT 0x3f8 (reflected), OUT 0xe9 (L0), RDMSR 0x10
    /// (reflected), HLT (reflected).
    fn sample() -> Recording {
        let (mut vmcs, mut mem) = setup();
        let mut rec = Recorder::new(RecordingMeta {
            producer: "test".into(),
            description: "synthetic".into(),
        });
        let exits = [
            (out(0x3f8), 0x1000),
            (out(0xe9), 0x1010),
            (
                Exit::Rdmsr {
                    msr: MSR_RDMSR_REFLECTED,
                    len: 2,
                },
                0x1020,
            ),
            (Exit::Hlt { len: 1 }, 0x1030),
        ];
        let expected = [true, false, true, true];
        for ((exit, rip), reflects) in exits.iter().zip(expected) {
            let d = run_exit(&mut rec, &mut vmcs, &mut mem, exit, &l2_state(*rip));
            assert_eq!(d.reflects(), reflects, "{exit:?}: {}", d.explanation);
        }
        assert!(rec.skipped().is_empty(), "{:?}", rec.skipped());
        // The MSR-store area got L2's SYSENTER_CS.
        assert_eq!(mem.read_u64(MSR_STORE + 8), Ok(0x10));
        rec.into_recording()
    }

    fn round_trip(r: &Recording) -> Recording {
        Recording::decode(&r.encode().unwrap()).unwrap()
    }

    #[test]
    fn test_record_encode_decode_replay_is_clean() {
        let r = sample();
        assert_eq!(r.records.len(), 4);
        let back = round_trip(&r);
        assert_eq!(back, r);
        let report = replay(&back);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.exits, 4);
        assert_eq!(
            report.to_string(),
            "replay: 4 exits, all match the recording\n"
        );
    }

    #[test]
    fn test_record_holds_what_decide_and_prepare_read() {
        let r = sample();
        let io = &r.records[0];
        assert_eq!(io.decision.disposition, RecordedDisposition::ReflectToL1);
        // decide read the I/O bitmap A byte of port 0x3f8.
        assert!(io.decide_memory.accesses.contains(&MemAccess::Read {
            gpa: IO_A + 0x3f8 / 8,
            len: 1,
            data: Some(vec![1 << (0x3f8 % 8)]),
        }));
        let p = io.prepare.as_ref().unwrap();
        assert_eq!(
            p.msrs,
            vec![MsrQuery::Read {
                index: msr_index::IA32_SYSENTER_CS,
                value: Some(0x10)
            }]
        );
        assert_eq!(p.memory.writes().count(), 1);
        assert_eq!(io.vmcs12_after.get(VmcsField::VM_EXIT_REASON), 30);
        assert_eq!(io.vmcs12_after.get(VmcsField::GUEST_RIP), 0x1000);
        // L0's exit leaves vmcs12 alone and records no prepare inputs.
        let e9 = &r.records[1];
        assert_eq!(e9.decision.disposition, RecordedDisposition::HandleInL0);
        assert!(e9.prepare.is_none());
        assert_eq!(e9.vmcs12_after, e9.vmcs12_before);
        assert_eq!(r.records[2].context.msr_index, MSR_RDMSR_REFLECTED);
        assert_eq!(r.records[3].reason_name(), "HLT");
    }

    #[test]
    fn test_edited_decision_fails_replay_with_both_explanations() {
        let mut r = sample();
        r.records[1].decision = RecordedDecision {
            disposition: RecordedDisposition::ReflectToL1,
            explanation: "L1 wants port 0xe9".into(),
        };
        let report = replay(&round_trip(&r));
        assert!(!report.is_clean());
        assert_eq!(report.diffs.len(), 1);
        assert_eq!(report.diffs[0].seq, 1);
        let text = report.to_string();
        assert!(text.contains("decision: recorded reflected to L1 (\"L1 wants port 0xe9\"), replayed handled in L0"), "{text}");
        assert!(text.contains("L0 keeps port 0xe9"), "{text}");
    }

    #[test]
    fn test_edited_vmcs12_after_fails_replay_naming_the_field() {
        let mut r = sample();
        r.records[0].vmcs12_after.set(VmcsField::GUEST_RIP, 0x1001);
        let report = replay(&round_trip(&r));
        let diffs: Vec<_> = report.differences().map(|(_, d)| d.clone()).collect();
        assert_eq!(
            diffs,
            vec![Difference::Field {
                field: VmcsField::GUEST_RIP,
                recorded: 0x1001,
                replayed: 0x1000
            }]
        );
        let text = report.to_string();
        assert!(
            text.contains("GUEST_RIP (0x681e): recorded 0x1001, replayed 0x1000"),
            "{text}"
        );
        assert!(
            text.contains("exit #0 I/O instruction (recorded: reflected to L1)"),
            "{text}"
        );
    }

    fn decide_never_reflects(
        exit: &Exit,
        v: &Vmcs12,
        mem: &dyn GuestPhysMemory,
        p: &L0Policy,
    ) -> Decision {
        let real = crate::decide::decide(exit, v, mem, p);
        Decision {
            disposition: Disposition::HandleInL0,
            explanation: real.explanation,
        }
    }

    #[test]
    fn test_altered_decision_rule_fails_replay_with_field_diffs() {
        let r = sample();
        let fns = ReplayFns {
            decide: decide_never_reflects,
            ..ReplayFns::default()
        };
        let report = replay_with(&r, fns);
        // The three reflected exits now differ; OUT 0xe9 still matches.
        let seqs: Vec<u64> = report.diffs.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![0, 2, 3]);
        let hlt = &report.diffs[2];
        assert!(hlt
            .differences
            .iter()
            .any(|d| matches!(d, Difference::Disposition { .. })));
        assert!(hlt.differences.contains(&Difference::Field {
            field: VmcsField::VM_EXIT_REASON,
            recorded: 12,
            replayed: 31,
        }));
        assert!(report
            .to_string()
            .contains("VM_EXIT_REASON (0x4402): recorded 0xc, replayed 0x1f"));
    }

    fn decide_always_reflects(
        exit: &Exit,
        v: &Vmcs12,
        mem: &dyn GuestPhysMemory,
        p: &L0Policy,
    ) -> Decision {
        let real = crate::decide::decide(exit, v, mem, p);
        Decision {
            disposition: Disposition::ReflectToL1,
            explanation: real.explanation,
        }
    }

    #[test]
    fn test_reflecting_an_l0_exit_shows_what_prepare_would_write() {
        let fns = ReplayFns {
            decide: decide_always_reflects,
            ..ReplayFns::default()
        };
        let report = replay_with(&sample(), fns);
        assert_eq!(report.diffs.len(), 1);
        let d = &report.diffs[0].differences;
        assert!(d.contains(&Difference::ReflectedWithoutRecordedInputs));
        assert!(d.contains(&Difference::Field {
            field: VmcsField::GUEST_RIP,
            recorded: 0x1000,
            replayed: 0x1010,
        }));
        // Its MSR-store read is not in the recording.
        assert!(d.iter().any(|x| matches!(
            x,
            Difference::UnrecordedMemory {
                step: Step::PrepareVmcs12,
                gpa: MSR_STORE,
                ..
            }
        )));
    }

    fn prepare_skips_msr_store(
        v: &mut Vmcs12,
        l2: &VcpuState,
        exit: &ExitInfo,
        timer: u32,
        msrs: &dyn MsrAccess,
        mem: &mut dyn GuestPhysMemory,
    ) -> Result<(), VmxAbort> {
        let count = v.get(VmcsField::VM_EXIT_MSR_STORE_COUNT);
        v.set(VmcsField::VM_EXIT_MSR_STORE_COUNT, 0);
        let r = crate::transfer::prepare_vmcs12(v, l2, exit, timer, msrs, mem);
        v.set(VmcsField::VM_EXIT_MSR_STORE_COUNT, count);
        r
    }

    #[test]
    fn test_altered_prepare_fails_replay_with_memory_write_diff() {
        let fns = ReplayFns {
            prepare_vmcs12: prepare_skips_msr_store,
            ..ReplayFns::default()
        };
        let report = replay_with(&sample(), fns);
        assert_eq!(report.diffs.len(), 3);
        let text = report.to_string();
        assert!(
            text.contains("memory write 0 of prepare_vmcs12: recorded write [10, 00, 00, 00, 00, 00, 00, 00] at 0x4008, replayed none"),
            "{text}"
        );
    }

    #[test]
    fn test_abort_outcome_is_recorded_and_compared() {
        let (mut vmcs, mut mem) = setup();
        // An MSR-store area outside RAM: VMX abort 1.
        vmcs.set(VmcsField::VM_EXIT_MSR_STORE_ADDR, 0xffff_0000);
        let mut rec = Recorder::new(RecordingMeta::default());
        let exit = Exit::Hlt { len: 1 };
        let d = rec.decide(&exit, &vmcs, &l2_state(5), &mut mem, &L0Policy::default());
        assert!(d.reflects());
        let l2 = l2_state(5);
        let r = rec.prepare_vmcs12(&mut vmcs, &l2, &exit.to_info(), 0, &l2, &mut mem);
        assert_eq!(r, Err(VmxAbort::SaveGuestMsr { entry: 1 }));
        rec.finish_exit(&vmcs);
        let recording = round_trip(rec.recording());
        let p = recording.records[0].prepare.as_ref().unwrap();
        assert_eq!(p.abort.as_ref().map(|a| a.indicator), Some(1));
        assert!(replay(&recording).is_clean(), "{}", replay(&recording));
        // Claiming it did not abort is caught.
        let mut edited = recording;
        edited.records[0].prepare.as_mut().unwrap().abort = None;
        let report = replay(&edited);
        assert!(matches!(
            report.diffs[0].differences[0],
            Difference::Abort { recorded: None, .. }
        ));
    }

    #[test]
    fn test_entry_failure_replays_prepare_without_decide() {
        let (mut vmcs, mut mem) = setup();
        let mut rec = Recorder::new(RecordingMeta::default());
        let exit = Exit::InvalidGuestState { qualification: 0 };
        let l1 = l2_state(0x9000);
        rec.entry_failure(&exit, &vmcs, &l1);
        rec.prepare_vmcs12(&mut vmcs, &l1, &exit.to_info(), 0, &l1, &mut mem)
            .unwrap();
        rec.finish_exit(&vmcs);
        let r = round_trip(rec.recording());
        assert_eq!(r.records[0].source, ExitSource::EntryFailure);
        assert_eq!(
            r.records[0].vmcs12_after.get(VmcsField::VM_EXIT_REASON),
            0x8000_0021
        );
        assert!(replay(&r).is_clean(), "{}", replay(&r));
        // A decide that would handle it in L0 is not consulted.
        let fns = ReplayFns {
            decide: decide_never_reflects,
            ..ReplayFns::default()
        };
        assert!(replay_with(&r, fns).is_clean());
        let mut edited = r;
        edited.records[0]
            .vmcs12_after
            .set(VmcsField::EXIT_QUALIFICATION, 3);
        assert!(replay(&edited)
            .to_string()
            .contains("EXIT_QUALIFICATION (0x6400): recorded 0x3, replayed 0x0"));
    }

    #[test]
    fn test_unfinished_exit_is_reported_as_skipped() {
        let (vmcs, mut mem) = setup();
        let mut rec = Recorder::new(RecordingMeta::default());
        let l2 = l2_state(1);
        rec.decide(&out(0x3f8), &vmcs, &l2, &mut mem, &L0Policy::default());
        rec.decide(&out(0xe9), &vmcs, &l2, &mut mem, &L0Policy::default());
        rec.finish_exit(&vmcs);
        assert_eq!(rec.recording().records.len(), 1);
        assert_eq!(rec.recording().records[0].seq, 1);
        assert_eq!(
            rec.skipped(),
            ["exit 0 (I/O instruction) was started but never finished"]
        );
    }

    #[test]
    fn test_replay_reports_reads_the_recording_lacks() {
        fn decide_reads_elsewhere(
            exit: &Exit,
            v: &Vmcs12,
            mem: &dyn GuestPhysMemory,
            p: &L0Policy,
        ) -> Decision {
            let _ = mem.read_u64(0x8000);
            crate::decide::decide(exit, v, mem, p)
        }
        let fns = ReplayFns {
            decide: decide_reads_elsewhere,
            ..ReplayFns::default()
        };
        let report = replay_with(&sample(), fns);
        assert_eq!(report.diffs.len(), 4);
        assert!(report
            .to_string()
            .contains("decide read 8 bytes at 0x8000, which the recording has no value for"));
    }

    #[test]
    fn test_replay_memory_serves_bytes_before_the_function_wrote() {
        let log = MemoryLog {
            accesses: vec![
                MemAccess::Read {
                    gpa: 0x10,
                    len: 2,
                    data: Some(vec![1, 2]),
                },
                MemAccess::Write {
                    gpa: 0x10,
                    data: vec![9],
                    ok: true,
                },
                MemAccess::Read {
                    gpa: 0x10,
                    len: 2,
                    data: Some(vec![9, 2]),
                },
                MemAccess::Read {
                    gpa: 0x20,
                    len: 4,
                    data: None,
                },
            ],
        };
        let mut m = ReplayMemory::from_log(&log);
        let mut b = [0u8; 2];
        m.read(0x10, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        m.write(0x10, &[9]).unwrap();
        m.read(0x10, &mut b).unwrap();
        assert_eq!(b, [9, 2]);
        assert!(m.read_u32(0x20).is_err());
        assert!(m.unrecorded().is_empty());
        assert!(m.read_u32(0x30).is_err());
        assert_eq!(m.unrecorded(), vec![(0x30, 4, false)]);
        assert!(m.write(0x40, &[1]).is_err());
        assert_eq!(m.unrecorded().len(), 2);
    }

    #[test]
    fn test_context_of_round_trips_register_operands() {
        let exits = [
            Exit::Rdmsr {
                msr: 0xc000_0080,
                len: 2,
            },
            Exit::Wrmsr { msr: 0x174, len: 2 },
            Exit::Xsaves { xss: 0x100, len: 4 },
            Exit::Encls { leaf: 3, len: 3 },
            Exit::Hlt { len: 1 },
        ];
        for e in exits {
            assert_eq!(Exit::from_info(&e.to_info(), &context_of(&e)), Ok(e));
        }
        // Without the context, RDMSR loses its index.
        let e = Exit::Rdmsr { msr: 0x10, len: 2 };
        assert_ne!(
            Exit::from_info(&e.to_info(), &ExitContext::default()),
            Ok(e)
        );
    }

    /// L1's EPT: PML4 0x5000 -> PDPT 0x6000 -> PD 0x7000 whose entry 1
    /// maps L2-physical [2 MiB, 4 MiB) to 0x400000 RWX; the rest is absent.
    fn ept_setup() -> (Vmcs12, FlatMemory) {
        let (mut v, mut mem) = setup();
        let proc = P::USE_IO_BITMAPS | P::USE_MSR_BITMAPS | P::HLT_EXITING | P::ACTIVATE_SECONDARY;
        v.set(VmcsField::CPU_BASED_VM_EXEC_CONTROL, u64::from(proc.bits()));
        v.set(
            VmcsField::SECONDARY_VM_EXEC_CONTROL,
            u64::from(vmcs12::controls::SecondaryProcBased::ENABLE_EPT.bits()),
        );
        // EPTP: WB (6), page-walk length 4 (3 in bits 5:3), SDM 25.6.11.
        v.set(VmcsField::EPT_POINTER, 0x5000 | (3 << 3) | 6);
        mem.write_u64(0x5000, 0x6000 | 7).unwrap();
        mem.write_u64(0x6000, 0x7000 | 7).unwrap();
        // 2 MiB leaf: RWX, memory type WB in bits 5:3, bit 7 = page size.
        mem.write_u64(0x7008, 0x40_0000 | (1 << 7) | (6 << 3) | 7)
            .unwrap();
        (v, mem)
    }

    fn ept_record(fns: Option<ReplayFns>) -> (Recording, ReplayReport) {
        let (mut vmcs, mut mem) = ept_setup();
        let mut rec = Recorder::new(RecordingMeta::default());
        let ctx = ViolationContext::default();
        let config = EptConfig::default();
        let l2 = l2_state(0x1000);
        // Mapped by L1: L0's mapping was stale, L0 handles it.
        let stale = rec.decide_ept_violation(
            &vmcs,
            &l2,
            &mut mem,
            0x20_1000,
            AccessKind::Read,
            0,
            ctx,
            config,
        );
        assert!(
            matches!(
                stale,
                EptExitDecision::L0StaleMapping { hpa: 0x40_1000, .. }
            ),
            "{stale:?}"
        );
        rec.finish_exit(&vmcs);
        // Not mapped: exit 48 reflected, through prepare_vmcs12.
        let refl = rec.decide_ept_violation(
            &vmcs,
            &l2,
            &mut mem,
            0x60_0000,
            AccessKind::Write,
            0,
            ctx,
            config,
        );
        let EptExitDecision::Reflect { exit, .. } = refl else {
            panic!("{refl:?}");
        };
        assert_eq!(exit.basic_reason(), 48);
        rec.prepare_vmcs12(&mut vmcs, &l2, &exit.to_info(), 0, &l2, &mut mem)
            .unwrap();
        rec.finish_exit(&vmcs);
        assert_eq!(vmcs.get(VmcsField::GUEST_PHYSICAL_ADDRESS), 0x60_0000);
        // EPT off: not an exit of L1's EPT, not recorded.
        let mut off = vmcs.clone();
        off.set(VmcsField::SECONDARY_VM_EXEC_CONTROL, 0);
        let none = rec.decide_ept_violation(
            &off,
            &l2,
            &mut mem,
            0x60_0000,
            AccessKind::Read,
            0,
            ctx,
            config,
        );
        assert!(matches!(none, EptExitDecision::NoL1Ept(_)));
        let r = round_trip(&rec.into_recording());
        let report = replay_with(&r, fns.unwrap_or_default());
        (r, report)
    }

    #[test]
    fn test_ept_violations_record_and_replay_clean() {
        let (r, report) = ept_record(None);
        assert_eq!(r.records.len(), 2);
        assert!(r
            .records
            .iter()
            .all(|x| x.source == ExitSource::EptViolation));
        assert_eq!(
            r.records[0].decision.disposition,
            RecordedDisposition::HandleInL0
        );
        assert_eq!(
            r.records[1].decision.disposition,
            RecordedDisposition::ReflectToL1
        );
        assert_eq!(
            r.records[1].ept.map(|e| e.access),
            Some(RecordedAccess::Write)
        );
        // The walk's reads were recorded: the PML4, PDPT and PD entries.
        assert!(r.records[1].decide_memory.accesses.len() >= 3);
        assert!(report.is_clean(), "{report}");
    }

    fn ept_always_stale(
        v: &Vmcs12,
        mem: &dyn GuestPhysMemory,
        gpa: u64,
        access: AccessKind,
        gla: u64,
        ctx: ViolationContext,
        config: EptConfig,
    ) -> EptExitDecision {
        let d = crate::decide::decide_ept_violation(v, mem, gpa, access, gla, ctx, config);
        EptExitDecision::L0StaleMapping {
            hpa: gpa,
            size: crate::walk::PageSize::Size4K,
            perms: crate::ept::EptPerms::all(),
            decision: Decision {
                disposition: Disposition::HandleInL0,
                ..d.decision().clone()
            },
        }
    }

    #[test]
    fn test_altered_ept_rule_fails_replay_naming_fields() {
        let fns = ReplayFns {
            decide_ept_violation: ept_always_stale,
            ..ReplayFns::default()
        };
        let (_, report) = ept_record(Some(fns));
        assert!(!report.is_clean());
        let text = report.to_string();
        assert!(
            text.contains("exit #1 EPT violation (recorded: reflected to L1)"),
            "{text}"
        );
        assert!(
            text.contains("GUEST_PHYSICAL_ADDRESS (0x2400): recorded 0x600000"),
            "{text}"
        );
        assert!(
            text.contains("VM_EXIT_REASON (0x4402): recorded 0x30, replayed 0x0"),
            "{text}"
        );
        assert_eq!(report.diffs.len(), 1, "{text}");
    }

    #[test]
    fn test_ept_record_without_its_inputs_is_rejected() {
        let (mut r, _) = ept_record(None);
        r.records[1].ept = None;
        let e = Recording::decode(&r.encode().unwrap()).unwrap_err();
        assert!(matches!(e, RecordError::Inconsistent { .. }), "{e}");
        let (mut r, _) = ept_record(None);
        r.records[1].source = ExitSource::L2Exit;
        assert!(Recording::decode(&r.encode().unwrap()).is_err());
    }

    #[test]
    fn test_wrong_magic_version_and_reserved_are_rejected() {
        let bytes = sample().encode().unwrap();
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(
            Recording::decode(&b),
            Err(RecordError::BadMagic { .. })
        ));
        let mut b = bytes.clone();
        b[8] = 1;
        let e = Recording::decode(&b).unwrap_err();
        assert_eq!(e, RecordError::UnsupportedVersion { found: 1 });
        assert_eq!(e.to_string(), "recording format version 1 is not supported (this build reads version 2): record the run again with this build");
        let mut b = bytes.clone();
        b[10] = 1;
        assert_eq!(
            Recording::decode(&b),
            Err(RecordError::BadReserved { found: 1 })
        );
        assert_eq!(
            Recording::decode(b"NVMX"),
            Err(RecordError::TooShort { len: 4 })
        );
    }

    #[test]
    fn test_every_truncation_is_a_typed_error() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            let e = Recording::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    e,
                    RecordError::TooShort { .. } | RecordError::Truncated { .. }
                ),
                "cut at {len}: {e}"
            );
        }
        // Cut at a frame boundary: the header still announces 4 records.
        let one = Recording {
            meta: RecordingMeta::default(),
            records: Vec::new(),
        }
        .encode()
        .unwrap();
        let mut cut = bytes.clone();
        cut.truncate(one.len() + (bytes.len() - one.len()) / 8);
        let msg = Recording::decode(&cut).unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn test_flipped_byte_anywhere_is_rejected() {
        let bytes = sample().encode().unwrap();
        // Every byte of the header and the first frames, then a stride.
        let positions = (0..200).chain((200..bytes.len()).step_by(97));
        for i in positions {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(Recording::decode(&b).is_err(), "flip at {i} accepted");
        }
        let mut b = bytes.clone();
        b.push(0);
        assert!(matches!(
            Recording::decode(&b),
            Err(RecordError::ExtraData { extra: 1, .. })
        ));
    }

    #[test]
    fn test_inconsistent_vmcs12_is_rejected() {
        #[derive(Serialize)]
        struct BadVmcs {
            values: Vec<u64>,
        }
        let mut r = sample();
        r.records.truncate(1);
        let good = r.encode().unwrap();
        // Re-encode record 0 with a 3-field vmcs12 in place of the real one.
        let rec = &r.records[0];
        let bad = (
            rec.seq,
            rec.source,
            rec.info,
            rec.context,
            BadVmcs { values: vec![0; 3] },
            rec.l2,
            &rec.policy,
            &rec.decision,
            &rec.decide_memory,
            &rec.prepare,
            &rec.ept,
            &rec.vmcs12_after,
        );
        let mut bytes = good[..RECORDING_HEADER_LEN].to_vec();
        push_frame(&mut bytes, Frame::Meta, &r.meta).unwrap();
        push_frame(&mut bytes, Frame::Record(0), &bad).unwrap();
        let e = Recording::decode(&bytes).unwrap_err();
        assert!(
            matches!(
                e,
                RecordError::Inconsistent {
                    frame: Frame::Record(0),
                    ..
                }
            ),
            "{e}"
        );
        assert!(Recording::decode(&good).is_ok());
    }

    #[test]
    fn test_save_and_load_file() {
        let dir = std::env::temp_dir().join(format!("nested-exit-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.nvmxrec");
        let r = sample();
        r.save(&path).unwrap();
        assert_eq!(Recording::load(&path), Ok(r));
        let missing = Recording::load(&dir.join("missing")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read recording"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn test_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Recording::decode(&bytes);
        }

        #[test]
        fn test_random_payload_after_valid_header_is_rejected(
            count in 0u32..4,
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut b = RECORDING_MAGIC.to_vec();
            b.extend_from_slice(&RECORDING_FORMAT_VERSION.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&tail);
            // Random tails have a random hash: (almost) never valid.
            prop_assert!(Recording::decode(&b).is_err());
        }

        #[test]
        fn test_io_exits_replay_clean_for_any_bitmap(
            port in any::<u16>(),
            intercepted in any::<bool>(),
            use_bitmaps in any::<bool>(),
        ) {
            let (mut vmcs, mut mem) = setup();
            mem.bytes[IO_A as usize..IO_A as usize + 0x2000].fill(0);
            if !use_bitmaps {
                vmcs.set(VmcsField::CPU_BASED_VM_EXEC_CONTROL, u64::from(P::UNCOND_IO_EXITING.bits()));
            }
            if intercepted {
                let base = if port < 0x8000 { IO_A } else { IO_B };
                set_bit(&mut mem, base, u64::from(port & 0x7fff));
            }
            let mut rec = Recorder::new(RecordingMeta::default());
            let d = run_exit(&mut rec, &mut vmcs, &mut mem, &out(port), &l2_state(0x1000));
            // Reference: with bitmaps, the port's bit; without, unconditional.
            prop_assert_eq!(d.reflects(), if use_bitmaps { intercepted } else { true });
            let back = round_trip(rec.recording());
            let report = replay(&back);
            prop_assert!(report.is_clean(), "{}", report);
        }
    }
}
