//! Process limits the server depends on: enough file descriptors for its connections, and
//! a connection cap that cannot run the process out of them.

// `rlim_t` is u64 on 64-bit Linux and macOS but narrower on some targets, so the `as u64`
// casts are needed there even though they are no-ops here.
#![allow(clippy::unnecessary_cast)]

use std::io;

/// Descriptors one connection may hold at once: its socket, an open file being served, and
/// an upload's staged data and its record.
pub const FDS_PER_CONNECTION: u64 = 4;
/// Descriptors kept for the server itself: listener, tables, logs, the runtime, blocking tasks.
pub const RESERVED_FDS: u64 = 64;
/// Soft limit used when the hard limit is unlimited: Linux refuses more than `fs.nr_open`,
/// whose default is 2^20.
const UNLIMITED_HARD_CAP: u64 = 1 << 20;

/// Raise the soft RLIMIT_NOFILE to the hard limit (to 2^20 if the hard limit is unlimited),
/// so many connections do not fail with "too many open files" under a default soft limit
/// of 1024. Returns (soft limit now, hard limit); an unlimited hard limit is `u64::MAX`.
/// Never lowers the soft limit.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft = limit.rlim_cur as u64;
    let hard = limit.rlim_max as u64;
    let target = target_soft_limit(soft, hard);
    if target > soft {
        limit.rlim_cur = target as libc::rlim_t;
        // SAFETY: setrlimit only reads the valid `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((target, as_u64_limit(hard)))
}

/// The soft limit to ask for given the current soft and hard limits.
fn target_soft_limit(soft: u64, hard: u64) -> u64 {
    let wanted = if hard == libc::RLIM_INFINITY as u64 {
        UNLIMITED_HARD_CAP
    } else {
        hard
    };
    soft.max(wanted)
}

/// RLIM_INFINITY is `u64::MAX` on Linux already; spelled out so the documented value holds.
fn as_u64_limit(limit: u64) -> u64 {
    if limit == libc::RLIM_INFINITY as u64 {
        u64::MAX
    } else {
        limit
    }
}

/// The connection cap to use: `requested`, lowered so that every connection can hold
/// [`FDS_PER_CONNECTION`] descriptors with [`RESERVED_FDS`] left for the server, under a
/// descriptor limit of `fd_limit`. Never below 1.
pub fn clamp_max_connections(requested: usize, fd_limit: u64) -> usize {
    let affordable = fd_limit.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION;
    let affordable = usize::try_from(affordable).unwrap_or(usize::MAX);
    requested.min(affordable).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_clamped_to_what_the_descriptors_allow() {
        // The common default soft limit: (1024 - 64) / 4.
        assert_eq!(clamp_max_connections(1000, 1024), 240);
        assert_eq!(clamp_max_connections(200, 1024), 200);
        assert_eq!(clamp_max_connections(1_000_000, 1 << 20), 262_128);
        assert_eq!(clamp_max_connections(5, u64::MAX), 5);
        // Too few descriptors for even one: still 1, so the server can serve someone.
        assert_eq!(clamp_max_connections(1000, 10), 1);
        assert_eq!(clamp_max_connections(0, 1024), 1);
    }

    #[test]
    fn soft_limit_target_is_the_hard_limit_or_the_cap_when_unlimited() {
        let unlimited = libc::RLIM_INFINITY as u64;
        assert_eq!(target_soft_limit(1024, 4096), 4096);
        assert_eq!(target_soft_limit(1024, unlimited), UNLIMITED_HARD_CAP);
        assert_eq!(target_soft_limit(4096, 4096), 4096);
        // Never lowered.
        assert_eq!(target_soft_limit(unlimited, unlimited), unlimited);
        assert_eq!(target_soft_limit(2 << 20, unlimited), 2 << 20);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_target() {
        let (soft, hard) = raise_fd_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur as u64, soft);
        assert_eq!(as_u64_limit(limit.rlim_max as u64), hard);
        assert!(soft <= hard);
        if hard != u64::MAX {
            assert_eq!(soft, hard, "raised all the way");
        }
        // Idempotent: a second call changes nothing.
        assert_eq!(raise_fd_limit().unwrap(), (soft, hard));
    }
}
