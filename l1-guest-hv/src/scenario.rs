//! The binary scenario layout shared by L0 and L1 (`test=scenario`).
//!
//! L0 parses a scenario file (`l0-vmm/src/scenario.rs`), encodes it with
//! the types here and writes it into guest RAM at [`SCENARIO_ADDR`] before
//! L1 starts. L1 decodes it with the same types, builds the VMCS, runs L2
//! and writes what it observed (every exit, as read with VMREAD) into the
//! results area at [`RESULTS_ADDR`], which L0 reads back after the run.
//! `l0-vmm` includes this file with `#[path]`, so both sides use the same
//! numbers. Every multi-byte value is little-endian. Layout tables:
//! `docs/scenarios.md`.

/// `"L1SCEN01"`: first 8 bytes of an encoded scenario.
pub const MAGIC: u64 = u64::from_le_bytes(*b"L1SCEN01");
/// `"L1RSLT01"`: first 8 bytes of the results area once L1 wrote it.
pub const RESULTS_MAGIC: u64 = u64::from_le_bytes(*b"L1RSLT01");
/// Guest-physical address of the encoded scenario (inside L1's identity
/// EPT, which covers the first 8 MiB).
pub const SCENARIO_ADDR: u64 = 0x40_0000;
/// The most bytes an encoded scenario may take.
pub const SCENARIO_MAX: usize = 0x3_0000;
/// Guest-physical address of the results area.
pub const RESULTS_ADDR: u64 = 0x43_0000;
/// Default load address of L2's code in protected and long mode.
pub const DEFAULT_CODE_ADDR: u64 = 0x50_0000;
/// Default load address of L2's code in real mode (all segments 0, so
/// IP = address; real-mode code must end below 64 KiB).
pub const DEFAULT_REAL_CODE_ADDR: u64 = 0x8000;
/// L2's code must lie in `[CODE_MIN, CODE_END)`: above L1's boot area and
/// inside the identity EPT, not overlapping the scenario or results.
pub const CODE_MIN: u64 = 0x1000;
/// See [`CODE_MIN`].
pub const CODE_END: u64 = 0x80_0000;

/// Header length of an encoded scenario.
pub const HEADER_LEN: usize = 272;
/// Length of one [`Action`].
pub const ACTION_LEN: usize = 48;
/// Length of one [`VmcsWrite`].
pub const WRITE_LEN: usize = 16;
/// Length of one [`EptHole`].
pub const HOLE_LEN: usize = 16;
/// Bytes of the two I/O bitmaps (A then B).
pub const IO_BITMAPS_LEN: usize = 8192;
/// Bytes of the MSR bitmap.
pub const MSR_BITMAP_LEN: usize = 4096;
/// Length of one [`VmxOp`].
pub const VMX_OP_LEN: usize = 40;
/// Length of one [`MemRange`].
pub const MEM_RANGE_LEN: usize = 16;

/// Header flag: L1 builds its identity EPT (first 8 MiB, RWX) with the
/// scenario's holes and enables EPT.
pub const FLAG_EPT: u32 = 1 << 0;
/// Header flag: controls are written exactly as given, not adjusted to the
/// capability MSRs (to provoke VM-entry control failures).
pub const FLAG_RAW_CONTROLS: u32 = 1 << 1;

/// How L2 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Real mode (needs unrestricted guest): segments 0, IP = address.
    Real,
    /// 32-bit protected mode, flat segments, paging off (needs
    /// unrestricted guest).
    Protected,
    /// 64-bit mode on L1's identity page tables.
    Long,
}

impl StartMode {
    /// The encoding in the header.
    pub fn code(self) -> u32 {
        match self {
            StartMode::Real => 0,
            StartMode::Protected => 1,
            StartMode::Long => 2,
        }
    }

    /// Decodes a header value.
    pub fn from_code(v: u32) -> Option<Self> {
        match v {
            0 => Some(StartMode::Real),
            1 => Some(StartMode::Protected),
            2 => Some(StartMode::Long),
            _ => None,
        }
    }

    /// Code size in bits (16, 32, 64).
    pub fn bitness(self) -> u32 {
        match self {
            StartMode::Real => 16,
            StartMode::Protected => 32,
            StartMode::Long => 64,
        }
    }
}

/// Why bytes are not a valid scenario or results area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The magic is wrong: L0 wrote no scenario (or another version).
    BadMagic(u64),
    /// A table or the code lies outside the bytes given (offset, length).
    OutOfBounds(u32, u32),
    /// The start mode is not 0, 1 or 2.
    BadMode(u32),
    /// The buffer is too small for the header.
    Truncated(usize),
}

impl LayoutError {
    /// What is wrong, and the number it is about.
    pub fn describe(&self) -> (&'static str, u64) {
        match *self {
            LayoutError::BadMagic(m) => ("bad magic (L0 wrote no scenario here): ", m),
            LayoutError::OutOfBounds(off, _) => {
                ("a table lies outside the scenario, offset ", off.into())
            }
            LayoutError::BadMode(m) => ("bad start mode ", m.into()),
            LayoutError::Truncated(n) => ("too short for the header: bytes ", n as u64),
        }
    }
}

