//! # herald-tests
//!
//! The integration-test harness: real `herald` processes on loopback, real `redis-server`
//! processes as the reference implementation, and a raw RESP connection for byte-exact checks.
//! The tests themselves live in `tests/`, one file per user-visible concern.
//!
//! Nodes bind port 0 and the harness reads the bound addresses from the node's start-up log,
//! so tests run in parallel without port clashes. Every process is killed when its handle drops.

pub mod cluster;
pub mod ports;
pub mod relay;
pub mod stalled_disk;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the harness waits for anything (start-up, a reply, an exit) before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A `redis` crate connection that waits for replies as long as the tests do: a pipeline of
/// durable publishes waits for the log's `fdatasync`, which on a loaded machine can take
/// longer than redis-rs's default 500 ms response timeout.
pub async fn patient_connection(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(PATIENCE)),
        )
        .await
        .unwrap()
}

/// The `herald` binary under test: `HERALD_BIN` when set (as `scripts/test` does), otherwise
/// this workspace's, built once per test process with the profile the tests were built with.
pub fn herald_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("HERALD_BIN") {
                return PathBuf::from(path);
            }
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target profile directory")
                .to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "herald", "--bin", "herald"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("run cargo build for the herald binary");
            assert!(status.success(), "building the herald binary failed");
            profile_dir.join("herald")
        })
        .clone()
}

