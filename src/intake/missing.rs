//! The sequence numbers an entity has not received yet (gap repair): ranges below the last
//! applied number that no KCI filled, kept on the entity as text (`3-4,7`).
//!
//! Intake keeps the set exact as KCIs arrive ([`Missing::after_kci`]); reconciliation removes what
//! the gateway itself does not have ([`Missing::without_up_to`]). The set stays small whatever
//! the gateway sends: past [`MAX_RANGES`] ranges the closest two are merged, which can only
//! over-state what is missing (a reconciliation then finds out), never hide a gap.

use std::fmt;

/// Most ranges kept per entity (about 2 KB of text at worst).
pub const MAX_RANGES: usize = 100;

/// Inclusive, sorted, disjoint, non-adjacent ranges of sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing(Vec<(i64, i64)>);

impl Missing {
    /// Reads the stored text; `None` (or text that is not ranges) is the empty set.
    pub fn parse(text: Option<&str>) -> Missing {
        let Some(text) = text else {
            return Missing::default();
        };
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parsed = match part.split_once('-') {
                Some((from, to)) => from.parse().ok().zip(to.parse().ok()),
                None => part.parse().ok().map(|n| (n, n)),
            };
            match parsed {
                Some((from, to)) if from <= to => ranges.push((from, to)),
                _ => return Missing::default(),
            }
        }
        let mut missing = Missing::default();
        for (from, to) in ranges {
            missing.insert(from, to);
        }
        missing
    }

    /// The stored text; `None` when nothing is missing.
    pub fn to_text(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, number: i64) -> bool {
        self.0
            .iter()
            .any(|&(from, to)| (from..=to).contains(&number))
    }

    /// How many numbers are missing (saturating).
    pub fn count(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, &(from, to)| {
            sum.saturating_add(to.abs_diff(from).saturating_add(1))
        })
    }

    /// The set after a KCI with `sequence_number` arrived, `last_applied` being the entity's
    /// last applied number before it (none: this KCI creates the entity). A newer KCI that
    /// jumps opens the numbers it skipped; an older one fills its own number.
    pub fn after_kci(&self, last_applied: Option<i64>, sequence_number: i64) -> Missing {
        let mut next = self.clone();
        let skipped_from = last_applied.map_or(1, |last| last.saturating_add(1));
        match last_applied {
            Some(last) if sequence_number < last => next.remove(sequence_number),
            Some(last) if sequence_number == last => {}
            _ if sequence_number > skipped_from => next.insert(skipped_from, sequence_number - 1),
            _ => {}
        }
        next
    }

    /// The set without every number up to `up_to`: what remains once the gateway's `updates[]`,
    /// which ends at `up_to`, has been recorded (the gateway has no KCI for the rest).
    pub fn without_up_to(&self, up_to: i64) -> Missing {
        Missing(
            self.0
                .iter()
                .filter(|&&(_, to)| to > up_to)
                .map(|&(from, to)| (from.max(up_to.saturating_add(1)), to))
                .collect(),
        )
    }

    fn insert(&mut self, from: i64, to: i64) {
        self.0.push((from, to));
        self.0.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(self.0.len());
        for &(from, to) in &self.0 {
            match merged.last_mut() {
                Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        while merged.len() > MAX_RANGES {
            // Merge the two ranges with the smallest hole between them.
            let closest = (1..merged.len())
                .min_by_key(|&i| merged[i].0.saturating_sub(merged[i - 1].1))
                .unwrap_or(1);
            merged[closest - 1].1 = merged[closest].1;
            merged.remove(closest);
        }
        self.0 = merged;
    }

    fn remove(&mut self, number: i64) {
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &(from, to) in &self.0 {
            if !(from..=to).contains(&number) {
                kept.push((from, to));
                continue;
            }
            if from < number {
                kept.push((from, number - 1));
            }
            if number < to {
                kept.push((number + 1, to));
            }
        }
        self.0 = kept;
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, &(from, to)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if from == to {
                write!(f, "{from}")?;
            } else {
                write!(f, "{from}-{to}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(sequence: &[i64]) -> Missing {
        let mut missing = Missing::default();
        let mut last: Option<i64> = None;
        for &number in sequence {
            missing = missing.after_kci(last, number);
            last = Some(last.map_or(number, |l| l.max(number)));
        }
        missing
    }

    #[test]
    fn arrivals_open_and_fill_gaps() {
        for (arrivals, expected) in [
            (&[1, 2, 3][..], ""),
            (&[1, 4], "2-3"),
            (&[1, 4, 3], "2"),
            (&[1, 4, 2, 3], ""),
            (&[3], "1-2"),
            (&[3, 1], "2"),
            (&[1, 3, 6, 2], "4-5"),
            (&[1, 3, 3, 2], ""),
            (&[2, 2], "1"),
            (&[1, 5, 3], "2,4"),
        ] {
            assert_eq!(after(arrivals).to_string(), expected, "{arrivals:?}");
        }
    }

    #[test]
    fn the_text_form_round_trips_and_bad_text_is_empty() {
        for text in ["2", "2-3", "1,4-9,12", "9007199254740000-9007199254740991"] {
            assert_eq!(Missing::parse(Some(text)).to_string(), text);
        }
        for text in ["x", "3-1", "1-", "-"] {
            assert!(Missing::parse(Some(text)).is_empty(), "{text}");
        }
        assert_eq!(Missing::parse(None).to_text(), None);
    }

    #[test]
    fn what_the_gateway_does_not_have_is_dropped() {
        let missing = Missing::parse(Some("2-3,7-9,20"));
        assert_eq!(missing.without_up_to(8).to_string(), "9,20");
        assert_eq!(missing.without_up_to(100).to_text(), None);
        assert_eq!(missing.without_up_to(0), missing);
    }

    #[test]
    fn hostile_numbers_stay_bounded() {
        let huge = after(&[1, i64::MAX]);
        assert_eq!(huge.count(), (i64::MAX - 2) as u64);
        let mut alternate = Vec::new();
        for n in 0..1000 {
            alternate.push(n * 2 + 1);
        }
        let missing = after(&alternate);
        assert!(missing.0.len() <= MAX_RANGES);
        // Over-stated, never hidden: every truly missing number is still in the set.
        for n in 0..999 {
            assert!(missing.contains(n * 2 + 2));
        }
    }
}
