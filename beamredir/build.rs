//! Builds the eBPF object (`beamredir-ebpf`, target bpfel-unknown-none, nightly + bpf-linker) so
//! a plain `cargo build` yields a binary with the programs embedded. `scripts/setup.sh`
//! installs what this needs.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../beamredir-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("UTF-8 path");
    let package = aya_build::Package { name: "beamredir-ebpf", root_dir: ebpf_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run scripts/setup.sh (installs nightly rust-src and bpf-linker)"
        )
    })
}
