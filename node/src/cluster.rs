//! `herald cluster status | init | join | remove | namespaces`: hand operation of a running cluster through
//! any node's HTTP port (`/api/cluster/*`).

use crate::cli::{ClusterArgs, ClusterCommand};
use herald_cluster::clock::CLOCK_TOLERANCE;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// How long a read (`status`, `namespaces`) waits for the node's answer without `--timeout`.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a change (`init`, `join`, `remove`, `namespaces --set`) waits for the node's answer
/// without `--timeout`: it commits through the meta group's quorum, after the node passed it to
/// the meta leader (retrying for up to 10 s while there is none), and a join first asks the new
/// node for its partition count (at most 6 s in all for a node that does not answer).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The change `command` makes, as the timeout error names it; `None` for a read.
fn change(command: &ClusterCommand) -> Option<String> {
    match command {
        ClusterCommand::Status { .. } | ClusterCommand::Namespaces { set: None, .. } => None,
        ClusterCommand::Init { .. } => Some("the cluster's formation".to_string()),
        ClusterCommand::Join { node_id, .. } => Some(format!("the join of node {node_id}")),
        ClusterCommand::Remove { node_id, .. } => Some(format!("the removal of node {node_id}")),
        ClusterCommand::Namespaces { set: Some(_), .. } => {
            Some("the new namespace config".to_string())
        }
    }
}

/// How long `command` waits for the node's answer.
fn timeout(args: &ClusterArgs) -> Duration {
    args.timeout.unwrap_or(match change(&args.command) {
        Some(_) => CHANGE_TIMEOUT,
        None => READ_TIMEOUT,
    })
}

