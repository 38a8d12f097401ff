//! In-memory vmcs12 storage with typed access.
//!
//! [`Vmcs12`] holds one value per catalogue field, masked to the field's
//! width. It is the single truth for L1's view of a VMCS; everything else
//! (the L2 vCPU, the guest page behind VMPTRLD) is a copy of it.

use serde::{Deserialize, Serialize};

use crate::field::VmcsField;

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
    fn test_diff_names_changed_fields() {
        let a = Vmcs12::new();
        let mut b = Vmcs12::new();
        b.set(VmcsField::GUEST_RIP, 0x1000);
        let d: Vec<_> = a.diff(&b).collect();
        assert_eq!(d, vec![(VmcsField::GUEST_RIP, 0, 0x1000)]);
    }
}
