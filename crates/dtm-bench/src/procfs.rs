//! CPU and memory of a process and of the machine, from /proc (Linux).

use std::sync::OnceLock;

/// Clock ticks per second of /proc CPU times (`getconf CLK_TCK`, normally 100).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime in clock ticks from the text of `/proc/<pid>/stat`.
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    // the command name (field 2) is in parentheses and may contain spaces
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); utime is field 14, stime field 15
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` value of `/proc/<pid>/status`, e.g. `VmRSS` or `VmHWM`, in bytes.
pub fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat_cpu(&s)? as f64 / clk_tck())
}

/// (current RSS, peak RSS) of a process in bytes.
pub fn rss(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((parse_status_kb(&s, "VmRSS")?, parse_status_kb(&s, "VmHWM")?))
}

/// (read syscalls, write syscalls, bytes written to storage) of a process from the text
/// of `/proc/<pid>/io`.
pub fn parse_io(io: &str) -> Option<(u64, u64, u64)> {
    let get = |k: &str| {
        io.lines().find_map(|l| {
            let (a, b) = l.split_once(':')?;
            (a.trim() == k).then(|| b.trim().parse::<u64>().ok())?
        })
    };
    Some((get("syscr")?, get("syscw")?, get("write_bytes")?))
}

/// (busy, total) jiffies of all CPUs from the first line of `/proc/stat`.
pub fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest* are inside user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// A snapshot to diff: process CPU seconds and machine jiffies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snap {
    pub server_cpu: Option<f64>,
    pub server_io: Option<(u64, u64, u64)>,
    pub own_cpu: Option<f64>,
    pub machine: Option<(u64, u64)>,
}

impl Snap {
    pub fn take(server_pid: Option<&str>) -> Snap {
        Snap {
            server_cpu: server_pid.and_then(cpu_seconds),
            server_io: server_pid
                .and_then(|p| parse_io(&std::fs::read_to_string(format!("/proc/{p}/io")).ok()?)),
            own_cpu: cpu_seconds("self"),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_machine(&s)),
        }
    }
}

/// CPU use between two snapshots over `wall` seconds, as percent of one core.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// server process, % of one core (None when the server is not ours to watch)
    pub server_pct: Option<f64>,
    /// server CPU seconds used in the window
    pub server_secs: Option<f64>,
    /// this bench process (load generator + branch simulator), % of one core
    pub bench_pct: Option<f64>,
    /// the whole machine, % of all cores (100 = every core busy)
    pub machine_pct: Option<f64>,
    /// everything else on the machine (other processes, interrupts), % of one core
    pub others_pct: Option<f64>,
    /// server (read syscalls, write syscalls, bytes written to storage) in the window
    pub server_io: Option<(u64, u64, u64)>,
}

/// What changed between two snapshots; deltas of several windows add up, so a phase
/// measured in slices reports its CPU over the slices only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delta {
    pub server_cpu: Option<f64>,
    pub server_io: Option<(u64, u64, u64)>,
    pub own_cpu: Option<f64>,
    /// machine (busy, total) jiffies
    pub machine: Option<(u64, u64)>,
}

fn sub_f(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    }
}

fn add_f(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x + y),
        _ => None,
    }
}

impl Delta {
    pub fn between(a: &Snap, b: &Snap) -> Delta {
        Delta {
            server_cpu: sub_f(a.server_cpu, b.server_cpu),
            server_io: match (a.server_io, b.server_io) {
                (Some(x), Some(y)) => Some((
                    y.0.saturating_sub(x.0),
                    y.1.saturating_sub(x.1),
                    y.2.saturating_sub(x.2),
                )),
                _ => None,
            },
            own_cpu: sub_f(a.own_cpu, b.own_cpu),
            machine: match (a.machine, b.machine) {
                (Some((b0, t0)), Some((b1, t1))) => {
                    Some((b1.saturating_sub(b0), t1.saturating_sub(t0)))
                }
                _ => None,
            },
        }
    }

    /// The sum of two windows (a field unknown in either is unknown).
    pub fn add(&self, o: &Delta) -> Delta {
        Delta {
            server_cpu: add_f(self.server_cpu, o.server_cpu),
            server_io: match (self.server_io, o.server_io) {
                (Some(x), Some(y)) => Some((x.0 + y.0, x.1 + y.1, x.2 + y.2)),
                _ => None,
            },
            own_cpu: add_f(self.own_cpu, o.own_cpu),
            machine: match (self.machine, o.machine) {
                (Some(x), Some(y)) => Some((x.0 + y.0, x.1 + y.1)),
                _ => None,
            },
        }
    }

    /// CPU use over `wall` seconds of measured time.
    pub fn cpu(&self, wall: f64) -> CpuUse {
        let pct = |d: Option<f64>| match d {
            Some(d) if wall > 0.0 => Some(d / wall * 100.0),
            _ => None,
        };
        let server_pct = pct(self.server_cpu);
        let bench_pct = pct(self.own_cpu);
        let others_pct = match self.machine {
            Some((busy, _)) if wall > 0.0 => {
                let busy = busy as f64 / clk_tck() / wall * 100.0;
                Some((busy - server_pct.unwrap_or(0.0) - bench_pct.unwrap_or(0.0)).max(0.0))
            }
            _ => None,
        };
        CpuUse {
            server_io: self.server_io,
            others_pct,
            server_pct,
            server_secs: self.server_cpu,
            bench_pct,
            machine_pct: match self.machine {
                Some((busy, total)) if total > 0 => Some(busy as f64 / total as f64 * 100.0),
                _ => None,
            },
        }
    }
}

pub fn cpu_between(a: &Snap, b: &Snap, wall: f64) -> CpuUse {
    Delta::between(a, b).cpu(wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let s = "1234 (dtm (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 1000 200 18446744073709551615";
        assert_eq!(parse_stat_cpu(s), Some(300));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn status_kb() {
        let s = "Name:\tdtm\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kb(s, "VmRSS"), Some(10240 * 1024));
        assert_eq!(parse_status_kb(s, "VmHWM"), Some(20480 * 1024));
        assert_eq!(parse_status_kb(s, "VmSwap"), None);
    }

    #[test]
    fn io_counters() {
        let s = "rchar: 1\nwchar: 2\nsyscr: 10\nsyscw: 20\nread_bytes: 0\nwrite_bytes: 4096\n";
        assert_eq!(parse_io(s), Some((10, 20, 4096)));
        assert_eq!(parse_io("syscr: 1\n"), None);
    }

    #[test]
    fn machine_busy() {
        let s = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(parse_machine(s), Some((150, 1000)));
    }

    #[test]
    fn slices_add_up_to_one_window() {
        let snap = |srv: f64, own: f64, busy: u64, total: u64| Snap {
            server_cpu: Some(srv),
            server_io: Some((busy, total, 0)),
            own_cpu: Some(own),
            machine: Some((busy, total)),
        };
        let (a, b, c, d) = (
            snap(1.0, 2.0, 100, 1000),
            snap(2.0, 2.5, 300, 1400),
            snap(5.0, 3.0, 350, 1600),
            snap(5.5, 4.0, 450, 1800),
        );
        // two 1 s slices with an unmeasured gap between them
        let sum = Delta::between(&a, &b).add(&Delta::between(&c, &d));
        assert_eq!(sum.server_cpu, Some(1.5));
        assert_eq!(sum.own_cpu, Some(1.5));
        assert_eq!(sum.machine, Some((300, 600)));
        assert_eq!(sum.server_io, Some((300, 600, 0)));
        let cpu = sum.cpu(2.0);
        assert_eq!(cpu.server_pct, Some(75.0));
        assert_eq!(cpu.machine_pct, Some(50.0));
        let none = sum.add(&Delta::default());
        assert_eq!(none.server_cpu, None);
        assert_eq!(none.cpu(2.0).server_pct, None);
    }
}
