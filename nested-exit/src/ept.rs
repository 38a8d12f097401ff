//! Guest-physical (L2) -> L1-physical translation through L1's EPT
//! (SDM Vol. 3, 29.3 "The Extended Page Table Mechanism").
//!
//! [`Ept::walk`] answers one access the way the CPU would: a mapping, an
//! EPT violation with its exit qualification (SDM Table 28-7), or an EPT
//! misconfiguration (SDM 29.3.3.1). [`ept_mappings`] lists everything an
//! EPT maps as runs L0 can turn into memslots, with bounded work.
//!
//! Only 4-level EPT is modelled (EPTP walk length 4). Mode-based execute
//! control, sub-page permissions, supervisor shadow stacks and the
//! advanced VM-exit information bits (9-11 of the qualification) are not.
//!
//! An EPT paging-structure read outside L1's RAM returns all ones, as a
//! read of unbacked memory does on hardware. An all-ones entry always has
//! reserved bits or memory type 7 set, so such a walk ends in an EPT
//! misconfiguration. See `docs/walkers.md`.

use bitflags::bitflags;
use vmcs12::GuestPhysMemory;

use crate::walk::{AccessKind, PageSize};

bitflags! {
    /// EPT access rights: bits 2:0 of an EPT entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptPerms: u8 {
        /// Bit 0: reads allowed.
        const READ = 1 << 0;
        /// Bit 1: writes allowed.
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetches allowed.
        const EXECUTE = 1 << 2;
    }
}

/// An EPT memory type (SDM 29.3.7; encodings of IA32_PAT, Table 11-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptMemoryType {
    /// 0: uncacheable.
    Uncacheable,
    /// 1: write combining.
    WriteCombining,
    /// 4: write through.
    WriteThrough,
    /// 5: write protected.
    WriteProtected,
    /// 6: write back.
    WriteBack,
}

impl EptMemoryType {
    /// Decodes a 3-bit memory type; 2, 3 and 7 are not memory types.
    pub fn from_bits(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u8 {
        match self {
            Self::Uncacheable => 0,
            Self::WriteCombining => 1,
            Self::WriteThrough => 4,
            Self::WriteProtected => 5,
            Self::WriteBack => 6,
        }
    }
}

/// An EPTP that VM entry would refuse (SDM 26.2.1.1, "EPT pointer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EptpError {
    /// Bits 2:0 are neither UC (0) nor WB (6).
    #[error("EPTP memory type {0} is not UC (0) or WB (6): fix EPT_POINTER bits 2:0")]
    MemoryType(u8),
    /// Bits 5:3 (walk length - 1) are not 3.
    #[error(
        "EPTP walk length {0} is not supported, only 4-level EPT: set EPT_POINTER bits 5:3 to 3"
    )]
    WalkLength(u8),
    /// Bits 11:7 or bits 63:MAXPHYADDR are set.
    #[error("EPTP has reserved bits {0:#x} set (11:7 or above MAXPHYADDR): clear them")]
    Reserved(u64),
}

/// A decoded EPT pointer (SDM 25.6.11, Table 25-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Eptp {
    /// Memory type for accesses to the EPT paging structures.
    pub memory_type: EptMemoryType,
    /// Bit 6: accessed and dirty flags enabled.
    pub ad_enabled: bool,
    /// L1-physical address of the PML4 table (bits N-1:12).
    pub pml4: u64,
}

impl Eptp {
    /// Decodes and checks an EPTP for a CPU with `maxphyaddr` address bits.
    pub fn decode(raw: u64, maxphyaddr: u8) -> Result<Self, EptpError> {
        let mt = (raw & 7) as u8;
        let memory_type = match mt {
            0 => EptMemoryType::Uncacheable,
            6 => EptMemoryType::WriteBack,
            _ => return Err(EptpError::MemoryType(mt)),
        };
        let walk = ((raw >> 3) & 7) as u8;
        if walk != 3 {
            return Err(EptpError::WalkLength(walk + 1));
        }
        let rsvd = raw & (bits(11, 7) | bits(63, u32::from(maxphyaddr.clamp(32, 52))));
        if rsvd != 0 {
            return Err(EptpError::Reserved(rsvd));
        }
        Ok(Self {
            memory_type,
            ad_enabled: raw & (1 << 6) != 0,
            pml4: raw & bits(63, 12),
        })
    }

    /// The raw EPTP value.
    pub fn encode(&self) -> u64 {
        self.pml4
            | (3 << 3)
            | u64::from(self.memory_type.bits())
            | (u64::from(self.ad_enabled) << 6)
    }
}

/// What the L0 advertises in IA32_VMX_EPT_VPID_CAP and CPUID that changes
/// the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptConfig {
    /// EPT_VPID_CAP bit 0: execute-only translations (bits 2:0 = 100b).
    pub execute_only: bool,
    /// MAXPHYADDR: entry bits 51:MAXPHYADDR are reserved.
    pub maxphyaddr: u8,
}

impl Default for EptConfig {
    fn default() -> Self {
        Self {
            execute_only: false,
            maxphyaddr: crate::walk::DEFAULT_MAXPHYADDR,
        }
    }
}

/// Why an EPT entry is misconfigured (SDM 29.3.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MisconfigReason {
    /// Bits 2:0 = 010b or 110b: writable but not readable.
    WriteWithoutRead,
    /// Bits 2:0 = 100b and execute-only is not advertised.
    ExecuteOnlyUnsupported,
    /// Bit 7 set in a PML4E (no 512 GiB pages).
    LargePageInPml4,
    /// Reserved bits set (the mask of offending bits).
    ReservedBits(u64),
    /// Leaf memory type (bits 5:3) of 2, 3 or 7.
    InvalidMemoryType(u8),
}

