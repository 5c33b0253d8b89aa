//! Forming the cluster: bootstrap by `--bootstrap-expect` (the node with the lowest id forms
//! it once enough nodes of its partition count answer), the formation itself (meta group, epoch,
//! every partition group on its first voter; written by a task that outlives the `init` that
//! asked, retrying until a quorum is up), and the meta leader finishing a formation that was
//! cut short (its identity or its partitions never written), and the check that a node's peers have not formed a cluster without it
//! before it forms one (`formed_without_this_node`). Apart from the rest of the node because it runs once in a cluster's life,
//! while everything else runs all the time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_storage::raft::{
    Command, GroupId, META_GROUP, NodeId, group_partition, partition_group,
};
use herald_storage::{Epoch, Partition};
use openraft::BasicNode;
use openraft::error::{InitializeError, RaftError};

use super::ClusterNode;
use crate::message::{AppRequest, AppResponse, ProposeError};
use crate::placement::placement;

/// Placement rounds (one a second) the meta leader waits, seeing partition groups without a
/// membership, before it initialises them (a formation cut short).
const FORMATION_REPAIR_ROUNDS: u32 = 10;

/// What a peer of `--peers` said of the cluster it is a member of, while this node is not
/// formed (see [`ClusterNode::formed_without_this_node`]).
#[derive(Debug)]
pub(crate) struct FormedElsewhere {
    /// The peer that said so.
    pub via: NodeId,
    /// What it said of the cluster (`epoch E; members ...`), when it said.
    pub formed: Option<String>,
    /// The cluster counts this node among its members: it was named at formation or joined,
    /// and has not caught up yet (it is to wait, neither form nor be joined).
    pub member: bool,
}

impl FormedElsewhere {
    /// `epoch E; members ...; node N says so`, as the refusals quote it.
    pub fn described(&self) -> String {
        let via = self.via;
        match &self.formed {
            Some(formed) => format!("{formed}; node {via} says so"),
            None => format!("node {via} says so"),
        }
    }
}

