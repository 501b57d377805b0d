//! Reading one process's facts from /proc.

use std::path::Path;

use super::cgroup;

#[derive(Debug, Default, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub name: String,
    pub exe: String,
    pub cmdline: Vec<String>,
    /// Unix ns.
    pub start_time: i64,
    pub identity: cgroup::Identity,
    /// The parent's name and executable, while /proc still has it (rules
    /// ask "a shell whose parent is a web server").
    pub parent_name: String,
    pub parent_exe: String,
}

/// The name (comm) and executable of process `ppid`; empty once it is gone
/// or unreadable.
pub fn parent(proc: &Path, ppid: u32) -> (String, String) {
    if ppid == 0 {
        return Default::default();
    }
    let dir = proc.join(ppid.to_string());
    let name = std::fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .map(|(comm, _, _)| comm)
        .unwrap_or_default();
    let exe = std::fs::read_link(dir.join("exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    (name, exe)
}

/// Fields of /proc/<pid>/stat that matter here: (comm, ppid, starttime ticks).
pub fn parse_stat(s: &str) -> Option<(String, u32, u64)> {
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((comm, ppid, start))
}

pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Boot time (unix s) and clock ticks per second, for start times.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub boot_time: u64,
    pub ticks: u64,
}

impl Clock {
    pub fn read(proc: &Path) -> Self {
        let boot_time = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            boot_time,
            ticks: if t > 0 { t as u64 } else { 100 },
        }
    }

    pub fn start_ns(&self, ticks: u64) -> i64 {
        (self.boot_time as i64) * 1_000_000_000
            + (ticks as i64) * (1_000_000_000 / self.ticks as i64)
    }
}

/// Reads what /proc still has for `pid`; None once it is gone.
pub fn read(proc: &Path, pid: u32, clock: &Clock) -> Option<ProcInfo> {
    let dir = proc.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (name, ppid, start) = parse_stat(&stat)?;
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| real_uid(&s))
        .unwrap_or(0);
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| parse_cmdline(&b))
        .unwrap_or_default();
    let exe = std::fs::read_link(dir.join("exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let identity = std::fs::read_to_string(dir.join("cgroup"))
        .map(|s| cgroup::parse(&s))
        .unwrap_or_default();
    let (parent_name, parent_exe) = parent(proc, ppid);
    Some(ProcInfo {
        pid,
        ppid,
        uid,
        name,
        exe,
        cmdline,
        start_time: clock.start_ns(start),
        identity,
        parent_name,
        parent_exe,
    })
}

/// Every process id in /proc.
pub fn pids(proc: &Path) -> Vec<u32> {
    std::fs::read_dir(proc)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_names_its_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let proc = Path::new("/proc");
        let me = read(proc, std::process::id(), &Clock::read(proc)).unwrap();
        let info = read(proc, child.id(), &Clock::read(proc)).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(info.ppid, std::process::id());
        assert_eq!((info.parent_name, info.parent_exe), (me.name, me.exe));
        assert_eq!(parent(proc, 0), (String::new(), String::new()));
    }

    #[test]
    fn stat_with_odd_comm() {
        let s = "4242 (my (weird) proc) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        let (comm, ppid, start) = parse_stat(s).unwrap();
        assert_eq!(comm, "my (weird) proc");
        assert_eq!(ppid, 17);
        assert_eq!(start, 987654);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S").is_none());
    }

    #[test]
    fn cmdline_splits_on_nul() {
        assert_eq!(parse_cmdline(b"sleep\x000.2\x00"), vec!["sleep", "0.2"]);
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn reads_this_process() {
        let clock = Clock::read(Path::new("/proc"));
        let me = read(Path::new("/proc"), std::process::id(), &clock).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.ppid > 0);
        assert!(!me.cmdline.is_empty());
        let now = crate::spool::now_ns();
        assert!(
            me.start_time > 0 && me.start_time <= now,
            "{} vs {now}",
            me.start_time
        );
    }
}
