//! QEMU's firmware configuration device (fw_cfg), traditional I/O
//! interface: a 16-bit selector register at port 0x510 and a byte-wide
//! data register at port 0x511 (QEMU `docs/specs/fw_cfg.rst`).
//!
//! Writing the selector picks an item and rewinds its read offset; each
//! data read returns the next byte of the item, and 0 past its end or for
//! an item that does not exist. Items: the signature "QEMU" (key 0x00),
//! the interface id (0x01: bit 0, traditional interface; no DMA), the RAM
//! size (0x03, u64 little-endian), the number of CPUs (0x05, u16) and the
//! maximum number of CPUs (0x0f, u16). Data-port writes are ignored (as
//! QEMU does since 2.4); the DMA interface (ports 0x514-0x51b) is not
//! emulated.

use std::collections::BTreeMap;

/// The selector port (16-bit writes).
pub const FW_CFG_PORT_SEL: u16 = 0x510;
/// The data port (byte reads).
pub const FW_CFG_PORT_DATA: u16 = 0x511;

/// Item keys (QEMU `include/standard-headers/linux/qemu_fw_cfg.h`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface id: bit 0 traditional interface, bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// RAM size in bytes, u64 little-endian.
    pub const RAM_SIZE: u16 = 0x03;
    /// Number of CPUs, u16 little-endian.
    pub const NB_CPUS: u16 = 0x05;
    /// Maximum number of CPUs, u16 little-endian.
    pub const MAX_CPUS: u16 = 0x0f;
}

/// Selector bit 14: write channel; bit 15: architecture-specific item.
/// Neither names an item this device has (both read as zeros).
const KEY_WRITE_CHANNEL: u16 = 0x4000;
const KEY_ARCH_LOCAL: u16 = 0x8000;

/// Interface id: traditional I/O interface only.
pub const FW_CFG_ID_TRADITIONAL: u32 = 1;

/// The device: items by key, the selected key and the read offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// A device describing a machine with `ram_size` bytes of RAM and
    /// `cpus` CPUs.
    pub fn new(ram_size: u64, cpus: u16) -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        items.insert(key::ID, FW_CFG_ID_TRADITIONAL.to_le_bytes().to_vec());
        items.insert(key::RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(key::NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(key::MAX_CPUS, cpus.to_le_bytes().to_vec());
        Self {
            items,
            selected: key::SIGNATURE,
            offset: 0,
        }
    }

    /// Replaces the RAM size item.
    pub fn set_ram_size(&mut self, ram_size: u64) {
        self.items
            .insert(key::RAM_SIZE, ram_size.to_le_bytes().to_vec());
    }

    /// The item under `key` (None: reads as zeros).
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        if key & (KEY_WRITE_CHANNEL | KEY_ARCH_LOCAL) != 0 {
            return None;
        }
        self.items.get(&key).map(Vec::as_slice)
    }

    /// A selector write: selects `key` and rewinds.
    pub fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    /// A data-port byte read: the next byte of the selected item, 0 past
    /// its end or when it does not exist.
    pub fn read_byte(&mut self) -> u8 {
        let b = self
            .item(self.selected)
            .and_then(|i| i.get(self.offset).copied())
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Whether `port` belongs to this device.
    pub fn claims(port: u16) -> bool {
        port == FW_CFG_PORT_SEL || port == FW_CFG_PORT_DATA
    }

    /// An OUT to one of the device's ports. A selector write of any size
    /// takes its low 16 bits; data writes are ignored.
    pub fn io_out(&mut self, port: u16, _size: u8, data: u32) {
        if port == FW_CFG_PORT_SEL {
            self.select(data as u16);
        }
    }

    /// An IN from one of the device's ports. A data read of `size` bytes
    /// returns that many successive bytes, the first in the lowest byte;
    /// the selector port reads as zero.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        if port != FW_CFG_PORT_DATA {
            return 0;
        }
        let mut v = 0u32;
        for i in 0..u32::from(size.clamp(1, 4)) {
            v |= u32::from(self.read_byte()) << (8 * i);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_item(f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.io_out(FW_CFG_PORT_SEL, 2, u32::from(key));
        (0..n).map(|_| f.io_in(FW_CFG_PORT_DATA, 1) as u8).collect()
    }

    #[test]
    fn test_signature_and_id() {
        let mut f = FwCfg::new(64 << 20, 1);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, key::ID, 4), [1, 0, 0, 0]);
    }

    #[test]
    fn test_ram_size_and_cpus_are_little_endian() {
        let mut f = FwCfg::new(0x1234_5678_9a00_0000, 3);
        assert_eq!(
            read_item(&mut f, key::RAM_SIZE, 8),
            0x1234_5678_9a00_0000u64.to_le_bytes()
        );
        assert_eq!(read_item(&mut f, key::NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut f, key::MAX_CPUS, 2), [3, 0]);
        f.set_ram_size(128 << 20);
        assert_eq!(
            read_item(&mut f, key::RAM_SIZE, 8),
            (128u64 << 20).to_le_bytes()
        );
    }

    #[test]
    fn test_unknown_keys_and_reads_past_the_end_are_zero() {
        let mut f = FwCfg::new(64 << 20, 1);
        assert_eq!(read_item(&mut f, 0x19, 4), [0; 4], "no file directory");
        assert_eq!(read_item(&mut f, 0x1234, 3), [0; 3]);
        assert_eq!(
            read_item(&mut f, key::SIGNATURE, 8),
            [b'Q', b'E', b'M', b'U', 0, 0, 0, 0]
        );
        // Bits 14 and 15 select the write channel / arch-local items:
        // 0x8003 is not the RAM size.
        assert_eq!(read_item(&mut f, 0x8000 | key::RAM_SIZE, 8), [0; 8]);
        assert_eq!(read_item(&mut f, 0x4000, 4), [0; 4]);
    }

    #[test]
    fn test_selector_write_rewinds_and_data_writes_are_ignored() {
        let mut f = FwCfg::new(64 << 20, 1);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 2), b"QE");
        f.io_out(FW_CFG_PORT_DATA, 1, 0x41);
        assert_eq!(f.io_in(FW_CFG_PORT_DATA, 1), u32::from(b'M'));
        assert_eq!(read_item(&mut f, key::SIGNATURE, 1), b"Q");
        assert_eq!(f.io_in(FW_CFG_PORT_SEL, 2), 0);
    }

    #[test]
    fn test_wide_data_reads_return_successive_bytes() {
        let mut f = FwCfg::new(64 << 20, 1);
        f.io_out(FW_CFG_PORT_SEL, 2, 0);
        assert_eq!(f.io_in(FW_CFG_PORT_DATA, 4), u32::from_le_bytes(*b"QEMU"));
        assert_eq!(f.io_in(FW_CFG_PORT_DATA, 2), 0);
    }

    proptest! {
        #[test]
        fn test_reads_match_reference(key in 0u16..0x20, n in 0usize..40, ram: u64, cpus: u16) {
            let mut f = FwCfg::new(ram, cpus);
            // Reference: the item bytes, then zeros.
            let item: Vec<u8> = match key {
                0x00 => b"QEMU".to_vec(),
                0x01 => vec![1, 0, 0, 0],
                0x03 => ram.to_le_bytes().to_vec(),
                0x05 | 0x0f => cpus.to_le_bytes().to_vec(),
                _ => vec![],
            };
            let want: Vec<u8> = (0..n).map(|i| item.get(i).copied().unwrap_or(0)).collect();
            prop_assert_eq!(read_item(&mut f, key, n), want);
        }
    }
}
