//! The operations read model: what the operations API and the dashboard show (design.md,
//! "Operations API"). Queries only; nothing here writes.
//!
//! - [`queries`]: entity lists with filters and cursors, details, history, conversations, KCIs,
//!   audit records, search and "what needs attention";
//! - [`shared`]: answers shared by concurrent callers for a short while (the attention list);
//! - [`support`]: the text of a support request to the gateway's desk;
//! - [`overview`]: the dashboard's overview (funnels, KCIs per minute, backlog, publish lag),
//!   kept in memory by the metrics' refresh task;
//! - [`duration`]: ISO-8601 durations for "stuck for longer than".

pub mod duration;
pub mod overview;
pub mod queries;
pub mod shared;
pub mod support;
