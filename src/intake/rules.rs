//! The business rules of design.md ("Idempotent", "Monotonic state", "Lifecycles", "Matching")
//! as pure functions: what the entity held and what the KCI says in, a [`Decision`] out. Nothing
//! here builds rows or touches the database: [`super::plan`] turns decisions into rows and the
//! outbox envelope.

use entity::kci::KciOutcome;
use entity::tracked_entity::Correlation;
use serde_json::Value;

use super::Outcome;
use crate::kci::Kci;
use crate::lifecycle::Verdict;
use crate::store::text::{COLUMN_TEXT_MAX, bounded};

/// What an entity held before a new KCI of it.
#[derive(Debug, Clone, Copy)]
pub struct EntityBefore<'a> {
    /// Its current status (as stored: bounded).
    pub status: &'a str,
    pub last_sequence_number: i64,
    pub correlation: Correlation,
    /// The original request it is linked to.
    pub conversation_ref: Option<i64>,
}

/// How a new KCI relates to the entity's last applied sequence number ("Monotonic state"): only
/// a newer KCI moves the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceFacts {
    pub previous: Option<i64>,
    pub applied: bool,
    pub stale: bool,
    pub duplicate: bool,
    pub gap: bool,
}

/// Everything the rules say about one new KCI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub sequence: SequenceFacts,
    /// The lifecycle's verdict on the move (`Unchanged` when nothing moves: the first KCI, or
    /// one that is not applied).
    pub verdict: Verdict,
    pub illegal: bool,
    /// The KCI carries values the docs do not list.
    pub unknown_values: bool,
    pub outcome: Outcome,
    pub kci_outcome: KciOutcome,
    /// The entity's correlation after this KCI, and the original request it is linked to.
    pub correlation: Correlation,
    pub conversation_ref: Option<i64>,
    /// This KCI matched an entity that was waiting unmatched (its conversation is now known).
    pub late_match: bool,
    /// Why the history entry is flagged, in words, for people.
    pub notes: Vec<String>,
}

/// Decides what a KCI seen for the first time does to its entity. `before`: what the entity
/// held (none: this KCI creates it). `status`: the KCI's status as stored. `original_request`:
/// the row id of the original request registered under the KCI's `X-Conversation-ID`, if any.
pub fn decide(
    before: Option<EntityBefore<'_>>,
    kci: &Kci,
    status: &str,
    original_request: Option<i64>,
) -> Decision {
    let sequence = sequence_facts(before.map(|b| b.last_sequence_number), kci.sequence_number);
    let lifecycle = kci.entity_type.lifecycle();
    let verdict = match before {
        Some(before) if sequence.applied => lifecycle.judge(before.status, status, sequence.gap),
        _ => Verdict::Unchanged,
    };
    let illegal = verdict == Verdict::Illegal;
    let (outcome, kci_outcome) = if sequence.applied {
        (Outcome::Applied, KciOutcome::Applied)
    } else if sequence.stale {
        (Outcome::Stale, KciOutcome::Stale)
    } else {
        (Outcome::DuplicateSequence, KciOutcome::DuplicateSequence)
    };
    // Matching: a new entity is matched to its original request when that is known (an
    // unsolicited type has none to wait for); an entity keeps the link it has, and an unmatched
    // one is matched as soon as its conversation is known.
    let (correlation, conversation_ref, late_match) = match (before, original_request) {
        (None, request) => (first_correlation(kci, request), request, false),
        (Some(before), Some(request)) if before.correlation == Correlation::Unmatched => {
            (Correlation::Matched, Some(request), true)
        }
        (Some(before), _) => (before.correlation, before.conversation_ref, false),
    };
    let notes = notes(
        kci,
        status,
        &sequence,
        illegal,
        before.map(|b| b.status),
        lifecycle.name,
    );
    Decision {
        sequence,
        verdict,
        illegal,
        unknown_values: !kci.unknown_values.is_empty(),
        outcome,
        kci_outcome,
        correlation,
        conversation_ref,
        late_match,
        notes,
    }
}

/// The correlation of an entity a KCI creates: matched when its original request is known; an
/// unsolicited type has none to wait for.
pub fn first_correlation(kci: &Kci, original_request: Option<i64>) -> Correlation {
    match original_request {
        Some(_) => Correlation::Matched,
        None if kci.entity_type.is_unsolicited() => Correlation::Unsolicited,
        None => Correlation::Unmatched,
    }
}

