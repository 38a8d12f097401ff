pub const L1_GUEST_ELF: &str = env!("L1_GUEST_ELF");
fn main() {
    println!("{}", L1_GUEST_ELF);
}
