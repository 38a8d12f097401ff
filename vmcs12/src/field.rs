//! The VMCS field catalogue (Intel SDM Vol. 3, Appendix B).
//!
//! One table, [`vmcs_fields!`], lists every field once: its SDM-style name,
//! its encoding, and a short description taken from the SDM's field tables.
//! Width, kind (control, VM-exit information, guest state, host state) and
//! the read-only property are all decoded from the encoding itself
//! (SDM 24.11.2, "VMREAD, VMWRITE, and Encodings of VMCS Fields"), so the
//! table cannot disagree with the bit layout.

use serde::{Deserialize, Serialize};

/// Width of a VMCS field, from bits 14:13 of its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldWidth {
    /// 16-bit field (width 0).
    Word,
    /// 64-bit field (width 1); has a HIGH access (encoding | 1).
    Qword,
    /// 32-bit field (width 2).
    Dword,
    /// Natural-width field (width 3): 64 bits on a CPU with Intel 64.
    Natural,
}

impl FieldWidth {
    /// Number of bits the field holds on a 64-bit processor.
    pub fn bits(self) -> u32 {
        match self {
            FieldWidth::Word => 16,
            FieldWidth::Dword => 32,
            FieldWidth::Qword | FieldWidth::Natural => 64,
        }
    }

    /// Mask of the bits the field holds.
    pub fn mask(self) -> u64 {
        match self {
            FieldWidth::Word => 0xffff,
            FieldWidth::Dword => 0xffff_ffff,
            FieldWidth::Qword | FieldWidth::Natural => u64::MAX,
        }
    }

    /// Short name used by `l0-vmm fields`.
    pub fn name(self) -> &'static str {
        match self {
            FieldWidth::Word => "16",
            FieldWidth::Dword => "32",
            FieldWidth::Qword => "64",
            FieldWidth::Natural => "natural",
        }
    }
}

/// Kind of a VMCS field, from bits 11:10 of its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldKind {
    /// VM-execution, VM-exit and VM-entry control fields (type 0).
    Control,
    /// VM-exit information fields (type 1); read-only.
    ExitInfo,
    /// Guest-state area (type 2).
    Guest,
    /// Host-state area (type 3).
    Host,
}

impl FieldKind {
    /// Short name used by `l0-vmm fields`.
    pub fn name(self) -> &'static str {
        match self {
            FieldKind::Control => "control",
            FieldKind::ExitInfo => "exit-info",
            FieldKind::Guest => "guest",
            FieldKind::Host => "host",
        }
    }
}

/// Access type of an encoding (bit 0): full field or the high 32 bits of a
/// 64-bit field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccessType {
    /// Bit 0 clear: the whole field.
    Full,
    /// Bit 0 set: bits 63:32 of a 64-bit field (only valid with width 1).
    High,
}

/// The decoded bit layout of a 32-bit VMCS field encoding (SDM 24.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EncodingLayout {
    /// Bit 0.
    pub access: AccessType,
    /// Bits 9:1.
    pub index: u16,
    /// Bits 11:10.
    pub kind: FieldKind,
    /// Bits 14:13.
    pub width: FieldWidth,
}

/// Why an encoding is not a valid field encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// Bit 12 or bits 31:15 are set.
    #[error("encoding {0:#x} sets reserved bits (bit 12 or bits 31:15 must be 0)")]
    ReservedBits(u64),
    /// The HIGH access type is only defined for 64-bit fields.
    #[error("encoding {0:#x} uses the HIGH access type on a field that is not 64 bits wide")]
    HighOnNon64(u64),
    /// The layout is well formed but no such field exists in the SDM.
    #[error("encoding {0:#x} names no VMCS field this model supports")]
    UnknownField(u64),
}

