//! L2's guest-physical address space as KVM memslots built from L1's EPT.
//!
//! L0 has no EPT of its own to give L2 (KVM on this host offers no nested
//! paging to userspace), so L1's EPT is turned into memslots of the L2 VM:
//! every maximal run of contiguous L2-physical pages that L1's EPT maps to
//! contiguous L1-physical pages with the same rights
//! (`nested_exit::ept::ept_mappings`) becomes one memslot backed by the same
//! host memory at the L1-physical offset. Runs without write permission
//! become read-only slots (`KVM_MEM_READONLY`: reads run natively, writes
//! exit as MMIO). Pages without read permission (execute-only) get no slot:
//! every access to them exits and is decided by `Ept::walk`.
//!
//! KVM cannot express "no execute" in a memslot: a readable page L1 maps
//! without X is still executable by L2 (a documented deviation; fetches
//! from unmapped pages still exit).
//!
//! Memslot budget: at most [`MAX_EPT_SLOTS`] slots (KVM offers 32764 on this
//! host). An EPT that needs more runs than that (a very fragmented one)
//! makes [`EptSlots::sync`] fail with [`EptSlotError::TooManySlots`] before
//! any slot is touched; the run then ends with that message.
//!
//! Slot changes are diffed: a window that is already installed keeps its
//! slot, so a rebuild after INVEPT that finds the same mappings costs no
//! ioctl. Removals go first (KVM refuses overlapping slots).

use std::collections::BTreeMap;

use nested_exit::ept::{ept_mappings, Ept, EptLookup, EptMapError, EptMapLimit, EptPerms, EptRun};
use vmcs12::mem::OutOfRange;
use vmcs12::GuestPhysMemory;

use crate::kvm::{KvmVm, MemSlot};
use crate::nested::BoxError;

/// Most memslots the L2 VM may use for an EPT (far below KVM's 32764).
pub const MAX_EPT_SLOTS: usize = 256;

/// Page size of a memslot's granularity.
const PAGE: u64 = 0x1000;

/// What installs memslots in the L2 VM (KVM, or a recorder in tests).
pub trait SlotBackend {
    /// Adds a memslot (`KVM_SET_USER_MEMORY_REGION`).
    fn set_slot(&mut self, slot: MemSlot) -> Result<(), BoxError>;
    /// Deletes a memslot.
    fn remove_slot(&mut self, slot: u32) -> Result<(), BoxError>;
}

impl SlotBackend for KvmVm {
    fn set_slot(&mut self, slot: MemSlot) -> Result<(), BoxError> {
        self.set_memslot(slot).map_err(|e| Box::new(e) as BoxError)
    }

    fn remove_slot(&mut self, slot: u32) -> Result<(), BoxError> {
        self.remove_memslot(slot)
            .map_err(|e| Box::new(e) as BoxError)
    }
}

/// Which address space the L2 VM's slots represent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// No EPT in vmcs12: L2-physical = L1-physical (one slot over all RAM).
    Identity,
    /// L1's EPT with this EPTP (vmcs12 EPT_POINTER).
    Ept {
        /// The raw EPTP.
        eptp: u64,
    },
}

/// One memslot's window: L2-physical `gpa` .. + `size` backed by guest RAM
/// at `ram_offset` (the L1-physical address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotWindow {
    /// L2-physical start.
    pub gpa: u64,
    /// L1-physical start (offset in guest RAM).
    pub ram_offset: u64,
    /// Bytes (page multiple).
    pub size: u64,
    /// Writes exit as MMIO.
    pub read_only: bool,
}

impl SlotWindow {
    /// Whether `gpa` lies in the window.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }
}

/// The identity window over all of RAM.
pub fn identity_windows(ram_size: u64) -> Vec<SlotWindow> {
    vec![SlotWindow {
        gpa: 0,
        ram_offset: 0,
        size: ram_size & !(PAGE - 1),
        read_only: false,
    }]
}

