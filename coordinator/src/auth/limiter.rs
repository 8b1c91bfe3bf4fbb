//! A per-address limit on failed credential attempts.
//!
//! Secrets are far too long to guess, so the limit is not what keeps them safe; it keeps a
//! misconfigured or hostile host from filling the log and burning CPU on hashing, and it
//! makes a leaked-but-revoked credential hammering the coordinator visible once per window
//! instead of once per attempt. Pure: the caller passes the time, so tests need no sleeping.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// What the limiter says about an address before its credential is even looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Allowed,
    Blocked {
        retry_after: Duration,
        /// The first refusal of this window: the one worth logging.
        first_refusal: bool,
    },
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    refusal_logged: bool,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            failures: 0,
            refusal_logged: false,
        }
    }

    fn expired(&self, window: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.window_start) >= window
    }
}

/// At most `max_failures` failures per `window` per address, counted in fixed windows that
/// start at an address's first failure.
#[derive(Debug)]
pub(super) struct Limiter {
    max_failures: u32,
    window: Duration,
    /// Bounds the table so a flood from many addresses cannot grow memory without bound;
    /// when full, expired entries go first, then the oldest.
    capacity: usize,
    entries: HashMap<IpAddr, Entry>,
}

/// The unit an attacker pays for: an IPv4 address, or an IPv6 /64 (one host usually gets a
/// whole /64, so counting single IPv6 addresses would let it rotate past the limit).
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

impl Limiter {
    pub(super) fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Self {
            max_failures,
            window,
            capacity,
            entries: HashMap::new(),
        }
    }

    pub(super) fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let window = self.window;
        let max_failures = self.max_failures;
        match self.entries.get_mut(&key(ip)) {
            Some(entry) if entry.failures >= max_failures && !entry.expired(window, now) => {
                let first_refusal = !entry.refusal_logged;
                entry.refusal_logged = true;
                Verdict::Blocked {
                    retry_after: (entry.window_start + window).saturating_duration_since(now),
                    first_refusal,
                }
            }
            _ => Verdict::Allowed,
        }
    }

    pub(super) fn fail(&mut self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        let window = self.window;
        let entry = self.entries.entry(key).or_insert_with(|| Entry::new(now));
        if entry.expired(window, now) {
            *entry = Entry::new(now);
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        self.entries.retain(|_, entry| !entry.expired(window, now));
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.window_start)
                .map(|(ip, _)| *ip)
        {
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn blocks_after_the_limit_and_lets_through_after_the_window() {
        let mut limiter = Limiter::new(3, WINDOW, 16);
        let start = Instant::now();
        let peer = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(limiter.check(peer, start), Verdict::Allowed);
            limiter.fail(peer, start);
        }
        let later = start + Duration::from_secs(20);
        assert_eq!(
            limiter.check(peer, later),
            Verdict::Blocked {
                retry_after: Duration::from_secs(40),
                first_refusal: true
            }
        );
        assert!(matches!(
            limiter.check(peer, later),
            Verdict::Blocked {
                first_refusal: false,
                ..
            }
        ));
        assert_eq!(limiter.check(ip("192.0.2.2"), later), Verdict::Allowed);
        let after = start + WINDOW;
        assert_eq!(limiter.check(peer, after), Verdict::Allowed);
        limiter.fail(peer, after);
        assert_eq!(limiter.check(peer, after), Verdict::Allowed, "a new window");
    }

    #[test]
    fn an_ipv6_64_counts_as_one_address() {
        let mut limiter = Limiter::new(2, WINDOW, 16);
        let now = Instant::now();
        limiter.fail(ip("2001:db8::1"), now);
        limiter.fail(ip("2001:db8::2"), now);
        assert!(matches!(
            limiter.check(ip("2001:db8::3"), now),
            Verdict::Blocked { .. }
        ));
        assert_eq!(limiter.check(ip("2001:db8:0:1::1"), now), Verdict::Allowed);
        limiter.fail(ip("::ffff:192.0.2.9"), now);
        limiter.fail(ip("192.0.2.9"), now);
        assert!(matches!(
            limiter.check(ip("192.0.2.9"), now),
            Verdict::Blocked { .. }
        ));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut limiter = Limiter::new(1, WINDOW, 8);
        let start = Instant::now();
        for i in 0..100u32 {
            let now = start + Duration::from_millis(u64::from(i));
            limiter.fail(IpAddr::from(i.to_be_bytes()), now);
        }
        assert_eq!(limiter.entries.len(), 8);
        let now = start + Duration::from_millis(100);
        assert!(matches!(
            limiter.check(IpAddr::from(99u32.to_be_bytes()), now),
            Verdict::Blocked { .. }
        ));
        assert_eq!(
            limiter.check(IpAddr::from(0u32.to_be_bytes()), now),
            Verdict::Allowed,
            "the oldest was dropped"
        );
    }
}
