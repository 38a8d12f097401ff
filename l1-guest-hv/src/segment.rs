//! GDT descriptors and their VMCS access-rights form (SDM Vol. 3, 3.4.5 and
//! 25.4.1, Table 25-2).

/// VMCS access rights of an unusable segment (bit 16).
pub const AR_UNUSABLE: u32 = 1 << 16;

/// The VMCS access-rights value of a GDT descriptor: descriptor bits 55:40
/// with the limit bits 51:48 cleared (type, S, DPL, P, AVL, L, D/B, G).
pub fn access_rights(descriptor: u64) -> u32 {
    ((descriptor >> 40) as u32) & 0xf0ff
}

/// Segment base of a (non-system, or low half of a system) descriptor.
pub fn descriptor_base(descriptor: u64) -> u64 {
    ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24)
}

/// Segment limit in bytes (scaled by 4 KiB when G is set).
pub fn descriptor_limit(descriptor: u64) -> u32 {
    let raw = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    if descriptor & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The 16-byte GDT descriptor of an available 64-bit TSS (type 9).
pub fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = u64::from(limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (u64::from((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// One 16-byte 64-bit interrupt gate (type 0xE, present, DPL 0).
pub fn interrupt_gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE64: u64 = 0x00af_9a00_0000_ffff;
    const DATA: u64 = 0x00cf_9200_0000_ffff;

    #[test]
    fn test_flat_segment_access_rights() {
        assert_eq!(access_rights(CODE64), 0xa09a);
        assert_eq!(access_rights(DATA), 0xc092);
        assert_eq!(descriptor_limit(DATA), 0xffff_ffff);
        assert_eq!(descriptor_base(DATA), 0);
    }

    #[test]
    fn test_tss_descriptor_round_trips() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc, 0x67);
        assert_eq!(descriptor_base(low) | (high << 32), 0x1234_5678_9abc);
        assert_eq!(descriptor_limit(low), 0x67);
        assert_eq!(access_rights(low), 0x89);
        // Not byte-granular: a different limit changes the encoding.
        assert_ne!(
            tss_descriptor(0x1000, 0x68)[0],
            tss_descriptor(0x1000, 0x67)[0]
        );
    }

    #[test]
    fn test_interrupt_gate_layout() {
        let [low, high] = interrupt_gate(0xffff_8000_1234_5678, 0x08, 1);
        assert_eq!(low & 0xffff, 0x5678);
        assert_eq!((low >> 16) & 0xffff, 0x08);
        assert_eq!((low >> 32) & 7, 1);
        assert_eq!((low >> 40) & 0xff, 0x8e);
        assert_eq!(low >> 48, 0x1234);
        assert_eq!(high, 0xffff_8000);
        assert_eq!(
            (interrupt_gate(0, 8, 9)[0] >> 32) & 0xff,
            1,
            "IST is 3 bits"
        );
    }
}
