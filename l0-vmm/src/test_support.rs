//! Helpers shared by the KVM tests here and the end-to-end suite.

/// Whether KVM tests can run. Returns `false` (after printing why) when
/// /dev/kvm cannot be opened, so the caller returns early; panics instead
/// when the environment sets `REQUIRE_KVM=1`, so CI cannot skip silently.
pub fn kvm_or_skip() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            let required = std::env::var("REQUIRE_KVM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            eprintln!("skipping KVM test: /dev/kvm cannot be opened ({e}); set REQUIRE_KVM=1 to make this a failure");
            false
        }
    }
}
