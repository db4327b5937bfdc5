//! The values the Tenant Updates API 1.14 documents for its open-ended fields
//! (spec/tenant-updates-api.md sections 1.3, 2.3, 2.5). A value outside these lists is kept and
//! flagged, never rejected (design.md, "Never reject what we can store").

/// `information.type` (spec 2.3). `SENT_TO_SUPPLIER` and `IN_PROGRESS` are listed as service-test
/// reasons on the service-test KCI page (spec 6, question 6).
pub const INFORMATION_TYPES: &[&str] = &[
    "CREATED",
    "ACKNOWLEDGED",
    "COMMITTED",
    "DELAY",
    "RESUMED",
    "REAPPOINTED",
    "ADDITIONAL",
    "WARNING",
    "UPDATE",
    "AMENDED",
    "CANCELLED",
    "TERMINATED",
    "COMPLETED",
    "SENT_TO_SUPPLIER",
    "IN_PROGRESS",
];

/// `action.type` (spec 2.3); `REJECTION` is an older value seen on the old prod page.
pub const ACTION_TYPES: &[&str] = &[
    "INFORMATION_REQUIRED",
    "REAPPOINT",
    "RESUBMIT",
    "CONFIRM",
    "REJECTION",
];

/// The gateway's error code enum (spec 1.3), used in `error.code` of ERROR KCIs.
pub const ERROR_CODES: &[&str] = &[
    "GATEWAY_FAULT",
    "INVALID_REQUEST",
    "MALFORMED_REQUEST",
    "NOT_AUTHORISED",
    "NOT_FOUND",
    "NOT_IMPLEMENTED",
    "SUPPLIER_FAULT",
    "SUPPLIER_TIMED_OUT",
    "TENANT_FAULT",
];

/// Fibre Cafe standard problem codes (spec 2.5), the values of `information.code` / `action.code`.
pub const PROBLEM_CODES: &[&str] = &[
    "ACCESS_ISSUE",
    "ACTIVATION_FAILED",
    "ADDITIONAL_WORK",
    "APPOINTMENT_NOT_REQUIRED",
    "CAPACITY_ISSUE",
    "COST_ISSUE",
    "CUSTOMER_CHANGED_MIND",
    "FAULT_AT_NODE",
    "FAULT_AT_ONT",
    "FAULT_AT_POP",
    "INFORMATION_REQUIRED",
    "INSTALL_FAILED",
    "INVALID_REQUEST",
    "LINKED_ORDER_ISSUE",
    "NETWORK_ISSUE",
    "NETWORK_UNAVAILABLE",
    "NO_LONGER_REQUIRED",
    "OTHER",
    "PLANNING_ISSUE",
    "PROPERTY_UNOCCUPIED",
    "ROUTER_NOT_AVAILABLE",
    "SITE_UNSAFE",
    "SUPPLIER_FAULT",
    "SURVEY_REQUIRED",
    "TIMED_OUT",
    "UNABLE_TO_ATTEND",
    "UNKNOWN_FAULT",
    "WAYLEAVE_ISSUE",
];
