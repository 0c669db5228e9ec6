//! Renewal warnings for the local certificates (sans-IO).
//!
//! A workload whose certificate has ended is refused by every peer, so the traffic of
//! a node that misses a renewal stops without a word on that node. The timer hands
//! [`ExpiryWatch::check`] the local certificates now and then and logs what it
//! reports: once when a certificate enters its renewal notice
//! ([`Term::renewal_notice`]), once when it ends. A renewed certificate (another end
//! date) starts over; a removed workload is forgotten.

use std::collections::HashMap;

use mesh_proto::time::{Term, UnixTime};

/// How far a certificate has gone, as far as the operator has been told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Fine,
    RenewSoon,
    Expired,
}

impl Stage {
    fn of(term: Term) -> Stage {
        match term {
            Term::NotYetValid { .. } | Term::Valid { .. } => Stage::Fine,
            Term::RenewSoon { .. } => Stage::RenewSoon,
            Term::Expired { .. } => Stage::Expired,
        }
    }
}

/// What the operator has been told, per local workload (by name: `node` for the
/// node's own certificate).
#[derive(Debug, Default)]
pub struct ExpiryWatch {
    /// Workload → (end of the certificate last seen, stage reported for it).
    told: HashMap<String, (UnixTime, Stage)>,
    /// Workloads seen in the current round (reused between calls).
    seen: Vec<String>,
}

impl ExpiryWatch {
    /// Looks at every local certificate (workload, not before, not after) at `now` and
    /// calls `notify` for each that has newly entered its renewal notice or ended.
    pub fn check<'a>(
        &mut self,
        certs: impl IntoIterator<Item = (&'a str, UnixTime, UnixTime)>,
        now: UnixTime,
        mut notify: impl FnMut(&str, Term),
    ) {
        self.seen.clear();
        for (name, not_before, not_after) in certs {
            let term = Term::at(not_before, not_after, now);
            let stage = Stage::of(term);
            let told = match self.told.get_mut(name) {
                Some(t) => t,
                None => self
                    .told
                    .entry(name.to_string())
                    .or_insert((not_after, Stage::Fine)),
            };
            if told.0 != not_after {
                // Renewed (or replaced): whatever was said was about the old one.
                *told = (not_after, Stage::Fine);
            }
            if stage > told.1 {
                told.1 = stage;
                notify(name, term);
            }
            self.seen.push(name.to_string());
        }
        if self.told.len() > self.seen.len() {
            let seen = &self.seen;
            self.told.retain(|id, _| seen.iter().any(|s| s == id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn run(w: &mut ExpiryWatch, certs: &[(&str, u64, u64)], now: u64) -> Vec<(String, Term)> {
        let mut out = Vec::new();
        w.check(
            certs
                .iter()
                .map(|&(id, nb, na)| (id, UnixTime(nb), UnixTime(na))),
            UnixTime(now),
            |id, t| out.push((id.to_string(), t)),
        );
        out
    }

    #[test]
    fn each_stage_is_reported_once() {
        let mut w = ExpiryWatch::default();
        let node = [("spiffe://t/a", 0, 10 * DAY)]; // notice: 2 days
        assert!(run(&mut w, &node, DAY).is_empty());
        assert!(run(&mut w, &node, 8 * DAY).is_empty());
        assert_eq!(
            run(&mut w, &node, 8 * DAY + 1),
            vec![(
                "spiffe://t/a".to_string(),
                Term::RenewSoon { left: 2 * DAY - 1 }
            )]
        );
        assert!(run(&mut w, &node, 9 * DAY).is_empty());
        assert_eq!(
            run(&mut w, &node, 10 * DAY + 5),
            vec![("spiffe://t/a".to_string(), Term::Expired { ago: 5 })]
        );
        assert!(run(&mut w, &node, 11 * DAY).is_empty());
    }

    #[test]
    fn already_late_at_start_is_reported_at_once_and_skips_nothing_worse() {
        let mut w = ExpiryWatch::default();
        // First look: inside the notice already.
        let got = run(&mut w, &[("a", 0, 10 * DAY)], 9 * DAY);
        assert_eq!(got, vec![("a".to_string(), Term::RenewSoon { left: DAY })]);
        // First look at an ended one (a runtime workload added late): one report.
        let got = run(&mut w, &[("a", 0, 10 * DAY), ("b", 0, DAY)], 9 * DAY);
        assert_eq!(got, vec![("b".to_string(), Term::Expired { ago: 8 * DAY })]);
    }

    #[test]
    fn a_renewed_certificate_starts_over() {
        let mut w = ExpiryWatch::default();
        assert_eq!(run(&mut w, &[("a", 0, 10 * DAY)], 10 * DAY + 1).len(), 1);
        // Renewed: valid again, nothing to say...
        assert!(run(&mut w, &[("a", 10 * DAY, 20 * DAY)], 10 * DAY + 2).is_empty());
        // ...until the new one nears its end.
        assert_eq!(
            run(&mut w, &[("a", 10 * DAY, 20 * DAY)], 19 * DAY),
            vec![("a".to_string(), Term::RenewSoon { left: DAY })]
        );
    }

    #[test]
    fn removed_workloads_are_forgotten() {
        let mut w = ExpiryWatch::default();
        run(&mut w, &[("a", 0, DAY), ("b", 0, DAY)], 2 * DAY);
        assert_eq!(w.told.len(), 2);
        run(&mut w, &[("a", 0, DAY)], 2 * DAY);
        assert_eq!(w.told.len(), 1);
        // Added back with the same ended certificate: reported again (a new workload
        // as far as the operator knows).
        assert_eq!(
            run(&mut w, &[("a", 0, DAY), ("b", 0, DAY)], 2 * DAY).len(),
            1
        );
    }
}
