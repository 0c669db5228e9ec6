//! Longest-prefix match over overlay addresses (sans-IO): the cryptokey routing table.
//!
//! One hash map per prefix length present, probed from the longest length down: a
//! lookup costs one hash probe per distinct prefix length (usually one or two: /32 and
//! /128 host addresses), whatever the number of peers, and allocates nothing.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Maps prefixes to values; [`PrefixTable::lookup`] returns the value of the longest
/// prefix containing an address.
#[derive(Clone, Debug)]
pub struct PrefixTable<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

#[derive(Clone, Debug)]
struct Family<K, V> {
    /// Prefix lengths present, longest first, each with its (masked key → value) map.
    levels: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Family<K, V> {
    fn default() -> Self {
        Family { levels: Vec::new() }
    }
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        PrefixTable {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

/// A prefix already in the table (the caller decides whether that is an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicate(pub IpNet);

impl<K: std::hash::Hash + Eq + Copy, V> Family<K, V> {
    fn insert(&mut self, len: u8, key: K, value: V) -> bool {
        let pos = match self.levels.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.levels[i].0 == len => i,
            Some(i) => {
                self.levels.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                self.levels.push((len, HashMap::new()));
                self.levels.len() - 1
            }
        };
        let map = &mut self.levels[pos].1;
        if map.contains_key(&key) {
            return false;
        }
        map.insert(key, value);
        true
    }
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<V> PrefixTable<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net` (host bits are ignored). A prefix already present is refused.
    pub fn insert(&mut self, net: IpNet, value: V) -> Result<(), Duplicate> {
        let len = net.prefix_len();
        let fresh = match net {
            IpNet::V4(n) => self.v4.insert(len, mask4(n.addr().into(), len), value),
            IpNet::V6(n) => self.v6.insert(len, mask6(n.addr().into(), len), value),
        };
        if fresh {
            Ok(())
        } else {
            Err(Duplicate(net.trunc()))
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .levels
                    .iter()
                    .find_map(|(len, map)| map.get(&mask4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .levels
                    .iter()
                    .find_map(|(len, map)| map.get(&mask6(a, *len)))
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.levels.is_empty() && self.v6.levels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, u32)]) -> PrefixTable<u32> {
        let mut t = PrefixTable::new();
        for (net, v) in entries {
            t.insert(net.parse().unwrap(), *v).unwrap();
        }
        t
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("100.64.0.0/10", 1),
            ("100.64.1.0/24", 2),
            ("100.64.1.7/32", 3),
            ("fd00:6d65:7368::/48", 4),
            ("fd00:6d65:7368::2/128", 5),
            ("0.0.0.0/0", 6),
        ]);
        let cases = [
            ("100.64.1.7", Some(3)),
            ("100.64.1.8", Some(2)),
            ("100.65.0.1", Some(1)),
            ("100.128.0.1", Some(6)),
            ("fd00:6d65:7368::2", Some(5)),
            ("fd00:6d65:7368::3", Some(4)),
            ("fd00:6d65:7369::3", None),
        ];
        for (addr, want) in cases {
            assert_eq!(t.lookup(addr.parse().unwrap()).copied(), want, "{addr}");
        }
    }

    #[test]
    fn duplicates_are_refused_and_host_bits_ignored() {
        let mut t = table(&[("100.64.0.2/32", 1), ("100.64.0.0/10", 2)]);
        assert_eq!(
            t.insert("100.64.0.2/32".parse().unwrap(), 9),
            Err(Duplicate("100.64.0.2/32".parse().unwrap()))
        );
        assert!(t.insert("100.64.3.3/10".parse().unwrap(), 9).is_err());
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&1));
        assert!(PrefixTable::<u8>::new().is_empty());
        assert_eq!(
            PrefixTable::<u8>::new().lookup("1.2.3.4".parse().unwrap()),
            None
        );
    }
}
