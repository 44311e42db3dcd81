//! The caller's own address, for the helper's ssh ingress rule (a /32, never the world).
//!
//! The rule must name the source address the helper will really see, and that depends on how
//! the helper is reached, which is known only once it has an address (it has one while it
//! still boots, long before ssh answers): so the rule is added then, before the first ssh.
//! In order:
//! - `EC2_BACKUP_SSH_CIDR` when the user sets it (behind a VPN or a NAT we cannot see past);
//! - the local address of the route to the helper, when that address is what it sees: the
//!   helper is reached at a private, link-local or IPv6 address (inside a VPC, over a VPN,
//!   the local simulator), or this machine itself has a public IPv4 address on that route;
//! - else (a public IPv4 helper reached from behind NAT) the public address AWS's own check
//!   service sees (https://checkip.amazonaws.com).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::CloudError;

const ACTION: &str = "Finding this machine's address for the helper's ssh rule";
const CHECKIP: &str = "https://checkip.amazonaws.com/";

/// The CIDR the user set in `EC2_BACKUP_SSH_CIDR`, if any (checked before anything is made).
pub fn configured_cidr() -> Result<Option<String>, CloudError> {
    let Ok(cidr) = std::env::var("EC2_BACKUP_SSH_CIDR") else {
        return Ok(None);
    };
    parse_cidr(&cidr).map(Some).ok_or_else(|| {
        CloudError::config(
            ACTION,
            format!("EC2_BACKUP_SSH_CIDR is '{cidr}', not an address or address/prefix"),
        )
    })
}

/// The single address (as a CIDR) the helper at `helper` will see this machine's ssh come from.
pub async fn source_cidr(helper: &str) -> Result<String, CloudError> {
    let target: IpAddr = helper.parse().map_err(|_| {
        CloudError::new(
            ACTION,
            format!("the helper's address '{helper}' is not an IP address"),
        )
    })?;
    let local = local_address_towards(target).ok_or_else(|| {
        CloudError::new(
            ACTION,
            format!("this machine has no route to the helper at {target}"),
        )
    })?;
    match source(target, local) {
        Source::Local(ip) => Ok(single(ip)),
        Source::Checkip => public_address().await.map(single),
    }
}

/// Where the helper's view of our address comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// The route's local address is what the helper sees (no NAT in between).
    Local(IpAddr),
    /// NAT is likely between us (a private IPv4 source, a public IPv4 helper): ask checkip.
    Checkip,
}

fn source(helper: IpAddr, local: IpAddr) -> Source {
    match (helper, local) {
        (IpAddr::V4(h), IpAddr::V4(l)) if is_public(h) && !is_public(l) => Source::Checkip,
        _ => Source::Local(local),
    }
}

/// An IPv4 address reached across the internet (NAT may rewrite a source on the way to it).
fn is_public(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b); // 100.64.0.0/10, carrier-grade NAT
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || shared)
}

fn single(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Accepts `a.b.c.d` (made a /32) or `a.b.c.d/n`.
pub fn parse_cidr(text: &str) -> Option<String> {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix {
        None => Some(single(ip)),
        Some(p) => {
            let n: u8 = p.parse().ok()?;
            (n <= max).then(|| format!("{ip}/{n}"))
        }
    }
}

/// The local address the kernel would use to reach `target` (no packet is sent: connecting a
/// UDP socket only picks a route).
fn local_address_towards(target: IpAddr) -> Option<IpAddr> {
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(SocketAddr::new(target, 22)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

async fn public_address() -> Result<IpAddr, CloudError> {
    let fail = |detail: String| {
        CloudError::new(
            ACTION,
            format!("asking {CHECKIP} failed ({detail}); set EC2_BACKUP_SSH_CIDR to this machine's public address"),
        )
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
        .map_err(|e| fail(e.to_string()))?
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let uri: http::Uri = CHECKIP
        .parse()
        .map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
    let body = tokio::time::timeout(Duration::from_secs(15), async {
        let response = client.get(uri).await.map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("HTTP {}", response.status())));
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    })
    .await
    .map_err(|_| fail("no answer within 15 s".into()))??;
    body.parse()
        .map_err(|_| fail(format!("it answered '{body}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("203.0.113.7").as_deref(), Some("203.0.113.7/32"));
        assert_eq!(parse_cidr(" 10.1.0.0/16 ").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(
            parse_cidr("2001:db8::1").as_deref(),
            Some("2001:db8::1/128")
        );
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_cidr("example.com"), None);
    }

    #[test]
    fn route_to_loopback_starts_at_loopback() {
        let ip = local_address_towards("127.0.0.1".parse().unwrap()).unwrap();
        assert!(ip.is_loopback(), "{ip}");
    }

    #[test]
    fn the_local_address_serves_unless_nat_is_likely() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The simulator, a VPC's private address, a VPN: what the route says.
        for (helper, local) in [
            ("169.254.3.2", "169.254.3.1"),
            ("10.0.1.7", "10.0.0.5"),
            ("172.31.5.9", "192.168.1.20"),
            ("100.64.1.2", "10.0.0.5"),
            ("127.0.0.1", "127.0.0.1"),
            ("2600:1f18::7", "2001:db8::5"),
            ("3.80.1.2", "198.51.100.77"), // a documentation range: not public
        ] {
            let expected = if local == "198.51.100.77" {
                Source::Checkip
            } else {
                Source::Local(ip(local))
            };
            assert_eq!(
                source(ip(helper), ip(local)),
                expected,
                "{helper} from {local}"
            );
        }
        // A public helper from a private address: NAT in between, ask checkip.
        assert_eq!(source(ip("3.80.1.2"), ip("192.168.1.20")), Source::Checkip);
        // This machine on a public address itself: the route's address is what it sees.
        assert_eq!(
            source(ip("3.80.1.2"), ip("52.1.2.3")),
            Source::Local(ip("52.1.2.3"))
        );
    }
}
