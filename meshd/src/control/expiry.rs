//! Renewal warnings for the local certificates (sans-IO).
//!
//! A workload whose certificate has ended is refused by every peer, so the traffic of
//! a node that misses a renewal stops without a word on that node. Now and then the
//! timer shows [`ExpiryWatch::observe`] each local certificate, then calls
//! [`ExpiryWatch::end_round`], and logs what it reports: once when a certificate
//! enters its renewal notice ([`Term::renewal_notice`]), once when it ends. A renewed certificate (another end
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
    told: HashMap<String, Told>,
    /// Counts [`ExpiryWatch::end_round`] calls.
    round: u64,
}

#[derive(Debug)]
struct Told {
    /// End of the certificate last seen.
    end: UnixTime,
    /// Stage reported for it.
    stage: Stage,
    /// Round in which the workload was last seen.
    round: u64,
}

impl ExpiryWatch {
    /// Looks at one local certificate at `now`: `Some` when it has newly entered its
    /// renewal notice or ended (say so), `None` when nothing new is to be said.
    pub fn observe(
        &mut self,
        name: &str,
        not_before: UnixTime,
        not_after: UnixTime,
        now: UnixTime,
    ) -> Option<Term> {
        let term = Term::at(not_before, not_after, now);
        let stage = Stage::of(term);
        let round = self.round;
        let told = match self.told.get_mut(name) {
            Some(t) => t,
            None => self.told.entry(name.to_string()).or_insert(Told {
                end: not_after,
                stage: Stage::Fine,
                round,
            }),
        };
        told.round = round;
        if told.end != not_after {
            // Renewed (or replaced): whatever was said was about the old one.
            told.end = not_after;
            told.stage = Stage::Fine;
        }
        (stage > told.stage).then(|| {
            told.stage = stage;
            term
        })
    }

    /// Ends a look at every local certificate: the workloads not observed since the
    /// last call are forgotten (removed; reported afresh if they come back).
    pub fn end_round(&mut self) {
        let round = self.round;
        self.told.retain(|_, t| t.round == round);
        self.round += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn run(w: &mut ExpiryWatch, certs: &[(&str, u64, u64)], now: u64) -> Vec<(String, Term)> {
        let out = certs
            .iter()
            .filter_map(|&(id, nb, na)| {
                let term = w.observe(id, UnixTime(nb), UnixTime(na), UnixTime(now))?;
                Some((id.to_string(), term))
            })
            .collect();
        w.end_round();
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
