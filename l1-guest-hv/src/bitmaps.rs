//! Where a port or an MSR sits in the VMX I/O and MSR bitmaps
//! (SDM Vol. 3, 25.6.4 and 25.6.9).

/// Which I/O bitmap page holds a port: A covers 0x0000-0x7fff, B the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBitmap {
    /// Bitmap A (IO_BITMAP_A).
    A,
    /// Bitmap B (IO_BITMAP_B).
    B,
}

/// The bitmap, byte offset and bit that intercept `port`.
pub fn io_bitmap_bit(port: u16) -> (IoBitmap, usize, u8) {
    let which = if port < 0x8000 {
        IoBitmap::A
    } else {
        IoBitmap::B
    };
    let index = usize::from(port & 0x7fff);
    (which, index / 8, (index % 8) as u8)
}

/// Which quarter of the 4 KiB MSR bitmap (SDM 25.6.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrAccess {
    /// RDMSR.
    Read,
    /// WRMSR.
    Write,
}

/// The byte offset and bit in the MSR bitmap page that intercept `access`
/// to `msr`; `None` for an MSR outside the two bitmap ranges
/// (0-0x1fff, 0xc0000000-0xc0001fff), which always exits.
pub fn msr_bitmap_bit(msr: u32, access: MsrAccess) -> Option<(usize, u8)> {
    let (high, index) = match msr {
        0..=0x1fff => (false, msr),
        0xc000_0000..=0xc000_1fff => (true, msr - 0xc000_0000),
        _ => return None,
    };
    let base = match (access, high) {
        (MsrAccess::Read, false) => 0,
        (MsrAccess::Read, true) => 1024,
        (MsrAccess::Write, false) => 2048,
        (MsrAccess::Write, true) => 3072,
    };
    Some((base + index as usize / 8, (index % 8) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_serial_port_bit() {
        // 0x3f8 = byte 0x7f, bit 0 of bitmap A.
        assert_eq!(io_bitmap_bit(0x3f8), (IoBitmap::A, 0x7f, 0));
        assert_eq!(io_bitmap_bit(0x3f9), (IoBitmap::A, 0x7f, 1));
        assert_eq!(io_bitmap_bit(0x8000), (IoBitmap::B, 0, 0));
        assert_eq!(io_bitmap_bit(0xffff), (IoBitmap::B, 0xfff, 7));
    }

    #[test]
    fn test_msr_bitmap_quarters() {
        assert_eq!(msr_bitmap_bit(0x1b, MsrAccess::Read), Some((3, 3)));
        assert_eq!(msr_bitmap_bit(0x1b, MsrAccess::Write), Some((2048 + 3, 3)));
        assert_eq!(
            msr_bitmap_bit(0xc000_0080, MsrAccess::Read),
            Some((1024 + 16, 0))
        );
        assert_eq!(
            msr_bitmap_bit(0xc000_1fff, MsrAccess::Write),
            Some((4095, 7))
        );
    }

    #[test]
    fn test_msr_outside_ranges_has_no_bit() {
        assert_eq!(msr_bitmap_bit(0x2000, MsrAccess::Read), None);
        assert_eq!(msr_bitmap_bit(0xc000_2000, MsrAccess::Read), None);
        assert_eq!(msr_bitmap_bit(0xbfff_ffff, MsrAccess::Write), None);
    }

    proptest! {
        #[test]
        fn prop_io_bit_is_port_index(port: u16) {
            let (which, byte, bit) = io_bitmap_bit(port);
            let flat = if which == IoBitmap::A { 0 } else { 0x8000 } + byte * 8 + usize::from(bit);
            prop_assert_eq!(flat, usize::from(port));
        }

        #[test]
        fn prop_msr_bits_stay_in_page(msr: u32) {
            for access in [MsrAccess::Read, MsrAccess::Write] {
                if let Some((byte, bit)) = msr_bitmap_bit(msr, access) {
                    prop_assert!(byte < 4096 && bit < 8);
                }
            }
        }
    }
}