/// Reads a little-endian u32 at `off` (0 when out of bounds).
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Reads a little-endian u64 at `off` (0 when out of bounds).
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    off.checked_add(8)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Writes a little-endian u32 at `off` (ignored when out of bounds).
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = off.checked_add(4).and_then(|end| b.get_mut(off..end)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes a little-endian u64 at `off` (ignored when out of bounds).
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = off.checked_add(8).and_then(|end| b.get_mut(off..end)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// A table inside the scenario: byte offset from the start and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Table {
    /// Offset from the start of the scenario (0 with `count` 0: absent).
    pub offset: u32,
    /// Number of entries (bytes for code and bitmaps).
    pub count: u32,
}

/// The scenario header (offsets in `docs/scenarios.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Total encoded length.
    pub total_len: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// How L2 starts.
    pub mode: StartMode,
    /// Wanted pin-based controls.
    pub pin: u32,
    /// Wanted primary processor-based controls.
    pub primary: u32,
    /// Wanted secondary processor-based controls.
    pub secondary: u32,
    /// Wanted VM-exit controls.
    pub exit: u32,
    /// Wanted VM-entry controls.
    pub entry: u32,
    /// EXCEPTION_BITMAP.
    pub exception_bitmap: u32,
    /// L1 stops after this many exits (a runaway L2 cannot hang the run).
    pub max_exits: u32,
    /// Guest-physical (= linear) load address of the code.
    pub code_addr: u64,
    /// Entry point (absolute address; in real mode also the IP).
    pub entry_rip: u64,
    /// L2 code bytes.
    pub code: Table,
    /// [`Action`]s.
    pub actions: Table,
    /// [`VmcsWrite`]s applied after the VMCS is built.
    pub writes: Table,
    /// [`EptHole`]s.
    pub holes: Table,
    /// I/O bitmaps A and B ([`IO_BITMAPS_LEN`] bytes).
    pub io_bitmaps: Table,
    /// MSR bitmap ([`MSR_BITMAP_LEN`] bytes).
    pub msr_bitmap: Table,
    /// Initial GPRs in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI,
    /// RDI, R8-R15); RSP 0 means L1's default L2 stack.
    pub gprs: [u64; 16],
    /// [`VmxOp`]s L1 executes itself (at the phase each names).
    pub vmx_ops: Table,
    /// [`MemRange`]s L1 copies into the results area after the run.
    pub memory: Table,
    /// L1's local-APIC timer, armed right before the first VMLAUNCH.
    pub lapic_timer: LapicTimer,
}

/// L1's local-APIC timer for the run (`[l1] lapic_timer`): L1 enables its
/// APIC (SVR bit 8) and writes these registers (xAPIC MMIO at 0xfee00000)
/// after the `launch` VMX operations, right before its first VMLAUNCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LapicTimer {
    /// Armed (0: L1 does not touch its APIC).
    pub armed: u32,
    /// LVT timer register (vector, mode bits 18:17, mask bit 16).
    pub lvt: u32,
    /// Divide configuration register (SDM 11.5.4, Figure 11-10).
    pub tdcr: u32,
    /// Initial count.
    pub tmict: u32,
}

/// Local APIC: MMIO base (xAPIC, SDM 11.4.1).
pub const APIC_BASE: u64 = 0xfee0_0000;
/// Local APIC register offsets L1 writes for [`LapicTimer`].
pub const APIC_SVR: u64 = 0xf0;
/// LVT timer register.
pub const APIC_LVTT: u64 = 0x320;
/// Initial count register.
pub const APIC_TMICT: u64 = 0x380;
/// Divide configuration register.
pub const APIC_TDCR: u64 = 0x3e0;

const H_TABLES: usize = 64;
const H_GPRS: usize = 112;
/// Offset of the two tables added after the GPRs (VMX ops, memory).
const H_TABLES2: usize = 240;
/// Offset of the [`LapicTimer`].
const H_LAPIC: usize = 256;

