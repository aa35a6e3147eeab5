//! The names cluster DNS gives a pod, for every naming scheme BEAM clusters use:
//! * StatefulSet FQDN: `app-0.app.NS.svc.DOMAIN` (and its shorter search-path forms), from
//!   `spec.hostname` + `spec.subdomain` (libcluster `:hostname`, DNSSRV);
//! * pod A record: `10-244-0-5.NS.pod.DOMAIN` (libcluster `:dns`), and for IPv6 the address
//!   with `:` turned into `-`;
//! * the short host name `app-0`, for `-sname` clusters (`app@app-0`).
//!
//! IP-named nodes (`app@10.244.0.5`) need no name at all.
use std::net::IpAddr;

use super::pod::PodTarget;
use crate::session::dns_files::{HostEntry, is_dns_name};

/// `10.244.0.5` → `10-244-0-5`; `fd00:10:244::5` → `fd00-10-244--5`.
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The hosts-file entries of one pod: one line per pod IP, each with every name.
pub fn host_entries(pod: &PodTarget, cluster_domain: &str) -> Vec<HostEntry> {
    let ns = &pod.namespace;
    let mut common = Vec::new();
    if let (Some(host), Some(sub)) = (
        pod.hostname.as_deref(),
        pod.subdomain.as_deref().filter(|s| !s.is_empty()),
    ) {
        let base = format!("{host}.{sub}");
        common.extend([
            format!("{base}.{ns}.svc.{cluster_domain}"),
            format!("{base}.{ns}.svc"),
            format!("{base}.{ns}"),
            base,
        ]);
    }
    let short = pod.hostname.clone().unwrap_or_else(|| pod.name.clone());
    pod.ips
        .iter()
        .map(|ip| {
            let mut names = common.clone();
            names.push(format!("{}.{ns}.pod.{cluster_domain}", dashed(*ip)));
            names.push(short.clone());
            // Names from the cluster are checked again by the root part; skip bad ones here
            // so one odd pod does not make every update fail.
            names.retain(|n| is_dns_name(n));
            names.dedup();
            HostEntry { ip: *ip, names }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ips: &[&str], hostname: Option<&str>, subdomain: Option<&str>) -> PodTarget {
        PodTarget {
            hostname: hostname.map(String::from),
            subdomain: subdomain.map(String::from),
            ..PodTarget::for_test("app-1", ips)
        }
    }

    #[test]
    fn every_naming_scheme() {
        let e = host_entries(
            &target(&["10.244.0.6"], Some("app-1"), Some("app")),
            "cluster.local",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].names,
            [
                "app-1.app.default.svc.cluster.local",
                "app-1.app.default.svc",
                "app-1.app.default",
                "app-1.app",
                "10-244-0-6.default.pod.cluster.local",
                "app-1"
            ]
        );
        let e = host_entries(
            &target(&["fd00:10:244::6", "10.244.0.6"], None, None),
            "cluster.local",
        );
        assert_eq!(
            e[0].names,
            ["fd00-10-244--6.default.pod.cluster.local", "app-1"]
        );
        assert_eq!(
            e[1].names,
            ["10-244-0-6.default.pod.cluster.local", "app-1"]
        );
    }
}