/// The windows for EPT runs: each run clipped to guest RAM (L1-physical
/// addresses past RAM have nothing behind them: accesses there exit and
/// are answered like unbacked memory), read-only without W, no window
/// without R, and no window without X (a memslot cannot forbid execution:
/// data accesses there exit and L0 completes them, fetches exit and are
/// EPT violations) except for the `forced` L2-physical pages (pages KVM's
/// own page walker must read: L2's page tables). Adjacent windows that
/// continue each other are merged.
pub fn ept_windows(
    runs: &[EptRun],
    ram_size: u64,
    forced: &std::collections::BTreeSet<u64>,
) -> Vec<SlotWindow> {
    let mut pieces: Vec<(u64, u64, u64, EptPerms)> = Vec::new();
    for r in runs {
        if !r.perms.contains(EptPerms::READ) {
            continue;
        }
        if r.perms.contains(EptPerms::EXECUTE) {
            pieces.push((r.gpa, r.hpa, r.len, r.perms));
            continue;
        }
        let end = r.gpa.saturating_add(r.len);
        for &page in forced.range(r.gpa..end) {
            pieces.push((page, r.hpa + (page - r.gpa), PAGE, r.perms));
        }
    }
    let mut out: Vec<SlotWindow> = Vec::new();
    for (gpa, hpa, len, perms) in pieces {
        let start = hpa;
        let end = hpa.saturating_add(len).min(ram_size & !(PAGE - 1));
        if start >= end {
            continue;
        }
        let w = SlotWindow {
            gpa,
            ram_offset: start,
            size: end - start,
            read_only: !perms.contains(EptPerms::WRITE),
        };
        if let Some(last) = out.last_mut() {
            if last.read_only == w.read_only
                && last.gpa.checked_add(last.size) == Some(w.gpa)
                && last.ram_offset.checked_add(last.size) == Some(w.ram_offset)
            {
                last.size += w.size;
                continue;
            }
        }
        out.push(w);
    }
    out
}

/// Why the L2 VM's slots could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EptSlotError {
    /// The EPT needs more memslots than L0 allows.
    #[error("L1's EPT maps L2 memory in {needed} separate runs, more than the {cap} memslots L0 uses for an L2 (KVM_CAP_NR_MEMSLOTS is 32764): map L2 memory with fewer, larger contiguous runs (see docs/architecture.md, nested EPT)")]
    TooManySlots {
        /// Windows the EPT needs.
        needed: usize,
        /// [`MAX_EPT_SLOTS`] (or the configured cap).
        cap: usize,
    },
    /// The EPT could not be enumerated within the work bound.
    #[error("enumerating L1's EPT failed: {0}")]
    Enumerate(#[from] EptMapError),
    /// KVM refused a slot change.
    #[error("changing L2 memslot {slot} failed: {source}")]
    Backend {
        /// Slot number.
        slot: u32,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

/// Slot bookkeeping counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Syncs that walked L1's EPT (or rebuilt the identity slot).
    pub builds: u64,
    /// Slots added (one ioctl each).
    pub slots_set: u64,
    /// Slots deleted (one ioctl each).
    pub slots_removed: u64,
    /// Windows found already installed and kept.
    pub slots_kept: u64,
    /// Rebuilds caused by an L2 access to a page L1 maps but L0 did not.
    pub on_demand_rebuilds: u64,
    /// Rebuilds after INVEPT.
    pub invept_rebuilds: u64,
}

/// What one sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotChange {
    /// Slots added.
    pub set: usize,
    /// Slots deleted.
    pub removed: usize,
    /// Slots kept.
    pub kept: usize,
}

/// The L2 VM's memslots and the mapping they stand for.
pub struct EptSlots {
    backend: Box<dyn SlotBackend>,
    ram_size: u64,
    slots: BTreeMap<u32, SlotWindow>,
    mapping: Option<L2Mapping>,
    stale: bool,
    /// An INVEPT is behind `stale` (for the counter).
    invept: bool,
    cap: usize,
    stats: SlotStats,
    /// L2-physical pages mapped even without X (L2 page tables).
    forced: std::collections::BTreeSet<u64>,
}

