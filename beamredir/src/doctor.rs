//! `beamredir doctor`: can this host run beamredir, and if not, what to fix.
use std::path::Path;

use crate::kernel::{
    cgroup::{Hierarchy, find_cgroup2_mount},
    redirect::{LoadOptions, Redirector},
};

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when the check fails.
    pub fix: &'static str,
}

fn check(name: &'static str, result: Result<String, String>, fix: &'static str) -> Check {
    match result {
        Ok(detail) => Check { name, ok: true, detail, fix },
        Err(detail) => Check { name, ok: false, detail, fix },
    }
}

/// Parses "6.18.44-foo" into (6, 18).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Runs every check; `scratch_dir` is where a private cgroup2 mount may go.
pub fn run(scratch_dir: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let euid = nix::unistd::geteuid();
    checks.push(check(
        "root",
        if euid.is_root() { Ok("running as root".into()) } else { Err(format!("running as uid {euid}")) },
        "run beamredir with sudo (it needs CAP_BPF, CAP_NET_ADMIN and cgroup writes)",
    ));
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    checks.push(check(
        "kernel >= 5.8",
        match kernel_version(&release) {
            Some(v) if v >= (5, 8) => Ok(release.clone()),
            _ => Err(format!("kernel {release}")),
        },
        "cgroup/getpeername4 and bpf_link need Linux 5.8 or newer",
    ));
    checks.push(check(
        "BTF",
        if Path::new("/sys/kernel/btf/vmlinux").exists() {
            Ok("/sys/kernel/btf/vmlinux".into())
        } else {
            Err("/sys/kernel/btf/vmlinux is missing".into())
        },
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    ));
    checks.push(check(
        "cgroup2",
        match find_cgroup2_mount() {
            Ok(Some(p)) => Ok(format!("mounted at {}", p.display())),
            Ok(None) => Err("no cgroup2 mount visible (beamredir will try to mount one privately)".into()),
            Err(e) => Err(e.to_string()),
        },
        "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified); under `ip netns exec`, use nsenter --net=... instead",
    ));
    if !euid.is_root() {
        return checks;
    }
    let loaded = Redirector::load(LoadOptions::default());
    checks.push(check(
        "BPF syscall and verifier",
        loaded.as_ref().map(|_| "connect4/6 and getpeername4/6 load".into()).map_err(|e| format!("{e}")),
        "the kernel needs CONFIG_BPF_SYSCALL=y; check `dmesg` and kernel.unprivileged_bpf_disabled",
    ));
    if let Ok(mut redirector) = loaded {
        checks.push(check("cgroup-BPF attach", try_attach(&mut redirector, scratch_dir), "the kernel needs CONFIG_CGROUP_BPF=y"));
    }
    checks
}

/// Attaches the programs to a throw-away cgroup and removes it again.
fn try_attach(redirector: &mut Redirector, scratch_dir: &Path) -> Result<String, String> {
    let hierarchy = Hierarchy::open(scratch_dir).map_err(|e| e.to_string())?;
    let name = format!(".doctor-{}", std::process::id());
    let rel = hierarchy.create_session_cgroup(&name).map_err(|e| e.to_string())?;
    let result = hierarchy
        .open_dir(&rel)
        .map_err(|e| e.to_string())
        .and_then(|dir| redirector.attach(&dir).map_err(|e| e.to_string()));
    let removed = hierarchy.remove_session_cgroup(&rel, "/");
    result?;
    removed.map_err(|e| e.to_string())?;
    Ok("attached to a scratch cgroup and detached".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions() {
        assert_eq!(super::kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(super::kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(super::kernel_version("garbage"), None);
    }
}
