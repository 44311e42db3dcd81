//! The caller's own address, for the helper's ssh ingress rule (a /32, never the world).
//!
//! In order: `EC2_BACKUP_SSH_CIDR` when the user sets it (behind a VPN, or reaching the helper
//! by its private address); with a custom EC2 endpoint (`AWS_ENDPOINT_URL`, e.g. the local
//! simulator) the local address that routes to that endpoint; otherwise the public address
//! AWS's own check service sees (https://checkip.amazonaws.com).

use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::CloudError;

const ACTION: &str = "Finding this machine's address for the helper's ssh rule";
const CHECKIP: &str = "https://checkip.amazonaws.com/";

/// The CIDR (a single address) allowed to reach the helper's ssh port.
pub async fn ingress_cidr() -> Result<String, CloudError> {
    if let Ok(cidr) = std::env::var("EC2_BACKUP_SSH_CIDR") {
        return parse_cidr(&cidr).ok_or_else(|| {
            CloudError::config(
                ACTION,
                format!("EC2_BACKUP_SSH_CIDR is '{cidr}', not an address or address/prefix"),
            )
        });
    }
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        if let Some(ip) = local_address_towards(&endpoint) {
            return Ok(single(ip));
        }
    }
    public_address().await.map(single)
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

/// The local address the kernel would use to reach the endpoint's host (no packet is sent:
/// connecting a UDP socket only picks a route).
fn local_address_towards(endpoint: &str) -> Option<IpAddr> {
    let rest = endpoint
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(endpoint);
    let authority = rest.split('/').next()?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let target = with_port.to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
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
    fn loopback_endpoint_routes_from_loopback() {
        let ip = local_address_towards("http://127.0.0.1:4566").unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let ip = local_address_towards("http://localhost:4566/").unwrap();
        assert!(ip.is_loopback(), "{ip}");
    }
}
