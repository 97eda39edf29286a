//! Failed-login throttling: after a few failures for a user name or from an address, logins
//! for it are refused for a time that doubles with each further failure (1 s, 2 s, 4 s, ...
//! up to 5 minutes).
//!
//! [`LoginThrottle::begin`] counts an attempt when it starts, not when it fails, so many
//! parallel attempts from one address are throttled as soon as they exceed the free
//! failures, before any of them finishes. Keys are valid user names (at most 32 bytes) and
//! addresses, never free-form client text, and the table has a hard cap, so its memory is
//! bounded whatever clients send.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorCode};
use crate::names::check_user_name;

/// Failures allowed before any delay.
/// Attempts in progress that do not count toward the delay.
const PENDING_FREE: u32 = 16;
const FREE_FAILURES: u32 = 3;
const MAX_DELAY: Duration = Duration::from_secs(300);
/// Records untouched for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Most user and address records kept at once.
pub const MAX_TRACKED_KEYS: usize = 50_000;
/// When the cap is hit, evict down to this many, so the eviction scan is amortised over
/// many inserts instead of run on each one.
const EVICT_DOWN_TO: usize = MAX_TRACKED_KEYS * 9 / 10;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// Only valid user names (at most 32 bytes).
    User(String),
    /// IPv4 addresses, and IPv6 addresses cut to their /64 (see [`address_key`]).
    Addr(IpAddr),
    /// A legacy string key in no known format, stored as its hash to bound its size.
    Other([u8; 32]),
}

#[derive(Clone, Copy, Debug)]
struct Record {
    failures: u32,
    /// Attempts begun and not yet finished; they count like failures for the delay.
    pending: u32,
    /// Last failure or last attempt begun: the delay runs from here.
    last: Instant,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            pending: 0,
            last: now,
        }
    }

    fn is_forgotten(&self, now: Instant) -> bool {
        self.pending == 0 && now.saturating_duration_since(self.last) >= FORGET_AFTER
    }

    fn wait(&self, now: Instant) -> Duration {
        if self.is_forgotten(now) {
            return Duration::ZERO;
        }
        // Attempts in progress count too (so parallel guesses cannot all be checked), but
        // only beyond a few: people behind one NAT address log in at the same moment.
        let pending = self.pending.saturating_sub(PENDING_FREE);
        let delay = delay_after(self.failures.saturating_add(pending));
        if delay.is_zero() {
            // Not `last - now`: a caller's `now` may be a little older than `last`.
            return Duration::ZERO;
        }
        (self.last + delay).saturating_duration_since(now)
    }

    /// Eviction order under the cap: lower goes first, then the least recently touched.
    fn eviction_class(&self, now: Instant) -> u8 {
        if self.is_forgotten(now) {
            0
        } else if self.pending == 0 && self.wait(now).is_zero() {
            1
        } else if self.pending == 0 {
            2
        } else {
            3
        }
    }
}

#[derive(Default)]
struct Table {
    records: HashMap<Key, Record>,
    /// (user, address) pairs with an unfinished [`LoginAttempt`]; `None` is any invalid name.
    /// Bounded by the live guards, i.e. by the connections.
    in_progress: HashSet<(Option<String>, IpAddr)>,
}

impl Table {
    fn wait(&self, keys: &[Key], now: Instant) -> Duration {
        keys.iter()
            .filter_map(|key| self.records.get(key))
            .map(|record| record.wait(now))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// The record for `key`, created (evicting others if the table is full) if missing.
    /// A forgotten record starts over.
    fn record_mut(&mut self, key: Key, now: Instant) -> &mut Record {
        if !self.records.contains_key(&key) && self.records.len() >= MAX_TRACKED_KEYS {
            self.evict(now);
        }
        let record = self.records.entry(key).or_insert_with(|| Record::new(now));
        if record.is_forgotten(now) {
            *record = Record::new(now);
        }
        record
    }

    /// Drop records down to [`EVICT_DOWN_TO`]: forgotten ones first, then those whose delay
    /// is over, then those still delaying, attempts in progress last; oldest first in each.
    fn evict(&mut self, now: Instant) {
        let excess = self.records.len().saturating_sub(EVICT_DOWN_TO);
        if excess == 0 {
            return;
        }
        let mut order: Vec<(u8, Instant, Key)> = self
            .records
            .iter()
            .map(|(key, record)| (record.eviction_class(now), record.last, key.clone()))
            .collect();
        order.select_nth_unstable_by_key(excess - 1, |(class, last, _)| (*class, *last));
        for (_, _, key) in order.into_iter().take(excess) {
            self.records.remove(&key);
        }
    }

    fn fail(&mut self, keys: Vec<Key>, now: Instant) {
        for key in keys {
            let record = self.record_mut(key, now);
            record.failures = record.failures.saturating_add(1);
            record.last = now;
        }
    }
}

fn delay_after(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_DELAY)
}

