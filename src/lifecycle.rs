//! The lifecycles of spec/tenant-updates-api.md section 3, as data, in one place.
//!
//! Each lifecycle lists its statuses, its terminal statuses and its allowed moves. A move the
//! lifecycle does not allow is still applied (the gateway's snapshot is the truth) but flagged
//! illegal (design.md, "Monotonic state"). When KCIs are missing in between (a sequence gap), a
//! move is judged by whether the lifecycle can reach the new status at all, since the missing
//! KCIs may hold the intermediate steps.

/// A set of statuses that share the same allowed moves.
type Group = &'static [&'static str];

#[derive(Debug)]
pub struct Lifecycle {
    pub name: &'static str,
    pub statuses: &'static [&'static str],
    pub terminal: &'static [&'static str],
    /// Each `(from, to)` pair allows every status in `from` to move to every status in `to`.
    pub moves: &'static [(Group, Group)],
    /// Any status, any move: the lifecycle of an entity type the docs do not list yet, whose
    /// statuses and moves we cannot know. Its `terminal` statuses are the usual final words, so
    /// that "stuck" still means something.
    pub open: bool,
}

/// What the lifecycle says of a status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The status did not change.
    Unchanged,
    Allowed,
    Illegal,
    /// A status the lifecycle does not know: it cannot judge (the value is flagged as unknown).
    Unjudged,
}

impl Lifecycle {
    pub fn knows(&self, status: &str) -> bool {
        self.open || self.statuses.contains(&status)
    }

    pub fn is_terminal(&self, status: &str) -> bool {
        self.terminal.contains(&status)
    }

    fn allows_step(&self, from: &str, to: &str) -> bool {
        self.moves
            .iter()
            .any(|(sources, targets)| sources.contains(&from) && targets.contains(&to))
    }

    fn reachable(&self, from: &str, to: &str) -> bool {
        let mut seen = vec![from];
        let mut frontier = vec![from];
        while let Some(current) = frontier.pop() {
            for next in self.statuses {
                if !seen.contains(next) && self.allows_step(current, next) {
                    if *next == to {
                        return true;
                    }
                    seen.push(next);
                    frontier.push(next);
                }
            }
        }
        false
    }

    /// Judges the move `from` -> `to`. With `steps_missing`, KCIs between the two are known to be
    /// missing, so any path through the lifecycle is acceptable.
    pub fn judge(&self, from: &str, to: &str, steps_missing: bool) -> Verdict {
        if from == to {
            Verdict::Unchanged
        } else if self.open {
            Verdict::Allowed
        } else if !self.knows(from) || !self.knows(to) {
            Verdict::Unjudged
        } else if self.allows_step(from, to) || (steps_missing && self.reachable(from, to)) {
            Verdict::Allowed
        } else {
            Verdict::Illegal
        }
    }
}

/// Entity types the docs do not list (yet): any status, any move.
pub static GENERIC: Lifecycle = Lifecycle {
    name: "generic",
    statuses: &[],
    terminal: &[
        "COMPLETED",
        "CANCELLED",
        "REJECTED",
        "FAILED",
        "FAILED_TO_SEND",
    ],
    moves: &[],
    open: true,
};

/// Provide, cease, modify and ethernet orders (spec 3.1).
pub static SERVICE_ORDER: Lifecycle = Lifecycle {
    name: "service order",
    statuses: &[
        "RECEIVED_BY_GATEWAY",
        "SENT_TO_SUPPLIER",
        "FAILED_TO_SEND",
        "ACKNOWLEDGED",
        "IN_PROGRESS",
        "REJECTED",
        "PENDING",
        "HELD",
        "PENDING_AMENDMENT",
        "PENDING_CANCELLATION",
        "CANCELLED",
        "COMPLETED",
        "PARTIAL",
        "FAILED",
    ],
    terminal: &[
        "FAILED_TO_SEND",
        "REJECTED",
        "CANCELLED",
        "COMPLETED",
        "PARTIAL",
        "FAILED",
    ],
    moves: &[
        (
            &["RECEIVED_BY_GATEWAY"],
            &["SENT_TO_SUPPLIER", "FAILED_TO_SEND"],
        ),
        (
            &["SENT_TO_SUPPLIER"],
            &["FAILED_TO_SEND", "ACKNOWLEDGED", "IN_PROGRESS", "REJECTED"],
        ),
        (&["ACKNOWLEDGED"], &["IN_PROGRESS", "PENDING"]),
        (
            &["IN_PROGRESS"],
            &["PENDING", "HELD", "COMPLETED", "PARTIAL"],
        ),
        // Action required, delays and pending requests go back to the state they interrupted.
        (
            &[
                "PENDING",
                "HELD",
                "PENDING_AMENDMENT",
                "PENDING_CANCELLATION",
            ],
            &["ACKNOWLEDGED", "IN_PROGRESS", "PENDING", "HELD"],
        ),
        // Amendment or cancellation requested, or the supplier terminated (TERMINATED).
        (
            &[
                "RECEIVED_BY_GATEWAY",
                "SENT_TO_SUPPLIER",
                "ACKNOWLEDGED",
                "IN_PROGRESS",
                "PENDING",
                "HELD",
                "PENDING_AMENDMENT",
                "PENDING_CANCELLATION",
            ],
            &[
                "PENDING_AMENDMENT",
                "PENDING_CANCELLATION",
                "CANCELLED",
                "REJECTED",
                "FAILED",
            ],
        ),
    ],
    open: false,
};

