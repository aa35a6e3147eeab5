//! What the session knows about each pod, and what follows from it: the redirects the kernel
//! should hold and the host names local nodes should resolve. Pure data; the reconcilers write
//! it, the publisher reads it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

use super::discover::DistNode;
use crate::{
    forward::registry::FamilyKey,
    k8s::{dns::host_entries, pod::PodTarget},
    privsep::messages::{ListenerId, RedirectSpec},
    session::{AliasInfo, PodInfo, dns_files::HostEntry},
};

/// How long a pod's previous IP keeps redirecting to it after the pod came back with a new
/// one: OTP re-reads the session's hosts file within about 5 s, so running nodes that still
/// resolve the pod's name to the old address keep reaching it meanwhile.
pub const ALIAS_TTL: Duration = Duration::from_secs(30);

/// How long a pod that went down keeps its host names, at its last address (which is not
/// redirected meanwhile, so connections to it fail at once as before). A running node that
/// re-reads the hosts file during a restart then still resolves the name to that address,
/// which the alias takes to the new incarnation as soon as it is up, instead of finding no
/// name and waiting for its next re-read (up to about 5 s) to learn the new address.
pub const NAME_HOLD: Duration = ALIAS_TTL;

#[derive(Clone, Debug, Default)]
pub struct PodEntry {
    /// Set while the pod is Running with an IP.
    pub target: Option<PodTarget>,
    /// For `status`: "Running", "starting", "not running: …", "deleted", "unreachable: …".
    pub state: String,
    /// The pod ports that have (or should have) forwards: epmd and distribution ports.
    pub ports: BTreeSet<u16>,
    /// Previous IPs still redirected to this pod, until the instant given.
    pub aliases: Vec<(IpAddr, Instant)>,
    /// The IPs of the last incarnation that was up (kept while the pod is gone).
    pub last_ips: Vec<IpAddr>,
    /// While the pod is down: its last incarnation, whose names stay until the instant given
    /// (see [`NAME_HOLD`]).
    pub held_names: Option<(PodTarget, Instant)>,
    /// Exact node names on the pod (from the node itself where it was asked).
    pub nodes: Vec<String>,
    /// The Erlang nodes behind the distribution ports, as discovered.
    pub dist: Vec<DistNode>,
    /// The pod object the target was read from (its spec holds the cookie's source).
    pub object: Option<Box<Pod>>,
}

/// Every pod of the session, by name.
#[derive(Default)]
pub struct PodTable {
    pods: BTreeMap<String, PodEntry>,
}

impl PodTable {
    pub fn get(&self, name: &str) -> Option<&PodEntry> {
        self.pods.get(name)
    }

    pub fn entry(&mut self, name: &str) -> &mut PodEntry {
        self.pods.entry(name.to_string()).or_default()
    }

    pub fn remove(&mut self, name: &str) {
        self.pods.remove(name);
    }

    pub fn names(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }

    pub fn targets(&self) -> Vec<PodTarget> {
        self.pods
            .values()
            .filter_map(|e| e.target.clone())
            .collect()
    }

    /// The pod came up (again) as `target`: IPs of its previous incarnation become aliases.
    pub fn set_up(
        &mut self,
        name: &str,
        target: PodTarget,
        ports: BTreeSet<u16>,
        nodes: Vec<String>,
        now: Instant,
    ) {
        let entry = self.entry(name);
        let old: Vec<IpAddr> = entry
            .target
            .as_ref()
            .map(|t| t.ips.clone())
            .unwrap_or_else(|| entry.last_ips.clone());
        for ip in old.into_iter().filter(|ip| !target.ips.contains(ip)) {
            entry.aliases.retain(|(a, _)| *a != ip);
            entry.aliases.push((ip, now + ALIAS_TTL));
        }
        entry.aliases.retain(|(a, _)| !target.ips.contains(a));
        entry.held_names = None;
        entry.last_ips = target.ips.clone();
        entry.ports = ports;
        entry.nodes = nodes;
        entry.state = "Running".into();
        entry.target = Some(target);
    }

    /// The pod is not reachable now (deleted, not running): no redirects, no aliases; its
    /// names stay a while at its last address ([`NAME_HOLD`]).
    pub fn set_down(&mut self, name: &str, state: String, now: Instant) {
        let entry = self.entry(name);
        if let Some(t) = entry.target.take() {
            entry.held_names = Some((t, now + NAME_HOLD));
        }
        entry.aliases.clear();
        entry.state = state;
    }

    /// Drops aliases and held names whose time is up; true if any went.
    pub fn expire_aliases(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for e in self.pods.values_mut() {
            let before = e.aliases.len();
            e.aliases.retain(|(_, until)| *until > now);
            changed |= e.aliases.len() != before;
            if e.held_names
                .as_ref()
                .is_some_and(|(_, until)| *until <= now)
            {
                e.held_names = None;
                changed = true;
            }
        }
        changed
    }

