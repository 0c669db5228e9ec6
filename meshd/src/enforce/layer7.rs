//! The enforcer's layer-7 path: a client segment on an inspected flow through its
//! `L7Flow` (hold, decide, release, refuse), the bytes all inspected flows hold,
//! refusals, and the timer that refuses overdue heads.

use super::*;

impl Enforcer {
    /// One client→server segment of an inspected flow.
    #[allow(clippy::too_many_arguments)] // the packet, its flow, and the clock: all needed
    pub(super) fn l7_client(
        &self,
        policy: &CompiledPolicy,
        who: Who<'_>,
        p: &Parsed<'_>,
        flow: &mut L7Flow,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        if !tcp_checksum_ok(p) {
            return self.dropped(DropReason::Checksum);
        }
        let Some(seg) = segment(p) else {
            return self.dropped(DropReason::Malformed);
        };
        let held_before = flow.held();
        let outcome = flow.on_client_segment(&seg, stamp(now), |req| {
            self.http_requests.fetch_add(1, Ordering::Relaxed);
            let mut headers = [mesh_proto::policy::Header {
                name: "",
                value: b"",
            }; crate::enforce::http::MAX_HEADERS];
            let n = req.head.headers.len().min(headers.len());
            for (h, src) in headers.iter_mut().zip(req.head.headers.iter()) {
                *h = mesh_proto::policy::Header {
                    name: src.name,
                    value: src.value,
                };
            }
            let http = mesh_proto::policy::HttpRequest {
                method: req.method(),
                path: req.path,
                host: req.host(),
                headers: &headers[..n],
            };
            let decision = mesh_proto::policy::evaluate(
                policy,
                &Request {
                    http: Some(http),
                    ..self.request(who, p)
                },
            );
            let summary = |status| HttpSummary {
                method: req.method(),
                path: req.path,
                host: req.host(),
                status,
            };
            self.count_rules(policy, &decision);
            for r in &decision.audit {
                self.write_log(
                    policy,
                    who,
                    p,
                    "audit",
                    "audit_matched",
                    Some(*r),
                    Some(summary(None)),
                    now,
                    wall,
                );
            }
            match decision.verdict {
                PolicyVerdict::Allow(_) => l7::Verdict::Allow,
                PolicyVerdict::Deny(reason) => {
                    self.http_refused.fetch_add(1, Ordering::Relaxed);
                    self.drops[drop_slot(DropReason::Denied(reason))]
                        .fetch_add(1, Ordering::Relaxed);
                    let status = reason.http_status();
                    self.write_log(
                        policy,
                        who,
                        p,
                        "deny",
                        reason.name(),
                        decision.rule(),
                        Some(summary(Some(status))),
                        now,
                        wall,
                    );
                    l7::Verdict::Refuse {
                        status,
                        reason: reason.name(),
                    }
                }
            }
        });
        let ends = endpoints(p);
        // The part of the segment that goes on: all of it, a cut, or nothing.
        let part = match outcome.fate {
            l7::Fate::Forward => Some((0, seg.payload.len(), seg.flags.contains(Flags::FIN))),
            l7::Fate::Trim { start, end, fin } => Some((start, end, fin)),
            l7::Fate::Drop(_) => None,
        };
        let verdict = match (outcome.fate, part) {
            (_, Some((start, end, fin)))
                if start == 0
                    && end == seg.payload.len()
                    && fin == seg.flags.contains(Flags::FIN)
                    && outcome.timestamps.is_none() =>
            {
                // Nothing cut: the segment goes as it came.
                self.deliver()
            }
            (_, Some((start, end, fin))) => {
                let flags = Flags(seg.flags.0 & !Flags::FIN.0);
                let piece = TcpSegment {
                    src: ends.client,
                    dst: ends.server,
                    seq: seg.seq + start,
                    ack: seg.flags.contains(Flags::ACK).then_some(seg.ack),
                    flags: if fin { flags.union(Flags::FIN) } else { flags },
                    window: seg.window,
                    payload: &seg.payload[start..end],
                };
                // The client's options go along (timestamps: RFC 7323 §3.2, every
                // segment once negotiated; the server echoes them to time the path),
                // with newer timestamps where the flow says so (l7::Outcome).
                let own = tcp_options(p);
                let mut options = [0u8; 40];
                let n = own.len().min(options.len());
                options[..n].copy_from_slice(&own[..n]);
                if let Some(ts) = outcome.timestamps {
                    if let Some((at, _)) = Timestamps::locate(&options[..n]) {
                        ts.write_at(&mut options[..n], at);
                    }
                }
                if inject::tcp_packet_with(&piece, &options[..n], &mut emit.scratch).is_ok() {
                    emit.push_scratch(Toward::Local);
                }
                Verdict::Consumed
            }
            (l7::Fate::Drop(l7::DropReason::Buffered), _) => Verdict::Consumed,
            (l7::Fate::Drop(l7::DropReason::Untracked(_)), _) => {
                self.dropped(DropReason::Untracked)
            }
            (_, _) => self.dropped(DropReason::Inspection),
        };
        if let Some(r) = outcome.release {
            let seg = TcpSegment {
                src: ends.client,
                dst: ends.server,
                seq: r.seq,
                ack: r.ack,
                flags: if r.fin {
                    Flags::PSH.union(Flags::FIN)
                } else {
                    Flags::PSH
                },
                window: r.window,
                payload: flow.release_data(),
            };
            // The timestamps of the client segment that released the bytes (l7::Release).
            let ts = r.timestamps.map(Timestamps::emit);
            let options = ts.as_ref().map_or(&[][..], |t| &t[..]);
            let mut scratch = std::mem::take(&mut emit.scratch);
            let _ = inject::segments(&seg, options, self.limits.mss, &mut scratch, |pkt| {
                emit.push(Toward::Local, pkt)
            });
            emit.scratch = scratch;
        }
        if let Some(refusal) = outcome.refusal {
            self.refuse(policy, who, p, &ends, &refusal, now, wall, emit);
        }
        if let Some(a) = outcome.held_ack {
            // Held head bytes, acknowledged on the server's behalf (l7::HeldAck): without
            // it a head larger than the client's congestion window never completes.
            let ack = TcpSegment {
                src: ends.server,
                dst: ends.client,
                seq: a.seq,
                ack: Some(a.ack),
                flags: Flags::default(),
                window: a.window,
                payload: &[],
            };
            let ts = a.timestamps.map(Timestamps::emit);
            let options = ts.as_ref().map_or(&[][..], |t| &t[..]);
            if inject::tcp_packet_with(&ack, options, &mut emit.scratch).is_ok() {
                emit.push_scratch(Toward::Peer);
            }
        }
        // The client of a refused flow, answered on the server's behalf until it has
        // closed (l7::Answer).
        match outcome.answer {
            Some(l7::Answer::Response) => {
                if let Some(r) = flow.refusal() {
                    if inject::response(&ends, &r, &mut emit.text, &mut emit.scratch).is_ok() {
                        emit.push_scratch(Toward::Peer);
                    }
                }
            }
            Some(l7::Answer::Ack { seq, ack }) => {
                let no_flags = Flags::default();
                emit.push_segment(
                    ends.server,
                    ends.client,
                    seq,
                    Some(ack),
                    no_flags,
                    Toward::Peer,
                );
            }
            Some(l7::Answer::Reset { seq }) => {
                emit.push_reset(ends.server, ends.client, seq, Toward::Peer);
            }
            _ => {}
        }
        self.charge_held(flow, held_before, policy, who, p, now, wall, emit);
        verdict
    }

