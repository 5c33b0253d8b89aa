//! A minimal RESP2 client: enough for `HPUBLISH`, `HSUBSCRIBE`, `HISTORY` and `AUTH`, with
//! exact control of timeouts, so a publish's outcome can be classified (refused before sending
//! = certainly not committed; sent and then no reply = unknown).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+text`.
    Simple(String),
    /// `-text`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bulk string (`None`: the null bulk).
    Bulk(Option<Vec<u8>>),
    /// `*n` array or `>n` push (`None`: the null array).
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(Some(b)) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// The text of a bulk or simple string (lossy).
    pub fn text(&self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The items of an array.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Array(Some(items)) => Some(items),
            _ => None,
        }
    }
}

/// One RESP connection.
pub struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Connection {
    /// Connects within `timeout`, authenticating with `password` when given.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        password: Option<&str>,
    ) -> Result<Connection> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut connection = Connection {
            reader: BufReader::new(read),
            writer: write,
        };
        if let Some(password) = password {
            let reply = tokio::time::timeout(
                timeout,
                connection.request(&[b"AUTH".as_slice(), password.as_bytes()]),
            )
            .await
            .map_err(|_| anyhow!("AUTH on {addr} timed out"))??;
            if let Value::Error(e) = reply {
                bail!("AUTH on {addr}: {e}");
            }
        }
        Ok(connection)
    }

    /// Sends one command.
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<()> {
        self.writer.write_all(&encode(args)).await?;
        Ok(())
    }

    /// Sends one command and reads one reply.
    pub async fn request(&mut self, args: &[&[u8]]) -> Result<Value> {
        self.send(args).await?;
        self.read().await
    }

    /// Reads the next value (a reply or a pushed message).
    pub async fn read(&mut self) -> Result<Value> {
        read_value(&mut self.reader).await
    }

    /// Splits the connection so one task can read while another writes (a subscriber pinging).
    pub fn into_split(self) -> (Reader, Writer) {
        (
            Reader {
                reader: self.reader,
            },
            Writer {
                writer: self.writer,
            },
        )
    }
}

/// The reading half of a split [`Connection`].
pub struct Reader {
    reader: BufReader<OwnedReadHalf>,
}

impl Reader {
    /// Reads the next value. Not cancellation-safe: a read abandoned half-way leaves the
    /// connection unusable (callers drop it then).
    pub async fn read(&mut self) -> Result<Value> {
        read_value(&mut self.reader).await
    }
}

/// The writing half of a split [`Connection`].
pub struct Writer {
    writer: OwnedWriteHalf,
}

impl Writer {
    /// Sends one command.
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<()> {
        self.writer.write_all(&encode(args)).await?;
        Ok(())
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_value(
    reader: &mut BufReader<OwnedReadHalf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value>> + Send + '_>> {
    Box::pin(async move {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            bail!("connection closed");
        }
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            bail!("malformed RESP line");
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || -> Result<i64> { text.parse().context("malformed RESP length") };
        Ok(match line[0] {
            b'+' => Value::Simple(text),
            b'-' => Value::Error(text),
            b':' => Value::Int(number()?),
            b'_' => Value::Bulk(None),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    Value::Bulk(None)
                } else {
                    let mut data = vec![0; len as usize + 2];
                    reader.read_exact(&mut data).await?;
                    data.truncate(len as usize);
                    Value::Bulk(Some(data))
                }
            }
            b'*' | b'>' => {
                let len = number()?;
                if len < 0 {
                    Value::Array(None)
                } else {
                    let mut items = Vec::with_capacity(len.min(4096) as usize);
                    for _ in 0..len {
                        items.push(read_value(reader).await?);
                    }
                    Value::Array(Some(items))
                }
            }
            other => bail!("unsupported RESP type byte {:?}", other as char),
        })
    })
}
