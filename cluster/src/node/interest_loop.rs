//! The interest loop: pushes this node's interest (the channels and patterns its clients hold)
//! to the other members when it changes, at once when a subscription waits for it, and every
//! few seconds, so that they send this node the non-durable events its clients want (see
//! [`crate::interest`]).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_storage::raft::NodeId;

use super::ClusterNode;
use crate::interest::{
    INTEREST_PEER_SILENCE, INTEREST_PUSH_SPACING, INTEREST_SILENT_PEER_WAIT, INTEREST_SYNC_LIMIT,
    Interest,
};
use crate::message::{AppRequest, encode};
use crate::rpc::Request;

impl ClusterNode {
    /// Pushes this node's interest to every other member when it changed (checked every
    /// 300 ms, or at once when [`Self::sync_interest`] asks), and at least every 3 s (so a
    /// restarted peer learns it quickly). A push asked for while the previous one was under
    /// way (a burst of subscribes: a reconnect storm) starts [`INTEREST_PUSH_SPACING`] after
    /// the previous one started, so that it serves every subscribe that comes meanwhile; one
    /// asked for while none was under way (a client subscribing to one channel after another)
    /// starts at once. A member that did not answer the last push is waited for at most
    /// [`INTEREST_SILENT_PEER_WAIT`] until it answers again, and one that has answered no
    /// call of this node for [`INTEREST_PEER_SILENCE`] is not waited for any longer.
    pub(super) async fn interest_loop(&self) {
        let sync = &self.inner.interest_sync;
        let mut ticker = tokio::time::interval(Duration::from_millis(300));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(Interest, tokio::time::Instant)> = None;
        // When the last push started, if subscribes asked for another while it was under way.
        let mut crowded: Option<tokio::time::Instant> = None;
        // Members that did not answer the last push (see `INTEREST_SILENT_PEER_WAIT`).
        let mut silent: BTreeSet<NodeId> = BTreeSet::new();
        let mut arrivals = self.inner.peers.arrivals();
        loop {
            let asked = tokio::select! {
                _ = ticker.tick() => false,
                // A peer connected: it may have just restarted and know no one's interest
                // (its non-durable publishes count no subscriber here until it does), so it
                // gets this node's now, not at the next 3 s refresh.
                Ok(()) = arrivals.changed() => {
                    last = None;
                    false
                }
                () = sync.asked() => true,
                () = self.inner.shutdown.cancelled() => break,
            };
            if asked {
                if !sync.wanted() {
                    // Served by a push that started after it asked.
                    continue;
                }
                if let Some(at) = crowded.take() {
                    tokio::select! {
                        () = tokio::time::sleep_until(at + INTEREST_PUSH_SPACING) => {}
                        () = self.inner.shutdown.cancelled() => break,
                    }
                }
            }
            // Numbered before the interest is read: a waiter that saw an earlier number
            // registered its subscription before this read.
            let number = sync.begin();
            let current = (self.inner.hooks.interest)();
            let due = match &last {
                None => true,
                Some((sent, at)) => *sent != current || at.elapsed() >= Duration::from_secs(3),
            };
            if !due {
                // The same as the last push, which completed: its waiters are served.
                sync.finish(number);
                continue;
            }
            let start = tokio::time::Instant::now();
            sync.pushes.fetch_add(1, Ordering::Relaxed);
            let mut targets: BTreeSet<NodeId> = self.members().into_keys().collect();
            targets.extend(self.inner.static_peers.keys().copied());
            targets.remove(&self.inner.id);
            self.inner.interest.set_members(targets.iter().copied());
            let request = Request::App(encode(&AppRequest::Interest(current.clone())));
            let calls = targets.into_iter().map(|peer| {
                let request = &request;
                let wait = if silent.contains(&peer) {
                    INTEREST_SILENT_PEER_WAIT
                } else {
                    INTEREST_SYNC_LIMIT
                };
                async move {
                    let peers = &self.inner.peers;
                    // Given up on at the earliest after the short wait: by then the push is
                    // sent (and taken if the member is alive), whatever became of the answer.
                    let silent = async {
                        tokio::time::sleep(INTEREST_SILENT_PEER_WAIT).await;
                        peers.until_silent(peer, INTEREST_PEER_SILENCE).await;
                    };
                    let answered = tokio::select! {
                        result = peers.call(peer, request, wait) => result.is_ok(),
                        () = silent => false,
                    };
                    (peer, answered)
                }
            });
            for (peer, answered) in futures::future::join_all(calls).await {
                if answered {
                    silent.remove(&peer);
                } else {
                    silent.insert(peer);
                }
            }
            last = Some((current, start));
            sync.finish(number);
            crowded = sync.wanted().then_some(start);
        }
        sync.close();
    }
}
