//! One redirect, `POD_IP:PORT → LOCAL_IP:LOCAL_PORT`, and its command-line form
//! (`POD_IP:PORT=LOCAL_PORT`, `[POD_IPv6]:PORT=LOCAL_PORT`) as `beamredir map` takes it.
use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

/// One redirect: connect() to `pod` is rewritten to `local`. Both have the same address family:
/// an AF_INET6 socket can only be rewritten to an IPv6 address.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Mapping {
    pub pod: SocketAddr,
    pub local: SocketAddr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error(
        "malformed mapping {0:?}: expected POD_IP:PORT=LOCAL_PORT (e.g. 10.244.0.5:4369=14369, or [fd00::5]:4369=14369)"
    )]
    Malformed(String),
    #[error("invalid IP address {addr:?} in mapping {spec:?}")]
    BadAddress { spec: String, addr: String },
    #[error("invalid port {port:?} in mapping {spec:?}: ports are 1-65535")]
    BadPort { spec: String, port: String },
    #[error(
        "mapping {spec:?} mixes address families: an IPv4 pod needs an IPv4 forward, an IPv6 pod an IPv6 one"
    )]
    MixedFamilies { spec: String },
    #[error(
        "{addr} in mapping {spec:?} cannot be a pod address (loopback, unspecified, multicast or broadcast)"
    )]
    NotAPodAddress { spec: String, addr: IpAddr },
    #[error("duplicate mapping for {0}: each pod address:port may be redirected only once")]
    Duplicate(SocketAddr),
}

/// Whether `ip` can be a pod's address. Redirecting loopback, unspecified, multicast or
/// broadcast addresses would capture traffic that never was a pod's.
pub fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

fn parse_port(spec: &str, s: &str) -> Result<u16, MappingError> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(MappingError::BadPort {
            spec: spec.into(),
            port: s.into(),
        }),
    }
}

/// `IP:PORT` or `[IPv6]:PORT`.
fn parse_endpoint(spec: &str, s: &str) -> Result<SocketAddr, MappingError> {
    let (addr, port) = s
        .rsplit_once(':')
        .ok_or_else(|| MappingError::Malformed(spec.into()))?;
    let bad = || MappingError::BadAddress {
        spec: spec.into(),
        addr: addr.into(),
    };
    let ip = match addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().map_err(|_| bad())?),
        None => IpAddr::V4(addr.parse::<Ipv4Addr>().map_err(|_| bad())?),
    };
    Ok(SocketAddr::new(ip, parse_port(spec, port)?))
}

impl FromStr for Mapping {
    type Err = MappingError;

    /// `POD_IP:PORT=LOCAL_PORT` (the forward listens on 127.0.0.1, or [::1] for an IPv6 pod) or
    /// `POD_IP:PORT=LOCAL_IP:LOCAL_PORT`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (pod, local) = spec
            .split_once('=')
            .ok_or_else(|| MappingError::Malformed(spec.into()))?;
        if pod.is_empty() || local.is_empty() {
            return Err(MappingError::Malformed(spec.into()));
        }
        let pod = parse_endpoint(spec, pod)?;
        if !is_pod_address(pod.ip()) {
            return Err(MappingError::NotAPodAddress {
                spec: spec.into(),
                addr: pod.ip(),
            });
        }
        let local = if local.contains(':') {
            parse_endpoint(spec, local)?
        } else {
            let loopback = if pod.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            };
            SocketAddr::new(loopback, parse_port(spec, local)?)
        };
        if pod.is_ipv4() != local.is_ipv4() {
            return Err(MappingError::MixedFamilies { spec: spec.into() });
        }
        Ok(Mapping { pod, local })
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.pod, self.local)
    }
}

/// Rejects two mappings for the same pod endpoint (the map can hold only one target).
pub fn check_unique(mappings: &[Mapping]) -> Result<(), MappingError> {
    let mut seen = HashSet::new();
    for m in mappings {
        if !seen.insert(m.pod) {
            return Err(MappingError::Duplicate(m.pod));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_and_full_local_endpoint() {
        let m: Mapping = "10.244.0.5:4369=14369".parse().unwrap();
        assert_eq!(m.pod, "10.244.0.5:4369".parse().unwrap());
        assert_eq!(m.local, "127.0.0.1:14369".parse().unwrap());
        let m: Mapping = "10.244.0.5:5555=127.0.0.2:15555".parse().unwrap();
        assert_eq!(m.local, "127.0.0.2:15555".parse().unwrap());
        let m: Mapping = "[fd00:10:244::5]:4369=14369".parse().unwrap();
        assert_eq!(m.pod, "[fd00:10:244::5]:4369".parse().unwrap());
        assert_eq!(m.local, "[::1]:14369".parse().unwrap());
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        let err = |s: &str| s.parse::<Mapping>().unwrap_err();
        assert!(matches!(err("10.244.0.5:4369"), MappingError::Malformed(_)));
        assert!(matches!(err("=1"), MappingError::Malformed(_)));
        assert!(matches!(err("10.244.0.5=1"), MappingError::Malformed(_)));
        assert!(matches!(
            err("10.244.0:4369=1"),
            MappingError::BadAddress { .. }
        ));
        assert!(matches!(
            err("app-0:4369=1"),
            MappingError::BadAddress { .. }
        ));
        assert!(matches!(
            err("fd00::5:4369=1"),
            MappingError::BadAddress { .. }
        ));
        assert!(matches!(
            err("10.244.0.5:0=1"),
            MappingError::BadPort { .. }
        ));
        assert!(matches!(
            err("10.244.0.5:4369=0"),
            MappingError::BadPort { .. }
        ));
        assert!(matches!(
            err("10.244.0.5:65536=1"),
            MappingError::BadPort { .. }
        ));
        assert!(matches!(
            err("10.244.0.5:4369=-3"),
            MappingError::BadPort { .. }
        ));
        assert!(matches!(
            err("10.244.0.5:4369=[::1]:3"),
            MappingError::MixedFamilies { .. }
        ));
        assert!(matches!(
            err("127.0.0.1:4369=3"),
            MappingError::NotAPodAddress { .. }
        ));
        assert!(matches!(
            err("224.0.0.1:4369=3"),
            MappingError::NotAPodAddress { .. }
        ));
        assert!(matches!(
            err("[::1]:4369=3"),
            MappingError::NotAPodAddress { .. }
        ));
        assert!(matches!(
            err("[::ffff:10.0.0.1]:4369=3"),
            MappingError::NotAPodAddress { .. }
        ));
        assert!(
            err("10.244.0.5:4369=x")
                .to_string()
                .contains("ports are 1-65535")
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let a: Mapping = "10.0.0.1:1=2".parse().unwrap();
        let b: Mapping = "10.0.0.1:1=3".parse().unwrap();
        let c: Mapping = "10.0.0.1:2=3".parse().unwrap();
        assert_eq!(check_unique(&[a, c]), Ok(()));
        assert_eq!(
            check_unique(&[a, c, b]),
            Err(MappingError::Duplicate(a.pod))
        );
    }
}