/// One host commonly holds a whole IPv6 /64, so that is what counts as one address; an
/// IPv4 address written as IPv6 (`::ffff:a.b.c.d`) counts as the IPv4 address.
fn address_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// The keys of the old string API: `user:NAME` and `addr:IP` map to the same records as
/// [`LoginThrottle::begin`]; a `user:` key with an invalid name is ignored (only valid names
/// are tracked, like `begin` with `None`), and anything else is hashed.
fn parse_legacy_key(key: &str) -> Option<Key> {
    if let Some(name) = key.strip_prefix("user:") {
        return check_user_name(name)
            .ok()
            .map(|_| Key::User(name.to_string()));
    }
    if let Some(addr) = key.strip_prefix("addr:").and_then(|a| a.parse().ok()) {
        return Some(Key::Addr(address_key(addr)));
    }
    Some(Key::Other(*blake3::hash(key.as_bytes()).as_bytes()))
}

/// Why [`LoginThrottle::begin`] refused an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures (or attempts in progress): try again after this long.
    Wait(Duration),
    /// An attempt for the same user from the same address has not finished yet.
    Pending,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Wait(wait) => write!(
                f,
                "too many failed logins; try again in {} s",
                wait.as_secs().max(1)
            ),
            Refusal::Pending => write!(
                f,
                "a login for this user from this address is already in progress; try again when it ends"
            ),
        }
    }
}

/// The wire error for a refusal: `too_many_requests` with the message above.
impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Error {
        Error::remote(ErrorCode::TooManyRequests, refusal.to_string())
    }
}

#[derive(Default)]
pub struct LoginThrottle {
    /// A std mutex: short in-memory sections only. Shared with the [`LoginAttempt`] guards,
    /// which outlive a borrow of the throttle (they live in the connection).
    table: Arc<Mutex<Table>>,
}

impl LoginThrottle {
    /// Start a login attempt for `user` (`None` when the claimed name is not a valid user
    /// name: then only the address counts) from `addr`. The attempt is counted now; finish it
    /// with [`LoginAttempt::succeeded`] or [`LoginAttempt::failed`] (dropping it counts as
    /// failed). At most one attempt per (user, address) is in progress at a time.
    pub fn begin(
        &self,
        user: Option<&str>,
        addr: IpAddr,
        now: Instant,
    ) -> Result<LoginAttempt, Refusal> {
        let addr = address_key(addr);
        // Callers promise a valid name; refusing to track anything else keeps keys small.
        let user = user.filter(|name| check_user_name(name).is_ok());
        let mut table = lock(&self.table);
        let pair = (user.map(str::to_string), addr);
        if table.in_progress.contains(&pair) {
            return Err(Refusal::Pending);
        }
        let keys = attempt_keys(user, addr);
        let wait = table.wait(&keys, now);
        if !wait.is_zero() {
            return Err(Refusal::Wait(wait));
        }
        for key in keys {
            let record = table.record_mut(key, now);
            record.pending = record.pending.saturating_add(1);
            record.last = now;
        }
        table.in_progress.insert(pair);
        Ok(LoginAttempt {
            table: Arc::clone(&self.table),
            user: user.map(str::to_string),
            addr,
            finished: false,
        })
    }

    /// `Err(wait)` when any of `keys` must wait before the next attempt.
    pub fn check(&self, keys: &[String], now: Instant) -> Result<(), Duration> {
        let keys: Vec<Key> = keys.iter().filter_map(|k| parse_legacy_key(k)).collect();
        let wait = lock(&self.table).wait(&keys, now);
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    pub fn failed(&self, keys: &[String], now: Instant) {
        let keys = keys.iter().filter_map(|k| parse_legacy_key(k)).collect();
        lock(&self.table).fail(keys, now);
    }

    pub fn succeeded(&self, keys: &[String]) {
        let mut table = lock(&self.table);
        for key in keys.iter().filter_map(|k| parse_legacy_key(k)) {
            table.records.remove(&key);
        }
    }

    /// How many user and address records are kept (at most [`MAX_TRACKED_KEYS`]).
    pub fn tracked_keys(&self) -> usize {
        lock(&self.table).records.len()
    }
}

fn attempt_keys(user: Option<&str>, addr: IpAddr) -> Vec<Key> {
    let mut keys = vec![Key::Addr(addr)];
    keys.extend(user.map(|name| Key::User(name.to_string())));
    keys
}

/// A poisoned lock only means another thread panicked mid-update of plain counters; going on
/// is safe, and panicking here (possibly inside a drop) would be worse.
fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A login attempt counted by [`LoginThrottle::begin`]; say how it ended. Dropped unfinished
/// (connection lost, client gave up), it counts as failed, so abandoning guesses is no way
/// around the delays.
#[must_use = "an attempt dropped unfinished counts as a failed login"]
pub struct LoginAttempt {
    table: Arc<Mutex<Table>>,
    user: Option<String>,
    addr: IpAddr,
    finished: bool,
}

impl fmt::Debug for LoginAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginAttempt")
            .field("user", &self.user)
            .field("addr", &self.addr)
            .finish()
    }
}

