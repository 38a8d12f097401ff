//! Extended page tables as L1 builds them for its L2 (SDM Vol. 3, 29.3):
//! EPT entries, the EPT pointer, the misconfiguration rules, an identity
//! EPT with 4 KiB pages whose holes and permissions L1 changes at run
//! time, and the EPT-violation exit qualification (SDM 28.2.1, Table 28-7).

use crate::text::{Emit, Sink};

/// Entry bit 0: read access allowed.
pub const READ: u64 = 1 << 0;
/// Entry bit 1: write access allowed.
pub const WRITE: u64 = 1 << 1;
/// Entry bit 2: instruction fetch allowed.
pub const EXEC: u64 = 1 << 2;
/// Read, write and execute.
pub const RWX: u64 = READ | WRITE | EXEC;
/// Bits 5:3 of a leaf entry and 2:0 of the EPTP: memory type.
pub const MEMTYPE_UC: u64 = 0;
/// Write-back memory type.
pub const MEMTYPE_WB: u64 = 6;
/// Bit 7 of a PDPTE/PDE: the entry maps a 1 GiB / 2 MiB page.
pub const LARGE_PAGE: u64 = 1 << 7;
/// Bits 51:12: the physical address in an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes one page table (512 4 KiB entries) maps.
pub const PT_SPAN: u64 = 512 * PAGE_SIZE;

/// IA32_VMX_EPT_VPID_CAP bit 0: execute-only translations.
pub const CAP_EXEC_ONLY: u64 = 1 << 0;
/// IA32_VMX_EPT_VPID_CAP bit 6: 4-level page walk.
pub const CAP_WALK_4: u64 = 1 << 6;
/// IA32_VMX_EPT_VPID_CAP bit 8: UC paging-structure memory type.
pub const CAP_MEMTYPE_UC: u64 = 1 << 8;
/// IA32_VMX_EPT_VPID_CAP bit 14: WB paging-structure memory type.
pub const CAP_MEMTYPE_WB: u64 = 1 << 14;
/// IA32_VMX_EPT_VPID_CAP bit 25: single-context INVEPT.
pub const CAP_INVEPT_SINGLE: u64 = 1 << 25;
/// IA32_VMX_EPT_VPID_CAP bit 26: all-context INVEPT.
pub const CAP_INVEPT_ALL: u64 = 1 << 26;

/// INVEPT type 1: single-context (descriptor = EPTP, 0).
pub const INVEPT_SINGLE_CONTEXT: u64 = 1;
/// INVEPT type 2: all-context (descriptor ignored).
pub const INVEPT_ALL_CONTEXT: u64 = 2;

/// Why L1 cannot build or change its EPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EptError {
    /// IA32_VMX_EPT_VPID_CAP lacks the 4-level walk (bit 6): this L1
    /// only builds 4-level EPTs, run it on a CPU that offers them.
    NoFourLevelWalk,
    /// IA32_VMX_EPT_VPID_CAP offers neither WB (bit 14) nor UC (bit 8)
    /// for the paging structures; no EPTP is valid.
    NoMemoryType,
    /// The PML4 address is not 4 KiB aligned; place the tables on a page.
    Unaligned(u64),
    /// The guest-physical address lies beyond what the tables map; use an
    /// address below [`EptTables::covered`].
    OutOfRange(u64),
}

impl Emit for EptError {
    fn emit(&self, out: &mut dyn Sink) {
        match self {
            EptError::NoFourLevelWalk => out.put("no 4-level EPT walk in EPT_VPID_CAP"),
            EptError::NoMemoryType => out.put("neither WB nor UC EPT memory type in EPT_VPID_CAP"),
            EptError::Unaligned(a) => {
                out.put("EPT PML4 not page aligned: ");
                crate::text::Hex(*a).emit(out);
            }
            EptError::OutOfRange(a) => {
                out.put("guest-physical address outside the EPT: ");
                crate::text::Hex(*a).emit(out);
            }
        }
    }
}

/// A non-leaf entry pointing at the next table, with all permissions (the
/// leaf decides).
pub const fn table_entry(next_table: u64) -> u64 {
    (next_table & ADDR_MASK) | RWX
}

