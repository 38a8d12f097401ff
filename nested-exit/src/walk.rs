//! Linear -> guest-physical translation through a guest's own paging
//! structures (SDM Vol. 3, chapter 4 "Paging").
//!
//! L0 uses this to resolve the memory operands of the VMX instructions L1
//! executes: the walker reads L1's page tables through [`GuestPhysMemory`]
//! and returns either the guest-physical address or the fault the CPU would
//! raise (`#PF` with its error code and CR2 value, or `#GP(0)` for a
//! non-canonical address).
//!
//! Modes: paging off, 32-bit paging (4 MiB pages with CR4.PSE, PSE-36 high
//! address bits), PAE paging (PDPTEs read from CR3 at walk time), 4-level
//! and 5-level paging (IA-32e; 1 GiB and 2 MiB pages). Protection keys,
//! shadow stacks and HLAT are not modelled.
//!
//! A paging-structure read outside guest RAM returns all ones, as a read
//! of unbacked physical memory does on hardware (master abort). The walk
//! then ends with whatever the architecture says about such an entry,
//! typically a reserved-bit `#PF`; it never panics and never touches host
//! memory. See `docs/walkers.md`.

use bitflags::bitflags;
use vmcs12::GuestPhysMemory;

use crate::state::VcpuState;

/// CR0.WP (bit 16): supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG (bit 31): paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE (bit 4): 4 MiB pages with 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE (bit 5): 64-bit paging entries.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57 (bit 12): 5-level paging in IA-32e mode.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP (bit 20).
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP (bit 21).
pub const CR4_SMAP: u64 = 1 << 21;
/// IA32_EFER.LMA (bit 10): IA-32e mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE (bit 11): execute-disable bit enabled.
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS.AC (bit 18): lifts SMAP for explicit supervisor data accesses.
pub const RFLAGS_AC: u64 = 1 << 18;

/// MAXPHYADDR assumed by [`PagingState::from_vcpu`]; the same value the
/// L0 advertises by default in `vmcs12::VmxCapabilities`.
pub const DEFAULT_MAXPHYADDR: u8 = 39;

// Paging-structure entry bits (SDM 4.3, 4.4.2, 4.5.4).
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_XD: u64 = 1 << 63;

/// What the access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// One access to translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// An implicit supervisor-mode access (GDT/IDT/TSS reads and the like):
    /// supervisor rights even at CPL 3, and SMAP applies regardless of
    /// RFLAGS.AC (SDM 4.6). VMX instruction operands are explicit: false.
    pub implicit_supervisor: bool,
}

impl Access {
    /// An explicit data read.
    pub const fn read() -> Self {
        Self::new(AccessKind::Read)
    }

    /// An explicit data write.
    pub const fn write() -> Self {
        Self::new(AccessKind::Write)
    }

    /// An instruction fetch.
    pub const fn fetch() -> Self {
        Self::new(AccessKind::Fetch)
    }

    /// An explicit access of `kind`.
    pub const fn new(kind: AccessKind) -> Self {
        Self {
            kind,
            implicit_supervisor: false,
        }
    }

    /// The same access, as an implicit supervisor-mode access.
    pub const fn implicit(self) -> Self {
        Self {
            kind: self.kind,
            implicit_supervisor: true,
        }
    }
}

bitflags! {
    /// Page-fault error code (SDM 4.7, Figure 4-12).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PfErrorCode: u32 {
        /// P: 0 = not-present page, 1 = protection or reserved-bit violation.
        const PRESENT = 1 << 0;
        /// W/R: the access was a write.
        const WRITE = 1 << 1;
        /// U/S: a user-mode access.
        const USER = 1 << 2;
        /// RSVD: a reserved bit was set in a paging-structure entry.
        const RSVD = 1 << 3;
        /// I/D: an instruction fetch (only with SMEP, or PAE/4-level paging with NXE).
        const FETCH = 1 << 4;
    }
}

/// The fault a CPU would raise instead of completing the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PagingFault {
    /// `#PF` (vector 14): inject it with `error_code` and set CR2 to `linear`.
    #[error("#PF at linear address {linear:#x}, error code {error_code:?}: inject a page fault into the guest")]
    PageFault {
        /// The faulting linear address (the CR2 value).
        linear: u64,
        /// The error code pushed with the fault.
        error_code: PfErrorCode,
    },
    /// `#GP(0)` (vector 13): non-canonical address in IA-32e mode. When the
    /// operand uses SS the CPU raises `#SS(0)` instead: the caller knows the
    /// segment and picks the vector.
    #[error("non-canonical linear address {linear:#x}: inject #GP(0) (#SS(0) for a stack access)")]
    GeneralProtection {
        /// The non-canonical address.
        linear: u64,
    },
}

impl PagingFault {
    /// Exception vector: 14 for `#PF`, 13 for `#GP`.
    pub fn vector(&self) -> u8 {
        match self {
            PagingFault::PageFault { .. } => 14,
            PagingFault::GeneralProtection { .. } => 13,
        }
    }

    /// Error code to deliver with the exception.
    pub fn error_code(&self) -> u32 {
        match self {
            PagingFault::PageFault { error_code, .. } => error_code.bits(),
            PagingFault::GeneralProtection { .. } => 0,
        }
    }
}

/// The paging mode, from CR0.PG, CR4.PAE, CR4.LA57 and EFER.LMA (SDM 4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical (32 bits).
    Off,
    /// 32-bit paging (CR4.PAE = 0).
    Bits32,
    /// PAE paging (CR4.PAE = 1, EFER.LMA = 0).
    Pae,
    /// 4-level paging (EFER.LMA = 1, CR4.LA57 = 0).
    Level4,
    /// 5-level paging (EFER.LMA = 1, CR4.LA57 = 1).
    Level5,
}

/// Size of the page a translation lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB page (also used when paging is off).
    Size4K,
    /// 2 MiB page (PAE/4-level PDE, EPT PDE).
    Size2M,
    /// 4 MiB page (32-bit paging PDE with CR4.PSE).
    Size4M,
    /// 1 GiB page (4-level PDPTE, EPT PDPTE).
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size4M => 1 << 22,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// The registers that control paging, plus the CPU properties the walk
/// depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagingState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// RFLAGS (only AC is used, for SMAP).
    pub rflags: u64,
    /// Current privilege level: 3 makes explicit accesses user-mode.
    pub cpl: u8,
    /// MAXPHYADDR: address bits at and above it are reserved in entries.
    pub maxphyaddr: u8,
    /// CPUID.80000001H:EDX.Page1GB: without it, PS in a PDPTE is reserved.
    pub page_1g: bool,
}

impl PagingState {
    /// The paging state of a vCPU, with [`DEFAULT_MAXPHYADDR`] and 1 GiB
    /// pages supported.
    pub fn from_vcpu(vcpu: &VcpuState) -> Self {
        Self {
            cr0: vcpu.cr0,
            cr3: vcpu.cr3,
            cr4: vcpu.cr4,
            efer: vcpu.msrs.efer,
            rflags: vcpu.rflags,
            cpl: vcpu.cpl(),
            maxphyaddr: DEFAULT_MAXPHYADDR,
            page_1g: true,
        }
    }

