//! The decision log: every deny and every audit match as one structured JSON line.
//!
//! Lines go to a bounded in-memory ring (what `meshctl log` shows), to live followers
//! (`meshctl log -f`), and to the daemon's log. A flood of denied packets must not
//! become a flood of work (invariant 6): records beyond a per-second budget are
//! counted as suppressed instead of written, and a follower that does not keep up
//! loses lines (counted) rather than holding memory.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// One decision, as written to the log: borrowed, so that a record within the budget
/// costs one line's formatting. Its JSON is that of the contract's
/// [`mesh_proto::control::DecisionRecord`], which `meshctl log` reads (tested below).
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRecord<'a> {
    /// RFC 3339 UTC.
    pub time: String,
    /// The sender's identity, proven by its key; absent for local traffic with none.
    pub src: Option<&'a str>,
    pub src_addr: String,
    pub dst: Option<&'a str>,
    pub dst_addr: String,
    pub dst_port: u16,
    pub proto: &'a str,
    /// `allow`, `deny` or `audit`.
    pub decision: &'a str,
    /// Stable snake_case reason (`DenyReason`'s name), e.g. `no_allow_matched`.
    pub reason: &'a str,
    pub policy: Option<&'a str>,
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSummary<'a>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HttpSummary<'a> {
    pub method: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    /// The HTTP status the client was answered with, if refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// Limits of the decision log.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// Lines kept for `meshctl log`.
    pub ring: usize,
    /// Records written per second; the rest are counted as suppressed.
    pub per_second: u32,
    /// Lines buffered per follower before it starts losing lines.
    pub follower_buffer: usize,
    /// Followers at once.
    pub max_followers: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            ring: 10_000,
            per_second: 2_000,
            follower_buffer: 4_096,
            max_followers: 16,
        }
    }
}

/// Counters of the decision log, for `meshctl status`.
pub use mesh_proto::control::LogCounters;

#[derive(Debug)]
struct Inner {
    ring: VecDeque<Arc<str>>,
    followers: Vec<SyncSender<Arc<str>>>,
    /// Start of the current one-second budget window, and records written in it.
    window: Duration,
    in_window: u32,
    counters: LogCounters,
}

/// The decision log. Cheap to share: wrap in an `Arc`.
#[derive(Debug)]
pub struct DecisionLog {
    limits: LogLimits,
    inner: Mutex<Inner>,
}

/// Why a follower could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many log followers (at most {0})")]
pub struct TooManyFollowers(pub usize);

