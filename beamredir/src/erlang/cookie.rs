//! An Erlang cookie, and how it reaches a local `erl` without ever being in argv.
//!
//! A [`Cookie`] never shows its value in `Debug` or `Display`. [`CookieFile`] hands it to a
//! local node as `.erlang.cookie` in a private home directory (0700, owned by the user who runs
//! the node; the file 0400, created with `O_EXCL|O_NOFOLLOW`; both removed on drop): the node
//! runs with `HOME` pointing there. Not an `-args_file`: erlexec expands an args file into the
//! emulator's own argv, so `-setcookie` from it shows in `/proc/PID/cmdline` of `beam.smp`
//! (checked on OTP 25.2). `auth` reads `$HOME/.erlang.cookie` when no `-setcookie` is given.
//!
//! Where the cookie comes from (a file, the user's environment, the pod's spec and its
//! Secrets) is [`crate::k8s::cookie`].
use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Longest cookie accepted: a cookie is an atom, and atoms hold at most 255 characters.
pub const MAX_COOKIE_LEN: usize = 255;

/// Why a cookie is refused, or its private home could not be made.
#[derive(Debug, Error)]
pub enum CookieError {
    #[error("the cookie is unusable: {0}")]
    Invalid(String),
    #[error("cannot write the local node's cookie file: {0}")]
    Write(std::io::Error),
}

/// An Erlang cookie. Its value shows nowhere except through [`Cookie::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Cookie(String);

impl Cookie {
    /// Checks a cookie: 1 to 255 printable ASCII characters (space included). Erlang digests a
    /// cookie as Latin-1 and erl decodes argv by locale, so anything else could differ between
    /// the local node and the pod; such a cookie is refused rather than silently mismatched.
    pub fn new(value: &str) -> Result<Cookie, CookieError> {
        if value.is_empty() {
            return Err(CookieError::Invalid("it is empty".into()));
        }
        if value.len() > MAX_COOKIE_LEN {
            return Err(CookieError::Invalid(format!("it is {} characters long; Erlang allows {MAX_COOKIE_LEN}", value.len())));
        }
        if let Some(c) = value.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
            let what = if c.is_ascii_control() { "a control character".to_string() } else { format!("the non-ASCII character {c:?}") };
            return Err(CookieError::Invalid(format!(
                "it contains {what}; beamredir passes only printable ASCII cookies, which erl reads the same in every locale"
            )));
        }
        Ok(Cookie(value.to_string()))
    }

    /// The value, for the places it must go (a digest, an args file).
    pub fn expose(&self) -> &str {
        &self.0
    }

}

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cookie(<{} characters, hidden>)", self.0.len())
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<cookie hidden>")
    }
}


/// The user a local node runs as: the cookie home and file are given to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Files of the user's real home the local node still reads (linked into the private home):
/// Erlang's `.erlang`, IEx's `.iex.exs`, and `.Xauthority`, where Xlib looks for the X server's
/// cookie when `XAUTHORITY` is not set (`ssh -X`, `startx`): without it `observer` could not
/// open its window there.
const LINKED_DOTFILES: [&str; 3] = [".erlang", ".iex.exs", ".Xauthority"];

/// A private home directory holding `.erlang.cookie`, removed on drop. Run the local node with
/// [`CookieFile::env`] (`HOME` and the XDG directories of the real home, so shell history and
/// `~/.config/erlang` stay the user's).
#[derive(Debug)]
pub struct CookieFile {
    dir: PathBuf,
    path: PathBuf,
    real_home: Option<PathBuf>,
}

impl CookieFile {
    /// Creates a fresh 0700 directory under `parent` with the 0400 `.erlang.cookie`, both owned
    /// by `owner` when given (root preparing them for the sudo user), else by the caller.
    /// `real_home` is the user's own home, whose dotfiles and XDG directories stay in use.
    pub fn create(cookie: &Cookie, parent: &Path, owner: Option<Owner>, real_home: Option<&Path>) -> Result<CookieFile, CookieError> {
        let dir = private_dir(parent).map_err(CookieError::Write)?;
        let path = dir.join(".erlang.cookie");
        let file = CookieFile { dir, path, real_home: real_home.map(Path::to_path_buf) };
        file.write(cookie, owner).map_err(CookieError::Write)?;
        Ok(file)
    }

