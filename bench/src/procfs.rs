//! What `/proc` says about a server process on the same machine: resident memory, CPU time and
//! bytes written to storage. Used to put a server's own cost next to the client's figures.

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux port
/// herald runs on).
const TICKS_PER_S: f64 = 100.0;

/// A snapshot of one process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// Resident set size, in bytes (`VmRSS`).
    pub rss: u64,
    /// User + system CPU time so far, in seconds.
    pub cpu_s: f64,
    /// Bytes the process caused to be sent to storage (`write_bytes` of `/proc/<pid>/io`).
    pub write_bytes: u64,
}

impl ProcSample {
    /// Reads the counters of `pid`.
    pub fn read(pid: u32) -> anyhow::Result<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status (is the process running?)"))?;
        let rss = vm_rss(&status).context("no VmRSS in /proc/<pid>/status")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        let cpu_s = cpu_ticks(&stat).context("malformed /proc/<pid>/stat")? as f64 / TICKS_PER_S;
        // Reading another user's io file needs privileges; the rest still works without it.
        let write_bytes = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| field(&io, "write_bytes:"))
            .unwrap_or(0);
        Ok(ProcSample {
            rss,
            cpu_s,
            write_bytes,
        })
    }

    /// What changed from `earlier` to `self`.
    pub fn since(&self, earlier: &ProcSample) -> ProcDelta {
        ProcDelta {
            rss: self.rss as i64 - earlier.rss as i64,
            cpu_s: self.cpu_s - earlier.cpu_s,
            write_bytes: self.write_bytes.saturating_sub(earlier.write_bytes),
        }
    }
}

/// The change of a process's counters over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcDelta {
    /// Change in resident memory, in bytes.
    pub rss: i64,
    /// CPU seconds used.
    pub cpu_s: f64,
    /// Bytes sent to storage.
    pub write_bytes: u64,
}

/// The value of a `Name: number [kB]` line, in bytes when the unit is kB.
fn field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut parts = line[name.len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    Some(match parts.next() {
        Some("kB") => value * 1024,
        _ => value,
    })
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
pub fn vm_rss(status: &str) -> Option<u64> {
    field(status, "VmRSS:")
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name come state (field 3), ..., utime (field 14) and stime (field 15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's network counters (`/proc/net/snmp`): UDP datagrams and TCP segments sent by
/// every process. Between co-located servers on loopback, each is also received once, and
/// each costs a system call, a wake-up and (for QUIC) a decryption: a run's packets per
/// acknowledged publish show what a protocol change saves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetSample {
    /// `Udp: OutDatagrams`.
    pub udp_out: u64,
    /// `Tcp: OutSegs`.
    pub tcp_out: u64,
}

impl NetSample {
    /// Reads the counters; `None` where `/proc/net/snmp` is missing or unreadable.
    pub fn read() -> Option<NetSample> {
        let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
        Self::parse(&snmp)
    }

    fn parse(snmp: &str) -> Option<NetSample> {
        Some(NetSample {
            udp_out: snmp_field(snmp, "Udp:", "OutDatagrams")?,
            tcp_out: snmp_field(snmp, "Tcp:", "OutSegs")?,
        })
    }

    /// What was sent from `earlier` to `self`.
    pub fn since(&self, earlier: &NetSample) -> NetSample {
        NetSample {
            udp_out: self.udp_out.saturating_sub(earlier.udp_out),
            tcp_out: self.tcp_out.saturating_sub(earlier.tcp_out),
        }
    }
}

/// A value of `/proc/net/snmp`, where a `Proto: Name Name ...` header line is followed by a
/// `Proto: value value ...` line.
fn snmp_field(snmp: &str, proto: &str, name: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
    let header = lines.next()?;
    let values = lines.next()?;
    let column = header.split_whitespace().position(|h| h == name)?;
    values.split_whitespace().nth(column)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\therald\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(vm_rss(status), Some(2048 * 1024));
        assert_eq!(vm_rss("Name: x\n"), None);
        let stat = "42 (odd ) name) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(field("write_bytes: 4096\n", "write_bytes:"), Some(4096));
    }

    #[test]
    fn reads_this_process() {
        let sample = ProcSample::read(std::process::id()).unwrap();
        assert!(sample.rss > 0);
        assert!(sample.cpu_s >= 0.0);
    }

    #[test]
    fn parses_network_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin ActiveOpens OutSegs\nTcp: 1 200 7 4242\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams\nUdp: 10 0 0 99\n";
        let sample = NetSample::parse(snmp).unwrap();
        assert_eq!(
            sample,
            NetSample {
                udp_out: 99,
                tcp_out: 4242
            }
        );
        let later = NetSample {
            udp_out: 150,
            tcp_out: 5000,
        };
        assert_eq!(
            later.since(&sample),
            NetSample {
                udp_out: 51,
                tcp_out: 758
            }
        );
        assert_eq!(NetSample::parse("Udp: OutDatagrams\n"), None);
    }
}
