//! Link the kernel binary as a static, non-PIE image at 1 MiB with no C
//! runtime (only when the `kernel` feature builds the binary).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_some() {
        for arg in [
            "-nostartfiles",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--image-base=0x100000",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}
