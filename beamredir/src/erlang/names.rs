//! Name modes, the local OTP version, and the argv of local nodes that talk to a pod's node.
//!
//! * A node name's host part with a dot, or an IP address, is a **long** name (`-name`);
//!   anything else is **short** (`-sname`). Long and short names do not mix: a local node must
//!   use the mode of the node it dials (`inet_tcp_dist:splitnode` refuses, and logs, otherwise).
//! * The local node is **hidden** and uniquely named. With OTP 23+ `erl` gets a **dynamic**
//!   name (`-name undefined@127.0.0.1`, `-sname undefined@localhost`): the pod assigns it, it
//!   is not registered in any epmd, and the pod recycles it for the next session from the same
//!   host. `iex --remsh` of Elixir 1.14 cannot use a dynamic name (it pings the remote node
//!   first, and the first `net_adm:ping` of a dynamically named node answers `pang`), so iex
//!   gets a unique static hidden name (`beamredir_PID_RANDOM`), which costs the pod one atom.
//! * The cookie reaches the node as `$HOME/.erlang.cookie` in a private home
//!   ([`super::cookie::CookieFile`]), never argv; `ERL_INETRC` goes in the environment too.
use std::{
    fs,
    io::Read,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

/// Long (`-name`, `name@host.domain` or `name@IP`) or short (`-sname`, `name@host`) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMode {
    Long,
    Short,
}

/// An OTP release number (`OTP_VERSION`: `25.2.3`, `26.0`, `27.0-rc1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OtpVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for OtpVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The OTP release dynamic node names need.
pub const DYNAMIC_NAMES_SINCE: u32 = 23;

/// Errors in plain words: what was wrong, what to do.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NamesError {
    #[error("{0:?} is not a node name (NAME@HOST)")]
    NotANodeName(String),
    #[error(
        "the node calls itself {actual}, not {expected}; dial {actual} (nodes only answer to their exact name), \
         or drop --node to use what the node says"
    )]
    NameMismatch { expected: String, actual: String },
    #[error("{feature} needs OTP {needed} or later on this machine, which has OTP {found}; install a newer Erlang")]
    OtpTooOld { feature: &'static str, needed: u32, found: OtpVersion },
    #[error("cannot find the local OTP version: {0}; is Erlang installed (erl on PATH)?")]
    OtpVersionUnknown(String),
}

/// The mode of an exact node name: long if its host part has a dot or is an IP address.
pub fn mode_of(node: &str) -> Result<NameMode, NamesError> {
    let (name, host) = node.split_once('@').ok_or_else(|| NamesError::NotANodeName(node.into()))?;
    if name.is_empty() || host.is_empty() || host.contains('@') {
        return Err(NamesError::NotANodeName(node.into()));
    }
    Ok(if host.contains('.') || host.parse::<IpAddr>().is_ok() { NameMode::Long } else { NameMode::Short })
}

/// Checks the name a user gave (`--node`) against the name the node gave itself.
pub fn check_expected(expected: &str, actual: &str) -> Result<(), NamesError> {
    if expected == actual {
        Ok(())
    } else {
        Err(NamesError::NameMismatch { expected: expected.into(), actual: actual.into() })
    }
}

/// Parses `OTP_VERSION` text.
pub fn parse_otp_version(text: &str) -> Option<OtpVersion> {
    let first = text.lines().next()?.trim();
    let numeric = first.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    let patch = parts.next().and_then(Result::ok).unwrap_or(0);
    Some(OtpVersion { major, minor, patch })
}

/// Finds the local OTP version without starting a node: `erl` on `PATH` (or `erl`) leads to
/// the root directory (its `ROOTDIR=` line, else `ROOT/bin/erl`), whose `releases/*/OTP_VERSION`
/// holds the version. Reads at most a few small files; `timeout` bounds the whole look-up
/// (a hung file system must not hang beamredir).
pub async fn local_otp_version(erl: Option<PathBuf>, timeout: Duration) -> Result<OtpVersion, NamesError> {
    let look = tokio::task::spawn_blocking(move || otp_version_blocking(erl));
    match tokio::time::timeout(timeout, look).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(NamesError::OtpVersionUnknown(e.to_string())),
        Err(_) => Err(NamesError::OtpVersionUnknown(format!("looking took longer than {timeout:?}"))),
    }
}

