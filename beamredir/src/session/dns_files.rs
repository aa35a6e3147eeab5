//! The session's name files, written by root: a hosts file with the pods' cluster DNS names and
//! an Erlang inetrc pointing at it, so local nodes resolve `app-0.app.ns.svc.cluster.local`
//! (and the other naming schemes, see [`crate::k8s::dns`]) without touching /etc/hosts.
//!
//! ```erlang
//! {hosts_file, "/run/beamredir/NAME.hosts"}.
//! {lookup, [file, native]}.
//! ```
//!
//! Commands beamredir runs in the session get `ERL_INETRC`; other shells can pass
//! `-kernel inetrc '"PATH"'`. A hosts file rather than inline `{host, …}` entries because
//! OTP's inet_db re-reads a changed hosts file (within about 5 s): a node that is already
//! running follows a pod that came back with a new IP. Both files are replaced atomically and
//! belong to the session's owner (mode 0600): their node reads them, nobody else needs to.
//!
//! The names come from the cluster, so every entry is checked here, in the root part, before it
//! is written: a hostile name must not be able to add lines or Erlang terms.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{SessionError, StateDir};
use crate::mapping::is_pod_address;

/// At most this many names per address, and entries per file.
pub const MAX_NAMES_PER_HOST: usize = 16;
pub const MAX_HOSTS: usize = 64 * 1024;

/// One line of the hosts file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostsError {
    #[error("{0} is not a pod address")]
    Address(IpAddr),
    #[error("{0:?} is not a DNS name")]
    Name(String),
    #[error("too many host entries ({0})")]
    TooMany(usize),
}

/// A DNS name as Kubernetes makes them: labels of letters, digits and '-', dots between.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

pub fn validate_hosts(entries: &[HostEntry]) -> Result<(), HostsError> {
    if entries.len() > MAX_HOSTS {
        return Err(HostsError::TooMany(entries.len()));
    }
    for e in entries {
        if !is_pod_address(e.ip) {
            return Err(HostsError::Address(e.ip));
        }
        if e.names.len() > MAX_NAMES_PER_HOST {
            return Err(HostsError::TooMany(e.names.len()));
        }
        if let Some(bad) = e.names.iter().find(|n| !is_dns_name(n)) {
            return Err(HostsError::Name(bad.clone()));
        }
    }
    Ok(())
}

pub fn hosts_text(entries: &[HostEntry]) -> String {
    let mut text = String::from("# Written by beamredir; rewritten as pods come and go.\n");
    for e in entries.iter().filter(|e| !e.names.is_empty()) {
        text.push_str(&format!("{} {}\n", e.ip, e.names.join(" ")));
    }
    text
}

/// The two files of one session.
#[derive(Clone, Debug)]
pub struct DnsFiles {
    state: StateDir,
    session: String,
    /// Who reads them: the session's owner.
    owner: (u32, u32),
}

impl DnsFiles {
    pub fn new(state: &StateDir, session: &str, owner: (u32, u32)) -> Self {
        DnsFiles {
            state: state.clone(),
            session: session.to_string(),
            owner,
        }
    }

    pub fn file_names(session: &str) -> [String; 2] {
        [format!("{session}.inetrc"), format!("{session}.hosts")]
    }

    pub fn inetrc_path(state: &Path, session: &str) -> PathBuf {
        state.join(&Self::file_names(session)[0])
    }

    pub fn hosts_path(&self) -> PathBuf {
        self.state.root().join(&Self::file_names(&self.session)[1])
    }

    /// Writes the inetrc and the hosts file (checked entries only).
    pub fn write(&self, entries: &[HostEntry]) -> Result<(), SessionError> {
        validate_hosts(entries).map_err(|e| SessionError::BadHosts(e.to_string()))?;
        let [inetrc, hosts] = Self::file_names(&self.session);
        let hosts_path = self.state.root().join(&hosts);
        // The path is ours (a checked state dir and a validated session name); {:?} quotes it
        // as an Erlang string.
        let inetrc_text = format!(
            "%% Written by beamredir: cluster DNS names of this session's pods.\n{{hosts_file, {:?}}}.\n{{lookup, [file, native]}}.\n",
            hosts_path.display().to_string()
        );
        self.state.write_file(
            &hosts,
            hosts_text(entries).as_bytes(),
            0o600,
            Some(self.owner),
        )?;
        self.state
            .write_file(&inetrc, inetrc_text.as_bytes(), 0o600, Some(self.owner))
    }

    pub fn remove(&self) {
        for f in Self::file_names(&self.session) {
            self.state.remove_file(&f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_checked() {
        for ok in [
            "app-0",
            "app-0.app.default.svc.cluster.local",
            "10-244-0-5.default.pod.cluster.local",
            "fd00-10-244--5.ns.pod.cluster.local",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "-a",
            "a-",
            "a..b",
            "\"}.",
            &"x".repeat(64),
            "a/b",
        ] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
        let e = |ip: &str, names: &[&str]| HostEntry {
            ip: ip.parse().unwrap(),
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(validate_hosts(&[e("10.244.0.6", &["app-1.app"])]), Ok(()));
        assert!(validate_hosts(&[e("127.0.0.1", &["x"])]).is_err());
        assert!(validate_hosts(&[e("10.244.0.6", &["x\n10.0.0.1 evil"])]).is_err());
        assert_eq!(
            hosts_text(&[e(
                "10.244.0.6",
                &["app-1.app.default.svc.cluster.local", "app-1"]
            )])
            .lines()
            .nth(1),
            Some("10.244.0.6 app-1.app.default.svc.cluster.local app-1")
        );
    }
}
