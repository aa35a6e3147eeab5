//! `POD_IP:PORT=LOCAL_PORT` redirect specifications, as given to `beamredir map`.
use std::{collections::HashSet, fmt, net::{Ipv4Addr, SocketAddrV4}, str::FromStr};

/// One redirect: connect() to `pod` is rewritten to `local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub pod: SocketAddrV4,
    pub local: SocketAddrV4,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("malformed mapping {0:?}: expected POD_IP:PORT=LOCAL_PORT (e.g. 10.244.0.5:4369=14369)")]
    Malformed(String),
    #[error("invalid IPv4 address {addr:?} in mapping {spec:?}: beamredir redirects IPv4 pod addresses")]
    BadAddress { spec: String, addr: String },
    #[error("invalid port {port:?} in mapping {spec:?}: ports are 1-65535")]
    BadPort { spec: String, port: String },
    #[error("duplicate mapping for {0}: each pod address:port may be redirected only once")]
    Duplicate(SocketAddrV4),
}

fn parse_port(spec: &str, s: &str) -> Result<u16, MappingError> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(MappingError::BadPort { spec: spec.into(), port: s.into() }),
    }
}

fn parse_endpoint(spec: &str, s: &str) -> Result<SocketAddrV4, MappingError> {
    let (addr, port) = s.rsplit_once(':').ok_or_else(|| MappingError::Malformed(spec.into()))?;
    let ip = addr
        .parse::<Ipv4Addr>()
        .map_err(|_| MappingError::BadAddress { spec: spec.into(), addr: addr.into() })?;
    Ok(SocketAddrV4::new(ip, parse_port(spec, port)?))
}

impl FromStr for Mapping {
    type Err = MappingError;

    /// `POD_IP:PORT=LOCAL_PORT` (the forward listens on 127.0.0.1) or
    /// `POD_IP:PORT=LOCAL_IP:LOCAL_PORT`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (pod, local) = spec.split_once('=').ok_or_else(|| MappingError::Malformed(spec.into()))?;
        if pod.is_empty() || local.is_empty() {
            return Err(MappingError::Malformed(spec.into()));
        }
        let pod = parse_endpoint(spec, pod)?;
        let local = if local.contains(':') {
            parse_endpoint(spec, local)?
        } else {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, parse_port(spec, local)?)
        };
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
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        let err = |s: &str| s.parse::<Mapping>().unwrap_err();
        assert!(matches!(err("10.244.0.5:4369"), MappingError::Malformed(_)));
        assert!(matches!(err("=1"), MappingError::Malformed(_)));
        assert!(matches!(err("10.244.0.5=1"), MappingError::Malformed(_)));
        assert!(matches!(err("10.244.0:4369=1"), MappingError::BadAddress { .. }));
        assert!(matches!(err("app-0:4369=1"), MappingError::BadAddress { .. }));
        assert!(matches!(err("10.244.0.5:0=1"), MappingError::BadPort { .. }));
        assert!(matches!(err("10.244.0.5:4369=0"), MappingError::BadPort { .. }));
        assert!(matches!(err("10.244.0.5:65536=1"), MappingError::BadPort { .. }));
        assert!(matches!(err("10.244.0.5:4369=-3"), MappingError::BadPort { .. }));
        assert!(err("10.244.0.5:4369=x").to_string().contains("ports are 1-65535"));
    }

    #[test]
    fn duplicates_are_rejected() {
        let a: Mapping = "10.0.0.1:1=2".parse().unwrap();
        let b: Mapping = "10.0.0.1:1=3".parse().unwrap();
        let c: Mapping = "10.0.0.1:2=3".parse().unwrap();
        assert_eq!(check_unique(&[a, c]), Ok(()));
        assert_eq!(check_unique(&[a, c, b]), Err(MappingError::Duplicate(a.pod)));
    }
}
