//! `l0-vmm`: see `l0_vmm::cli` for the commands.

fn main() {
    std::process::exit(l0_vmm::cli::main());
}
