//! Where the gateway may send a team's webhooks.
//!
//! A `callback_url` comes from a team's request, so it must not turn the gateway into a way to
//! reach what only the gateway can: itself and its neighbours on loopback, link-local addresses,
//! "this network" (0.0.0.0/8), or a cloud's metadata service (which hands out credentials).
//! Private ranges stay callable: that is where teams' own receivers often live. An IPv6 address
//! that carries an IPv4 one (IPv4-mapped or -compatible, NAT64, 6to4) is judged by the IPv4
//! address it reaches; Teredo and local-use NAT64 addresses, whose IPv4 address cannot be read
//! off the address alone, are refused whole. Hosts a team's `callback_hosts` lists are exempt.
//! The check runs twice: on the URL when the request arrives (a clear 400), and when a delivery
//! connects, on the addresses the host resolves to or on the IP literal it is, so a DNS answer
//! that changes in between cannot slip past.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Addresses cloud providers serve instance metadata on.
const METADATA_V4: [Ipv4Addr; 2] = [
    // AWS, GCP, Azure and most others (also link-local).
    Ipv4Addr::new(169, 254, 169, 254),
    // Alibaba Cloud.
    Ipv4Addr::new(100, 100, 100, 200),
];
/// AWS's metadata service over IPv6.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Why an address may not be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// What the address is or reaches, e.g. "a loopback address".
    what: &'static str,
    /// When the refusal is of an IPv4 address an IPv6 one carries: the IPv6 form, and that
    /// IPv4 address.
    carried: Option<(&'static str, Ipv4Addr)>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.carried {
            Some((form, v4)) => write!(f, "{form} of {v4}, {}", self.what),
            None => f.write_str(self.what),
        }
    }
}

/// Why the address may not be called, if it may not: the one classification both checks use.
/// An IPv6 address is refused for what it is, then for the IPv4 address it carries, if any.
pub fn blocked(ip: IpAddr) -> Option<Refused> {
    let own = |what| Refused {
        what,
        carried: None,
    };
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4).map(own),
        IpAddr::V6(v6) => blocked_v6(v6).map(own).or_else(|| {
            let (form, v4) = carried_ipv4(v6)?;
            blocked_v4(v4).map(|what| Refused {
                what,
                carried: Some((form, v4)),
            })
        }),
    }
}

fn blocked_v4(v4: Ipv4Addr) -> Option<&'static str> {
    if METADATA_V4.contains(&v4) {
        Some("a cloud metadata address")
    } else if v4.octets()[0] == 0 {
        Some("a \"this network\" address (0.0.0.0/8)")
    } else if v4.is_loopback() {
        Some("a loopback address")
    } else if v4.is_link_local() {
        Some("a link-local address")
    } else if v4.is_broadcast() || v4.is_multicast() {
        Some("not a unicast address")
    } else {
        None
    }
}

fn blocked_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let [first, second, third, ..] = v6.segments();
    if v6 == METADATA_V6 {
        Some("a cloud metadata address")
    } else if v6.is_loopback() {
        Some("a loopback address")
    } else if v6.is_unicast_link_local() {
        Some("a link-local address")
    } else if v6.is_unspecified() || v6.is_multicast() {
        Some("not a unicast address")
    } else if (first, second) == (0x2001, 0) {
        // 2001::/32: the client's IPv4 address is obfuscated, and the tunnel runs through a
        // server and a relay besides; nothing a webhook needs.
        Some("a Teredo address (2001::/32)")
    } else if (first, second, third) == (0x64, 0xff9b, 1) {
        // 64:ff9b:1::/48: where the IPv4 address sits depends on the network's prefix length.
        Some("a local-use NAT64 address (64:ff9b:1::/48)")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address carries and reaches, with the form that carries it.
fn carried_ipv4(v6: Ipv6Addr) -> Option<(&'static str, Ipv4Addr)> {
    let segments = v6.segments();
    let last_32 = Ipv4Addr::from_bits(v6.to_bits() as u32);
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(("an IPv4-mapped address", v4))
    } else if let Some(v4) = v6.to_ipv4() {
        // `::a.b.c.d`; `to_ipv4` also takes the mapped form, matched above.
        Some(("an IPv4-compatible address", v4))
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(("a NAT64 address", last_32))
    } else if segments[0] == 0x2002 {
        // 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
        Some((
            "a 6to4 address",
            Ipv4Addr::from_bits((v6.to_bits() >> 80) as u32),
        ))
    } else {
        None
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
            (name == "localhost" || name.ends_with(".localhost")).then_some(Refused {
                what: "a loopback address",
                carried: None,
            })
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
            let first_refused = found.iter().find_map(|a| blocked(a.ip()));
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| blocked(a.ip()).is_none())
                .collect();
            if usable.is_empty() {
                let reason = first_refused.map_or("unresolvable".to_owned(), |r| r.to_string());
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to {reason}, which webhooks may not be sent to"),
                ));
            }
            Ok(usable.into_iter())
        })
    }
}

/// The deliveries' connector. A host name goes through [`GuardedResolver`]; an IP literal,
/// which the resolver never sees, is checked here before anything connects.
#[derive(Clone)]
pub struct GuardedConnector {
    allowed: Allowed,
    http: HttpConnector<GuardedResolver>,
}