impl ClusterNode {
    /// A peer (of `--peers`) that is a member of a formed cluster, while this node is not
    /// formed, and what it said of that cluster. Every peer is asked at once, each for at most a few seconds: one that
    /// lets this node connect (it names this node in its own `--peers`) answers
    /// [`AppRequest::Formation`] (or, a version before that request, the meta group's probe
    /// that this node is not a member); one that refuses the connection as a non-member
    /// tells, if formed, its cluster's epoch and members in the refusal (see
    /// [`Transport::set_refusal_note`]). A peer that does not answer tells nothing.
    pub(crate) async fn formed_without_this_node(&self) -> Option<FormedElsewhere> {
        let asks = self.inner.static_peers.keys().map(|&peer| async move {
            let ask = |request: AppRequest| async move {
                self.call_within(peer, &request, Duration::from_secs(3))
                    .await
            };
            let elsewhere = |formed, member| FormedElsewhere {
                via: peer,
                formed,
                member,
            };
            // Asked as `FormedWithMe`; a node older than that request answers an error, and
            // is asked `Formation`; one older than that too, the meta group's probe.
            let mut answer = ask(AppRequest::FormedWithMe).await;
            if matches!(answer, Ok(AppResponse::Done(Err(_)))) {
                answer = ask(AppRequest::Formation).await;
            }
            match answer {
                Ok(AppResponse::FormationMember(formed)) => Some(elsewhere(Some(formed), true)),
                Ok(AppResponse::Formation(Some(formed))) => Some(elsewhere(Some(formed), false)),
                Ok(AppResponse::Formation(None)) => None,
                Ok(_) => match ask(AppRequest::Probe { group: META_GROUP }).await {
                    Ok(AppResponse::NotMember) => Some(elsewhere(None, false)),
                    _ => None,
                },
                Err(_) => self
                    .inner
                    .peers
                    .formed_without_this_node(peer)
                    .map(|formed| elsewhere(Some(formed), false)),
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .next()
    }

    pub(super) async fn bootstrap(&self, expect: usize) {
        let mut members = self.inner.static_peers.clone();
        members.insert(self.inner.id, self.inner.advertise.clone());
        let lowest = *members.keys().next().expect("members include this node");
        if self.is_formed() {
            // A restart: the store already belongs to the cluster (if the members removed this
            // node meanwhile, they refuse it and say so in their logs; join it again).
            tracing::info!(epoch = %self.epoch(), "the store belongs to a formed cluster: rejoining its members");
            return;
        }
        if expect < members.len() {
            tracing::warn!(
                bootstrap_expect = expect,
                peers = members.len(),
                "--bootstrap-expect is below the number of nodes --peers names: the cluster forms with the first {expect} that answer, and the others stay out until `herald cluster join` adds them (give every node the same --bootstrap-expect, normally the number of --peers)"
            );
        }
        if lowest != self.inner.id {
            tracing::info!(
                bootstrapper = lowest,
                "waiting for node {lowest} to form the cluster"
            );
            // Node `lowest` may have formed without this node already (its --bootstrap-expect
            // met by the others): its peers let this node connect (they name it in their own
            // --peers), so no refusal says so; asked now and then, until formed or told.
            while !self.is_formed() && !self.inner.shutdown.is_cancelled() {
                if let Some(elsewhere) = self.formed_without_this_node().await {
                    if !elsewhere.member {
                        self.left_out_of(&elsewhere);
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            return;
        }
        let meta = &self.inner.groups[usize::from(META_GROUP)];
        if !matches!(meta.is_initialized().await, Ok(false)) && self.is_formed() {
            return;
        }
        // Wait for `expect` nodes (this one included) to answer.
        let mut logged = tokio::time::Instant::now();
        let mut logged_mismatch = BTreeSet::new();
        let reachable = loop {
            if self.inner.shutdown.is_cancelled() {
                return;
            }
            let mut up: BTreeMap<NodeId, String> = BTreeMap::new();
            up.insert(self.inner.id, self.inner.advertise.clone());
            for (&peer, addr) in &members {
                if peer != self.inner.id
                    && matches!(
                        self.call(peer, &AppRequest::Ping).await,
                        Ok(AppResponse::Pong)
                    )
                {
                    if let Some(theirs) = self.other_partition_count(peer).await {
                        if logged_mismatch.insert(peer) {
                            tracing::error!(
                                peer,
                                "node {peer} runs {theirs} partitions than this node ({ours}): it cannot be a member of the cluster this node forms (the count is fixed when a store is created); start it with --partitions {ours} on an empty data directory. Waiting for nodes with {ours}",
                                ours = self.inner.store.partitions()
                            );
                        }
                        continue;
                    }
                    up.insert(peer, addr.clone());
                }
            }
            if up.len() >= expect {
                break up;
            }
            if logged.elapsed() > Duration::from_secs(5) {
                tracing::info!(
                    up = up.len(),
                    expect,
                    "waiting for peers to form the cluster"
                );
                logged = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // Nodes of `--peers` that formed a cluster without this one (it was started later):
        // they are joined to, not formed with.
        if let Some(elsewhere) = self.formed_without_this_node().await {
            let via = elsewhere.via;
            let formed = elsewhere.formed.as_deref().unwrap_or("?");
            if elsewhere.member {
                tracing::info!(
                    via,
                    formed,
                    "node {via} says the cluster is formed with this node as a member: not forming another; this node catches up from its members"
                );
                return;
            }
            self.left_out_of(&elsewhere);
            return;
        }
        if let Err(error) = self.form(reachable).await {
            tracing::error!(%error, "forming the cluster failed");
        }
    }

    /// Records and logs that the cluster `elsewhere` tells of was formed without this node
    /// (its status and `/ready` say so from now on, see `ClusterNode::left_out`).
    fn left_out_of(&self, elsewhere: &FormedElsewhere) {
        let via = elsewhere.via;
        let formed = elsewhere.formed.as_deref().unwrap_or("?");
        *self.inner.formed_elsewhere.lock() = Some(elsewhere.described());
        tracing::error!(
            via,
            formed,
            "node {via} is a member of a formed cluster this node is not a member of: not forming another; add this node with `herald cluster join --node-id {id} --addr {addr}` through a member",
            id = self.inner.id,
            addr = self.inner.advertise
        );
    }

    /// Whether `peer` runs another partition count than this node: `Some(described)` if so
    /// ("fewer" or "more"), `None` if it runs the same or did not answer (see
    /// [`Self::compare_partition_count`]).
    pub(super) async fn other_partition_count(&self, peer: NodeId) -> Option<&'static str> {
        self.compare_partition_count(peer, Duration::from_secs(10))
            .await
            .ok()
            .flatten()
    }

    /// How `peer`'s partition count compares with this node's: `Ok(None)` the same,
    /// `Ok(Some(described))` another ("fewer" or "more"), `Err(reason)` when it did not
    /// answer (not up, a connection to it just lost), which tells nothing. Asked with the
    /// failover probe, which a node answers only for groups it runs: it must run this node's
    /// last partition group and not the one after. (No message of its own, so that nodes from
    /// before it need no upgrade.) The two calls go out together; each waits at most `timeout`.
    pub(super) async fn compare_partition_count(
        &self,
        peer: NodeId,
        timeout: Duration,
    ) -> Result<Option<&'static str>, String> {
        let ours = self.inner.store.partitions();
        let runs = |group: GroupId| async move {
            match self
                .call_within(peer, &AppRequest::Probe { group }, timeout)
                .await
            {
                Ok(AppResponse::Probe(probe)) => Ok(probe.is_some()),
                Ok(other) => Err(format!("node {peer} answered {other:?}")),
                Err(error) => Err(error.to_string()),
            }
        };
        // Both at once: a member that does not answer costs one timeout, not two.
        let (last, next) =
            futures::join!(runs(partition_group(ours - 1)), runs(partition_group(ours)));
        if !last? {
            return Ok(Some("fewer"));
        }
        if next? {
            return Ok(Some("more"));
        }
        Ok(None)
    }

    /// Initialises the meta group with `members`, writes the epoch, and initialises every
    /// partition group on its first voter.
    pub(super) async fn form(&self, members: BTreeMap<NodeId, String>) -> Result<(), ProposeError> {
        let meta = &self.inner.groups[usize::from(META_GROUP)];
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
            .collect();
        // Asked only when it is not: openraft logs an ERROR for an initialize it refuses.
        if !matches!(meta.is_initialized().await, Ok(true)) {
            match meta.initialize(nodes).await {
                Ok(()) => {
                    tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "formed the meta group")
                }
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => {
                    return Err(ProposeError::Failed(format!("initialising meta: {error}")));
                }
            }
        }
        self.inner.allowed.write().extend(members.keys().copied());
        // The rest goes on in a task of its own: the meta group is initialised, and a cluster
        // whose Init is never written stays unformed for good. A caller that stops waiting
        // (`herald cluster init` timing out while most members are still down) leaves it
        // running until a quorum is up and the cluster is formed.
        match self.spawn_formation(members).await {
            Ok(result) => result,
            Err(error) => Err(ProposeError::Failed(format!(
                "forming the cluster: {error}"
            ))),
        }
    }

    /// Runs [`Self::finish_formation`] in a task of its own (it outlives whoever waits for
    /// it), with `forming` raised meanwhile so that the meta leader's repair
    /// ([`Self::finish_unwritten_init`]) leaves it alone.
    fn spawn_formation(
        &self,
        members: BTreeMap<NodeId, String>,
    ) -> tokio::task::JoinHandle<Result<(), ProposeError>> {
        let node = self.clone();
        self.inner.forming.store(true, Ordering::Release);
        tokio::spawn(async move {
            let result = node.finish_formation(members).await;
            node.inner.forming.store(false, Ordering::Release);
            result
        })
    }

    /// Writes the cluster's `Init` (and the forming node's namespace config) to the meta
    /// group, retrying until a quorum of the members is up to commit it (or the node stops),
    /// then initialises every partition group.
    async fn finish_formation(
        &self,
        members: BTreeMap<NodeId, String>,
    ) -> Result<(), ProposeError> {
        if !self.is_formed() {
            // One epoch for every attempt: an attempt whose outcome was unknown and that
            // committed after all makes the next a repeat, not a second cluster identity.
            let command = Command::Init {
                epoch: Epoch::random(),
                partitions: self.inner.store.partitions(),
            };
            self.write_until_committed(command).await?;
            // The forming node's file becomes the cluster's namespace config.
            if self.inner.namespaces.cluster().is_none() {
                let spec = self.inner.namespaces.local().to_spec();
                self.write_until_committed(Command::Namespaces { spec })
                    .await?;
            }
        }
        // A fault for tests only: the forming node "dies" between the cluster's Init and the
        // partitions' InitGroup (see `finish_interrupted_formation`).
        if std::env::var_os("HERALD_TEST_FORMATION_STOPS_AFTER_INIT").is_some() {
            tracing::warn!("HERALD_TEST_FORMATION_STOPS_AFTER_INIT: partitions left uninitialised");
            return Ok(());
        }
        self.init_partitions(&members, 0..self.inner.store.partitions())
            .await;
        Ok(())
    }

    /// Writes `command` to the meta group, again and again while no quorum commits it, until
    /// it is committed or the node stops.
    async fn write_until_committed(&self, command: Command) -> Result<(), ProposeError> {
        loop {
            if matches!(command, Command::Init { .. }) && self.is_formed() {
                return Ok(());
            }
            match self.write_via_leader(META_GROUP, command.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) if self.inner.shutdown.is_cancelled() => return Err(error),
                Err(error) => tracing::warn!(
                    %error,
                    "forming the cluster: the meta group commits nothing yet (are most of the members down?); trying again"
                ),
            }
        }
    }

    /// Initialises the groups of `partitions` over `members`, each on its first voter (or the
    /// next, if that one is down); a group already initialised there stays as it is.
    async fn init_partitions(
        &self,
        members: &BTreeMap<NodeId, String>,
        partitions: impl Iterator<Item = Partition>,
    ) {
        let ids: Vec<NodeId> = members.keys().copied().collect();
        for partition in partitions {
            let (voters, learners) = placement(partition, &ids);
            let pick = |set: &[NodeId]| -> BTreeMap<NodeId, String> {
                set.iter().map(|id| (*id, members[id].clone())).collect()
            };
            let request = AppRequest::InitGroup {
                group: partition_group(partition),
                voters: pick(&voters),
                learners: pick(&learners),
            };
            // On its first voter; if that one is down (an init by hand while a node is away),
            // on the next: any voter can start the group, and two of three can elect.
            let mut failures = Vec::new();
            for &voter in &voters {
                let result = if voter == self.inner.id {
                    self.handle_app(self.inner.id, request.clone()).await
                } else {
                    self.call(voter, &request)
                        .await
                        .unwrap_or_else(|e| AppResponse::Done(Err(e)))
                };
                match result {
                    AppResponse::Done(Err(error)) => {
                        failures.push(format!("node {voter}: {error}"))
                    }
                    _ => {
                        failures.clear();
                        break;
                    }
                }
            }
            if !failures.is_empty() {
                tracing::warn!(
                    partition,
                    errors = failures.join("; "),
                    "no voter could initialise a partition group; run `herald cluster init` again once they are up"
                );
            }
        }
    }

    /// A formation cut short (the forming node killed between the meta group's `Init` and the
    /// partition groups' `InitGroup`) leaves a cluster that is formed but whose partitions have
    /// no voters anywhere: nothing ever commits there. Every member is at least a learner of
    /// every partition, so the meta leader seeing partition groups without a membership for
    /// [`FORMATION_REPAIR_ROUNDS`] rounds in a row initialises them, as `herald cluster init`
    /// does (which initialises only what is not yet). Returns the new count of such rounds.
    pub(super) async fn finish_interrupted_formation(&self, rounds: u32) -> u32 {
        let meta = &self.inner.groups[usize::from(META_GROUP)];
        if meta.metrics().borrow().current_leader != Some(self.inner.id) {
            return 0;
        }
        if !self.is_formed() {
            return self.finish_unwritten_init(rounds);
        }
        let missing = self.partitions_without_membership();
        if missing.is_empty() {
            return 0;
        }
        if rounds + 1 < FORMATION_REPAIR_ROUNDS {
            return rounds + 1;
        }
        let (never, _) = self.never_initialised(missing).await;
        if never.is_empty() {
            return 0;
        }
        tracing::warn!(
            partitions = ?never,
            "partitions no member has a log for: the cluster's formation was cut short; initialising them"
        );
        self.init_partitions(&self.members(), never.into_iter())
            .await;
        0
    }

    /// The meta leader of a cluster whose `Init` was never written (`herald cluster init`
    /// with most members down, its node restarted before a quorum was up: the task writing it
    /// died with the process) writes it, after [`FORMATION_REPAIR_ROUNDS`] rounds in a row,
    /// over the meta group's members, unless a task of this node is writing it already.
    /// Returns the new count of such rounds.
    fn finish_unwritten_init(&self, rounds: u32) -> u32 {
        let meta = &self.inner.groups[usize::from(META_GROUP)];
        if !super::has_membership(meta) || self.inner.forming.load(Ordering::Acquire) {
            return 0;
        }
        if rounds + 1 < FORMATION_REPAIR_ROUNDS {
            return rounds + 1;
        }
        tracing::warn!(
            "the meta group has members but the cluster's identity was never written (an init interrupted before a quorum was up): forming the cluster"
        );
        let formation = self.spawn_formation(self.members());
        tokio::spawn(async move {
            if let Ok(Err(error)) = formation.await {
                tracing::error!(%error, "forming the cluster failed");
            }
        });
        0
    }

    /// The partition groups this node has no membership for (not created, or this node not
    /// added yet).
    pub(super) fn partitions_without_membership(&self) -> Vec<Partition> {
        self.inner
            .groups
            .iter()
            .enumerate()
            .filter(|(_, raft)| !super::has_membership(raft))
            .filter_map(|(group, _)| group_partition(group as GroupId))
            .collect()
    }

    /// Which of `partitions` were never initialised: every member answers and none has a log
    /// for the group. Elsewhere this node may simply not have been added yet (a join under
    /// way). Also returns those some member did not answer about.
    async fn never_initialised(
        &self,
        partitions: Vec<Partition>,
    ) -> (Vec<Partition>, Vec<Partition>) {
        let ids: Vec<NodeId> = self.members().keys().copied().collect();
        let (mut never, mut unknown) = (Vec::new(), Vec::new());
        for partition in partitions {
            let group = partition_group(partition);
            let answers = self
                .probe_voters(group, &ids, None, Duration::from_secs(1))
                .await;
            if answers.len() < ids.len() {
                unknown.push(partition);
            } else if answers.iter().all(|(_, p)| p.last_log.is_none()) {
                never.push(partition);
            }
        }
        (never, unknown)
    }

    /// `herald cluster init` on a formed cluster some of whose partition groups this node has
    /// no membership for: creates those no member has a log for, over the cluster's current
    /// members (not this node's `--peers`, which joins and removals may have left behind:
    /// placing a group over them could start it on a node that is not a member, or on this
    /// node alone while it is still being added). Returns the partitions created.
    pub(super) async fn create_uncreated_partitions(
        &self,
        missing: Vec<Partition>,
    ) -> Result<Vec<Partition>, ProposeError> {
        let (never, unknown) = self.never_initialised(missing).await;
        if !unknown.is_empty() {
            return Err(ProposeError::Failed(format!(
                "not every member answered about partitions {unknown:?}, so whether they were ever created is unknown; nothing was changed: run `herald cluster init` again once every member is up"
            )));
        }
        if !never.is_empty() {
            tracing::info!(partitions = ?never, "`herald cluster init`: creating the partitions no member has a log for");
            self.init_partitions(&self.members(), never.iter().copied())
                .await;
        }
        Ok(never)
    }
}
