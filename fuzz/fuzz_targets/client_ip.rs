//! CIDR parsing and the X-Forwarded-For walk on arbitrary input. Input layout: lines; the first is the peer
//! address, lines starting with `T` are trusted-proxy CIDRs, every other line is one X-Forwarded-For value.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use azure_proxy::client_ip::{client_ip, Cidr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let peer = lines
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|s| s.trim().parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    let mut trusted = Vec::new();
    let mut xff: Vec<&[u8]> = Vec::new();
    for line in lines {
        if let Some(cidr) = line.strip_prefix(b"T") {
            if let Ok(c) = Cidr::parse(&String::from_utf8_lossy(cidr)) {
                let _ = c.contains(peer);
                trusted.push(c);
            }
        } else {
            xff.push(line);
        }
    }
    let ip = client_ip(peer, &xff, &trusted);
    if trusted.is_empty() || !trusted.iter().any(|c| c.contains(peer)) {
        // An untrusted peer's header is never believed.
        let canon = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        assert_eq!(ip, canon);
    }
});