impl EncodingLayout {
    /// Decodes an encoding as VMREAD/VMWRITE see it (the register operand
    /// is 64 bits wide in 64-bit mode; any bit above 31 is reserved too).
    pub fn decode(encoding: u64) -> Result<Self, EncodingError> {
        if encoding & !0x0000_6fff != 0 {
            return Err(EncodingError::ReservedBits(encoding));
        }
        let access = if encoding & 1 == 1 {
            AccessType::High
        } else {
            AccessType::Full
        };
        let index = ((encoding >> 1) & 0x1ff) as u16;
        let kind = match (encoding >> 10) & 3 {
            0 => FieldKind::Control,
            1 => FieldKind::ExitInfo,
            2 => FieldKind::Guest,
            _ => FieldKind::Host,
        };
        let width = match (encoding >> 13) & 3 {
            0 => FieldWidth::Word,
            1 => FieldWidth::Qword,
            2 => FieldWidth::Dword,
            _ => FieldWidth::Natural,
        };
        if access == AccessType::High && width != FieldWidth::Qword {
            return Err(EncodingError::HighOnNon64(encoding));
        }
        Ok(Self {
            access,
            index,
            kind,
            width,
        })
    }

    /// Re-encodes the layout.
    pub fn encode(self) -> u32 {
        let access = matches!(self.access, AccessType::High) as u32;
        let kind = match self.kind {
            FieldKind::Control => 0,
            FieldKind::ExitInfo => 1,
            FieldKind::Guest => 2,
            FieldKind::Host => 3,
        };
        let width = match self.width {
            FieldWidth::Word => 0,
            FieldWidth::Qword => 1,
            FieldWidth::Dword => 2,
            FieldWidth::Natural => 3,
        };
        access | (u32::from(self.index) << 1) | (kind << 10) | (width << 13)
    }
}

