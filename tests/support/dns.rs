//! A tiny DNS server over UDP for the resolver tests: it answers A queries for the names it is given (one IPv4
//! address each), NODATA for their other record types (AAAA), NXDOMAIN for any other name, and counts every
//! query. glibc always asks port 53, so it binds 127.53.0.x:53 (the first x free): that needs root.
//! `stop` closes the socket, so that lookups fail at once (ICMP port unreachable), as when a resolver is down.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    names: Mutex<HashMap<String, Ipv4Addr>>,
    queries: AtomicUsize,
    stopping: AtomicBool,
}

impl DnsServer {
    /// Serves `names` (lowercase, without the trailing dot) on the first free 127.53.0.x:53.
    pub fn start(names: &[(&str, Ipv4Addr)]) -> io::Result<DnsServer> {
        let mut last = io::Error::other("no address tried");
        for x in 1..=254 {
            match UdpSocket::bind((Ipv4Addr::new(127, 53, 0, x), 53)) {
                Ok(socket) => return DnsServer::serve(socket, names),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn serve(socket: UdpSocket, names: &[(&str, Ipv4Addr)]) -> io::Result<DnsServer> {
        let addr = socket.local_addr()?;
        // Short, so that `stop` is noticed quickly.
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let shared = Arc::new(Shared {
            names: Mutex::new(names.iter().map(|(n, ip)| (n.to_string(), *ip)).collect()),
            queries: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("dns-server".into()).spawn(move || {
            let mut buf = [0u8; 512];
            while !sh.stopping.load(Ordering::SeqCst) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
                sh.queries.fetch_add(1, Ordering::SeqCst);
                let answer = answer(&buf[..n], &sh.names.lock().expect("names"));
                if let Some(reply) = answer {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        })?;
        Ok(DnsServer { addr, shared, thread: Some(thread) })
    }

    /// The IP the server listens on (port 53), for resolv.conf's `nameserver` line.
    pub fn ip(&self) -> std::net::IpAddr {
        self.addr.ip()
    }

    /// Queries received so far (A and AAAA alike).
    pub fn queries(&self) -> usize {
        self.shared.queries.load(Ordering::SeqCst)
    }

    /// From now on `name` resolves to `ip`.
    pub fn set(&self, name: &str, ip: Ipv4Addr) {
        self.shared.names.lock().expect("names").insert(name.to_string(), ip);
    }

    /// Closes the socket; returns when it is closed.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// The reply to one query message, or None if it is not one we can parse (then it goes unanswered).
fn answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root label, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(at + 2)?, *query.get(at + 3)?]);
    let question = &query[12..at + 4];
    let ip = names.get(&labels.join("."));
    let a = ip.filter(|_| qtype == TYPE_A && qclass == CLASS_IN);

    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[0..2]); // ID
    let rd = query[2] & 0x01;
    out.push(0x84 | rd); // QR, authoritative, RD copied
    out.push(if ip.is_some() { 0x80 } else { 0x83 }); // RA; NOERROR, or NXDOMAIN for an unknown name
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&u16::from(a.is_some()).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(question);
    if let Some(ip) = a {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes()); // TTL (ignored by getaddrinfo)
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