    /// The same state with another MAXPHYADDR (clamped to 32..=52).
    pub fn with_maxphyaddr(mut self, maxphyaddr: u8) -> Self {
        self.maxphyaddr = maxphyaddr.clamp(32, 52);
        self
    }

    /// The paging mode these registers select. EFER.LMA decides before
    /// CR4.PAE, as a CPU can only have LMA = 1 with PAE = 1.
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::Off
        } else if self.efer & EFER_LMA != 0 {
            if self.cr4 & CR4_LA57 != 0 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            }
        } else if self.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }

    fn nxe(&self) -> bool {
        self.efer & EFER_NXE != 0
    }

    fn maxphy(&self) -> u32 {
        u32::from(self.maxphyaddr.clamp(32, 52))
    }
}

/// Whether `la` is canonical for a linear-address width of `bits`.
pub fn is_canonical(la: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((la << shift) as i64) >> shift) as u64 == la
}

/// One paging-structure entry a walk used (for A/D updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct EntryRef {
    addr: u64,
    /// 8-byte entry (PAE/IA-32e) rather than 4-byte (32-bit paging).
    wide: bool,
    /// PAE PDPTEs have no accessed flag.
    has_accessed: bool,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The page the address lies in.
    pub page_size: PageSize,
    entries: [EntryRef; 5],
    n_entries: usize,
}

impl Translation {
    fn identity(gpa: u64) -> Self {
        Self {
            gpa,
            page_size: PageSize::Size4K,
            entries: [EntryRef::default(); 5],
            n_entries: 0,
        }
    }

    /// Guest-physical addresses of the paging-structure entries used, from
    /// the top level down to the leaf.
    pub fn entry_addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().take(self.n_entries).map(|e| e.addr)
    }
}

/// Options of [`translate_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WalkOptions {
    /// Set the accessed flag in every entry used and the dirty flag in the
    /// leaf on a write, as the CPU does (SDM 4.8). Off by default.
    pub set_accessed_dirty: bool,
}

/// A contiguous piece of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysRange {
    /// Start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Reads an entry; outside guest RAM the read returns all ones.
fn read_entry(mem: &dyn GuestPhysMemory, addr: u64, wide: bool) -> u64 {
    if wide {
        mem.read_u64(addr).unwrap_or(u64::MAX)
    } else {
        mem.read_u32(addr).map_or(u64::MAX, u64::from)
    }
}

/// Mask of bits `hi:lo` (inclusive); empty when `hi < lo`.
fn bits(hi: u32, lo: u32) -> u64 {
    if hi < lo || lo > 63 {
        return 0;
    }
    let hi = hi.min(63);
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Accumulated rights along the walk.
struct Rights {
    user: bool,
    writable: bool,
    xd: bool,
}

impl Rights {
    fn new() -> Self {
        Self {
            user: true,
            writable: true,
            xd: false,
        }
    }

    fn add(&mut self, e: u64, nxe: bool) {
        self.user &= e & PTE_US != 0;
        self.writable &= e & PTE_RW != 0;
        self.xd |= nxe && e & PTE_XD != 0;
    }
}

struct Walker<'a> {
    state: &'a PagingState,
    la: u64,
    access: Access,
    user_access: bool,
}

