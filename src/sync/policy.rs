//! Where the service may connect: the address policy for tenant databases.
//!
//! The host of a target is resolved once, every address is checked here, and the
//! connection is then pinned to the checked addresses ([`CheckedAddresses`]), so a
//! second DNS answer cannot point it elsewhere.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::error::SyncError;
use super::target::Target;
use crate::db::InternalDatabase;

/// Where the service may connect. By default only global unicast addresses: a tenant
/// must not be able to make the service talk to its own infrastructure. The internal
/// database is refused even when private targets are allowed, so that no tenant
/// configuration can write into it: by its address here (compared in canonical form),
/// and, whatever spelling got past that, by its identity once connected (see
/// [`super::connect::connect`]).
pub struct TargetPolicy {
    allow_private: bool,
    internal: InternalDatabase,
    /// The internal database's addresses, once they resolved; a failed resolution is
    /// not kept, so it is tried again next time instead of switching the check off.
    internal_addresses: OnceCell<Vec<IpAddr>>,
}

/// Whether tenant databases may be on non-public addresses (`ALLOW_PRIVATE_TARGETS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateTargets {
    /// Only global unicast addresses; no Unix sockets.
    Refused,
    /// Loopback, private, link-local and the other ranges too, and Unix sockets (the
    /// internal database is still refused).
    Allowed,
}

/// Addresses a target may be reached at, checked by [`TargetPolicy::check`].
#[derive(Debug)]
pub struct CheckedAddresses(pub(super) Vec<IpAddr>);

impl TargetPolicy {
    pub fn new(private_targets: PrivateTargets, internal: InternalDatabase) -> Self {
        Self {
            allow_private: private_targets == PrivateTargets::Allowed,
            internal,
            internal_addresses: OnceCell::new(),
        }
    }

    /// Resolves `target` and checks every address it resolves to.
    pub async fn check(
        &self,
        target: &Target,
        resolve_timeout: Duration,
    ) -> Result<CheckedAddresses, SyncError> {
        let refused =
            |reason: String| SyncError::TargetRefused(format!("{}: {reason}", target.describe()));
        if target.is_unix_socket() {
            return if self.allow_private && !self.is_internal_database(target, &[]).await {
                Ok(CheckedAddresses(Vec::new()))
            } else {
                Err(refused(
                    "Unix sockets are local; set ALLOW_PRIVATE_TARGETS=true to allow them".into(),
                ))
            };
        }
        let addresses: Vec<IpAddr> = resolve(&target.host, target.port, resolve_timeout)
            .await?
            .into_iter()
            .map(|address| address.to_canonical())
            .collect();
        if self.is_internal_database(target, &addresses).await {
            return Err(refused(
                "this is the service's own internal database".into(),
            ));
        }
        if !self.allow_private {
            if let Some((address, kind)) = addresses
                .iter()
                .find_map(|address| non_public_kind(*address).map(|kind| (address, kind)))
            {
                return Err(refused(format!(
                    "{address} is a {kind} address; set ALLOW_PRIVATE_TARGETS=true to allow it"
                )));
            }
            if self
                .internal_addresses()
                .await
                .iter()
                .any(|internal| addresses.contains(internal))
            {
                return Err(refused(
                    "it is on the internal database's server; set ALLOW_PRIVATE_TARGETS=true \
                     to allow it"
                        .into(),
                ));
            }
        }
        Ok(CheckedAddresses(addresses))
    }

    /// A first, cheap check by address; the identity check after connecting is the
    /// one no spelling can pass. An unspecified address (`0.0.0.0`, `::`) reaches this
    /// machine, so it counts as every local address.
    async fn is_internal_database(&self, target: &Target, addresses: &[IpAddr]) -> bool {
        if target.port != self.internal.port || target.dbname != self.internal.dbname {
            return false;
        }
        if target.host == self.internal.host {
            return true;
        }
        let internal = self.internal_addresses().await;
        let local = |address: &IpAddr| address.is_loopback() || address.is_unspecified();
        addresses.iter().any(|address| {
            internal.contains(address) || (local(address) && internal.iter().any(local))
        })
    }

    /// The internal database's addresses in canonical form, resolved once they can be.
    /// While the name does not resolve the list is empty (and resolution is tried again
    /// next time); the host-name comparison and the identity check still apply.
    async fn internal_addresses(&self) -> &[IpAddr] {
        if self.internal.host.starts_with('/') {
            return &[];
        }
        let resolved = self
            .internal_addresses
            .get_or_try_init(|| async {
                resolve(
                    &self.internal.host,
                    self.internal.port,
                    Duration::from_secs(5),
                )
                .await
                .map(|addresses| addresses.into_iter().map(|a| a.to_canonical()).collect())
            })
            .await;
        resolved.map_or(&[], Vec::as_slice)
    }
}