impl LoginAttempt {
    /// Clear the user's record; the address keeps its failures but gets back this attempt's
    /// reservation (so one's own account cannot be used to reset an address's count).
    pub fn succeeded(mut self) {
        self.finished = true;
        let mut table = lock(&self.table);
        table.in_progress.remove(&(self.user.clone(), self.addr));
        if let Some(user) = &self.user {
            table.records.remove(&Key::User(user.clone()));
        }
        if let Some(record) = table.records.get_mut(&Key::Addr(self.addr)) {
            record.pending = record.pending.saturating_sub(1);
        }
    }

    /// Count a failure for the user and the address.
    pub fn failed(self) {
        self.failed_at(Instant::now());
    }

    /// [`LoginAttempt::failed`] at a given time (for tests).
    pub fn failed_at(mut self, now: Instant) {
        self.finished = true;
        self.record_failure(now);
    }

    fn record_failure(&self, now: Instant) {
        let mut table = lock(&self.table);
        table.in_progress.remove(&(self.user.clone(), self.addr));
        let keys = attempt_keys(self.user.as_deref(), self.addr);
        for key in &keys {
            if let Some(record) = table.records.get_mut(key) {
                record.pending = record.pending.saturating_sub(1);
            }
        }
        table.fail(keys, now);
    }
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        if !self.finished {
            self.record_failure(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HOME: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    #[test]
    fn delays_grow_after_a_few_failures_and_success_clears() {
        let throttle = LoginThrottle::default();
        let keys = vec!["user:a".to_string(), "addr:127.0.0.1".to_string()];
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            throttle.failed(&keys, t0);
            assert!(throttle.check(&keys, t0).is_ok());
        }
        throttle.failed(&keys, t0);
        assert_eq!(throttle.check(&keys, t0), Err(Duration::from_secs(1)));
        assert!(throttle.check(&keys, t0 + Duration::from_secs(1)).is_ok());
        throttle.failed(&keys, t0);
        assert_eq!(throttle.check(&keys, t0), Err(Duration::from_secs(2)));
        // Another user from another address is not affected.
        assert!(throttle.check(&["user:b".to_string()], t0).is_ok());
        throttle.succeeded(&keys);
        assert!(throttle.check(&keys, t0).is_ok());
    }

    #[test]
    fn delay_is_capped() {
        assert_eq!(delay_after(1000), MAX_DELAY);
    }

    #[test]
    fn parallel_attempts_from_one_address_are_throttled_before_any_finishes() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        let names: Vec<String> = (0..900).map(|i| format!("user{i}")).collect();
        let mut granted = Vec::new();
        let mut refusals = Vec::new();
        for name in &names {
            match throttle.begin(Some(name), HOME, t0) {
                Ok(attempt) => granted.push(attempt),
                Err(refusal) => refusals.push(refusal),
            }
        }
        // Each begun attempt counts at once, so only the free ones get through.
        assert_eq!(granted.len(), (FREE_FAILURES + PENDING_FREE) as usize);
        assert!(refusals
            .iter()
            .all(|r| matches!(r, Refusal::Wait(w) if !w.is_zero())));
        // Another address is not affected.
        throttle
            .begin(Some("user0"), ELSEWHERE, t0)
            .unwrap()
            .succeeded();
        for attempt in granted {
            attempt.failed_at(t0);
        }
    }