/// An EPT misconfiguration: VM exit 49 with the guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptMisconfig {
    /// The guest-physical address being translated.
    pub gpa: u64,
    /// Level of the bad entry: 4 = PML4E ... 1 = PTE.
    pub level: u8,
    /// The bad entry's value.
    pub entry: u64,
    /// What is wrong with it.
    pub reason: MisconfigReason,
}

/// What the caller knows about the access that the EPT does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ViolationContext {
    /// Qualification bit 7: the guest linear address field is valid.
    pub guest_linear_address_valid: bool,
    /// Qualification bit 8 (meaningful with bit 7): the access is to the
    /// translation of a linear address, not to a guest paging-structure entry.
    pub linear_translation: bool,
    /// Qualification bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
}

/// An EPT violation: VM exit 48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptViolation {
    /// The guest-physical address of the access.
    pub gpa: u64,
    /// The access that was refused.
    pub access: AccessKind,
    /// AND of bits 2:0 over the entries used, including a non-present one.
    pub perms: EptPerms,
    /// The caller-supplied bits.
    pub context: ViolationContext,
}

impl EptViolation {
    /// Qualification bits for the access kind (bit 0 read, 1 write, 2 fetch).
    pub const ACCESS_READ: u64 = 1 << 0;
    /// Data write.
    pub const ACCESS_WRITE: u64 = 1 << 1;
    /// Instruction fetch.
    pub const ACCESS_FETCH: u64 = 1 << 2;
    /// Bit 7: guest linear address valid.
    pub const GLA_VALID: u64 = 1 << 7;
    /// Bit 8: access to the translation of a linear address.
    pub const LINEAR_TRANSLATION: u64 = 1 << 8;
    /// Bit 12: NMI unblocking due to IRET.
    pub const NMI_UNBLOCKING: u64 = 1 << 12;

    /// The exit qualification (SDM Table 28-7): access bits 2:0, the
    /// entry's R/W/X in bits 5:3, bit 6 (user-mode execute, 0 without
    /// mode-based execute control), bits 7-8 and 12 from the context.
    pub fn qualification(&self) -> u64 {
        let mut q = match self.access {
            AccessKind::Read => Self::ACCESS_READ,
            AccessKind::Write => Self::ACCESS_WRITE,
            AccessKind::Fetch => Self::ACCESS_FETCH,
        };
        q |= u64::from(self.perms.bits()) << 3;
        if self.context.guest_linear_address_valid {
            q |= Self::GLA_VALID;
            // Bit 8 is reserved (0) when bit 7 is clear.
            if self.context.linear_translation {
                q |= Self::LINEAR_TRANSLATION;
            }
        }
        if self.context.nmi_unblocking {
            q |= Self::NMI_UNBLOCKING;
        }
        q
    }

    /// The qualification as the exit model's typed flags, for building
    /// [`crate::exit::Exit::EptViolation`].
    pub fn exit_qualification(&self) -> crate::exit::EptViolationQualification {
        crate::exit::EptViolationQualification::decode(self.qualification())
    }
}

/// The outcome of translating one access through an EPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptWalk {
    /// The access is allowed.
    Mapped {
        /// L1-physical address.
        hpa: u64,
        /// Size of the EPT page.
        size: PageSize,
        /// AND of the R/W/X bits of all levels.
        perms: EptPerms,
        /// Leaf memory type.
        memory_type: EptMemoryType,
        /// Leaf bit 6: ignore PAT memory type.
        ignore_pat: bool,
    },
    /// EPT violation (exit reason 48).
    Violation(EptViolation),
    /// EPT misconfiguration (exit reason 49).
    Misconfig(EptMisconfig),
}

/// What an EPT maps at one guest-physical address, whatever the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptLookup {
    /// A leaf was reached.
    Leaf {
        /// L1-physical address.
        hpa: u64,
        /// Size of the EPT page.
        size: PageSize,
        /// AND of the R/W/X bits of all levels (may be empty).
        perms: EptPerms,
        /// Leaf memory type.
        memory_type: EptMemoryType,
        /// Leaf bit 6: ignore PAT.
        ignore_pat: bool,
    },
    /// An entry on the way is not present (bits 2:0 = 0), or the address is
    /// wider than the 48 bits a 4-level EPT translates.
    NotPresent,
    /// A misconfigured entry on the way.
    Misconfig(EptMisconfig),
}

/// One EPT in use: its pointer and the CPU features the walk depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ept {
    /// The decoded EPTP.
    pub eptp: Eptp,
    /// Advertised features.
    pub config: EptConfig,
}

const ADDR_LIMIT_BITS: u32 = 48;

