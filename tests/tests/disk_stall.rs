//! A node whose disk stops answering: its data directory is a FUSE passthrough
//! (`tests/fixtures/stallfs.py`) whose writes and syncs wait while a flag file exists. Past
//! `--disk-stall-timeout` the node closes its clients' connections (they resume elsewhere),
//! logs why, and exits with status 75 for its supervisor; a restart keeps every acknowledged
//! event.
//!
//! Needs `/dev/fuse`, and Debian's Python with fusepy over libfuse2 (`python3-fusepy`, which
//! `scripts/install-test-deps` installs); on a machine without `/dev/fuse` the test says so and
//! does nothing.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use herald_tests::{Herald, history_payloads, patient_connection, scratch_dir, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(60);

/// A FUSE mount whose writes and syncs wait while [`StalledDisk::stall`] is on.
struct StalledDisk {
    daemon: Child,
    /// The daemon's standard input: it unmounts and exits when this closes, even if this
    /// process is killed before its cleanup.
    lifeline: Option<std::process::ChildStdin>,
    mount: PathBuf,
    flag: PathBuf,
}

impl StalledDisk {
    /// Mounts a passthrough of a fresh directory; `None` without `/dev/fuse`.
    fn mount() -> Option<StalledDisk> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: no /dev/fuse on this machine, so no disk can be stalled");
            return None;
        }
        let dir = scratch_dir("stalled-disk");
        let (root, mount, flag) = (dir.join("root"), dir.join("mnt"), dir.join("STALL"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stallfs.py");
        let mut daemon = Command::new("/usr/bin/python3")
            .arg(script)
            .args([&root, &mount, &flag])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Debian's python3 runs the FUSE passthrough (scripts/install-test-deps)");
        let lifeline = daemon.stdin.take();
        let mut disk = StalledDisk {
            daemon,
            lifeline,
            mount,
            flag,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let mounted = std::fs::read_to_string("/proc/mounts")
                .is_ok_and(|mounts| mounts.contains(disk.mount.to_str().unwrap()));
            if mounted {
                break;
            }
            if let Ok(Some(status)) = disk.daemon.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = disk.daemon.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("the FUSE passthrough did not mount ({status}):\n{stderr}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the FUSE passthrough did not mount in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(disk)
    }

    /// Stalls the disk until the guard returned is dropped (before the node is, on a panic
    /// too: a node waiting on the disk cannot be killed).
    fn stall(&self) -> Unstall {
        std::fs::write(&self.flag, b"").unwrap();
        Unstall(self.flag.clone())
    }
}

/// Lets a stalled disk answer again when dropped.
struct Unstall(PathBuf);

impl Drop for Unstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for StalledDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.flag);
        // Its input closed, the daemon unmounts and exits; SIGTERM and a lazy unmount cover
        // one that did not.
        drop(self.lifeline.take());
        let _ = Command::new("kill")
            .arg(self.daemon.id().to_string())
            .status();
        let _ = self.daemon.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[tokio::test]
async fn a_node_whose_disk_stalls_closes_its_connections_and_exits_for_its_supervisor() {
    let Some(disk) = StalledDisk::mount() else {
        return;
    };
    let data_dir = disk.mount.join("data");
    let mut node = Herald::start_in(data_dir.clone(), &["--disk-stall-timeout", "5s"], &[]);
    let client = redis::Client::open(node.url()).unwrap();
    let mut publisher = patient_connection(&client).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("stall:news")
        .arg("before")
        .query_async(&mut publisher)
        .await
        .unwrap();

    // A browser's stream and a Redis subscriber, both live.
    let response = reqwest::get(format!("{}/api/stream/stall:news?last=1", node.http_url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = Box::pin(response.bytes_stream().eventsource());
    let first = tokio::time::timeout(PATIENCE, sse.next())
        .await
        .expect("the retained event in time")
        .expect("stream open")
        .expect("well-formed SSE");
    assert_eq!(first.data, "before");
    let mut subscriber = client.get_async_pubsub().await.unwrap();
    subscriber.subscribe("stall:news").await.unwrap();

    // The disk stops: the next publish's write waits, and so does the node.
    let stalled = disk.stall();
    let mut stuck = patient_connection(&client).await;
    let stuck_publish = tokio::spawn(async move {
        redis::cmd("PUBLISH")
            .arg("stall:news")
            .arg("during")
            .query_async::<i64>(&mut stuck)
            .await
    });

    // Past the timeout every connection ends: the stream, the subscription and the publish
    // that waited (its outcome unknown to the client, who retries elsewhere).
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = sse.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream was not closed");
    let message = tokio::time::timeout(PATIENCE, subscriber.on_message().next())
        .await
        .expect("the subscription was not closed");
    assert!(message.is_none(), "a message came instead: {message:?}");
    let outcome = tokio::time::timeout(PATIENCE, stuck_publish)
        .await
        .expect("the waiting publish was not answered or closed")
        .unwrap();
    assert!(outcome.is_err(), "the publish succeeded: {outcome:?}");
    wait_until("the node says why it stops", || {
        node.log().contains("the disk has not answered a")
    });
    assert!(
        std::net::TcpStream::connect_timeout(&node.resp, Duration::from_secs(10)).is_err(),
        "the RESP listener still takes connections"
    );

    // Once the disk answers again, the process ends with the watchdog's status.
    drop(stalled);
    let status = node.wait_exit(PATIENCE).expect("the node exited");
    assert_eq!(status.code(), Some(75), "{}\n{}", status, node.log());

    // Restarted by its supervisor, it has every acknowledged event, once.
    drop(node.kill_keeping_data());
    let node = Herald::start_in(data_dir, &[], &[]);
    let history = history_payloads(&node, "stall:news").await;
    assert_eq!(
        history.first().map(String::as_str),
        Some("before"),
        "{history:?}"
    );
    assert!(
        history == ["before"] || history == ["before", "during"],
        "{history:?}"
    );
    drop(node);
    drop(disk);
}