async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<IpAddr>, SyncError> {
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(vec![address]);
    }
    let failed = |reason: std::io::Error| SyncError::Resolve {
        host: host.to_owned(),
        source: reason,
    };
    let lookup = tokio::net::lookup_host((host, port));
    let addresses = match tokio::time::timeout(timeout, lookup).await {
        Ok(found) => found.map_err(failed)?,
        Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
    };
    let mut unique: Vec<IpAddr> = Vec::new();
    for address in addresses.map(|socket| socket.ip()) {
        if !unique.contains(&address) {
            unique.push(address);
        }
    }
    if unique.is_empty() {
        return Err(failed(std::io::ErrorKind::NotFound.into()));
    }
    Ok(unique)
}

/// Why `address` is not a global unicast address, if it is not. Only global unicast
/// passes: the special-purpose ranges (IANA's registries) that are not routed on the
/// internet, or that tunnel to an address judged elsewhere, are all refused.
pub fn non_public_kind(address: IpAddr) -> Option<&'static str> {
    match address.to_canonical() {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 embeds an IPv4 address; judge that one.
                let [.., a, b] = segments;
                non_public_v4(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b)))
            } else if segments[0] & 0xe000 != 0x2000 {
                // Outside 2000::/3: unique local, link-local, site-local, multicast,
                // IPv4-compatible (::/96), discard and the rest of the reserved space.
                Some(match segments[0] {
                    first if first & 0xfe00 == 0xfc00 => "private (unique local)",
                    first if first & 0xffc0 == 0xfe80 => "link-local",
                    first if first & 0xffc0 == 0xfec0 => "site-local",
                    first if first & 0xff00 == 0xff00 => "multicast",
                    _ => "reserved",
                })
            } else if segments[0] == 0x2002 {
                Some("6to4 tunnel")
            } else if segments[0] == 0x2001 && segments[1] < 0x0200 {
                // 2001::/23: Teredo (2001::/32), benchmarking, ORCHID and other IETF
                // protocol assignments.
                Some("special-purpose (IETF protocol assignment)")
            } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if a == 0 {
        Some("unspecified")
    } else if a == 192 && b == 0 && c == 0 {
        Some("special-purpose (IETF protocol assignment)")
    } else if (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        Some("documentation")
    } else if a == 198 && (b & 0xfe) == 18 {
        Some("benchmarking")
    } else if a == 192 && b == 88 && c == 99 {
        Some("6to4 relay")
    } else if v4.is_multicast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Target {
        Target::parse(raw).unwrap()
    }

    #[test]
    fn classifies_addresses() {
        let kind = |text: &str| non_public_kind(text.parse().unwrap());
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "::7f00:1",
            "2002:7f00:1::1",
            "2001::1",
            "2001:db8::1",
            "fec0::1",
            "100::1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "192.88.99.1",
            "255.255.255.255",
        ] {
            assert!(kind(private).is_some(), "{private}");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "64:ff9b::808:808",
            "2606:4700::1111",
            "2001:200::1",
            "198.20.0.1",
            "192.0.3.1",
        ] {
            assert_eq!(kind(public), None, "{public}");
        }
    }

    fn policy(private_targets: PrivateTargets) -> TargetPolicy {
        TargetPolicy::new(
            private_targets,
            InternalDatabase {
                host: "10.0.0.5".into(),
                port: 5432,
                dbname: "app".into(),
            },
        )
    }

    #[tokio::test]
    async fn refuses_private_targets_unless_allowed() {
        let target = parse("postgres://a@127.0.0.1:5432/tenant");
        let error = policy(PrivateTargets::Refused)
            .check(&target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(error, SyncError::TargetRefused(_)));
        assert!(
            error
                .to_string()
                .contains("127.0.0.1 is a loopback address"),
            "{error}"
        );
        assert!(policy(PrivateTargets::Allowed)
            .check(&target, Duration::from_secs(1))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn always_refuses_the_internal_database() {
        let target = parse("postgres://a@10.0.0.5:5432/app");
        let error = policy(PrivateTargets::Allowed)
            .check(&target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("internal database"), "{error}");
        let other_database = parse("postgres://a@10.0.0.5:5432/tenant");
        assert!(policy(PrivateTargets::Allowed)
            .check(&other_database, Duration::from_secs(1))
            .await
            .is_ok());
    }
}