/// Mask of bits `hi:lo` (inclusive); empty when `hi < lo`.
fn bits(hi: u32, lo: u32) -> u64 {
    if hi < lo || lo > 63 {
        return 0;
    }
    let hi = hi.min(63);
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// One EPT entry, classified.
enum Entry {
    NotPresent,
    Table(u64),
    Leaf {
        addr: u64,
        size: PageSize,
        memory_type: EptMemoryType,
        ignore_pat: bool,
    },
}

impl Ept {
    /// Decodes `raw_eptp` (as in vmcs12's EPT_POINTER) for `config`.
    pub fn new(raw_eptp: u64, config: EptConfig) -> Result<Self, EptpError> {
        Ok(Self {
            eptp: Eptp::decode(raw_eptp, config.maxphyaddr)?,
            config,
        })
    }

    fn maxphy(&self) -> u32 {
        u32::from(self.config.maxphyaddr.clamp(32, 52))
    }

    /// Reads an entry; outside RAM the read returns all ones.
    fn read(mem: &dyn GuestPhysMemory, addr: u64) -> u64 {
        mem.read_u64(addr).unwrap_or(u64::MAX)
    }

    /// Classifies the entry `e` found at `level` (SDM 29.3.2, 29.3.3.1).
    fn classify(&self, e: u64, level: u8) -> Result<Entry, MisconfigReason> {
        let xwr = e & 7;
        if xwr == 0 {
            return Ok(Entry::NotPresent);
        }
        if xwr & 2 != 0 && xwr & 1 == 0 {
            return Err(MisconfigReason::WriteWithoutRead);
        }
        if xwr == 4 && !self.config.execute_only {
            return Err(MisconfigReason::ExecuteOnlyUnsupported);
        }
        let large = e & (1 << 7) != 0;
        if level == 4 && large {
            return Err(MisconfigReason::LargePageInPml4);
        }
        let m = self.maxphy();
        let size = match level {
            1 => Some(PageSize::Size4K),
            2 if large => Some(PageSize::Size2M),
            3 if large => Some(PageSize::Size1G),
            _ => None,
        };
        let rsvd = bits(51, m)
            | match size {
                None => bits(6, 3),
                Some(PageSize::Size2M) => bits(20, 12),
                Some(PageSize::Size1G) => bits(29, 12),
                Some(_) => 0,
            };
        if e & rsvd != 0 {
            return Err(MisconfigReason::ReservedBits(e & rsvd));
        }
        let addr_mask = bits(m - 1, 12);
        match size {
            None => Ok(Entry::Table(e & addr_mask)),
            Some(size) => {
                let mt = ((e >> 3) & 7) as u8;
                let memory_type =
                    EptMemoryType::from_bits(mt).ok_or(MisconfigReason::InvalidMemoryType(mt))?;
                Ok(Entry::Leaf {
                    addr: e & addr_mask & !(size.bytes() - 1),
                    size,
                    memory_type,
                    ignore_pat: e & (1 << 6) != 0,
                })
            }
        }
    }

    /// Walks to the leaf for `gpa`, returning the lookup and the AND of
    /// the R/W/X bits of the entries read.
    fn lookup_with_perms(&self, mem: &dyn GuestPhysMemory, gpa: u64) -> (EptLookup, EptPerms) {
        if gpa >> ADDR_LIMIT_BITS != 0 {
            return (EptLookup::NotPresent, EptPerms::empty());
        }
        let mut perms = EptPerms::all();
        let mut table = self.eptp.pml4;
        for level in (1..=4u8).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let e = Self::read(mem, table + ((gpa >> shift) & 0x1ff) * 8);
            perms &= EptPerms::from_bits_truncate((e & 7) as u8);
            match self.classify(e, level) {
                Err(reason) => {
                    let m = EptMisconfig {
                        gpa,
                        level,
                        entry: e,
                        reason,
                    };
                    return (EptLookup::Misconfig(m), perms);
                }
                Ok(Entry::NotPresent) => return (EptLookup::NotPresent, perms),
                Ok(Entry::Table(next)) => table = next,
                Ok(Entry::Leaf {
                    addr,
                    size,
                    memory_type,
                    ignore_pat,
                }) => {
                    let leaf = EptLookup::Leaf {
                        hpa: addr | (gpa & (size.bytes() - 1)),
                        size,
                        perms,
                        memory_type,
                        ignore_pat,
                    };
                    return (leaf, perms);
                }
            }
        }
        // Level 1 always classifies as a leaf, not-present or misconfigured.
        (EptLookup::NotPresent, EptPerms::empty())
    }

    /// What the EPT maps at `gpa`, regardless of the access. At most four
    /// entries are read, whatever the tables contain.
    pub fn lookup(&self, mem: &dyn GuestPhysMemory, gpa: u64) -> EptLookup {
        self.lookup_with_perms(mem, gpa).0
    }

    /// Translates one `access` to `gpa` as the CPU would. A misconfiguration
    /// anywhere on the walk wins over a permission violation (SDM 29.3.3).
    pub fn walk(
        &self,
        mem: &dyn GuestPhysMemory,
        gpa: u64,
        access: AccessKind,
        context: ViolationContext,
    ) -> EptWalk {
        let (lookup, perms) = self.lookup_with_perms(mem, gpa);
        let violation = EptWalk::Violation(EptViolation {
            gpa,
            access,
            perms,
            context,
        });
        match lookup {
            EptLookup::Misconfig(m) => EptWalk::Misconfig(m),
            EptLookup::NotPresent => violation,
            EptLookup::Leaf {
                hpa,
                size,
                perms,
                memory_type,
                ignore_pat,
            } => {
                let need = match access {
                    AccessKind::Read => EptPerms::READ,
                    AccessKind::Write => EptPerms::WRITE,
                    AccessKind::Fetch => EptPerms::EXECUTE,
                };
                if perms.contains(need) {
                    EptWalk::Mapped {
                        hpa,
                        size,
                        perms,
                        memory_type,
                        ignore_pat,
                    }
                } else {
                    violation
                }
            }
        }
    }
}

/// A run of guest-physical pages mapped contiguously to L1-physical pages
/// with the same permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptRun {
    /// First guest-physical address.
    pub gpa: u64,
    /// First L1-physical address.
    pub hpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Permissions of every page in the run (never empty).
    pub perms: EptPerms,
}

/// Bounds for [`ept_mappings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptMapLimit {
    /// Only guest-physical addresses below this are listed (runs are clipped).
    pub max_gpa: u64,
    /// Most EPT entries that may be read before giving up.
    pub max_entries: usize,
}

impl EptMapLimit {
    /// Default entry budget: 4 Mi entries, enough for 16 GiB of 4 KiB pages.
    pub const DEFAULT_MAX_ENTRIES: usize = 1 << 22;

