//! Wall-clock time as a value. Nothing in this crate reads the clock: callers pass `now`.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (UTC).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixTime(pub u64);

impl UnixTime {
    pub const fn secs(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, secs: u64) -> UnixTime {
        UnixTime(self.0.saturating_add(secs))
    }

    pub fn saturating_sub(self, secs: u64) -> UnixTime {
        UnixTime(self.0.saturating_sub(secs))
    }
}

impl std::fmt::Display for UnixTime {
    /// RFC 3339, UTC, second precision: `2026-11-26T06:17:57Z`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days as i64);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

/// A duration for people, in its two largest units: `3 days, 4 hours`,
/// `5 minutes, 1 second`, `42 seconds`.
pub fn span(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    let part = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    let Some(i) = UNITS.iter().position(|&(size, _)| secs >= size) else {
        return part(0, "second");
    };
    let (size, unit) = UNITS[i];
    let mut out = part(secs / size, unit);
    if let Some(&(next, next_unit)) = UNITS.get(i + 1) {
        let rest = (secs % size) / next;
        if rest > 0 {
            out += ", ";
            out += &part(rest, next_unit);
        }
    }
    out
}

/// At most this long before it ends, a certificate is due for renewal.
pub const RENEWAL_NOTICE_MAX_SECS: u64 = 7 * 86_400;

/// Where a moment falls in a validity window (`not_before ..= not_after`), for status
/// output and renewal warnings. Exact: the clock-skew allowance of verification does
/// not apply here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// Starts in this many seconds.
    NotYetValid { starts_in: u64 },
    /// Valid, with this many seconds left.
    Valid { left: u64 },
    /// Valid, but inside its renewal notice ([`Term::renewal_notice`]): this many
    /// seconds left.
    RenewSoon { left: u64 },
    /// Ended this many seconds ago.
    Expired { ago: u64 },
}

impl Term {
    pub fn at(not_before: UnixTime, not_after: UnixTime, now: UnixTime) -> Term {
        if now < not_before {
            Term::NotYetValid {
                starts_in: not_before.secs() - now.secs(),
            }
        } else if now > not_after {
            Term::Expired {
                ago: now.secs() - not_after.secs(),
            }
        } else {
            let left = not_after.secs() - now.secs();
            if left < Term::renewal_notice(not_before, not_after) {
                Term::RenewSoon { left }
            } else {
                Term::Valid { left }
            }
        }
    }

    /// How long before its end a window is due for renewal: a fifth of its length,
    /// at most [`RENEWAL_NOTICE_MAX_SECS`] (a year-long certificate warns a week
    /// ahead, a day-long one about five hours ahead).
    pub fn renewal_notice(not_before: UnixTime, not_after: UnixTime) -> u64 {
        (not_after.secs().saturating_sub(not_before.secs()) / 5).min(RENEWAL_NOTICE_MAX_SECS)
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(UnixTime(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(UnixTime(1_795_673_877).to_string(), "2026-11-26T06:17:57Z");
        assert_eq!(UnixTime(951_782_400).to_string(), "2000-02-29T00:00:00Z");
    }
    #[test]
    fn spans_read_in_two_units() {
        assert_eq!(span(0), "0 seconds");
        assert_eq!(span(1), "1 second");
        assert_eq!(span(42), "42 seconds");
        assert_eq!(span(60), "1 minute");
        assert_eq!(span(61), "1 minute, 1 second");
        assert_eq!(span(3599), "59 minutes, 59 seconds");
        assert_eq!(span(7200 + 120 + 5), "2 hours, 2 minutes");
        assert_eq!(span(86_400), "1 day");
        assert_eq!(span(3 * 86_400 + 4 * 3600 + 59), "3 days, 4 hours");
        assert_eq!(span(400 * 86_400), "400 days");
    }

    #[test]
    fn terms_over_a_window() {
        let (nb, na) = (UnixTime(1000), UnixTime(1000 + 86_400));
        // A day-long window: renewal notice a fifth of it.
        assert_eq!(Term::renewal_notice(nb, na), 17_280);
        assert_eq!(
            Term::at(nb, na, UnixTime(990)),
            Term::NotYetValid { starts_in: 10 }
        );
        assert_eq!(Term::at(nb, na, nb), Term::Valid { left: 86_400 });
        let edge = na.saturating_sub(17_280);
        assert_eq!(Term::at(nb, na, edge), Term::Valid { left: 17_280 });
        assert_eq!(
            Term::at(nb, na, edge.saturating_add(1)),
            Term::RenewSoon { left: 17_279 }
        );
        // The last second is still valid; the next one is not.
        assert_eq!(Term::at(nb, na, na), Term::RenewSoon { left: 0 });
        assert_eq!(
            Term::at(nb, na, na.saturating_add(1)),
            Term::Expired { ago: 1 }
        );
        // A year-long window: at most a week's notice.
        let year = UnixTime(1000 + 365 * 86_400);
        assert_eq!(Term::renewal_notice(nb, year), RENEWAL_NOTICE_MAX_SECS);
        assert_eq!(
            Term::at(nb, year, year.saturating_sub(RENEWAL_NOTICE_MAX_SECS)),
            Term::Valid {
                left: RENEWAL_NOTICE_MAX_SECS
            }
        );
        // A window too short for notice (under 5 s) never reports RenewSoon.
        assert_eq!(
            Term::at(nb, UnixTime(1004), UnixTime(1003)),
            Term::Valid { left: 1 }
        );
        // A window that ends before it starts (never valid) is expired once past it.
        assert_eq!(
            Term::at(nb, UnixTime(500), UnixTime(800)),
            Term::NotYetValid { starts_in: 200 }
        );
        assert_eq!(
            Term::at(nb, UnixTime(500), UnixTime(1200)),
            Term::Expired { ago: 700 }
        );
    }
}
