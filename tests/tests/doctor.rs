//! `beamredir doctor` on the kernel it runs on: every feature beamredir needs is probed on its
//! own line, and all pass here (on the host, and in `cargo xtask test --vm`'s 6.1 guest).
use anyhow::Result;
use beamredir_testbed::{TempDir, beamredir_bin, require_root};

#[test]
fn doctor_passes_and_names_every_feature() -> Result<()> {
    require_root()?;
    let state = TempDir::new("brdoctor")?;
    let out = std::process::Command::new(beamredir_bin()).arg("doctor").env("BEAMREDIR_STATE_DIR", state.path()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "doctor failed:\n{text}");
    assert!(text.contains("beamredir can run here."), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    Ok(())
}