    /// Lists guest-physical memory below `max_gpa` with the default budget.
    pub fn new(max_gpa: u64) -> Self {
        Self {
            max_gpa,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// [`ept_mappings`] ran out of budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EptMapError {
    /// More than `max_entries` entries would have to be read.
    #[error("EPT enumeration read more than {max_entries} entries below gpa {max_gpa:#x}: lower max_gpa or raise max_entries, or map on demand with Ept::walk")]
    TooManyEntries {
        /// The budget.
        max_entries: usize,
        /// The gpa bound in force.
        max_gpa: u64,
    },
}

struct Enumerator<'a> {
    ept: &'a Ept,
    mem: &'a dyn GuestPhysMemory,
    limit: EptMapLimit,
    read: usize,
    runs: Vec<EptRun>,
}

impl Enumerator<'_> {
    fn push(&mut self, gpa: u64, hpa: u64, len: u64, perms: EptPerms) {
        if let Some(last) = self.runs.last_mut() {
            if last.perms == perms
                && last.gpa.checked_add(last.len) == Some(gpa)
                && last.hpa.checked_add(last.len) == Some(hpa)
            {
                last.len += len;
                return;
            }
        }
        self.runs.push(EptRun {
            gpa,
            hpa,
            len,
            perms,
        });
    }

