//! The clock loop: measures every member's clock each [`CLOCK_ROUND`], so that this node's
//! proposals carry the majority's time (see [`crate::clock`]), and warns when clocks disagree.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_storage::raft::NodeId;
use tokio::time::Instant;

use super::ClusterNode;
use crate::clock::{CLOCK_ROUND, CLOCK_TOLERANCE};
use crate::message::{AppRequest, AppResponse, decode, encode};
use crate::rpc::{Request, Response};

impl ClusterNode {
    /// Asks `peer` one question of the clock round (1 s at most); `None` if no answer came.
    async fn ask(&self, peer: NodeId, question: &AppRequest) -> Option<AppResponse> {
        let request = Request::App(encode(question));
        let answer = self
            .inner
            .peers
            .call(peer, &request, Duration::from_secs(1))
            .await;
        match answer {
            Ok(Response::App(bytes)) => decode(&bytes).ok(),
            _ => None,
        }
    }

    /// Asks `peer` which build it runs and records the answer, for `herald cluster status`
    /// (a node from before the question answers an error, recorded as such).
    async fn ask_build(&self, peer: NodeId) {
        let build = match self.ask(peer, &AppRequest::Build).await {
            Some(AppResponse::Build(build)) => build,
            Some(AppResponse::Done(Err(_))) => "older than 2026-12-07 (tells no build)".into(),
            _ => return,
        };
        self.inner.builds.lock().insert(peer, build);
    }

    /// Asks `peer` how far its Raft journal has got, and raises what is known of it, and
    /// which members it refuses as gone back in time (see [`crate::peer_stores`]); a node
    /// from before the question answers an error, ignored.
    async fn ask_journal(&self, peer: NodeId) {
        let ours = self.inner.peer_stores.identity();
        if let Some(AppResponse::Journal {
            identity,
            went_back,
            refuses_you,
        }) = self.ask(peer, &AppRequest::Journal(ours)).await
        {
            let stores = &self.inner.peer_stores;
            if ours.is_some() {
                self.inner.peers.set_refused(peer, refuses_you);
            }
            if let Some(identity) = identity {
                stores.saw_journal(peer, &identity);
            }
            let others: Vec<_> = went_back
                .into_iter()
                .filter(|(member, _)| *member != self.inner.id)
                .collect();
            stores.heard_went_back(peer, &others);
        }
    }

    /// Measures each other member's clock every [`CLOCK_ROUND`] (the first round at once,
    /// or as soon as the cluster forms) and records the offsets; logs a warning when this node's own clock is corrected, or a
    /// member's is off, by more than [`CLOCK_TOLERANCE`] (once each time that starts).
    pub(super) async fn clock_loop(&self) {
        let mut ticker = tokio::time::interval_at(Instant::now() + CLOCK_ROUND, CLOCK_ROUND);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clock = &self.inner.clock;
        let tolerance = CLOCK_TOLERANCE.as_millis() as i64;
        let mut corrected = false;
        let mut skewed: BTreeSet<NodeId> = BTreeSet::new();
        // Until the cluster forms (no members known yet), look again every 100 ms rather than
        // every round: leaders wait for the first round before they propose.
        loop {
            let members = self.members();
            let formed = !members.is_empty();
            clock.retain(|id| members.contains_key(&id));
            let request = Request::App(encode(&AppRequest::Clock));
            let calls = members
                .keys()
                .copied()
                .filter(|&peer| peer != self.inner.id)
                .map(|peer| {
                    let request = &request;
                    async move {
                        let sent_ms = herald_storage::unix_now_ms();
                        let start = Instant::now();
                        let answer = self
                            .inner
                            .peers
                            .call(peer, request, Duration::from_secs(1))
                            .await;
                        let rtt = start.elapsed();
                        if let Ok(Response::App(bytes)) = answer
                            && let Ok(AppResponse::Clock(their_ms)) = decode(&bytes)
                        {
                            clock.record(peer, sent_ms, their_ms, rtt);
                            // Asked of a member that answers only: a silent one would hold
                            // the round (which leaders wait for at first) another second.
                            self.ask_build(peer).await;
                            self.ask_journal(peer).await;
                        }
                    }
                });
            futures::future::join_all(calls).await;
            let correction = clock.refresh();
            // Reads judge TTLs by the same time (see `Store::now_ms`).
            self.inner.store.set_clock_correction(correction);
            if formed {
                clock.round_ended();
            }
            if correction != 0 && !corrected {
                tracing::warn!(
                    correction_ms = correction,
                    "this node's clock is off from the majority of the cluster's members; its proposals carry the corrected time, but fix its clock (NTP)"
                );
            } else if correction == 0 && corrected {
                tracing::info!("this node's clock agrees with the majority of the cluster's again");
            }
            corrected = correction != 0;
            for (peer, offset) in clock.offsets() {
                // Relative to the cluster's time, not to this node's own clock.
                let off = offset - correction;
                if off.abs() > tolerance {
                    if skewed.insert(peer) {
                        tracing::warn!(
                            peer,
                            offset_ms = off,
                            "a member's clock is off from the cluster's majority; fix its clock (NTP)"
                        );
                    }
                } else {
                    skewed.remove(&peer);
                }
            }
            tokio::select! {
                _ = ticker.tick(), if formed => {}
                () = tokio::time::sleep(Duration::from_millis(100)), if !formed => {}
                () = self.inner.shutdown.cancelled() => break,
            }
        }
    }
}