impl Walker<'_> {
    fn fault(&self, mut code: PfErrorCode) -> PagingFault {
        if self.access.kind == AccessKind::Write {
            code |= PfErrorCode::WRITE;
        }
        if self.user_access {
            code |= PfErrorCode::USER;
        }
        // SDM 4.7: I/D is reported only with SMEP, or PAE/4-level paging with NXE.
        let pae = self.state.mode() != PagingMode::Bits32;
        if self.access.kind == AccessKind::Fetch
            && (self.state.cr4 & CR4_SMEP != 0 || (pae && self.state.nxe()))
        {
            code |= PfErrorCode::FETCH;
        }
        PagingFault::PageFault {
            linear: self.la,
            error_code: code,
        }
    }

    fn not_present(&self) -> PagingFault {
        self.fault(PfErrorCode::empty())
    }

    fn reserved(&self) -> PagingFault {
        self.fault(PfErrorCode::PRESENT | PfErrorCode::RSVD)
    }

    /// Access rights check of SDM 4.6 on the combined rights of the walk.
    fn check_rights(&self, r: &Rights) -> Result<(), PagingFault> {
        let s = self.state;
        let wp = s.cr0 & CR0_WP != 0;
        // SMAP blocks supervisor data accesses to user pages unless the
        // access is explicit and RFLAGS.AC = 1 (SDM 4.6.1).
        let smap_blocks =
            s.cr4 & CR4_SMAP != 0 && (self.access.implicit_supervisor || s.rflags & RFLAGS_AC == 0);
        let ok = match (self.access.kind, self.user_access) {
            (AccessKind::Read, true) => r.user,
            (AccessKind::Read, false) => !(r.user && smap_blocks),
            (AccessKind::Write, true) => r.user && r.writable,
            (AccessKind::Write, false) => (r.writable || !wp) && !(r.user && smap_blocks),
            (AccessKind::Fetch, true) => r.user && !r.xd,
            (AccessKind::Fetch, false) => !r.xd && (!r.user || s.cr4 & CR4_SMEP == 0),
        };
        if ok {
            Ok(())
        } else {
            Err(self.fault(PfErrorCode::PRESENT))
        }
    }

    fn walk(&self, mem: &dyn GuestPhysMemory) -> Result<Translation, PagingFault> {
        match self.state.mode() {
            PagingMode::Off => Ok(Translation::identity(self.la)),
            PagingMode::Bits32 => self.walk_32(mem),
            PagingMode::Pae => self.walk_pae(mem),
            PagingMode::Level4 => self.walk_long(mem, 4),
            PagingMode::Level5 => self.walk_long(mem, 5),
        }
    }

    /// 32-bit paging (SDM 4.3).
    fn walk_32(&self, mem: &dyn GuestPhysMemory) -> Result<Translation, PagingFault> {
        let s = self.state;
        let mut t = Translation::identity(0);
        let mut rights = Rights::new();
        let pde_addr = (s.cr3 & 0xffff_f000) | ((self.la >> 22) & 0x3ff) << 2;
        let pde = read_entry(mem, pde_addr, false);
        t.entries[0] = EntryRef {
            addr: pde_addr,
            wide: false,
            has_accessed: true,
        };
        t.n_entries = 1;
        if pde & PTE_P == 0 {
            return Err(self.not_present());
        }
        rights.add(pde, false);
        if pde & PTE_PS != 0 && s.cr4 & CR4_PSE != 0 {
            // 4 MiB page; PSE-36: PDE bits 20:13 are physical bits 39:32,
            // up to min(MAXPHYADDR, 40); the rest of 21:13 is reserved.
            let m = s.maxphy().min(40);
            let rsvd = bits(21, 13 + (m - 32));
            if pde & rsvd != 0 {
                return Err(self.reserved());
            }
            let high = ((pde >> 13) & 0xff) << 32;
            t.gpa = high | (pde & 0xffc0_0000) | (self.la & 0x3f_ffff);
            t.page_size = PageSize::Size4M;
            self.check_rights(&rights)?;
            return Ok(t);
        }
        let pte_addr = (pde & 0xffff_f000) | ((self.la >> 12) & 0x3ff) << 2;
        let pte = read_entry(mem, pte_addr, false);
        t.entries[1] = EntryRef {
            addr: pte_addr,
            wide: false,
            has_accessed: true,
        };
        t.n_entries = 2;
        if pte & PTE_P == 0 {
            return Err(self.not_present());
        }
        rights.add(pte, false);
        t.gpa = (pte & 0xffff_f000) | (self.la & 0xfff);
        self.check_rights(&rights)?;
        Ok(t)
    }

    /// PAE paging (SDM 4.4). The PDPTEs are read from memory at walk time,
    /// not from the registers the CPU loaded at the last CR3 write.
    fn walk_pae(&self, mem: &dyn GuestPhysMemory) -> Result<Translation, PagingFault> {
        let s = self.state;
        let m = s.maxphy();
        let addr_mask = bits(m - 1, 12);
        let mut t = Translation::identity(0);
        let pdpte_addr = (s.cr3 & 0xffff_ffe0) + ((self.la >> 30) & 3) * 8;
        let pdpte = read_entry(mem, pdpte_addr, true);
        t.entries[0] = EntryRef {
            addr: pdpte_addr,
            wide: true,
            has_accessed: false,
        };
        t.n_entries = 1;
        if pdpte & PTE_P == 0 {
            return Err(self.not_present());
        }
        // Table 4-8: bits 2:1, 8:5 and 63:MAXPHYADDR are reserved. A CPU
        // would refuse them with #GP at the CR3 load; here they fault the walk.
        if pdpte & (bits(2, 1) | bits(8, 5) | bits(63, m)) != 0 {
            return Err(self.reserved());
        }
        // PDEs and PTEs: bits 62:MAXPHYADDR reserved, and 63 without NXE.
        let high_rsvd = bits(62, m) | if s.nxe() { 0 } else { PTE_XD };
        let mut rights = Rights::new();
        let pd = pdpte & addr_mask;
        let pde_addr = pd + ((self.la >> 21) & 0x1ff) * 8;
        let pde = read_entry(mem, pde_addr, true);
        t.entries[1] = EntryRef {
            addr: pde_addr,
            wide: true,
            has_accessed: true,
        };
        t.n_entries = 2;
        if pde & PTE_P == 0 {
            return Err(self.not_present());
        }
        if pde & PTE_PS != 0 {
            if pde & (high_rsvd | bits(20, 13)) != 0 {
                return Err(self.reserved());
            }
            rights.add(pde, s.nxe());
            t.gpa = (pde & bits(m - 1, 21)) | (self.la & 0x1f_ffff);
            t.page_size = PageSize::Size2M;
            self.check_rights(&rights)?;
            return Ok(t);
        }
        if pde & high_rsvd != 0 {
            return Err(self.reserved());
        }
        rights.add(pde, s.nxe());
        let pte_addr = (pde & addr_mask) + ((self.la >> 12) & 0x1ff) * 8;
        let pte = read_entry(mem, pte_addr, true);
        t.entries[2] = EntryRef {
            addr: pte_addr,
            wide: true,
            has_accessed: true,
        };
        t.n_entries = 3;
        if pte & PTE_P == 0 {
            return Err(self.not_present());
        }
        if pte & high_rsvd != 0 {
            return Err(self.reserved());
        }
        rights.add(pte, s.nxe());
        t.gpa = (pte & addr_mask) | (self.la & 0xfff);
        self.check_rights(&rights)?;
        Ok(t)
    }

    /// 4-level and 5-level paging (SDM 4.5).
    fn walk_long(
        &self,
        mem: &dyn GuestPhysMemory,
        levels: u32,
    ) -> Result<Translation, PagingFault> {
        let s = self.state;
        let m = s.maxphy();
        let addr_mask = bits(m - 1, 12);
        // Table 4-14..4-20: bits 51:MAXPHYADDR reserved, 63 without NXE.
        let common_rsvd = bits(51, m) | if s.nxe() { 0 } else { PTE_XD };
        let mut t = Translation::identity(0);
        let mut rights = Rights::new();
        let mut table = s.cr3 & addr_mask;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let addr = table + ((self.la >> shift) & 0x1ff) * 8;
            let e = read_entry(mem, addr, true);
            if let Some(slot) = t.entries.get_mut(t.n_entries) {
                *slot = EntryRef {
                    addr,
                    wide: true,
                    has_accessed: true,
                };
                t.n_entries += 1;
            }
            if e & PTE_P == 0 {
                return Err(self.not_present());
            }
            let ps = e & PTE_PS != 0;
            let leaf_size = match level {
                1 => Some(PageSize::Size4K),
                2 if ps => Some(PageSize::Size2M),
                3 if ps && s.page_1g => Some(PageSize::Size1G),
                _ => None,
            };
            // PS is reserved in PML4Es/PML5Es, and in PDPTEs without 1 GiB pages.
            let ps_rsvd = ps && (level >= 4 || (level == 3 && !s.page_1g));
            let page_rsvd = match leaf_size {
                Some(PageSize::Size2M) => bits(20, 13),
                Some(PageSize::Size1G) => bits(29, 13),
                _ => 0,
            };
            if ps_rsvd || e & (common_rsvd | page_rsvd) != 0 {
                return Err(self.reserved());
            }
            rights.add(e, s.nxe());
            if let Some(size) = leaf_size {
                let off = size.bytes() - 1;
                t.gpa = (e & addr_mask & !off) | (self.la & off);
                t.page_size = size;
                self.check_rights(&rights)?;
                return Ok(t);
            }
            table = e & addr_mask;
        }
        // The level-1 entry always ends the loop above.
        Err(self.reserved())
    }
}

/// Translates `la` for `access` under `state`, reading the paging
/// structures from `mem` without modifying them.
///
/// Outside IA-32e mode linear addresses are 32 bits wide: the upper half of
/// `la` is dropped (and is not part of CR2). In IA-32e mode a non-canonical
/// `la` is `#GP(0)` before any table is read.
pub fn translate(
    state: &PagingState,
    la: u64,
    access: Access,
    mem: &dyn GuestPhysMemory,
) -> Result<Translation, PagingFault> {
    let la = match state.mode() {
        PagingMode::Off | PagingMode::Bits32 | PagingMode::Pae => la & 0xffff_ffff,
        PagingMode::Level4 if !is_canonical(la, 48) => {
            return Err(PagingFault::GeneralProtection { linear: la })
        }
        PagingMode::Level5 if !is_canonical(la, 57) => {
            return Err(PagingFault::GeneralProtection { linear: la })
        }
        PagingMode::Level4 | PagingMode::Level5 => la,
    };
    Walker {
        state,
        la,
        access,
        user_access: state.cpl == 3 && !access.implicit_supervisor,
    }
    .walk(mem)
}