    /// Visits the table at `table` (level `level`) covering gpa from `base`.
    fn visit(
        &mut self,
        table: u64,
        level: u8,
        base: u64,
        perms: EptPerms,
    ) -> Result<(), EptMapError> {
        let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
        let end = self.limit.max_gpa;
        for idx in 0..512u64 {
            let gpa = base + idx * span;
            if gpa >= end {
                break;
            }
            self.read += 1;
            if self.read > self.limit.max_entries {
                return Err(EptMapError::TooManyEntries {
                    max_entries: self.limit.max_entries,
                    max_gpa: self.limit.max_gpa,
                });
            }
            let e = Ept::read(self.mem, table + idx * 8);
            let p = perms & EptPerms::from_bits_truncate((e & 7) as u8);
            match self.ept.classify(e, level) {
                Err(_) | Ok(Entry::NotPresent) => {}
                Ok(Entry::Table(next)) => {
                    // classify() never returns a table at level 1.
                    if !p.is_empty() && level > 1 {
                        self.visit(next, level - 1, gpa, p)?;
                    }
                }
                Ok(Entry::Leaf { addr, size, .. }) => {
                    if !p.is_empty() {
                        let len = size.bytes().min(end - gpa);
                        self.push(gpa, addr, len, p);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every guest-physical range below `limit.max_gpa` that `ept` maps with
/// some permission, as maximal runs (contiguous in both address spaces,
/// same permissions), in increasing gpa order. Ranges whose walk would end
/// in a violation for every access or in a misconfiguration are left out:
/// an access there exits and is answered by [`Ept::walk`].
///
/// Work is bounded: each table is only scanned over the indices that lie
/// below `max_gpa`, the depth is at most four, and at most
/// `limit.max_entries` entries are read in all (the error says so when
/// more would be needed), however the tables alias or refer to themselves.
/// The result has at most that many runs.
pub fn ept_mappings(
    mem: &dyn GuestPhysMemory,
    ept: &Ept,
    limit: EptMapLimit,
) -> Result<Vec<EptRun>, EptMapError> {
    let limit = EptMapLimit {
        max_gpa: limit.max_gpa.min(1 << ADDR_LIMIT_BITS),
        ..limit
    };
    let mut en = Enumerator {
        ept,
        mem,
        limit,
        read: 0,
        runs: Vec::new(),
    };
    en.visit(ept.eptp.pml4, 4, 0, EptPerms::all())?;
    Ok(en.runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use vmcs12::FlatMemory;

    const R: u64 = 1;
    const W: u64 = 2;
    const X: u64 = 4;
    const RWX: u64 = 7;
    const WB: u64 = 6 << 3;
    const LARGE: u64 = 1 << 7;

    fn ept(execute_only: bool) -> Ept {
        Ept::new(
            0x1000 | (3 << 3) | 6,
            EptConfig {
                execute_only,
                maxphyaddr: 39,
            },
        )
        .unwrap()
    }

    /// PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; PTE index 5.
    fn tables(pte: u64) -> FlatMemory {
        let mut m = FlatMemory::new(0x10_0000);
        m.write_u64(0x1000, 0x2000 | RWX).unwrap();
        m.write_u64(0x2000, 0x3000 | RWX).unwrap();
        m.write_u64(0x3000, 0x4000 | RWX).unwrap();
        m.write_u64(0x4028, pte).unwrap();
        m
    }

    fn ctx() -> ViolationContext {
        ViolationContext::default()
    }

    fn misconfig_reason(w: EptWalk) -> Option<MisconfigReason> {
        match w {
            EptWalk::Misconfig(m) => Some(m.reason),
            _ => None,
        }
    }

    fn violation(w: EptWalk) -> Option<EptViolation> {
        match w {
            EptWalk::Violation(v) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn test_eptp_decode_and_encode() {
        let e = Eptp::decode(0x5000 | (3 << 3) | (1 << 6) | 6, 39).unwrap();
        assert_eq!(e.pml4, 0x5000);
        assert_eq!(e.memory_type, EptMemoryType::WriteBack);
        assert!(e.ad_enabled);
        assert_eq!(e.encode(), 0x5000 | (3 << 3) | (1 << 6) | 6);
        assert_eq!(
            Eptp::decode(0x5000 | (3 << 3), 39).unwrap().memory_type,
            EptMemoryType::Uncacheable
        );
        assert_eq!(
            Eptp::decode(0x5000 | (3 << 3) | 1, 39),
            Err(EptpError::MemoryType(1))
        );
        assert_eq!(
            Eptp::decode(0x5000 | (4 << 3) | 6, 39),
            Err(EptpError::WalkLength(5))
        );
        assert_eq!(Eptp::decode(0x5000 | 6, 39), Err(EptpError::WalkLength(1)));
        assert_eq!(
            Eptp::decode(0x5000 | (3 << 3) | 6 | (1 << 7), 39),
            Err(EptpError::Reserved(1 << 7))
        );
        assert_eq!(
            Eptp::decode((1 << 39) | (3 << 3) | 6, 39),
            Err(EptpError::Reserved(1 << 39))
        );
        assert!(Eptp::decode((1 << 39) | (3 << 3) | 6, 40).is_ok());
        assert!(EptpError::WalkLength(5).to_string().contains("bits 5:3"));
    }

    #[test]
    fn test_ept_4k_page_mapped() {
        let m = tables(0x7_7000 | R | W | WB | (1 << 6));
        let w = ept(false).walk(&m, 0x5123, AccessKind::Write, ctx());
        assert_eq!(
            w,
            EptWalk::Mapped {
                hpa: 0x7_7123,
                size: PageSize::Size4K,
                perms: EptPerms::READ | EptPerms::WRITE,
                memory_type: EptMemoryType::WriteBack,
                ignore_pat: true,
            }
        );
    }

    #[test]
    fn test_ept_2m_and_1g_pages_mapped() {
        let mut m = tables(0);
        m.write_u64(0x3008, 0x4020_0000 | RWX | LARGE).unwrap();
        m.write_u64(0x2008, 0x8000_0000 | R | X | LARGE | (4 << 3))
            .unwrap();
        let e = ept(false);
        assert!(matches!(
            e.walk(&m, 0x20_1234, AccessKind::Fetch, ctx()),
            EptWalk::Mapped {
                hpa: 0x4020_1234,
                size: PageSize::Size2M,
                memory_type: EptMemoryType::Uncacheable,
                ..
            }
        ));
        assert!(matches!(
            e.walk(&m, 0x4123_4567, AccessKind::Read, ctx()),
            EptWalk::Mapped {
                hpa: 0x8123_4567,
                size: PageSize::Size1G,
                memory_type: EptMemoryType::WriteThrough,
                ..
            }
        ));
    }

    #[test]
    fn test_ept_permission_violations_and_qualification() {
        let e = ept(true);
        for (pte_perms, access, ok) in [
            (R, AccessKind::Read, true),
            (R, AccessKind::Write, false),
            (R, AccessKind::Fetch, false),
            (R | W, AccessKind::Write, true),
            (R | X, AccessKind::Fetch, true),
            (X, AccessKind::Read, false),
            (X, AccessKind::Fetch, true),
        ] {
            let m = tables(0x7000 | pte_perms | WB);
            let w = e.walk(&m, 0x5000, access, ctx());
            if ok {
                assert!(
                    matches!(w, EptWalk::Mapped { .. }),
                    "{pte_perms} {access:?}"
                );
            } else {
                let v = violation(w).unwrap();
                let access_bit = match access {
                    AccessKind::Read => 1,
                    AccessKind::Write => 2,
                    AccessKind::Fetch => 4,
                };
                assert_eq!(v.qualification(), access_bit | (pte_perms << 3));
            }
        }
        // Permissions are the AND over all levels.
        let mut m = tables(0x7000 | RWX | WB);
        m.write_u64(0x2000, 0x3000 | R | X).unwrap();
        let v = violation(e.walk(&m, 0x5000, AccessKind::Write, ctx())).unwrap();
        assert_eq!(v.perms, EptPerms::READ | EptPerms::EXECUTE);
        assert_eq!(v.qualification(), 2 | ((R | X) << 3));
    }

    #[test]
    fn test_qualification_agrees_with_exit_model_flags() {
        use crate::exit::EptViolationQualification as Q;
        let mut m = tables(0x7000 | R | X | WB);
        m.write_u64(0x2000, 0x3000 | RWX).unwrap();
        let c = ViolationContext {
            guest_linear_address_valid: true,
            linear_translation: false,
            nmi_unblocking: false,
        };
        let v = violation(ept(false).walk(&m, 0x5000, AccessKind::Write, c)).unwrap();
        assert_eq!(
            v.exit_qualification(),
            Q::WRITE | Q::READABLE | Q::EXECUTABLE | Q::GLA_VALID
        );
        assert_eq!(
            v.exit_qualification().linear_access(),
            Some(crate::exit::LinearAccessKind::PagingStructure)
        );
    }

    #[test]
    fn test_ept_not_present_at_each_level() {
        let e = ept(false);
        for table in [0x1000u64, 0x2000, 0x3000, 0x4028] {
            let mut m = tables(0x7000 | RWX | WB);
            m.write_u64(table, 0).unwrap();
            let v = violation(e.walk(&m, 0x5000, AccessKind::Read, ctx())).unwrap();
            assert_eq!(v.perms, EptPerms::empty());
            assert_eq!(v.qualification(), 1);
            assert_eq!(e.lookup(&m, 0x5000), EptLookup::NotPresent);
        }
    }

    #[test]
    fn test_violation_context_bits() {
        let m = tables(0);
        let e = ept(false);
        let c = ViolationContext {
            guest_linear_address_valid: true,
            linear_translation: true,
            nmi_unblocking: true,
        };
        let v = violation(e.walk(&m, 0x5000, AccessKind::Fetch, c)).unwrap();
        assert_eq!(v.qualification(), 4 | (1 << 7) | (1 << 8) | (1 << 12));
        // Bit 8 is only reported together with bit 7.
        let c = ViolationContext {
            guest_linear_address_valid: false,
            linear_translation: true,
            nmi_unblocking: false,
        };
        let v = violation(e.walk(&m, 0x5000, AccessKind::Fetch, c)).unwrap();
        assert_eq!(v.qualification(), 4);
    }

    #[test]
    fn test_ept_misconfig_permission_combinations() {
        let e = ept(false);
        for xwr in [W, W | X] {
            let m = tables(0x7000 | xwr | WB);
            assert_eq!(
                misconfig_reason(e.walk(&m, 0x5000, AccessKind::Read, ctx())),
                Some(MisconfigReason::WriteWithoutRead)
            );
        }
        // Write-without-read in a non-leaf entry too.
        let mut m = tables(0x7000 | RWX | WB);
        m.write_u64(0x2000, 0x3000 | W).unwrap();
        assert_eq!(
            misconfig_reason(e.walk(&m, 0x5000, AccessKind::Read, ctx())),
            Some(MisconfigReason::WriteWithoutRead)
        );
        let m = tables(0x7000 | X | WB);
        assert_eq!(
            misconfig_reason(e.walk(&m, 0x5000, AccessKind::Fetch, ctx())),
            Some(MisconfigReason::ExecuteOnlyUnsupported)
        );
        assert!(matches!(
            ept(true).walk(&m, 0x5000, AccessKind::Fetch, ctx()),
            EptWalk::Mapped {
                perms: EptPerms::EXECUTE,
                ..
            }
        ));
    }

    #[test]
    fn test_ept_misconfig_reserved_bits_per_level() {
        let e = ept(false);
        let cases: [(u64, u64, MisconfigReason); 8] = [
            (
                0x1000,
                0x2000 | RWX | LARGE,
                MisconfigReason::LargePageInPml4,
            ),
            (
                0x1000,
                0x2000 | RWX | (1 << 3),
                MisconfigReason::ReservedBits(1 << 3),
            ),
            (
                0x2000,
                0x3000 | RWX | (1 << 6),
                MisconfigReason::ReservedBits(1 << 6),
            ),
            (
                0x3000,
                0x4000 | RWX | (1 << 4),
                MisconfigReason::ReservedBits(1 << 4),
            ),
            (
                0x4028,
                0x7000 | RWX | WB | (1 << 39),
                MisconfigReason::ReservedBits(1 << 39),
            ),
            (
                0x4028,
                0x7000 | RWX | WB | (1 << 51),
                MisconfigReason::ReservedBits(1 << 51),
            ),
            (
                0x2000,
                0x4000_0000 | RWX | WB | LARGE | (1 << 29),
                MisconfigReason::ReservedBits(1 << 29),
            ),
            (
                0x3000,
                0x20_0000 | RWX | WB | LARGE | (1 << 12),
                MisconfigReason::ReservedBits(1 << 12),
            ),
        ];
        for (at, entry, reason) in cases {
            let mut m = tables(0x7000 | RWX | WB);
            m.write_u64(at, entry).unwrap();
            let w = e.walk(&m, 0x5000, AccessKind::Read, ctx());
            assert_eq!(
                misconfig_reason(w),
                Some(reason),
                "entry {entry:#x} at {at:#x}"
            );
        }
        // Ignored bits are fine: PTE bit 7, bits 11:8 (A/D/ignored), 62:52, 63.
        let m = tables(0x7000 | RWX | WB | LARGE | (0xf << 8) | (1 << 60) | (1 << 63));
        assert!(matches!(
            e.walk(&m, 0x5000, AccessKind::Read, ctx()),
            EptWalk::Mapped { hpa: 0x7000, .. }
        ));
    }

    #[test]
    fn test_ept_misconfig_invalid_memory_type_each_page_size() {
        let e = ept(false);
        for mt in [2u64, 3, 7] {
            let m = tables(0x7000 | RWX | (mt << 3));
            assert_eq!(
                misconfig_reason(e.walk(&m, 0x5000, AccessKind::Read, ctx())),
                Some(MisconfigReason::InvalidMemoryType(mt as u8))
            );
            let mut m = tables(0);
            m.write_u64(0x3000, 0x20_0000 | RWX | LARGE | (mt << 3))
                .unwrap();
            assert!(misconfig_reason(e.walk(&m, 0x1000, AccessKind::Read, ctx())).is_some());
            m.write_u64(0x2000, 0x4000_0000 | RWX | LARGE | (mt << 3))
                .unwrap();
            let w = e.walk(&m, 0x1000, AccessKind::Read, ctx());
            assert_eq!(
                w,
                EptWalk::Misconfig(EptMisconfig {
                    gpa: 0x1000,
                    level: 3,
                    entry: 0x4000_0000 | RWX | LARGE | (mt << 3),
                    reason: MisconfigReason::InvalidMemoryType(mt as u8)
                })
            );
        }
        for mt in [0u64, 1, 4, 5, 6] {
            let m = tables(0x7000 | RWX | (mt << 3));
            assert!(matches!(
                e.walk(&m, 0x5000, AccessKind::Read, ctx()),
                EptWalk::Mapped { .. }
            ));
        }
    }

    #[test]
    fn test_misconfig_wins_over_permission_violation() {
        let e = ept(false);
        let mut m = tables(0x7000 | R | (7 << 3));
        m.write_u64(0x2000, 0x3000 | R).unwrap();
        assert_eq!(
            misconfig_reason(e.walk(&m, 0x5000, AccessKind::Write, ctx())),
            Some(MisconfigReason::InvalidMemoryType(7))
        );
    }

    #[test]
    fn test_ept_table_outside_ram_is_misconfig() {
        let e = ept(false);
        let mut m = tables(0);
        m.write_u64(0x3000, 0x4000_0000 | RWX).unwrap();
        let w = e.walk(&m, 0x1000, AccessKind::Read, ctx());
        assert!(matches!(
            w,
            EptWalk::Misconfig(EptMisconfig {
                level: 1,
                entry: u64::MAX,
                ..
            })
        ));
        // EPTP itself pointing outside RAM.
        let far = Ept::new(0x4000_0000 | (3 << 3) | 6, e.config).unwrap();
        assert!(matches!(
            far.walk(&m, 0, AccessKind::Read, ctx()),
            EptWalk::Misconfig(EptMisconfig { level: 4, .. })
        ));
    }

    #[test]
    fn test_ept_self_reference_terminates() {
        // PML4E 0 points back at the PML4: each level reads the same page,
        // and the PTE level turns it into a UC 4 KiB mapping of the PML4.
        let mut m = FlatMemory::new(0x2000);
        m.write_u64(0x1000, 0x1000 | RWX).unwrap();
        let e = ept(false);
        assert!(matches!(
            e.walk(&m, 0x10, AccessKind::Read, ctx()),
            EptWalk::Mapped {
                hpa: 0x1010,
                memory_type: EptMemoryType::Uncacheable,
                ..
            }
        ));
        let runs = ept_mappings(&m, &e, EptMapLimit::new(1 << 48)).unwrap();
        assert_eq!(
            runs,
            vec![EptRun {
                gpa: 0,
                hpa: 0x1000,
                len: 0x1000,
                perms: EptPerms::all()
            }]
        );
    }

    #[test]
    fn test_ept_gpa_beyond_48_bits_is_violation() {
        let m = tables(0x7000 | RWX | WB);
        let v =
            violation(ept(false).walk(&m, (1 << 48) | 0x5000, AccessKind::Read, ctx())).unwrap();
        assert_eq!(v.perms, EptPerms::empty());
    }

    #[test]
    fn test_ept_mappings_coalesces_runs() {
        let mut m = tables(0);
        // PTEs 0..4 contiguous RW, 4 RO, 5..7 contiguous again but elsewhere.
        for i in 0..4u64 {
            m.write_u64(0x4000 + i * 8, (0x10_0000 + i * 0x1000) | R | W | WB)
                .unwrap();
        }
        m.write_u64(0x4020, 0x10_4000 | R | WB).unwrap();
        m.write_u64(0x4028, 0x20_0000 | R | W | WB).unwrap();
        m.write_u64(0x4030, 0x20_1000 | R | W | WB).unwrap();
        // A 2 MiB page right after the PT's range, contiguous in hpa with nothing.
        m.write_u64(0x3008, 0x40_0000 | R | W | LARGE | WB).unwrap();
        let runs = ept_mappings(&m, &ept(false), EptMapLimit::new(1 << 32)).unwrap();
        let rw = EptPerms::READ | EptPerms::WRITE;
        assert_eq!(
            runs,
            vec![
                EptRun {
                    gpa: 0,
                    hpa: 0x10_0000,
                    len: 0x4000,
                    perms: rw
                },
                EptRun {
                    gpa: 0x4000,
                    hpa: 0x10_4000,
                    len: 0x1000,
                    perms: EptPerms::READ
                },
                EptRun {
                    gpa: 0x5000,
                    hpa: 0x20_0000,
                    len: 0x2000,
                    perms: rw
                },
                EptRun {
                    gpa: 0x20_0000,
                    hpa: 0x40_0000,
                    len: 0x20_0000,
                    perms: rw
                },
            ]
        );
        // Clipped at max_gpa.
        let runs = ept_mappings(&m, &ept(false), EptMapLimit::new(0x30_0000)).unwrap();
        assert_eq!(runs.last().map(|r| r.len), Some(0x10_0000));
    }

    #[test]
    fn test_ept_mappings_skips_misconfigured_and_unusable() {
        let mut m = tables(0x7000 | RWX | WB);
        m.write_u64(0x4030, 0x8000 | W | WB).unwrap(); // misconfigured
        m.write_u64(0x4038, 0x9000 | X | WB).unwrap(); // exec-only, unsupported
        m.write_u64(0x2008, 0x9000 | R).unwrap(); // PD with R only...
        m.write_u64(0x9000, 0xa000 | X | WB).unwrap(); // ...over an X-only leaf table: AND empty
        let e = ept(false);
        let runs = ept_mappings(&m, &e, EptMapLimit::new(1 << 31)).unwrap();
        assert_eq!(
            runs,
            vec![EptRun {
                gpa: 0x5000,
                hpa: 0x7000,
                len: 0x1000,
                perms: EptPerms::all()
            }]
        );
    }

    #[test]
    fn test_ept_mappings_work_is_bounded_on_aliased_tables() {
        // Every entry of every level points at the same table (RWX, non-leaf),
        // so the tree below 256 TiB has 512^4 leaves. The budget stops it.
        let mut m = FlatMemory::new(0x2000);
        for i in 0..512u64 {
            m.write_u64(0x1000 + i * 8, 0x1000 | RWX).unwrap();
        }
        let e = ept(false);
        let limit = EptMapLimit {
            max_gpa: u64::MAX,
            max_entries: 100_000,
        };
        assert_eq!(
            ept_mappings(&m, &e, limit),
            Err(EptMapError::TooManyEntries {
                max_entries: 100_000,
                max_gpa: 1 << 48
            })
        );
        // With a small gpa bound the same tables enumerate quickly.
        let runs = ept_mappings(&m, &e, EptMapLimit::new(0x4000)).unwrap();
        assert_eq!(runs.len(), 4);
        assert!(runs.iter().all(|r| r.hpa == 0x1000 && r.len == 0x1000));
    }

    /// Builds an EPT of 4 KiB pages: gfn -> (pfn, xwr). Upper levels RWX.
    fn build_ept(maps: &BTreeMap<u64, (u64, u64)>) -> FlatMemory {
        let mut m = FlatMemory::new(0x40_0000);
        let mut next = 0x2000u64;
        let mut alloc = |m: &mut FlatMemory, at: u64| -> u64 {
            let e = m.read_u64(at).unwrap();
            if e & 7 != 0 {
                return e & !0xfff;
            }
            let t = next;
            next += 0x1000;
            m.write_u64(at, t | RWX).unwrap();
            t
        };
        for (&gfn, &(pfn, xwr)) in maps {
            let gpa = gfn << 12;
            let pdpt = alloc(&mut m, 0x1000 + ((gpa >> 39) & 0x1ff) * 8);
            let pd = alloc(&mut m, pdpt + ((gpa >> 30) & 0x1ff) * 8);
            let pt = alloc(&mut m, pd + ((gpa >> 21) & 0x1ff) * 8);
            m.write_u64(pt + ((gpa >> 12) & 0x1ff) * 8, (pfn << 12) | xwr | WB)
                .unwrap();
        }
        m
    }

    fn spread(v: u64) -> u64 {
        (v & 7) | ((v >> 3) << 9)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn test_ept_walk_matches_reference_map(
            maps in proptest::collection::btree_map(0u64..64, (0u64..0x1000, 0u64..8), 1..24),
            pick in 0u64..80,
            on_mapped in any::<bool>(),
            off in 0u64..0x1000,
            kind in prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Fetch)],
            exec_only in any::<bool>(),
        ) {
            let maps: BTreeMap<u64, (u64, u64)> = maps.into_iter().map(|(g, v)| (spread(g), v)).collect();
            let m = build_ept(&maps);
            let e = ept(exec_only);
            // Half the time, an address the EPT maps (maybe without rights).
            let gfn = match maps.keys().nth(pick as usize % maps.len()) {
                Some(&k) if on_mapped => k,
                _ => spread(pick),
            };
            let gpa = (gfn << 12) | off;
            let got = e.walk(&m, gpa, kind, ctx());
            let need = match kind { AccessKind::Read => R, AccessKind::Write => W, AccessKind::Fetch => X };
            // Reference: the SDM rules written out on bits 2:0 of the leaf.
            match maps.get(&(gpa >> 12)).copied() {
                None | Some((_, 0)) => {
                    prop_assert_eq!(violation(got).map(|v| v.qualification()), Some(need));
                }
                Some((_, xwr)) if xwr & W != 0 && xwr & R == 0 => {
                    prop_assert_eq!(misconfig_reason(got), Some(MisconfigReason::WriteWithoutRead));
                }
                Some((_, 4)) if !exec_only => {
                    prop_assert_eq!(misconfig_reason(got), Some(MisconfigReason::ExecuteOnlyUnsupported));
                }
                Some((pfn, xwr)) if xwr & need != 0 => {
                    let ok = matches!(got, EptWalk::Mapped { hpa, .. } if hpa == (pfn << 12) | off);
                    prop_assert!(ok, "{:?}", got);
                }
                Some((_, xwr)) => {
                    prop_assert_eq!(violation(got).map(|v| v.qualification()), Some(need | (xwr << 3)));
                }
            }
        }

        #[test]
        fn test_ept_mappings_agree_with_lookup_on_hostile_tables(
            seed in 1u64..,
            exec_only in any::<bool>(),
        ) {
            // 16 pages of random entries pointing at (mostly) pages of this
            // memory, with random low bits and some reserved/large-page bits.
            let mut state = seed;
            let mut rand = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut m = FlatMemory::new(16 * 0x1000);
            for i in 0..16 * 512u64 {
                let r = rand();
                // Mostly table-like (bits 7:3 clear) or large WB leaves;
                // sometimes a random low byte or a reserved/offset bit.
                let xwr = [0, R, R | W, R | X, RWX, RWX, W, X][(r & 7) as usize];
                let low = match (r >> 32) % 8 {
                    0..=3 => xwr,
                    4 | 5 => xwr | LARGE | WB,
                    _ => r & 0xff,
                };
                let extra = [0, 0, 0, 0, 0, 1 << 12, 1 << 21, 1 << 45][(r >> 40) as usize % 8];
                m.write_u64(i * 8, ((r >> 8) % 20) << 12 | low | extra).unwrap();
            }
            // A usable PML4E 0, so that most cases reach the lower levels.
            m.write_u64(0x1000, (2 + rand() % 14) << 12 | RWX).unwrap();
            let e = Ept::new(0x1000 | (3 << 3) | 6, EptConfig { execute_only: exec_only, maxphyaddr: 39 }).unwrap();
            let max_gpa = 0x400_0000u64;
            let runs = ept_mappings(&m, &e, EptMapLimit::new(max_gpa)).unwrap();
            // Reference: look up every 4 KiB page and coalesce by hand.
            let mut want: Vec<EptRun> = Vec::new();
            for gfn in 0..(max_gpa >> 12) {
                let gpa = gfn << 12;
                if let EptLookup::Leaf { hpa, perms, .. } = e.lookup(&m, gpa) {
                    if perms.is_empty() { continue; }
                    match want.last_mut() {
                        Some(l) if l.gpa + l.len == gpa && l.hpa + l.len == hpa && l.perms == perms => l.len += 0x1000,
                        _ => want.push(EptRun { gpa, hpa, len: 0x1000, perms }),
                    }
                }
            }
            prop_assert_eq!(runs, want);
        }
    }
}
