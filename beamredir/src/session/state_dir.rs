//! The state directory (`/run/beamredir` by default): session records, lock files, control
//! sockets and DNS files. Root later trusts what it reads here, so:
//! * the directory and every parent must be owned by root and writable by nobody else (a
//!   sticky parent like /tmp is fine: others cannot rename what root put there);
//! * everything is opened relative to one directory fd, never following a symlink, and files
//!   are replaced atomically (a temporary created with O_EXCL, then renamed over).
use std::{
    fs,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use nix::{fcntl::OFlag, sys::stat::Mode};

use super::{SessionError, record::SessionRecord};

/// Largest record beamredir reads (a record with every redirect of a full map fits).
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// An exclusive flock on a session's lock file (released on drop or process death).
pub type SessionLock = nix::fcntl::Flock<fs::File>;

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn err(&self) -> impl FnOnce(io::Error) -> SessionError + '_ {
        |source| SessionError::State {
            path: self.root.clone(),
            source,
        }
    }

    /// Creates the directory if needed (mode 0711: others may reach the files they are given,
    /// not list them) and, as root, checks that it and every parent are trustworthy.
    pub fn ensure(&self) -> Result<(), SessionError> {
        let as_root = nix::unistd::geteuid().is_root();
        // Check what exists before creating anything below it.
        self.verify()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(self.err())?;
        if as_root {
            check_trusted_chain(&self.root, true)?;
        }
        Ok(())
    }

    /// As root, checks the directory (or, while it does not exist, its nearest existing parent)
    /// and every parent: owned by root, writable by nobody else (see [`check_trusted_chain`]),
    /// and no symbolic link on the way that anyone but root could change (see
    /// [`check_links`]). Every root command that reads or writes the directory calls this
    /// first, not only those that create sessions: `down`, `exec`, `shell` and `status` act on
    /// the records they read (signal a pid, move processes, join a cgroup). As another user it
    /// checks nothing: such a user cannot act on what they read.
    pub fn verify(&self) -> Result<(), SessionError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let absolute = std::path::absolute(&self.root).map_err(self.err())?;
        check_links(&absolute)?;
        let existing = absolute
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        check_trusted_chain(existing, existing == absolute)
    }

    /// The directory, opened without following a symlink.
    fn dir(&self) -> Result<OwnedFd, SessionError> {
        let fd = nix::fcntl::open(
            &self.root,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| self.err()(e.into()))?;
        // SAFETY: open returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens `name` in the directory for reading, refusing symlinks and anything but a regular
    /// file of at most `max` bytes.
    fn read_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, SessionError> {
        let dir = self.dir()?;
        let fd = match nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(nix::errno::Errno::ELOOP) => {
                return Err(SessionError::Symlink {
                    path: self.root.join(name),
                });
            }
            Err(e) => {
                return Err(SessionError::State {
                    path: self.root.join(name),
                    source: e.into(),
                });
            }
        };
        // SAFETY: a new fd owned by this File.
        let file = unsafe { fs::File::from_raw_fd(fd) };
        let meta = file.metadata().map_err(self.err())?;
        if !meta.is_file() || meta.len() > max {
            return Err(SessionError::State {
                path: self.root.join(name),
                source: io::Error::other("not a regular file of a sane size"),
            });
        }
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes).map_err(self.err())?;
        Ok(Some(bytes))
    }

    /// Replaces `name` atomically with `bytes`, mode `mode`, owned by `owner` (uid, gid) if
    /// given. Never follows a symlink: the temporary is created with O_EXCL|O_NOFOLLOW and
    /// renamed over the target within the directory fd.
    pub fn write_file(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), SessionError> {
        let dir = self.dir()?;
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let path_err = |source: io::Error| SessionError::State {
            path: self.root.join(name),
            source,
        };
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| path_err(e.into()))?;
        // SAFETY: a new fd owned by this File.
        let mut file = unsafe { fs::File::from_raw_fd(fd) };
        let written = (|| -> io::Result<()> {
            file.write_all(bytes)?;
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(file.as_raw_fd(), Some(uid.into()), Some(gid.into()))?;
            }
            nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
            Ok(())
        })();
        let renamed = written.and_then(|()| {
            nix::fcntl::renameat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                Some(dir.as_raw_fd()),
                name,
            )
            .map_err(io::Error::from)
        });
        if renamed.is_err() {
            let _ = nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        renamed.map_err(path_err)
    }

    /// Removes `name` from the directory (never following a symlink: unlink removes the link).
    pub fn remove_file(&self, name: &str) {
        if let Ok(dir) = self.dir() {
            let _ = nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    pub fn lock_name(name: &str) -> String {
        format!("{name}.lock")
    }

    /// Takes the session name: an exclusive flock on `NAME.lock`, held for the session's life
    /// (the kernel drops it when the process dies). None if another process holds it.
    pub fn try_lock(&self, name: &str) -> Result<Option<SessionLock>, SessionError> {
        let dir = self.dir()?;
        let lock = Self::lock_name(name);
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            lock.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP => SessionError::Symlink {
                path: self.root.join(&lock),
            },
            e => SessionError::State {
                path: self.root.join(&lock),
                source: e.into(),
            },
        })?;
        // SAFETY: a new fd owned by this File.
        let file = unsafe { fs::File::from_raw_fd(fd) };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(SessionError::State {
                path: self.root.join(lock),
                source: e.into(),
            }),
        }
    }

    pub fn record_name(name: &str) -> String {
        format!("{name}.json")
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.sock"))
    }

    /// Where a private cgroup2 mount goes if none is visible.
    pub fn private_cgroup_mount(&self) -> PathBuf {
        self.root.join(format!("cgroup2.{}", std::process::id()))
    }

    /// Writes a record (root only, mode 0600: it tells which local ports the forwards use).
    pub fn write(&self, record: &SessionRecord) -> Result<(), SessionError> {
        let json = serde_json::to_vec_pretty(record).expect("record serializes");
        self.write_file(&Self::record_name(&record.name), &json, 0o600, None)
    }

    /// Removes every file of a session: record, socket, DNS files, lock.
    pub fn remove(&self, name: &str) {
        self.remove_file(&format!("{name}.sock"));
        for f in super::dns_files::DnsFiles::file_names(name) {
            self.remove_file(&f);
        }
        self.remove_file(&Self::record_name(name));
        self.remove_file(&Self::lock_name(name));
    }

    /// A session's record, checked (see [`SessionRecord::validate`]). Ok(None) if there is none.
    pub fn load(&self, name: &str) -> Result<Option<SessionRecord>, SessionError> {
        super::validate_name(name)?;
        let Some(bytes) = self.read_file(&Self::record_name(name), MAX_RECORD_BYTES)? else {
            return Ok(None);
        };
        let invalid = |reason: String| SessionError::InvalidRecord {
            path: self.root.join(Self::record_name(name)),
            reason,
        };
        let record: SessionRecord =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        record.validate(name).map_err(|e| invalid(e.to_string()))?;
        Ok(Some(record))
    }

    /// Every valid record, sorted by name. Invalid ones are reported once each and skipped:
    /// nothing acts on them.
    pub fn list(&self) -> Vec<SessionRecord> {
        let Ok(dir) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(String::from)
            })
            .filter(|n| super::validate_name(n).is_ok())
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| match self.load(&n) {
                Ok(r) => r,
                Err(e) => {
                    // Once per process: `down --all` lists twice (its targets, then the stale).
                    static REPORTED: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
                        std::sync::Mutex::new(std::collections::BTreeSet::new());
                    if REPORTED.lock().unwrap().insert(self.root.join(&n)) {
                        log::warn!("{e}");
                    }
                    None
                }
            })
            .collect()
    }
}