impl Header {
    /// Writes the header into `b` (at least [`HEADER_LEN`] bytes).
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, MAGIC);
        put_u32(b, 8, self.total_len);
        put_u32(b, 12, self.flags);
        put_u32(b, 16, self.mode.code());
        put_u32(b, 20, self.pin);
        put_u32(b, 24, self.primary);
        put_u32(b, 28, self.secondary);
        put_u32(b, 32, self.exit);
        put_u32(b, 36, self.entry);
        put_u32(b, 40, self.exception_bitmap);
        put_u32(b, 44, self.max_exits);
        put_u64(b, 48, self.code_addr);
        put_u64(b, 56, self.entry_rip);
        for (i, t) in self.tables().iter().enumerate() {
            put_u32(b, H_TABLES + 8 * i, t.offset);
            put_u32(b, H_TABLES + 8 * i + 4, t.count);
        }
        for (i, r) in self.gprs.iter().enumerate() {
            put_u64(b, H_GPRS + 8 * i, *r);
        }
        for (i, t) in [self.vmx_ops, self.memory].iter().enumerate() {
            put_u32(b, H_TABLES2 + 8 * i, t.offset);
            put_u32(b, H_TABLES2 + 8 * i + 4, t.count);
        }
        let t = &self.lapic_timer;
        for (i, v) in [t.armed, t.lvt, t.tdcr, t.tmict].into_iter().enumerate() {
            put_u32(b, H_LAPIC + 4 * i, v);
        }
    }

    fn tables(&self) -> [Table; 6] {
        [
            self.code,
            self.actions,
            self.writes,
            self.holes,
            self.io_bitmaps,
            self.msr_bitmap,
        ]
    }

    /// Decodes and bounds-checks the header of the scenario `b`.
    pub fn decode(b: &[u8]) -> Result<Header, LayoutError> {
        if b.len() < HEADER_LEN {
            return Err(LayoutError::Truncated(b.len()));
        }
        let magic = get_u64(b, 0);
        if magic != MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let mode_code = get_u32(b, 16);
        let mode = StartMode::from_code(mode_code).ok_or(LayoutError::BadMode(mode_code))?;
        let t = |i: usize| {
            let at = if i < 6 {
                H_TABLES + 8 * i
            } else {
                H_TABLES2 + 8 * (i - 6)
            };
            Table {
                offset: get_u32(b, at),
                count: get_u32(b, at + 4),
            }
        };
        let mut gprs = [0u64; 16];
        for (i, r) in gprs.iter_mut().enumerate() {
            *r = get_u64(b, H_GPRS + 8 * i);
        }
        let h = Header {
            total_len: get_u32(b, 8),
            flags: get_u32(b, 12),
            mode,
            pin: get_u32(b, 20),
            primary: get_u32(b, 24),
            secondary: get_u32(b, 28),
            exit: get_u32(b, 32),
            entry: get_u32(b, 36),
            exception_bitmap: get_u32(b, 40),
            max_exits: get_u32(b, 44),
            code_addr: get_u64(b, 48),
            entry_rip: get_u64(b, 56),
            code: t(0),
            actions: t(1),
            writes: t(2),
            holes: t(3),
            io_bitmaps: t(4),
            msr_bitmap: t(5),
            gprs,
            vmx_ops: t(6),
            memory: t(7),
            lapic_timer: LapicTimer {
                armed: get_u32(b, H_LAPIC),
                lvt: get_u32(b, H_LAPIC + 4),
                tdcr: get_u32(b, H_LAPIC + 8),
                tmict: get_u32(b, H_LAPIC + 12),
            },
        };
        let len = b.len().min(h.total_len as usize);
        for (t, unit) in [
            (h.code, 1),
            (h.actions, ACTION_LEN),
            (h.writes, WRITE_LEN),
            (h.holes, HOLE_LEN),
            (h.io_bitmaps, 1),
            (h.msr_bitmap, 1),
            (h.vmx_ops, VMX_OP_LEN),
            (h.memory, MEM_RANGE_LEN),
        ] {
            let end = (t.offset as usize).checked_add((t.count as usize).saturating_mul(unit));
            if end.is_none_or(|e| e > len) {
                return Err(LayoutError::OutOfBounds(t.offset, t.count));
            }
        }
        Ok(h)
    }

    /// The bytes of table `t` (empty when out of bounds).
    pub fn bytes(b: &[u8], t: Table, unit: usize) -> &[u8] {
        let start = t.offset as usize;
        (t.count as usize)
            .checked_mul(unit)
            .and_then(|n| start.checked_add(n))
            .and_then(|end| b.get(start..end))
            .unwrap_or(&[])
    }
}

/// What L1 does after an exit (`Action::next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// GUEST_RIP += VM_EXIT_INSTRUCTION_LEN, VMRESUME.
    Advance,
    /// VMRESUME at the same RIP.
    Resume,
    /// GUEST_RIP = `Action::target`, VMRESUME.
    Jump,
    /// Leave the run loop.
    Stop,
}

impl Next {
    /// Encoding.
    pub fn code(self) -> u32 {
        match self {
            Next::Advance => 0,
            Next::Resume => 1,
            Next::Jump => 2,
            Next::Stop => 3,
        }
    }

    /// Decoding (unknown values stop, the safe choice).
    pub fn from_code(v: u32) -> Self {
        match v {
            0 => Next::Advance,
            1 => Next::Resume,
            2 => Next::Jump,
            _ => Next::Stop,
        }
    }
}

