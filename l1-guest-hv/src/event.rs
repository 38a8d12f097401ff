//! Events L1 injects into L2 through the VM-entry interruption-information
//! field (SDM Vol. 3, 25.8.3 and 27.6).

use vmcs12::controls::intr_info;

/// An event to deliver at the next VM entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An external interrupt (type 0): needs RFLAGS.IF = 1 and no STI or
    /// MOV-SS blocking in L2 (SDM 27.3.1.5).
    ExternalInterrupt {
        /// Vector.
        vector: u8,
    },
    /// A hardware exception (type 3), with an error code for the vectors
    /// that push one.
    HardwareException {
        /// Vector (0-31).
        vector: u8,
        /// The error code to push, if any.
        error_code: Option<u32>,
    },
    /// A software interrupt INT n (type 4): the return address pushed is
    /// GUEST_RIP + `instruction_len`.
    SoftwareInterrupt {
        /// Vector.
        vector: u8,
        /// VM_ENTRY_INSTRUCTION_LEN (1-15).
        instruction_len: u32,
    },
}

/// Whether an exception vector pushes an error code in protected mode
/// (SDM Vol. 3, 6.15: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP).
pub fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}

impl Event {
    /// The VM_ENTRY_INTR_INFO_FIELD value (valid bit set).
    pub fn intr_info(&self) -> u32 {
        let (vector, kind, has_error) = match *self {
            Event::ExternalInterrupt { vector } => (vector, intr_info::TYPE_EXT_INTR, false),
            Event::HardwareException { vector, error_code } => {
                (vector, intr_info::TYPE_HARD_EXCEPTION, error_code.is_some())
            }
            Event::SoftwareInterrupt { vector, .. } => (vector, intr_info::TYPE_SOFT_INTR, false),
        };
        let error = if has_error {
            intr_info::DELIVER_ERROR_CODE
        } else {
            0
        };
        intr_info::VALID | error | kind | u32::from(vector)
    }

    /// VM_ENTRY_EXCEPTION_ERROR_CODE, when the event has one.
    pub fn error_code(&self) -> Option<u32> {
        match *self {
            Event::HardwareException { error_code, .. } => error_code,
            _ => None,
        }
    }

    /// VM_ENTRY_INSTRUCTION_LEN, for software events.
    pub fn instruction_len(&self) -> Option<u32> {
        match *self {
            Event::SoftwareInterrupt {
                instruction_len, ..
            } => Some(instruction_len),
            _ => None,
        }
    }

    /// Whether VM entry accepts the event as built, for a protected-mode
    /// L2 without unrestricted guest (SDM 27.2.1.3): an error code exactly
    /// for the vectors that push one, software lengths 1-15, exception
    /// vectors below 32.
    pub fn is_valid(&self) -> bool {
        match *self {
            Event::ExternalInterrupt { .. } => true,
            Event::HardwareException { vector, error_code } => {
                vector < 32 && vector != 2 && error_code.is_some() == pushes_error_code(vector)
            }
            Event::SoftwareInterrupt {
                instruction_len, ..
            } => (1..=15).contains(&instruction_len),
        }
    }
}

/// Whether an interruption-information value has the valid bit (31): the
/// processor clears it in VM_ENTRY_INTR_INFO_FIELD at every VM exit
/// (SDM 28.2.5).
pub fn is_pending(intr_info_value: u64) -> bool {
    intr_info_value & u64::from(intr_info::VALID) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gp_with_error_code() {
        let e = Event::HardwareException {
            vector: 13,
            error_code: Some(0xabc0),
        };
        assert_eq!(e.intr_info(), 0x8000_0b0d);
        assert_eq!(e.error_code(), Some(0xabc0));
        assert_eq!(e.instruction_len(), None);
        assert!(e.is_valid());
        let no_code = Event::HardwareException {
            vector: 13,
            error_code: None,
        };
        assert_eq!(no_code.intr_info(), 0x8000_030d);
        assert!(!no_code.is_valid(), "#GP needs its error code");
        let ud_code = Event::HardwareException {
            vector: 6,
            error_code: Some(0),
        };
        assert!(!ud_code.is_valid(), "#UD has no error code");
    }

    #[test]
    fn test_software_and_external() {
        let int = Event::SoftwareInterrupt {
            vector: 0x30,
            instruction_len: 2,
        };
        assert_eq!(int.intr_info(), 0x8000_0430);
        assert_eq!(int.instruction_len(), Some(2));
        assert!(int.is_valid());
        assert!(!Event::SoftwareInterrupt {
            vector: 0x30,
            instruction_len: 0
        }
        .is_valid());
        let ext = Event::ExternalInterrupt { vector: 0x40 };
        assert_eq!(ext.intr_info(), 0x8000_0040);
        assert_eq!(ext.error_code(), None);
    }

    #[test]
    fn test_pending_bit() {
        assert!(is_pending(0x8000_0b0d));
        assert!(!is_pending(0x0000_0b0d));
        assert!(pushes_error_code(14) && pushes_error_code(8) && !pushes_error_code(6));
    }
}