impl std::fmt::Debug for EptSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EptSlots")
            .field("mapping", &self.mapping)
            .field("slots", &self.slots)
            .field("stale", &self.stale)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl EptSlots {
    /// Slots over `backend`, which already holds `existing` (for a new L2
    /// VM: slot 0, the identity window over `ram_size` bytes of RAM).
    pub fn new(
        backend: Box<dyn SlotBackend>,
        ram_size: u64,
        existing: impl IntoIterator<Item = MemSlot>,
    ) -> Self {
        let slots: BTreeMap<u32, SlotWindow> = existing
            .into_iter()
            .map(|s| {
                (
                    s.slot,
                    SlotWindow {
                        gpa: s.gpa,
                        ram_offset: s.ram_offset,
                        size: s.size,
                        read_only: s.read_only,
                    },
                )
            })
            .collect();
        let mapping = (slots.values().copied().collect::<Vec<_>>() == identity_windows(ram_size))
            .then_some(L2Mapping::Identity);
        Self {
            backend,
            ram_size,
            slots,
            mapping,
            stale: false,
            invept: false,
            cap: MAX_EPT_SLOTS,
            stats: SlotStats::default(),
            forced: Default::default(),
        }
    }

    /// Maps the L2-physical page of `gpa` whenever L1's EPT lets L2 read
    /// it, even without X (KVM's page walker needs it: an L2 page table).
    /// Takes effect at the next sync.
    pub fn force_page(&mut self, gpa: u64) {
        if self.forced.insert(gpa & !(PAGE - 1)) {
            self.stale = true;
        }
    }

    /// Slots of a KVM VM (takes it over: the VM lives as long as its slots).
    pub fn from_kvm_vm(vm: KvmVm) -> Self {
        let ram_size = vm.ram().size();
        let existing: Vec<MemSlot> = vm.memslots().copied().collect();
        Self::new(Box::new(vm), ram_size, existing)
    }

    /// Lowers (or raises) the slot cap (tests; default [`MAX_EPT_SLOTS`]).
    pub fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }

    /// The mapping the slots stand for, if they are in sync with one.
    pub fn mapping(&self) -> Option<L2Mapping> {
        self.mapping
    }

    /// Installed windows by slot number.
    pub fn windows(&self) -> impl Iterator<Item = (u32, &SlotWindow)> {
        self.slots.iter().map(|(&n, w)| (n, w))
    }

    /// The window holding L2-physical `gpa`, if any.
    pub fn window_at(&self, gpa: u64) -> Option<SlotWindow> {
        self.slots.values().copied().find(|w| w.contains(gpa))
    }

    /// Counters.
    pub fn stats(&self) -> SlotStats {
        self.stats
    }

    /// Guest RAM size.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// L1 invalidated EPT-derived translations (INVEPT): the next
    /// [`EptSlots::sync`] walks L1's EPT again even if the EPTP is the same.
    pub fn invalidate(&mut self) {
        if matches!(self.mapping, Some(L2Mapping::Ept { .. })) {
            self.stale = true;
            self.invept = true;
        }
    }

    /// Whether the next sync for an EPT mapping will walk the EPT.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Makes the slots represent `mapping`: nothing to do when they already
    /// do (same EPTP, no INVEPT since); otherwise L1's EPT is enumerated in
    /// `mem` (L1's RAM) and the difference applied.
    pub fn sync(
        &mut self,
        mapping: L2Mapping,
        ept: Option<&Ept>,
        mem: &dyn GuestPhysMemory,
        max_gpa: u64,
    ) -> Result<Option<SlotChange>, EptSlotError> {
        if self.mapping == Some(mapping) && !self.stale {
            return Ok(None);
        }
        let invept = self.invept && self.mapping == Some(mapping);
        let windows = match (mapping, ept) {
            (L2Mapping::Ept { .. }, Some(ept)) => {
                let runs = ept_mappings(mem, ept, EptMapLimit::new(max_gpa))?;
                ept_windows(&runs, self.ram_size, &self.forced)
            }
            _ => identity_windows(self.ram_size),
        };
        let change = self.apply(windows)?;
        if invept {
            self.stats.invept_rebuilds += 1;
        }
        self.mapping = Some(mapping);
        self.stale = false;
        self.invept = false;
        Ok(Some(change))
    }

    /// Walks the EPT again now (an L2 access found a page L1 maps but the
    /// slots do not).
    pub fn rebuild_on_demand(
        &mut self,
        mapping: L2Mapping,
        ept: &Ept,
        mem: &dyn GuestPhysMemory,
        max_gpa: u64,
    ) -> Result<SlotChange, EptSlotError> {
        self.stale = true;
        self.mapping = None;
        let change = self
            .sync(mapping, Some(ept), mem, max_gpa)?
            .unwrap_or_default();
        self.stats.on_demand_rebuilds += 1;
        Ok(change)
    }

    /// Installs exactly `windows`: windows already present keep their slot,
    /// the others are deleted first and the new ones added after.
    pub fn apply(&mut self, windows: Vec<SlotWindow>) -> Result<SlotChange, EptSlotError> {
        if windows.len() > self.cap {
            return Err(EptSlotError::TooManySlots {
                needed: windows.len(),
                cap: self.cap,
            });
        }
        self.stats.builds += 1;
        // Any failure below leaves the slots unknown: the next sync redoes them.
        self.mapping = None;
        let want: std::collections::BTreeSet<SlotWindow> = windows.iter().copied().collect();
        let remove: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, w)| !want.contains(w))
            .map(|(&n, _)| n)
            .collect();
        let mut change = SlotChange::default();
        for n in remove {
            self.backend
                .remove_slot(n)
                .map_err(|source| EptSlotError::Backend { slot: n, source })?;
            self.slots.remove(&n);
            self.stats.slots_removed += 1;
            change.removed += 1;
        }
        let have: std::collections::BTreeSet<SlotWindow> = self.slots.values().copied().collect();
        change.kept = have.len();
        self.stats.slots_kept += have.len() as u64;
        let mut next = 0u32;
        for w in want.into_iter().filter(|w| !have.contains(w)) {
            while self.slots.contains_key(&next) {
                next += 1;
            }
            let slot = MemSlot {
                slot: next,
                gpa: w.gpa,
                ram_offset: w.ram_offset,
                size: w.size,
                read_only: w.read_only,
            };
            self.backend
                .set_slot(slot)
                .map_err(|source| EptSlotError::Backend { slot: next, source })?;
            self.slots.insert(next, w);
            self.stats.slots_set += 1;
            change.set += 1;
        }
        Ok(change)
    }
}

