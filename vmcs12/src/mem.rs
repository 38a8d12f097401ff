//! Access to guest-physical memory, as the pure crates see it.
//!
//! The L0 implements this over the guest RAM mapping; tests implement it
//! over a `Vec<u8>`. Every access is bounds-checked by the implementor: an
//! address outside guest RAM is an error, never a host access.

/// An access fell outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest-physical access of {len} bytes at {gpa:#x} is outside guest RAM")]
pub struct OutOfRange {
    /// Start of the access.
    pub gpa: u64,
    /// Length of the access.
    pub len: usize,
}

/// Guest-physical memory of the L1 guest.
pub trait GuestPhysMemory {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange>;
    /// Writes `buf` at `gpa`.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange>;

    /// Reads a little-endian u64.
    fn read_u64(&self, gpa: u64) -> Result<u64, OutOfRange> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32.
    fn read_u32(&self, gpa: u64) -> Result<u32, OutOfRange> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), OutOfRange> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Writes a little-endian u32.
    fn write_u32(&mut self, gpa: u64, v: u32) -> Result<(), OutOfRange> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// A flat guest RAM starting at guest-physical 0, for tests and tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatMemory {
    /// The bytes; guest-physical address = index.
    pub bytes: Vec<u8>,
}

impl FlatMemory {
    /// `size` bytes of zeroed RAM.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: vec![0; size],
        }
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, OutOfRange> {
        let err = OutOfRange { gpa, len };
        let start = usize::try_from(gpa).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl GuestPhysMemory for FlatMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        let r = self.range(gpa, buf.len())?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_flat_memory_rejects_out_of_range() {
        let mut m = FlatMemory::new(0x1000);
        assert!(m.write_u64(0xff8, 7).is_ok());
        assert_eq!(m.read_u64(0xff8), Ok(7));
        assert!(m.read_u64(0xffc).is_err());
        assert!(m.read_u64(u64::MAX - 3).is_err());
    }
}
