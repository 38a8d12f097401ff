//! Snapshots of a [`Vmcs12`] or a whole [`VmxCpu`] as byte blobs (serde +
//! bincode 2, standard configuration).
//!
//! A blob is a 24-byte header followed by the bincode payload:
//!
//! | offset | size | content |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"VMXSNAP\0"` |
//! | 8 | 2 | format version, little endian ([`SNAPSHOT_FORMAT_VERSION`]) |
//! | 10 | 1 | kind: 1 = `Vmcs12`, 2 = `VmxCpu` |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 4 | payload length, little endian |
//! | 16 | 8 | FNV-1a 64 hash of the payload, little endian |
//! | 24 | n | payload |
//!
//! Decoding checks every header field, the length and the hash before it
//! decodes, limits bincode's allocations, and checks the decoded value's
//! invariants, so a truncated, corrupted or foreign blob is a
//! [`SnapshotError`], never a panic or a half-valid value.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::vmcs::Vmcs12;
use crate::vmx::VmxCpu;

/// Magic bytes at the start of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"VMXSNAP\0";
/// Current snapshot format version; bump it when a snapshotted type
/// changes shape.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;
/// Header length.
pub const SNAPSHOT_HEADER_LEN: usize = 24;
/// Largest payload accepted (and bincode's allocation limit).
pub const SNAPSHOT_MAX_PAYLOAD: usize = 1 << 20;

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// A single [`Vmcs12`].
    Vmcs12,
    /// A whole [`VmxCpu`].
    VmxCpu,
}

impl SnapshotKind {
    fn to_byte(self) -> u8 {
        match self {
            SnapshotKind::Vmcs12 => 1,
            SnapshotKind::VmxCpu => 2,
        }
    }
}

/// Why a snapshot could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The blob is shorter than the header.
    #[error("snapshot is {len} bytes, shorter than its {SNAPSHOT_HEADER_LEN}-byte header: the blob is truncated")]
    TooShort {
        /// Blob length.
        len: usize,
    },
    /// The magic bytes are wrong.
    #[error("not a VMX snapshot (magic {found:02x?}); check that the right file was given")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Written by another format version.
    #[error("snapshot format version {found} is not supported (this build reads version {SNAPSHOT_FORMAT_VERSION}); re-create the snapshot with this build")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
    },
    /// The blob holds another kind of value, or a reserved byte is set.
    #[error(
        "snapshot holds kind {found}, expected {expected:?}; decode it with the matching function"
    )]
    WrongKind {
        /// Kind byte found (with the reserved byte in bits 15:8).
        found: u16,
        /// Kind asked for.
        expected: SnapshotKind,
    },
    /// The payload length in the header does not match the blob.
    #[error("snapshot header announces {announced} payload bytes but {actual} follow: the blob is truncated or padded")]
    LengthMismatch {
        /// Length in the header.
        announced: usize,
        /// Bytes after the header.
        actual: usize,
    },
    /// The payload hash does not match.
    #[error("snapshot payload hash {computed:#x} does not match the header's {stored:#x}: the blob is corrupted")]
    Corrupted {
        /// Hash in the header.
        stored: u64,
        /// Hash of the payload.
        computed: u64,
    },
    /// The payload is too large to be a snapshot of this model.
    #[error("snapshot payload of {0} bytes exceeds the {SNAPSHOT_MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// bincode could not encode the value.
    #[error("cannot encode snapshot: {0}")]
    Encode(String),
    /// bincode could not decode the payload.
    #[error("cannot decode snapshot payload: {0}")]
    Decode(String),
    /// bincode left payload bytes unread.
    #[error("snapshot payload has {0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// The value decoded but breaks an invariant of its type.
    #[error("snapshot decodes to an inconsistent value: {0}")]
    Inconsistent(String),
}

/// FNV-1a 64-bit hash: the checksum in snapshot and recording frames.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<SNAPSHOT_MAX_PAYLOAD>,
> {
    bincode::config::standard().with_limit::<SNAPSHOT_MAX_PAYLOAD>()
}

fn encode<T: Serialize>(kind: SnapshotKind, value: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    if payload.len() > SNAPSHOT_MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(payload.len()));
    }
    Ok(frame(kind.to_byte(), &payload))
}

