//! `beamredir doctor` on the kernel it runs on: every feature beamredir needs is probed on its
//! own line, and all pass here (on the host, and in `cargo xtask test --vm`'s 6.1 guest).
use anyhow::Result;
use beamredir_testbed::{TempDir, beamredir_bin, cgroup2_root, require_root};

/// One line per feature, as docs/kernels.md lists them.
const FEATURES: &[&str] = &[
    "root",
    "kernel",
    "cgroup2",
    "BTF (not needed)",
    "bpf() syscall",
    "map: hash",
    "map: per-CPU array",
    "map: ring buffer",
    "read-only global data",
    "hook: connect4",
    "hook: connect6",
    "hook: getpeername4",
    "hook: getpeername6",
    "helper: get_netns_cookie",
    "helper: lookup, atomic add",
    "bpf_link for cgroups",
    "SO_NETNS_COOKIE",
    "INET_DIAG_CGROUP_ID",
    "beamredir programs load",
    "beamredir programs attach",
];

#[test]
fn doctor_passes_and_names_every_feature() -> Result<()> {
    require_root()?;
    let state = TempDir::new("brdoctor")?;
    let out = std::process::Command::new(beamredir_bin()).arg("doctor").env("BEAMREDIR_STATE_DIR", state.path()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "doctor failed:\n{text}");
    for feature in FEATURES {
        assert!(
            text.lines().any(|l| l.strip_prefix("ok    ").is_some_and(|rest| rest.starts_with(&format!("{feature} ")))),
            "no passing {feature:?} line:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("beamredir can run here."), "{text}");
    // The scratch cgroup is gone again.
    let leftovers: Vec<_> = std::fs::read_dir(cgroup2_root()?.join("beamredir"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".doctor-")).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "scratch cgroups left: {leftovers:?}");
    Ok(())
}