fn otp_version_blocking(erl: Option<PathBuf>) -> Result<OtpVersion, NamesError> {
    let unknown = NamesError::OtpVersionUnknown;
    let erl = match erl {
        Some(p) => p,
        None => find_on_path("erl").ok_or_else(|| unknown("no erl on PATH".into()))?,
    };
    let root = otp_root(&erl).ok_or_else(|| unknown(format!("{} does not lead to an OTP root", erl.display())))?;
    let releases = root.join("releases");
    let entries = fs::read_dir(&releases).map_err(|e| unknown(format!("{}: {e}", releases.display())))?;
    let mut best: Option<OtpVersion> = None;
    for entry in entries.take(64).flatten() {
        let file = entry.path().join("OTP_VERSION");
        if let Ok(text) = read_small(&file, 256) {
            if let Some(v) = parse_otp_version(&text) {
                best = best.max(Some(v));
            }
        }
    }
    best.ok_or_else(|| unknown(format!("no releases/*/OTP_VERSION under {}", root.display())))
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .take(256)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The OTP root of an `erl`: the script's `ROOTDIR=` (Debian: `/usr/bin/erl` links to
/// `/usr/lib/erlang/bin/erl`, which sets `ROOTDIR="/usr/lib/erlang"`), else two levels up.
fn otp_root(erl: &Path) -> Option<PathBuf> {
    let real = fs::canonicalize(erl).ok()?;
    if let Ok(script) = read_small(&real, 16 * 1024) {
        for line in script.lines() {
            if let Some(v) = line.trim().strip_prefix("ROOTDIR=") {
                let v = v.trim_matches(|c| c == '"' || c == '\'');
                if !v.contains('$') && Path::new(v).join("releases").is_dir() {
                    return Some(PathBuf::from(v));
                }
            }
        }
    }
    let root = real.parent()?.parent()?.to_path_buf();
    root.join("releases").is_dir().then_some(root)
}

fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    let mut s = Vec::new();
    fs::File::open(path)?.take(max).read_to_end(&mut s)?;
    Ok(String::from_utf8_lossy(&s).into_owned())
}

/// A program to run: argv and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What the local node needs to know.
#[derive(Debug, Clone)]
pub struct LocalNode<'a> {
    /// The exact name of the node to reach.
    pub target: &'a str,
    pub mode: NameMode,
    /// The private home holding `.erlang.cookie`: its [`super::cookie::CookieFile::env`].
    pub cookie_env: &'a [(String, String)],
    /// The session's inetrc (cluster DNS names), passed as `ERL_INETRC`.
    pub inetrc: Option<&'a Path>,
    /// The user's own flags (after `--`), appended last so they can override ours.
    pub extra: &'a [String],
    /// The local OTP release.
    pub otp: OtpVersion,
}

/// The host part of the local node's name in each mode: loopback, which needs no DNS.
fn local_host(mode: NameMode) -> &'static str {
    match mode {
        NameMode::Long => "127.0.0.1",
        NameMode::Short => "localhost",
    }
}

fn name_flag(mode: NameMode) -> &'static str {
    match mode {
        NameMode::Long => "-name",
        NameMode::Short => "-sname",
    }
}

/// A dynamic name where OTP supports it, else a unique static one.
fn erl_name(n: &LocalNode) -> String {
    if n.otp.major >= DYNAMIC_NAMES_SINCE { format!("undefined@{}", local_host(n.mode)) } else { unique_name(n.mode) }
}

/// `beamredir_PID_RANDOM@HOST`.
pub fn unique_name(mode: NameMode) -> String {
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("beamredir_{}_{:08x}@{}", std::process::id(), u32::from_be_bytes(r), local_host(mode))
}

fn env_of(n: &LocalNode) -> Vec<(String, String)> {
    let mut env = n.cookie_env.to_vec();
    env.extend(n.inetrc.map(|p| ("ERL_INETRC".to_string(), p.display().to_string())));
    env
}

/// `erl NAME -hidden -remsh TARGET EXTRA…`.
pub fn erl_remsh(n: &LocalNode) -> NodeCommand {
    let mut args = vec![name_flag(n.mode).to_string(), erl_name(n), "-hidden".into()];
    args.extend(["-remsh".to_string(), n.target.to_string()]);
    args.extend(n.extra.iter().cloned());
    NodeCommand { program: "erl".into(), args, env: env_of(n) }
}

/// `iex --name|--sname UNIQUE --hidden --remsh TARGET EXTRA…`.
pub fn iex_remsh(n: &LocalNode) -> NodeCommand {
    let flag = match n.mode {
        NameMode::Long => "--name",
        NameMode::Short => "--sname",
    };
    let mut args = vec![flag.to_string(), unique_name(n.mode), "--hidden".into()];
    args.extend(["--remsh".to_string(), n.target.to_string()]);
    args.extend(n.extra.iter().cloned());
    NodeCommand { program: "iex".into(), args, env: env_of(n) }
}

/// `erl NAME -hidden -noshell -eval EXPR EXTRA…`: a hidden node that runs `eval`
/// (for observer, or a script that calls the target). The expression must connect to the
/// target itself (`net_kernel:connect_node/1`: with a dynamic name the first `net_adm:ping`
/// answers `pang`).
pub fn eval_node(n: &LocalNode, eval: &str) -> NodeCommand {
    let mut args = vec![name_flag(n.mode).to_string(), erl_name(n), "-hidden".into()];
    args.extend(["-noshell".to_string(), "-eval".to_string(), eval.to_string()]);
    args.extend(n.extra.iter().cloned());
    NodeCommand { program: "erl".into(), args, env: env_of(n) }
}

