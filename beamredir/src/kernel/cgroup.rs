//! The cgroup v2 side of a session: finding (or privately mounting) the cgroup2 hierarchy,
//! creating the session's child cgroup, moving processes in and out, and removing it.
//!
//! Paths inside the hierarchy are kept *relative to its root* (as in /proc/PID/cgroup), so a
//! record written by one beamredir can be resolved by another that sees the hierarchy mounted
//! elsewhere (e.g. under `ip netns exec`, which hides /sys/fs/cgroup).
use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 file system is visible (/proc/self/mountinfo has none) and mounting a private one at {path} failed: {source}; \
         run beamredir where cgroup2 is mounted (under `ip netns exec` use `nsenter --net=/run/netns/NAME` instead)"
    )]
    NoHierarchy { path: PathBuf, source: nix::Error },
    #[error("cgroup {0} does not exist (give a directory of the cgroup2 hierarchy, e.g. /sys/fs/cgroup/user.slice, or a path relative to its root)")]
    NotFound(String),
    #[error("cgroup {0} already exists and belongs to no known session; remove it (rmdir) or choose another --session")]
    AlreadyExists(PathBuf),
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// Parent directory (below the hierarchy root) of every session cgroup beamredir creates.
pub const SESSIONS_PARENT: &str = "beamredir";

/// The cgroup2 hierarchy as this process sees it.
#[derive(Debug)]
pub struct Hierarchy {
    mount_point: PathBuf,
    /// Set when beamredir mounted the hierarchy itself; unmounted on drop.
    private_mount: bool,
}

impl Hierarchy {
    /// Finds the cgroup2 mount in /proc/self/mountinfo or, if none is visible, mounts a private
    /// one at `fallback_dir`.
    pub fn open(fallback_dir: &Path) -> Result<Self, CgroupError> {
        if let Some(mount_point) = find_cgroup2_mount()? {
            return Ok(Self { mount_point, private_mount: false });
        }
        fs::create_dir_all(fallback_dir).map_err(io_err("creating", fallback_dir))?;
        nix::mount::mount(Some("cgroup2"), fallback_dir, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|source| CgroupError::NoHierarchy { path: fallback_dir.to_path_buf(), source })?;
        log::info!("no cgroup2 mount was visible; mounted one privately at {}", fallback_dir.display());
        Ok(Self { mount_point: fallback_dir.to_path_buf(), private_mount: true })
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Absolute path of a cgroup given relative to the hierarchy root ("/a/b" or "a/b").
    pub fn path_of(&self, rel: &str) -> PathBuf {
        self.mount_point.join(rel.trim_start_matches('/'))
    }

    /// Resolves a user-given `--cgroup` value: a directory inside this mount, or a path
    /// relative to the hierarchy root. Returns the root-relative form.
    pub fn resolve_existing(&self, given: &str) -> Result<String, CgroupError> {
        let as_path = Path::new(given);
        // `..` could leave the hierarchy (a directory with a file named cgroup.procs is not a
        // cgroup), and the record would not pass validation later.
        if as_path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(CgroupError::NotFound(given.to_string()));
        }
        let candidates = [
            as_path.strip_prefix(&self.mount_point).ok().map(|p| p.to_path_buf()),
            Some(PathBuf::from(given.trim_start_matches('/'))),
        ];
        for rel in candidates.into_iter().flatten() {
            if self.mount_point.join(&rel).join("cgroup.procs").is_file() {
                return Ok(format!("/{}", rel.display()).replace("//", "/"));
            }
        }
        Err(CgroupError::NotFound(given.to_string()))
    }

    /// The cgroup (root-relative) of process `pid`, from /proc/PID/cgroup's "0::" line.
    pub fn cgroup_of(pid: u32) -> Result<String, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .to_string())
    }

    /// Creates the session cgroup `/beamredir/NAME` (and its parent if needed).
    pub fn create_session_cgroup(&self, name: &str) -> Result<String, CgroupError> {
        let rel = format!("/{SESSIONS_PARENT}/{name}");
        let parent = self.path_of(SESSIONS_PARENT);
        fs::create_dir_all(&parent).map_err(io_err("creating cgroup", &parent))?;
        let path = self.path_of(&rel);
        match fs::create_dir(&path) {
            Ok(()) => Ok(rel),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(CgroupError::AlreadyExists(path)),
            Err(e) => Err(io_err("creating cgroup", &path)(e)),
        }
    }

    /// Opens a cgroup directory for attaching programs.
    pub fn open_dir(&self, rel: &str) -> Result<fs::File, CgroupError> {
        let path = self.path_of(rel);
        fs::File::open(&path).map_err(io_err("opening cgroup", &path))
    }

    /// Opens `cgroup.procs` of a cgroup for writing; writing "0" to it moves the writer in.
    pub fn open_procs(&self, rel: &str) -> Result<fs::File, CgroupError> {
        let path = self.path_of(rel).join("cgroup.procs");
        fs::OpenOptions::new().write(true).open(&path).map_err(io_err("opening", &path))
    }

    /// Processes currently in a cgroup.
    pub fn procs(&self, rel: &str) -> Result<Vec<u32>, CgroupError> {
        let path = self.path_of(rel).join("cgroup.procs");
        let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Removes a session cgroup, first moving any process still in it to `evacuate_to` (or the
    /// hierarchy root if that cgroup is gone), then the `/beamredir` parent if it is empty.
    pub fn remove_session_cgroup(&self, rel: &str, evacuate_to: &str) -> Result<(), CgroupError> {
        let path = self.path_of(rel);
        if !path.exists() {
            return Ok(());
        }
        let target = if self.path_of(evacuate_to).join("cgroup.procs").is_file() { evacuate_to } else { "/" };
        // A process may fork while we move; a few rounds settle it.
        for _ in 0..10 {
            let pids = self.procs(rel)?;
            if pids.is_empty() {
                break;
            }
            let procs = self.open_procs(target)?;
            for pid in pids {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                log::info!("process {pid} ({}) outlived the session; moving it from {rel} to {target}", comm.trim());
                // The process may have exited meanwhile (ESRCH): nothing to move then.
                let _ = nix::unistd::write(procs.as_fd(), pid.to_string().as_bytes());
            }
        }
        let mut last = None;
        for _ in 0..50 {
            match fs::remove_dir(&path) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                // EBUSY while the last moved process is still being accounted for.
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Some(e) = last {
            return Err(io_err("removing cgroup", &path)(e));
        }
        // Only succeeds when no other session is left under the parent.
        let _ = fs::remove_dir(self.path_of(SESSIONS_PARENT));
        Ok(())
    }
}

impl Drop for Hierarchy {
    fn drop(&mut self) {
        if self.private_mount {
            let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&self.mount_point);
        }
    }
}

/// The mount point of the first cgroup2 file system in /proc/self/mountinfo, if any.
pub fn find_cgroup2_mount() -> Result<Option<PathBuf>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    Ok(parse_mountinfo_cgroup2(&text))
}

fn parse_mountinfo_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd";
        assert_eq!(parse_mountinfo_cgroup2(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(parse_mountinfo_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let none = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw";
        assert_eq!(parse_mountinfo_cgroup2(none), None);
        let escaped = "35 24 0:30 / /mnt/my\\040cg rw - cgroup2 none rw";
        assert_eq!(parse_mountinfo_cgroup2(escaped), Some(PathBuf::from("/mnt/my cg")));
    }
}