/// Action flag: an OUT to the console port is collected into `L2>` lines.
pub const ACT_CONSOLE: u32 = 1 << 0;
/// Action flag: VM_ENTRY_INTR_INFO_FIELD (+ error code, length) is
/// written before resuming.
pub const ACT_INJECT: u32 = 1 << 1;
/// Action flag: `field` is VMWRITTEN with `value` before resuming.
pub const ACT_SET_FIELD: u32 = 1 << 2;
/// Action flag: IN and RDMSR get `answer` (EDX:EAX for RDMSR).
pub const ACT_ANSWER: u32 = 1 << 3;
/// Action flag (with [`ACT_SET_FIELD`]): the field becomes its current
/// value OR `value`.
pub const ACT_SET_OR: u32 = 1 << 4;
/// Action flag (with [`ACT_SET_FIELD`]): the field becomes its current
/// value AND NOT `value` (clears those bits).
pub const ACT_SET_CLEAR: u32 = 1 << 5;
/// `Action::reason` that matches every reason without its own action.
pub const ANY_REASON: u32 = 0xffff;

/// L1's handling of one basic exit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// Basic exit reason (bits 15:0) or [`ANY_REASON`].
    pub reason: u32,
    /// What happens to GUEST_RIP.
    pub next: Next,
    /// `ACT_*`.
    pub flags: u32,
    /// VM_ENTRY_INTR_INFO_FIELD to inject.
    pub inject_info: u32,
    /// VM_ENTRY_EXCEPTION_ERROR_CODE.
    pub inject_error: u32,
    /// VM_ENTRY_INSTRUCTION_LEN.
    pub inject_len: u32,
    /// VMCS field encoding for [`ACT_SET_FIELD`].
    pub field: u32,
    /// Value for [`ACT_SET_FIELD`].
    pub value: u64,
    /// Target RIP for [`Next::Jump`].
    pub target: u64,
    /// Value for [`ACT_ANSWER`].
    pub answer: u64,
}

impl Action {
    /// Writes the record into `b` ([`ACTION_LEN`] bytes).
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.reason);
        put_u32(b, 4, self.next.code());
        put_u32(b, 8, self.flags);
        put_u32(b, 12, self.inject_info);
        put_u32(b, 16, self.inject_error);
        put_u32(b, 20, self.inject_len);
        put_u32(b, 24, self.field);
        put_u64(b, 32, self.value);
        put_u64(b, 40, self.target);
        // `answer` shares no slot: it lives in the value slot of a record
        // whose field is not set (see `decode`).
        if self.flags & ACT_ANSWER != 0 && self.flags & ACT_SET_FIELD == 0 {
            put_u64(b, 32, self.answer);
        }
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Action {
        let flags = get_u32(b, 8);
        let value = get_u64(b, 32);
        Action {
            reason: get_u32(b, 0),
            next: Next::from_code(get_u32(b, 4)),
            flags,
            inject_info: get_u32(b, 12),
            inject_error: get_u32(b, 16),
            inject_len: get_u32(b, 20),
            field: get_u32(b, 24),
            value: if flags & ACT_SET_FIELD != 0 { value } else { 0 },
            target: get_u64(b, 40),
            answer: if flags & ACT_SET_FIELD == 0 { value } else { 0 },
        }
    }

    /// The action for a basic reason when the scenario has none: HLT,
    /// triple fault and everything unknown stop.
    pub fn default_for(reason: u32) -> Action {
        Action {
            reason,
            next: Next::Stop,
            flags: 0,
            inject_info: 0,
            inject_error: 0,
            inject_len: 0,
            field: 0,
            value: 0,
            target: 0,
            answer: 0,
        }
    }
}

/// One VMWRITE L1 makes after building the VMCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmcsWrite {
    /// Field encoding.
    pub encoding: u32,
    /// `WRITE_*`: how `value` combines with the field's current value.
    pub mode: u32,
    /// Value.
    pub value: u64,
}

/// [`VmcsWrite::mode`]: the field becomes `value`.
pub const WRITE_SET: u32 = 0;
/// [`VmcsWrite::mode`]: the field becomes its current value OR `value`.
pub const WRITE_OR: u32 = 1;
/// [`VmcsWrite::mode`]: the field becomes its current value AND NOT
/// `value`.
pub const WRITE_CLEAR: u32 = 2;

/// The value a [`VmcsWrite`]-style update of `mode` gives a field that
/// holds `old` (unknown modes write `value`).
pub fn combine(mode: u32, old: u64, value: u64) -> u64 {
    match mode {
        WRITE_OR => old | value,
        WRITE_CLEAR => old & !value,
        _ => value,
    }
}

impl VmcsWrite {
    /// Writes the record.
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.encoding);
        put_u32(b, 4, self.mode);
        put_u64(b, 8, self.value);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            encoding: get_u32(b, 0),
            mode: get_u32(b, 4),
            value: get_u64(b, 8),
        }
    }
}

/// A 4 KiB page of the identity EPT with other rights (bits 2:0; 0 = not
/// present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptHole {
    /// Guest-physical page address.
    pub gpa: u64,
    /// The leaf entry's R/W/X bits.
    pub perms: u64,
}