/// Refuses a feature the local OTP is too old for.
pub fn require_otp(found: OtpVersion, needed: u32, feature: &'static str) -> Result<(), NamesError> {
    if found.major >= needed { Ok(()) } else { Err(NamesError::OtpTooOld { feature, needed, found }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn modes() {
        for (name, mode) in [
            ("app@10.244.0.5", NameMode::Long),
            ("app@app-0.app.shop.svc.cluster.local", NameMode::Long),
            ("app@10-244-0-5.shop.pod.cluster.local", NameMode::Long),
            ("app@::1", NameMode::Long),
            ("app@app-0", NameMode::Short),
            ("app@localhost", NameMode::Short),
        ] {
            assert_eq!(mode_of(name), Ok(mode), "{name}");
        }
        for bad in ["app", "@host", "app@", "a@b@c", ""] {
            assert!(mode_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mismatch_says_which_name_to_use() {
        assert!(check_expected("app@x", "app@x").is_ok());
        let e = check_expected("app@10.0.0.1", "app@app-0.app.ns.svc.cluster.local").unwrap_err().to_string();
        assert!(e.contains("calls itself app@app-0.app.ns.svc.cluster.local, not app@10.0.0.1"), "{e}");
    }

    #[test]
    fn otp_versions() {
        assert_eq!(parse_otp_version("25.2.3\n"), Some(OtpVersion { major: 25, minor: 2, patch: 3 }));
        assert_eq!(parse_otp_version("26.0"), Some(OtpVersion { major: 26, minor: 0, patch: 0 }));
        assert_eq!(parse_otp_version("27.0-rc1"), Some(OtpVersion { major: 27, minor: 0, patch: 0 }));
        assert_eq!(parse_otp_version("garbage"), None);
        let v22 = OtpVersion { major: 22, minor: 3, patch: 0 };
        let e = require_otp(v22, DYNAMIC_NAMES_SINCE, "a dynamic node name").unwrap_err().to_string();
        assert!(e.contains("needs OTP 23 or later on this machine, which has OTP 22.3.0"), "{e}");
    }

    #[tokio::test]
    async fn finds_the_installed_otp_without_starting_a_node() {
        // Debian's erlang-base (scripts/setup.sh installs it).
        let v = local_otp_version(None, Duration::from_secs(5)).await.unwrap();
        assert!(v.major >= 23, "{v}");
        let e = local_otp_version(Some("/nonexistent/erl".into()), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, NamesError::OtpVersionUnknown(_)));
    }

    fn cookie_env() -> &'static [(String, String)] {
        static ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
        ENV.get_or_init(|| vec![("HOME".to_string(), "/tmp/beamredir-cookie-ab".to_string())])
    }

    fn node<'a>(mode: NameMode, otp: u32, extra: &'a [String]) -> LocalNode<'a> {
        LocalNode {
            target: "app@10.244.0.5",
            mode,
            cookie_env: cookie_env(),
            inetrc: Some(Path::new("/var/lib/beamredir/s.inetrc")),
            extra,
            otp: OtpVersion { major: otp, minor: 0, patch: 0 },
        }
    }

    #[test]
    fn argv() {
        let extra = vec!["-kernel".to_string(), "shell_history".into(), "enabled".into()];
        let c = erl_remsh(&node(NameMode::Long, 25, &extra));
        assert_eq!(
            c.args,
            ["-name", "undefined@127.0.0.1", "-hidden", "-remsh", "app@10.244.0.5", "-kernel", "shell_history", "enabled"]
        );
        assert_eq!(
            c.env,
            [
                ("HOME".to_string(), "/tmp/beamredir-cookie-ab".to_string()),
                ("ERL_INETRC".to_string(), "/var/lib/beamredir/s.inetrc".to_string())
            ]
        );
        let c = erl_remsh(&node(NameMode::Short, 25, &[]));
        assert_eq!(&c.args[..2], ["-sname", "undefined@localhost"]);
        // OTP 22: a unique static name instead.
        let c = erl_remsh(&node(NameMode::Short, 22, &[]));
        assert!(c.args[1].starts_with("beamredir_") && c.args[1].ends_with("@localhost"), "{:?}", c.args);
        let c = iex_remsh(&node(NameMode::Long, 25, &[]));
        assert_eq!(c.program, "iex");
        assert_eq!(c.args[0], "--name");
        assert!(c.args[1].starts_with("beamredir_") && c.args[1].ends_with("@127.0.0.1"));
        assert_eq!(&c.args[2..], ["--hidden", "--remsh", "app@10.244.0.5"]);
        let c = eval_node(&node(NameMode::Long, 25, &[]), "observer:start()");
        assert_eq!(&c.args[3..], ["-noshell", "-eval", "observer:start()"]);
        // No argv ever carries a cookie: it is in the private HOME.
        assert!(!c.args.iter().any(|a| a.contains("cookie")));
    }

    proptest! {
        #[test]
        fn mode_of_never_panics(s in ".{0,64}") {
            let _ = mode_of(&s);
            let _ = parse_otp_version(&s);
        }
    }
}
