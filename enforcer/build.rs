//! Builds the kernel programs (`enforcer-ebpf`) for the BPF target with the
//! nightly toolchain and puts the object in `OUT_DIR`, where `src/kernel.rs`
//! embeds it, so `target/release/enforcer` is the whole product.

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "enforcer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../enforcer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)
}
