//! A minimal HTTP/1.0 client for herald's JSON endpoints (`/api/cluster/status`,
//! `/api/publish`): one connection per request, closed by the server after the response, so a
//! request abandoned on timeout leaves nothing behind. Enough for control traffic and the
//! failover publisher; not meant for load.

use anyhow::{Context, bail};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body, as sent.
    pub body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response is not JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as (lossy) text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `addr` (`host:port`) and reads the whole response, all within
/// `timeout`. `body`, when given, is sent as `application/json`.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, exchange(addr, method, path, body))
        .await
        .with_context(|| format!("{method} {path} on {addr}: no response within {timeout:?}"))?
}

/// `GET path` parsed as JSON; fails on a status other than 200.
pub async fn get_json(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<Value> {
    let response = request(addr, "GET", path, None, timeout).await?;
    if response.status != 200 {
        bail!(
            "GET {path} on {addr}: {} {}",
            response.status,
            response.text()
        );
    }
    response.json()
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut out = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n").into_bytes();
    if let Some(body) = body {
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    stream
        .write_all(&out)
        .await
        .context("sending the request")?;
    let mut raw = Vec::with_capacity(1024);
    stream
        .read_to_end(&mut raw)
        .await
        .context("reading the response")?;
    parse(&raw)
}

/// Splits a complete HTTP/1.x response into status and body (identity or chunked encoding).
fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n").context("incomplete response head")?;
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = memchr::memmem::find(data, b"\r\n").context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        anyhow::ensure!(data.len() >= size + 2, "truncated chunk");
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identity_and_chunked_responses() {
        let plain = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!(plain.status, 200);
        assert_eq!(plain.json().unwrap(), serde_json::json!({}));
        let chunked = parse(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.status, 503);
        assert_eq!(chunked.text(), "abcde");
        assert!(parse(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
