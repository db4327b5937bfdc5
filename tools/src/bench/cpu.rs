//! CPU time by process, from `/proc` (Linux): what each part of the system spends per KCI at
//! saturation. On a shared two-core machine throughput varies by 30% from run to run with what
//! else runs; CPU per KCI varies far less, so it is the figure to compare builds by.
//!
//! Counted: the kci-receiver instances under test (their own pids); PostgreSQL (every process named
//! `postgres`, with the CPU of the backends that exited, which the postmaster's children times
//! keep); RabbitMQ (`beam.smp`); this program (load generator and consumer).

use std::collections::HashMap;

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ: 100 on Linux, whatever the kernel's
/// own tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds so far, by part.
#[derive(Debug, Clone, Default)]
pub struct CpuSample(HashMap<&'static str, f64>);

pub const PARTS: [&str; 4] = [
    "kci-receiver",
    "PostgreSQL",
    "RabbitMQ",
    "load generator and consumer",
];

/// Reads the CPU time of the parts now; `service_pids`: the kci-receiver instances under test.
pub fn sample(service_pids: &[u32]) -> CpuSample {
    let mut seconds = HashMap::new();
    seconds.insert(
        PARTS[0],
        service_pids
            .iter()
            .filter_map(|pid| own_seconds(*pid))
            .sum::<f64>(),
    );
    seconds.insert(PARTS[3], own_seconds(std::process::id()).unwrap_or(0.0));
    let (mut postgres, mut rabbitmq) = (0.0, 0.0);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((name, times)) = stat(pid) else {
                continue;
            };
            match name.as_str() {
                // With the children's times: backends that exited are counted by the postmaster.
                "postgres" => postgres += times.iter().sum::<f64>(),
                "beam.smp" => rabbitmq += times[0] + times[1],
                _ => {}
            }
        }
    }
    seconds.insert(PARTS[1], postgres);
    seconds.insert(PARTS[2], rabbitmq);
    CpuSample(seconds)
}

/// Milliseconds of CPU per KCI of each part between two samples, in [`PARTS`] order.
pub fn per_kci(before: &CpuSample, after: &CpuSample, kcis: usize) -> Vec<(&'static str, f64)> {
    PARTS
        .iter()
        .filter_map(|part| {
            let spent = after.0.get(part)? - before.0.get(part)?;
            Some((*part, spent * 1000.0 / kcis.max(1) as f64))
        })
        .collect()
}

fn own_seconds(pid: u32) -> Option<f64> {
    stat(pid).map(|(_, times)| times[0] + times[1])
}

/// The command name and (utime, stime, cutime, cstime) in seconds of a process.
fn stat(pid: u32) -> Option<(String, [f64; 4])> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": the name may hold spaces and parentheses; it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), so utime (14) is at index 11 here.
    let tick = |index: usize| -> Option<f64> {
        Some(fields.get(index)?.parse::<f64>().ok()? / TICKS_PER_SECOND)
    };
    Some((name, [tick(11)?, tick(12)?, tick(13)?, tick(14)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_and_its_cpu_time_grows_with_work() {
        let (name, before) = stat(std::process::id()).expect("/proc/self is readable");
        assert!(!name.is_empty());
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (_, after) = stat(std::process::id()).unwrap();
        assert!(
            after[0] + after[1] > before[0] + before[1],
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn per_kci_divides_the_difference() {
        let before = CpuSample(HashMap::from([(PARTS[0], 1.0), (PARTS[1], 2.0)]));
        let after = CpuSample(HashMap::from([(PARTS[0], 2.0), (PARTS[1], 4.0)]));
        assert_eq!(
            per_kci(&before, &after, 1000),
            vec![(PARTS[0], 1.0), (PARTS[1], 2.0)]
        );
    }
}
