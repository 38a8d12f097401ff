//! The 4 KiB VMCS region in guest memory (SDM Vol. 3, 25.2 "Format of the
//! VMCS Region"), in this model's versioned layout.
//!
//! The SDM fixes only the first 8 bytes (revision identifier with the
//! shadow-VMCS indicator in bit 31, then the VMX-abort indicator); the rest
//! is "VMCS data (implementation-specific format)". Ours, described in
//! `docs/vmcs-region.md`, is:
//!
//! | offset | size | content |
//! | --- | --- | --- |
//! | 0x000 | 4 | revision identifier [30:0], shadow-VMCS indicator [31] |
//! | 0x004 | 4 | VMX-abort indicator |
//! | 0x008 | 4 | layout version ([`REGION_LAYOUT_VERSION`]) |
//! | 0x00c | 4 | launch state (0 = clear, 1 = launched) |
//! | 0x010 | 4 | number of fields in the data area ([`VmcsField::COUNT`]) |
//! | 0x014 | 4 | catalogue fingerprint ([`catalogue_fingerprint`]) |
//! | 0x018 | 8 | reserved, zero |
//! | 0x020 | 8 x COUNT | one little-endian u64 per field, in [`VmcsField::ALL`] order |
//!
//! Only L0 reads and writes the data area: the SDM forbids software from
//! accessing a VMCS region with ordinary memory accesses, so an L1 that
//! follows the rules never notices the format.

use serde::{Deserialize, Serialize};

use crate::field::VmcsField;
use crate::mem::{GuestPhysMemory, OutOfRange};
use crate::vmcs::Vmcs12;

/// Size of a VMCS region (IA32_VMX_BASIC[44:32]).
pub const VMCS_REGION_SIZE: usize = 4096;
/// Offset of the revision identifier.
pub const OFFSET_REVISION_ID: u64 = 0x000;
/// Offset of the VMX-abort indicator.
pub const OFFSET_ABORT_INDICATOR: u64 = 0x004;
/// Offset of the layout version.
pub const OFFSET_LAYOUT_VERSION: u64 = 0x008;
/// Offset of the launch state.
pub const OFFSET_LAUNCH_STATE: u64 = 0x00c;
/// Offset of the field count.
pub const OFFSET_FIELD_COUNT: u64 = 0x010;
/// Offset of the catalogue fingerprint.
pub const OFFSET_FINGERPRINT: u64 = 0x014;
/// Offset of the field data area.
pub const OFFSET_FIELD_DATA: u64 = 0x020;
/// Version of this layout; bump it when the header changes.
pub const REGION_LAYOUT_VERSION: u32 = 1;
/// Bit 31 of the revision dword: the region holds a shadow VMCS (SDM 25.2).
pub const SHADOW_VMCS_INDICATOR: u32 = 1 << 31;

// The data area must fit in the region (checked at compile time).
const _: () = assert!(OFFSET_FIELD_DATA as usize + 8 * VmcsField::COUNT <= VMCS_REGION_SIZE);

/// Launch state of a VMCS (SDM 25.1): set to clear by VMCLEAR, to launched
/// by a successful VMLAUNCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LaunchState {
    /// "Clear": VMLAUNCH may use it, VMRESUME fails with error 5.
    Clear,
    /// "Launched": VMRESUME may use it, VMLAUNCH fails with error 4.
    Launched,
}

impl LaunchState {
    /// The dword stored at [`OFFSET_LAUNCH_STATE`].
    pub fn to_raw(self) -> u32 {
        match self {
            LaunchState::Clear => 0,
            LaunchState::Launched => 1,
        }
    }

    /// Decodes the stored dword.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(LaunchState::Clear),
            1 => Some(LaunchState::Launched),
            _ => None,
        }
    }
}

/// Why a VMCS region could not be loaded or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The region is not (entirely) in guest RAM.
    #[error("VMCS region is not in guest RAM: {0}")]
    OutOfRange(#[from] OutOfRange),
    /// The header was not written by this layout (the region was never
    /// VMCLEARed by this model, or by another catalogue version).
    #[error(
        "VMCS region at {pa:#x} has layout version {version}, {count} fields, fingerprint \
         {fingerprint:#x}; expected version {REGION_LAYOUT_VERSION}: VMCLEAR it first"
    )]
    UnknownLayout {
        /// Region address.
        pa: u64,
        /// Layout version found.
        version: u32,
        /// Field count found.
        count: u32,
        /// Fingerprint found.
        fingerprint: u32,
    },
    /// The launch-state dword is neither 0 nor 1.
    #[error(
        "VMCS region at {pa:#x} has launch state {raw}, not 0 (clear) or 1 (launched): VMCLEAR it"
    )]
    BadLaunchState {
        /// Region address.
        pa: u64,
        /// The stored value.
        raw: u32,
    },
}