impl EptHole {
    /// Writes the record.
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.gpa);
        put_u64(b, 8, self.perms);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            gpa: get_u64(b, 0),
            perms: get_u64(b, 8),
        }
    }
}

/// A VMX instruction L1 executes itself (`[[l1.vmx]]` in the file), with
/// its outcome recorded in the results area ([`OpResult`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxOp {
    /// `OP_*`.
    pub op: u32,
    /// `PHASE_*`: when L1 executes it.
    pub phase: u32,
    /// `BASE_*`: what the memory operand's address is relative to.
    pub base: u32,
    /// Memory operand: offset from `base`; VMREAD/VMWRITE: field
    /// encoding; INVEPT/INVVPID: the type.
    pub a: u64,
    /// VMWRITE: value; INVEPT/INVVPID: descriptor bits 63:0.
    pub b: u64,
    /// INVEPT/INVVPID: descriptor bits 127:64.
    pub c: u64,
}

/// VMXON `[address]`.
pub const OP_VMXON: u32 = 0;
/// VMXOFF.
pub const OP_VMXOFF: u32 = 1;
/// VMCLEAR `[address]`.
pub const OP_VMCLEAR: u32 = 2;
/// VMPTRLD `[address]`.
pub const OP_VMPTRLD: u32 = 3;
/// VMPTRST (the result value is the pointer).
pub const OP_VMPTRST: u32 = 4;
/// VMREAD of field `a` (the result value is what was read).
pub const OP_VMREAD: u32 = 5;
/// VMWRITE of field `a` with `b`.
pub const OP_VMWRITE: u32 = 6;
/// VMLAUNCH of the current VMCS (on success the result value is the
/// VM_EXIT_REASON L1 got back).
pub const OP_VMLAUNCH: u32 = 7;
/// VMRESUME of the current VMCS.
pub const OP_VMRESUME: u32 = 8;
/// INVEPT of type `a` with descriptor (`b`, `c`).
pub const OP_INVEPT: u32 = 9;
/// INVVPID of type `a` with descriptor (`b`, `c`).
pub const OP_INVVPID: u32 = 10;
/// `mov ss, ax` immediately followed by VMLAUNCH (blocking by MOV SS).
pub const OP_VMLAUNCH_MOV_SS: u32 = 11;
/// VMCALL in VMX root operation (SDM 31.3: VMfailValid(1)).
pub const OP_VMCALL: u32 = 12;
/// Names of the `OP_*` values, in order (the file's `op = ...`).
pub const OP_NAMES: [&str; 13] = [
    "vmxon",
    "vmxoff",
    "vmclear",
    "vmptrld",
    "vmptrst",
    "vmread",
    "vmwrite",
    "vmlaunch",
    "vmresume",
    "invept",
    "invvpid",
    "mov-ss-vmlaunch",
    "vmcall",
];

/// After VMXON, before L1 loads the scenario's VMCS (no current VMCS).
pub const PHASE_SETUP: u32 = 0;
/// After the VMCS is built, right before the first VMLAUNCH.
pub const PHASE_LAUNCH: u32 = 1;
/// After L2's run ended (the VMCS is launched if L2 ran).
pub const PHASE_END: u32 = 2;
/// Names of the `PHASE_*` values, in order.
pub const PHASE_NAMES: [&str; 3] = ["setup", "launch", "end"];

/// Address `a` as given.
pub const BASE_ABSOLUTE: u32 = 0;
/// L1's VMXON region.
pub const BASE_VMXON: u32 = 1;
/// The scenario's VMCS (the one L2 runs on).
pub const BASE_VMCS: u32 = 2;
/// A spare VMCS region with the right revision identifier.
pub const BASE_SPARE: u32 = 3;
/// A spare region whose revision identifier is wrong.
pub const BASE_BAD_REVISION: u32 = 4;
/// Names of the `BASE_*` values, in order (`address = "vmcs+0x10"`).
pub const BASE_NAMES: [&str; 5] = ["", "vmxon", "vmcs", "spare-vmcs", "bad-revision"];

impl VmxOp {
    /// Writes the record ([`VMX_OP_LEN`] bytes).
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.op);
        put_u32(b, 4, self.phase);
        put_u32(b, 8, self.base);
        put_u64(b, 16, self.a);
        put_u64(b, 24, self.b);
        put_u64(b, 32, self.c);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            op: get_u32(b, 0),
            phase: get_u32(b, 4),
            base: get_u32(b, 8),
            a: get_u64(b, 16),
            b: get_u64(b, 24),
            c: get_u64(b, 32),
        }
    }
}

/// A guest-physical range L1 copies into the results area after the run
/// (`[[expect.memory]]`); it must lie below [`CODE_END`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    /// Guest-physical address (L1-physical = L2-physical: identity EPT).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
}

impl MemRange {
    /// Writes the record.
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.addr);
        put_u32(b, 8, self.len);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            addr: get_u64(b, 0),
            len: get_u32(b, 8),
        }
    }
}

