//! Starting the network part: this same binary, re-executed as `beamredir __network-part`,
//! with the channel on fd 3, as the invoking user, with no capabilities, `NO_NEW_PRIVS`, a
//! parent-death signal, and an environment reduced to a documented allowlist (it is also the
//! environment kubeconfig credential plugins see).
use std::{
    ffi::OsString,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, Stdio},
};

use crate::session::runas::Identity;

/// The hidden subcommand the network part runs as.
pub const NETWORK_PART_COMMAND: &str = "__network-part";
/// The fd the channel arrives on.
pub const CHANNEL_FD: i32 = 3;

/// Environment variables passed to the network part (and so to credential plugins): exact names…
const ENV_NAMES: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "KUBECONFIG",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NO_COLOR",
    "ERLANG_COOKIE",
    "RELEASE_COOKIE",
    "DISPLAY",
    "XAUTHORITY",
];
/// …and prefixes (cloud credential plugins: aws, gcloud/gke-gcloud-auth-plugin, az/kubelogin).
const ENV_PREFIXES: &[&str] = &[
    "LC_",
    "AWS_",
    "CLOUDSDK_",
    "GOOGLE_",
    "AZURE_",
    "KUBELOGIN_",
    "XDG_",
    "BEAMREDIR_NET_",
];

/// Whether an environment variable is passed on to the network part.
pub fn env_allowed(name: &str) -> bool {
    ENV_NAMES.contains(&name) || ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Linux capability ABI (capset(2)) for dropping everything when the user is root itself.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the bounding and ambient sets. Only while still root: dropping from the bounding
/// set needs CAP_SETPCAP, which `setuid` to a non-root user takes away (the drops would then
/// fail, and the bounding set stay full).
fn drop_bounding_and_ambient() -> std::io::Result<()> {
    // SAFETY: plain prctl calls with valid arguments; async-signal-safe.
    unsafe {
        for cap in 0..=63 {
            // EINVAL past the last capability the kernel knows: the end.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(e);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    Ok(())
}

/// Clears the effective, permitted and inheritable sets. After `setuid` to a non-root user
/// they are empty anyway; this covers a network part that stays uid 0 (beamredir run by root
/// without sudo).
fn drop_all_capabilities() -> std::io::Result<()> {
    // SAFETY: a plain syscall with valid arguments; async-signal-safe.
    unsafe {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Becomes the invoking user (or, without one, root with no capabilities) for good: used by
/// commands that only talk to the cluster (`rpc`), in their own process, before anything else
/// runs. Call it while single-threaded.
pub fn drop_privileges(identity: Option<&Identity>) -> std::io::Result<()> {
    if let Some(id) = identity {
        nix::unistd::setgroups(&id.groups)?;
        nix::unistd::setgid(id.gid)?;
        nix::unistd::setuid(id.uid)?;
        // SAFETY: environment changes while single-threaded, before any other thread exists.
        unsafe {
            std::env::set_var("HOME", &id.home);
            std::env::set_var("USER", &id.name);
            std::env::set_var("LOGNAME", &id.name);
            std::env::set_var("SHELL", &id.shell);
        }
    }
    drop_all_capabilities()?;
    // SAFETY: a plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the network part. `child_end` becomes its fd 3; `identity` is who it runs as (None:
/// stay uid 0 but drop every capability). Call it from the main thread: the parent-death
/// signal follows the thread that forked.
pub fn spawn_network_part(
    child_end: OwnedFd,
    identity: Option<&Identity>,
    verbose: u8,
) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(NETWORK_PART_COMMAND);
    if verbose > 0 {
        cmd.arg(format!("-{}", "v".repeat(verbose.min(3) as usize)));
    }
    cmd.env_clear();
    let allowed: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(env_allowed))
        .collect();
    cmd.envs(allowed);
    match identity {
        Some(id) => {
            cmd.env("HOME", &id.home)
                .env("USER", &id.name)
                .env("LOGNAME", &id.name)
                .env("SHELL", &id.shell);
        }
        None => {
            for k in ["HOME", "USER", "LOGNAME", "SHELL"] {
                if let Some(v) = std::env::var_os(k) {
                    cmd.env(k, v);
                }
            }
        }
    }
    cmd.stdin(Stdio::null());
    let parent = std::process::id() as i32;
    let fd = child_end.as_raw_fd();
    let identity = identity.cloned();
    // SAFETY: only async-signal-safe calls (dup2, setgroups, setgid, setuid, prctl, capset,
    // signal) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            crate::session::runas::inherit_as(fd, CHANNEL_FD)?;
            drop_bounding_and_ambient()?;
            if let Some(id) = &identity {
                nix::unistd::setgroups(&id.groups)?;
                nix::unistd::setgid(id.gid)?;
                nix::unistd::setuid(id.uid)?;
            }
            drop_all_capabilities()?;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before PDEATHSIG was armed.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            // Ctrl-C goes to the whole foreground group; the root part decides when to end.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn();
    // The root part keeps only its own end.
    drop(child_end);
    child
}