impl DecisionLog {
    pub fn new(limits: LogLimits) -> Self {
        DecisionLog {
            limits,
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(limits.ring),
                followers: Vec::new(),
                window: Duration::ZERO,
                in_window: 0,
                counters: LogCounters::default(),
            }),
        }
    }

    /// Records one decision at monotonic time `now`. Returns the line written, or
    /// `None` when the per-second budget is spent.
    /// `build` runs only within the budget, so a flood of refusals costs a counter
    /// increment each, not the formatting of a line.
    pub fn record<'a>(
        &self,
        now: Duration,
        build: impl FnOnce() -> DecisionRecord<'a>,
    ) -> Option<Arc<str>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_sub(inner.window) >= Duration::from_secs(1) {
            inner.window = now;
            inner.in_window = 0;
        }
        if inner.in_window >= self.limits.per_second {
            inner.counters.suppressed += 1;
            return None;
        }
        inner.in_window += 1;
        // Serialising plain strings and numbers cannot fail.
        let line: Arc<str> = serde_json::to_string(&build()).unwrap_or_default().into();
        if inner.ring.len() == self.limits.ring {
            inner.ring.pop_front();
        }
        inner.ring.push_back(line.clone());
        inner.counters.written += 1;
        let mut lost = 0;
        inner
            .followers
            .retain(|tx| match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    lost += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        inner.counters.follower_lost += lost;
        Some(line)
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<Arc<str>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let skip = inner.ring.len().saturating_sub(n);
        inner.ring.iter().skip(skip).cloned().collect()
    }

    /// A live feed of lines written from now on. Followers whose receiver is gone are
    /// dropped at the next record.
    pub fn follow(&self) -> Result<Receiver<Arc<str>>, TooManyFollowers> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.followers.len() >= self.limits.max_followers {
            return Err(TooManyFollowers(self.limits.max_followers));
        }
        let (tx, rx) = sync_channel(self.limits.follower_buffer);
        inner.followers.push(tx);
        Ok(rx)
    }

    pub fn counters(&self) -> LogCounters {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(port: u16) -> DecisionRecord<'static> {
        DecisionRecord {
            time: "2026-11-26T06:17:57Z".into(),
            src: Some("spiffe://t/a"),
            src_addr: "100.64.0.1".into(),
            dst: None,
            dst_addr: "100.64.0.2".into(),
            dst_port: port,
            proto: "tcp",
            decision: "deny",
            reason: "no_allow_matched",
            policy: None,
            rule: None,
            http: None,
        }
    }

    #[test]
    fn lines_are_json_with_the_fields_that_matter() {
        let log = DecisionLog::new(LogLimits::default());
        let line = log.record(Duration::ZERO, || rec(22)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["src"], "spiffe://t/a");
        assert_eq!(v["dst_port"], 22);
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["reason"], "no_allow_matched");
        assert!(v.get("http").is_none());
    }

    /// What the log writes is what the contract's record reads, field for field.
    #[test]
    fn lines_read_as_the_contracts_record() {
        use mesh_proto::control::DecisionRecord as Contract;
        let log = DecisionLog::new(LogLimits::default());
        let l7 = DecisionRecord {
            dst: Some("spiffe://t/pc"),
            decision: "audit",
            reason: "audit_matched",
            policy: Some("watch"),
            rule: Some("0".into()),
            http: Some(HttpSummary {
                method: "POST",
                path: "/api",
                host: Some("api.t"),
                status: Some(403),
            }),
            ..rec(80)
        };
        for (written, want) in [(rec(22), None), (l7, Some(403))] {
            let line = log.record(Duration::ZERO, || written.clone()).unwrap();
            let r: Contract = serde_json::from_str(&line).unwrap();
            // The same JSON back, so `meshctl log --json` prints what meshd wrote.
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(serde_json::to_value(&r).unwrap(), v);
            assert_eq!(r.src.as_deref(), written.src);
            assert_eq!(r.src_addr.to_string(), written.src_addr);
            assert_eq!(r.dst.as_deref(), written.dst);
            assert_eq!(r.dst_addr.to_string(), written.dst_addr);
            assert_eq!(r.dst_port, written.dst_port);
            assert_eq!(r.proto.as_str(), written.proto);
            assert_eq!(r.decision.as_str(), written.decision);
            assert_eq!(r.reason, written.reason);
            assert_eq!(r.policy.as_deref(), written.policy);
            assert_eq!(r.rule, written.rule);
            assert_eq!(r.http.as_ref().and_then(|h| h.status), want);
            assert_eq!(
                r.http.map(|h| (h.method, h.path, h.host)),
                written.http.map(|h| (
                    h.method.to_string(),
                    h.path.to_string(),
                    h.host.map(str::to_string)
                ))
            );
        }
    }

    #[test]
    fn ring_keeps_the_newest_lines() {
        let log = DecisionLog::new(LogLimits {
            ring: 3,
            ..LogLimits::default()
        });
        for p in 1..=5 {
            log.record(Duration::ZERO, || rec(p));
        }
        let ports: Vec<u64> = log
            .tail(10)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["dst_port"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports, vec![3, 4, 5]);
        assert_eq!(log.tail(1).len(), 1);
    }

    #[test]
    fn flood_is_suppressed_and_counted() {
        let log = DecisionLog::new(LogLimits {
            per_second: 10,
            ..LogLimits::default()
        });
        for _ in 0..100 {
            log.record(Duration::from_millis(500), || rec(1));
        }
        assert_eq!(log.counters().written, 10);
        assert_eq!(log.counters().suppressed, 90);
        // A new second, a new budget.
        assert!(log.record(Duration::from_millis(1600), || rec(1)).is_some());
    }

    #[test]
    fn followers_get_new_lines_and_slow_ones_lose_lines() {
        let log = DecisionLog::new(LogLimits {
            follower_buffer: 2,
            ..LogLimits::default()
        });
        log.record(Duration::ZERO, || rec(1));
        let rx = log.follow().unwrap();
        for p in 2..=5 {
            log.record(Duration::ZERO, || rec(p));
        }
        let got: Vec<_> = rx.try_iter().collect();
        assert_eq!(got.len(), 2, "bounded buffer");
        assert!(got[0].contains("\"dst_port\":2"));
        assert_eq!(log.counters().follower_lost, 2);
        drop(rx);
        log.record(Duration::ZERO, || rec(6));
        assert_eq!(log.inner.lock().unwrap().followers.len(), 0);
    }
}
