//! Guest RAM: one anonymous shared host mapping at guest-physical 0.
//!
//! Both KVM VMs (L1's and L2's) register memslots that point into this
//! one mapping, so a write by either guest (or by L0 through
//! [`GuestRam::write_bytes`]) is seen by all of them. The mapping is a
//! vm-memory [`GuestMemoryMmap`] with a single region at GPA 0: vm-memory
//! owns the mmap/munmap and copies with volatile accesses (the guests write
//! the same memory behind L0's back), so this file has no `unsafe`. Every
//! access from L0 is bounds-checked here first: an address outside guest
//! RAM is an [`OutOfRange`] error, never a host access.

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmcs12::{GuestPhysMemory, OutOfRange};

/// Size of one page.
pub const PAGE_SIZE: u64 = 0x1000;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a multiple of 2 MiB.
    #[error(
        "guest RAM size {0:#x} must be a non-zero multiple of 2 MiB; pass --mem in MiB (e.g. 128)"
    )]
    BadSize(u64),
    /// mmap failed.
    #[error("could not map {size:#x} bytes of guest RAM: {reason}; lower --mem or check the memory limits")]
    Mmap {
        /// Requested size.
        size: u64,
        /// What vm-memory reported.
        reason: String,
    },
}

/// Guest RAM mapped once in L0's address space.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest RAM (MAP_SHARED, so KVM memslots
    /// of several VMs alias it; MAP_NORESERVE, so untouched RAM costs
    /// nothing).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mmap_err = |reason: String| MemoryError::Mmap { size, reason };
        let region = MmapRegion::build(
            None,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|e| mmap_err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| mmap_err("the region overflows the address space".into()))?;
        let mem =
            GuestMemoryMmap::from_regions(vec![region]).map_err(|e| mmap_err(e.to_string()))?;
        Ok(Self { mem, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical 0 (for KVM memslots).
    pub fn host_addr(&self) -> u64 {
        // GPA 0 is inside the one region `new` created.
        self.mem
            .get_host_address(GuestAddress(0))
            .map_or(0, |p| p as u64)
    }

    /// The vm-memory view of guest RAM (one region at GPA 0).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Checks that `[gpa, gpa + len)` lies inside guest RAM and returns
    /// the offset of `gpa`.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<usize, OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        };
        let end = gpa.checked_add(len).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        usize::try_from(gpa).map_err(|_| err)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.check_range(gpa, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write_bytes(&self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        self.check_range(gpa, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), OutOfRange> {
        self.check_range(gpa, len)?;
        let chunk = [byte; PAGE_SIZE as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PAGE_SIZE);
            self.write_bytes(gpa + done, &chunk[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

impl GuestPhysMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.read_bytes(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        self.write_bytes(gpa, buf)
    }
}

/// A `GuestPhysMemory` view through a shared reference (the mapping is
/// shared with the guests anyway), for code that holds `Arc<GuestRam>`.
#[derive(Debug, Clone, Copy)]
pub struct RamView<'a>(pub &'a GuestRam);

impl GuestPhysMemory for RamView<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.0.read_bytes(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        self.0.write_bytes(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_ram_rejects_bad_size() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            GuestRam::new(0x1000),
            Err(MemoryError::BadSize(0x1000))
        ));
        assert!(GuestRam::new(2 << 20).is_ok());
    }

    #[test]
    fn test_ram_read_write_round_trip_and_bounds() {
        let mut ram = GuestRam::new(2 << 20).unwrap();
        ram.write_u64(0x1ff8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.read_u64(0x1ff8), Ok(0x1122_3344_5566_7788));
        let end = ram.size();
        assert!(ram.write_u32(end - 4, 5).is_ok());
        assert_eq!(
            ram.write_u32(end - 3, 5),
            Err(OutOfRange {
                gpa: end - 3,
                len: 4
            })
        );
        assert!(ram.read_u64(u64::MAX - 3).is_err());
        assert!(ram.fill(end - 1, 2, 0).is_err());
        ram.fill(0x100, 4, 0xab).unwrap();
        assert_eq!(ram.read_u32(0x100), Ok(0xabab_abab));
    }

    #[test]
    fn test_ram_view_shares_the_mapping() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut v = RamView(&ram);
        v.write_u32(0x40, 7).unwrap();
        assert_eq!(ram.read_u32(0x40), Ok(7));
    }

    #[test]
    fn test_ram_is_one_shared_mapping_at_host_addr() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let start = ram.host_addr();
        assert!(start != 0 && start.is_multiple_of(PAGE_SIZE));
        // /proc/self/maps: "start-end perms ...", shared mappings show 's'.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                l.split('-')
                    .next()
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    == Some(start)
            })
            .expect("guest RAM mapping listed");
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let end = u64::from_str_radix(range.split('-').nth(1).unwrap(), 16).unwrap();
        assert_eq!(end - start, 4 << 20, "{line}");
        assert_eq!(f.next(), Some("rw-s"), "{line}");
        assert_eq!(ram.guest_memory().num_regions(), 1);
    }

    #[test]
    fn test_ram_fill_spans_pages_and_stops_at_the_range() {
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.fill(0xff0, 0x2020, 0x5a).unwrap();
        let mut buf = vec![0u8; 0x2040];
        ram.read_bytes(0xfe0, &mut buf).unwrap();
        assert!(buf[..0x10].iter().all(|&b| b == 0));
        assert!(buf[0x10..0x2030].iter().all(|&b| b == 0x5a));
        assert!(buf[0x2030..].iter().all(|&b| b == 0));
        assert!(ram.fill(ram.size(), 0, 1).is_ok());
        assert!(ram.fill(ram.size(), 1, 1).is_err());
    }

    proptest! {
        #[test]
        fn test_ram_bounds_match_reference(gpa in 0u64..(4 << 20), len in 0usize..64) {
            let ram = GuestRam::new(2 << 20).unwrap();
            let mut buf = vec![0u8; len];
            let ok = gpa + len as u64 <= ram.size();
            prop_assert_eq!(ram.read_bytes(gpa, &mut buf).is_ok(), ok);
            prop_assert_eq!(ram.write_bytes(gpa, &buf).is_ok(), ok);
        }
    }
}
