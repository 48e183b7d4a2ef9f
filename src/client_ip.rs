//! Which address a request comes from. Without `trusted_proxies` it is the TCP peer, and `X-Forwarded-For` is
//! ignored (any client can write that header). Behind a load balancer every request has the balancer's address,
//! so blocking it would lock everyone out: when the peer is a trusted proxy, the client is the last address in
//! `X-Forwarded-For` that is not itself a trusted proxy (walking from the right, as each proxy appends).

use std::net::IpAddr;

/// An address block such as `10.0.0.0/8`, `127.0.0.1` (a /32) or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let net: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{text:?}: bad prefix length"))?
            }
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), self.prefix, 32) == masked(u32::from(a).into(), self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.prefix, 128) == masked(u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits >> (width - prefix)
    }
}

/// `::ffff:10.0.0.1` is `10.0.0.1`: a dual-stack listener reports IPv4 peers in that form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client address for a request from `peer` carrying these `X-Forwarded-For` values (in header order).
/// The values are only looked at when the peer is trusted, so the common case costs nothing.
pub fn client_ip<V: AsRef<[u8]>>(peer: IpAddr, forwarded_for: impl IntoIterator<Item = V>, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let values: Vec<V> = forwarded_for.into_iter().collect();
    let hops: Vec<&[u8]> = values.iter().flat_map(|v| v.as_ref().split(|b| *b == b',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = std::str::from_utf8(hop).ok().and_then(|h| h.trim().parse::<IpAddr>().ok()) else {
            // Garbage where an address should be: stop at the last address we could trust.
            break;
        };
        client = canonical(ip);
        if !trusted.iter().any(|c| c.contains(client)) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c = Cidr::parse("10.0.0.0/8").expect("valid");
        assert!(c.contains(ip("10.1.2.3")) && !c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")));
        assert!(Cidr::parse("127.0.0.1").expect("host").contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").expect("host").contains(ip("127.0.0.2")));
        assert!(Cidr::parse("fd00::/8").expect("v6").contains(ip("fd12::1")));
        assert!(Cidr::parse("0.0.0.0/0").expect("all").contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let trusted = [Cidr::parse("10.0.0.0/8").expect("valid")];
        let xff: &[&[u8]] = &[b"203.0.113.7, 10.0.0.5"];
        assert_eq!(client_ip(ip("10.0.0.1"), xff, &trusted), ip("203.0.113.7"), "rightmost untrusted hop");
        assert_eq!(client_ip(ip("198.51.100.1"), xff, &trusted), ip("198.51.100.1"), "untrusted peer: header ignored");
        assert_eq!(client_ip(ip("10.0.0.1"), xff, &[]), ip("10.0.0.1"), "no trusted proxies: header ignored");
        let spoofed: &[&[u8]] = &[b"1.1.1.1", b"203.0.113.7"];
        assert_eq!(client_ip(ip("10.0.0.1"), spoofed, &trusted), ip("203.0.113.7"), "a client's own prefix is ignored");
        let junk: &[&[u8]] = &[b"garbage"];
        assert_eq!(client_ip(ip("10.0.0.1"), junk, &trusted), ip("10.0.0.1"));
        let all_trusted: &[&[u8]] = &[b"10.0.0.9"];
        assert_eq!(client_ip(ip("10.0.0.1"), all_trusted, &trusted), ip("10.0.0.9"));
    }
}
