//! A node whose disk fills up, simulated with a file size limit on its process (`ulimit -f`):
//! the publish that hits the limit fails with the system's reason, later publishes are refused
//! without being written, `/ready` turns 503 while `/health` stays 200, and a restart recovers
//! every acknowledged event, in order, and nothing that was refused.

use herald_tests::{Herald, history_payloads, patient_connection, scratch_dir};

/// Channels the publishes rotate over: enough that no channel passes the default namespace's
/// 100 retained events before 4 MiB of files fill up (about 1 KiB per event).
const CHANNELS: usize = 64;

/// Each channel's retained payloads, oldest first.
async fn histories(node: &Herald) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for channel in 0..CHANNELS {
        all.push(history_payloads(node, &format!("disk:{channel}")).await);
    }
    all
}

async fn get(node: &Herald, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("{}{path}", node.http_url()))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_clearly_and_a_restart_keeps_every_acknowledged_event() {
    let node = Herald::start_with_file_size_limit(scratch_dir("disk-full"), 4096, &[]);
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = patient_connection(&client).await;
    let mut acked = vec![Vec::new(); CHANNELS];
    let mut failed = None;
    for i in 0..CHANNELS * 100 {
        let channel = i % CHANNELS;
        let payload = format!("{i:06}:{}", "x".repeat(1000));
        let reply: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(format!("disk:{channel}"))
            .arg(&payload)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(_) => acked[channel].push(payload),
            Err(error) => {
                failed = Some((channel, payload, error.to_string()));
                break;
            }
        }
    }
    let (failed_channel, failed_payload, error) =
        failed.expect("4 MiB of files fill up before 6,400 events of 1 KiB");
    assert!(
        error.contains("publish failed: storage failed: I/O error: ")
            && error.contains("File too large (os error 27)"),
        "{error}"
    );

    // Later publishes are refused before anything is written, and say so.
    let later: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg("disk:0")
        .arg("refused")
        .query_async(&mut conn)
        .await;
    let later = later.unwrap_err().to_string();
    assert!(later.contains("this publish was not written"), "{later}");
    let http = reqwest::Client::new()
        .post(format!("{}/api/publish", node.http_url()))
        .json(&serde_json::json!({"channel": "disk:0", "data": "refused too"}))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 503);
    let body = http.text().await.unwrap();
    assert!(body.contains("this publish was not written"), "{body}");
    assert!(!body.contains("outcome is unknown"), "{body}");

    // The node stays up and says what is wrong: not ready, still alive.
    let (status, body) = get(&node, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage failed"), "{body}");
    assert_eq!(get(&node, "/health").await.0, 200);
    let (_, stats) = get(&node, "/api/realtime/stats").await;
    assert!(stats.contains("storage failed"), "{stats}");
    let (_, metrics) = get(&node, "/metrics").await;
    for line in [
        "herald_ready 0",
        "herald_storage_failed 1",
        "herald_raft_group_stopped 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // A restart (without the limit) recovers from the write-ahead log: every acknowledged
    // event, in order; the one that failed may or may not be there (its outcome was unknown);
    // the refused ones are not.
    drop(conn);
    let data_dir = node.kill_keeping_data();
    let node = Herald::start_in(data_dir, &[], &[]);
    let after = histories(&node).await;
    for (channel, (got, want)) in after.iter().zip(&acked).enumerate() {
        if channel == failed_channel && got.len() == want.len() + 1 {
            assert_eq!(&got[..want.len()], &want[..], "disk:{channel}");
            assert_eq!(got[want.len()], failed_payload, "disk:{channel}");
        } else {
            assert_eq!(got, want, "disk:{channel}");
        }
    }
    assert!(acked.iter().map(Vec::len).sum::<usize>() > 100);
    // And it takes writes again.
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = patient_connection(&client).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("disk:0")
        .arg("after the restart")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(get(&node, "/ready").await.0, 200);
}
