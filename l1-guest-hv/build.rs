//! Link the kernel binary as a static, non-PIE, flat image at 1 MiB with no
//! C runtime (only when the `kernel` feature builds the binary). The linker
//! script `link.ld` keeps file offsets equal to load addresses minus 1 MiB so
//! the Multiboot a.out-kludge fields describe the file exactly.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_some() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
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
            println!("cargo:rustc-link-arg-bins={arg}");
        }
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
    }
}
