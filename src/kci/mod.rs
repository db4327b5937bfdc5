//! A KCI as typed data: what `POST /kcis` accepts once [`parse::parse_kci`] has understood it.
//!
//! The core never sees raw JSON it has not understood; the raw body is still kept alongside
//! (unknown extra fields are stored, spec 2.2 "A receiver should accept unknown additional
//! properties").

pub mod parse;
pub mod vocabulary;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

pub use parse::{FieldProblem, parse_kci, parse_kci_with, parse_owned_kci};

use crate::lifecycle::{self, Lifecycle};

/// The KCI `entityType` discriminator (spec 2.1): which of the seven schemas the body follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityType {
    ProvideOrder,
    CeaseOrder,
    ModifyOrder,
    UnsolicitedCeaseOrder,
    /// The wire value `PROVIDE_ETHERNET_ORDER` is a guess: the docs never showed it (spec 6.2).
    ProvideEthernetOrder,
    ServiceTest,
    ServiceProblem,
}

impl EntityType {
    pub const ALL: [EntityType; 7] = [
        EntityType::ProvideOrder,
        EntityType::CeaseOrder,
        EntityType::ModifyOrder,
        EntityType::UnsolicitedCeaseOrder,
        EntityType::ProvideEthernetOrder,
        EntityType::ServiceTest,
        EntityType::ServiceProblem,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::ProvideOrder => "PROVIDE_ORDER",
            EntityType::CeaseOrder => "CEASE_ORDER",
            EntityType::ModifyOrder => "MODIFY_ORDER",
            EntityType::UnsolicitedCeaseOrder => "UNSOLICITED_CEASE_ORDER",
            EntityType::ProvideEthernetOrder => "PROVIDE_ETHERNET_ORDER",
            EntityType::ServiceTest => "SERVICE_TEST",
            EntityType::ServiceProblem => "SERVICE_PROBLEM",
        }
    }

    pub fn from_wire(value: &str) -> Option<EntityType> {
        EntityType::ALL.into_iter().find(|t| t.as_str() == value)
    }

    /// The lifecycle (spec section 3) that statuses of this entity type follow.
    pub fn lifecycle(self) -> &'static Lifecycle {
        match self {
            EntityType::ProvideOrder
            | EntityType::CeaseOrder
            | EntityType::ModifyOrder
            | EntityType::ProvideEthernetOrder => &lifecycle::SERVICE_ORDER,
            EntityType::UnsolicitedCeaseOrder => &lifecycle::UNSOLICITED_CEASE,
            EntityType::ServiceTest => &lifecycle::SERVICE_TEST,
            EntityType::ServiceProblem => &lifecycle::SERVICE_PROBLEM,
        }
    }

    /// Where this entity carries the supplier's own reference (spec 2.4), first match wins.
    fn supplier_reference_fields(self) -> &'static [&'static str] {
        match self {
            EntityType::ServiceProblem => &["supplierIdentifier", "supplierReference"],
            EntityType::ServiceTest => &["supplierReference"],
            _ => &["supplierOrderNumber", "supplierOrderReference"],
        }
    }

    /// Unsolicited ceases are created by the gateway: no request of ours started them (spec 2.4.4).
    pub fn is_unsolicited(self) -> bool {
        self == EntityType::UnsolicitedCeaseOrder
    }
}

/// A KCI's `entityType`: one of the seven the docs list, or a well-formed value they do not list
/// yet. The gateway adds types (ethernet cease and modify are "coming soon", and the ethernet
/// value itself is a guess, spec 6.2): refusing one would lose its KCIs, so an unlisted type is
/// recorded and published like any other, tracked with the generic lifecycle and flagged
/// (design.md, "Never reject what we can store").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KciType {
    Listed(EntityType),
    /// Matches `^[A-Z][A-Z0-9_]{0,49}$`.
    Unlisted(String),
}

impl KciType {
    pub fn as_str(&self) -> &str {
        match self {
            KciType::Listed(entity_type) => entity_type.as_str(),
            KciType::Unlisted(name) => name,
        }
    }

    pub fn listed(&self) -> Option<EntityType> {
        match self {
            KciType::Listed(entity_type) => Some(*entity_type),
            KciType::Unlisted(_) => None,
        }
    }

    /// The lifecycle its statuses follow; the generic one (any move) for an unlisted type.
    pub fn lifecycle(&self) -> &'static Lifecycle {
        match self {
            KciType::Listed(entity_type) => entity_type.lifecycle(),
            KciType::Unlisted(_) => &lifecycle::GENERIC,
        }
    }

    pub fn is_unsolicited(&self) -> bool {
        self.listed().is_some_and(EntityType::is_unsolicited)
    }

    /// A label for metrics: an unlisted type is `UNLISTED`, so that the gateway cannot grow the
    /// label set without bound.
    pub fn metric_label(&self) -> &'static str {
        match self {
            KciType::Listed(entity_type) => entity_type.as_str(),
            KciType::Unlisted(_) => "UNLISTED",
        }
    }

    /// Where this entity carries the supplier's own reference (spec 2.4), first match wins.
    fn supplier_reference_fields(&self) -> &'static [&'static str] {
        match self {
            KciType::Listed(entity_type) => entity_type.supplier_reference_fields(),
            KciType::Unlisted(_) => &[
                "supplierOrderNumber",
                "supplierIdentifier",
                "supplierReference",
            ],
        }
    }
}