/// FNV-1a hash of every catalogue encoding in order: changes whenever a
/// field is added, removed or reordered, so a region written with another
/// catalogue is never misread.
pub fn catalogue_fingerprint() -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for f in VmcsField::ALL {
        for b in f.encoding().to_le_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// `pa + offset`, or the out-of-range error an access of `len` bytes there
/// gets when the sum wraps past 2^64.
fn at(pa: u64, offset: u64, len: usize) -> Result<u64, OutOfRange> {
    pa.checked_add(offset).ok_or(OutOfRange { gpa: pa, len })
}

fn count_u32() -> u32 {
    // COUNT is a few hundred (checked against the region size above).
    VmcsField::COUNT as u32
}

/// Reads the revision dword (identifier and shadow indicator) at `pa`.
pub fn read_revision(mem: &dyn GuestPhysMemory, pa: u64) -> Result<u32, OutOfRange> {
    mem.read_u32(at(pa, OFFSET_REVISION_ID, 4)?)
}

/// Whether the header at `pa` was written by this layout and catalogue.
pub fn has_current_layout(mem: &dyn GuestPhysMemory, pa: u64) -> Result<bool, OutOfRange> {
    let mut hdr = [0u8; 16];
    mem.read(at(pa, OFFSET_LAYOUT_VERSION, hdr.len())?, &mut hdr)?;
    let (version, _, count, fingerprint) = split_header(&hdr);
    Ok(version == REGION_LAYOUT_VERSION
        && count == count_u32()
        && fingerprint == catalogue_fingerprint())
}

fn split_header(hdr: &[u8; 16]) -> (u32, u32, u32, u32) {
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    (word(0), word(4), word(8), word(12))
}

/// Loads the VMCS at `pa` (what VMPTRLD does with a region it accepts).
pub fn load_region(
    mem: &dyn GuestPhysMemory,
    pa: u64,
) -> Result<(Vmcs12, LaunchState), RegionError> {
    let mut hdr = [0u8; 16];
    mem.read(at(pa, OFFSET_LAYOUT_VERSION, hdr.len())?, &mut hdr)?;
    let (version, raw_launch, count, fingerprint) = split_header(&hdr);
    if version != REGION_LAYOUT_VERSION
        || count != count_u32()
        || fingerprint != catalogue_fingerprint()
    {
        return Err(RegionError::UnknownLayout {
            pa,
            version,
            count,
            fingerprint,
        });
    }
    let launch = LaunchState::from_raw(raw_launch).ok_or(RegionError::BadLaunchState {
        pa,
        raw: raw_launch,
    })?;
    let mut data = vec![0u8; 8 * VmcsField::COUNT];
    mem.read(at(pa, OFFSET_FIELD_DATA, data.len())?, &mut data)?;
    let mut vmcs = Vmcs12::new();
    for (field, chunk) in VmcsField::ALL.iter().zip(data.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        // `set` masks to the field width: stray high bits in guest memory
        // never reach a narrower field.
        vmcs.set(*field, u64::from_le_bytes(b));
    }
    Ok((vmcs, launch))
}

/// Writes `vmcs` and `launch` into the region at `pa` (header from offset
/// 8 on, and the data area). The revision identifier and the VMX-abort
/// indicator are left as they are: software owns the first, the processor
/// writes the second only on a VMX abort.
pub fn flush_region(
    mem: &mut dyn GuestPhysMemory,
    pa: u64,
    vmcs: &Vmcs12,
    launch: LaunchState,
) -> Result<(), RegionError> {
    let len = (OFFSET_FIELD_DATA - OFFSET_LAYOUT_VERSION) as usize + 8 * VmcsField::COUNT;
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&REGION_LAYOUT_VERSION.to_le_bytes());
    buf.extend_from_slice(&launch.to_raw().to_le_bytes());
    buf.extend_from_slice(&count_u32().to_le_bytes());
    buf.extend_from_slice(&catalogue_fingerprint().to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]);
    for field in VmcsField::ALL {
        buf.extend_from_slice(&vmcs.get(*field).to_le_bytes());
    }
    mem.write(at(pa, OFFSET_LAYOUT_VERSION, buf.len())?, &buf)?;
    Ok(())
}