    /// The IPs of the pods that are up.
    fn claimed(&self) -> BTreeSet<IpAddr> {
        self.pods
            .values()
            .filter_map(|e| e.target.as_ref())
            .flat_map(|t| t.ips.iter().copied())
            .collect()
    }

    /// The redirects the kernel should hold: every port of every pod that is up, at each of its
    /// IPs (current first, so getpeername reports those), then at its aliases that no other
    /// pod of the session has claimed.
    pub fn redirects(
        &self,
        listener: impl Fn(&str, u16, FamilyKey) -> Option<ListenerId>,
        now: Instant,
    ) -> Vec<RedirectSpec> {
        let claimed = self.claimed();
        let mut current = Vec::new();
        let mut aliased = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, e) in &self.pods {
            let Some(t) = &e.target else { continue };
            for port in &e.ports {
                for ip in &t.ips {
                    if let Some(l) = listener(name, *port, FamilyKey::of_ip(ip)) {
                        let pod = SocketAddr::new(*ip, *port);
                        if seen.insert(pod) {
                            current.push(RedirectSpec { pod, listener: l });
                        }
                    }
                }
                for (ip, until) in &e.aliases {
                    if *until <= now || claimed.contains(ip) {
                        continue;
                    }
                    if let Some(l) = listener(name, *port, FamilyKey::of_ip(ip)) {
                        aliased.push(RedirectSpec {
                            pod: SocketAddr::new(*ip, *port),
                            listener: l,
                        });
                    }
                }
            }
        }
        aliased.retain(|r| seen.insert(r.pod));
        current.extend(aliased);
        current
    }

    /// The host names of every pod that is up, and for a while those of pods that went down
    /// (at their last address, unless a pod that is up has it now).
    pub fn hosts(&self, cluster_domain: &str, now: Instant) -> Vec<HostEntry> {
        let claimed = self.claimed();
        self.pods
            .values()
            .filter_map(|e| match (&e.target, &e.held_names) {
                (Some(t), _) => Some(t),
                (None, Some((t, until)))
                    if *until > now && !t.ips.iter().any(|ip| claimed.contains(ip)) =>
                {
                    Some(t)
                }
                _ => None,
            })
            .flat_map(|t| host_entries(t, cluster_domain))
            .collect()
    }

    /// What `status` shows about the pods (with the aliases in force at `now`).
    pub fn infos(&self, namespace: &str, now: Instant) -> Vec<PodInfo> {
        let claimed: BTreeSet<IpAddr> = self
            .pods
            .values()
            .filter_map(|e| e.target.as_ref())
            .flat_map(|t| t.ips.iter().copied())
            .collect();
        self.pods
            .iter()
            .map(|(name, e)| PodInfo {
                aliases: e
                    .aliases
                    .iter()
                    .filter(|(ip, until)| {
                        e.target.is_some() && *until > now && !claimed.contains(ip)
                    })
                    .map(|(ip, until)| AliasInfo {
                        ip: ip.to_string(),
                        expires_in_secs: until.duration_since(now).as_secs_f64().ceil() as u64,
                    })
                    .collect(),
                name: name.clone(),
                namespace: namespace.to_string(),
                ip: e.target.as_ref().map(|t| t.primary_ip().to_string()),
                ips: e
                    .target
                    .iter()
                    .flat_map(|t| t.ips.iter().map(|i| i.to_string()))
                    .collect(),
                ready: e.target.as_ref().map(|t| t.ready),
                state: e.state.clone(),
                nodes: e.nodes.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name` (of StatefulSet `app`) is up at `ips`, forwarding `ports`.
    fn set_up(t: &mut PodTable, name: &str, ips: &[&str], ports: &[u16], now: Instant) {
        let target = PodTarget {
            hostname: Some(name.into()),
            subdomain: Some("app".into()),
            ..PodTarget::for_test(name, ips)
        };
        t.set_up(name, target, ports.iter().copied().collect(), vec![], now);
    }

    fn listeners(pod: &str, port: u16, f: FamilyKey) -> Option<ListenerId> {
        let base = if pod == "app-0" { 100 } else { 200 };
        Some(base + u32::from(port % 10) + if f == FamilyKey::V6 { 50 } else { 0 })
    }

    #[test]
    fn a_moved_pod_keeps_its_old_ip_until_the_alias_expires_or_is_claimed() {
        let now = Instant::now();
        let mut t = PodTable::default();
        set_up(&mut t, "app-0", &["10.0.0.5"], &[4369, 9000], now);
        set_up(&mut t, "app-1", &["10.0.0.6"], &[4369], now);
        // app-0 moves to .7: the old address keeps redirecting to its forwards, after the new.
        t.set_down("app-0", "deleted".into(), now);
        set_up(&mut t, "app-0", &["10.0.0.7"], &[4369, 9000], now);
        let pods = |rs: Vec<RedirectSpec>| rs.iter().map(|r| r.pod.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pods(t.redirects(listeners, now)),
            [
                "10.0.0.7:4369",
                "10.0.0.7:9000",
                "10.0.0.6:4369",
                "10.0.0.5:4369",
                "10.0.0.5:9000"
            ]
        );
        // `status` shows the alias and when it goes.
        let app0 = &t.infos("default", now + Duration::from_secs(4))[0];
        assert_eq!(
            app0.aliases,
            [AliasInfo {
                ip: "10.0.0.5".into(),
                expires_in_secs: ALIAS_TTL.as_secs() - 4
            }]
        );
        // Past the TTL it goes.
        assert!(t.expire_aliases(now + ALIAS_TTL + Duration::from_secs(1)));
        assert_eq!(
            pods(t.redirects(listeners, now + ALIAS_TTL + Duration::from_secs(1))).len(),
            3
        );
        // Claimed by another pod of the session (IP reuse): the alias yields at once.
        let mut t2 = PodTable::default();
        set_up(&mut t2, "app-0", &["10.0.0.5"], &[4369], now);
        set_up(&mut t2, "app-0", &["10.0.0.7"], &[4369], now);
        set_up(&mut t2, "app-1", &["10.0.0.5"], &[4369], now);
        let r = t2.redirects(listeners, now);
        assert_eq!(
            r.iter()
                .find(|r| r.pod.to_string() == "10.0.0.5:4369")
                .unwrap()
                .listener,
            209
        );
        assert_eq!(r.len(), 2);
        assert!(t2.infos("default", now).iter().all(|p| p.aliases.is_empty()));
    }

    #[test]
    fn dual_stack_pods_are_redirected_in_both_families() {
        let mut t = PodTable::default();
        set_up(
            &mut t,
            "app-0",
            &["fd00::5", "10.0.0.5"],
            &[4369],
            Instant::now(),
        );
        let r = t.redirects(listeners, Instant::now());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].listener, 159);
        assert_eq!(r[1].listener, 109);
        assert_eq!(t.hosts("cluster.local", Instant::now()).len(), 2);
    }

    #[test]
    fn a_pod_that_is_down_has_no_redirects_and_its_names_only_for_a_while() {
        let now = Instant::now();
        let mut t = PodTable::default();
        set_up(&mut t, "app-0", &["10.0.0.5"], &[4369], now);
        t.set_down(
            "app-0",
            "not running: its phase is Failed, not Running".into(),
            now,
        );
        assert!(t.redirects(listeners, now).is_empty());
        assert_eq!(
            t.infos("default", Instant::now())[0].state,
            "not running: its phase is Failed, not Running"
        );
        // Its names stay at its last address (not redirected) for a while, then go.
        let ips = |t: &PodTable, at| -> Vec<String> {
            t.hosts("cluster.local", at)
                .iter()
                .map(|h| h.ip.to_string())
                .collect()
        };
        assert!(!ips(&t, now).is_empty());
        assert!(ips(&t, now).iter().all(|ip| ip == "10.0.0.5"));
        // A second report of the same outage does not extend the hold.
        t.set_down("app-0", "deleted".into(), now + Duration::from_secs(20));
        let later = now + NAME_HOLD + Duration::from_secs(1);
        assert!(ips(&t, later).is_empty());
        assert!(t.expire_aliases(later));
        assert!(ips(&t, now).is_empty());
        // Held names yield to a pod that is up at that address.
        set_up(&mut t, "app-1", &["10.0.0.9"], &[4369], now);
        t.set_down("app-1", "deleted".into(), now);
        assert!(!ips(&t, now).is_empty());
        set_up(&mut t, "app-2", &["10.0.0.9"], &[4369], now);
        let hosts = t.hosts("cluster.local", now);
        assert!(
            hosts
                .iter()
                .all(|h| !h.names.iter().any(|n| n.starts_with("app-1"))),
            "{hosts:?}"
        );
        // Back up at a new address: its names follow it at once.
        set_up(&mut t, "app-1", &["10.0.0.10"], &[4369], now);
        let hosts = t.hosts("cluster.local", now);
        assert!(
            hosts
                .iter()
                .filter(|h| h.names.iter().any(|n| n.starts_with("app-1")))
                .all(|h| h.ip.to_string() == "10.0.0.10")
        );
        assert_eq!(t.infos("default", now)[0].state, "deleted");
    }
}