/// L2's physical memory seen through L1's EPT (or L1's RAM itself without
/// EPT): what L0 reads when it decodes L2's code or walks L2's page tables.
/// Reads need R or X in the EPT, writes need W; anything else, or RAM
/// missing behind the translation, is an [`OutOfRange`].
pub struct L2PhysView<'a> {
    /// L1's RAM.
    pub mem: &'a mut dyn GuestPhysMemory,
    /// L1's EPT, if vmcs12 enables it.
    pub ept: Option<Ept>,
}

impl L2PhysView<'_> {
    /// The L1-physical address of L2-physical `gpa` for this access.
    fn translate(&self, gpa: u64, write: bool) -> Option<u64> {
        let Some(ept) = &self.ept else {
            return Some(gpa);
        };
        match ept.lookup(&*self.mem, gpa) {
            EptLookup::Leaf { hpa, perms, .. } => {
                let ok = if write {
                    perms.contains(EptPerms::WRITE)
                } else {
                    perms.intersects(EptPerms::READ | EptPerms::EXECUTE)
                };
                ok.then_some(hpa)
            }
            EptLookup::NotPresent | EptLookup::Misconfig(_) => None,
        }
    }

    /// Page-sized pieces `(gpa, offset in buf, len)` of an access.
    fn pieces(gpa: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
        let mut off = 0usize;
        std::iter::from_fn(move || {
            if off >= len {
                return None;
            }
            let a = gpa.wrapping_add(off as u64);
            let room = (PAGE - (a & (PAGE - 1))) as usize;
            let n = room.min(len - off);
            let piece = (a, off, n);
            off += n;
            Some(piece)
        })
    }
}