/// What VMCLEAR does to a region (SDM 31.3, VMCLEAR: "initialize
/// implementation-specific data in VMCS region; launch state := clear").
///
/// A region already in this layout keeps its field data and only has its
/// launch state set to clear; any other region gets a fresh header and an
/// all-zero data area.
pub fn clear_region(mem: &mut dyn GuestPhysMemory, pa: u64) -> Result<(), RegionError> {
    if has_current_layout(mem, pa)? {
        mem.write_u32(at(pa, OFFSET_LAUNCH_STATE, 4)?, LaunchState::Clear.to_raw())?;
        Ok(())
    } else {
        flush_region(mem, pa, &Vmcs12::new(), LaunchState::Clear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::FlatMemory;
    use proptest::prelude::*;

    #[test]
    fn test_region_flush_load_round_trip() {
        let mut mem = FlatMemory::new(0x3000);
        mem.write_u32(0x1000, 0x1312).unwrap();
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_RIP, 0xffff_8000_0000_1000);
        v.set(VmcsField::GUEST_CS_SELECTOR, 0x10);
        v.set(VmcsField::HOST_INTR_SSP_TABLE, 7);
        flush_region(&mut mem, 0x1000, &v, LaunchState::Launched).unwrap();
        assert_eq!(read_revision(&mem, 0x1000), Ok(0x1312));
        assert_eq!(
            load_region(&mem, 0x1000),
            Ok((v.clone(), LaunchState::Launched))
        );
        flush_region(&mut mem, 0x1000, &v, LaunchState::Clear).unwrap();
        assert_eq!(load_region(&mem, 0x1000), Ok((v, LaunchState::Clear)));
    }

    #[test]
    fn test_region_flush_keeps_revision_and_abort_indicator() {
        let mut mem = FlatMemory::new(0x2000);
        mem.write_u32(0x1000, 0x8000_1312).unwrap();
        mem.write_u32(0x1004, 5).unwrap();
        flush_region(&mut mem, 0x1000, &Vmcs12::new(), LaunchState::Clear).unwrap();
        assert_eq!(mem.read_u32(0x1000), Ok(0x8000_1312));
        assert_eq!(mem.read_u32(0x1004), Ok(5));
    }

    #[test]
    fn test_region_load_rejects_unknown_layout() {
        let mem = FlatMemory::new(0x2000);
        assert_eq!(
            load_region(&mem, 0x1000),
            Err(RegionError::UnknownLayout {
                pa: 0x1000,
                version: 0,
                count: 0,
                fingerprint: 0
            })
        );
    }

    #[test]
    fn test_region_load_rejects_other_catalogue() {
        let mut mem = FlatMemory::new(0x2000);
        flush_region(&mut mem, 0x1000, &Vmcs12::new(), LaunchState::Clear).unwrap();
        mem.write_u32(0x1000 + OFFSET_FINGERPRINT, 0x1234).unwrap();
        assert!(matches!(
            load_region(&mem, 0x1000),
            Err(RegionError::UnknownLayout { .. })
        ));
    }

    #[test]
    fn test_region_load_rejects_bad_launch_state() {
        let mut mem = FlatMemory::new(0x2000);
        flush_region(&mut mem, 0x1000, &Vmcs12::new(), LaunchState::Clear).unwrap();
        mem.write_u32(0x1000 + OFFSET_LAUNCH_STATE, 2).unwrap();
        assert_eq!(
            load_region(&mem, 0x1000),
            Err(RegionError::BadLaunchState { pa: 0x1000, raw: 2 })
        );
    }

    #[test]
    fn test_region_outside_ram_is_an_error_not_a_panic() {
        let mut mem = FlatMemory::new(0x1100);
        // Header in RAM, data area not.
        mem.write_u32(0x1000 + OFFSET_LAYOUT_VERSION, REGION_LAYOUT_VERSION)
            .unwrap();
        mem.write_u32(0x1000 + OFFSET_FIELD_COUNT, count_u32())
            .unwrap();
        mem.write_u32(0x1000 + OFFSET_FINGERPRINT, catalogue_fingerprint())
            .unwrap();
        assert!(has_current_layout(&mem, 0x1000).unwrap());
        assert!(matches!(
            load_region(&mem, 0x1000),
            Err(RegionError::OutOfRange(_))
        ));
        // Header not in RAM.
        assert!(matches!(
            load_region(&mem, 0x10f8),
            Err(RegionError::OutOfRange(_))
        ));
        assert!(matches!(
            load_region(&mem, u64::MAX - 4),
            Err(RegionError::OutOfRange(_))
        ));
        assert!(matches!(
            flush_region(&mut mem, 0x1000, &Vmcs12::new(), LaunchState::Clear),
            Err(RegionError::OutOfRange(_))
        ));
        assert!(matches!(
            clear_region(&mut mem, u64::MAX),
            Err(RegionError::OutOfRange(_))
        ));
    }

    #[test]
    fn test_clear_region_keeps_data_of_known_layout() {
        let mut mem = FlatMemory::new(0x2000);
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_RSP, 0x8000);
        flush_region(&mut mem, 0x1000, &v, LaunchState::Launched).unwrap();
        clear_region(&mut mem, 0x1000).unwrap();
        assert_eq!(load_region(&mem, 0x1000), Ok((v, LaunchState::Clear)));
    }

    #[test]
    fn test_clear_region_initialises_fresh_region() {
        let mut mem = FlatMemory::new(0x2000);
        mem.bytes[0x1000..0x2000].fill(0xaa);
        mem.write_u32(0x1000, 0x1312).unwrap();
        clear_region(&mut mem, 0x1000).unwrap();
        assert_eq!(
            load_region(&mem, 0x1000),
            Ok((Vmcs12::new(), LaunchState::Clear))
        );
        assert_eq!(read_revision(&mem, 0x1000), Ok(0x1312));
    }

    #[test]
    fn test_launch_state_raw_values() {
        assert_eq!(LaunchState::from_raw(0), Some(LaunchState::Clear));
        assert_eq!(LaunchState::from_raw(1), Some(LaunchState::Launched));
        assert_eq!(LaunchState::from_raw(2), None);
        assert_eq!(LaunchState::Launched.to_raw(), 1);
    }

    proptest! {
        #[test]
        fn test_region_round_trips_any_values(values in proptest::collection::vec(any::<u64>(), VmcsField::COUNT)) {
            let mut mem = FlatMemory::new(0x2000);
            let mut v = Vmcs12::new();
            for (f, x) in VmcsField::ALL.iter().zip(&values) {
                v.set(*f, *x);
            }
            flush_region(&mut mem, 0x1000, &v, LaunchState::Launched).unwrap();
            let (back, launch) = load_region(&mem, 0x1000).unwrap();
            prop_assert_eq!(launch, LaunchState::Launched);
            for (f, x) in VmcsField::ALL.iter().zip(&values) {
                prop_assert_eq!(back.get(*f), x & f.width().mask());
            }
        }

        /// A region page L1 filled with anything (a header that may or may
        /// not look like ours, random field data), at any address (also
        /// straddling the end of RAM or wrapping past 2^64): loading and
        /// clearing never panic; what loads is well formed and survives a
        /// flush and a reload unchanged.
        #[test]
        fn test_region_hostile_pages_never_panic(
            pa in prop_oneof![Just(0x1000u64), Just(0x1800u64), any::<u64>()],
            ours in any::<bool>(),
            launch in 0u32..3,
            words in proptest::collection::vec(any::<u64>(), 0..64),
        ) {
            let mut mem = FlatMemory::new(0x2000);
            if ours {
                let _ = flush_region(&mut mem, 0x1000, &Vmcs12::new(), LaunchState::Clear);
                let _ = mem.write_u32(0x1000 + OFFSET_LAUNCH_STATE, launch);
            }
            for (i, w) in words.iter().enumerate() {
                let _ = mem.write_u64(0x1000 + 0x20 + 8 * (i as u64) * 3, *w);
            }
            if let Ok((vmcs, state)) = load_region(&mem, pa) {
                prop_assert!(vmcs.is_well_formed());
                flush_region(&mut mem, pa, &vmcs, state).unwrap();
                prop_assert_eq!(load_region(&mem, pa).unwrap(), (vmcs, state));
            }
            let _ = clear_region(&mut mem, pa);
            let _ = read_revision(&mem, pa);
            let _ = has_current_layout(&mem, pa);
        }
    }
}
