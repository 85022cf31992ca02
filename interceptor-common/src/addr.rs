//! 16-byte addresses as the kernel hands them out: four `u32` words, each in network byte order.

/// An IPv6 address, or an IPv4 address in its IPv4-mapped form, as four network-order words.
pub type Addr = [u32; 4];

/// The IPv4-mapped prefix word `0000:ffff` in network byte order.
const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

/// Maps an IPv4 address (network byte order, as in `sockaddr_in.sin_addr`) to `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4_be]
}

/// Whether `addr` is an IPv4-mapped address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Whether an IPv4 address (network byte order) is in 127.0.0.0/8.
#[inline(always)]
pub const fn is_loopback_v4(ip4_be: u32) -> bool {
    // The first octet is the lowest-addressed byte: on any host, from_be() puts it on top.
    (u32::from_be(ip4_be) >> 24) == 127
}

/// Whether a 16-byte address is a loopback address: `::1`, or IPv4-mapped 127.0.0.0/8.
#[inline(always)]
pub const fn is_loopback(addr: &Addr) -> bool {
    if is_v4_mapped(addr) {
        return is_loopback_v4(addr[3]);
    }
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be()
}

/// Whether the address is unspecified: `::`, or 0.0.0.0 in its IPv4-mapped form (what an
/// unbound IPv4 socket's source reads as).
#[inline(always)]
pub const fn is_unspecified(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && (addr[2] == 0 || addr[2] == V4_MAPPED_WORD) && addr[3] == 0
}

/// 127.0.0.1 in network byte order.
pub const LOCALHOST_V4: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
/// `::1` as four network-order words.
pub const LOCALHOST_V6: Addr = [0, 0, 0, 1u32.to_be()];

/// An address as the maps store it: four network-order words, IPv4 mapped. The user-space half
/// of the codec; the programs read the same words from `bpf_sock_addr` and `bpf_sock_ops`.
pub fn from_ip(ip: core::net::IpAddr) -> Addr {
    let o = match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    };
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// The inverse of [`from_ip`] (an IPv4-mapped address reads back as IPv4).
pub fn to_ip(a: Addr) -> core::net::IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = core::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_round_trip() {
        for s in [
            "198.18.0.7",
            "fd00:198:18::7",
            "::1",
            "127.0.0.6",
            "::ffff:0:1",
        ] {
            let ip: core::net::IpAddr = s.parse().unwrap();
            let back = to_ip(from_ip(ip));
            // ::ffff:0.0.0.1 is IPv4-mapped: it reads back as its IPv4 form.
            assert_eq!(back.to_canonical(), ip.to_canonical(), "{s}");
        }
        let v4: core::net::Ipv4Addr = "198.18.0.7".parse().unwrap();
        assert_eq!(
            from_ip(core::net::IpAddr::V4(v4)),
            v4_mapped(u32::from_be_bytes(v4.octets()).to_be())
        );
    }

    #[test]
    fn mapped_round_trip() {
        let ip = u32::from_be_bytes([198, 18, 0, 7]).to_be();
        let m = v4_mapped(ip);
        assert!(is_v4_mapped(&m));
        assert_eq!(m[3], ip);
        // ::ffff:198.18.0.7 as bytes
        let mut bytes = [0u8; 16];
        for (i, w) in m.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 7]
        );
    }

    #[test]
    fn unspecified_in_both_forms() {
        assert!(is_unspecified(&[0; 4]));
        assert!(is_unspecified(&v4_mapped(0)));
        assert!(!is_unspecified(&v4_mapped(LOCALHOST_V4)));
        assert!(!is_unspecified(&LOCALHOST_V6));
    }

    #[test]
    fn loopback() {
        assert!(is_loopback(&v4_mapped(LOCALHOST_V4)));
        assert!(is_loopback(&v4_mapped(
            u32::from_be_bytes([127, 0, 0, 6]).to_be()
        )));
        assert!(is_loopback(&LOCALHOST_V6));
        assert!(!is_loopback(&v4_mapped(
            u32::from_be_bytes([198, 18, 0, 1]).to_be()
        )));
        assert!(!is_loopback(&[0, 0, 0, 2u32.to_be()]));
    }
}