/// Header (magic, version, kind, reserved 0, length, hash) then `payload`.
/// The caller bounds `payload` by [`SNAPSHOT_MAX_PAYLOAD`], so its length
/// fits the u32 length field.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + payload.len());
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode<T: DeserializeOwned>(kind: SnapshotKind, blob: &[u8]) -> Result<T, SnapshotError> {
    let (header, payload) = match (
        blob.get(..SNAPSHOT_HEADER_LEN),
        blob.get(SNAPSHOT_HEADER_LEN..),
    ) {
        (Some(h), Some(p)) => (h, p),
        _ => return Err(SnapshotError::TooShort { len: blob.len() }),
    };
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&header[0..8]);
    if magic != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { found: version });
    }
    if header[10] != kind.to_byte() || header[11] != 0 {
        return Err(SnapshotError::WrongKind {
            found: u16::from_le_bytes([header[10], header[11]]),
            expected: kind,
        });
    }
    let announced = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if announced != payload.len() {
        return Err(SnapshotError::LengthMismatch {
            announced,
            actual: payload.len(),
        });
    }
    if announced > SNAPSHOT_MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(announced));
    }
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&header[16..24]);
    let stored = u64::from_le_bytes(stored);
    let computed = fnv1a64(payload);
    if stored != computed {
        return Err(SnapshotError::Corrupted { stored, computed });
    }
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(payload, config())
        .map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(SnapshotError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

/// Encodes a vmcs12 snapshot.
pub fn encode_vmcs12(vmcs: &Vmcs12) -> Result<Vec<u8>, SnapshotError> {
    encode(SnapshotKind::Vmcs12, vmcs)
}

/// Decodes a vmcs12 snapshot.
pub fn decode_vmcs12(blob: &[u8]) -> Result<Vmcs12, SnapshotError> {
    let vmcs: Vmcs12 = decode(SnapshotKind::Vmcs12, blob)?;
    if !vmcs.is_well_formed() {
        return Err(SnapshotError::Inconsistent(
            "vmcs12 does not hold one in-width value per catalogue field".into(),
        ));
    }
    Ok(vmcs)
}

/// Encodes a snapshot of a whole VMX vCPU (operation state, pointers, the
/// cached vmcs12 and its launch state, capabilities, IA32_FEATURE_CONTROL).
pub fn encode_vmx_cpu(cpu: &VmxCpu) -> Result<Vec<u8>, SnapshotError> {
    encode(SnapshotKind::VmxCpu, cpu)
}

/// Decodes a VMX vCPU snapshot.
pub fn decode_vmx_cpu(blob: &[u8]) -> Result<VmxCpu, SnapshotError> {
    let cpu: VmxCpu = decode(SnapshotKind::VmxCpu, blob)?;
    cpu.check_consistency()
        .map_err(SnapshotError::Inconsistent)?;
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::VmcsField;
    use proptest::prelude::*;

    fn sample_vmcs() -> Vmcs12 {
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_RIP, 0xffff_ffff_8100_0000);
        v.set(VmcsField::VM_EXIT_REASON, 30);
        v.set(VmcsField::HOST_CS_SELECTOR, 8);
        v
    }

    #[test]
    fn test_vmcs12_snapshot_round_trip() {
        let v = sample_vmcs();
        let blob = encode_vmcs12(&v).unwrap();
        assert_eq!(&blob[..8], &SNAPSHOT_MAGIC);
        assert_eq!(decode_vmcs12(&blob), Ok(v));
    }

    #[test]
    fn test_snapshot_rejects_truncation() {
        let blob = encode_vmcs12(&sample_vmcs()).unwrap();
        assert_eq!(
            decode_vmcs12(&blob[..10]),
            Err(SnapshotError::TooShort { len: 10 })
        );
        assert!(matches!(
            decode_vmcs12(&blob[..blob.len() - 1]),
            Err(SnapshotError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn test_snapshot_rejects_bad_magic() {
        let mut blob = encode_vmcs12(&sample_vmcs()).unwrap();
        blob[0] = b'X';
        assert!(matches!(
            decode_vmcs12(&blob),
            Err(SnapshotError::BadMagic { .. })
        ));
    }

    #[test]
    fn test_snapshot_rejects_wrong_version() {
        let mut blob = encode_vmcs12(&sample_vmcs()).unwrap();
        blob[8] = 2;
        assert_eq!(
            decode_vmcs12(&blob),
            Err(SnapshotError::UnsupportedVersion { found: 2 })
        );
    }

    #[test]
    fn test_snapshot_rejects_wrong_kind() {
        let blob = encode_vmcs12(&sample_vmcs()).unwrap();
        assert_eq!(
            decode_vmx_cpu(&blob).map(|_| ()),
            Err(SnapshotError::WrongKind {
                found: 1,
                expected: SnapshotKind::VmxCpu
            })
        );
    }

    #[test]
    fn test_snapshot_rejects_corrupted_payload() {
        let mut blob = encode_vmcs12(&sample_vmcs()).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0x40;
        assert!(matches!(
            decode_vmcs12(&blob),
            Err(SnapshotError::Corrupted { .. })
        ));
    }

    #[test]
    fn test_snapshot_rejects_inconsistent_vmcs12() {
        // A well-formed blob whose payload is a 3-element vector.
        let short: Vec<u64> = vec![1, 2, 3];
        let blob = encode(SnapshotKind::Vmcs12, &short).unwrap();
        assert!(matches!(
            decode_vmcs12(&blob),
            Err(SnapshotError::Inconsistent(_))
        ));
    }

    #[test]
    fn test_snapshot_rejects_trailing_bytes() {
        // A vmcs12 payload with one extra byte, with a valid header.
        let mut payload = bincode::serde::encode_to_vec(sample_vmcs(), config()).unwrap();
        payload.push(0);
        let blob = frame(1, &payload);
        assert_eq!(decode_vmcs12(&blob), Err(SnapshotError::TrailingBytes(1)));
    }

    #[test]
    fn test_snapshot_rejects_huge_length_prefix() {
        // Valid header and hash around a payload that claims a 2^60-element
        // vector: bincode's limit stops it before it allocates.
        let payload = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let blob = frame(1, &payload);
        assert!(matches!(
            decode_vmcs12(&blob),
            Err(SnapshotError::Decode(_))
        ));
    }

    proptest! {
        #[test]
        fn test_snapshot_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_vmcs12(&bytes);
            let _ = decode_vmx_cpu(&bytes);
        }

        #[test]
        fn test_snapshot_any_single_byte_flip_is_rejected(index in 0usize..4096, bit in 0u8..8) {
            let blob = encode_vmcs12(&sample_vmcs()).unwrap();
            let i = index % blob.len();
            let mut bad = blob.clone();
            bad[i] ^= 1 << bit;
            prop_assert!(decode_vmcs12(&bad).is_err());
        }
    }
}
