//! MAC addresses of guest interfaces: stable per VM and interface (derived from a hash, so the
//! same VM gets the same MAC after an agent restart and neighbours' ARP caches stay right), or
//! taken from the spec.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// Why a MAC from a spec was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MacProblem {
    /// Not six colon-separated hex octets.
    Syntax,
    /// The group bit is set: a multicast address cannot be a NIC's address.
    Multicast,
    /// All zeros.
    Zero,
}

impl fmt::Display for MacProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MacProblem::Syntax => "expected six hex octets like 02:00:00:00:00:01",
            MacProblem::Multicast => "the multicast bit is set (first octet is odd)",
            MacProblem::Zero => "the all-zero address is not a unicast address",
        })
    }
}

impl Mac {
    /// The MAC of interface `ifname` of VM `uid`: `02:` (locally administered, unicast)
    /// followed by 40 bits of a SHA-256 of both.
    pub(crate) fn derive(uid: &str, ifname: &str) -> Mac {
        let digest = Sha256::digest(format!("ignis-mac/{uid}/{ifname}").as_bytes());
        Mac([0x02, digest[0], digest[1], digest[2], digest[3], digest[4]])
    }

    /// A stable MAC for a host-side link (the bridge), so it never changes when ports come and
    /// go (a bridge otherwise takes the lowest port MAC and guests' ARP caches go stale).
    pub(crate) fn derive_host(name: &str) -> Mac {
        let digest = Sha256::digest(format!("ignis-host-mac/{name}").as_bytes());
        Mac([0x02, digest[0], digest[1], digest[2], digest[3], digest[4]])
    }

    /// Parse and check a MAC given by a user.
    pub(crate) fn parse_unicast(text: &str) -> Result<Mac, MacProblem> {
        let mac: Mac = text.parse()?;
        if mac.0 == [0; 6] {
            return Err(MacProblem::Zero);
        }
        if mac.0[0] & 0x01 != 0 {
            return Err(MacProblem::Multicast);
        }
        Ok(mac)
    }
}

impl FromStr for Mac {
    type Err = MacProblem;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or(MacProblem::Syntax)?;
            if part.len() != 2 {
                return Err(MacProblem::Syntax);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacProblem::Syntax)?;
        }
        if parts.next().is_some() {
            return Err(MacProblem::Syntax);
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let a = Mac::derive("uid-1", "eth0");
        assert_eq!(a, Mac::derive("uid-1", "eth0"));
        assert_ne!(a, Mac::derive("uid-1", "eth1"));
        assert_ne!(a, Mac::derive("uid-2", "eth0"));
        assert_eq!(a.0[0], 0x02);
        assert!(a.to_string().starts_with("02:"));
        assert_eq!(Mac::parse_unicast(&a.to_string()), Ok(a));
    }

    #[test]
    fn parsing_refuses_bad_input() {
        assert_eq!(
            Mac::parse_unicast("02:AB:cd:00:00:01").map(|m| m.to_string()),
            Ok("02:ab:cd:00:00:01".to_string())
        );
        assert_eq!(
            Mac::parse_unicast("02:00:00:00:00"),
            Err(MacProblem::Syntax)
        );
        assert_eq!(
            Mac::parse_unicast("02:00:00:00:00:01:07"),
            Err(MacProblem::Syntax)
        );
        assert_eq!(
            Mac::parse_unicast("02:00:00:00:00:zz"),
            Err(MacProblem::Syntax)
        );
        assert_eq!(
            Mac::parse_unicast("2:00:00:00:00:01"),
            Err(MacProblem::Syntax)
        );
        assert_eq!(
            Mac::parse_unicast("01:00:5e:00:00:01"),
            Err(MacProblem::Multicast)
        );
        assert_eq!(
            Mac::parse_unicast("00:00:00:00:00:00"),
            Err(MacProblem::Zero)
        );
    }
}