macro_rules! vmcs_fields {
    ($( $(#[$m:meta])* $name:ident = $enc:literal, $desc:literal; )*) => {
        /// Every VMCS field this model knows, named as in the SDM / Linux.
        ///
        /// The discriminant is the field's encoding (full access).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[allow(non_camel_case_types)]
        #[repr(u32)]
        pub enum VmcsField {
            $( #[doc = $desc] $(#[$m])* $name = $enc, )*
        }

        impl VmcsField {
            /// All fields, in encoding order of the SDM's tables.
            pub const ALL: &'static [VmcsField] = &[ $( VmcsField::$name, )* ];

            /// The SDM-style identifier (`GUEST_CR0`).
            pub fn name(self) -> &'static str {
                match self { $( VmcsField::$name => stringify!($name), )* }
            }

            /// The SDM's description of the field.
            pub fn description(self) -> &'static str {
                match self { $( VmcsField::$name => $desc, )* }
            }

            /// Looks a field up by its full-access encoding.
            pub fn from_full_encoding(encoding: u32) -> Option<Self> {
                match encoding { $( $enc => Some(VmcsField::$name), )* _ => None }
            }
        }
    };
}

vmcs_fields! {
    // B.1.1 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000, "Virtual-processor identifier (VPID)";
    POSTED_INTR_NV = 0x0002, "Posted-interrupt notification vector";
    EPTP_INDEX = 0x0004, "EPTP index";
    HLAT_PREFIX_SIZE = 0x0006, "HLAT prefix size";
    LAST_PID_POINTER_INDEX = 0x0008, "Last PID-pointer index";
    // B.1.2 16-bit guest-state fields
    GUEST_ES_SELECTOR = 0x0800, "Guest ES selector";
    GUEST_CS_SELECTOR = 0x0802, "Guest CS selector";
    GUEST_SS_SELECTOR = 0x0804, "Guest SS selector";
    GUEST_DS_SELECTOR = 0x0806, "Guest DS selector";
    GUEST_FS_SELECTOR = 0x0808, "Guest FS selector";
    GUEST_GS_SELECTOR = 0x080a, "Guest GS selector";
    GUEST_LDTR_SELECTOR = 0x080c, "Guest LDTR selector";
    GUEST_TR_SELECTOR = 0x080e, "Guest TR selector";
    GUEST_INTR_STATUS = 0x0810, "Guest interrupt status";
    GUEST_PML_INDEX = 0x0812, "PML index";
    GUEST_UINV = 0x0814, "Guest UINV (user-interrupt notification vector)";
    // B.1.3 16-bit host-state fields
    HOST_ES_SELECTOR = 0x0c00, "Host ES selector";
    HOST_CS_SELECTOR = 0x0c02, "Host CS selector";
    HOST_SS_SELECTOR = 0x0c04, "Host SS selector";
    HOST_DS_SELECTOR = 0x0c06, "Host DS selector";
    HOST_FS_SELECTOR = 0x0c08, "Host FS selector";
    HOST_GS_SELECTOR = 0x0c0a, "Host GS selector";
    HOST_TR_SELECTOR = 0x0c0c, "Host TR selector";
    // B.2.1 64-bit control fields
    IO_BITMAP_A = 0x2000, "Address of I/O bitmap A";
    IO_BITMAP_B = 0x2002, "Address of I/O bitmap B";
    MSR_BITMAP = 0x2004, "Address of MSR bitmaps";
    VM_EXIT_MSR_STORE_ADDR = 0x2006, "VM-exit MSR-store address";
    VM_EXIT_MSR_LOAD_ADDR = 0x2008, "VM-exit MSR-load address";
    VM_ENTRY_MSR_LOAD_ADDR = 0x200a, "VM-entry MSR-load address";
    EXECUTIVE_VMCS_POINTER = 0x200c, "Executive-VMCS pointer";
    PML_ADDRESS = 0x200e, "PML address";
    TSC_OFFSET = 0x2010, "TSC offset";
    VIRTUAL_APIC_PAGE_ADDR = 0x2012, "Virtual-APIC address";
    APIC_ACCESS_ADDR = 0x2014, "APIC-access address";
    POSTED_INTR_DESC_ADDR = 0x2016, "Posted-interrupt descriptor address";
    VM_FUNCTION_CONTROL = 0x2018, "VM-function controls";
    EPT_POINTER = 0x201a, "EPT pointer (EPTP)";
    EOI_EXIT_BITMAP0 = 0x201c, "EOI-exit bitmap 0";
    EOI_EXIT_BITMAP1 = 0x201e, "EOI-exit bitmap 1";
    EOI_EXIT_BITMAP2 = 0x2020, "EOI-exit bitmap 2";
    EOI_EXIT_BITMAP3 = 0x2022, "EOI-exit bitmap 3";
    EPTP_LIST_ADDRESS = 0x2024, "EPTP-list address";
    VMREAD_BITMAP = 0x2026, "VMREAD-bitmap address";
    VMWRITE_BITMAP = 0x2028, "VMWRITE-bitmap address";
    VE_INFORMATION_ADDRESS = 0x202a, "Virtualization-exception information address";
    XSS_EXIT_BITMAP = 0x202c, "XSS-exiting bitmap";
    ENCLS_EXITING_BITMAP = 0x202e, "ENCLS-exiting bitmap";
    SPPT_POINTER = 0x2030, "Sub-page-permission-table pointer";
    TSC_MULTIPLIER = 0x2032, "TSC multiplier";
    TERTIARY_VM_EXEC_CONTROL = 0x2034, "Tertiary processor-based VM-execution controls";
    ENCLV_EXITING_BITMAP = 0x2036, "ENCLV-exiting bitmap";
    LOW_PASID_DIRECTORY = 0x2038, "Low PASID directory address";
    HIGH_PASID_DIRECTORY = 0x203a, "High PASID directory address";
    SHARED_EPT_POINTER = 0x203c, "Shared EPT pointer";
    PCONFIG_EXITING_BITMAP = 0x203e, "PCONFIG-exiting bitmap";
    HLAT_POINTER = 0x2040, "Hypervisor-managed linear-address translation pointer";
    PID_POINTER_TABLE = 0x2042, "PID-pointer table address";
    SECONDARY_VM_EXIT_CONTROLS = 0x2044, "Secondary VM-exit controls";
    SPEC_CTRL_MASK = 0x204a, "IA32_SPEC_CTRL mask";
    SPEC_CTRL_SHADOW = 0x204c, "IA32_SPEC_CTRL shadow";
    // B.2.2 64-bit read-only data field
    GUEST_PHYSICAL_ADDRESS = 0x2400, "Guest-physical address";
    // B.2.3 64-bit guest-state fields
    VMCS_LINK_POINTER = 0x2800, "VMCS link pointer";
    GUEST_IA32_DEBUGCTL = 0x2802, "Guest IA32_DEBUGCTL";
    GUEST_IA32_PAT = 0x2804, "Guest IA32_PAT";
    GUEST_IA32_EFER = 0x2806, "Guest IA32_EFER";
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808, "Guest IA32_PERF_GLOBAL_CTRL";
    GUEST_PDPTE0 = 0x280a, "Guest PDPTE0";
    GUEST_PDPTE1 = 0x280c, "Guest PDPTE1";
    GUEST_PDPTE2 = 0x280e, "Guest PDPTE2";
    GUEST_PDPTE3 = 0x2810, "Guest PDPTE3";
    GUEST_IA32_BNDCFGS = 0x2812, "Guest IA32_BNDCFGS";
    GUEST_IA32_RTIT_CTL = 0x2814, "Guest IA32_RTIT_CTL";
    GUEST_IA32_LBR_CTL = 0x2816, "Guest IA32_LBR_CTL";
    GUEST_IA32_PKRS = 0x2818, "Guest IA32_PKRS";
    // B.2.4 64-bit host-state fields
    HOST_IA32_PAT = 0x2c00, "Host IA32_PAT";
    HOST_IA32_EFER = 0x2c02, "Host IA32_EFER";
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2c04, "Host IA32_PERF_GLOBAL_CTRL";
    HOST_IA32_PKRS = 0x2c06, "Host IA32_PKRS";
    // B.3.1 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000, "Pin-based VM-execution controls";
    CPU_BASED_VM_EXEC_CONTROL = 0x4002, "Primary processor-based VM-execution controls";
    EXCEPTION_BITMAP = 0x4004, "Exception bitmap";
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006, "Page-fault error-code mask";
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008, "Page-fault error-code match";
    CR3_TARGET_COUNT = 0x400a, "CR3-target count";
    VM_EXIT_CONTROLS = 0x400c, "Primary VM-exit controls";
    VM_EXIT_MSR_STORE_COUNT = 0x400e, "VM-exit MSR-store count";
    VM_EXIT_MSR_LOAD_COUNT = 0x4010, "VM-exit MSR-load count";
    VM_ENTRY_CONTROLS = 0x4012, "VM-entry controls";
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014, "VM-entry MSR-load count";
    VM_ENTRY_INTR_INFO_FIELD = 0x4016, "VM-entry interruption-information field";
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018, "VM-entry exception error code";
    VM_ENTRY_INSTRUCTION_LEN = 0x401a, "VM-entry instruction length";
    TPR_THRESHOLD = 0x401c, "TPR threshold";
    SECONDARY_VM_EXEC_CONTROL = 0x401e, "Secondary processor-based VM-execution controls";
    PLE_GAP = 0x4020, "PLE_Gap";
    PLE_WINDOW = 0x4022, "PLE_Window";
    NOTIFY_WINDOW = 0x4024, "Instruction-timeout control (notify window)";
    // B.3.2 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400, "VM-instruction error";
    VM_EXIT_REASON = 0x4402, "Exit reason";
    VM_EXIT_INTR_INFO = 0x4404, "VM-exit interruption information";
    VM_EXIT_INTR_ERROR_CODE = 0x4406, "VM-exit interruption error code";
    IDT_VECTORING_INFO_FIELD = 0x4408, "IDT-vectoring information field";
    IDT_VECTORING_ERROR_CODE = 0x440a, "IDT-vectoring error code";
    VM_EXIT_INSTRUCTION_LEN = 0x440c, "VM-exit instruction length";
    VMX_INSTRUCTION_INFO = 0x440e, "VM-exit instruction information";
    // B.3.3 32-bit guest-state fields
    GUEST_ES_LIMIT = 0x4800, "Guest ES limit";
    GUEST_CS_LIMIT = 0x4802, "Guest CS limit";
    GUEST_SS_LIMIT = 0x4804, "Guest SS limit";
    GUEST_DS_LIMIT = 0x4806, "Guest DS limit";
    GUEST_FS_LIMIT = 0x4808, "Guest FS limit";
    GUEST_GS_LIMIT = 0x480a, "Guest GS limit";
    GUEST_LDTR_LIMIT = 0x480c, "Guest LDTR limit";
    GUEST_TR_LIMIT = 0x480e, "Guest TR limit";
    GUEST_GDTR_LIMIT = 0x4810, "Guest GDTR limit";
    GUEST_IDTR_LIMIT = 0x4812, "Guest IDTR limit";
    GUEST_ES_AR_BYTES = 0x4814, "Guest ES access rights";
    GUEST_CS_AR_BYTES = 0x4816, "Guest CS access rights";
    GUEST_SS_AR_BYTES = 0x4818, "Guest SS access rights";
    GUEST_DS_AR_BYTES = 0x481a, "Guest DS access rights";
    GUEST_FS_AR_BYTES = 0x481c, "Guest FS access rights";
    GUEST_GS_AR_BYTES = 0x481e, "Guest GS access rights";
    GUEST_LDTR_AR_BYTES = 0x4820, "Guest LDTR access rights";
    GUEST_TR_AR_BYTES = 0x4822, "Guest TR access rights";
    GUEST_INTERRUPTIBILITY_INFO = 0x4824, "Guest interruptibility state";
    GUEST_ACTIVITY_STATE = 0x4826, "Guest activity state";
    GUEST_SMBASE = 0x4828, "Guest SMBASE";
    GUEST_SYSENTER_CS = 0x482a, "Guest IA32_SYSENTER_CS";
    VMX_PREEMPTION_TIMER_VALUE = 0x482e, "VMX-preemption timer value";
    // B.3.4 32-bit host-state field
    HOST_IA32_SYSENTER_CS = 0x4c00, "Host IA32_SYSENTER_CS";
    // B.4.1 natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000, "CR0 guest/host mask";
    CR4_GUEST_HOST_MASK = 0x6002, "CR4 guest/host mask";
    CR0_READ_SHADOW = 0x6004, "CR0 read shadow";
    CR4_READ_SHADOW = 0x6006, "CR4 read shadow";
    CR3_TARGET_VALUE0 = 0x6008, "CR3-target value 0";
    CR3_TARGET_VALUE1 = 0x600a, "CR3-target value 1";
    CR3_TARGET_VALUE2 = 0x600c, "CR3-target value 2";
    CR3_TARGET_VALUE3 = 0x600e, "CR3-target value 3";
    // B.4.2 natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400, "Exit qualification";
    IO_RCX = 0x6402, "I/O RCX";
    IO_RSI = 0x6404, "I/O RSI";
    IO_RDI = 0x6406, "I/O RDI";
    IO_RIP = 0x6408, "I/O RIP";
    GUEST_LINEAR_ADDRESS = 0x640a, "Guest-linear address";
    // B.4.3 natural-width guest-state fields
    GUEST_CR0 = 0x6800, "Guest CR0";
    GUEST_CR3 = 0x6802, "Guest CR3";
    GUEST_CR4 = 0x6804, "Guest CR4";
    GUEST_ES_BASE = 0x6806, "Guest ES base";
    GUEST_CS_BASE = 0x6808, "Guest CS base";
    GUEST_SS_BASE = 0x680a, "Guest SS base";
    GUEST_DS_BASE = 0x680c, "Guest DS base";
    GUEST_FS_BASE = 0x680e, "Guest FS base";
    GUEST_GS_BASE = 0x6810, "Guest GS base";
    GUEST_LDTR_BASE = 0x6812, "Guest LDTR base";
    GUEST_TR_BASE = 0x6814, "Guest TR base";
    GUEST_GDTR_BASE = 0x6816, "Guest GDTR base";
    GUEST_IDTR_BASE = 0x6818, "Guest IDTR base";
    GUEST_DR7 = 0x681a, "Guest DR7";
    GUEST_RSP = 0x681c, "Guest RSP";
    GUEST_RIP = 0x681e, "Guest RIP";
    GUEST_RFLAGS = 0x6820, "Guest RFLAGS";
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822, "Guest pending debug exceptions";
    GUEST_SYSENTER_ESP = 0x6824, "Guest IA32_SYSENTER_ESP";
    GUEST_SYSENTER_EIP = 0x6826, "Guest IA32_SYSENTER_EIP";
    GUEST_S_CET = 0x6828, "Guest IA32_S_CET";
    GUEST_SSP = 0x682a, "Guest SSP";
    GUEST_INTR_SSP_TABLE = 0x682c, "Guest IA32_INTERRUPT_SSP_TABLE_ADDR";
    // B.4.4 natural-width host-state fields
    HOST_CR0 = 0x6c00, "Host CR0";
    HOST_CR3 = 0x6c02, "Host CR3";
    HOST_CR4 = 0x6c04, "Host CR4";
    HOST_FS_BASE = 0x6c06, "Host FS base";
    HOST_GS_BASE = 0x6c08, "Host GS base";
    HOST_TR_BASE = 0x6c0a, "Host TR base";
    HOST_GDTR_BASE = 0x6c0c, "Host GDTR base";
    HOST_IDTR_BASE = 0x6c0e, "Host IDTR base";
    HOST_IA32_SYSENTER_ESP = 0x6c10, "Host IA32_SYSENTER_ESP";
    HOST_IA32_SYSENTER_EIP = 0x6c12, "Host IA32_SYSENTER_EIP";
    HOST_RSP = 0x6c14, "Host RSP";
    HOST_RIP = 0x6c16, "Host RIP";
    HOST_S_CET = 0x6c18, "Host IA32_S_CET";
    HOST_SSP = 0x6c1a, "Host SSP";
    HOST_INTR_SSP_TABLE = 0x6c1c, "Host IA32_INTERRUPT_SSP_TABLE_ADDR";
}

impl VmcsField {
    /// Number of fields in the catalogue.
    pub const COUNT: usize = Self::ALL.len();

    /// The full-access encoding.
    pub fn encoding(self) -> u32 {
        self as u32
    }

    /// Position of the field in [`VmcsField::ALL`] (the storage slot).
    pub fn ordinal(self) -> usize {
        // ALL is sorted by encoding, so a binary search always finds it.
        Self::ALL
            .binary_search(&self)
            .unwrap_or_else(|_| unreachable!("every variant is in ALL"))
    }

    /// The decoded layout of the full encoding.
    pub fn layout(self) -> EncodingLayout {
        match EncodingLayout::decode(u64::from(self.encoding())) {
            Ok(layout) => layout,
            Err(_) => unreachable!("the catalogue only holds well-formed encodings"),
        }
    }

    /// Field width.
    pub fn width(self) -> FieldWidth {
        self.layout().width
    }

    /// Field kind.
    pub fn kind(self) -> FieldKind {
        self.layout().kind
    }

    /// Whether the field is in the read-only VM-exit information group.
    ///
    /// VMWRITE to such a field fails with error 13 unless
    /// IA32_VMX_MISC bit 29 is advertised (SDM 31.3, VMWRITE).
    pub fn is_read_only(self) -> bool {
        self.kind() == FieldKind::ExitInfo
    }

    /// Looks a field up by its SDM-style name (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

/// A resolved VMREAD/VMWRITE operand: a field and how it is accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldAccess {
    /// The field.
    pub field: VmcsField,
    /// Full or HIGH access.
    pub access: AccessType,
}

impl FieldAccess {
    /// Resolves a 64-bit VMREAD/VMWRITE encoding operand.
    pub fn resolve(encoding: u64) -> Result<Self, EncodingError> {
        let layout = EncodingLayout::decode(encoding)?;
        let full = (encoding as u32) & !1;
        let field =
            VmcsField::from_full_encoding(full).ok_or(EncodingError::UnknownField(encoding))?;
        Ok(Self {
            field,
            access: layout.access,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_catalogue_is_sorted_and_unique() {
        for pair in VmcsField::ALL.windows(2) {
            assert!(pair[0].encoding() < pair[1].encoding(), "{:?}", pair);
        }
    }

    #[test]
    fn test_catalogue_has_at_least_170_fields() {
        const { assert!(VmcsField::COUNT >= 170) };
        assert_eq!(VmcsField::ALL.len(), VmcsField::COUNT);
    }

    #[test]
    fn test_every_encoding_decodes_and_reencodes() {
        for &f in VmcsField::ALL {
            let layout = f.layout();
            assert_eq!(layout.access, AccessType::Full);
            assert_eq!(layout.encode(), f.encoding(), "{}", f.name());
            assert_eq!(VmcsField::from_full_encoding(f.encoding()), Some(f));
            assert_eq!(VmcsField::from_name(f.name()), Some(f));
            assert_eq!(VmcsField::ALL[f.ordinal()], f);
        }
    }

    #[test]
    fn test_kind_and_width_of_known_fields() {
        assert_eq!(VmcsField::GUEST_CR0.width(), FieldWidth::Natural);
        assert_eq!(VmcsField::GUEST_CR0.kind(), FieldKind::Guest);
        assert_eq!(VmcsField::VM_EXIT_REASON.width(), FieldWidth::Dword);
        assert!(VmcsField::VM_EXIT_REASON.is_read_only());
        assert_eq!(VmcsField::EPT_POINTER.width(), FieldWidth::Qword);
        assert_eq!(VmcsField::HOST_CS_SELECTOR.width(), FieldWidth::Word);
        assert_eq!(VmcsField::HOST_CS_SELECTOR.kind(), FieldKind::Host);
        assert!(!VmcsField::GUEST_RIP.is_read_only());
    }

    #[test]
    fn test_decode_rejects_reserved_bits() {
        assert_eq!(
            EncodingLayout::decode(0x1000),
            Err(EncodingError::ReservedBits(0x1000))
        );
        assert_eq!(
            EncodingLayout::decode(0x8000),
            Err(EncodingError::ReservedBits(0x8000))
        );
        assert_eq!(
            EncodingLayout::decode(1 << 32 | 0x6800),
            Err(EncodingError::ReservedBits(1 << 32 | 0x6800))
        );
    }

    #[test]
    fn test_high_access_only_on_64_bit_fields() {
        let r = FieldAccess::resolve(0x201b).unwrap();
        assert_eq!(r.field, VmcsField::EPT_POINTER);
        assert_eq!(r.access, AccessType::High);
        assert_eq!(
            FieldAccess::resolve(0x6801),
            Err(EncodingError::HighOnNon64(0x6801))
        );
        assert_eq!(
            FieldAccess::resolve(0x4003),
            Err(EncodingError::HighOnNon64(0x4003))
        );
    }

    #[test]
    fn test_unknown_field_is_rejected() {
        assert_eq!(
            FieldAccess::resolve(0x6830),
            Err(EncodingError::UnknownField(0x6830))
        );
    }
}
