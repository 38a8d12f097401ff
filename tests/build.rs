//! Builds the test kernels in `tests/kernels/` with plain `rustc` (no
//! nested cargo: they use no crates) for the host target with
//! panic=abort and without SSE, linked as flat static images at 1 MiB with the L1 kernel's
//! linker script, and exports their paths:
//! `TEST_KERNEL_ELF64` (entered in 64-bit mode),
//! `TEST_KERNEL_MULTIBOOT` (Multiboot v1, 32-bit entry) and
//! `TEST_KERNEL_PLATFORM` (Multiboot v1: fw_cfg, modules, local APIC timer),
//! `TEST_KERNEL_UNMODIFIED_L1` (Multiboot v1: an L1 hypervisor without the trap port).
use std::path::{Path, PathBuf};
use std::process::Command;

fn build_kernel(rustc: &str, workspace: &Path, out_dir: &Path, name: &str, entry: &str) -> PathBuf {
    let src = workspace.join("tests/kernels").join(format!("{name}.rs"));
    let out = out_dir.join(format!("test-kernel-{name}"));
    let script = workspace.join("l1-guest-hv/link.ld");
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2021", "--crate-type", "bin", "--crate-name"])
        .arg(format!("test_kernel_{name}"))
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
            // No SSE: KVM on this host cannot run SSE ALU instructions in
            // a guest (docs/l1-guest.md); the kernels have no floating point.
            "-C",
            "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
        ]);
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,--no-dynamic-linker",
        "-Wl,--gc-sections",
    ] {
        cmd.arg("-C").arg(format!("link-arg={arg}"));
    }
    cmd.arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg("-C")
        .arg(format!("link-arg=-Wl,-e,{entry}"))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {rustc} to build the test kernel {name}: {e}"));
    assert!(
        output.status.success(),
        "building test kernel {} failed (run the command below to see why):\n{:?}\n{}",
        src.display(),
        cmd,
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("tests lives in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    for dep in ["tests/kernels", "l1-guest-hv/src", "l1-guest-hv/link.ld"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dep).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let elf64 = build_kernel(&rustc, &workspace, &out_dir, "elf64", "_start");
    let multiboot = build_kernel(&rustc, &workspace, &out_dir, "multiboot", "_start32");
    println!("cargo:rustc-env=TEST_KERNEL_ELF64={}", elf64.display());
    println!(
        "cargo:rustc-env=TEST_KERNEL_MULTIBOOT={}",
        multiboot.display()
    );
    let unmodified = build_kernel(&rustc, &workspace, &out_dir, "unmodified_l1", "_start32");
    println!(
        "cargo:rustc-env=TEST_KERNEL_UNMODIFIED_L1={}",
        unmodified.display()
    );
    let platform = build_kernel(&rustc, &workspace, &out_dir, "platform", "_start32");
    println!(
        "cargo:rustc-env=TEST_KERNEL_PLATFORM={}",
        platform.display()
    );
}