/// A 4 KiB leaf entry: `perms` (bits 2:0) and memory type WB.
pub const fn leaf_entry(page: u64, perms: u64) -> u64 {
    (page & ADDR_MASK) | (perms & RWX) | (MEMTYPE_WB << 3)
}

/// The EPT pointer for a PML4 at `pml4` (SDM 25.6.11): memory type WB if
/// the CPU offers it (else UC), page-walk length 4 (encoded as 3), no
/// accessed/dirty flags.
pub fn eptp(pml4: u64, ept_vpid_cap: u64) -> Result<u64, EptError> {
    if ept_vpid_cap & CAP_WALK_4 == 0 {
        return Err(EptError::NoFourLevelWalk);
    }
    if pml4 & (PAGE_SIZE - 1) != 0 {
        return Err(EptError::Unaligned(pml4));
    }
    let memtype = if ept_vpid_cap & CAP_MEMTYPE_WB != 0 {
        MEMTYPE_WB
    } else if ept_vpid_cap & CAP_MEMTYPE_UC != 0 {
        MEMTYPE_UC
    } else {
        return Err(EptError::NoMemoryType);
    };
    Ok((pml4 & ADDR_MASK) | (3 << 3) | memtype)
}

/// Whether a present EPT entry is misconfigured (SDM 29.3.3.1): write
/// without read, execute-only without the capability, or (leaf only) a
/// reserved memory type 2, 3 or 7. A not-present entry (bits 2:0 = 0) is
/// never misconfigured: it causes an EPT violation instead.
pub fn misconfigured(entry: u64, leaf: bool, exec_only_supported: bool) -> bool {
    let perms = entry & RWX;
    if perms == 0 {
        return false;
    }
    if perms & WRITE != 0 && perms & READ == 0 {
        return true;
    }
    if perms == EXEC && !exec_only_supported {
        return true;
    }
    leaf && matches!((entry >> 3) & 7, 2 | 3 | 7)
}

/// The table indices of a guest-physical address: PML4, PDPT, PD, PT.
pub fn indices(gpa: u64) -> [usize; 4] {
    [39, 30, 21, 12].map(|shift| ((gpa >> shift) & 0x1ff) as usize)
}

/// What an access through [`EptTables::translate`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Mapped to this physical address with these permissions.
    Mapped {
        /// Host(-side) physical address.
        pa: u64,
        /// Bits 2:0 of the leaf.
        perms: u64,
    },
    /// No present entry on the way (an access gives an EPT violation).
    NotPresent,
    /// A misconfigured entry on the way (an access gives exit 49).
    Misconfigured,
}

/// An identity EPT over `N` page tables (`N * 2 MiB` from address 0) with
/// 4 KiB pages: one PML4, one PDPT, one PD and `N` PTs, laid out in this
/// order so the structure can live in one page-aligned static whose
/// physical address is `base`.
#[repr(C, align(4096))]
#[derive(Debug, Clone)]
pub struct EptTables<const N: usize> {
    /// The PML4.
    pub pml4: [u64; 512],
    /// PML4[0]'s PDPT.
    pub pdpt: [u64; 512],
    /// PDPT[0]'s PD.
    pub pd: [u64; 512],
    /// PD[i]'s page tables.
    pub pt: [[u64; 512]; N],
}

impl<const N: usize> Default for EptTables<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> EptTables<N> {
    /// Empty tables (nothing mapped).
    pub const fn new() -> Self {
        Self {
            pml4: [0; 512],
            pdpt: [0; 512],
            pd: [0; 512],
            pt: [[0; 512]; N],
        }
    }

    /// The first guest-physical address the tables cannot map.
    pub const fn covered() -> u64 {
        N as u64 * PT_SPAN
    }

    /// Physical address of PT `i` when the tables start at `base`.
    pub const fn pt_addr(base: u64, i: usize) -> u64 {
        base + (3 + i as u64) * PAGE_SIZE
    }

