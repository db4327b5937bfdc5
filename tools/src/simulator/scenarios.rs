//! Realistic KCI lifecycles, following spec/tenant-updates-api.md section 3: what the gateway
//! sends about one order, test or problem, in sequence order.

use serde_json::{Value, json};

use super::random::Random;
use kci_receiver::kci::EntityType;

/// One KCI to send: its body and the Tenant API operation that started its entity.
#[derive(Debug, Clone)]
pub struct PlannedKci {
    pub body: Value,
}

/// One entity's story.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub entity_type: EntityType,
    pub gateway_id: u64,
    pub conversation_id: String,
    /// The Tenant API call that created it; none for unsolicited ceases.
    pub operation: Option<&'static str>,
    pub kcis: Vec<PlannedKci>,
}

/// (update type, reason, status, problem code)
type Step = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

const INFO: &str = "INFORMATIONAL";
const ACTION: &str = "ACTION_REQUIRED";
const ERROR: &str = "ERROR";

fn order_steps(random: &mut Random) -> Vec<Step> {
    match random.below(10) {
        // Rejected by the supplier before acknowledgement.
        0 => vec![
            (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
            (INFO, "TERMINATED", "REJECTED", Some("INVALID_REQUEST")),
        ],
        // Could not be sent to the supplier.
        1 => vec![(ERROR, "SUPPLIER_TIMED_OUT", "FAILED_TO_SEND", None)],
        // Cancelled by the tenant.
        2 => vec![
            (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
            (INFO, "ACKNOWLEDGED", "ACKNOWLEDGED", None),
            (INFO, "UPDATE", "PENDING_CANCELLATION", None),
            (
                INFO,
                "CANCELLED",
                "CANCELLED",
                Some("CUSTOMER_CHANGED_MIND"),
            ),
        ],
        _ => {
            let mut steps = vec![
                (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
                (INFO, "ACKNOWLEDGED", "ACKNOWLEDGED", None),
                (INFO, "COMMITTED", "IN_PROGRESS", None),
            ];
            if random.chance(0.4) {
                steps.push((INFO, "DELAY", "HELD", Some("ACCESS_ISSUE")));
                steps.push((INFO, "RESUMED", "IN_PROGRESS", None));
            }
            if random.chance(0.3) {
                // Action required, answered by an amendment.
                let action = if random.chance(0.5) {
                    "REAPPOINT"
                } else {
                    "INFORMATION_REQUIRED"
                };
                steps.push((ACTION, action, "PENDING", Some("UNABLE_TO_ATTEND")));
                steps.push((INFO, "AMENDED", "IN_PROGRESS", None));
            }
            if random.chance(0.2) {
                steps.push((INFO, "WARNING", "IN_PROGRESS", Some("PLANNING_ISSUE")));
            }
            steps.push((INFO, "COMPLETED", "COMPLETED", None));
            steps
        }
    }
}

fn ethernet_steps(random: &mut Random) -> Vec<Step> {
    let mut steps = vec![
        (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
        (INFO, "ACKNOWLEDGED", "ACKNOWLEDGED", None),
        (INFO, "COMMITTED", "IN_PROGRESS", None),
    ];
    if random.chance(0.5) {
        steps.push((INFO, "WARNING", "IN_PROGRESS", Some("WAYLEAVE_ISSUE")));
    }
    steps.push((INFO, "COMPLETED", "COMPLETED", None));
    steps
}

fn unsolicited_cease_steps(random: &mut Random) -> Vec<Step> {
    let mut steps = vec![
        (INFO, "CREATED", "RECEIVED_BY_GATEWAY", None),
        (INFO, "ACKNOWLEDGED", "ACKNOWLEDGED", None),
    ];
    if random.chance(0.2) {
        // The losing provider cancels it.
        steps.push((
            INFO,
            "CANCELLED",
            "CANCELLED",
            Some("CUSTOMER_CHANGED_MIND"),
        ));
    } else {
        steps.push((INFO, "COMMITTED", "IN_PROGRESS", None));
        steps.push((INFO, "COMPLETED", "COMPLETED", None));
    }
    steps
}

fn test_steps(random: &mut Random) -> Vec<Step> {
    match random.below(10) {
        0 => vec![(ERROR, "SUPPLIER_FAULT", "FAILED_TO_SEND", None)],
        1 => vec![
            (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
            (INFO, "TERMINATED", "REJECTED", None),
        ],
        _ => vec![
            (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
            (INFO, "UPDATE", "IN_PROGRESS", None),
            (INFO, "COMPLETED", "COMPLETED", None),
        ],
    }
}

fn problem_steps(random: &mut Random) -> Vec<Step> {
    if random.chance(0.1) {
        return vec![(ERROR, "SUPPLIER_FAULT", "FAILED_TO_SEND", None)];
    }
    let mut steps = vec![
        (INFO, "UPDATE", "SENT_TO_SUPPLIER", None),
        (INFO, "ACKNOWLEDGED", "ACKNOWLEDGED", None),
        (INFO, "UPDATE", "IN_PROGRESS", None),
    ];
    if random.chance(0.3) {
        steps.push((
            ACTION,
            "INFORMATION_REQUIRED",
            "PENDING",
            Some("INFORMATION_REQUIRED"),
        ));
        steps.push((INFO, "AMENDED", "IN_PROGRESS", None));
    }
    steps.push((ACTION, "CONFIRM", "RESOLVED", None));
    if random.chance(0.2) {
        // The tenant rejects the resolution; the supplier works on.
        steps.push((INFO, "UPDATE", "IN_PROGRESS", None));
        steps.push((ACTION, "CONFIRM", "RESOLVED", None));
    }
    if random.chance(0.3) {
        steps.push((INFO, "ADDITIONAL", "RESOLVED", None)); // closure warning
    }
    steps.push((INFO, "COMPLETED", "COMPLETED", None));
    steps
}

fn operation(entity_type: EntityType) -> Option<&'static str> {
    match entity_type {
        EntityType::UnsolicitedCeaseOrder => None,
        EntityType::ProvideEthernetOrder => Some("POST /ethernet/service-orders"),
        EntityType::ServiceTest => Some("POST /service-tests"),
        EntityType::ServiceProblem => Some("POST /service-problems"),
        _ => Some("POST /service-orders"),
    }
}

fn entity_body(entity_type: EntityType, gateway_id: u64, status: &str, supplier: &str) -> Value {
    let mut entity = json!({"id": gateway_id, "status": status, "supplier": supplier, "updated": "2024-04-10T10:15:23.622Z"});
    match entity_type {
        EntityType::ServiceTest => {
            entity["serviceId"] = json!(format!("BBEU{gateway_id:08}"));
            entity["problemType"] = json!("OUTAGE");
            entity["serviceSpecification"] = json!({"id": "FTTP"});
            if status == "COMPLETED" {
                entity["result"] =
                    json!({"testOutcome": {"testResult": "GREEN", "code": "NO_FAULT_FOUND"}});
            }
        }
        EntityType::ServiceProblem => {
            entity["problemType"] = json!("NO_SERVICE");
            entity["problemText"] = json!("No service since this morning");
            if status != "SENT_TO_SUPPLIER" {
                entity["supplierIdentifier"] = json!(format!("SP{gateway_id}"));
            }
        }
        _ => {
            let order_type = match entity_type {
                EntityType::CeaseOrder => "CEASE",
                EntityType::ModifyOrder => "MODIFY",
                EntityType::UnsolicitedCeaseOrder => "UNSOLICITED_CEASE",
                _ => "NEW",
            };
            entity["orderType"] = json!(order_type);
            if status != "SENT_TO_SUPPLIER" {
                entity["supplierOrderNumber"] = json!(format!("FC{gateway_id}"));
            }
        }
    }
    entity
}

/// The lifecycle of one entity. `gap_chance`: how often a sequence number is skipped.
pub fn lifecycle(
    random: &mut Random,
    entity_type: EntityType,
    gateway_id: u64,
    gap_chance: f64,
) -> Lifecycle {
    let steps = match entity_type {
        EntityType::ProvideEthernetOrder => ethernet_steps(random),
        EntityType::UnsolicitedCeaseOrder => unsolicited_cease_steps(random),
        EntityType::ServiceTest => test_steps(random),
        EntityType::ServiceProblem => problem_steps(random),
        _ => order_steps(random),
    };
    let supplier = if random.chance(0.8) {
        "FIBRECO"
    } else {
        "SUPPLIER2"
    };
    let mut sequence = 0;
    let kcis = steps
        .into_iter()
        .map(|(update_type, reason, status, code)| {
            sequence += if sequence > 0 && random.chance(gap_chance) { 2 } else { 1 };
            let mut body = json!({
                "id": random.uuid().to_string(),
                "supplier": supplier,
                "sequenceNumber": sequence,
                "issuedOn": "2024-04-10T10:15:22.044Z",
                "receivedOn": "2024-04-10T10:15:23.101Z",
                "deliveredOn": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "updateType": update_type,
                "entityType": entity_type.as_str(),
                "entity": entity_body(entity_type, gateway_id, status, supplier),
            });
            match update_type {
                ERROR => {
                    body["error"] = json!({"uuid": random.uuid().to_string(), "code": reason,
                        "messages": ["The gateway did not receive a timely response from the supplier"]});
                }
                _ => {
                    let companion = if update_type == ACTION { "action" } else { "information" };
                    body[companion] = json!({"type": reason});
                    if let Some(code) = code {
                        body[companion]["code"] = json!(code);
                        body[companion]["text"] = json!("Simulated by kci-receiver");
                    }
                }
            }
            PlannedKci { body }
        })
        .collect();
    Lifecycle {
        entity_type,
        gateway_id,
        conversation_id: random.uuid().to_string(),
        operation: operation(entity_type),
        kcis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kci_receiver::kci::parse_kci;
    use kci_receiver::lifecycle::Verdict;

    #[test]
    fn every_simulated_kci_is_valid_and_follows_its_lifecycle() {
        let mut random = Random::new(7);
        let mut update_types = std::collections::HashSet::new();
        for (index, entity_type) in EntityType::ALL.iter().cycle().take(700).enumerate() {
            let story = lifecycle(&mut random, *entity_type, index as u64 + 1, 0.0);
            let mut previous: Option<String> = None;
            for planned in &story.kcis {
                let kci = parse_kci(&planned.body).expect("valid");
                assert!(kci.unknown_values.is_empty(), "{:?}", kci.unknown_values);
                update_types.insert(kci.update.update_type().as_str());
                if let Some(from) = &previous {
                    let verdict = entity_type
                        .lifecycle()
                        .judge(from, &kci.entity.status, false);
                    assert_ne!(
                        verdict,
                        Verdict::Illegal,
                        "{entity_type:?}: {from} -> {}",
                        kci.entity.status
                    );
                }
                previous = Some(kci.entity.status.clone());
            }
        }
        assert_eq!(update_types.len(), 3, "all three update types");
    }
}
