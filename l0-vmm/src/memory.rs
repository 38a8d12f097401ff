//! Guest RAM: one anonymous shared host mapping at guest-physical 0.
//!
//! Both KVM VMs (L1's and L2's) register memslots that point into this
//! one mapping, so a write by either guest (or by L0 through
//! [`GuestRam::write`]) is seen by all of them. Every access from L0 is
//! bounds-checked: an address outside guest RAM is an error, never a host
//! access. The guests write this memory concurrently with nothing (the
//! vCPUs run on the L0 thread), but L0 still never hands out Rust
//! references into it: all copies go through raw pointers.

use std::ptr::NonNull;

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
    #[error("could not map {size:#x} bytes of guest RAM: {source}; lower --mem or check the memory limits")]
    Mmap {
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
}

/// Guest RAM mapped once in L0's address space.
#[derive(Debug)]
pub struct GuestRam {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; all access goes
// through raw-pointer copies bounded by `size`, so moving or sharing the
// handle between threads cannot create aliasing Rust references.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`; `read`/`write` take `&self` and copy through raw
// pointers (the same way a guest vCPU writes it behind our back).
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest RAM (shared, so KVM memslots of
    /// several VMs alias it).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        // SAFETY: an anonymous mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Mmap {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(MemoryError::Mmap {
            size,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Self { ptr, size: len })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host virtual address of guest-physical 0 (for KVM memslots).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Checks that `[gpa, gpa + len)` lies inside guest RAM and returns
    /// the offset of `gpa`.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<usize, OutOfRange> {
        let err = OutOfRange {
            gpa,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        };
        let end = gpa.checked_add(len).ok_or(err)?;
        if end > self.size as u64 {
            return Err(err);
        }
        usize::try_from(gpa).map_err(|_| err)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let off = self.check_range(gpa, buf.len() as u64)?;
        // SAFETY: `check_range` proved `off + buf.len() <= size`, so the
        // source lies inside the live mapping; `buf` is a distinct host
        // buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write_bytes(&self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        let off = self.check_range(gpa, buf.len() as u64)?;
        // SAFETY: `check_range` proved the destination lies inside the
        // live, writable mapping; `buf` is a distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(off), buf.len())
        };
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), OutOfRange> {
        let off = self.check_range(gpa, len)?;
        // SAFETY: `check_range` proved the range lies inside the mapping,
        // and `len` fits in usize because it is at most `size`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), byte, len as usize) };
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly the mapping created in `new`;
        // VMs keep an `Arc<GuestRam>`, so no memslot outlives it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
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