/// [`translate`], then (with `opts.set_accessed_dirty`) sets the accessed
/// flags of the entries used and the dirty flag of the leaf on a write.
/// Flags are only set for a translation that succeeds; a faulting walk
/// leaves memory untouched. The updates are not atomic against other vCPUs.
pub fn translate_with(
    state: &PagingState,
    la: u64,
    access: Access,
    mem: &mut dyn GuestPhysMemory,
    opts: WalkOptions,
) -> Result<Translation, PagingFault> {
    let t = translate(state, la, access, &*mem)?;
    if opts.set_accessed_dirty {
        let used = t.entries.iter().take(t.n_entries);
        let leaf = t.n_entries.checked_sub(1);
        for (i, e) in used.enumerate().filter(|(_, e)| e.has_accessed) {
            let old = read_entry(&*mem, e.addr, e.wide);
            let mut new = old | PTE_A;
            if access.kind == AccessKind::Write && Some(i) == leaf {
                new |= PTE_D;
            }
            if new != old {
                // A write outside RAM is dropped, like the read returned ones.
                let _ = if e.wide {
                    mem.write_u64(e.addr, new)
                } else {
                    mem.write_u32(e.addr, new as u32)
                };
            }
        }
    }
    Ok(t)
}

/// The first non-canonical address (for a `width`-bit linear address
/// space) among the `len` bytes from `la`, wrapping at 2^64.
fn first_non_canonical(la: u64, len: u64, width: u32) -> Option<u64> {
    if !is_canonical(la, width) {
        return Some(la);
    }
    let half = 1u64 << (width - 1);
    // Distance to the start of the non-canonical hole, going up.
    let to_hole = if la < half {
        half - la
    } else {
        0u64.wrapping_sub(la) + half
    };
    (len > to_hole).then_some(half)
}