/// Unsolicited ceases: the "simpler order state diagram" (spec 3.1, from the examples).
pub static UNSOLICITED_CEASE: Lifecycle = Lifecycle {
    name: "unsolicited cease",
    statuses: &[
        "RECEIVED_BY_GATEWAY",
        "ACKNOWLEDGED",
        "IN_PROGRESS",
        "PENDING",
        "HELD",
        "PENDING_CANCELLATION",
        "CANCELLED",
        "COMPLETED",
    ],
    terminal: &["CANCELLED", "COMPLETED"],
    moves: &[
        (&["RECEIVED_BY_GATEWAY"], &["ACKNOWLEDGED", "IN_PROGRESS"]),
        (&["ACKNOWLEDGED"], &["IN_PROGRESS"]),
        (&["IN_PROGRESS"], &["COMPLETED", "PENDING", "HELD"]),
        (&["PENDING", "HELD"], &["ACKNOWLEDGED", "IN_PROGRESS"]),
        (
            &[
                "RECEIVED_BY_GATEWAY",
                "ACKNOWLEDGED",
                "IN_PROGRESS",
                "PENDING",
                "HELD",
            ],
            &["PENDING_CANCELLATION", "CANCELLED"],
        ),
        (
            &["PENDING_CANCELLATION"],
            &[
                "CANCELLED",
                "RECEIVED_BY_GATEWAY",
                "ACKNOWLEDGED",
                "IN_PROGRESS",
            ],
        ),
    ],
    open: false,
};

/// Service tests (spec 3.2). The meaning of `FAILED` is undocumented; it is terminal.
pub static SERVICE_TEST: Lifecycle = Lifecycle {
    name: "service test",
    statuses: &[
        "RECEIVED_BY_GATEWAY",
        "SENT_TO_SUPPLIER",
        "FAILED_TO_SEND",
        "REJECTED",
        "IN_PROGRESS",
        "FAILED",
        "COMPLETED",
    ],
    terminal: &["FAILED_TO_SEND", "REJECTED", "FAILED", "COMPLETED"],
    moves: &[
        (
            &["RECEIVED_BY_GATEWAY"],
            &["SENT_TO_SUPPLIER", "FAILED_TO_SEND"],
        ),
        (
            &["SENT_TO_SUPPLIER"],
            &["FAILED_TO_SEND", "IN_PROGRESS", "REJECTED"],
        ),
        (&["IN_PROGRESS"], &["COMPLETED", "FAILED"]),
    ],
    open: false,
};