    /// Builds the identity map of `[0, covered())` with `perms` on every
    /// page. `base` is the tables' own physical address.
    pub fn build_identity(&mut self, base: u64, perms: u64) -> Result<(), EptError> {
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(EptError::Unaligned(base));
        }
        *self = Self::new();
        self.pml4[0] = table_entry(base + PAGE_SIZE);
        self.pdpt[0] = table_entry(base + 2 * PAGE_SIZE);
        for (i, (pde, pt)) in self.pd.iter_mut().zip(self.pt.iter_mut()).enumerate() {
            *pde = table_entry(Self::pt_addr(base, i));
            for (j, pte) in pt.iter_mut().enumerate() {
                *pte = leaf_entry((i as u64 * 512 + j as u64) * PAGE_SIZE, perms);
            }
        }
        Ok(())
    }

    fn pte_mut(&mut self, gpa: u64) -> Result<&mut u64, EptError> {
        let [_, _, pd, pt] = indices(gpa);
        if gpa >= Self::covered() {
            return Err(EptError::OutOfRange(gpa));
        }
        self.pt
            .get_mut(pd)
            .and_then(|t| t.get_mut(pt))
            .ok_or(EptError::OutOfRange(gpa))
    }

    /// Sets the permissions of the 4 KiB page holding `gpa` (0 = a hole).
    pub fn set_perms(&mut self, gpa: u64, perms: u64) -> Result<(), EptError> {
        let pte = self.pte_mut(gpa)?;
        *pte = leaf_entry(gpa & !(PAGE_SIZE - 1), perms);
        Ok(())
    }

    /// Writes a raw leaf entry for the page holding `gpa` (to build a
    /// deliberately misconfigured one).
    pub fn set_raw(&mut self, gpa: u64, entry: u64) -> Result<(), EptError> {
        *self.pte_mut(gpa)? = entry;
        Ok(())
    }

    /// The leaf entry of the page holding `gpa`.
    pub fn leaf(&self, gpa: u64) -> Option<u64> {
        let [_, _, pd, pt] = indices(gpa);
        if gpa >= Self::covered() {
            return None;
        }
        self.pt.get(pd).and_then(|t| t.get(pt)).copied()
    }

    /// Walks the tables for `gpa` as the CPU would (given that they sit at
    /// `base`): every non-leaf entry must be present, well formed and
    /// point at the next table of this structure.
    pub fn translate(&self, base: u64, gpa: u64, exec_only: bool) -> Translation {
        let [i4, i3, i2, i1] = indices(gpa);
        let steps = [
            (self.pml4.get(i4), base + PAGE_SIZE),
            (self.pdpt.get(i3), base + 2 * PAGE_SIZE),
            (self.pd.get(i2), Self::pt_addr(base, i2)),
        ];
        for (entry, next) in steps {
            let Some(&e) = entry else {
                return Translation::NotPresent;
            };
            if e & RWX == 0 {
                return Translation::NotPresent;
            }
            if misconfigured(e, false, exec_only) || e & LARGE_PAGE != 0 {
                return Translation::Misconfigured;
            }
            if e & ADDR_MASK != next {
                // Points outside this structure: not something it maps.
                return Translation::NotPresent;
            }
        }
        let Some(&leaf) = self.pt.get(i2).and_then(|t| t.get(i1)) else {
            return Translation::NotPresent;
        };
        if leaf & RWX == 0 {
            Translation::NotPresent
        } else if misconfigured(leaf, true, exec_only) {
            Translation::Misconfigured
        } else {
            Translation::Mapped {
                pa: (leaf & ADDR_MASK) | (gpa & (PAGE_SIZE - 1)),
                perms: leaf & RWX,
            }
        }
    }
}

/// An EPT-violation exit qualification (SDM 28.2.1, Table 28-7), the bits
/// this L1 checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EptViolation {
    /// Bit 0: the access was a data read.
    pub read: bool,
    /// Bit 1: the access was a data write.
    pub write: bool,
    /// Bit 2: the access was an instruction fetch.
    pub fetch: bool,
    /// Bit 3: the EPT entry allowed reads (AND over the walk).
    pub readable: bool,
    /// Bit 4: the entry allowed writes.
    pub writable: bool,
    /// Bit 5: the entry allowed execution.
    pub executable: bool,
    /// Bit 7: GUEST_LINEAR_ADDRESS is valid.
    pub gla_valid: bool,
    /// Bit 8 (when bit 7 is set): the access was to the translation of the
    /// linear address, not to a guest paging-structure entry.
    pub gla_translation: bool,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
}

