//! The machine's CPU counters, for benchmarks that tell how busy the whole machine was
//! over a window (Linux only: elsewhere there is nothing to read).

/// The machine's CPU time counters (Linux `/proc/stat`, all cores), to tell how busy
/// the whole machine was (everything on it together), and how much of it this process
/// took.
#[derive(Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
    /// This process's own, from `/proc/self/stat`.
    process: u64,
}

impl CpuTimes {
    /// `None` where there is no `/proc/stat`.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are idle.
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        // After the command name (in parentheses), utime and stime are fields 12 and 13.
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let own: Vec<u64> = own
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|field| field.parse().ok())
            .collect();
        Some(Self {
            busy: total - idle,
            total,
            process: own.iter().sum(),
        })
    }

    /// The share of the machine's time since `before` that this process used.
    pub fn process_since(&self, before: &Self) -> f64 {
        (self.process - before.process) as f64 / (self.total - before.total).max(1) as f64
    }

    /// The share of the time since `before` that the machine was busy.
    pub fn busy_since(&self, before: &Self) -> f64 {
        (self.busy - before.busy) as f64 / (self.total - before.total).max(1) as f64
    }
}