/// Results-area header length.
pub const RESULTS_HEADER_LEN: usize = 192;
/// Length of one [`ExitRecord`].
pub const EXIT_RECORD_LEN: usize = 64;
/// Most exits recorded.
pub const MAX_EXIT_RECORDS: usize = 256;
/// Offset of the console bytes in the results area.
pub const RESULTS_CONSOLE_OFF: usize = RESULTS_HEADER_LEN + MAX_EXIT_RECORDS * EXIT_RECORD_LEN;
/// Most console bytes recorded.
pub const RESULTS_CONSOLE_MAX: usize = 4096;
/// Offset of the [`OpResult`]s (one per [`VmxOp`], in table order).
pub const RESULTS_OPS_OFF: usize = RESULTS_CONSOLE_OFF + RESULTS_CONSOLE_MAX;
/// Length of one [`OpResult`].
pub const OP_RESULT_LEN: usize = 16;
/// Most VMX ops a scenario may have.
pub const MAX_VMX_OPS: usize = 64;
/// Offset of the memory copies ([`MemRange`]s, concatenated in order).
pub const RESULTS_MEMORY_OFF: usize = RESULTS_OPS_OFF + MAX_VMX_OPS * OP_RESULT_LEN;
/// Most bytes of memory copies.
pub const RESULTS_MEMORY_MAX: usize = 4096;
/// Total size of the results area.
pub const RESULTS_LEN: usize = RESULTS_MEMORY_OFF + RESULTS_MEMORY_MAX;

/// What one [`VmxOp`] did, as L1 saw it (RFLAGS, then
/// VM_INSTRUCTION_ERROR for VMfailValid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpResult {
    /// 1 once L1 executed the op (0: its phase never came).
    pub done: u32,
    /// Outcome code: 0 VMsucceed, 1 VMfailInvalid, 0x100 | n
    /// VMfailValid(n), 0x200 | vector fault.
    pub outcome: u32,
    /// VMREAD/VMPTRST: the value; a VMLAUNCH/VMRESUME that entered: the
    /// VM_EXIT_REASON.
    pub value: u64,
}

impl OpResult {
    /// Writes the record.
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.done);
        put_u32(b, 4, self.outcome);
        put_u64(b, 8, self.value);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            done: get_u32(b, 0),
            outcome: get_u32(b, 4),
            value: get_u64(b, 8),
        }
    }
}

/// Offset of op result `i` in the results area.
pub fn op_result_offset(i: usize) -> usize {
    RESULTS_OPS_OFF + i * OP_RESULT_LEN
}

/// Results status: L2 ran (VM entry happened or failed as a VM exit).
pub const STATUS_RAN: u32 = 0;
/// Results status: the scenario was malformed.
pub const STATUS_BAD_SCENARIO: u32 = 1;
/// Results status: VMCS setup failed (a VMWRITE failed).
pub const STATUS_SETUP_FAILED: u32 = 2;
/// Results status: VMLAUNCH/VMRESUME failed as an instruction (VMfail or
/// fault); `launch_outcome` says how.
pub const STATUS_ENTRY_FAILED: u32 = 3;
/// Results status: L1 stopped at `max_exits`.
pub const STATUS_MAX_EXITS: u32 = 4;

/// The results header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResultsHeader {
    /// `STATUS_*`.
    pub status: u32,
    /// Exits observed (records kept: at most [`MAX_EXIT_RECORDS`]).
    pub exits: u32,
    /// Outcome of the failed VMLAUNCH/VMRESUME: 1 VMfailInvalid,
    /// 0x100 | n VMfailValid(n), 0x200 | vector fault; 0 none.
    pub launch_outcome: u32,
    /// Console bytes recorded.
    pub console_len: u32,
    /// L2's GPRs after the run (RSP from GUEST_RSP).
    pub gprs: [u64; 16],
    /// GUEST_RIP after the run.
    pub rip: u64,
    /// GUEST_RFLAGS after the run.
    pub rflags: u64,
    /// VMX ops executed.
    pub ops_done: u32,
    /// Bytes of memory copies.
    pub memory_len: u32,
}

impl ResultsHeader {
    /// Writes the header.
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, RESULTS_MAGIC);
        put_u32(b, 8, self.status);
        put_u32(b, 12, self.exits);
        put_u32(b, 16, self.launch_outcome);
        put_u32(b, 20, self.console_len);
        for (i, r) in self.gprs.iter().enumerate() {
            put_u64(b, 24 + 8 * i, *r);
        }
        put_u64(b, 152, self.rip);
        put_u64(b, 160, self.rflags);
        put_u32(b, 168, self.ops_done);
        put_u32(b, 172, self.memory_len);
    }

    /// Reads the header.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        if b.len() < RESULTS_HEADER_LEN {
            return Err(LayoutError::Truncated(b.len()));
        }
        let magic = get_u64(b, 0);
        if magic != RESULTS_MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let mut gprs = [0u64; 16];
        for (i, r) in gprs.iter_mut().enumerate() {
            *r = get_u64(b, 24 + 8 * i);
        }
        Ok(Self {
            status: get_u32(b, 8),
            exits: get_u32(b, 12),
            launch_outcome: get_u32(b, 16),
            console_len: get_u32(b, 20),
            gprs,
            rip: get_u64(b, 152),
            rflags: get_u64(b, 160),
            ops_done: get_u32(b, 168),
            memory_len: get_u32(b, 172),
        })
    }
}

