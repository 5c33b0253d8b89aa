//! `herald health [--ready]`: asks a node's HTTP port for `/health` (or `/ready`) and exits 0
//! when it answers 200, 1 otherwise. A container built `FROM scratch` has no curl or wget, so
//! its `HEALTHCHECK` runs the binary itself.
//!
//! Plain HTTP/1.1 over a blocking socket: no runtime to start, one request, bounded in time.

use crate::cli::HealthArgs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Runs the probe; prints the node's answer, exit code 1 unless it is a 200.
pub fn run(args: HealthArgs) -> ExitCode {
    let path = if args.ready { "/ready" } else { "/health" };
    let timeout = Duration::from_secs(args.timeout.max(1));
    match probe(&args.http, path, timeout) {
        Ok((200, body)) => {
            say!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            complain!(
                "herald: http://{}{path} answered {status}: {body}",
                args.http
            );
            ExitCode::from(1)
        }
        Err(error) => {
            complain!("herald: http://{}{path}: {error}", args.http);
            ExitCode::from(1)
        }
    }
}

/// One `GET path` to `addr`; the status code and the body (trimmed, at most 64 KiB read).
fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let deadline = Instant::now() + timeout;
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .map(local)
        .collect();
    let mut last_error = format!("{addr} resolves to no address");
    let mut stream = None;
    for target in targets {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = format!("cannot connect to {target}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: herald-health\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut response = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|e| format!("no answer: {e}"))?;
    parse(&response)
}

/// The unspecified address a node listens on (`0.0.0.0`, `[::]`) is reached over loopback.
fn local(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The status code and body of an HTTP/1.x response.
fn parse(response: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", truncate(status_line)))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim())
        .unwrap_or_default();
    Ok((status, truncate(body).to_string()))
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(200) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let (status, body) = parse(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 19\r\n\r\n{\"status\":\"ready\"}\n",
        )
        .unwrap();
        assert_eq!(status, 503);
        assert_eq!(body, "{\"status\":\"ready\"}");
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn unspecified_means_loopback() {
        assert_eq!(
            local("0.0.0.0:8000".parse().unwrap()),
            "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            local("[::]:8000".parse().unwrap()),
            "[::1]:8000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            local("10.0.0.2:8000".parse().unwrap()),
            "10.0.0.2:8000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn probes_a_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = socket.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /ready HTTP/1.1\r\n"));
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap();
        });
        let answer = probe(&addr.to_string(), "/ready", Duration::from_secs(2)).unwrap();
        assert_eq!(answer, (200, "{}".to_string()));
        server.join().unwrap();
    }
}
