//! Where the gateway may send a team's webhooks.
//!
//! A `callback_url` comes from a team's request, so it must not turn the gateway into a way to
//! reach what only the gateway can: itself and its neighbours on loopback, link-local addresses,
//! or a cloud's metadata service (which hands out credentials). Hosts a team's `callback_hosts`
//! lists are exempt. The check runs twice: on the URL when the request arrives (a clear 400), and
//! on the addresses the host resolves to when a delivery connects, so a DNS answer that changes
//! in between cannot slip past.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// Addresses cloud providers serve instance metadata on, beyond link-local 169.254.169.254.
const METADATA: [IpAddr; 2] = [
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // AWS over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Why the address may not be called, if it may not.
pub fn blocked(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if METADATA.contains(&ip) {
        return Some("a cloud metadata address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("not a unicast address")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => Some("not a unicast address"),
        _ => None,
    }
}

/// Hosts a team may call whatever they resolve to.
#[derive(Debug, Clone, Default)]
pub struct Allowed(Arc<[String]>);

impl Allowed {
    pub fn new(hosts: &[String]) -> Allowed {
        Allowed(hosts.iter().map(|h| h.to_ascii_lowercase()).collect())
    }

    fn contains(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.0
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
    }
}

/// Checks a team's `callback_url` as written; the detail says what is wrong, for a 400.
pub fn check_url(text: &str, allowed: &Allowed) -> Result<url::Url, String> {
    let url =
        url::Url::parse(text).map_err(|_| "callback_url must be an http(s) URL".to_owned())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("callback_url must be an http(s) URL".into());
    }
    let host = match url.host() {
        None => return Err("callback_url must be an http(s) URL".into()),
        Some(host) => host,
    };
    let host_text = host.to_string();
    if allowed.contains(&host_text) {
        return Ok(url);
    }
    let reason = match host {
        url::Host::Ipv4(v4) => blocked(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => blocked(IpAddr::V6(v6)),
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost")).then_some("a loopback address")
        }
    };
    match reason {
        Some(reason) => Err(format!(
            "callback_url host {host_text} is {reason}, which webhooks may not be sent to; \
             platform admins can allow it in the team's callback_hosts"
        )),
        None => Ok(url),
    }
}

/// A DNS resolver for deliveries that drops blocked addresses (unless the host is allowed), so
/// the connection goes only where the check said it may.
#[derive(Clone)]
pub struct GuardedResolver {
    allowed: Allowed,
}

impl GuardedResolver {
    pub fn new(allowed: Allowed) -> Self {
        GuardedResolver { allowed }
    }
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allowed = self.allowed.clone();
        Box::pin(async move {
            let host = name.as_str();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            if allowed.contains(host) {
                return Ok(found.into_iter());
            }
            let reasons: Vec<&str> = found.iter().filter_map(|a| blocked(a.ip())).collect();
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| blocked(a.ip()).is_none())
                .collect();
            if usable.is_empty() {
                let reason = reasons.first().copied().unwrap_or("unresolvable");
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to {reason}, which webhooks may not be sent to"),
                ));
            }
            Ok(usable.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_blocked_and_ordinary_ones_are_not() {
        for address in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "100.100.100.200",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(blocked(ip(address)).is_some(), "{address} must be blocked");
        }
        // Private ranges are where internal services live: allowed.
        for address in [
            "10.1.2.3",
            "192.168.1.10",
            "172.16.0.5",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            assert_eq!(blocked(ip(address)), None, "{address} must be allowed");
        }
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        let none = Allowed::default();
        assert!(check_url("https://hooks.design.example/cb?x=1", &none).is_ok());
        assert!(check_url("http://10.0.0.7:8080/cb", &none).is_ok());
        for bad in [
            "ftp://hooks.example/",
            "javascript:alert(1)",
            "not a url",
            "https://",
        ] {
            assert_eq!(
                check_url(bad, &none).unwrap_err(),
                "callback_url must be an http(s) URL",
                "{bad}"
            );
        }
        for internal in [
            "http://127.0.0.1:9000/cb",
            "http://[::1]/cb",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://[::ffff:7f00:1]/",
        ] {
            let error = check_url(internal, &none).unwrap_err();
            assert!(error.contains("callback_hosts"), "{internal}: {error}");
        }
        let allowed = Allowed::new(&["127.0.0.1".into(), "LocalHost".into(), "::1".into()]);
        assert!(check_url("http://127.0.0.1:9000/cb", &allowed).is_ok());
        assert!(check_url("http://localhost:9000/cb", &allowed).is_ok());
        assert!(check_url("http://[::1]:9000/cb", &allowed).is_ok());
        assert!(check_url("http://169.254.169.254/", &allowed).is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_blocked_addresses_unless_the_host_is_allowed() {
        use tower::ServiceExt;
        let name = |text: &str| text.parse::<Name>().unwrap();
        let refused = GuardedResolver::new(Allowed::default())
            .oneshot(name("localhost"))
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("loopback"), "{refused}");

        let allowed = GuardedResolver::new(Allowed::new(&["localhost".into()]))
            .oneshot(name("localhost"))
            .await
            .unwrap();
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }
}
