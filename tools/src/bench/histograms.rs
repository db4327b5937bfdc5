//! The service's own histograms over a phase of the benchmark: `/metrics` read before and after
//! it, and what changed in between, per series.

use std::collections::HashMap;

/// One series over a phase: how many observations, their sum, and the histogram bucket bound the
/// 99th percentile is under.
pub struct Series {
    /// The values of the series' key labels, joined with `/`.
    pub key: String,
    pub count: f64,
    pub sum: f64,
    pub p99_bound: Option<f64>,
}

impl Series {
    pub fn mean(&self) -> f64 {
        self.sum / self.count
    }
}

/// Key -> (sum, count, [(le, cumulative count)]), as the service's `/metrics` says now (empty
/// when it cannot be read).
pub type Snapshot = HashMap<String, (f64, f64, Vec<(f64, f64)>)>;

/// The histogram `name` now, its series keyed by the values of `labels`.
pub async fn snapshot(base_url: &str, name: &str, labels: &[&str]) -> Snapshot {
    let Ok(response) = reqwest::get(format!("{base_url}/metrics")).await else {
        return HashMap::new();
    };
    parse(&response.text().await.unwrap_or_default(), name, labels)
}

fn parse(text: &str, name: &str, labels: &[&str]) -> Snapshot {
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    let mut snapshot: Snapshot = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let label = |label: &str| {
            series
                .split_once(&format!("{label}=\""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(v, _)| v.to_owned())
        };
        let Some(key) = labels
            .iter()
            .map(|l| label(l))
            .collect::<Option<Vec<_>>>()
            .map(|values| values.join("/"))
        else {
            continue;
        };
        let entry = snapshot.entry(key).or_default();
        if series.starts_with(&sum_name) {
            entry.0 = value;
        } else if series.starts_with(&count_name) {
            entry.1 = value;
        } else if let Some(le) = label("le").and_then(|le| le.parse::<f64>().ok()) {
            entry.2.push((le, value));
        }
    }
    snapshot
}

/// What happened between two snapshots: every series observed in between, by key.
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<Series> {
    let mut series: Vec<Series> = after
        .iter()
        .filter_map(|(key, (sum, count, buckets))| {
            let empty = (0.0, 0.0, Vec::new());
            let (sum0, count0, buckets0) = before.get(key).unwrap_or(&empty);
            let n = count - count0;
            if n <= 0.0 {
                return None;
            }
            let p99_bound = buckets
                .iter()
                .map(|(le, c)| {
                    let earlier = buckets0
                        .iter()
                        .find(|(le0, _)| le0 == le)
                        .map_or(0.0, |(_, c0)| *c0);
                    (*le, c - earlier)
                })
                .find(|(_, c)| *c >= 0.99 * n)
                .map(|(le, _)| le);
            Some(Series {
                key: key.clone(),
                count: n,
                sum: sum - sum0,
                p99_bound,
            })
        })
        .collect();
    series.sort_by(|a, b| a.key.cmp(&b.key));
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE kci_receiver_write_transaction_seconds histogram
kci_receiver_write_transaction_seconds_bucket{phase="held",writer="intake",le="0.001"} 1
kci_receiver_write_transaction_seconds_bucket{phase="held",writer="intake",le="0.01"} 4
kci_receiver_write_transaction_seconds_bucket{phase="held",writer="intake",le="+Inf"} 4
kci_receiver_write_transaction_seconds_sum{phase="held",writer="intake"} 0.02
kci_receiver_write_transaction_seconds_count{phase="held",writer="intake"} 4
kci_receiver_write_transaction_seconds_sum{phase="wait",writer="relay"} 0.5
kci_receiver_write_transaction_seconds_count{phase="wait",writer="relay"} 2
kci_receiver_write_transaction_seconds_countless 7
"#;

    #[test]
    fn a_phase_is_what_changed_between_two_readings_per_series() {
        let name = "kci_receiver_write_transaction_seconds";
        let before = parse(
            &TEXT.replace("} 4", "} 1").replace("} 0.02", "} 0.005"),
            name,
            &["writer", "phase"],
        );
        let after = parse(TEXT, name, &["writer", "phase"]);
        let series = between(&before, &after);
        // The relay's wait did not change: no series for it.
        assert_eq!(series.len(), 1);
        let held = &series[0];
        assert_eq!(held.key, "intake/held");
        assert_eq!(held.count, 3.0);
        assert!((held.mean() - 0.005).abs() < 1e-9);
        // Three new observations, all at or under 10 ms (one of them was at or under 1 ms before).
        assert_eq!(held.p99_bound, Some(0.01));
    }
}
