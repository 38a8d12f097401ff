//! Builds the L1 guest kernel (`l1-guest-hv`, feature `kernel`, profile `l1`)
//! with a nested cargo in its own target directory, and hands its path to
//! the crate as `L1_GUEST_ELF`.
use std::path::PathBuf;
use std::process::Command;

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
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("could not run cargo to build the L1 guest kernel");
    assert!(status.success(), "building the L1 guest kernel (l1-guest-hv) failed; run `cargo build -p l1-guest-hv --features kernel --profile l1` to see why");
    let elf = target_dir.join("l1/l1-guest-hv");
    println!("cargo:rustc-env=L1_GUEST_ELF={}", elf.display());
}
