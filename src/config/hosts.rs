//! What a Host value may look like (`admin.allowed_hosts`, and the Host
//! header the admin API checks against them): syntax only, no lookups.

/// Splits a Host value into its host (`name`, `1.2.3.4` or `[v6]`) and
/// port; `None` when it is not of that shape.
pub fn split_host(h: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if h.starts_with('[') {
        let end = h.find(']')?;
        let (host, rest) = h.split_at(end + 1);
        match rest {
            "" => (host, None),
            r => (host, Some(r.strip_prefix(':')?)),
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return None;
    }
    Some((host, port))
}

/// Whether `h` may be listed in `admin.allowed_hosts`: a host name, an
/// IPv4 address or a bracketed IPv6 address, with an optional `:port`.
pub fn valid_allowed_host(h: &str) -> bool {
    match split_host(h) {
        Some((host, _)) if host.starts_with('[') => host
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .is_some_and(|v| v.parse::<std::net::Ipv6Addr>().is_ok()),
        Some((host, _)) => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'),
        None => false,
    }
}