/// Checks `path` and each parent: owned by root, and not writable by group or others unless
/// sticky (a sticky parent is fine for a root-owned child). `path` itself must not be
/// writable by others at all when `is_state_dir`.
fn check_trusted_chain(path: &Path, is_state_dir: bool) -> Result<(), SessionError> {
    let canonical = fs::canonicalize(path).map_err(|source| SessionError::State {
        path: path.to_path_buf(),
        source,
    })?;
    for (i, p) in canonical.ancestors().enumerate() {
        let meta = fs::symlink_metadata(p).map_err(|source| SessionError::State {
            path: p.to_path_buf(),
            source,
        })?;
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        let last = i == 0 && is_state_dir;
        let why = if !meta.is_dir() {
            Some("is not a directory".to_string())
        } else if meta.uid() != 0 {
            Some(format!("is owned by uid {}, not root", meta.uid()))
        } else if writable_by_others && (last || !sticky) {
            Some(format!(
                "is writable by others (mode {:04o})",
                meta.mode() & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(SessionError::UntrustedStateDir {
                path: canonical.clone(),
                culprit: p.to_path_buf(),
                why,
            });
        }
    }
    Ok(())
}

/// Checks every symbolic link on the way to `path` (absolute; components that do not exist
/// yet end the walk): it must be root's, in a directory nobody else may write (or a sticky
/// one). [`check_trusted_chain`] checks the directories the path resolves to *now*; a link
/// that its owner (or whoever may write its directory) can re-point would make later
/// path-based opens land somewhere else.
fn check_links(path: &Path) -> Result<(), SessionError> {
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        let Ok(meta) = fs::symlink_metadata(&prefix) else {
            break;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        if meta.uid() != 0 {
            return Err(SessionError::UntrustedStateDir {
                path: path.to_path_buf(),
                culprit: prefix,
                why: format!("is a symbolic link owned by uid {}, not root", meta.uid()),
            });
        }
        check_trusted_chain(prefix.parent().unwrap_or(Path::new("/")), false)?;
    }
    Ok(())
}

/// Binds a unix socket at `path` with only its owner (root) allowed to connect: the mode is
/// set by the umask at bind time, so there is no moment when the socket is open to all.
pub fn bind_private_socket(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let _ = fs::remove_file(path);
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound
}