/// The `updateType` discriminator (spec 2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateType {
    Informational,
    ActionRequired,
    Error,
}

impl UpdateType {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateType::Informational => "INFORMATIONAL",
            UpdateType::ActionRequired => "ACTION_REQUIRED",
            UpdateType::Error => "ERROR",
        }
    }

    pub fn from_wire(value: &str) -> Option<UpdateType> {
        [
            UpdateType::Informational,
            UpdateType::ActionRequired,
            UpdateType::Error,
        ]
        .into_iter()
        .find(|t| t.as_str() == value)
    }

    /// The companion object each variant requires (spec 2.1).
    pub fn companion_field(self) -> &'static str {
        match self {
            UpdateType::Informational => "information",
            UpdateType::ActionRequired => "action",
            UpdateType::Error => "error",
        }
    }
}

/// The `information` or `action` object (spec 2.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// `type`: the reason, e.g. `COMMITTED` or `REAPPOINT`.
    pub kind: String,
    /// `code`: a Fibre Cafe problem code.
    pub code: Option<String>,
    pub text: Option<String>,
}

/// The `error` object of ERROR KCIs: the gateway's error body (spec 1.3).
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayError {
    pub uuid: Option<String>,
    pub code: String,
    pub messages: Vec<String>,
}

/// What the KCI says happened, by update type.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Informational(Reason),
    ActionRequired(Reason),
    Error(GatewayError),
}

impl Update {
    pub fn update_type(&self) -> UpdateType {
        match self {
            Update::Informational(_) => UpdateType::Informational,
            Update::ActionRequired(_) => UpdateType::ActionRequired,
            Update::Error(_) => UpdateType::Error,
        }
    }

    /// The `reason` of design.md's Names: `information.type`, `action.type`, or `error.code`.
    pub fn reason(&self) -> &str {
        match self {
            Update::Informational(reason) | Update::ActionRequired(reason) => &reason.kind,
            Update::Error(error) => &error.code,
        }
    }
}

/// `entity`: the latest full snapshot of the order, test or problem (spec 1.4, "Full snapshot").
#[derive(Debug, Clone, PartialEq)]
pub struct EntitySnapshot {
    /// `entity.id`, kept as text (the gateway numbers it; we do not do arithmetic on it).
    pub gateway_id: String,
    pub status: String,
    pub supplier_reference: Option<String>,
    /// The whole `entity` object as received.
    pub body: Value,
}

/// A value of an open-ended enum that the docs do not list: kept, and flagged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnknownValue {
    pub path: String,
    pub value: String,
}

impl std::fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}", self.path, self.value)
    }
}

/// A KCI that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Kci {
    pub id: Uuid,
    pub supplier: String,
    pub sequence_number: i64,
    pub issued_on: Option<DateTime<Utc>>,
    pub received_on: Option<DateTime<Utc>>,
    pub delivered_on: DateTime<Utc>,
    pub entity_type: KciType,
    pub update: Update,
    pub entity: EntitySnapshot,
    pub unknown_values: Vec<UnknownValue>,
    /// The whole body as received, unknown fields included.
    pub body: Value,
}

impl Kci {
    /// Whether `other` says the same as this KCI. The gateway's delivery bookkeeping is left
    /// out ([`DELIVERY_BOOKKEEPING`]): `deliveredOn` is stamped again on every delivery attempt,
    /// and `deliveryStatus` appears only in the Tenant API's `updates[]` (spec section 2.2), so
    /// a KCI recovered from there and its late delivery say the same.
    pub fn same_content_as(&self, other: &Value) -> bool {
        without_bookkeeping(&self.body) == without_bookkeeping(other)
    }

    /// The top-level fields whose values differ from `other` (for the anomaly note).
    pub fn differing_fields(&self, other: &Value) -> Vec<String> {
        let (Some(mine), Some(theirs)) = (self.body.as_object(), other.as_object()) else {
            return vec!["(body)".to_owned()];
        };
        let mut fields: Vec<String> = mine
            .keys()
            .chain(theirs.keys())
            .filter(|key| {
                !DELIVERY_BOOKKEEPING.contains(&key.as_str()) && mine.get(*key) != theirs.get(*key)
            })
            .cloned()
            .collect();
        fields.sort();
        fields.dedup();
        fields
    }
}

/// Top-level fields the gateway sets about delivering a KCI, not about what it says.
pub const DELIVERY_BOOKKEEPING: &[&str] = &["deliveredOn", "deliveryStatus"];

fn without_bookkeeping(body: &Value) -> Value {
    let mut copy = body.clone();
    if let Some(object) = copy.as_object_mut() {
        for field in DELIVERY_BOOKKEEPING {
            object.remove(*field);
        }
    }
    copy
}
