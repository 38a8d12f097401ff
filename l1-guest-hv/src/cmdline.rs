//! The Multiboot command line: `test=NAME` picks what L1 does.
//!
//! GRUB passes the kernel path as the first word (`/boot/kernel.elf32
//! test=demo`), our L0 passes only the arguments; both work.

/// What L1 runs, selected with `test=NAME` (default `demo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestMode {
    /// Full VMX bring-up, one L2 run with I/O, MSR and HLT exits.
    Demo,
    /// Every VMX instruction outcome, checked against the expected one.
    VmxErrors,
    /// L1 changes GUEST_RIP on L2's first exit; L2 continues there.
    RipChange,
    /// L2 executes CPUID (an unconditional exit); L1 emulates it.
    Cpuid,
    /// L2 raises #UD with the exception bitmap set; L1 sees exit 0.
    Exception,
    /// L2 does many intercepted OUTs; L1 counts them and prints one line.
    Bench,
    /// EPT with holes, a read-only, a non-executable and a misconfigured
    /// page; L1 checks each EPT exit and maps pages on demand.
    Ept,
    /// Unrestricted guest: L2 boots from real mode to long mode.
    Realmode,
    /// The real-mode L2 without unrestricted guest: VM entry refuses it.
    RealmodeNoUg,
    /// Event injection: #GP with error code, INT n, external interrupt.
    Inject,
    /// Driven by the scenario L0 wrote into guest memory (issue 7,
    /// `docs/scenarios.md`).
    Scenario,
}

impl TestMode {
    /// Every mode, in documentation order.
    pub const ALL: &'static [TestMode] = &[
        TestMode::Demo,
        TestMode::VmxErrors,
        TestMode::RipChange,
        TestMode::Cpuid,
        TestMode::Exception,
        TestMode::Bench,
        TestMode::Ept,
        TestMode::Realmode,
        TestMode::RealmodeNoUg,
        TestMode::Inject,
        TestMode::Scenario,
    ];

    /// The name used after `test=`.
    pub fn name(self) -> &'static str {
        match self {
            TestMode::Demo => "demo",
            TestMode::VmxErrors => "vmx-errors",
            TestMode::RipChange => "rip-change",
            TestMode::Cpuid => "cpuid",
            TestMode::Exception => "exception",
            TestMode::Bench => "bench",
            TestMode::Ept => "ept",
            TestMode::Realmode => "realmode",
            TestMode::RealmodeNoUg => "realmode-no-ug",
            TestMode::Inject => "inject",
            TestMode::Scenario => "scenario",
        }
    }

    /// Looks a mode up by name.
    pub fn from_name(name: &str) -> Option<TestMode> {
        TestMode::ALL.iter().copied().find(|m| m.name() == name)
    }
}

/// Why a command line does not select a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// `test=NAME` names no mode; use one of [`TestMode::ALL`].
    UnknownTest(&'a str),
}

/// The value of the last `key=value` word for `key`, if any.
pub fn value_of<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// The test mode the command line selects (`demo` when it has no `test=`).
pub fn test_mode(cmdline: &str) -> Result<TestMode, CmdlineError<'_>> {
    match value_of(cmdline, "test") {
        None => Ok(TestMode::Demo),
        Some(name) => TestMode::from_name(name).ok_or(CmdlineError::UnknownTest(name)),
    }
}

/// Whether a bare flag word (e.g. `quiet`) is present.
pub fn has_flag(cmdline: &str, flag: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_mode_is_demo() {
        assert_eq!(test_mode(""), Ok(TestMode::Demo));
        assert_eq!(test_mode("/boot/kernel.elf32"), Ok(TestMode::Demo));
    }

    #[test]
    fn test_mode_after_grub_kernel_path() {
        assert_eq!(
            test_mode("/boot/kernel.elf32 test=vmx-errors"),
            Ok(TestMode::VmxErrors)
        );
        assert_eq!(test_mode("test=rip-change  quiet"), Ok(TestMode::RipChange));
        assert_eq!(test_mode("test=realmode-no-ug"), Ok(TestMode::RealmodeNoUg));
        assert_eq!(test_mode("test=ept"), Ok(TestMode::Ept));
        assert_eq!(test_mode("test=scenario"), Ok(TestMode::Scenario));
    }

    #[test]
    fn test_unknown_mode_is_an_error() {
        assert_eq!(
            test_mode("test=nope"),
            Err(CmdlineError::UnknownTest("nope"))
        );
        assert_eq!(test_mode("test="), Err(CmdlineError::UnknownTest("")));
    }

    #[test]
    fn test_last_value_wins_and_prefix_does_not_match() {
        assert_eq!(value_of("test=demo test=bench", "test"), Some("bench"));
        assert_eq!(value_of("xtest=demo", "test"), None);
        assert_eq!(value_of("a=1=2", "a"), Some("1=2"));
    }

    #[test]
    fn test_every_mode_name_round_trips() {
        for m in TestMode::ALL {
            assert_eq!(TestMode::from_name(m.name()), Some(*m));
        }
        assert_eq!(TestMode::from_name("Demo"), None);
    }

    #[test]
    fn test_flags() {
        assert!(has_flag("test=demo quiet", "quiet"));
        assert!(!has_flag("test=quiet", "quiet"));
    }
}