/// Service problems, "adapted from TMF656" (spec 3.3).
pub static SERVICE_PROBLEM: Lifecycle = Lifecycle {
    name: "service problem",
    statuses: &[
        "RECEIVED_BY_GATEWAY",
        "SENT_TO_SUPPLIER",
        "FAILED_TO_SEND",
        "REJECTED",
        "ACKNOWLEDGED",
        "IN_PROGRESS",
        "PENDING",
        "HELD",
        "NETWORK_INCIDENT",
        "PENDING_AMENDMENT",
        "PENDING_CANCELLATION",
        "CANCELLED",
        "RESOLVED",
        "COMPLETED",
    ],
    terminal: &["FAILED_TO_SEND", "REJECTED", "CANCELLED", "COMPLETED"],
    moves: &[
        (
            &["RECEIVED_BY_GATEWAY"],
            &["SENT_TO_SUPPLIER", "FAILED_TO_SEND"],
        ),
        (
            &["SENT_TO_SUPPLIER"],
            &["ACKNOWLEDGED", "FAILED_TO_SEND", "REJECTED"],
        ),
        (&["ACKNOWLEDGED"], &["IN_PROGRESS"]),
        (
            &["IN_PROGRESS"],
            &["PENDING", "HELD", "NETWORK_INCIDENT", "RESOLVED"],
        ),
        (&["PENDING", "HELD", "NETWORK_INCIDENT"], &["IN_PROGRESS"]),
        (
            &[
                "ACKNOWLEDGED",
                "IN_PROGRESS",
                "PENDING",
                "HELD",
                "NETWORK_INCIDENT",
            ],
            &["PENDING_AMENDMENT", "PENDING_CANCELLATION"],
        ),
        (
            &["PENDING_AMENDMENT", "PENDING_CANCELLATION"],
            &[
                "ACKNOWLEDGED",
                "IN_PROGRESS",
                "PENDING",
                "HELD",
                "NETWORK_INCIDENT",
            ],
        ),
        (&["PENDING_CANCELLATION"], &["CANCELLED"]),
        // The tenant accepts (or the supplier auto-closes) or rejects the resolution.
        (&["RESOLVED"], &["COMPLETED", "IN_PROGRESS"]),
    ],
    open: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&Lifecycle; 4] = [
        &SERVICE_ORDER,
        &UNSOLICITED_CEASE,
        &SERVICE_TEST,
        &SERVICE_PROBLEM,
    ];

    #[test]
    fn every_status_named_in_a_move_or_terminal_list_is_a_known_status() {
        for lifecycle in ALL {
            for (from, to) in lifecycle.moves {
                for status in from.iter().chain(to.iter()).chain(lifecycle.terminal) {
                    assert!(lifecycle.knows(status), "{}: {status}", lifecycle.name);
                }
            }
        }
    }

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for lifecycle in ALL {
            for terminal in lifecycle.terminal {
                for status in lifecycle.statuses {
                    if status != terminal {
                        assert_eq!(
                            lifecycle.judge(terminal, status, true),
                            Verdict::Illegal,
                            "{}: {terminal} -> {status}",
                            lifecycle.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn documented_happy_paths_are_allowed_step_by_step() {
        let paths: [(&Lifecycle, &[&str]); 4] = [
            (
                &SERVICE_ORDER,
                &[
                    "RECEIVED_BY_GATEWAY",
                    "SENT_TO_SUPPLIER",
                    "ACKNOWLEDGED",
                    "IN_PROGRESS",
                    "HELD",
                    "IN_PROGRESS",
                    "COMPLETED",
                ],
            ),
            (
                &UNSOLICITED_CEASE,
                &[
                    "RECEIVED_BY_GATEWAY",
                    "ACKNOWLEDGED",
                    "IN_PROGRESS",
                    "COMPLETED",
                ],
            ),
            (
                &SERVICE_TEST,
                &[
                    "RECEIVED_BY_GATEWAY",
                    "SENT_TO_SUPPLIER",
                    "IN_PROGRESS",
                    "COMPLETED",
                ],
            ),
            (
                &SERVICE_PROBLEM,
                &[
                    "SENT_TO_SUPPLIER",
                    "ACKNOWLEDGED",
                    "IN_PROGRESS",
                    "RESOLVED",
                    "IN_PROGRESS",
                    "RESOLVED",
                    "COMPLETED",
                ],
            ),
        ];
        for (lifecycle, path) in paths {
            for step in path.windows(2) {
                assert_eq!(
                    lifecycle.judge(step[0], step[1], false),
                    Verdict::Allowed,
                    "{step:?}"
                );
            }
        }
    }

    #[test]
    fn a_skipped_step_is_illegal_unless_kcis_are_missing() {
        assert_eq!(
            SERVICE_ORDER.judge("ACKNOWLEDGED", "COMPLETED", false),
            Verdict::Illegal
        );
        assert_eq!(
            SERVICE_ORDER.judge("ACKNOWLEDGED", "COMPLETED", true),
            Verdict::Allowed
        );
        assert_eq!(
            SERVICE_ORDER.judge("COMPLETED", "IN_PROGRESS", true),
            Verdict::Illegal
        );
        assert_eq!(
            SERVICE_ORDER.judge("IN_PROGRESS", "WARP_SPEED", false),
            Verdict::Unjudged
        );
    }
}
