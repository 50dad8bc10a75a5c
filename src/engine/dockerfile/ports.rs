//! EXPOSE port specifications: `[[ip:]host:]port[-end][/proto]`, read as BuildKit reads them
//! (moby's `nat.ParsePortSpecs`). Each spec stands for one `ExposedPorts` key per container
//! port, `"<port>/<proto>"`, the protocol `tcp` unless given (`tcp`, `udp` or `sctp`, any
//! case, recorded lower case). The IP and host-port parts are checked and then ignored, as
//! BuildKit ignores them (its linter warns about them). Ports are 0–65535; a range covers
//! at most those, so one spec never stands for more than 65536 keys.

use std::net::IpAddr;

use thiserror::Error;

/// The highest port number.
pub const MAX_PORT: u32 = 65535;

/// Why an EXPOSE port specification is not valid. Displays with the spec as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortSpecError {
    #[error("invalid port {spec:?}: no port specified")]
    NoPort { spec: String },
    #[error("invalid port {spec:?}: invalid protocol {proto:?} (expected tcp, udp or sctp)")]
    Protocol { spec: String, proto: String },
    #[error("invalid port {spec:?}: {part:?} is not a port number (0-{MAX_PORT})")]
    NotANumber { spec: String, part: String },
    #[error("invalid port {spec:?}: {port} is out of range (0-{MAX_PORT})")]
    OutOfRange { spec: String, port: u64 },
    #[error("invalid port {spec:?}: range {range:?} ends before it starts")]
    Backwards { spec: String, range: String },
    #[error("invalid port {spec:?}: invalid IP address {ip:?}")]
    Address { spec: String, ip: String },
    #[error("invalid port {spec:?}: host ports {host:?} and container ports {container:?} are ranges of different sizes")]
    RangeMismatch {
        spec: String,
        host: String,
        container: String,
    },
}

/// One EXPOSE spec, checked: its container ports and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub first: u16,
    pub last: u16,
    /// `tcp`, `udp` or `sctp`.
    pub proto: String,
}

impl PortSpec {
    /// Reads one spec (already expanded).
    pub fn parse(spec: &str) -> Result<Self, PortSpecError> {
        let owned = || spec.to_owned();
        let (ip, host, container) = split_parts(spec);
        let (port, proto) = container.split_once('/').unwrap_or((container, ""));
        if port.is_empty() {
            return Err(PortSpecError::NoPort { spec: owned() });
        }
        let proto = match proto.to_ascii_lowercase().as_str() {
            "" => "tcp".to_owned(),
            p @ ("tcp" | "udp" | "sctp") => p.to_owned(),
            _ => {
                return Err(PortSpecError::Protocol {
                    spec: owned(),
                    proto: proto.to_owned(),
                })
            }
        };
        if let Some(ip) = ip {
            let bare = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            if bare.parse::<IpAddr>().is_err() {
                return Err(PortSpecError::Address {
                    spec: owned(),
                    ip: ip.to_owned(),
                });
            }
        }
        let (first, last) = port_range(spec, port)?;
        if let Some(host) = host {
            let (host_first, host_last) = port_range(spec, host)?;
            // A host range may go with one container port (a pool to allocate from).
            if last - first != host_last - host_first && first != last {
                return Err(PortSpecError::RangeMismatch {
                    spec: owned(),
                    host: host.to_owned(),
                    container: port.to_owned(),
                });
            }
        }
        Ok(Self { first, last, proto })
    }

    /// How many ports the spec covers.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Always false: a spec covers at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `ExposedPorts` keys: `"<port>/<proto>"`, in order.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        (self.first..=self.last).map(move |p| format!("{p}/{}", self.proto))
    }

    /// The spec in canonical form: `8080/tcp`, `8080-8082/udp`.
    pub fn canonical(&self) -> String {
        if self.first == self.last {
            format!("{}/{}", self.first, self.proto)
        } else {
            format!("{}-{}/{}", self.first, self.last, self.proto)
        }
    }
}

/// `ip`, `host` and `container` parts of a spec (`[[ip:]host:]container`; an IPv6 address may
/// hold colons, so the last two parts are the ports).
fn split_parts(spec: &str) -> (Option<&str>, Option<&str>, &str) {
    let mut parts = spec.rsplitn(3, ':');
    let container = parts.next().unwrap_or_default();
    let host = parts.next();
    let ip = parts.next();
    (ip, host, container)
}

