//! Builds the L1 guest kernel (`l1-guest-hv`, feature `kernel`, profile `l1`)
//! with a nested cargo in its own target directory, and hands its path to
//! the crate as `L1_GUEST_ELF`.
//!
//! The kernel is compiled without SSE: KVM on this project's host cannot run
//! SSE ALU instructions in a guest (they exit as emulation failures; see
//! `docs/l1-guest.md`). The flags go through `CARGO_ENCODED_RUSTFLAGS` with an
//! explicit `--target`, so they reach only the kernel's crates, not build
//! scripts or proc macros. rustc warns that x86_64's ABI wants SSE2; the
//! kernel has no floating point, so that ABI difference never arises.
use std::path::PathBuf;
use std::process::Command;

/// Code generation flags for the kernel (also used for the test kernels in
/// `tests/build.rs`).
const KERNEL_RUSTFLAGS: &[&str] =
    &["-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2"];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("l0-vmm lives in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("l1-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("l1-guest-hv").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("vmcs12/src").display()
    );
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    assert!(
        target.starts_with("x86_64-"),
        "the L1 guest kernel is x86_64 code; build l0-vmm for an x86_64 target (got {target})"
    );
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            "l1-guest-hv",
            "--bin",
            "l1-guest-hv",
            "--features",
            "kernel",
            "--profile",
            "l1",
            "--target",
            &target,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", KERNEL_RUSTFLAGS.join("\x1f"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("could not run cargo to build the L1 guest kernel");
    assert!(status.success(), "building the L1 guest kernel (l1-guest-hv) failed; run `cargo build -p l1-guest-hv --features kernel --profile l1` to see why");
    let elf = target_dir.join(&target).join("l1/l1-guest-hv");
    println!("cargo:rustc-env=L1_GUEST_ELF={}", elf.display());
}