    /// Accounts what `flow` holds now against the budget of all inspected flows; over
    /// budget, the flow that grew is refused (503) and its bytes freed (invariant 6:
    /// a flood of slow heads degrades service, never the host).
    #[allow(clippy::too_many_arguments)] // the flow, its decision context and the clock
    pub(super) fn charge_held(
        &self,
        flow: &mut L7Flow,
        before: usize,
        policy: &CompiledPolicy,
        who: Who<'_>,
        p: &Parsed<'_>,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) {
        let after = flow.held();
        if after <= before {
            self.uncharge(before - after);
            return;
        }
        let total = self.held_total.fetch_add(after - before, Ordering::Relaxed) + (after - before);
        if total <= self.limits.l7_total_held {
            return;
        }
        if let Some(refusal) = flow.shed() {
            self.refuse(policy, who, p, &endpoints(p), &refusal, now, wall, emit);
        }
        self.uncharge(after);
    }

    pub(super) fn uncharge(&self, n: usize) {
        let _ = self
            .held_total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(n))
            });
    }

    /// Injects the answer to a refused client and the reset of the server; logs causes
    /// that policy did not already log.
    #[allow(clippy::too_many_arguments)] // the flow, the refusal, and the clock: all needed
    pub(super) fn refuse(
        &self,
        policy: &CompiledPolicy,
        who: Who<'_>,
        p: &Parsed<'_>,
        ends: &Endpoints,
        refusal: &Refusal,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) {
        if inject::response(ends, refusal, &mut emit.text, &mut emit.scratch).is_ok() {
            emit.push_scratch(Toward::Peer);
        }
        if inject::reset(ends, refusal, &mut emit.scratch).is_ok() {
            emit.push_scratch(Toward::Local);
        }
        if matches!(refusal.cause, RefuseCause::Policy { .. }) {
            return;
        }
        self.http_refused.fetch_add(1, Ordering::Relaxed);
        let reason = refusal_reason(&refusal.cause);
        self.drops[drop_slot(DropReason::Denied(reason))].fetch_add(1, Ordering::Relaxed);
        let detail = refusal.cause.to_string();
        let summary = HttpSummary {
            method: "",
            path: &detail,
            host: None,
            status: Some(refusal.cause.status()),
        };
        self.write_log(
            policy,
            who,
            p,
            "deny",
            reason.name(),
            None,
            Some(summary),
            now,
            wall,
        );
    }

    /// Refuses inspected flows whose request head is overdue (408) and removes
    /// expired flows. The shell calls this periodically.
    pub fn poll(&self, now: Duration, wall: UnixTime, emit: &mut Emit) -> usize {
        let active = self.active.load();
        let ts = stamp(now);
        let mut removed = 0;
        let mut held = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            removed += shard.sweep(now);
            shard.retain(|key, f| {
                held += f.value.l7.as_deref().map_or(0, L7Flow::held);
                let (Some(l7), Some(sender), Some(receiver)) = (
                    f.value.l7.as_deref_mut(),
                    f.value.sender.as_ref(),
                    f.value.receiver.as_ref(),
                ) else {
                    return true;
                };
                let who = Who { sender, receiver };
                if l7.poll_at().is_some_and(|at| at <= ts) {
                    if let (Some(refusal), Some(p)) = (l7.poll(ts), parsed_from_key(key)) {
                        self.refuse(
                            &active.policy,
                            who,
                            &p,
                            &endpoints(&p),
                            &refusal,
                            now,
                            wall,
                            emit,
                        );
                        // Gone within the closing timeout once the client is answered.
                        f.close();
                    }
                }
                true
            });
        }
        // Deltas charged meanwhile by other threads are within one tick's traffic.
        self.held_total.store(held, Ordering::Relaxed);
        removed
    }

    pub(super) fn request<'a>(&'a self, who: Who<'a>, p: &Parsed<'_>) -> Request<'a> {
        Request {
            src_identity: Some(&who.sender.identity),
            src_groups: &who.sender.groups,
            src_addr: Some(p.key.src),
            dst_identity: who.receiver.identity.as_deref(),
            dst_groups: &who.receiver.groups,
            dst_addr: Some(p.key.dst),
            dst_port: if p.protocol == Protocol::Icmp {
                0
            } else {
                p.key.dst_port
            },
            protocol: p.protocol,
            http: None,
        }
    }
}
