//! Limits on failed credential attempts, per address and per credential named.
//!
//! Secrets are far too long to guess, so the limits are not what keeps them safe; they keep
//! a misconfigured or hostile host from filling the log, and they make a leaked-but-revoked
//! credential hammering the coordinator visible once per window instead of once per
//! attempt. They judge failed attempts only: a credential is checked first (one SHA-256 and
//! a lookup), so a valid one is never refused because its address or its id was used for
//! bad attempts, say by a job on an agent's host or a local process. Pure: the caller
//! passes the time, so tests need no sleeping.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Which limit a failed attempt ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    /// Its address made too many failed attempts.
    Address,
    /// Too many failed attempts named this credential id.
    Credential(String),
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address => f.write_str("from this address"),
            Self::Credential(id) => write!(f, "with credential {id}"),
        }
    }
}

/// What the limits say about a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Under the limits: counted, and worth answering and logging in full.
    Counted,
    Blocked {
        by: Limited,
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

/// When a key is over its limit: how long until its window ends, and whether this is the
/// window's first refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Over {
    retry_after: Duration,
    first_refusal: bool,
}

/// At most `max_failures` failures per `window` per key, counted in fixed windows that
/// start at a key's first failure.
#[derive(Debug)]
struct Limiter<K> {
    max_failures: u32,
    window: Duration,
    /// Bounds the table so a flood of many keys cannot grow memory without bound; when
    /// full, expired entries go first, then the oldest.
    capacity: usize,
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Self {
            max_failures,
            window,
            capacity,
            entries: HashMap::new(),
        }
    }

    /// Whether `key` is over its limit at `now`.
    fn over(&self, key: &K, now: Instant) -> Option<Over> {
        let entry = self.entries.get(key)?;
        (entry.failures >= self.max_failures && !entry.expired(self.window, now)).then(|| Over {
            retry_after: (entry.window_start + self.window).saturating_duration_since(now),
            first_refusal: !entry.refusal_logged,
        })
    }

    /// Remembers that `key`'s refusal of this window was logged.
    fn refusal_logged(&mut self, key: &K) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.refusal_logged = true;
        }
    }

    fn fail(&mut self, key: K, now: Instant) {
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
                .map(|(key, _)| key.clone())
        {
            self.entries.remove(&oldest);
        }
    }
}

/// The unit an attacker pays for: an IPv4 address, or an IPv6 /64 (one host usually gets a
/// whole /64, so counting single IPv6 addresses would let it rotate past the limit).
fn address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// The limits on failed attempts: per address, and per credential id where the presented
/// secret names one, so guesses at one credential spread over many addresses are limited
/// too. The credential table is separate, so made-up ids cannot push addresses out.
#[derive(Debug)]
pub(super) struct Failures {
    addresses: Limiter<IpAddr>,
    credentials: Limiter<String>,
}

impl Failures {
    /// At most `max_failures` failed attempts per `window` per address and per credential
    /// id; each table remembers at most `capacity` keys.
    pub(super) fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Self {
            addresses: Limiter::new(max_failures, window, capacity),
            credentials: Limiter::new(max_failures, window, capacity),
        }
    }

    /// Judges a failed attempt from `peer` naming credential id `credential` (if any): over
    /// a limit it is blocked and not counted (so a window ends a fixed time after it
    /// started), else it is counted against both.
    pub(super) fn fail(&mut self, peer: IpAddr, credential: Option<&str>, now: Instant) -> Verdict {
        let peer = address(peer);
        if let Some(over) = self.addresses.over(&peer, now) {
            self.addresses.refusal_logged(&peer);
            return blocked(Limited::Address, over);
        }
        if let Some(id) = credential {
            let id = id.to_owned();
            if let Some(over) = self.credentials.over(&id, now) {
                self.credentials.refusal_logged(&id);
                return blocked(Limited::Credential(id), over);
            }
            self.credentials.fail(id, now);
        }
        self.addresses.fail(peer, now);
        Verdict::Counted
    }
}

