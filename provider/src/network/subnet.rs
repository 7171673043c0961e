//! Subnets in CIDR form and the inclusive address ranges of static pools.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::NetworkError;

/// A subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::InvalidSubnet(s.into());
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let c = Self { base: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix };
        if c.base != addr {
            // 10.0.0.5/24 is a host address, not a subnet: say which subnet was meant.
            return Err(NetworkError::InvalidSubnet(format!("{s} (did you mean {c}?)")));
        }
        Ok(c)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.base)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

/// An inclusive address range of a static pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::InvalidPool(s.into());
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let start: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let end: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if u32::from(start) > u32::from(end) {
            return Err(bad());
        }
        Ok(Self { start, end })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    pub(super) fn overlaps(&self, o: &Pool) -> bool {
        u32::from(self.start) <= u32::from(o.end) && u32::from(o.start) <= u32::from(self.end)
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}