/// Runs one `herald cluster` command; prints the outcome, exit code 1 on failure.
pub fn run(args: ClusterArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            complain!("herald: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(call(&args)) {
        Ok(text) => {
            say!("{text}");
            let warning = match &args.command {
                ClusterCommand::Remove { node_id, .. } => {
                    runtime.block_on(after_remove(&args, *node_id))
                }
                ClusterCommand::Join { node_id, addr, .. } => {
                    runtime.block_on(after_join(&args, *node_id, addr))
                }
                _ => None,
            };
            if let Some(warning) = warning {
                complain!("herald: warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            complain!("herald: {error}");
            ExitCode::from(1)
        }
    }
}

async fn call(args: &ClusterArgs) -> Result<String, String> {
    let base = format!("http://{}/api/cluster", args.http);
    let client = reqwest::Client::new();
    let request = match &args.command {
        ClusterCommand::Status { .. } => client.get(format!("{base}/status")),
        ClusterCommand::Init { .. } => client.post(format!("{base}/init")),
        ClusterCommand::Join { node_id, addr, .. } => client
            .post(format!("{base}/join"))
            .json(&json!({ "nodeId": node_id, "addr": addr })),
        ClusterCommand::Remove { node_id, force, .. } => client
            .post(format!("{base}/remove"))
            .json(&json!({ "nodeId": node_id, "force": force })),
        ClusterCommand::Namespaces { set: None, .. } => client.get(format!("{base}/namespaces")),
        ClusterCommand::Namespaces {
            set: Some(file), ..
        } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            // Checked here too (the node checks it again) to name the file with the line.
            herald_storage::Namespaces::from_toml(&text).map_err(|e| {
                format!(
                    "{}: {e}; nothing was sent, the cluster's config is unchanged",
                    file.display()
                )
            })?;
            client.post(format!("{base}/namespaces")).body(text)
        }
    };
    let body = send(args, request, timeout(args), change(&args.command)).await?;
    Ok(match &args.command {
        ClusterCommand::Status { json: false } => render_status(&body),
        ClusterCommand::Namespaces { json: false, .. } => render_namespaces(&body),
        ClusterCommand::Init { json: false } => render_formed(&body),
        ClusterCommand::Join {
            node_id,
            json: false,
            ..
        } => format!(
            "joined: node {node_id} is a member; it becomes a voter once it answers and has caught up (`herald cluster status` shows it)"
        ),
        ClusterCommand::Remove {
            node_id,
            json: false,
            ..
        } => format!(
            "removed: node {node_id} is no longer a member; its data is not trusted again without a new join"
        ),
        _ => serde_json::to_string_pretty(&body).unwrap_or_default(),
    })
}

/// `herald cluster init`'s answer, `{"status": "formed", "members": {"1": "host:port"}}`, as
/// one line: `formed: members 1 at host:port, 2 at host:port`.
fn render_formed(body: &Value) -> String {
    let members: BTreeMap<u64, &str> = body["members"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(id, addr)| Some((id.parse().ok()?, addr.as_str().unwrap_or("?"))))
        .collect();
    let members: Vec<String> = members
        .iter()
        .map(|(id, addr)| format!("{id} at {addr}"))
        .collect();
    format!("formed: members {}", members.join(", "))
}

/// Sends `request` with the password, if any, and waits at most `timeout` for the whole
/// answer; the answer's JSON body, or its error. `change` names the change the request makes
/// (`None` for a read), for the error when the time runs out.
async fn send(
    args: &ClusterArgs,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    change: Option<String>,
) -> Result<Value, String> {
    let request = match &args.password {
        Some(password) => request.bearer_auth(password),
        None => request,
    };
    let timed_out = || match &change {
        Some(change) => format!(
            "no answer from {} within {timeout:?} to {change} (raise --timeout to wait longer): the change may still complete; check with `herald cluster status`",
            args.http
        ),
        None => format!(
            "no answer from {} within {timeout:?} (raise --timeout to wait longer): the node may be stopped or overloaded; `herald health --http {}` checks that it serves",
            args.http, args.http
        ),
    };
    let response = request.timeout(timeout).send().await.map_err(|e| {
        if e.is_timeout() {
            timed_out()
        } else {
            format!("cannot reach {}: {e}", args.http)
        }
    })?;
    // The node's own words name the HTTP header; the operator of this CLI passes a flag.
    if response.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(match args.password {
            None => format!(
                "the node at {} has a password: give it with --password <PASSWORD> or the HERALD_REQUIREPASS environment variable (the node's --requirepass)",
                args.http
            ),
            Some(_) => format!(
                "the node at {} refused the password given (--password or HERALD_REQUIREPASS): it must be the node's --requirepass",
                args.http
            ),
        });
    }
    let ok = response.status().is_success();
    let body: Value = response.json().await.map_err(|e| {
        if e.is_timeout() {
            timed_out()
        } else {
            format!("unexpected answer from {}: {e}", args.http)
        }
    })?;
    if !ok {
        return Err(body["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_string());
    }
    Ok(body)
}

/// After `herald cluster remove`: the warning to print if the members left cannot survive a
/// failure, read from the node's status (without the removed node, which a node that has not
/// applied the removal yet may still list).
async fn after_remove(args: &ClusterArgs, removed: u64) -> Option<String> {
    let status = reqwest::Client::new().get(format!("http://{}/api/cluster/status", args.http));
    match send(args, status, args.timeout.unwrap_or(READ_TIMEOUT), None).await {
        Ok(status) => {
            let left: Vec<u64> = status["members"]
                .as_object()
                .into_iter()
                .flat_map(|members| members.keys())
                .filter_map(|id| id.parse().ok())
                .filter(|&id| id != removed)
                .collect();
            failure_tolerance_warning(&left)
        }
        Err(error) => Some(format!(
            "node {removed} is removed, but the members left could not be read ({error}): check with `herald cluster status` that at least {SURVIVES_A_FAILURE} are left, the fewest that survive a failure"
        )),
    }
}

/// How long `herald cluster join` watches the asked node's link to the joined one before it
/// warns that the joined node does not answer: the asked node may have failed to reach it
/// before it was started (or been refused by it before it took the join), and then dials
/// again only at its next call after the backoff (at most 2 s), members being called at
/// least every 2 s; twice that and more.
const JOIN_ANSWER_PATIENCE: Duration = Duration::from_secs(8);

/// After `herald cluster join`: the warning to print if the node asked does not reach the
/// joined one within [`JOIN_ANSWER_PATIENCE`] (its link in the node's status never
/// `connected`, and `unreachable` at the end), e.g. a wrong address or a node not started
/// yet. It is a member all the same, but votes nowhere until it answers.
async fn after_join(args: &ClusterArgs, joined: u64, addr: &str) -> Option<String> {
    let deadline = tokio::time::Instant::now() + JOIN_ANSWER_PATIENCE;
    loop {
        let status = reqwest::Client::new().get(format!("http://{}/api/cluster/status", args.http));
        let status = send(args, status, args.timeout.unwrap_or(READ_TIMEOUT), None)
            .await
            .ok()?;
        let link = &status["links"][joined.to_string()];
        if link["state"] == "connected" {
            return None;
        }
        if tokio::time::Instant::now() >= deadline {
            if link["state"] != "unreachable" {
                return None;
            }
            let why = link["lastError"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            return Some(format!(
                "node {joined} does not answer at {addr}{why}: it is a member, but becomes a voter only once it answers; start it, or if the address is wrong, `herald cluster remove --node-id {joined}` and join it at the right one"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fewest members with which the cluster survives the loss of one: each partition has up
/// to three voters and commits with a majority of them, so with two members it needs both,
/// and with one, that one.
const SURVIVES_A_FAILURE: usize = 3;

/// What an operator lost when a removal left `left` members: with fewer than
/// [`SURVIVES_A_FAILURE`], the loss of any one of them stops durable publishes. `None` when
/// enough are left (or none, which no removal leaves).
fn failure_tolerance_warning(left: &[u64]) -> Option<String> {
    let names = left
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    let (members, consequence) = match left.len() {
        1 => (
            format!("1 member left (node {names})"),
            "losing that node stops the cluster",
        ),
        2 => (
            format!("2 members left (nodes {names})"),
            "each partition needs both to commit, so losing either one stops durable publishes",
        ),
        _ => return None,
    };
    Some(format!(
        "the cluster has {members}, fewer than the {SURVIVES_A_FAILURE} needed to survive a failure: it has no failure tolerance now ({consequence}); join nodes with `herald cluster join` until it has {SURVIVES_A_FAILURE} members again"
    ))
}

/// The namespace config as TOML, with where it comes from as comments.
fn render_namespaces(body: &Value) -> String {
    let config = body["config"].as_str().unwrap_or_default();
    let mut out = match (body["status"].as_str(), body["source"].as_str()) {
        (Some(_), _) => "# the cluster's namespace config is now:\n".to_string(),
        (None, Some("cluster")) => "# the cluster's namespace config (every member applies it):\n".to_string(),
        _ => "# the cluster holds no namespace config: each node applies its own file's (this node's below); `herald cluster namespaces --set FILE` gives it one\n".to_string(),
    };
    out.push_str(config);
    if body["nodeFileDiffers"].as_bool() == Some(true) {
        out.push_str("\n\n# this node's config file differs (not in force):\n");
        for line in body["nodeFile"].as_str().unwrap_or_default().lines() {
            out.push_str(&format!("# {line}\n"));
        }
        out.pop();
    }
    out
}

/// `+3600.0 s`, `-0.8 s`.
fn signed_seconds(ms: i64) -> String {
    format!("{:+.1} s", ms as f64 / 1000.0)
}

/// A member's (or a peer's) line: its id, its address and how this node reaches it.
fn member_line(status: &Value, id: &str, addr: &str) -> String {
    let correction = status["clock_correction_ms"].as_i64().unwrap_or(0);
    let link = &status["links"][id];
    let seen = if id.parse::<u64>().ok() == status["node"].as_u64() {
        "this node".to_string()
    } else {
        match link["state"].as_str() {
            Some("connected") => {
                let mut seen = match link["rttUs"].as_u64() {
                    Some(us) => format!("connected, rtt {:.1} ms", us as f64 / 1000.0),
                    None => "connected".to_string(),
                };
                // Losses are the exception on a LAN: shown only when there are some.
                let datagrams = &link["datagrams"];
                if let (Some(lost @ 1..), Some(sent)) =
                    (datagrams["lost"].as_u64(), datagrams["sent"].as_u64())
                {
                    seen.push_str(&format!(", {lost} of {sent} packets lost"));
                }
                seen
            }
            Some("unreachable") => format!(
                "UNREACHABLE ({} failed dials): {}",
                link["failedDials"],
                link["lastError"].as_str().unwrap_or("?")
            ),
            Some("refused") => {
                format!("REFUSED: {}", link["lastError"].as_str().unwrap_or("?"))
            }
            Some("silent") => format!("SILENT: {}", link["lastError"].as_str().unwrap_or("?")),
            Some("refuses this node") => format!(
                "REFUSES THIS NODE: {}",
                link["lastError"].as_str().unwrap_or("?")
            ),
            Some(state) => state.to_string(),
            None => "no link".to_string(),
        }
    };
    // Against the cluster's time (this node's, corrected).
    let clock = match link["clockOffsetMs"].as_i64().map(|o| o - correction) {
        Some(off) if off.unsigned_abs() > CLOCK_TOLERANCE.as_millis() as u64 => {
            format!(", CLOCK {} off", signed_seconds(off))
        }
        _ => String::new(),
    };
    // Shown where it is not this node's: a rolling upgrade's progress.
    let build = match link["build"].as_str() {
        Some(build) if Some(build) != status["build"].as_str() => format!(", BUILD {build}"),
        _ => String::new(),
    };
    // A member the meta group holds as a learner (joined, not promoted yet: it has not
    // answered since its join, e.g. at a wrong address) votes nowhere.
    let meta_learner = status["groups"][0]["learners"]
        .as_array()
        .is_some_and(|learners| {
            learners
                .iter()
                .any(|l| l.as_u64().is_some_and(|l| l.to_string() == id))
        });
    let learner = if meta_learner {
        ", LEARNER (not a voter yet)"
    } else {
        ""
    };
    format!("  {id}  {addr}  {seen}{learner}{clock}{build}\n")
}

/// A node not in a formed cluster yet has no members: what it waits for, then itself and the
/// peers it was started with (`--peers`), each with its link.
fn not_formed(status: &Value) -> String {
    let node = status["node"].as_u64().unwrap_or_default();
    let Some(peers) = status["peers"].as_object() else {
        // A node from before `peers` was reported.
        return "members: none yet (not formed)\n".to_string();
    };
    let advertise = status["advertise"].as_str().unwrap_or("?");
    let mut all: BTreeMap<u64, &str> = peers
        .iter()
        .filter_map(|(id, addr)| Some((id.parse().ok()?, addr.as_str()?)))
        .collect();
    all.insert(node, advertise);
    let reachable = 1 + all
        .keys()
        .filter(|id| status["links"][id.to_string()]["state"] == "connected")
        .filter(|&&id| id != node)
        .count();
    let expect = status["bootstrap_expect"].as_u64().unwrap_or(0);
    let lowest = all.keys().next().copied().unwrap_or(node);
    let join =
        format!("`herald cluster join --node-id {node} --addr {advertise}` through a member");
    let mut out = match (expect, peers.is_empty()) {
        // A cluster exists and this node is out of it: that, not what a formation waits for.
        _ if status["left_out"].is_string() => {
            format!("LEFT OUT: {}\n", status["left_out"].as_str().unwrap_or("?"))
        }
        (0, true) => format!(
            "not formed yet: waiting to be joined ({join}), or for `herald cluster init` (a cluster of this node alone, which others then join)\n"
        ),
        (0, false) => format!(
            "not formed yet: waiting for `herald cluster init` (through any of these nodes), or to be joined ({join})\n"
        ),
        (_, _) if lowest == node => format!(
            "not formed yet: this node forms the cluster once {expect} of these nodes answer (--bootstrap-expect {expect}); it reaches {reachable} of them (itself included)\n"
        ),
        (_, _) => format!(
            "not formed yet: node {lowest} forms the cluster once {expect} of these nodes answer (--bootstrap-expect {expect}); this node reaches {reachable} of them (itself included)\n"
        ),
    };
    if peers.is_empty() {
        out.push_str("members: none yet; no --peers\n");
    } else {
        out.push_str("members: none yet; the peers this node was started with (--peers):\n");
    }
    for (id, addr) in all {
        out.push_str(&member_line(status, &id.to_string(), addr));
    }
    out
}

/// The status as a table: members, then one line per group.
fn render_status(status: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "node {}  formed: {}  epoch: {}  build: {}\n",
        status["node"],
        status["formed"],
        status["epoch"].as_str().unwrap_or("-"),
        status["build"].as_str().unwrap_or("?")
    ));
    if status["removed"] == true {
        out.push_str(&format!(
            "REMOVED: this node was removed from the cluster; it commits nothing and sends its clients elsewhere (what follows is what it last knew). Join it again (`herald cluster join --node-id {} --addr {}` through a member), or stop it and delete its data directory\n",
            status["node"],
            status["advertise"].as_str().unwrap_or("HOST:PORT")
        ));
    }
    let correction = status["clock_correction_ms"].as_i64().unwrap_or(0);
    if correction != 0 {
        out.push_str(&format!(
            "THIS NODE'S CLOCK is {} off from the majority's; its proposals carry the corrected time (fix its clock)\n",
            signed_seconds(-correction)
        ));
    }
    let members = status["members"].as_object().filter(|m| !m.is_empty());
    match members {
        Some(members) => {
            out.push_str("members:\n");
            for (id, addr) in members {
                out.push_str(&member_line(status, id, addr.as_str().unwrap_or("?")));
            }
        }
        None => out.push_str(&not_formed(status)),
    }
    out.push_str(
        "group  partition  role       leader  term  last-log  applied  voters      elections (taken over)  lag\n",
    );
    for g in status["groups"].as_array().into_iter().flatten() {
        let list = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let lag = g["lag"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, n)| format!("{id}:{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_string(),
            other => other.to_string(),
        };
        let partition = if g["partition"].is_null() {
            "meta".to_string()
        } else {
            text(&g["partition"])
        };
        // Elections this node called, and how many of them took over a partition its leader
        // handed back.
        let elections = format!(
            "{} ({})",
            text(&g["elections_called"]),
            text(&g["takeovers"])
        );
        out.push_str(&format!(
            "{:<6} {:<10} {:<10} {:<7} {:<5} {:<9} {:<8} {:<11} {:<23} {}\n",
            text(&g["group"]),
            partition,
            text(&g["role"]),
            text(&g["leader"]),
            text(&g["term"]),
            text(&g["last_log_index"]),
            text(&g["applied_index"]),
            list(&g["voters"]),
            elections,
            lag
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_init_prints_the_members_in_id_order() {
        let body = json!({
            "status": "formed",
            "members": { "10": "h:10", "2": "h:2", "1": "h:1" },
        });
        assert_eq!(
            render_formed(&body),
            "formed: members 1 at h:1, 2 at h:2, 10 at h:10"
        );
    }

    #[test]
    fn a_removal_that_leaves_fewer_than_three_members_warns() {
        assert_eq!(failure_tolerance_warning(&[1, 2, 4]), None);
        assert_eq!(failure_tolerance_warning(&[1, 2, 3, 4]), None);
        assert_eq!(
            failure_tolerance_warning(&[1, 2]).unwrap(),
            "the cluster has 2 members left (nodes 1 and 2), fewer than the 3 needed to survive a failure: it has no failure tolerance now (each partition needs both to commit, so losing either one stops durable publishes); join nodes with `herald cluster join` until it has 3 members again"
        );
        let one = failure_tolerance_warning(&[5]).unwrap();
        assert!(
            one.starts_with("the cluster has 1 member left (node 5), ")
                && one.contains("no failure tolerance"),
            "{one}"
        );
    }

    #[test]
    fn the_status_table_shows_elections_and_hand_backs() {
        let status = serde_json::json!({
            "node": 1, "formed": true, "epoch": "e1",
            "members": { "1": "127.0.0.1:7001", "2": "127.0.0.1:7002", "3": "127.0.0.1:7003" },
            "links": {
                "2": { "state": "connected", "rttUs": 420, "failedDials": 0, "lastError": null,
                       "datagrams": { "sent": 9000, "received": 8990, "lost": 12 } },
                "3": { "state": "unreachable", "rttUs": null, "failedDials": 4,
                       "lastError": "no connection to 127.0.0.1:7003 within 1s" }
            },
            "groups": [
                { "group": 0, "partition": null, "role": "leader", "leader": 1, "term": 3,
                  "last_log_index": 9, "applied_index": 9, "voters": [1, 2],
                  "elections_called": 2, "takeovers": 0, "lag": { "2": 0 } },
                { "group": 1, "partition": 0, "role": "leader", "leader": 1, "term": 4,
                  "last_log_index": 20, "applied_index": 20, "voters": [1, 2],
                  "elections_called": 1, "takeovers": 1, "lag": {} }
            ]
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[2], "  1  127.0.0.1:7001  this node", "{table}");
        assert_eq!(
            lines[3], "  2  127.0.0.1:7002  connected, rtt 0.4 ms, 12 of 9000 packets lost",
            "{table}"
        );
        assert_eq!(
            lines[4],
            "  3  127.0.0.1:7003  UNREACHABLE (4 failed dials): no connection to 127.0.0.1:7003 within 1s",
            "{table}"
        );
        assert!(lines[5].contains("elections"), "{table}");
        assert!(lines[6].starts_with("0      meta"), "{table}");
        assert!(
            lines[6].contains(" 2 (0) ") && lines[6].ends_with("2:0"),
            "{table}"
        );
        assert!(lines[7].contains(" 1 (1) "), "{table}");
    }

    #[test]
    fn a_node_not_formed_yet_shows_what_it_waits_for_itself_and_its_peers() {
        let status = |node: u64, peers: Value, expect: u64, links: Value| {
            serde_json::json!({
                "node": node, "formed": false, "epoch": null, "advertise": format!("h{node}:7000"),
                "peers": peers, "bootstrap_expect": expect, "members": {}, "links": links,
                "groups": []
            })
        };
        let connected = serde_json::json!({ "state": "connected", "rttUs": 900 });
        let down = serde_json::json!({ "state": "unreachable", "failedDials": 2,
                                       "lastError": "no connection to h3:7000 within 2s" });
        let peers = serde_json::json!({ "1": "h1:7000", "3": "h3:7000" });
        let links = serde_json::json!({ "1": connected, "3": down });
        let table = render_status(&status(2, peers.clone(), 3, links.clone()));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[1],
            "not formed yet: node 1 forms the cluster once 3 of these nodes answer (--bootstrap-expect 3); this node reaches 2 of them (itself included)",
            "{table}"
        );
        assert_eq!(
            lines[2], "members: none yet; the peers this node was started with (--peers):",
            "{table}"
        );
        assert_eq!(lines[3], "  1  h1:7000  connected, rtt 0.9 ms", "{table}");
        assert_eq!(lines[4], "  2  h2:7000  this node", "{table}");
        assert_eq!(
            lines[5],
            "  3  h3:7000  UNREACHABLE (2 failed dials): no connection to h3:7000 within 2s",
            "{table}"
        );
        let peers = serde_json::json!({ "2": "h2:7000", "3": "h3:7000" });
        let table = render_status(&status(1, peers, 3, serde_json::json!({})));
        assert!(
            table.contains("this node forms the cluster once 3 of these nodes answer (--bootstrap-expect 3); it reaches 1 of them (itself included)")
                && table.contains("  2  h2:7000  no link\n"),
            "{table}"
        );
        let table = render_status(&status(2, peers_of(&[1]), 0, serde_json::json!({})));
        assert!(
            table.contains("waiting for `herald cluster init`")
                && table
                    .contains("`herald cluster join --node-id 2 --addr h2:7000` through a member"),
            "{table}"
        );
        let table = render_status(&status(4, serde_json::json!({}), 0, serde_json::json!({})));
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("not formed yet: waiting to be joined"),
            "{table}"
        );
        assert_eq!(lines[2], "members: none yet; no --peers", "{table}");
        assert_eq!(lines[3], "  4  h4:7000  this node", "{table}");

        // Out of a cluster that exists: said first, instead of what a formation waits for.
        let mut out = status(3, peers_of(&[1, 2]), 2, serde_json::json!({}));
        out["left_out"] = "the cluster was formed without this node (...)".into();
        let table = render_status(&out);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[1], "LEFT OUT: the cluster was formed without this node (...)",
            "{table}"
        );
    }

    fn peers_of(ids: &[u64]) -> Value {
        Value::Object(
            ids.iter()
                .map(|id| (id.to_string(), Value::from(format!("h{id}:7000"))))
                .collect(),
        )
    }

    #[test]
    fn the_status_table_shows_clocks_off_from_the_majority() {
        let link = |offset: i64| {
            serde_json::json!({ "state": "connected", "rttUs": 400, "failedDials": 0,
                                "lastError": null, "clockOffsetMs": offset })
        };
        // Node 3 is an hour ahead of nodes 1 and 2.
        let on_1 = serde_json::json!({
            "node": 1, "formed": true, "epoch": "e1", "clock_correction_ms": 0,
            "members": { "1": "a:1", "2": "a:2", "3": "a:3" },
            "links": { "2": link(20), "3": link(3_600_000) },
            "groups": []
        });
        let table = render_status(&on_1);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[3], "  2  a:2  connected, rtt 0.4 ms", "{table}");
        assert_eq!(
            lines[4], "  3  a:3  connected, rtt 0.4 ms, CLOCK +3600.0 s off",
            "{table}"
        );
        let on_3 = serde_json::json!({
            "node": 3, "formed": true, "epoch": "e1", "clock_correction_ms": -3_600_010,
            "members": { "1": "a:1", "2": "a:2", "3": "a:3" },
            "links": { "1": link(-3_600_000), "2": link(-3_600_020) },
            "groups": []
        });
        let table = render_status(&on_3);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("THIS NODE'S CLOCK is +3600.0 s off"),
            "{table}"
        );
        assert_eq!(lines[3], "  1  a:1  connected, rtt 0.4 ms", "{table}");
        assert_eq!(lines[4], "  2  a:2  connected, rtt 0.4 ms", "{table}");
    }

    /// A member the meta group holds as a learner (joined, never answered) is marked so.
    #[test]
    fn the_status_table_marks_a_member_that_is_no_voter_yet() {
        let link = serde_json::json!({ "state": "connected", "rttUs": 400 });
        let status = serde_json::json!({
            "node": 1, "formed": true, "epoch": "e1", "clock_correction_ms": 0,
            "members": { "1": "a:1", "2": "a:2", "9": "a:9" },
            "links": { "2": link },
            "groups": [{ "group": 0, "role": "leader", "voters": [1, 2], "learners": [9] }]
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[3], "  2  a:2  connected, rtt 0.4 ms", "{table}");
        assert_eq!(
            lines[4], "  9  a:9  no link, LEARNER (not a voter yet)",
            "{table}"
        );
    }

    /// A member connected but answering nothing is shown as such, with how long.
    #[test]
    fn the_status_table_shows_a_silent_member() {
        let status = serde_json::json!({
            "node": 1, "formed": true, "epoch": "e1", "clock_correction_ms": 0,
            "members": { "1": "a:1", "2": "a:2" },
            "links": { "2": { "state": "silent", "rttUs": 400, "failedDials": 0,
                              "lastError": "it has answered no call for 1.4 s (down, paused or cut off?)" } },
            "groups": []
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[3],
            "  2  a:2  SILENT: it has answered no call for 1.4 s (down, paused or cut off?)",
            "{table}"
        );
    }

    /// A node removed from the cluster says so first: the rest is what it last knew.
    #[test]
    fn the_status_table_of_a_removed_node_says_it_was_removed() {
        let status = serde_json::json!({
            "node": 2, "advertise": "a:2", "formed": true, "epoch": "e1",
            "clock_correction_ms": 0, "removed": true,
            "members": { "1": "a:1", "2": "a:2" }, "links": {}, "groups": []
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("REMOVED: this node was removed from the cluster;")
                && lines[1].contains("`herald cluster join --node-id 2 --addr a:2`"),
            "{table}"
        );
    }

    /// In a rolling upgrade: the header names this node's build, and a member line the
    /// member's where it differs.
    #[test]
    fn the_status_table_shows_the_members_that_run_another_build() {
        let link = |build: &str| {
            serde_json::json!({ "state": "connected", "rttUs": 400, "failedDials": 0,
                                "lastError": null, "build": build })
        };
        let status = serde_json::json!({
            "node": 1, "formed": true, "epoch": "e1", "clock_correction_ms": 0,
            "build": "0.1.0 (commit new)",
            "members": { "1": "a:1", "2": "a:2", "3": "a:3" },
            "links": { "2": link("0.1.0 (commit new)"), "3": link("0.1.0 (commit old)") },
            "groups": []
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0], "node 1  formed: true  epoch: e1  build: 0.1.0 (commit new)",
            "{table}"
        );
        assert_eq!(lines[3], "  2  a:2  connected, rtt 0.4 ms", "{table}");
        assert_eq!(
            lines[4], "  3  a:3  connected, rtt 0.4 ms, BUILD 0.1.0 (commit old)",
            "{table}"
        );
    }

    /// On a node whose store its members refuse (restored from a backup): each such member
    /// says so, and why.
    #[test]
    fn the_status_table_shows_the_members_that_refuse_this_node() {
        let why = "node 2 refuses it (node 3: its data directory went back in time ...)";
        let status = serde_json::json!({
            "node": 3, "formed": true, "epoch": "e1", "clock_correction_ms": 0,
            "build": "b", "members": { "1": "a:1", "2": "a:2", "3": "a:3" },
            "links": {
                "1": { "state": "connected", "rttUs": 400, "failedDials": 0, "lastError": null },
                "2": { "state": "refuses this node", "rttUs": 400, "failedDials": 0,
                       "lastError": why },
            },
            "groups": []
        });
        let table = render_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[2], "  1  a:1  connected, rtt 0.4 ms", "{table}");
        assert_eq!(
            lines[3],
            format!("  2  a:2  REFUSES THIS NODE: {why}"),
            "{table}"
        );
    }
}