/// One exit as L1 read it with VMREAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitRecord {
    /// VM_EXIT_REASON (full, bit 31 = entry failure).
    pub reason: u32,
    /// VM_EXIT_INSTRUCTION_LEN.
    pub instruction_len: u32,
    /// EXIT_QUALIFICATION.
    pub qualification: u64,
    /// GUEST_RIP.
    pub rip: u64,
    /// VM_EXIT_INTR_INFO.
    pub intr_info: u32,
    /// VM_EXIT_INTR_ERROR_CODE.
    pub intr_error: u32,
    /// GUEST_PHYSICAL_ADDRESS (EPT exits; else 0).
    pub gpa: u64,
    /// GUEST_LINEAR_ADDRESS (EPT violations; else 0).
    pub gla: u64,
    /// IDT_VECTORING_INFO_FIELD.
    pub idt_vectoring: u32,
    /// VMX_INSTRUCTION_INFO.
    pub instruction_info: u32,
    /// VMX_PREEMPTION_TIMER_VALUE (saved by "save VMX-preemption timer
    /// value", else L1's own value).
    pub preemption_timer: u32,
    /// GUEST_ACTIVITY_STATE (0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI).
    pub activity_state: u32,
}

impl ExitRecord {
    /// Writes the record.
    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.reason);
        put_u32(b, 4, self.instruction_len);
        put_u64(b, 8, self.qualification);
        put_u64(b, 16, self.rip);
        put_u32(b, 24, self.intr_info);
        put_u32(b, 28, self.intr_error);
        put_u64(b, 32, self.gpa);
        put_u64(b, 40, self.gla);
        put_u32(b, 48, self.idt_vectoring);
        put_u32(b, 52, self.instruction_info);
        put_u32(b, 56, self.preemption_timer);
        put_u32(b, 60, self.activity_state);
    }

    /// Reads a record.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            reason: get_u32(b, 0),
            instruction_len: get_u32(b, 4),
            qualification: get_u64(b, 8),
            rip: get_u64(b, 16),
            intr_info: get_u32(b, 24),
            intr_error: get_u32(b, 28),
            gpa: get_u64(b, 32),
            gla: get_u64(b, 40),
            idt_vectoring: get_u32(b, 48),
            instruction_info: get_u32(b, 52),
            preemption_timer: get_u32(b, 56),
            activity_state: get_u32(b, 60),
        }
    }
}