/// `port` or `first-last`, both in 0–65535, `first <= last`.
fn port_range(spec: &str, range: &str) -> Result<(u16, u16), PortSpecError> {
    let (start, end) = match range.split_once('-') {
        Some((s, e)) => (s, Some(e)),
        None => (range, None),
    };
    let first = port_number(spec, start)?;
    let last = match end {
        None => first,
        Some(e) if e == start => first,
        Some(e) => port_number(spec, e)?,
    };
    if last < first {
        return Err(PortSpecError::Backwards {
            spec: spec.to_owned(),
            range: range.to_owned(),
        });
    }
    Ok((first, last))
}

fn port_number(spec: &str, part: &str) -> Result<u16, PortSpecError> {
    let digits = part.strip_prefix('+').unwrap_or(part);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortSpecError::NotANumber {
            spec: spec.to_owned(),
            part: part.to_owned(),
        });
    }
    match digits.parse::<u64>() {
        Ok(n) if n <= u64::from(MAX_PORT) => Ok(n as u16),
        Ok(n) => Err(PortSpecError::OutOfRange {
            spec: spec.to_owned(),
            port: n,
        }),
        // More digits than a u64 holds: out of range all the same.
        Err(_) => Err(PortSpecError::OutOfRange {
            spec: spec.to_owned(),
            port: u64::MAX,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> Vec<String> {
        PortSpec::parse(spec).unwrap().keys().collect()
    }

    #[test]
    fn single_ports_default_to_tcp_and_lower_case_the_protocol() {
        assert_eq!(keys("80"), ["80/tcp"]);
        assert_eq!(keys("53/UDP"), ["53/udp"]);
        assert_eq!(keys("9/sctp"), ["9/sctp"]);
        assert_eq!(keys("0"), ["0/tcp"]);
        assert_eq!(keys("65535/tcp"), ["65535/tcp"]);
        assert_eq!(PortSpec::parse("80").unwrap().canonical(), "80/tcp");
    }

    #[test]
    fn ranges_stand_for_one_key_per_port() {
        assert_eq!(keys("8080-8082/tcp"), ["8080/tcp", "8081/tcp", "8082/tcp"]);
        assert_eq!(keys("7000-7001/udp"), ["7000/udp", "7001/udp"]);
        assert_eq!(keys("5000-5000"), ["5000/tcp"]);
        let spec = PortSpec::parse("8080-8082").unwrap();
        assert_eq!(spec.canonical(), "8080-8082/tcp");
        assert_eq!(spec.len(), 3);
    }

    #[test]
    fn the_whole_port_space_is_one_bounded_spec() {
        let spec = PortSpec::parse("0-65535/udp").unwrap();
        assert_eq!(spec.len(), 65536);
        let keys: Vec<String> = spec.keys().collect();
        assert_eq!(keys.len(), 65536);
        assert_eq!(keys.last().unwrap(), "65535/udp");
    }

    #[test]
    fn host_and_ip_parts_are_checked_and_ignored() {
        assert_eq!(keys("8000:80"), ["80/tcp"]);
        assert_eq!(keys("127.0.0.1:8000:80/udp"), ["80/udp"]);
        assert_eq!(keys("[::1]:8000:80"), ["80/tcp"]);
        assert_eq!(keys("8000-8010:80"), ["80/tcp"]);
        assert!(matches!(
            PortSpec::parse("nohost:8000:80"),
            Err(PortSpecError::Address { .. })
        ));
        assert!(matches!(
            PortSpec::parse("8000-8001:80-82"),
            Err(PortSpecError::RangeMismatch { .. })
        ));
    }

    #[test]
    fn bad_specs_are_refused_with_the_spec() {
        let err = |s: &str| PortSpec::parse(s).unwrap_err();
        assert!(matches!(err("8082-8080"), PortSpecError::Backwards { .. }));
        assert!(matches!(err("http"), PortSpecError::NotANumber { .. }));
        assert!(matches!(err("80-"), PortSpecError::NotANumber { .. }));
        assert!(matches!(err("-80"), PortSpecError::NotANumber { .. }));
        assert!(matches!(err("8o/tcp"), PortSpecError::NotANumber { .. }));
        assert!(matches!(
            err("65536"),
            PortSpecError::OutOfRange { port: 65536, .. }
        ));
        assert!(matches!(
            err("1-70000"),
            PortSpecError::OutOfRange { port: 70000, .. }
        ));
        assert!(matches!(
            err("99999999999999999999999"),
            PortSpecError::OutOfRange { .. }
        ));
        assert!(matches!(err("/tcp"), PortSpecError::NoPort { .. }));
        assert!(matches!(err("80/icmp"), PortSpecError::Protocol { .. }));
        assert_eq!(
            err("8082-8080/tcp").to_string(),
            "invalid port \"8082-8080/tcp\": range \"8082-8080\" ends before it starts"
        );
        assert_eq!(
            err("65536").to_string(),
            "invalid port \"65536\": 65536 is out of range (0-65535)"
        );
    }
}