impl GuardedConnector {
    pub fn new(allowed: Allowed, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(allowed.clone()));
        // The TLS connector around this one takes https URLs.
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        GuardedConnector { allowed, http }
    }
}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<TcpStream>, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>()
            && !self.allowed.contains(host)
            && let Some(reason) = blocked(ip)
        {
            let refused = std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{host} is {reason}, which webhooks may not be sent to"),
            );
            return Box::pin(std::future::ready(Err(refused.into())));
        }
        let connecting = self.http.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Every form of address, with what its refusal must say, or `None` where it is allowed.
    const ADDRESSES: &[(&str, Option<&str>)] = &[
        // IPv4.
        ("127.0.0.1", Some("a loopback address")),
        ("127.9.9.9", Some("a loopback address")),
        ("169.254.1.1", Some("a link-local address")),
        ("169.254.169.254", Some("a cloud metadata address")),
        ("100.100.100.200", Some("a cloud metadata address")),
        ("0.0.0.0", Some("this network")),
        ("0.1.2.3", Some("this network")),
        ("224.0.0.1", Some("not a unicast address")),
        ("255.255.255.255", Some("not a unicast address")),
        // Private ranges are where teams' own receivers live.
        ("10.1.2.3", None),
        ("172.16.0.5", None),
        ("192.168.1.10", None),
        ("8.8.8.8", None),
        // IPv6.
        ("::1", Some("a loopback address")),
        ("::", Some("not a unicast address")),
        ("fe80::1", Some("a link-local address")),
        ("fd00:ec2::254", Some("a cloud metadata address")),
        ("ff02::1", Some("not a unicast address")),
        ("2001:db8::1", None),
        ("fd12:3456::1", None),
        ("2606:4700::1111", None),
        // IPv4-mapped.
        (
            "::ffff:127.0.0.1",
            Some("an IPv4-mapped address of 127.0.0.1, a loopback"),
        ),
        (
            "::ffff:169.254.169.254",
            Some("of 169.254.169.254, a cloud metadata"),
        ),
        ("::ffff:0.1.2.3", Some("of 0.1.2.3, a \"this network\"")),
        ("::ffff:8.8.8.8", None),
        ("::ffff:10.0.0.7", None),
        // IPv4-compatible.
        (
            "::7f00:1",
            Some("an IPv4-compatible address of 127.0.0.1, a loopback"),
        ),
        ("::a9fe:a9fe", Some("of 169.254.169.254, a cloud metadata")),
        ("::a9fe:101", Some("of 169.254.1.1, a link-local")),
        ("::808:808", None),
        // NAT64, well-known prefix: the last 32 bits.
        (
            "64:ff9b::7f00:1",
            Some("a NAT64 address of 127.0.0.1, a loopback"),
        ),
        (
            "64:ff9b::a9fe:a9fe",
            Some("of 169.254.169.254, a cloud metadata"),
        ),
        ("64:ff9b::a9fe:101", Some("of 169.254.1.1, a link-local")),
        ("64:ff9b::1:203", Some("of 0.1.2.3, a \"this network\"")),
        ("64:ff9b::808:808", None),
        // NAT64, local-use prefix: refused whole.
        ("64:ff9b:1::7f00:1", Some("a local-use NAT64 address")),
        ("64:ff9b:1:808:8::", Some("a local-use NAT64 address")),
        // 6to4: bits 16 to 48.
        (
            "2002:7f00:1::",
            Some("a 6to4 address of 127.0.0.1, a loopback"),
        ),
        (
            "2002:a9fe:a9fe::1",
            Some("of 169.254.169.254, a cloud metadata"),
        ),
        ("2002:a9fe:101:1::1", Some("of 169.254.1.1, a link-local")),
        ("2002:1:203::", Some("of 0.1.2.3, a \"this network\"")),
        ("2002:808:808::1", None),
        // Teredo: refused whole.
        (
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            Some("a Teredo address"),
        ),
        ("2001::1", Some("a Teredo address")),
    ];

    #[test]
    fn every_form_of_an_internal_address_is_blocked_and_public_ones_are_not() {
        for &(address, expected) in ADDRESSES {
            let reason = blocked(ip(address)).map(|r| r.to_string());
            match expected {
                None => assert_eq!(reason, None, "{address} must be allowed"),
                Some(part) => {
                    let reason = reason.unwrap_or_else(|| panic!("{address} must be blocked"));
                    assert!(reason.contains(part), "{address}: {reason}");
                }
            }
        }
    }

    #[test]
    fn every_blocked_form_is_refused_as_a_url_literal() {
        let none = Allowed::default();
        for &(address, expected) in ADDRESSES {
            let url = match ip(address) {
                IpAddr::V4(_) => format!("http://{address}/cb"),
                IpAddr::V6(_) => format!("http://[{address}]/cb"),
            };
            match expected {
                None => assert!(check_url(&url, &none).is_ok(), "{url}"),
                Some(part) => {
                    let error = check_url(&url, &none).unwrap_err();
                    assert!(error.contains(part), "{url}: {error}");
                }
            }
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

    #[tokio::test]
    async fn the_connector_refuses_blocked_ip_literals_unless_the_host_is_allowed() {
        use tower::ServiceExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let timeout = Duration::from_secs(5);
        for host in ["127.0.0.1", "[::ffff:127.0.0.1]", "[::7f00:1]", "0.0.0.0"] {
            let uri: Uri = format!("http://{host}:{port}/").parse().unwrap();
            let refused = GuardedConnector::new(Allowed::default(), timeout)
                .oneshot(uri)
                .await
                .unwrap_err();
            let refused = refused.downcast_ref::<std::io::Error>().unwrap();
            assert_eq!(
                refused.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{host}"
            );
            assert!(refused.to_string().contains(host), "{refused}");
        }
        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        GuardedConnector::new(Allowed::new(&["127.0.0.1".into()]), timeout)
            .oneshot(uri)
            .await
            .unwrap();
    }
}