    #[test]
    fn second_attempt_for_same_user_and_address_is_pending_until_the_first_ends() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        let first = throttle.begin(Some("alice"), HOME, t0).unwrap();
        assert_eq!(
            throttle.begin(Some("alice"), HOME, t0).unwrap_err(),
            Refusal::Pending
        );
        // Same user elsewhere, or another user here, may try.
        let elsewhere = throttle.begin(Some("alice"), ELSEWHERE, t0).unwrap();
        let bob = throttle.begin(Some("bob"), HOME, t0).unwrap();
        first.failed_at(t0);
        throttle
            .begin(Some("alice"), HOME, t0)
            .unwrap()
            .failed_at(t0);
        elsewhere.failed_at(t0);
        bob.failed_at(t0);
    }

    #[test]
    fn invalid_names_share_one_pending_slot_per_address_and_leave_no_user_record() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        let attempt = throttle.begin(None, HOME, t0).unwrap();
        assert_eq!(
            throttle.begin(None, HOME, t0).unwrap_err(),
            Refusal::Pending
        );
        attempt.failed_at(t0);
        // A name that is not valid is treated as None rather than stored.
        let long_name = "x".repeat(10_000);
        throttle
            .begin(Some(&long_name), HOME, t0)
            .unwrap()
            .failed_at(t0);
        assert_eq!(throttle.tracked_keys(), 1, "only the address");
    }

    #[test]
    fn success_clears_the_user_and_returns_the_address_reservation() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            throttle
                .begin(Some("alice"), HOME, t0)
                .unwrap()
                .failed_at(t0);
        }
        throttle.begin(Some("alice"), HOME, t0).unwrap().succeeded();
        // The user's failures are gone: from another address she has all free attempts.
        for _ in 0..FREE_FAILURES {
            throttle
                .begin(Some("alice"), ELSEWHERE, t0)
                .unwrap()
                .failed_at(t0);
        }
        // The address kept its 2 failures and got its reservation back: one more free try,
        // and the failure after it starts the delay.
        throttle.begin(Some("bob"), HOME, t0).unwrap().failed_at(t0);
        assert_eq!(
            throttle.begin(Some("carol"), HOME, t0).unwrap_err(),
            Refusal::Wait(Duration::from_secs(1))
        );
    }

    #[test]
    fn dropping_an_unfinished_attempt_counts_as_a_failure() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            drop(throttle.begin(Some("alice"), HOME, t0).unwrap());
        }
        let refusal = throttle.begin(Some("alice"), ELSEWHERE, Instant::now());
        assert!(matches!(refusal, Err(Refusal::Wait(_))), "{refusal:?}");
    }

    #[test]
    fn ipv6_hosts_count_per_64_and_mapped_ipv4_as_ipv4() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for host in 1..=FREE_FAILURES as u16 {
            let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, host));
            throttle.begin(None, addr, t0).unwrap().failed_at(t0);
        }
        let same_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 99));
        assert!(matches!(
            throttle.begin(None, same_64, t0),
            Err(Refusal::Wait(_))
        ));
        let other_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        throttle.begin(None, other_64, t0).unwrap().failed_at(t0);

        for _ in 0..FREE_FAILURES {
            throttle.begin(None, HOME, t0).unwrap().failed_at(t0);
        }
        let IpAddr::V4(home) = HOME else {
            unreachable!()
        };
        let mapped = IpAddr::V6(home.to_ipv6_mapped());
        assert!(matches!(
            throttle.begin(None, mapped, t0),
            Err(Refusal::Wait(_))
        ));
    }

    #[test]
    fn delays_run_out_and_old_records_are_forgotten() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES + 2 {
            throttle.failed(&["addr:192.0.2.1".to_string()], t0);
        }
        assert_eq!(
            throttle.begin(None, HOME, t0).unwrap_err(),
            Refusal::Wait(Duration::from_secs(4))
        );
        // After the delay one attempt is allowed, and its failure doubles the delay.
        let t1 = t0 + Duration::from_secs(4);
        throttle.begin(None, HOME, t1).unwrap().failed_at(t1);
        assert_eq!(
            throttle.begin(None, HOME, t1).unwrap_err(),
            Refusal::Wait(Duration::from_secs(8))
        );
        // After FORGET_AFTER the count starts over: all free attempts again.
        let later = t1 + FORGET_AFTER;
        for _ in 0..FREE_FAILURES {
            throttle.begin(None, HOME, later).unwrap().failed_at(later);
        }
    }

    #[test]
    fn table_stays_capped_and_evicts_harmless_records_first() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        // An offender whose delay (32 s) is running.
        for _ in 0..FREE_FAILURES + 5 {
            throttle.failed(&["addr:192.0.2.1".to_string()], t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..200_000u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            throttle.begin(None, addr, t1).unwrap().failed_at(t1);
            assert!(throttle.tracked_keys() <= MAX_TRACKED_KEYS);
        }
        assert!(throttle.tracked_keys() >= EVICT_DOWN_TO);
        // Flooding with one-failure addresses did not flush the offender's record.
        assert!(matches!(
            throttle.begin(None, HOME, t1),
            Err(Refusal::Wait(_))
        ));
    }
}
