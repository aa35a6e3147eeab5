//! Cluster DNS names for local BEAM nodes, without touching /etc/hosts.
//!
//! Nodes in a StatefulSet are often named `app@app-0.app.default.svc.cluster.local`; the
//! workstation cannot resolve that. For every pod of a session beamredir writes a hosts file
//! (`IP FQDN short-names…`) and an Erlang inetrc that points at it:
//!
//! ```erlang
//! {hosts_file, "/run/beamredir/NAME.hosts"}.
//! {lookup, [file, native]}.
//! ```
//!
//! Commands beamredir runs in the session get `ERL_INETRC`; other shells can pass
//! `-kernel inetrc '"PATH"'`. A hosts file rather than inline `{host, …}` entries because
//! OTP's inet_db re-reads a changed hosts file (within about 5 s): a node that is already
//! running follows a pod that came back with a new IP. Both files are replaced atomically.
use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The DNS names of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNames {
    pub ip: Ipv4Addr,
    /// Most specific first: `app-0.app.default.svc.cluster.local`, `app-0.app.default.svc`,
    /// `app-0.app.default`, `app-0.app`.
    pub names: Vec<String>,
}

/// The names Kubernetes DNS gives a pod with `spec.hostname` and `spec.subdomain` (a
/// StatefulSet pod behind its headless Service). Pods without a subdomain have none.
pub fn pod_names(hostname: Option<&str>, subdomain: Option<&str>, namespace: &str, cluster_domain: &str, ip: Ipv4Addr) -> Option<PodNames> {
    let (host, sub) = (hostname?, subdomain.filter(|s| !s.is_empty())?);
    let base = format!("{host}.{sub}");
    Some(PodNames {
        ip,
        names: vec![
            format!("{base}.{namespace}.svc.{cluster_domain}"),
            format!("{base}.{namespace}.svc"),
            format!("{base}.{namespace}"),
            base,
        ],
    })
}

/// The two files of one session.
#[derive(Clone, Debug)]
pub struct DnsFiles {
    pub inetrc: PathBuf,
    pub hosts: PathBuf,
}

impl DnsFiles {
    pub fn new(state_dir: &Path, session: &str) -> Self {
        DnsFiles { inetrc: state_dir.join(format!("{session}.inetrc")), hosts: state_dir.join(format!("{session}.hosts")) }
    }

    /// Writes the inetrc (once) and the hosts file (on every change).
    pub fn write(&self, pods: &[PodNames]) -> io::Result<()> {
        let inetrc = format!(
            "%% Written by beamredir: cluster DNS names of this session's pods.\n{{hosts_file, {:?}}}.\n{{lookup, [file, native]}}.\n",
            self.hosts.display().to_string()
        );
        write_atomically(&self.inetrc, &inetrc)?;
        write_atomically(&self.hosts, &hosts_text(pods))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.inetrc);
        let _ = std::fs::remove_file(&self.hosts);
    }
}

pub fn hosts_text(pods: &[PodNames]) -> String {
    let mut text = String::from("# Written by beamredir; rewritten as pods come and go.\n");
    for p in pods {
        text.push_str(&format!("{} {}\n", p.ip, p.names.join(" ")));
    }
    text
}

fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulset_pod_names() {
        let n = pod_names(Some("app-1"), Some("app"), "default", "cluster.local", Ipv4Addr::new(10, 244, 0, 6)).unwrap();
        assert_eq!(n.names[0], "app-1.app.default.svc.cluster.local");
        assert_eq!(n.names[3], "app-1.app");
        assert!(pod_names(Some("app-1"), None, "default", "cluster.local", n.ip).is_none());
        assert_eq!(hosts_text(&[n]).lines().nth(1).unwrap(), "10.244.0.6 app-1.app.default.svc.cluster.local app-1.app.default.svc app-1.app.default app-1.app");
    }

    #[test]
    fn files_are_written_and_removed() {
        let dir = std::env::temp_dir().join(format!("beamredir-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = DnsFiles::new(&dir, "s");
        files.write(&[]).unwrap();
        let inetrc = std::fs::read_to_string(&files.inetrc).unwrap();
        assert!(inetrc.contains(&format!("{{hosts_file, {:?}}}.", files.hosts.display().to_string())));
        assert!(inetrc.contains("{lookup, [file, native]}."));
        files.remove();
        assert!(!files.inetrc.exists() && !files.hosts.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