/// A fresh, empty directory under the system temp dir, removed by [`Herald`]'s drop.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("herald-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A running herald node.
pub struct Herald {
    child: Option<Child>,
    /// The Redis-protocol address.
    pub resp: SocketAddr,
    /// The HTTP address.
    pub http: SocketAddr,
    /// The node's data directory.
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Herald {
    /// Starts a node with default settings on free ports.
    pub fn start() -> Herald {
        Herald::start_with(&[])
    }

    /// Starts a node with extra `herald serve` arguments.
    pub fn start_with(args: &[&str]) -> Herald {
        Herald::start_configured(args, &[])
    }

    /// Starts a node with extra `herald serve` arguments and environment variables.
    pub fn start_configured(args: &[&str], envs: &[(&str, &str)]) -> Herald {
        Herald::start_in(scratch_dir("node"), args, envs)
    }

    /// Starts a node on an existing data directory (a restart after [`Herald::kill_keeping_data`]).
    pub fn start_in(data_dir: PathBuf, args: &[&str], envs: &[(&str, &str)]) -> Herald {
        Herald::launch(Command::new(herald_binary()), data_dir, args, envs, true)
    }

    /// Starts a node and closes the read end of its stderr once it has logged its addresses,
    /// as `herald serve 2>&1 | head` does: its later log lines have no reader.
    /// [`Herald::log`] then holds only what came before.
    pub fn start_closing_log(args: &[&str]) -> Herald {
        let command = Command::new(herald_binary());
        Herald::launch(command, scratch_dir("node"), args, &[], false)
    }

    /// Starts a node whose process may not write any file past `kib` KiB (`ulimit -f`, with
    /// `SIGXFSZ` ignored so that such a write fails with `EFBIG` instead of killing it): a
    /// full disk, as far as the node can tell, without privileges or a real disk to fill.
    pub fn start_with_file_size_limit(data_dir: PathBuf, kib: u64, args: &[&str]) -> Herald {
        let mut bash = Command::new("bash");
        bash.args(["-c", r#"trap '' XFSZ; ulimit -f "$0"; exec "$@""#])
            .arg(kib.to_string())
            .arg(herald_binary());
        Herald::launch(bash, data_dir, args, &[], true)
    }

    /// Runs `command` followed by `serve` and the node's arguments, and waits until it serves.
    /// Without `keep_log`, its stderr is closed once it has logged its addresses.
    fn launch(
        mut command: Command,
        data_dir: PathBuf,
        args: &[&str],
        envs: &[(&str, &str)],
        keep_log: bool,
    ) -> Herald {
        command
            .arg("serve")
            .args([
                "--resp-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--log",
                "info",
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn herald");
        let stderr = child.stderr.take().expect("herald stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let (mut resp, mut http) = (None, None);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("RESP (Redis protocol) listening") {
                    resp = address_in(&line);
                } else if line.contains("HTTP listening") {
                    http = address_in(&line);
                }
                let started = resp.is_some() && http.is_some();
                if let (Some(r), Some(h)) = (resp, http) {
                    let _ = tx.send((r, h));
                    resp = None;
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
                if started && !keep_log {
                    break; // drops the pipe's read end
                }
            }
        });
        let (resp, http) = match rx.recv_timeout(PATIENCE) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("herald did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        let node = Herald {
            child: Some(child),
            resp,
            http,
            data_dir,
            log,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        // A reply to a PING, not just an accepted connect: the probe is then registered as a
        // client before the test starts, so a test that waits for it to leave (CLIENT LIST,
        // maxclients) cannot see it arrive later.
        while !Self::answers_ping(self.resp) {
            assert!(Instant::now() < deadline, "herald RESP port never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a RESP server at `addr` answers an inline PING (any reply, `-NOAUTH` included,
    /// but not the `-LOADING` of a node that is still opening its store).
    fn answers_ping(addr: SocketAddr) -> bool {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(PATIENCE));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => reply.push(byte[0]),
                _ => return false,
            }
        }
        !reply.starts_with(b"-LOADING")
    }

    /// `redis://` URL of the node (RESP2), for the `redis` crate.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.resp)
    }

    /// Everything the node logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` (e.g. "TERM") to the node.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// `kill -9`s the node and returns its data directory, which is kept for a restart.
    pub fn kill_keeping_data(mut self) -> PathBuf {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::mem::take(&mut self.data_dir)
    }

    /// Base URL of the HTTP surface.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.data_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Writes a herald config file into a fresh scratch directory and returns its path.
pub fn config_file(contents: &str) -> PathBuf {
    let path = scratch_dir("config").join("herald.toml");
    std::fs::write(&path, contents).expect("write config");
    path
}

fn address_in(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + 5;
    line[start..].split_whitespace().next()?.parse().ok()
}

/// A free loopback port claimed for this test (see [`ports`]).
pub fn free_port() -> u16 {
    ports::claim_port()
}

/// A real `redis-server`, the reference herald's replies are compared with.
pub struct RedisServer {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with `extra` configuration lines.
    pub fn start(extra: &[&str]) -> RedisServer {
        let dir = scratch_dir("redis");
        let port = free_port();
        let mut config = format!(
            "port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {}\n",
            dir.display()
        );
        for line in extra {
            config.push_str(line);
            config.push('\n');
        }
        let path = dir.join("redis.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("redis-server")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed as the reference implementation: install it (apt-get install redis-server), as .ci/run does");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, addr, dir }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw RESP connection for byte-exact conversations.
pub struct RawConn {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends a command as a RESP multibulk request.
    pub fn command(&mut self, args: &[&[u8]]) {
        self.send(&encode_command(args));
    }

    /// Reads until the received bytes end with `suffix`; returns them (and clears the buffer).
    pub fn read_until_suffix(&mut self, suffix: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + PATIENCE;
        while !self.buffer.ends_with(suffix) {
            assert!(
                Instant::now() < deadline,
                "no reply ending in {:?}; got {:?}",
                String::from_utf8_lossy(suffix),
                String::from_utf8_lossy(&self.buffer)
            );
            self.read_more();
        }
        std::mem::take(&mut self.buffer)
    }

    /// Appends what the connection has next to the buffer; panics (with what was received)
    /// when it closes or fails.
    fn read_more(&mut self) {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed; got {:?}",
                String::from_utf8_lossy(&self.buffer)
            ),
            Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "read failed ({e}); got {:?}",
                String::from_utf8_lossy(&self.buffer)
            ),
        }
    }

    /// Reads until the received bytes hold `needle`; returns them up to and including its
    /// first occurrence, and keeps what follows for the next read.
    pub fn read_through(&mut self, needle: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(at) = self.buffer.windows(needle.len()).position(|w| w == needle) {
                return self.buffer.drain(..at + needle.len()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "nothing holding {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.buffer)
            );
            self.read_more();
        }
    }

    /// Reads until the server closes the connection; returns everything received.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
        self.buffer.extend_from_slice(&rest);
        std::mem::take(&mut self.buffer)
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buffer.len() < n {
            self.read_more();
        }
        self.buffer.drain(..n).collect()
    }

    /// Reads exactly one RESP value (of any type, nested ones included) and returns its bytes.
    pub fn read_frame(&mut self) -> Vec<u8> {
        let mut frame = Vec::new();
        self.read_value_into(&mut frame);
        frame
    }

    fn read_line_into(&mut self, out: &mut Vec<u8>) -> Vec<u8> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                out.extend_from_slice(&line);
                return line[..line.len() - 2].to_vec();
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed after {:?}", String::from_utf8_lossy(out)),
                Ok(k) => self.buffer.extend_from_slice(&chunk[..k]),
                Err(e) => panic!("read failed ({e}) after {:?}", String::from_utf8_lossy(out)),
            }
        }
    }

    fn read_value_into(&mut self, out: &mut Vec<u8>) {
        let line = self.read_line_into(out);
        let count = || {
            String::from_utf8_lossy(&line[1..])
                .parse::<i64>()
                .unwrap_or(-1)
        };
        match line.first() {
            Some(b'$') | Some(b'=') | Some(b'!') if count() >= 0 => {
                let data = self.read_exact(count() as usize + 2);
                out.extend_from_slice(&data);
            }
            Some(b'*') | Some(b'>') | Some(b'~') => {
                for _ in 0..count().max(0) {
                    self.read_value_into(out);
                }
            }
            Some(b'%') => {
                for _ in 0..2 * count().max(0) {
                    self.read_value_into(out);
                }
            }
            _ => {}
        }
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Parses one `hmessage` frame (`HSUBSCRIBE`'s messages, RESP2 array or RESP3 push) into
/// (channel, cursor, payload).
pub fn parse_hmessage(frame: &[u8]) -> (String, String, String) {
    let value = redis::parse_redis_value(frame).expect("a RESP value");
    // The redis crate splits a RESP3 push into its kind and the rest.
    let items: Vec<redis::Value> = match value {
        redis::Value::Array(items) => items,
        redis::Value::Push { kind, data } => {
            assert_eq!(kind, redis::PushKind::Other("hmessage".into()));
            [vec![redis::Value::BulkString(b"hmessage".to_vec())], data].concat()
        }
        other => panic!("not an hmessage: {other:?}"),
    };
    let items: Vec<String> = items
        .into_iter()
        .map(|v| redis::from_redis_value(v).unwrap())
        .collect();
    assert_eq!(items[0], "hmessage", "{items:?}");
    (items[1].clone(), items[2].clone(), items[3].clone())
}

/// Encodes a command as a RESP multibulk request.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `herald serve` with its RESP and HTTP listeners on ephemeral ports; a test adds its own
/// flags.
pub fn serve_on_ephemeral_ports() -> std::process::Command {
    let mut command = std::process::Command::new(herald_binary());
    command.args([
        "serve",
        "--resp-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    command
}

/// Runs `herald serve` with `args` (the listeners on ephemeral ports added), expecting it to
/// refuse to start: waits for it to exit (killing it after the patience), and returns its exit
/// status (`None`: it kept running) and what it wrote on stderr.
pub async fn serve_expecting_refusal<I, S>(args: I) -> (Option<std::process::ExitStatus>, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    serve_expecting_refusal_with_env(args, &[]).await
}

/// [`serve_expecting_refusal`] with environment variables `envs` (`(name, value)`) set.
pub async fn serve_expecting_refusal_with_env<I, S>(
    args: I,
    envs: &[(&str, &str)],
) -> (Option<std::process::ExitStatus>, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut child = serve_on_ephemeral_ports()
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run herald serve");
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Polls `condition` until it holds or [`PATIENCE`] runs out; panics with `what` then.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Posts `body` (one event or an array of them) to the node's `POST /api/publish`, requires a
/// 200 and returns the reply: what every HTTP publisher in the tests does.
pub async fn publish_http(node: &Herald, body: &serde_json::Value) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{}/api/publish", node.http_url()))
        .json(body)
        .send()
        .await
        .expect("publish request");
    assert_eq!(response.status(), 200, "publish refused");
    response.json().await.expect("publish reply is JSON")
}

/// Posts `body` as written (malformed or odd JSON included) to the node's
/// `POST /api/publish` and returns the response, whatever its status: what the tests of
/// refused bodies and exact payload bytes need.
pub async fn publish_raw(node: &Herald, body: impl Into<reqwest::Body>) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/api/publish", node.http_url()))
        .body(body)
        .send()
        .await
        .expect("publish request")
}

/// A channel's retained payloads on `node`, oldest first (`HISTORY` over RESP, which returns
/// `[cursor, payload]` pairs).
pub async fn history_payloads(node: &Herald, channel: &str) -> Vec<String> {
    try_history_payloads(node, channel).await.unwrap()
}

/// [`history_payloads`], or the error `HISTORY` answered (a node refused by its cluster, or
/// behind it, says so).
pub async fn try_history_payloads(node: &Herald, channel: &str) -> Result<Vec<String>, String> {
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = patient_connection(&client).await;
    let events: Vec<(String, String)> = redis::cmd("HISTORY")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(events.into_iter().map(|(_, payload)| payload).collect())
}

/// Awaits `read` until it returns `want`, for at most twice [`PATIENCE`]; panics naming `what`
/// and the last value read. For conditions that need async reads (a node catching up).
pub async fn eventually_equal<T, F, Fut>(what: &str, want: &T, mut read: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let got = read().await;
        if got == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
