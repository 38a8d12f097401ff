//! Multiboot v1 structures (Multiboot Specification 0.6.96, sections 3.1
//! and 3.3): the header flags L1 uses and the boot information it reads.

/// Header magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at entry from a Multiboot loader.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flags: page-align modules (0), memory info (1), the a.out-kludge
/// address fields are valid (16).
pub const HEADER_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 16);

/// The checksum field: magic + flags + checksum == 0 (mod 2^32).
pub const fn header_checksum(flags: u32) -> u32 {
    0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)
}

/// Info flag bit 0: mem_lower/mem_upper valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// Info flag bit 2: cmdline valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag bit 6: mmap_length/mmap_addr valid.
pub const INFO_MMAP: u32 = 1 << 6;

/// The fields of the Multiboot information structure L1 uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootInfo {
    /// `flags`.
    pub flags: u32,
    /// `mem_lower` in KiB, if [`INFO_MEMORY`].
    pub mem_lower_kib: Option<u32>,
    /// `mem_upper` in KiB (memory above 1 MiB), if [`INFO_MEMORY`].
    pub mem_upper_kib: Option<u32>,
    /// Physical address of the NUL-terminated command line, if [`INFO_CMDLINE`].
    pub cmdline_addr: Option<u32>,
}

/// Why boot information cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// EAX held something other than [`BOOTLOADER_MAGIC`]: not started by a
    /// Multiboot loader.
    BadMagic(u32),
    /// The structure is shorter than the 20 bytes that hold the fields read.
    Truncated(usize),
}

fn le32(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl BootInfo {
    /// Parses the start of the information structure (`bytes` is what the
    /// loader put at EBX) after checking the magic from EAX.
    pub fn parse(magic: u32, bytes: &[u8]) -> Result<Self, BootInfoError> {
        if magic != BOOTLOADER_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let field = |off| le32(bytes, off).ok_or(BootInfoError::Truncated(bytes.len()));
        let flags = field(0)?;
        let mem = flags & INFO_MEMORY != 0;
        Ok(Self {
            flags,
            mem_lower_kib: if mem { Some(field(4)?) } else { None },
            mem_upper_kib: if mem { Some(field(8)?) } else { None },
            cmdline_addr: if flags & INFO_CMDLINE != 0 {
                Some(field(16)?)
            } else {
                None
            },
        })
    }

    /// Total memory in MiB: 1 MiB plus `mem_upper` (rounded down).
    pub fn memory_mib(&self) -> Option<u32> {
        self.mem_upper_kib.map(|kib| 1 + kib / 1024)
    }
}

/// The command line from the bytes at its address: up to the first NUL,
/// printable ASCII only (anything else ends it).
pub fn cmdline_str(bytes: &[u8]) -> &str {
    let end = bytes
        .iter()
        .position(|&b| !(0x20..=0x7e).contains(&b))
        .unwrap_or(bytes.len());
    core::str::from_utf8(bytes.get(..end).unwrap_or(&[])).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(flags: u32, lower: u32, upper: u32, cmdline: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&flags.to_le_bytes());
        b[4..8].copy_from_slice(&lower.to_le_bytes());
        b[8..12].copy_from_slice(&upper.to_le_bytes());
        b[16..20].copy_from_slice(&cmdline.to_le_bytes());
        b
    }

    #[test]
    fn test_checksum_sums_to_zero() {
        let sum = HEADER_MAGIC
            .wrapping_add(HEADER_FLAGS)
            .wrapping_add(header_checksum(HEADER_FLAGS));
        assert_eq!(sum, 0);
        assert_ne!(header_checksum(HEADER_FLAGS), header_checksum(0));
    }

    #[test]
    fn test_parse_memory_and_cmdline() {
        let b = info(INFO_MEMORY | INFO_CMDLINE, 639, 130_048, 0x9000);
        let i = BootInfo::parse(BOOTLOADER_MAGIC, &b).unwrap();
        assert_eq!(i.mem_lower_kib, Some(639));
        assert_eq!(i.memory_mib(), Some(128));
        assert_eq!(i.cmdline_addr, Some(0x9000));
    }

    #[test]
    fn test_parse_respects_flags() {
        let b = info(0, 639, 1024, 0x9000);
        let i = BootInfo::parse(BOOTLOADER_MAGIC, &b).unwrap();
        assert_eq!((i.mem_upper_kib, i.cmdline_addr), (None, None));
    }

    #[test]
    fn test_parse_rejects_bad_magic_and_short_info() {
        let b = info(INFO_MEMORY, 1, 2, 3);
        assert_eq!(
            BootInfo::parse(0x1234, &b),
            Err(BootInfoError::BadMagic(0x1234))
        );
        assert_eq!(
            BootInfo::parse(BOOTLOADER_MAGIC, &b[..10]),
            Err(BootInfoError::Truncated(10))
        );
        assert_eq!(
            BootInfo::parse(BOOTLOADER_MAGIC, &b[..2]),
            Err(BootInfoError::Truncated(2))
        );
    }

    #[test]
    fn test_cmdline_stops_at_nul() {
        assert_eq!(cmdline_str(b"test=demo\0garbage"), "test=demo");
        assert_eq!(cmdline_str(b"abc"), "abc");
        assert_eq!(cmdline_str(b"a\xffb"), "a");
    }
}