/// Translates the `len` bytes at `la` (an operand that may cross pages),
/// returning guest-physical pieces in order, adjacent pieces merged.
///
/// Faults as the CPU would for the whole operand: a non-canonical byte is
/// `#GP(0)` before any page is walked; otherwise the first page that fails
/// gives the `#PF`, with CR2 = the first byte of the operand in that page.
/// `len` is an operand size chosen by L0, not by the guest: work is one
/// walk per 4 KiB page the operand touches, memory one entry per
/// discontiguity.
pub fn translate_range(
    state: &PagingState,
    la: u64,
    len: u64,
    access: Access,
    mem: &dyn GuestPhysMemory,
) -> Result<Vec<PhysRange>, PagingFault> {
    let wrap32 = matches!(
        state.mode(),
        PagingMode::Off | PagingMode::Bits32 | PagingMode::Pae
    );
    let step = |a: u64, n: u64| {
        let next = a.wrapping_add(n);
        if wrap32 {
            next & 0xffff_ffff
        } else {
            next
        }
    };
    let start = if wrap32 { la & 0xffff_ffff } else { la };
    let width = match state.mode() {
        PagingMode::Level4 => Some(48),
        PagingMode::Level5 => Some(57),
        _ => None,
    };
    if let Some(bad) = width.and_then(|w| first_non_canonical(start, len, w)) {
        return Err(PagingFault::GeneralProtection { linear: bad });
    }
    // One walk per 4 KiB piece; pieces that continue the previous one in
    // guest-physical memory are merged.
    let mut out: Vec<PhysRange> = Vec::new();
    let (mut cur, mut left) = (start, len);
    while left > 0 {
        let n = left.min(0x1000 - (cur & 0xfff));
        let t = translate(state, cur, access, mem)?;
        match out.last_mut() {
            Some(last) if last.gpa.checked_add(last.len) == Some(t.gpa) => last.len += n,
            _ => out.push(PhysRange { gpa: t.gpa, len: n }),
        }
        cur = step(cur, n);
        left -= n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use vmcs12::FlatMemory;

    const P: u64 = PTE_P;
    const RW: u64 = PTE_RW;
    const US: u64 = PTE_US;
    const PS: u64 = PTE_PS;
    const XD: u64 = PTE_XD;

    fn long_state(cr3: u64) -> PagingState {
        PagingState {
            cr0: CR0_PG | CR0_WP | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | EFER_NXE | (1 << 8),
            rflags: 0x2,
            cpl: 0,
            maxphyaddr: 39,
            page_1g: true,
        }
    }

    fn pf(la: u64, code: PfErrorCode) -> Result<Translation, PagingFault> {
        Err(PagingFault::PageFault {
            linear: la,
            error_code: code,
        })
    }

    fn gpa_of(r: Result<Translation, PagingFault>) -> Result<u64, PagingFault> {
        r.map(|t| t.gpa)
    }

    /// 4-level tables: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000,
    /// mapping la 0x40_0000_0000 + ... region through slot indices 0.
    fn four_level(pte: u64) -> FlatMemory {
        let mut m = FlatMemory::new(0x10_0000);
        m.write_u64(0x1000, 0x2000 | P | RW | US).unwrap();
        m.write_u64(0x2000, 0x3000 | P | RW | US).unwrap();
        m.write_u64(0x3000, 0x4000 | P | RW | US).unwrap();
        m.write_u64(0x4000 + 5 * 8, pte).unwrap();
        m
    }

    #[test]
    fn test_paging_off_is_identity_on_32_bits() {
        let s = PagingState {
            cr0: 0,
            ..long_state(0)
        };
        let m = FlatMemory::new(0);
        assert_eq!(s.mode(), PagingMode::Off);
        let t = translate(&s, 0x1_0001_2345, Access::write(), &m).unwrap();
        assert_eq!(t.gpa, 0x1_2345);
        assert_eq!(t.page_size, PageSize::Size4K);
    }

    #[test]
    fn test_from_vcpu_copies_paging_registers() {
        let mut v = VcpuState {
            cr0: CR0_PG | 1,
            cr3: 0x5000,
            cr4: CR4_PAE,
            ..VcpuState::default()
        };
        v.msrs.efer = EFER_LMA;
        v.cs.ar = 3 << 5;
        let s = PagingState::from_vcpu(&v);
        assert_eq!((s.cr3, s.cpl, s.mode()), (0x5000, 3, PagingMode::Level4));
        assert_eq!(s.maxphyaddr, DEFAULT_MAXPHYADDR);
        assert_eq!(s.with_maxphyaddr(70).maxphyaddr, 52);
    }

    #[test]
    fn test_4level_4k_page() {
        let m = four_level(0x7_7000 | P | RW);
        let s = long_state(0x1000);
        let t = translate(&s, 0x5123, Access::write(), &m).unwrap();
        assert_eq!(t.gpa, 0x7_7123);
        assert_eq!(t.page_size, PageSize::Size4K);
        let addrs: Vec<u64> = t.entry_addresses().collect();
        assert_eq!(addrs, vec![0x1000, 0x2000, 0x3000, 0x4028]);
        // Not present PTE.
        assert_eq!(
            translate(&s, 0x6000, Access::read(), &m),
            pf(0x6000, PfErrorCode::empty())
        );
    }

    #[test]
    fn test_4level_2m_and_1g_pages() {
        let mut m = four_level(0);
        m.write_u64(0x3008, 0x4020_0000 | P | PS).unwrap();
        m.write_u64(0x2008, 0x4000_0000 | P | PS).unwrap();
        let s = long_state(0x1000);
        let t = translate(&s, 0x20_1234, Access::read(), &m).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x4020_1234, PageSize::Size2M));
        let t = translate(&s, 0x4123_4567, Access::read(), &m).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x4123_4567, PageSize::Size1G));
    }

    #[test]
    fn test_4level_large_page_reserved_bits() {
        let s = long_state(0x1000);
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        let mut m = four_level(0);
        m.write_u64(0x3008, 0x4020_0000 | P | PS | (1 << 13))
            .unwrap();
        assert_eq!(
            translate(&s, 0x20_0000, Access::read(), &m),
            pf(0x20_0000, rsvd)
        );
        m.write_u64(0x2008, 0x4000_0000 | P | PS | (1 << 29))
            .unwrap();
        assert_eq!(
            translate(&s, 0x4000_0000, Access::read(), &m),
            pf(0x4000_0000, rsvd)
        );
        // Without 1 GiB page support PS in a PDPTE is reserved.
        m.write_u64(0x2008, 0x4000_0000 | P | PS).unwrap();
        let no1g = PagingState {
            page_1g: false,
            ..s
        };
        assert_eq!(
            translate(&no1g, 0x4000_0000, Access::read(), &m),
            pf(0x4000_0000, rsvd)
        );
        assert!(translate(&s, 0x4000_0000, Access::read(), &m).is_ok());
    }

    #[test]
    fn test_4level_pml4e_ps_and_maxphyaddr_reserved() {
        let s = long_state(0x1000);
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        let mut m = four_level(0x7000 | P);
        assert!(translate(&s, 0x5000, Access::read(), &m).is_ok());
        m.write_u64(0x1000, 0x2000 | P | RW | US | PS).unwrap();
        assert_eq!(translate(&s, 0x5000, Access::read(), &m), pf(0x5000, rsvd));
        let mut m = four_level(0x7000 | P | (1 << 39));
        assert_eq!(translate(&s, 0x5000, Access::read(), &m), pf(0x5000, rsvd));
        // With MAXPHYADDR 40 bit 39 is an address bit.
        let wide = s.with_maxphyaddr(40);
        assert_eq!(
            gpa_of(translate(&wide, 0x5000, Access::read(), &m)),
            Ok((1 << 39) | 0x7000)
        );
        // Bits 62:52 are ignored in 4-level paging.
        m.write_u64(0x4028, 0x7000 | P | (1 << 55)).unwrap();
        assert!(translate(&s, 0x5000, Access::read(), &m).is_ok());
    }

    #[test]
    fn test_xd_bit_needs_nxe() {
        let s = long_state(0x1000);
        let m = four_level(0x7000 | P | XD);
        let fetch = PfErrorCode::PRESENT | PfErrorCode::FETCH;
        assert_eq!(
            translate(&s, 0x5000, Access::fetch(), &m),
            pf(0x5000, fetch)
        );
        assert!(translate(&s, 0x5000, Access::read(), &m).is_ok());
        let no_nxe = PagingState {
            efer: EFER_LMA,
            ..s
        };
        assert_eq!(
            translate(&no_nxe, 0x5000, Access::read(), &m),
            pf(0x5000, PfErrorCode::PRESENT | PfErrorCode::RSVD)
        );
    }

    #[test]
    fn test_canonical_check_gives_gp() {
        let s = long_state(0x1000);
        let m = four_level(0x7000 | P);
        assert_eq!(
            translate(&s, 0x0000_8000_0000_0000, Access::read(), &m),
            Err(PagingFault::GeneralProtection {
                linear: 0x0000_8000_0000_0000
            })
        );
        // High canonical half walks (and misses: not present).
        assert_eq!(
            translate(&s, 0xffff_8000_0000_0000, Access::read(), &m),
            pf(0xffff_8000_0000_0000, PfErrorCode::empty())
        );
        let la57 = PagingState {
            cr4: CR4_PAE | CR4_LA57,
            ..s
        };
        assert_eq!(la57.mode(), PagingMode::Level5);
        assert!(matches!(
            translate(&la57, 0x0100_0000_0000_0000, Access::read(), &m),
            Err(PagingFault::GeneralProtection { .. })
        ));
        let e = PagingFault::GeneralProtection { linear: 1 };
        assert_eq!((e.vector(), e.error_code()), (13, 0));
    }

    #[test]
    fn test_5level_walk() {
        let mut m = four_level(0x9000 | P);
        m.write_u64(0x8000, 0x1000 | P | RW | US).unwrap();
        let s = PagingState {
            cr4: CR4_PAE | CR4_LA57,
            ..long_state(0x8000)
        };
        assert_eq!(
            gpa_of(translate(&s, 0x5010, Access::read(), &m)),
            Ok(0x9010)
        );
        assert_eq!(
            translate(&s, 0x5010, Access::read(), &m)
                .unwrap()
                .entry_addresses()
                .count(),
            5
        );
    }

    #[test]
    fn test_error_code_bits_for_rights() {
        let s = long_state(0x1000);
        let user = PagingState { cpl: 3, ..s };
        let (p, w, u) = (PfErrorCode::PRESENT, PfErrorCode::WRITE, PfErrorCode::USER);
        // Supervisor page, read-only.
        let m = four_level(0x7000 | P);
        assert_eq!(
            translate(&s, 0x5000, Access::write(), &m),
            pf(0x5000, p | w)
        );
        let no_wp = PagingState {
            cr0: CR0_PG | 1,
            ..s
        };
        assert!(translate(&no_wp, 0x5000, Access::write(), &m).is_ok());
        assert_eq!(
            translate(&user, 0x5000, Access::read(), &m),
            pf(0x5000, p | u)
        );
        // Implicit supervisor accesses at CPL 3 use supervisor rights.
        assert!(translate(&user, 0x5000, Access::read().implicit(), &m).is_ok());
        // User page, read-only: user write faults even with WP = 0.
        let m = four_level(0x7000 | P | US);
        let user_no_wp = PagingState { cpl: 3, ..no_wp };
        assert_eq!(
            translate(&user_no_wp, 0x5000, Access::write(), &m),
            pf(0x5000, p | w | u)
        );
        assert!(translate(&user, 0x5000, Access::read(), &m).is_ok());
        // Not present user write.
        assert_eq!(
            translate(&user, 0x6000, Access::write(), &m),
            pf(0x6000, w | u)
        );
        // Writable needs R/W at every level.
        let mut m = four_level(0x7000 | P | RW | US);
        assert!(translate(&user, 0x5000, Access::write(), &m).is_ok());
        m.write_u64(0x2000, 0x3000 | P | US).unwrap();
        assert_eq!(
            translate(&user, 0x5000, Access::write(), &m),
            pf(0x5000, p | w | u)
        );
    }

    #[test]
    fn test_smep_and_smap() {
        let s = long_state(0x1000);
        let m = four_level(0x7000 | P | RW | US);
        let smep = PagingState {
            cr4: CR4_PAE | CR4_SMEP,
            ..s
        };
        let fetch = PfErrorCode::PRESENT | PfErrorCode::FETCH;
        assert!(translate(&s, 0x5000, Access::fetch(), &m).is_ok());
        assert_eq!(
            translate(&smep, 0x5000, Access::fetch(), &m),
            pf(0x5000, fetch)
        );
        let smap = PagingState {
            cr4: CR4_PAE | CR4_SMAP,
            ..s
        };
        let p = PfErrorCode::PRESENT;
        assert_eq!(translate(&smap, 0x5000, Access::read(), &m), pf(0x5000, p));
        assert_eq!(
            translate(&smap, 0x5000, Access::write(), &m),
            pf(0x5000, p | PfErrorCode::WRITE)
        );
        let ac = PagingState {
            rflags: RFLAGS_AC | 2,
            ..smap
        };
        assert!(translate(&ac, 0x5000, Access::read(), &m).is_ok());
        // AC does not help implicit supervisor accesses.
        assert_eq!(
            translate(&ac, 0x5000, Access::read().implicit(), &m),
            pf(0x5000, p)
        );
    }

    fn bits32_state(cr4: u64) -> PagingState {
        PagingState {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4,
            efer: 0,
            rflags: 2,
            cpl: 0,
            maxphyaddr: 36,
            page_1g: true,
        }
    }

    #[test]
    fn test_32bit_4k_and_4m_pages() {
        let mut m = FlatMemory::new(0x10_0000);
        m.write_u32(0x1000, 0x2000 | (P | RW) as u32).unwrap();
        m.write_u32(0x2000 + 3 * 4, 0x8000 | P as u32).unwrap();
        m.write_u32(0x1004, 0x0040_0000 | (P | PS) as u32).unwrap();
        let s = bits32_state(CR4_PSE);
        assert_eq!(s.mode(), PagingMode::Bits32);
        assert_eq!(
            gpa_of(translate(&s, 0x3abc, Access::read(), &m)),
            Ok(0x8abc)
        );
        // The upper half of a 64-bit value is not part of a 32-bit address.
        assert_eq!(
            gpa_of(translate(&s, 0xdead_0000_3abc, Access::read(), &m)),
            Ok(0x8abc)
        );
        let t = translate(&s, 0x0041_2345, Access::read(), &m).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x0041_2345, PageSize::Size4M));
        // PSE-36: PDE bits 16:13 carry physical bits 35:32 with MAXPHYADDR 36.
        m.write_u32(0x1004, 0x0040_0000 | (P | PS) as u32 | (0x5 << 13))
            .unwrap();
        assert_eq!(
            gpa_of(translate(&s, 0x0041_2345, Access::read(), &m)),
            Ok(0x5_0041_2345)
        );
        // Bits 20:17 are reserved with MAXPHYADDR 36, and bit 21 always.
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        for bit in [17, 20, 21] {
            m.write_u32(0x1004, 0x0040_0000 | (P | PS) as u32 | (1 << bit))
                .unwrap();
            assert_eq!(
                translate(&s, 0x0040_0000, Access::read(), &m),
                pf(0x0040_0000, rsvd)
            );
        }
        // Without CR4.PSE the PS bit is ignored: the PDE points to a table.
        let nopse = bits32_state(0);
        m.write_u32(0x1004, 0x2000 | (P | PS) as u32).unwrap();
        assert_eq!(
            gpa_of(translate(&nopse, 0x0040_3001, Access::read(), &m)),
            Ok(0x8001)
        );
    }

    #[test]
    fn test_32bit_fetch_fault_has_no_id_bit_without_smep() {
        let m = FlatMemory::new(0x4000);
        let s = bits32_state(0);
        assert_eq!(
            translate(&s, 0x5000, Access::fetch(), &m),
            pf(0x5000, PfErrorCode::empty())
        );
        let smep = bits32_state(CR4_SMEP);
        assert_eq!(
            translate(&smep, 0x5000, Access::fetch(), &m),
            pf(0x5000, PfErrorCode::FETCH)
        );
        // PAE without NXE: no I/D bit either.
        let pae = bits32_state(CR4_PAE);
        assert_eq!(
            translate(&pae, 0x5000, Access::fetch(), &m),
            pf(0x5000, PfErrorCode::empty())
        );
    }

    fn pae_mem() -> FlatMemory {
        let mut m = FlatMemory::new(0x10_0000);
        // CR3 = 0x1020: PDPTEs at 0x1020..0x1040.
        m.write_u64(0x1020, 0x2000 | P).unwrap();
        m.write_u64(0x2000, 0x3000 | P | RW).unwrap();
        m.write_u64(0x3000 + 2 * 8, 0x9000 | P | RW).unwrap();
        m.write_u64(0x2008, 0x60_0000 | P | RW | PS).unwrap();
        m
    }

    #[test]
    fn test_pae_4k_and_2m_pages() {
        let m = pae_mem();
        let s = PagingState {
            cr3: 0x1020,
            efer: EFER_NXE,
            ..bits32_state(CR4_PAE)
        };
        assert_eq!(s.mode(), PagingMode::Pae);
        assert_eq!(
            gpa_of(translate(&s, 0x2042, Access::write(), &m)),
            Ok(0x9042)
        );
        let t = translate(&s, 0x21_0042, Access::write(), &m).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x61_0042, PageSize::Size2M));
        // PDPTE 1 (la 0x4000_0000) is not present.
        assert_eq!(
            translate(&s, 0x4000_0000, Access::read(), &m),
            pf(0x4000_0000, PfErrorCode::empty())
        );
    }

    #[test]
    fn test_pae_pdpte_reserved_bits() {
        let s = PagingState {
            cr3: 0x1020,
            ..bits32_state(CR4_PAE)
        };
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        for bit in [1, 2, 5, 8, 36, 63] {
            let mut m = pae_mem();
            m.write_u64(0x1020, 0x2000 | P | (1 << bit)).unwrap();
            assert_eq!(
                translate(&s, 0x2000, Access::read(), &m),
                pf(0x2000, rsvd),
                "bit {bit}"
            );
        }
        // PWT/PCD (3, 4) and ignored bits 11:9 are fine.
        let mut m = pae_mem();
        m.write_u64(0x1020, 0x2000 | P | (1 << 3) | (1 << 4) | (1 << 10))
            .unwrap();
        assert!(translate(&s, 0x2000, Access::read(), &m).is_ok());
    }

    #[test]
    fn test_pae_pde_pte_reserved_bits() {
        let s = PagingState {
            cr3: 0x1020,
            ..bits32_state(CR4_PAE)
        };
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        // XD without NXE; bits 62:MAXPHYADDR (unlike 4-level, 62:52 too).
        for bad in [XD, 1 << 36, 1 << 55] {
            let mut m = pae_mem();
            m.write_u64(0x3010, 0x9000 | P | bad).unwrap();
            assert_eq!(translate(&s, 0x2000, Access::read(), &m), pf(0x2000, rsvd));
        }
        let mut m = pae_mem();
        m.write_u64(0x2008, 0x60_0000 | P | PS | (1 << 14)).unwrap();
        assert_eq!(
            translate(&s, 0x20_0000, Access::read(), &m),
            pf(0x20_0000, rsvd)
        );
        let nxe = PagingState {
            efer: EFER_NXE,
            ..s
        };
        m.write_u64(0x3010, 0x9000 | P | XD).unwrap();
        assert!(translate(&nxe, 0x2000, Access::read(), &m).is_ok());
        assert_eq!(
            translate(&nxe, 0x2000, Access::fetch(), &m),
            pf(0x2000, PfErrorCode::PRESENT | PfErrorCode::FETCH)
        );
    }

    #[test]
    fn test_table_outside_ram_reads_as_all_ones() {
        let m = FlatMemory::new(0x2000);
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        // 4-level: all ones has bits 51:39 set -> reserved-bit #PF.
        let s = long_state(0x10_0000);
        assert_eq!(translate(&s, 0x5000, Access::read(), &m), pf(0x5000, rsvd));
        // 32-bit paging with PSE: a 4 MiB PDE with bit 21 set -> reserved.
        let s = PagingState {
            cr3: 0x10_0000,
            ..bits32_state(CR4_PSE)
        };
        assert_eq!(translate(&s, 0x5000, Access::read(), &m), pf(0x5000, rsvd));
        // 32-bit paging without PSE: all-ones PDE and PTE map 0xffff_f000.
        let s = PagingState {
            cr3: 0x10_0000,
            ..bits32_state(0)
        };
        assert_eq!(
            gpa_of(translate(&s, 0x5123, Access::write(), &m)),
            Ok(0xffff_f123)
        );
    }

    #[test]
    fn test_self_referencing_table_terminates() {
        // PML4[0] points at the PML4 itself (a recursive mapping): every
        // level reads the same page, and the walk still ends at level 1.
        let mut m = FlatMemory::new(0x2000);
        m.write_u64(0x1000, 0x1000 | P | RW).unwrap();
        let s = long_state(0x1000);
        assert_eq!(gpa_of(translate(&s, 0x10, Access::read(), &m)), Ok(0x1010));
        // A self-reference with PS set at the top is reserved.
        m.write_u64(0x1000, 0x1000 | P | RW | PS).unwrap();
        assert!(translate(&s, 0x10, Access::read(), &m).is_err());
    }

    #[test]
    fn test_accessed_dirty_off_by_default() {
        let mut m = four_level(0x7000 | P | RW);
        let s = long_state(0x1000);
        let before = m.clone();
        translate(&s, 0x5000, Access::write(), &m).unwrap();
        translate_with(&s, 0x5000, Access::write(), &mut m, WalkOptions::default()).unwrap();
        assert_eq!(m, before);
        let opts = WalkOptions {
            set_accessed_dirty: true,
        };
        translate_with(&s, 0x5000, Access::read(), &mut m, opts).unwrap();
        assert_eq!(m.read_u64(0x4028).unwrap(), 0x7000 | P | RW | PTE_A);
        assert_eq!(m.read_u64(0x1000).unwrap() & PTE_A, PTE_A);
        translate_with(&s, 0x5000, Access::write(), &mut m, opts).unwrap();
        assert_eq!(m.read_u64(0x4028).unwrap(), 0x7000 | P | RW | PTE_A | PTE_D);
        // Non-leaf entries get no dirty flag.
        assert_eq!(m.read_u64(0x3000).unwrap() & PTE_D, 0);
        // A faulting walk leaves memory alone.
        let snap = m.clone();
        assert!(translate_with(&s, 0x6000, Access::write(), &mut m, opts).is_err());
        assert_eq!(m, snap);
    }

    #[test]
    fn test_accessed_flag_not_set_in_pae_pdpte() {
        let mut m = pae_mem();
        let s = PagingState {
            cr3: 0x1020,
            ..bits32_state(CR4_PAE)
        };
        let opts = WalkOptions {
            set_accessed_dirty: true,
        };
        translate_with(&s, 0x2000, Access::write(), &mut m, opts).unwrap();
        assert_eq!(m.read_u64(0x1020).unwrap(), 0x2000 | P);
        assert_eq!(m.read_u64(0x3010).unwrap(), 0x9000 | P | RW | PTE_A | PTE_D);
    }

    #[test]
    fn test_translate_range_across_pages() {
        let mut m = four_level(0x7000 | P | RW);
        m.write_u64(0x4030, 0x8000 | P | RW).unwrap();
        m.write_u64(0x4038, 0x20_0000 | P | RW).unwrap();
        let s = long_state(0x1000);
        // Contiguous pages merge.
        let r = translate_range(&s, 0x5ffc, 8, Access::read(), &m).unwrap();
        assert_eq!(
            r,
            vec![PhysRange {
                gpa: 0x7ffc,
                len: 8
            }]
        );
        // Discontiguous pages split.
        let r = translate_range(&s, 0x6ffe, 4, Access::read(), &m).unwrap();
        assert_eq!(
            r,
            vec![
                PhysRange {
                    gpa: 0x8ffe,
                    len: 2
                },
                PhysRange {
                    gpa: 0x20_0000,
                    len: 2
                }
            ]
        );
        // Fault on the second page reports that page's first byte.
        assert_eq!(
            translate_range(&s, 0x7ffa, 8, Access::read(), &m),
            Err(PagingFault::PageFault {
                linear: 0x8000,
                error_code: PfErrorCode::empty()
            })
        );
        assert_eq!(
            translate_range(&s, 0x5000, 0, Access::read(), &m),
            Ok(vec![])
        );
        // Crossing into the non-canonical hole is #GP, even though the
        // first page is not mapped (#GP comes before paging).
        assert_eq!(
            translate_range(&s, 0x7fff_ffff_fffc, 8, Access::read(), &m),
            Err(PagingFault::GeneralProtection {
                linear: 0x8000_0000_0000
            })
        );
    }

    #[test]
    fn test_translate_range_wraps_from_high_half_to_zero_in_long_mode() {
        let mut m = four_level(0);
        // PML4[511] -> PDPT[511] -> PD[511] -> PT[511] = 0x9000, reusing pages.
        m.write_u64(0x1000 + 511 * 8, 0x5000 | P | RW).unwrap();
        m.write_u64(0x5000 + 511 * 8, 0x6000 | P | RW).unwrap();
        m.write_u64(0x6000 + 511 * 8, 0x7000 | P | RW).unwrap();
        m.write_u64(0x7000 + 511 * 8, 0x9000 | P | RW).unwrap();
        m.write_u64(0x4000, 0xc000 | P | RW).unwrap();
        let s = long_state(0x1000);
        let r = translate_range(&s, 0xffff_ffff_ffff_fffe, 4, Access::read(), &m).unwrap();
        assert_eq!(
            r,
            vec![
                PhysRange {
                    gpa: 0x9ffe,
                    len: 2
                },
                PhysRange {
                    gpa: 0xc000,
                    len: 2
                }
            ]
        );
    }

    #[test]
    fn test_translate_range_wraps_at_4g_outside_long_mode() {
        let m = FlatMemory::new(0);
        let s = PagingState {
            cr0: 0,
            ..long_state(0)
        };
        let r = translate_range(&s, 0xffff_fffe, 4, Access::read(), &m).unwrap();
        assert_eq!(
            r,
            vec![
                PhysRange {
                    gpa: 0xffff_fffe,
                    len: 2
                },
                PhysRange { gpa: 0, len: 2 }
            ]
        );
    }

    /// Builds 4-level tables mapping 4 KiB pages; returns memory and CR3.
    /// Upper levels are always present, writable and user.
    fn build_4k(maps: &BTreeMap<u64, (u64, u64)>) -> FlatMemory {
        let mut m = FlatMemory::new(0x40_0000);
        let mut next = 0x2000u64;
        let mut alloc = |m: &mut FlatMemory, at: u64| -> u64 {
            let e = m.read_u64(at).unwrap();
            if e & P != 0 {
                return e & !0xfff;
            }
            let t = next;
            next += 0x1000;
            m.write_u64(at, t | P | RW | US).unwrap();
            t
        };
        for (&vpn, &(pfn, flags)) in maps {
            let la = vpn << 12;
            let pdpt = alloc(&mut m, 0x1000 + ((la >> 39) & 0x1ff) * 8);
            let pd = alloc(&mut m, pdpt + ((la >> 30) & 0x1ff) * 8);
            let pt = alloc(&mut m, pd + ((la >> 21) & 0x1ff) * 8);
            m.write_u64(pt + ((la >> 12) & 0x1ff) * 8, (pfn << 12) | flags)
                .unwrap();
        }
        m
    }

    proptest! {
        #[test]
        fn test_walker_matches_reference_on_random_4k_tables(
            maps in proptest::collection::btree_map(0u64..64, (0u64..0x1000, 0u64..8), 1..24),
            vpn_pick in 0u64..80,
            on_mapped in any::<bool>(),
            high in prop_oneof![Just(0u64), Just(0x7f_c000_0000u64)],
            off in 0u64..0x1000,
            kind in prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Fetch)],
            cpl in prop_oneof![Just(0u8), Just(3u8)],
            wp in any::<bool>(),
        ) {
            // Spread the pages over PML4/PDPT/PD indices.
            let spread = |v: u64| (v & 7) | ((v >> 3) << 18);
            let maps: BTreeMap<u64, (u64, u64)> =
                maps.into_iter().map(|(v, (p, f))| (spread(v) | (high >> 12), (p, f))).collect();
            let m = build_4k(&maps);
            let mut s = long_state(0x1000);
            s.cpl = cpl;
            if !wp {
                s.cr0 &= !CR0_WP;
            }
            // Half the time, an address the tables map (maybe without rights).
            let vpn = match maps.keys().nth(vpn_pick as usize % maps.len()) {
                Some(&k) if on_mapped => k,
                _ => spread(vpn_pick) | (high >> 12),
            };
            let la = (vpn << 12) | off;
            let got = translate(&s, la, Access::new(kind), &m);
            // Reference: rights straight from the leaf flags (P=1, RW=2, US=4).
            let user = cpl == 3;
            let mut code = PfErrorCode::empty();
            if kind == AccessKind::Write { code |= PfErrorCode::WRITE; }
            if user { code |= PfErrorCode::USER; }
            if kind == AccessKind::Fetch { code |= PfErrorCode::FETCH; }
            let want = match maps.get(&(la >> 12)) {
                Some(&(pfn, flags)) if flags & P != 0 => {
                    let allowed = match kind {
                        AccessKind::Read | AccessKind::Fetch => !user || flags & US != 0,
                        AccessKind::Write if user => flags & US != 0 && flags & RW != 0,
                        AccessKind::Write => flags & RW != 0 || !wp,
                    };
                    if allowed { Ok((pfn << 12) | off) } else {
                        Err(PagingFault::PageFault { linear: la, error_code: code | PfErrorCode::PRESENT })
                    }
                }
                _ => Err(PagingFault::PageFault { linear: la, error_code: code }),
            };
            prop_assert_eq!(gpa_of(got), want);
        }

        #[test]
        fn test_first_non_canonical_matches_bytewise_scan(
            base in prop_oneof![Just(0u64), Just(1u64 << 47), Just(0u64.wrapping_sub(1 << 47)), Just(1u64 << 56)],
            delta in -0x3000i64..0x3000,
            len in 0u64..0x6000,
            five in any::<bool>(),
        ) {
            let width = if five { 57 } else { 48 };
            let la = base.wrapping_add(delta as u64);
            let want = (0..len).map(|i| la.wrapping_add(i)).find(|a| !is_canonical(*a, width));
            prop_assert_eq!(first_non_canonical(la, len, width), want);
        }

        #[test]
        fn test_translate_range_matches_bytewise_translation(
            start in 0x4f00u64..0x7100,
            len in 0u64..0x2100,
        ) {
            let mut m = four_level(0x7000 | P | RW);
            m.write_u64(0x4030, 0x9000 | P | RW).unwrap();
            m.write_u64(0x4038, 0xa000 | P | RW).unwrap();
            let s = long_state(0x1000);
            let got = translate_range(&s, start, len, Access::read(), &m);
            // Reference: translate each byte; first failure is the fault.
            let mut want: Result<Vec<u64>, PagingFault> = Ok(Vec::new());
            for i in 0..len {
                match translate(&s, start + i, Access::read(), &m) {
                    Ok(t) => if let Ok(v) = want.as_mut() { v.push(t.gpa) },
                    Err(e) => { want = Err(e); break; }
                }
            }
            match (got, want) {
                (Ok(ranges), Ok(bytes)) => {
                    let flat: Vec<u64> = ranges.iter().flat_map(|r| r.gpa..r.gpa + r.len).collect();
                    prop_assert_eq!(flat, bytes);
                    for w in ranges.windows(2) {
                        prop_assert!(w[0].gpa + w[0].len != w[1].gpa);
                    }
                }
                (Err(g), Err(w)) => prop_assert_eq!(g, w),
                (g, w) => prop_assert!(false, "got {:?}, want {:?}", g, w),
            }
        }
    }

    proptest! {
        /// Any paging registers, any table contents (tables anywhere, also
        /// outside RAM), any linear address: the walkers never panic, keep
        /// the page offset, report the faulting address as CR2, fault with
        /// #GP only in IA-32e mode, and `translate_with` leaves memory
        /// untouched when it faults.
        #[test]
        fn test_walk_hostile_state_never_panics(
            cr0 in prop_oneof![any::<u64>(), Just(CR0_PG | 1), Just(CR0_PG | CR0_WP | 1)],
            cr3 in prop_oneof![any::<u64>(), 0u64..0x10000],
            cr4 in any::<u64>(),
            efer in prop_oneof![any::<u64>(), Just(EFER_LMA), Just(EFER_LMA | EFER_NXE)],
            rflags in any::<u64>(),
            cpl in 0u8..4,
            maxphyaddr in 0u8..70,
            la in any::<u64>(),
            len in 0u64..0x3000,
            words in proptest::collection::vec((0u64..0x2000, any::<u64>()), 0..64),
            kind in prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Fetch)],
        ) {
            let mut mem = FlatMemory::new(0x10000);
            for (slot, w) in words {
                mem.write_u64(slot * 8, w).unwrap();
            }
            let st = PagingState {
                cr0,
                cr3,
                cr4,
                efer,
                rflags,
                cpl,
                maxphyaddr,
                page_1g: la & 1 == 0,
            };
            let access = Access::new(kind);
            match translate(&st, la, access, &mem) {
                Ok(t) => prop_assert_eq!(t.gpa & 0xfff, la & 0xfff),
                Err(PagingFault::PageFault { linear, .. }) => {
                    let ia32e = st.mode() == PagingMode::Level4 || st.mode() == PagingMode::Level5;
                    prop_assert!(linear == la || (!ia32e && linear == la & 0xffff_ffff));
                }
                Err(PagingFault::GeneralProtection { .. }) => {
                    prop_assert!(matches!(st.mode(), PagingMode::Level4 | PagingMode::Level5));
                }
            }
            let before = mem.clone();
            let r = translate_with(&st, la, access, &mut mem, WalkOptions { set_accessed_dirty: true });
            if r.is_err() {
                prop_assert!(mem == before);
            }
            let _ = translate_range(&st, la, len, access, &mem);
        }
    }
}