fn blocked(by: Limited, over: Over) -> Verdict {
    Verdict::Blocked {
        by,
        retry_after: over.retry_after,
        first_refusal: over.first_refusal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn is_blocked(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Blocked { .. })
    }

    #[test]
    fn blocks_after_the_limit_and_counts_again_after_the_window() {
        let mut failures = Failures::new(3, WINDOW, 16);
        let start = Instant::now();
        let peer = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(failures.fail(peer, None, start), Verdict::Counted);
        }
        let later = start + Duration::from_secs(20);
        assert_eq!(
            failures.fail(peer, None, later),
            Verdict::Blocked {
                by: Limited::Address,
                retry_after: Duration::from_secs(40),
                first_refusal: true
            }
        );
        assert!(matches!(
            failures.fail(peer, None, later),
            Verdict::Blocked {
                first_refusal: false,
                ..
            }
        ));
        assert_eq!(
            failures.fail(ip("192.0.2.2"), None, later),
            Verdict::Counted
        );
        let after = start + WINDOW;
        assert_eq!(
            failures.fail(peer, None, after),
            Verdict::Counted,
            "a new window"
        );
        assert_eq!(failures.fail(peer, None, after), Verdict::Counted);
    }

    #[test]
    fn a_credential_id_is_limited_across_addresses() {
        let mut failures = Failures::new(2, WINDOW, 16);
        let now = Instant::now();
        assert_eq!(
            failures.fail(ip("192.0.2.1"), Some("0123abcd"), now),
            Verdict::Counted
        );
        assert_eq!(
            failures.fail(ip("192.0.2.2"), Some("0123abcd"), now),
            Verdict::Counted
        );
        assert_eq!(
            failures.fail(ip("192.0.2.3"), Some("0123abcd"), now),
            Verdict::Blocked {
                by: Limited::Credential("0123abcd".to_owned()),
                retry_after: WINDOW,
                first_refusal: true
            }
        );
        // The blocked attempt was not counted against its address; other ids are free.
        assert_eq!(failures.fail(ip("192.0.2.3"), None, now), Verdict::Counted);
        assert_eq!(
            failures.fail(ip("192.0.2.3"), Some("feedf00d"), now),
            Verdict::Counted
        );
        // An address over its limit is refused first, whatever it names.
        assert_eq!(
            failures.fail(ip("192.0.2.3"), Some("0123abcd"), now),
            Verdict::Blocked {
                by: Limited::Address,
                retry_after: WINDOW,
                first_refusal: true
            }
        );
    }

    #[test]
    fn an_ipv6_64_counts_as_one_address() {
        let mut failures = Failures::new(2, WINDOW, 16);
        let now = Instant::now();
        failures.fail(ip("2001:db8::1"), None, now);
        failures.fail(ip("2001:db8::2"), None, now);
        assert!(is_blocked(&failures.fail(ip("2001:db8::3"), None, now)));
        assert_eq!(
            failures.fail(ip("2001:db8:0:1::1"), None, now),
            Verdict::Counted
        );
        failures.fail(ip("::ffff:192.0.2.9"), None, now);
        failures.fail(ip("192.0.2.9"), None, now);
        assert!(is_blocked(&failures.fail(ip("192.0.2.9"), None, now)));
    }

    #[test]
    fn the_tables_stay_bounded() {
        let mut failures = Failures::new(1, WINDOW, 8);
        let start = Instant::now();
        for i in 0..100u32 {
            let now = start + Duration::from_millis(u64::from(i));
            failures.fail(
                IpAddr::from(i.to_be_bytes()),
                Some(&format!("{i:08x}")),
                now,
            );
        }
        assert_eq!(failures.addresses.entries.len(), 8);
        assert_eq!(failures.credentials.entries.len(), 8);
        let now = start + Duration::from_millis(100);
        assert!(is_blocked(&failures.fail(
            IpAddr::from(99u32.to_be_bytes()),
            None,
            now
        )));
        assert_eq!(
            failures.fail(IpAddr::from(0u32.to_be_bytes()), None, now),
            Verdict::Counted,
            "the oldest was dropped"
        );
    }
}