/// Offset of exit record `i` in the results area.
pub fn exit_record_offset(i: usize) -> usize {
    RESULTS_HEADER_LEN + i * EXIT_RECORD_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            total_len: 4096,
            flags: FLAG_EPT,
            mode: StartMode::Protected,
            pin: 1,
            primary: 2,
            secondary: 3,
            exit: 4,
            entry: 5,
            exception_bitmap: 6,
            max_exits: 7,
            code_addr: DEFAULT_CODE_ADDR,
            entry_rip: DEFAULT_CODE_ADDR + 4,
            code: Table {
                offset: 272,
                count: 100,
            },
            actions: Table {
                offset: 512,
                count: 2,
            },
            writes: Table {
                offset: 640,
                count: 1,
            },
            holes: Table::default(),
            io_bitmaps: Table {
                offset: 1024,
                count: 0,
            },
            msr_bitmap: Table {
                offset: 1024,
                count: 4096 - 1024,
            },
            gprs: core::array::from_fn(|i| i as u64 * 3),
            vmx_ops: Table {
                offset: 768,
                count: 2,
            },
            memory: Table {
                offset: 848,
                count: 1,
            },
            lapic_timer: LapicTimer {
                armed: 1,
                lvt: 0x40,
                tdcr: 0xb,
                tmict: 2_000_000,
            },
        }
    }

    #[test]
    fn test_header_round_trips() {
        let h = header();
        let mut b = [0u8; 4096];
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Ok(h));
    }

    #[test]
    fn test_header_rejects_bad_magic_mode_and_bounds() {
        let mut b = [0u8; 4096];
        assert_eq!(Header::decode(&b), Err(LayoutError::BadMagic(0)));
        assert_eq!(Header::decode(&b[..10]), Err(LayoutError::Truncated(10)));
        let mut h = header();
        h.encode(&mut b);
        put_u32(&mut b, 16, 9);
        assert_eq!(Header::decode(&b), Err(LayoutError::BadMode(9)));
        h.actions.count = 100;
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Err(LayoutError::OutOfBounds(512, 100)));
        h.actions.count = 2;
        h.total_len = 600;
        h.encode(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(LayoutError::OutOfBounds(..))
        ));
    }

    #[test]
    fn test_action_round_trips_with_answer_or_field() {
        let mut a = Action::default_for(30);
        a.next = Next::Jump;
        a.target = 0x1234;
        a.flags = ACT_ANSWER | ACT_INJECT;
        a.answer = 0xdead;
        a.inject_info = 0x8000_0b0d;
        let mut b = [0u8; ACTION_LEN];
        a.encode(&mut b);
        assert_eq!(Action::decode(&b), a);
        let mut f = Action::default_for(12);
        f.flags = ACT_SET_FIELD;
        f.field = 0x681e;
        f.value = 7;
        f.encode(&mut b);
        assert_eq!(Action::decode(&b), f);
        assert_eq!(Next::from_code(99), Next::Stop);
    }

    #[test]
    fn test_results_round_trip() {
        let r = ResultsHeader {
            status: STATUS_MAX_EXITS,
            exits: 3,
            launch_outcome: 0x107,
            console_len: 5,
            gprs: core::array::from_fn(|i| i as u64),
            rip: 9,
            rflags: 2,
            ops_done: 4,
            memory_len: 12,
        };
        let mut b = [0u8; RESULTS_HEADER_LEN];
        r.encode(&mut b);
        assert_eq!(ResultsHeader::decode(&b), Ok(r));
        b[0] = 0;
        assert!(ResultsHeader::decode(&b).is_err());
        let e = ExitRecord {
            reason: 0x8000_0021,
            instruction_len: 2,
            qualification: 0x3f80008,
            rip: 0x50_0000,
            intr_info: 1,
            intr_error: 2,
            gpa: 3,
            gla: 4,
            idt_vectoring: 5,
            instruction_info: 6,
            preemption_timer: 7,
            activity_state: 1,
        };
        let mut eb = [0u8; EXIT_RECORD_LEN];
        e.encode(&mut eb);
        assert_eq!(ExitRecord::decode(&eb), e);
    }

    #[test]
    fn test_vmx_op_mem_range_and_op_result_round_trip() {
        let op = VmxOp {
            op: OP_INVEPT,
            phase: PHASE_END,
            base: BASE_ABSOLUTE,
            a: 7,
            b: 0x1234_5000,
            c: u64::MAX,
        };
        let mut b = [0u8; VMX_OP_LEN];
        op.encode(&mut b);
        assert_eq!(VmxOp::decode(&b), op);
        let m = MemRange {
            addr: 0x60_0000,
            len: 3,
        };
        let mut mb = [0u8; MEM_RANGE_LEN];
        m.encode(&mut mb);
        assert_eq!(MemRange::decode(&mb), m);
        let r = OpResult {
            done: 1,
            outcome: 0x10c,
            value: 5,
        };
        let mut rb = [0u8; OP_RESULT_LEN];
        r.encode(&mut rb);
        assert_eq!(OpResult::decode(&rb), r);
        assert_eq!(OP_NAMES[OP_VMLAUNCH_MOV_SS as usize], "mov-ss-vmlaunch");
        assert_eq!(BASE_NAMES[BASE_BAD_REVISION as usize], "bad-revision");
    }

    #[test]
    fn test_vmcs_write_modes_round_trip_and_combine() {
        let w = VmcsWrite {
            encoding: 0x4002,
            mode: WRITE_CLEAR,
            value: 1 << 27,
        };
        let mut b = [0u8; WRITE_LEN];
        w.encode(&mut b);
        assert_eq!(VmcsWrite::decode(&b), w);
        assert_eq!(combine(WRITE_SET, 0xff, 0x100), 0x100);
        assert_eq!(combine(WRITE_OR, 0xff, 0x100), 0x1ff);
        assert_eq!(combine(WRITE_CLEAR, 0xff, 0x81), 0x7e);
        assert_eq!(combine(9, 0xff, 3), 3, "unknown mode writes the value");
    }

    #[test]
    fn test_header_rejects_vmx_ops_outside_the_scenario() {
        let mut h = header();
        h.vmx_ops.count = 100;
        let mut b = [0u8; 4096];
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Err(LayoutError::OutOfBounds(768, 100)));
    }

    #[test]
    fn test_areas_do_not_overlap() {
        const {
            assert!(SCENARIO_ADDR + SCENARIO_MAX as u64 <= RESULTS_ADDR);
            assert!(RESULTS_ADDR + RESULTS_LEN as u64 <= DEFAULT_CODE_ADDR);
            assert!(DEFAULT_CODE_ADDR < CODE_END);
            assert!(RESULTS_OPS_OFF >= RESULTS_CONSOLE_OFF + RESULTS_CONSOLE_MAX);
        }
        assert_eq!(exit_record_offset(0), RESULTS_HEADER_LEN);
        assert_eq!(op_result_offset(1), RESULTS_OPS_OFF + OP_RESULT_LEN);
        assert_eq!(exit_record_offset(2), RESULTS_HEADER_LEN + 128);
    }
}