impl GuestPhysMemory for L2PhysView<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: buf.len(),
        };
        for (a, off, n) in Self::pieces(gpa, buf.len()) {
            let hpa = self.translate(a, false).ok_or(err)?;
            let part = buf.get_mut(off..off + n).ok_or(err)?;
            self.mem.read(hpa, part).map_err(|_| err)?;
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: buf.len(),
        };
        // Translate every piece before writing any byte.
        let mut targets = Vec::new();
        for (a, off, n) in Self::pieces(gpa, buf.len()) {
            targets.push((self.translate(a, true).ok_or(err)?, off, n));
        }
        for (hpa, off, n) in targets {
            let part = buf.get(off..off + n).ok_or(err)?;
            self.mem.write(hpa, part).map_err(|_| err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nested_exit::ept::EptConfig;
    use std::cell::RefCell;
    use std::rc::Rc;
    use vmcs12::FlatMemory;

    /// Records every slot ioctl.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder(pub(crate) Rc<RefCell<Vec<String>>>);

    impl SlotBackend for Recorder {
        fn set_slot(&mut self, s: MemSlot) -> Result<(), BoxError> {
            self.0.borrow_mut().push(format!(
                "set {} {:#x}+{:#x}->{:#x}{}",
                s.slot,
                s.gpa,
                s.size,
                s.ram_offset,
                if s.read_only { " ro" } else { "" }
            ));
            Ok(())
        }
        fn remove_slot(&mut self, slot: u32) -> Result<(), BoxError> {
            self.0.borrow_mut().push(format!("remove {slot}"));
            Ok(())
        }
    }

    const RAM: u64 = 0x40_0000;
    const EPT_PML4: u64 = 0x10_0000;

    fn identity_slot() -> MemSlot {
        MemSlot {
            slot: 0,
            gpa: 0,
            ram_offset: 0,
            size: RAM,
            read_only: false,
        }
    }

    fn slots(rec: &Recorder) -> EptSlots {
        EptSlots::new(Box::new(rec.clone()), RAM, [identity_slot()])
    }

    /// An EPT at EPT_PML4 with 4 KiB pages: `maps` = (gpa, hpa, rwx bits).
    fn ept_mem(maps: &[(u64, u64, u64)]) -> (FlatMemory, Ept) {
        let mut m = FlatMemory::new(RAM as usize);
        let pdpt = EPT_PML4 + 0x1000;
        let pd = EPT_PML4 + 0x2000;
        let pt = EPT_PML4 + 0x3000;
        m.write_u64(EPT_PML4, pdpt | 7).unwrap();
        m.write_u64(pdpt, pd | 7).unwrap();
        m.write_u64(pd, pt | 7).unwrap();
        for &(gpa, hpa, rwx) in maps {
            assert!(gpa < 0x20_0000);
            m.write_u64(pt + (gpa >> 12) * 8, hpa | rwx | (6 << 3))
                .unwrap();
        }
        let ept = Ept::new(EPT_PML4 | 0x1e, EptConfig::default()).unwrap();
        (m, ept)
    }

    fn runs(gpa: u64, hpa: u64, pages: u64, perms: EptPerms) -> EptRun {
        EptRun {
            gpa,
            hpa,
            len: pages * PAGE,
            perms,
        }
    }

    #[test]
    fn test_windows_follow_rights_and_ram() {
        let rwx = EptPerms::all();
        let r = EptPerms::READ;
        let x = EptPerms::EXECUTE;
        let w = ept_windows(
            &[
                runs(0, 0x1000, 2, rwx),
                runs(0x2000, 0x3000, 1, rwx), // continues gpa and hpa: merged
                runs(0x3000, 0x8000, 1, r | x), // read-only
                runs(0x4000, 0x9000, 1, x),   // execute-only: no slot
                runs(0x6000, 0xa000, 2, r),   // not executable: no slot
                runs(0x5000, RAM - 0x1000, 3, rwx), // clipped to RAM
                runs(0x9000, RAM + 0x1000, 1, rwx), // beyond RAM: none
            ],
            RAM,
            &Default::default(),
        );
        assert_eq!(
            w,
            vec![
                SlotWindow {
                    gpa: 0,
                    ram_offset: 0x1000,
                    size: 0x3000,
                    read_only: false
                },
                SlotWindow {
                    gpa: 0x3000,
                    ram_offset: 0x8000,
                    size: 0x1000,
                    read_only: true
                },
                SlotWindow {
                    gpa: 0x5000,
                    ram_offset: RAM - 0x1000,
                    size: 0x1000,
                    read_only: false
                },
            ]
        );
        // Adjacent in gpa but not in hpa: two windows.
        let w = ept_windows(
            &[runs(0, 0, 1, rwx), runs(0x1000, 0x5000, 1, rwx)],
            RAM,
            &Default::default(),
        );
        assert_eq!(w.len(), 2);
        // A forced page of a non-executable run gets its own window.
        let forced = [0x7000u64].into_iter().collect();
        let w = ept_windows(
            &[runs(0x6000, 0xa000, 3, r | EptPerms::WRITE)],
            RAM,
            &forced,
        );
        assert_eq!(
            w,
            vec![SlotWindow {
                gpa: 0x7000,
                ram_offset: 0xb000,
                size: 0x1000,
                read_only: false
            }]
        );
    }

    #[test]
    fn test_sync_builds_slots_from_ept_and_reuses_them() {
        let rec = Recorder::default();
        let mut s = slots(&rec);
        assert_eq!(s.mapping(), Some(L2Mapping::Identity));
        // Identity again: nothing to do.
        let (mem, ept) = ept_mem(&[
            (0, 0x20_0000, 7),
            (0x1000, 0x20_1000, 7),
            (0x5000, 0x30_0000, 5),
        ]);
        assert_eq!(
            s.sync(L2Mapping::Identity, None, &mem, 1 << 39).unwrap(),
            None
        );
        assert!(rec.0.borrow().is_empty());
        let m = L2Mapping::Ept {
            eptp: EPT_PML4 | 0x1e,
        };
        let c = s.sync(m, Some(&ept), &mem, 1 << 39).unwrap().unwrap();
        assert_eq!((c.set, c.removed, c.kept), (2, 1, 0));
        assert_eq!(
            *rec.0.borrow(),
            vec![
                "remove 0",
                "set 0 0x0+0x2000->0x200000",
                "set 1 0x5000+0x1000->0x300000 ro"
            ]
        );
        assert_eq!(s.window_at(0x1fff).unwrap().ram_offset, 0x20_0000);
        assert!(s.window_at(0x2000).is_none());
        // Same EPTP, no INVEPT: no walk, no ioctl.
        rec.0.borrow_mut().clear();
        assert_eq!(s.sync(m, Some(&ept), &mem, 1 << 39).unwrap(), None);
        // INVEPT with unchanged tables: a walk but no ioctl.
        s.invalidate();
        let c = s.sync(m, Some(&ept), &mem, 1 << 39).unwrap().unwrap();
        assert_eq!((c.set, c.removed, c.kept), (0, 0, 2));
        assert!(rec.0.borrow().is_empty());
        assert_eq!(s.stats().invept_rebuilds, 1);
        // Back to no EPT: the identity slot returns.
        let c = s
            .sync(L2Mapping::Identity, None, &mem, 1 << 39)
            .unwrap()
            .unwrap();
        assert_eq!((c.set, c.removed), (1, 2));
        assert_eq!(s.windows().count(), 1);
    }

    #[test]
    fn test_invept_rebuild_drops_unmapped_and_changed_pages() {
        let rec = Recorder::default();
        let mut s = slots(&rec);
        let (mut mem, ept) = ept_mem(&[
            (0, 0x20_0000, 7),
            (0x1000, 0x20_1000, 7),
            (0x2000, 0x20_2000, 7),
        ]);
        let m = L2Mapping::Ept {
            eptp: EPT_PML4 | 0x1e,
        };
        s.sync(m, Some(&ept), &mem, 1 << 39).unwrap();
        assert_eq!(s.windows().count(), 1);
        // L1 unmaps the middle page and makes the last one read-only.
        let pt = EPT_PML4 + 0x3000;
        mem.write_u64(pt + 8, 0).unwrap();
        mem.write_u64(pt + 16, 0x20_2000 | 5 | (6 << 3)).unwrap();
        // Without INVEPT the slots stay (stale translations are allowed).
        assert_eq!(s.sync(m, Some(&ept), &mem, 1 << 39).unwrap(), None);
        s.invalidate();
        rec.0.borrow_mut().clear();
        s.sync(m, Some(&ept), &mem, 1 << 39).unwrap();
        assert_eq!(
            *rec.0.borrow(),
            vec![
                "remove 0",
                "set 0 0x0+0x1000->0x200000",
                "set 1 0x2000+0x1000->0x202000 ro"
            ]
        );
        assert!(s.window_at(0x1000).is_none());
    }

    #[test]
    fn test_fragmented_ept_hits_the_cap_without_touching_slots() {
        let rec = Recorder::default();
        let mut s = slots(&rec).with_cap(8);
        // Every other page mapped: 16 separate runs.
        let maps: Vec<_> = (0..16u64)
            .map(|i| (i * 0x2000, 0x20_0000 + i * 0x2000, 7))
            .collect();
        let (mem, ept) = ept_mem(&maps);
        let m = L2Mapping::Ept {
            eptp: EPT_PML4 | 0x1e,
        };
        let e = s.sync(m, Some(&ept), &mem, 1 << 39).unwrap_err();
        assert!(
            matches!(e, EptSlotError::TooManySlots { needed: 16, cap: 8 }),
            "{e}"
        );
        assert!(e.to_string().contains("docs/architecture.md"));
        assert!(rec.0.borrow().is_empty());
        // The same EPT with contiguous backing coalesces into one slot.
        let maps: Vec<_> = (0..16u64)
            .map(|i| (i * 0x1000, 0x20_0000 + i * 0x1000, 7))
            .collect();
        let (mem, ept) = ept_mem(&maps);
        let c = s.sync(m, Some(&ept), &mem, 1 << 39).unwrap().unwrap();
        assert_eq!(c.set, 1);
    }

    #[test]
    fn test_on_demand_rebuild_adds_the_new_page() {
        let rec = Recorder::default();
        let mut s = slots(&rec);
        let (mut mem, ept) = ept_mem(&[(0, 0x20_0000, 7)]);
        let m = L2Mapping::Ept {
            eptp: EPT_PML4 | 0x1e,
        };
        s.sync(m, Some(&ept), &mem, 1 << 39).unwrap();
        mem.write_u64(EPT_PML4 + 0x3000 + 8 * 8, 0x20_8000 | 7 | (6 << 3))
            .unwrap();
        let c = s.rebuild_on_demand(m, &ept, &mem, 1 << 39).unwrap();
        assert_eq!((c.set, c.removed, c.kept), (1, 0, 1));
        assert_eq!(s.window_at(0x8000).unwrap().ram_offset, 0x20_8000);
        assert_eq!(s.stats().on_demand_rebuilds, 1);
    }

    #[test]
    fn test_l2_view_translates_and_checks_rights() {
        let (mut mem, ept) = ept_mem(&[(0x1000, 0x20_0000, 7), (0x2000, 0x30_0000, 1)]);
        mem.write(0x20_0ffe, &[1, 2]).unwrap();
        mem.write(0x30_0000, &[3, 4]).unwrap();
        let mut v = L2PhysView {
            mem: &mut mem,
            ept: Some(ept),
        };
        let mut b = [0u8; 4];
        v.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4], "a read across two EPT pages");
        assert!(v.read(0x3000, &mut b).is_err(), "unmapped");
        assert!(v.write(0x2000, &[9]).is_err(), "read-only");
        assert!(v.write(0x1fff, &[9, 9]).is_err(), "half read-only");
        assert_eq!(
            v.mem.read_u32(0x20_0ffc).unwrap() >> 16,
            0x0201,
            "nothing written"
        );
        v.write(0x1000, &[7]).unwrap();
        assert_eq!(mem.bytes[0x20_0000], 7);
    }
}
