//! The standard `process_*` metrics every Prometheus client exports, read from `/proc`
//! (Linux). A figure that cannot be read is left out rather than reported as zero.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::{gauge, gauge_f64};

/// The process's own figures at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident memory, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory, bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Threads.
    pub threads: Option<u64>,
    /// When the process started, Unix seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads this process's figures from `/proc`.
    pub fn read() -> Self {
        let mut s = ProcessStats {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: max_fds(),
            ..Default::default()
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            s.read_stat(&stat, clock_ticks(), page_size(), boot_time());
        }
        s
    }

    /// Fills the figures `/proc/self/stat` gives. Its fields after the command name (which
    /// may hold spaces, so it is skipped up to its closing parenthesis) are numbered from 3.
    fn read_stat(&mut self, stat: &str, ticks: f64, page: u64, boot: Option<f64>) {
        let Some((_, after)) = stat.rsplit_once(')') else {
            return;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            self.cpu_seconds = Some((utime + stime) as f64 / ticks);
        }
        self.threads = field(20);
        if let (Some(start), Some(boot)) = (field(22), boot) {
            self.start_time_seconds = Some(boot + start as f64 / ticks);
        }
        self.virtual_bytes = field(23);
        self.resident_bytes = field(24).map(|pages| pages * page);
    }

    /// Writes the `process_*` families it has.
    pub(super) fn encode(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(v) = self.cpu_seconds {
            ConstCounter::new(v).encode(e.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                self.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                self.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                self.max_fds,
            ),
            ("process_threads", "Number of OS threads.", self.threads),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                gauge(e, name, help, v)?;
            }
        }
        if let Some(v) = self.start_time_seconds {
            gauge_f64(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                v,
            )?;
        }
        Ok(())
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// When the machine booted, Unix seconds (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_of_proc_stat_after_a_command_name_with_spaces() {
        let stat = "4242 (fleet (events) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let mut s = ProcessStats::default();
        s.read_stat(stat, 100.0, 4096, Some(1_700_000_000.0));
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(s.virtual_bytes, Some(123_456_789));
        assert_eq!(s.resident_bytes, Some(300 * 4096));
    }

    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.threads.unwrap() >= 1);
        assert!(s.start_time_seconds.unwrap() > 1_600_000_000.0);
    }
}