    fn write(&self, cookie: &Cookie, owner: Option<Owner>) -> std::io::Result<()> {
        if let Some(o) = owner {
            std::os::unix::fs::chown(&self.dir, Some(o.uid), Some(o.gid))?;
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid))?;
        }
        f.write_all(cookie.expose().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        if let Some(real) = &self.real_home {
            for name in LINKED_DOTFILES {
                let target = real.join(name);
                if target.is_file() {
                    std::os::unix::fs::symlink(&target, self.dir.join(name))?;
                }
            }
        }
        Ok(())
    }

    /// The cookie file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private home directory.
    pub fn home(&self) -> &Path {
        &self.dir
    }

    /// Environment for the local node: `HOME` here, and (unless already set) the XDG config,
    /// cache and data directories of the real home.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("HOME".to_string(), self.dir.display().to_string())];
        if let Some(real) = &self.real_home {
            for (var, default) in [("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"), ("XDG_DATA_HOME", ".local/share")] {
                if std::env::var_os(var).is_none() {
                    env.push((var.to_string(), real.join(default).display().to_string()));
                }
            }
            // Named outright (not only linked): the private home may go once the node has
            // read its cookie, and observer opens its window after that.
            let xauthority = real.join(".Xauthority");
            if std::env::var_os("XAUTHORITY").is_none() && xauthority.is_file() {
                env.push(("XAUTHORITY".to_string(), xauthority.display().to_string()));
            }
        }
        env
    }
}

impl Drop for CookieFile {
    fn drop(&mut self) {
        for name in LINKED_DOTFILES {
            let _ = fs::remove_file(self.dir.join(name));
        }
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// `parent/beamredir-cookie-RANDOM`, created with mode 0700 (fails rather than reuse anything).
fn private_dir(parent: &Path) -> std::io::Result<PathBuf> {
    for _ in 0..16 {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let dir = parent.join(format!("beamredir-cookie-{name}"));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask can only remove bits; make sure of 0700 anyway.
                fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a private directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn cookie_never_shows_and_bad_cookies_are_refused() {
        let c = Cookie::new("very-secret").unwrap();
        assert!(!format!("{c:?} {c}").contains("very-secret"));
        assert!(Cookie::new("").is_err());
        assert!(Cookie::new(&"x".repeat(256)).is_err());
        assert!(Cookie::new("a\nb").unwrap_err().to_string().contains("control character"));
        assert!(Cookie::new("café").unwrap_err().to_string().contains("non-ASCII"));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("br-cookie-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn cookie_file_is_private_and_removed_on_drop() {
        let parent = tempdir();
        let real = parent.join("realhome");
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join(".iex.exs"), "IO.puts 1").unwrap();
        fs::write(real.join(".Xauthority"), "x").unwrap();
        let c = Cookie::new("abc def").unwrap();
        let f = CookieFile::create(&c, &parent, None, Some(&real)).unwrap();
        let dir = f.home().to_path_buf();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(f.path()).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(fs::read_to_string(f.path()).unwrap(), "abc def\n");
        assert_eq!(fs::read_link(dir.join(".iex.exs")).unwrap(), real.join(".iex.exs"));
        assert_eq!(fs::read_link(dir.join(".Xauthority")).unwrap(), real.join(".Xauthority"));
        assert!(!dir.join(".erlang").exists());
        assert_eq!(f.env()[0], ("HOME".to_string(), dir.display().to_string()));
        // A second file never reuses or follows what is there.
        let g = CookieFile::create(&c, &parent, None, None).unwrap();
        assert_ne!(g.home(), f.home());
        drop(f);
        drop(g);
        assert!(!dir.exists());
        fs::remove_dir_all(parent).unwrap();
    }
}
