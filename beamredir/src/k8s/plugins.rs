//! Credential plugins named without a path (`gke-gcloud-auth-plugin`, `kubelogin`, `aws`) are
//! found the way the user's own shell finds them, not through sudo's `secure_path`: the network
//! part (already running as the user) asks the user's login shell for its `PATH`, adds the
//! usual per-user bin directories, and rewrites the kubeconfig's `exec.command` to the full
//! path. The plugin also gets that `PATH` (it may run `gcloud`, `az`…), unless the kubeconfig's
//! own `env` sets one. Everything else a plugin sees is the network part's environment: the
//! allowlist in [`crate::privsep::spawn`] plus the kubeconfig's `env`.
use std::{
    collections::HashMap,
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use kube::config::Kubeconfig;

use super::error::K8sError;

/// How long the login shell may take to print its PATH.
const SHELL_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this much of its output is read.
const SHELL_OUTPUT_MAX: usize = 64 * 1024;
const MARKER: &str = "__BEAMREDIR_PATH__=";

/// The PATH the user's interactive login shell has (None if it cannot be had in time).
async fn login_shell_path() -> Option<String> {
    let shell = std::env::var("SHELL").ok().filter(|s| s.starts_with('/'))?;
    let mut cmd = tokio::process::Command::new(&shell);
    cmd.args([
        "-l",
        "-i",
        "-c",
        &format!("printf '\\n{MARKER}%s\\n' \"$PATH\""),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(SHELL_TIMEOUT, cmd.output())
        .await
        .ok()?
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(SHELL_OUTPUT_MAX)]).into_owned();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(MARKER))
        .map(String::from)
        .filter(|p| !p.is_empty())
}

/// The directories to search, in order: the login shell's PATH, this process's PATH, then
/// `~/.local/bin`, `~/bin` and `/usr/local/bin`; no duplicates. (Also how the local `erl` and
/// `iex` of `remsh`/`observer` are found.)
pub async fn user_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut add = |p: PathBuf| {
        if p.is_absolute() && !dirs.contains(&p) {
            dirs.push(p);
        }
    };
    if let Some(p) = login_shell_path().await {
        std::env::split_paths(&OsString::from(p)).for_each(&mut add);
    }
    if let Some(p) = std::env::var_os("PATH") {
        std::env::split_paths(&p).for_each(&mut add);
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        add(home.join(".local/bin"));
        add(home.join("bin"));
    }
    add(PathBuf::from("/usr/local/bin"));
    dirs
}

/// A program as the user's shell would find it.
pub fn find_in(dirs: &[PathBuf], program: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(program)).find(|p| executable(p))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Gives every exec credential plugin named by bare name its full path (and the user's PATH).
pub async fn resolve(kubeconfig: &mut Kubeconfig) -> Result<(), K8sError> {
    let bare = |c: &str| !c.contains('/');
    let needs = kubeconfig
        .auth_infos
        .iter()
        .filter_map(|a| a.auth_info.as_ref()?.exec.as_ref()?.command.as_deref())
        .any(bare);
    if !needs {
        return Ok(());
    }
    let dirs = user_path().await;
    let joined = std::env::join_paths(&dirs)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    for named in &mut kubeconfig.auth_infos {
        let Some(exec) = named.auth_info.as_mut().and_then(|a| a.exec.as_mut()) else {
            continue;
        };
        let Some(command) = exec.command.clone().filter(|c| bare(c)) else {
            continue;
        };
        let Some(found) = dirs
            .iter()
            .map(|d| d.join(&command))
            .find(|p| executable(p))
        else {
            return Err(K8sError::PluginNotFound {
                plugin: command,
                user: named.name.clone(),
                searched: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            });
        };
        exec.command = Some(found.display().to_string());
        let env = exec.env.get_or_insert_with(Vec::new);
        if !env
            .iter()
            .any(|e: &HashMap<String, String>| e.get("name").is_some_and(|n| n == "PATH"))
        {
            env.push(HashMap::from([
                ("name".to_string(), "PATH".to_string()),
                ("value".to_string(), joined.clone()),
            ]));
        }
    }
    Ok(())
}
