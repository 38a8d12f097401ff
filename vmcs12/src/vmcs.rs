//! In-memory vmcs12 storage with typed access.
//!
//! [`Vmcs12`] holds one value per catalogue field, masked to the field's
//! width. It is the single truth for L1's view of a VMCS; everything else
//! (the L2 vCPU, the guest page behind VMPTRLD) is a copy of it.

use serde::{Deserialize, Serialize};

use crate::field::{AccessType, FieldAccess, VmcsField};

/// The contents of one VMCS as L1 sees it through VMREAD/VMWRITE.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmcs12 {
    values: Vec<u64>,
}

impl Default for Vmcs12 {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Vmcs12 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut m = f.debug_map();
        for (field, value) in self.non_zero() {
            m.entry(&field.name(), &format_args!("{value:#x}"));
        }
        m.finish()
    }
}

impl Vmcs12 {
    /// A VMCS with every field zero (what VMCLEAR of a fresh region gives).
    pub fn new() -> Self {
        Self {
            values: vec![0; VmcsField::COUNT],
        }
    }

    /// Reads a field (the full value, zero-extended to 64 bits).
    pub fn get(&self, field: VmcsField) -> u64 {
        self.values.get(field.ordinal()).copied().unwrap_or(0)
    }

    /// Writes a field, truncating the value to the field's width.
    pub fn set(&mut self, field: VmcsField, value: u64) {
        if let Some(slot) = self.values.get_mut(field.ordinal()) {
            *slot = value & field.width().mask();
        }
    }

    /// Reads a field the way VMREAD with this access sees it: the full
    /// value, or bits 63:32 of a 64-bit field for the HIGH access type
    /// (SDM 24.11.2).
    pub fn read_access(&self, access: FieldAccess) -> u64 {
        let value = self.get(access.field);
        match access.access {
            AccessType::Full => value,
            AccessType::High => value >> 32,
        }
    }

    /// Writes a field the way VMWRITE with this access does: the full
    /// value (truncated to the field width), or, for the HIGH access type,
    /// bits 31:0 of `value` into bits 63:32 of the field, keeping bits 31:0
    /// (SDM 24.11.2).
    pub fn write_access(&mut self, access: FieldAccess, value: u64) {
        match access.access {
            AccessType::Full => self.set(access.field, value),
            AccessType::High => {
                let low = self.get(access.field) & 0xffff_ffff;
                self.set(access.field, low | (value << 32));
            }
        }
    }

    /// Whether the storage holds exactly one in-width value per catalogue
    /// field (a deserialized `Vmcs12` from an untrusted blob may not).
    pub fn is_well_formed(&self) -> bool {
        self.values.len() == VmcsField::COUNT
            && VmcsField::ALL
                .iter()
                .zip(&self.values)
                .all(|(f, v)| v & !f.width().mask() == 0)
    }

    /// Reads a 32-bit or 16-bit field as `u32`.
    pub fn get32(&self, field: VmcsField) -> u32 {
        self.get(field) as u32
    }

    /// Every field whose value is not zero, in encoding order.
    pub fn non_zero(&self) -> impl Iterator<Item = (VmcsField, u64)> + '_ {
        VmcsField::ALL
            .iter()
            .copied()
            .map(|f| (f, self.get(f)))
            .filter(|&(_, v)| v != 0)
    }

    /// Fields whose values differ between `self` and `other`:
    /// `(field, self's value, other's value)`.
    pub fn diff<'a>(
        &'a self,
        other: &'a Vmcs12,
    ) -> impl Iterator<Item = (VmcsField, u64, u64)> + 'a {
        VmcsField::ALL
            .iter()
            .copied()
            .map(|f| (f, self.get(f), other.get(f)))
            .filter(|&(_, a, b)| a != b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_set_truncates_to_width() {
        let mut v = Vmcs12::new();
        v.set(VmcsField::GUEST_CS_SELECTOR, 0x1234_5678);
        assert_eq!(v.get(VmcsField::GUEST_CS_SELECTOR), 0x5678);
        v.set(VmcsField::GUEST_CS_LIMIT, u64::MAX);
        assert_eq!(v.get(VmcsField::GUEST_CS_LIMIT), 0xffff_ffff);
        v.set(VmcsField::GUEST_RIP, u64::MAX);
        assert_eq!(v.get(VmcsField::GUEST_RIP), u64::MAX);
    }

    #[test]
    fn test_high_access_reads_and_writes_bits_63_32() {
        let mut v = Vmcs12::new();
        let full = FieldAccess::resolve(0x201a).unwrap();
        let high = FieldAccess::resolve(0x201b).unwrap();
        v.write_access(full, 0x1111_2222_3333_4444);
        assert_eq!(v.read_access(high), 0x1111_2222);
        v.write_access(high, 0xdead_beef_5555_6666);
        assert_eq!(v.get(VmcsField::EPT_POINTER), 0x5555_6666_3333_4444);
        assert_eq!(v.read_access(full), 0x5555_6666_3333_4444);
    }

    #[test]
    fn test_well_formed_rejects_wrong_length_and_wide_values() {
        assert!(Vmcs12::new().is_well_formed());
        let short = Vmcs12 { values: vec![0; 3] };
        assert!(!short.is_well_formed());
        let mut wide = Vmcs12::new();
        wide.values[VmcsField::GUEST_CS_SELECTOR.ordinal()] = 0x1_0000;
        assert!(!wide.is_well_formed());
    }

    #[test]
    fn test_diff_names_changed_fields() {
        let a = Vmcs12::new();
        let mut b = Vmcs12::new();
        b.set(VmcsField::GUEST_RIP, 0x1000);
        let d: Vec<_> = a.diff(&b).collect();
        assert_eq!(d, vec![(VmcsField::GUEST_RIP, 0, 0x1000)]);
    }
}
