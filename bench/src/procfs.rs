//! A process seen through Linux's `/proc`: the server's resident memory, descriptors, threads
//! and CPU time, the process listening on a port, and this process's open-file budget.

use serde::Serialize;

/// Resident memory of `pid` in KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// CPU time (user + system) of `pid`, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; clock ticks of
    // USER_HZ, which is 100 on every Linux ABI.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The CPU time the server and this tool spend over a measured window.
pub(crate) struct CpuWindow {
    server_pid: Option<u32>,
    server_start: Option<f64>,
    self_start: Option<f64>,
}

impl CpuWindow {
    pub(crate) fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            server_start: server_pid.and_then(cpu_seconds),
            self_start: cpu_seconds(std::process::id()),
        }
    }

    /// Seconds of CPU since [`CpuWindow::start`]: (server, this tool).
    pub(crate) fn spent(&self) -> (Option<f64>, Option<f64>) {
        let server = self
            .server_pid
            .and_then(cpu_seconds)
            .zip(self.server_start)
            .map(|(b, a)| b - a);
        let own = cpu_seconds(std::process::id())
            .zip(self.self_start)
            .map(|(b, a)| b - a);
        (server, own)
    }
}

/// The sockets listening on TCP `port` (any address), as `socket:[inode]` links.
fn listening_sockets(port: u16) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && lport == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    inodes
}

/// The process listening on TCP `port` (any address), found through /proc/net/tcp{,6} and the
/// processes' descriptors. Only processes of this user are visible, which is the usual case.
pub(crate) fn find_listening_pid(port: u16) -> Option<u32> {
    let inodes = listening_sockets(port);
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// What a server process looked like at one moment.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct ProcSample {
    pub(crate) rss_kib: Option<u64>,
    pub(crate) fds: Option<u64>,
    pub(crate) threads: Option<u64>,
    pub(crate) cpu_s: Option<f64>,
}

impl ProcSample {
    pub(crate) fn of(pid: Option<u32>) -> Self {
        let Some(pid) = pid else {
            return Self::default();
        };
        Self {
            rss_kib: rss_kib(pid),
            fds: fd_count(pid),
            threads: status_field(pid, "Threads:"),
            cpu_s: cpu_seconds(pid),
        }
    }
}

/// Most descriptors one process may use for connections: the hard limit here is 20,000 and
/// cannot be raised; the rest is left for the runtime, stdio and the odd HTTP request.
pub(crate) fn fd_budget() -> u64 {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(1024);
    limit.saturating_sub(200).max(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_read() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() > 0);
        assert!(cpu_seconds(me).is_some());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(find_listening_pid(l.local_addr().unwrap().port()), Some(me));
    }
}