/// A KCI id seen before ("Idempotent"): the same content is a redelivery, counted; different
/// content is an anomaly, recorded and flagged, never applied.
pub fn redelivery(kci: &Kci, first_body: &Value) -> Outcome {
    if kci.same_content_as(first_body) {
        Outcome::Redelivered
    } else {
        Outcome::Anomaly
    }
}

pub fn sequence_facts(previous: Option<i64>, sequence_number: i64) -> SequenceFacts {
    match previous {
        // The first KCI we see: anything but 1 means earlier KCIs are missing.
        None => SequenceFacts {
            previous,
            applied: true,
            stale: false,
            duplicate: false,
            gap: sequence_number > 1,
        },
        Some(last) => SequenceFacts {
            previous,
            applied: sequence_number > last,
            stale: sequence_number < last,
            duplicate: sequence_number == last,
            gap: sequence_number > last.saturating_add(1),
        },
    }
}

fn notes(
    kci: &Kci,
    status: &str,
    facts: &SequenceFacts,
    illegal: bool,
    previous_status: Option<&str>,
    lifecycle: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    if facts.gap {
        let expected = facts.previous.map_or(1, |last| last + 1);
        notes.push(format!(
            "sequence gap: expected {expected}, got {}",
            kci.sequence_number
        ));
    }
    if facts.stale {
        notes.push(format!(
            "stale: sequence {} is older than the applied {}",
            kci.sequence_number,
            facts.previous.unwrap_or_default()
        ));
    }
    if facts.duplicate {
        notes.push(format!(
            "sequence {} was already applied by another KCI",
            kci.sequence_number
        ));
    }
    if illegal {
        notes.push(format!(
            "{lifecycle} lifecycle does not allow {} -> {status}",
            previous_status.unwrap_or("?"),
        ));
    }
    if !kci.unknown_values.is_empty() {
        let values: Vec<String> = kci
            .unknown_values
            .iter()
            .map(|unknown| {
                format!(
                    "{} = {}",
                    unknown.path,
                    bounded(&unknown.value, COLUMN_TEXT_MAX)
                )
            })
            .collect();
        notes.push(format!("undocumented values: {}", values.join(", ")));
    }
    notes
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A KCI of `entity_type` at `sequence` with `status`.
    fn kci(entity_type: &str, sequence: i64, status: &str) -> Kci {
        crate::kci::parse::parse_kci(&body(entity_type, sequence, status)).expect("a valid KCI")
    }

    fn body(entity_type: &str, sequence: i64, status: &str) -> Value {
        json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "supplier": "FIBRECO",
            "sequenceNumber": sequence,
            "deliveredOn": "2026-11-24T10:00:00Z",
            "updateType": "INFORMATIONAL",
            "entityType": entity_type,
            "entity": {"id": 7, "status": status},
            "information": {"type": "UPDATE"}
        })
    }

    fn held(status: &str, last: i64, correlation: Correlation) -> EntityBefore<'_> {
        EntityBefore {
            status,
            last_sequence_number: last,
            correlation,
            conversation_ref: (correlation == Correlation::Matched).then_some(1),
        }
    }

    /// One row of the table: the case, what the entity held, the KCI, whether its original
    /// request is registered, and what must be decided.
    struct Case {
        name: &'static str,
        before: Option<EntityBefore<'static>>,
        kci: Kci,
        request: Option<i64>,
        outcome: Outcome,
        flags: (bool, bool, bool, bool), // (stale, gap, duplicate, illegal)
        correlation: Correlation,
        late_match: bool,
    }

    #[test]
    fn the_rules_decide_every_case_of_the_design() {
        use Correlation::{Matched, Unmatched, Unsolicited};
        let order = "PROVIDE_ORDER";
        let cases = [
            Case {
                name: "first KCI, sequence 1, request known",
                before: None,
                kci: kci(order, 1, "SENT_TO_SUPPLIER"),
                request: Some(9),
                outcome: Outcome::Applied,
                flags: (false, false, false, false),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "first KCI, sequence 3: earlier ones missing",
                before: None,
                kci: kci(order, 3, "ACKNOWLEDGED"),
                request: None,
                outcome: Outcome::Applied,
                flags: (false, true, false, false),
                correlation: Unmatched,
                late_match: false,
            },
            Case {
                name: "the next KCI, an allowed move",
                before: Some(held("SENT_TO_SUPPLIER", 1, Matched)),
                kci: kci(order, 2, "ACKNOWLEDGED"),
                request: Some(1),
                outcome: Outcome::Applied,
                flags: (false, false, false, false),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "stale: older than the applied one, state unchanged",
                before: Some(held("IN_PROGRESS", 5, Matched)),
                kci: kci(order, 3, "ACKNOWLEDGED"),
                request: Some(1),
                outcome: Outcome::Stale,
                flags: (true, false, false, false),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "another KCI with the applied sequence number",
                before: Some(held("IN_PROGRESS", 5, Matched)),
                kci: kci(order, 5, "PENDING"),
                request: Some(1),
                outcome: Outcome::DuplicateSequence,
                flags: (false, false, true, false),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "a gap, the status reachable through the missing steps",
                before: Some(held("SENT_TO_SUPPLIER", 1, Matched)),
                kci: kci(order, 4, "COMPLETED"),
                request: Some(1),
                outcome: Outcome::Applied,
                flags: (false, true, false, false),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "illegal: a move the lifecycle forbids is applied and flagged",
                before: Some(held("COMPLETED", 6, Matched)),
                kci: kci(order, 7, "IN_PROGRESS"),
                request: Some(1),
                outcome: Outcome::Applied,
                flags: (false, false, false, true),
                correlation: Matched,
                late_match: false,
            },
            Case {
                name: "late match: an unmatched entity's conversation is now registered",
                before: Some(held("SENT_TO_SUPPLIER", 1, Unmatched)),
                kci: kci(order, 2, "ACKNOWLEDGED"),
                request: Some(4),
                outcome: Outcome::Applied,
                flags: (false, false, false, false),
                correlation: Matched,
                late_match: true,
            },
            Case {
                name: "still unmatched: no original request yet",
                before: Some(held("SENT_TO_SUPPLIER", 1, Unmatched)),
                kci: kci(order, 2, "ACKNOWLEDGED"),
                request: None,
                outcome: Outcome::Applied,
                flags: (false, false, false, false),
                correlation: Unmatched,
                late_match: false,
            },
            Case {
                name: "unsolicited cease: nothing to match, never unmatched",
                before: None,
                kci: kci("UNSOLICITED_CEASE_ORDER", 1, "IN_PROGRESS"),
                request: None,
                outcome: Outcome::Applied,
                flags: (false, false, false, false),
                correlation: Unsolicited,
                late_match: false,
            },
        ];
        for case in cases {
            let status = case.kci.entity.status.clone();
            let decision = decide(case.before, &case.kci, &status, case.request);
            let s = decision.sequence;
            assert_eq!(decision.outcome, case.outcome, "{}", case.name);
            assert_eq!(
                (s.stale, s.gap, s.duplicate, decision.illegal),
                case.flags,
                "{}",
                case.name
            );
            assert_eq!(decision.correlation, case.correlation, "{}", case.name);
            assert_eq!(decision.late_match, case.late_match, "{}", case.name);
            assert_eq!(s.applied, case.outcome == Outcome::Applied, "{}", case.name);
            // Every raised flag is explained for people.
            let raised = [s.stale, s.gap, s.duplicate, decision.illegal]
                .iter()
                .filter(|f| **f)
                .count();
            assert_eq!(
                decision.notes.len(),
                raised,
                "{}: {:?}",
                case.name,
                decision.notes
            );
            if case.late_match {
                assert_eq!(decision.conversation_ref, case.request, "{}", case.name);
            }
        }
    }

    #[test]
    fn a_kci_id_seen_before_is_a_redelivery_or_an_anomaly() {
        let first_body = body("PROVIDE_ORDER", 2, "ACKNOWLEDGED");
        let same = crate::kci::parse::parse_kci(&first_body).unwrap();
        assert_eq!(redelivery(&same, &first_body), Outcome::Redelivered);
        let mut changed = first_body.clone();
        changed["entity"]["status"] = json!("IN_PROGRESS");
        let again = crate::kci::parse::parse_kci(&changed).unwrap();
        assert_eq!(redelivery(&again, &first_body), Outcome::Anomaly);
    }

    #[test]
    fn undocumented_values_are_flagged_and_named() {
        let unknown = kci("PROVIDE_ORDER", 1, "WAITING_FOR_GODOT");
        let decision = decide(None, &unknown, "WAITING_FOR_GODOT", None);
        assert!(decision.unknown_values);
        assert!(
            decision
                .notes
                .iter()
                .any(|n| n.contains("WAITING_FOR_GODOT"))
        );
    }

    #[test]
    fn sequence_numbers_at_the_edge_of_i64_neither_overflow_nor_gap() {
        let facts = sequence_facts(Some(i64::MAX), i64::MAX);
        assert!(facts.duplicate && !facts.gap && !facts.applied);
        let facts = sequence_facts(Some(i64::MAX - 1), i64::MAX);
        assert!(facts.applied && !facts.gap);
    }
}