impl EptViolation {
    const BITS: [(u32, &'static str); 9] = [
        (0, "read"),
        (1, "write"),
        (2, "fetch"),
        (3, "R"),
        (4, "W"),
        (5, "X"),
        (7, "gla-valid"),
        (8, "translation"),
        (12, "nmi-unblocking"),
    ];

    fn flags(&self) -> [bool; 9] {
        [
            self.read,
            self.write,
            self.fetch,
            self.readable,
            self.writable,
            self.executable,
            self.gla_valid,
            self.gla_translation,
            self.nmi_unblocking,
        ]
    }

    /// Decodes a qualification (other bits are ignored).
    pub fn decode(qual: u64) -> Self {
        let b = |n: u32| qual & (1 << n) != 0;
        Self {
            read: b(0),
            write: b(1),
            fetch: b(2),
            readable: b(3),
            writable: b(4),
            executable: b(5),
            gla_valid: b(7),
            gla_translation: b(8),
            nmi_unblocking: b(12),
        }
    }

    /// The qualification value with these bits.
    pub fn encode(&self) -> u64 {
        Self::BITS
            .iter()
            .zip(self.flags())
            .filter(|(_, set)| *set)
            .fold(0, |q, ((bit, _), _)| q | (1 << bit))
    }

    /// An access of one kind (`READ`, `WRITE` or `EXEC`) to the final
    /// translation of a linear address whose leaf allows `perms`.
    pub fn data_access(access: u64, perms: u64) -> Self {
        Self {
            read: access & READ != 0,
            write: access & WRITE != 0,
            fetch: access & EXEC != 0,
            readable: perms & READ != 0,
            writable: perms & WRITE != 0,
            executable: perms & EXEC != 0,
            gla_valid: true,
            gla_translation: true,
            nmi_unblocking: false,
        }
    }
}

impl Emit for EptViolation {
    fn emit(&self, out: &mut dyn Sink) {
        let mut first = true;
        for ((_, name), set) in Self::BITS.iter().zip(self.flags()) {
            if set {
                if !first {
                    out.put("|");
                }
                out.put(name);
                first = false;
            }
        }
        if first {
            out.put("none");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::TextBuf;
    use proptest::prelude::*;
    use std::boxed::Box;

    const BASE: u64 = 0x20_0000;

    fn tables() -> Box<EptTables<2>> {
        let mut t = Box::new(EptTables::<2>::new());
        t.build_identity(BASE, RWX).unwrap();
        t
    }

    #[test]
    fn test_entries_and_eptp() {
        assert_eq!(leaf_entry(0x1234_5fff, READ), 0x1234_5000 | 1 | 0x30);
        assert_eq!(table_entry(0x5000), 0x5007);
        // Bochs' corei7_haswell EPT_VPID_CAP: WB, 4-level walk.
        assert_eq!(eptp(0x11_0000, 0xf0106334141), Ok(0x11_001e));
        assert_eq!(eptp(0x11_0000, CAP_WALK_4 | CAP_MEMTYPE_UC), Ok(0x11_0018));
        assert_eq!(
            eptp(0x11_0000, CAP_MEMTYPE_WB),
            Err(EptError::NoFourLevelWalk)
        );
        assert_eq!(eptp(0x11_0000, CAP_WALK_4), Err(EptError::NoMemoryType));
        assert_eq!(
            eptp(0x11_0800, CAP_WALK_4 | CAP_MEMTYPE_WB),
            Err(EptError::Unaligned(0x11_0800))
        );
    }

    #[test]
    fn test_misconfiguration_rules() {
        assert!(misconfigured(WRITE, true, true), "W without R");
        assert!(misconfigured(WRITE | EXEC, false, true));
        assert!(!misconfigured(READ | WRITE, true, false));
        assert!(misconfigured(EXEC, true, false), "X-only without the cap");
        assert!(!misconfigured(EXEC, true, true));
        assert!(!misconfigured(0, true, false), "not present is a violation");
        assert!(misconfigured(READ | (2 << 3), true, false), "memtype 2");
        assert!(misconfigured(READ | (7 << 3), true, false), "memtype 7");
        assert!(!misconfigured(READ | (2 << 3), false, false), "non-leaf");
        assert!(!misconfigured(leaf_entry(0, RWX), true, false));
    }

    #[test]
    fn test_identity_map_and_holes() {
        let mut t = tables();
        assert_eq!(
            t.translate(BASE, 0x12_3456, false),
            Translation::Mapped {
                pa: 0x12_3456,
                perms: RWX
            }
        );
        t.set_perms(0x12_3000, 0).unwrap();
        assert_eq!(t.translate(BASE, 0x12_3456, false), Translation::NotPresent);
        assert_eq!(
            t.translate(BASE, 0x12_4000, false),
            Translation::Mapped {
                pa: 0x12_4000,
                perms: RWX
            }
        );
        t.set_perms(0x12_3fff, READ).unwrap();
        assert_eq!(
            t.translate(BASE, 0x12_3008, false),
            Translation::Mapped {
                pa: 0x12_3008,
                perms: READ
            }
        );
        t.set_raw(0x12_3000, 0x12_3000 | WRITE | 0x30).unwrap();
        assert_eq!(
            t.translate(BASE, 0x12_3000, true),
            Translation::Misconfigured
        );
        assert_eq!(t.leaf(0x12_3000), Some(0x12_3032));
        // Beyond the two page tables (4 MiB).
        assert_eq!(
            t.set_perms(0x40_0000, RWX),
            Err(EptError::OutOfRange(0x40_0000))
        );
        assert_eq!(t.translate(BASE, 0x40_0000, false), Translation::NotPresent);
        assert_eq!(t.leaf(0x40_0000), None);
        assert_eq!(
            t.build_identity(BASE + 8, RWX),
            Err(EptError::Unaligned(BASE + 8))
        );
    }

    #[test]
    fn test_table_addresses() {
        let t = tables();
        assert_eq!(t.pml4[0], (BASE + 0x1000) | 7);
        assert_eq!(t.pdpt[0], (BASE + 0x2000) | 7);
        assert_eq!(t.pd[1], (BASE + 0x4000) | 7);
        assert_eq!(t.pd[2], 0);
        assert_eq!(EptTables::<2>::covered(), 0x40_0000);
        assert_eq!(core::mem::size_of::<EptTables<2>>(), 5 * 4096);
        assert_eq!(indices(0x80_0000_5018), [1, 0, 0, 5]);
    }

    #[test]
    fn test_qualification_bits() {
        // Read of an unmapped page through a linear address.
        let q = EptViolation::data_access(READ, 0);
        assert_eq!(q.encode(), 0x181);
        // Write to a read-only page; fetch from a read/write page.
        assert_eq!(EptViolation::data_access(WRITE, READ).encode(), 0x18a);
        assert_eq!(
            EptViolation::data_access(EXEC, READ | WRITE).encode(),
            0x19c
        );
        let walk = EptViolation {
            read: true,
            gla_valid: true,
            ..Default::default()
        };
        assert_eq!(walk.encode(), 0x81);
        assert!(EptViolation::decode(0x1181).nmi_unblocking);
        assert!(!EptViolation::decode(0x181).write);
        let mut b = TextBuf::<64>::default();
        EptViolation::decode(0x18a).emit(&mut b);
        assert_eq!(b.as_str(), "write|R|gla-valid|translation");
        let mut b = TextBuf::<64>::default();
        EptViolation::decode(0).emit(&mut b);
        assert_eq!(b.as_str(), "none");
    }

    proptest! {
        #[test]
        fn prop_qualification_round_trips(q in any::<u64>()) {
            let known = 0b1_0001_1011_1111u64;
            prop_assert_eq!(EptViolation::decode(q).encode(), q & known);
        }

        #[test]
        fn prop_set_perms_is_what_translate_sees(page in 0u64..1024, perms in 0u64..8, off in 0u64..4096) {
            let mut t = tables();
            let gpa = page * PAGE_SIZE + off;
            t.set_perms(gpa, perms).unwrap();
            let exec_only = false;
            // Reference: the SDM rules written out.
            let want = match perms {
                0 => Translation::NotPresent,
                p if p & WRITE != 0 && p & READ == 0 => Translation::Misconfigured,
                EXEC => Translation::Misconfigured,
                p => Translation::Mapped { pa: gpa, perms: p },
            };
            prop_assert_eq!(t.translate(BASE, gpa, exec_only), want);
            // Neighbours keep their mapping.
            let other = ((page + 1) % 1024) * PAGE_SIZE;
            prop_assert_eq!(t.translate(BASE, other, exec_only), Translation::Mapped { pa: other, perms: RWX });
        }
    }
}
