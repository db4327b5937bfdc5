//! Typed, validated configuration.
//!
//! Layers, later wins: the defaults compiled into the binary (`config/default.toml`, the readable
//! copy: no file is needed at run time); `<KCI_CONFIG_DIR or ./config>/<KCI_ENVIRONMENT>.toml`
//! when that file exists (e.g. `local`, `production`); the file given with `--config`; then
//! environment variables `KCI__<SECTION>__<KEY>` (for example `KCI__DATABASE__URL`,
//! `KCI__GATEWAY_AUTH__BASIC_PASSWORD`). Every key is documented in `config/default.toml`.
//! Each command validates what it uses only ([`Needs`]). Secrets (passwords, the database URL) are
//! [`SecretString`]s: they never appear in `Debug` output or logs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::kci::EntityType;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Name of this deployment, shown in logs and support requests (e.g. `production`, `cvt`).
    pub environment: String,
    /// The CP's tenant name at the Fibre Cafe gateway, shown in support requests.
    pub tenant: String,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub gateway_auth: GatewayAuthSettings,
    pub tls: TlsSettings,
    pub operations_auth: OperationsAuthSettings,
    pub amqp: AmqpSettings,
    pub intake: IntakeSettings,
    pub relay: RelaySettings,
    pub egress: EgressSettings,
    pub reconcile: ReconcileSettings,
    pub retention: RetentionSettings,
    pub kci: KciSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    /// How often one background task reads the gauges that need the database (entities by
    /// status, the outbox backlog, dead events); scrapes and readiness probes read memory only.
    pub refresh_interval_ms: u64,
    /// Who may read `/metrics`.
    #[serde(default)]
    pub access: MetricsAccess,
    /// A port of its own for `/metrics`, `/healthz` and `/readyz` (on `server.host`), so that a
    /// network policy can decide who scrapes; the main port then serves no `/metrics`.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    /// Anyone who reaches the port (it is served from memory: no scrape costs the database).
    #[default]
    Anyone,
    /// The operations users' Basic credentials, any role (Prometheus: `basic_auth`).
    Operations,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KciSettings {
    /// `entityType` values that stand for one of the seven listed types, e.g.
    /// `ETHERNET_ORDER = "PROVIDE_ETHERNET_ORDER"` once the gateway's real value is confirmed.
    /// Unlisted values are accepted anyway (generic lifecycle, flagged); an alias makes them
    /// the listed type.
    #[serde(default)]
    pub entity_type_aliases: HashMap<String, String>,
}

impl KciSettings {
    /// The aliases, as listed types (validated by [`Settings::validate`]).
    pub fn aliases(&self) -> HashMap<String, EntityType> {
        self.entity_type_aliases
            .iter()
            .filter_map(|(alias, listed)| {
                EntityType::from_wire(listed).map(|listed| (alias.clone(), listed))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:5672/vhost` (`%2f` is the default vhost); `amqps://` for TLS.
    pub url: SecretString,
    /// The topic exchange KCIs are published to.
    pub exchange: String,
    /// Where the main exchange sends what no binding wanted (a fanout exchange).
    pub alternate_exchange: String,
    /// The queue that keeps the alternate exchange's messages.
    pub unrouted_queue: String,
    /// `classic` or `quorum` (RabbitMQ clusters) for the unrouted queue.
    pub queue_type: String,
    /// How long connecting (TCP, TLS, AMQP handshake, topology) may take before the relay gives
    /// up and tries again later.
    #[serde(default = "default_amqp_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Declare the exchanges and the unrouted queue on every (re)connect. Off when the broker's
    /// topology is managed elsewhere (the relay then needs no configure permission).
    pub declare_topology: bool,
    /// CloudEvents binary mode: the CloudEvents attributes as `cloudEvents_*` headers.
    #[serde(default)]
    pub cloudevents: bool,
    /// The CloudEvents `source`.
    #[serde(default = "default_cloudevents_source")]
    pub cloudevents_source: String,
}

fn default_cloudevents_source() -> String {
    "urn:kci-receiver".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
pub struct EgressSettings {
    /// Serve the egress proxy to the Tenant API under `path_prefix`.
    pub enabled: bool,
    /// Where the proxy is mounted on kci-receiver, e.g. `/fibre-cafe/v1`.
    pub path_prefix: String,
    /// The Tenant API's base URL, e.g. `https://prod.fibregateway.com/v1`.
    pub upstream_base_url: String,
    /// OAuth2 client-credentials token endpoint.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    /// Scope to ask for (optional).
    pub scope: Option<String>,
    /// A token is renewed this long before it expires.
    pub token_refresh_margin_seconds: u64,
    /// Whole-request timeout towards the Tenant API (and the token endpoint).
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Largest request body the proxy forwards.
    pub max_body_bytes: usize,
}

/// Retention (`crate::store::retention`): every period in days, 0 = kept forever (the default).
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    pub audit_log_days: u32,
    pub published_events_days: u32,
    pub finished_raw_bodies_days: u32,
    /// How often `serve` prunes (each run: batches until nothing is left).
    pub interval_seconds: u64,
    /// Rows per batch, each batch one short transaction.
    pub batch_size: u64,
}

impl RetentionSettings {
    /// Whether anything is ever pruned.
    pub fn any(&self) -> bool {
        self.audit_log_days > 0
            || self.published_events_days > 0
            || self.finished_raw_bodies_days > 0
    }
}

/// Gap repair (`crate::reconcile`); every key is described in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct ReconcileSettings {
    /// Reconcile automatically (only ever with `egress.enabled`).
    pub enabled: bool,
    pub gap_grace_seconds: u64,
    pub stuck_after_seconds: u64,
    pub max_per_minute: u32,
    pub poll_interval_seconds: u64,
    pub initial_backoff_seconds: u64,
    pub max_backoff_seconds: u64,
    pub max_answer_bytes: usize,
    pub lease_seconds: u64,
}

fn default_amqp_connect_timeout_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
pub struct IntakeSettings {
    /// `POST /kcis` is answered within this many milliseconds of its arrival: 204 once
    /// committed, else 503 with `Retry-After` (the database slow or hung, the pool exhausted).
    /// Keep it well under the gateway's own timeout.
    pub deadline_ms: u64,
    /// Most KCIs recorded in one transaction (group commit).
    pub max_batch: usize,
    /// Transactions recording KCIs at once; each takes whatever has queued up meanwhile.
    pub committers: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelaySettings {
    /// Run the relay inside `serve`. Off: run `kci-receiver relay` separately.
    pub enabled: bool,
    /// Most entities whose next events are published in one round.
    pub batch_size: u32,
    /// Most events of one entity in one round: published one after the other, each only once
    /// the broker confirmed the one before (a refusal withholds the rest), so per-entity order
    /// holds; more per round means fewer rounds (and database statements) per event.
    pub events_per_entity: u32,
    /// Rounds publishing at once: the next round is read and claimed while earlier ones wait for
    /// their confirms (never two rounds with the same entity). 1: one round after the other.
    pub rounds_in_flight: u32,
    /// Safety-net poll when no wake-up arrives.
    pub poll_interval_ms: u64,
    /// Pause after a round that was not full, so that events gather into fewer, larger rounds.
    pub linger_ms: u64,
    /// How long publishing one round may take, sends and confirms together; unconfirmed events
    /// stay pending and go out again.
    pub confirm_timeout_ms: u64,
    /// Most payload bytes loaded and published in one round (at least one event per round):
    /// bounds the relay's memory whatever the size of the KCIs.
    pub max_round_bytes: u64,
    /// Broker refusals (nack, return, channel error) before an event is dead.
    pub max_attempts: i32,
    /// Retry backoff after a refusal: doubles from the initial value up to the maximum.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// PostgreSQL: intake sends `NOTIFY` so that relays in other processes (`kci-receiver relay`)
    /// wake at once. Costly at high rates (PostgreSQL serialises notifying commits), and not needed
    /// by a relay inside `serve` (woken in-process); without it other relays poll.
    pub notify_other_processes: bool,
    /// Reconnect backoff while the broker is unreachable.
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

/// Most relay rounds at once: beyond a few, more rounds only add memory (the broker's confirms,
/// not the rounds, are then the limit).
pub const MAX_ROUNDS_IN_FLIGHT: u32 = 16;

/// Most event ids in one relay round, and most entities in the rounds in flight.
pub const MAX_RELAY_IDS: u64 = 32_000;

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest `POST /kcis` body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// `Retry-After` seconds sent with 503.
    pub retry_after_seconds: u32,
    /// Largest request body kept in the audit log; larger bodies are recorded by size only.
    pub audit_body_limit_bytes: usize,
    /// The public origins of the service (`https://kci.example.com`) when a reverse proxy
    /// rewrites `Host`: a state-changing request whose `Origin` is neither its `Host` nor one of
    /// these is 403 (see `http::access::refuse_cross_site`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Failed authentications a source may have per minute; over it, it gets 429 until its
    /// allowance comes back.
    pub auth_failures_per_minute: u32,
    /// Failed authentication is audited as one record per source, method and path per window
    /// of this many seconds.
    pub auth_failure_audit_seconds: u64,
    /// Addresses or networks of reverse proxies: for requests from them, the client's address
    /// is the last of `X-Forwarded-For` (for lockouts and the audit log).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// On SIGTERM: in-flight requests get this long to finish, then the relay's round; the
    /// process exits within it.
    pub shutdown_timeout_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` (created on first run) or `postgres://user:pass@host/db`.
    pub url: SecretString,
    pub max_connections: u32,
    pub min_connections: u32,
    /// How long a request waits for a pooled connection before answering 503.
    pub acquire_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts. Off: run `kci-receiver migrate` yourself.
    pub migrate_on_start: bool,
    /// SQLite only: how long a writer waits for the lock before the request gets 503.
    pub sqlite_busy_timeout_ms: u64,
    /// SQLite only: each connection's page cache, in KiB (`PRAGMA cache_size`). The process holds
    /// up to `max_connections` of them.
    pub sqlite_cache_kib: u32,
    /// SQLite only: how often a task checkpoints the write-ahead log beside the writer
    /// ([`crate::store::checkpoints`]). 0: no task; the writer checkpoints in its own commits
    /// once the log holds 10,000 pages.
    pub sqlite_checkpoint_interval_ms: u64,
    /// PostgreSQL: `statement_timeout` of every connection (a statement that runs longer is
    /// cancelled by the server). 0: none.
    pub statement_timeout_ms: u64,
    /// PostgreSQL: `idle_in_transaction_session_timeout` (a session that holds a transaction
    /// open and idle this long is ended by the server, releasing its locks). 0: none.
    pub idle_in_transaction_timeout_ms: u64,
    /// PostgreSQL: how often to check whether intake's lookup tables grew enough to analyze them
    /// ([`crate::store::statistics`]). 0: never (autovacuum alone).
    pub analyze_interval_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayAuthMethod {
    Basic,
    Jwt,
    /// Mutual TLS: the gateway's client certificate, verified on the TLS listener (or by a
    /// trusted TLS-terminating proxy that passes the identity on).
    Mtls,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayAuthSettings {
    /// `basic`, `jwt` or `mtls`.
    pub method: GatewayAuthMethod,
    pub basic_username: String,
    pub basic_password: Option<SecretString>,
    pub jwt: JwtSettings,
    pub mtls: MtlsSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MtlsSettings {
    /// Names the gateway's certificate must carry one of (subject CN, DNS or URI subject
    /// alternative name, or e-mail); empty: any certificate the configured CA issued.
    #[serde(default)]
    pub allowed_names: Vec<String>,
    /// Where a TLS-terminating proxy (an ingress) puts the verified client identity: the
    /// subject (`CN=...,O=...`) or an Envoy-style `X-Forwarded-Client-Cert` value.
    pub identity_header: String,
    /// Addresses (`10.0.0.7`) or networks (`10.0.0.0/8`) of the proxies whose `identity_header`
    /// is trusted; from anywhere else the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TlsSettings {
    /// Serve HTTPS too, on `host:port`, besides plain HTTP on `server.host:server.port`.
    pub enabled: bool,
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// PEM: the server's certificate chain, leaf first.
    pub certificate_file: String,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key_file: String,
    /// PEM: the CAs client certificates must chain to; empty: no client certificate is asked.
    pub client_ca_file: String,
    /// The files are read again on SIGHUP and when they change (checked this often); 0: only on
    /// SIGHUP.
    pub reload_check_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JwtSettings {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (one of).
    pub audience: Vec<String>,
    /// Scope the token must carry (in `scope`, space separated, or `scp`); missing gives 403.
    pub required_scope: String,
    /// Accepted signing algorithms, e.g. `["RS256"]`.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Where to fetch the signing keys (JWK Set); optional when `keys` are given.
    pub jwks_url: Option<String>,
    /// How often the JWK Set is refreshed (sooner while fetching fails).
    pub jwks_refresh_seconds: u64,
    /// An unknown `kid` triggers a fetch, one at a time and only when the last attempt,
    /// successful or not, is older than this: bad tokens or a failing identity provider never
    /// cause more fetches than that.
    pub jwks_min_refresh_seconds: u64,
    /// Statically configured keys.
    #[serde(default)]
    pub keys: Vec<JwtKeySettings>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JwtKeySettings {
    /// Matches the token header's `kid`; a key without `kid` is tried for any token.
    pub kid: Option<String>,
    /// `RS256`, `RS384`, `RS512`, `PS256`, `ES256`, `ES384`, `EdDSA`, `HS256`, `HS384`, `HS512`.
    pub algorithm: String,
    /// PEM public key (RSA, EC or Ed25519).
    pub pem: Option<String>,
    /// Shared secret for HS* algorithms.
    pub secret: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OperationsAuthSettings {
    /// HTTP Basic user with read access to the operations API.
    pub read_username: String,
    pub read_password: Option<SecretString>,
    /// HTTP Basic user with admin access (register conversations, retry and replay).
    pub admin_username: String,
    pub admin_password: Option<SecretString>,
    /// HTTP Basic user that may only send requests through the egress proxy.
    pub egress_username: String,
    pub egress_password: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub filter: String,
}

/// The documented defaults, compiled in: `config/default.toml` is their readable copy, and the
/// binary needs no file to start, from whatever directory.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// What a command uses of the settings, and so what is validated: a migration job needs the
/// database URL, never the gateway's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `serve`, `check-config`, `egress-request`: everything.
    Everything,
    /// `relay`: the database, the broker, the relay, its metrics listener.
    Publishing,
    /// `migrate`, `outbox ...`: the database.
    Database,
    /// `reconcile`: the database and the Tenant API client.
    Reconciling,
}

impl Needs {
    /// Whether a problem (named by its key) is about something this command uses.
    fn checks(self, problem: &str) -> bool {
        let sections: &[&str] = match self {
            Needs::Everything => return true,
            Needs::Publishing => &["database.", "amqp.", "relay.", "metrics.", "log."],
            Needs::Database => &["database.", "retention.", "log."],
            Needs::Reconciling => &["database.", "egress.", "reconcile.", "kci.", "log."],
        };
        sections.iter().any(|section| problem.starts_with(section))
    }
}

/// Where optional layered files are read from: `KCI_CONFIG_DIR`, else `./config`.
pub fn config_dir() -> PathBuf {
    std::env::var_os("KCI_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config"))
}

impl Settings {
    /// Reads the layers described in the module documentation and validates the result.
    pub fn load(extra_file: Option<&Path>) -> anyhow::Result<Settings> {
        Self::load_for(extra_file, Needs::Everything)
    }

    /// [`Settings::load`], validating only what `needs` says the command uses.
    pub fn load_for(extra_file: Option<&Path>, needs: Needs) -> anyhow::Result<Settings> {
        let dir = config_dir();
        let environment = std::env::var("KCI_ENVIRONMENT").unwrap_or_else(|_| "local".to_owned());
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(
                config::File::from(dir.join(format!("{environment}.toml"))).required(false),
            );
        if let Some(file) = extra_file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("KCI")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("gateway_auth.jwt.audience")
                    .with_list_parse_key("gateway_auth.jwt.algorithms")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate_for(needs)?;
        Ok(settings)
    }

    /// Only the compiled-in defaults, without files, environment overrides or validation: the
    /// base that tests and tools adjust in code.
    pub fn defaults() -> anyhow::Result<Settings> {
        Ok(config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .build()?
            .try_deserialize()?)
    }

    /// Checks what the types cannot; names every problem at once.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_for(Needs::Everything)
    }

    /// [`Settings::validate`], of what a command uses only.
    pub fn validate_for(&self, needs: Needs) -> anyhow::Result<()> {
        let problems: Vec<String> = self
            .problems()
            .into_iter()
            .filter(|problem| needs.checks(problem))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "))
        }
    }

    /// Every problem, each named by the key it is about (`database.url must be set`).
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.database.url.expose_secret().trim().is_empty() {
            problems.push("database.url must be set".to_owned());
        }
        if self.database.max_connections == 0 {
            problems.push("database.max_connections must be at least 1".to_owned());
        }
        if !(1..=500).contains(&self.intake.max_batch) {
            problems.push("intake.max_batch must be between 1 and 500".to_owned());
        }
        if self.intake.committers == 0 {
            problems.push("intake.committers must be at least 1".to_owned());
        }
        if self.metrics.refresh_interval_ms < 100 {
            problems.push("metrics.refresh_interval_ms must be at least 100".to_owned());
        }
        if !(100..=120_000).contains(&self.intake.deadline_ms) {
            problems.push("intake.deadline_ms must be between 100 and 120000".to_owned());
        }
        for (alias, listed) in &self.kci.entity_type_aliases {
            if EntityType::from_wire(listed).is_none() {
                problems.push(format!(
                    "kci.entity_type_aliases.{alias} = {listed:?}: not one of the listed entity types"
                ));
            }
        }
        if self.server.max_body_bytes < 1024 {
            problems.push("server.max_body_bytes must be at least 1024".to_owned());
        }
        match self.gateway_auth.method {
            GatewayAuthMethod::Basic => {
                if self.gateway_auth.basic_username.is_empty()
                    || is_unset(&self.gateway_auth.basic_password)
                {
                    problems.push(
                        "gateway_auth.method is basic: set gateway_auth.basic_username and gateway_auth.basic_password (KCI__GATEWAY_AUTH__BASIC_PASSWORD)".to_owned(),
                    );
                }
            }
            GatewayAuthMethod::Mtls => {
                if !self.tls.enabled && self.gateway_auth.mtls.trusted_proxies.is_empty() {
                    problems.push(
                        "gateway_auth.method is mtls: enable tls (with tls.client_ca_file) or name the TLS-terminating proxies in gateway_auth.mtls.trusted_proxies".to_owned(),
                    );
                }
                if self.tls.enabled && self.tls.client_ca_file.is_empty() {
                    problems.push(
                        "gateway_auth.method is mtls: set tls.client_ca_file, the CAs the gateway's certificate chains to".to_owned(),
                    );
                }
                for proxy in &self.gateway_auth.mtls.trusted_proxies {
                    if crate::auth::mtls::Network::parse(proxy).is_none() {
                        problems.push(format!(
                            "gateway_auth.mtls.trusted_proxies: {proxy:?} is not an address or network (10.0.0.0/8)"
                        ));
                    }
                }
            }
            GatewayAuthMethod::Jwt => {
                let jwt = &self.gateway_auth.jwt;
                if jwt.issuer.is_empty() {
                    problems.push("gateway_auth.jwt.issuer must be set".to_owned());
                }
                if jwt.audience.is_empty() {
                    problems.push("gateway_auth.jwt.audience must be set".to_owned());
                }
                if jwt.keys.is_empty() && jwt.jwks_url.as_deref().unwrap_or("").is_empty() {
                    problems.push("gateway_auth.jwt needs keys or a jwks_url".to_owned());
                }
                if jwt.algorithms.is_empty() {
                    problems.push(
                        "gateway_auth.jwt.algorithms must list at least one algorithm".to_owned(),
                    );
                }
            }
        }
        if self.amqp.url.expose_secret().trim().is_empty() {
            problems.push("amqp.url must be set".to_owned());
        }
        if !["classic", "quorum"].contains(&self.amqp.queue_type.as_str()) {
            problems.push("amqp.queue_type must be classic or quorum".to_owned());
        }
        if self.relay.batch_size == 0
            || self.relay.events_per_entity == 0
            || self.relay.rounds_in_flight == 0
            || self.relay.max_attempts < 1
        {
            problems.push(
                "relay.batch_size, relay.events_per_entity, relay.rounds_in_flight and relay.max_attempts must be at least 1"
                    .to_owned(),
            );
        }
        if self.relay.rounds_in_flight > MAX_ROUNDS_IN_FLIGHT {
            problems.push(format!(
                "relay.rounds_in_flight must be at most {MAX_ROUNDS_IN_FLIGHT} (each round holds up to relay.max_round_bytes of payloads)"
            ));
        }
        // A round binds its event ids, and the entities of the rounds in flight, one parameter
        // each on SQLite, which takes at most 32,766 in a statement.
        let relay = &self.relay;
        let round_ids = u64::from(relay.batch_size) * u64::from(relay.events_per_entity);
        let busy_entities = u64::from(relay.batch_size) * u64::from(relay.rounds_in_flight);
        if round_ids.max(busy_entities) > MAX_RELAY_IDS {
            problems.push(format!(
                "relay.batch_size x relay.events_per_entity and relay.batch_size x relay.rounds_in_flight must each be at most {MAX_RELAY_IDS} (now {round_ids} and {busy_entities})"
            ));
        }
        if self.relay.confirm_timeout_ms == 0 || self.amqp.connect_timeout_ms == 0 {
            problems.push(
                "relay.confirm_timeout_ms and amqp.connect_timeout_ms must be at least 1"
                    .to_owned(),
            );
        }
        if self.tls.enabled
            && (self.tls.certificate_file.is_empty() || self.tls.private_key_file.is_empty())
        {
            problems
                .push("tls.enabled: set tls.certificate_file and tls.private_key_file".to_owned());
        }
        if self.retention.batch_size == 0 || self.retention.interval_seconds == 0 {
            problems.push(
                "retention.batch_size and retention.interval_seconds must be at least 1".to_owned(),
            );
        }
        let reconcile = &self.reconcile;
        if reconcile.max_per_minute == 0
            || reconcile.poll_interval_seconds == 0
            || reconcile.lease_seconds == 0
            || reconcile.max_answer_bytes == 0
            || reconcile.initial_backoff_seconds == 0
            || reconcile.max_backoff_seconds < reconcile.initial_backoff_seconds
        {
            problems.push("reconcile.max_per_minute, poll_interval_seconds, lease_seconds, max_answer_bytes and initial_backoff_seconds must be at least 1, max_backoff_seconds at least initial_backoff_seconds".to_owned());
        }
        if self.egress.enabled {
            let egress = &self.egress;
            if !egress.path_prefix.starts_with('/')
                || egress.path_prefix.ends_with('/')
                || egress.path_prefix.starts_with("/api/")
            {
                problems.push(
                    "egress.path_prefix must start with / and not end with /, outside /api/"
                        .to_owned(),
                );
            }
            for (key, value) in [
                ("egress.upstream_base_url", &egress.upstream_base_url),
                ("egress.token_url", &egress.token_url),
            ] {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    problems.push(format!("{key} must be an http(s) URL"));
                }
            }
            if egress.client_id.is_empty() || is_unset(&egress.client_secret) {
                problems.push("egress.client_id and egress.client_secret (KCI__EGRESS__CLIENT_SECRET) must be set".to_owned());
            }
        }
        problems
    }
}

fn is_unset(secret: &Option<SecretString>) -> bool {
    secret.as_ref().is_none_or(|s| s.expose_secret().is_empty())
}

/// A URL with its password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let path = path.map(|path| match path.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_query(query)),
        None => path.to_owned(),
    });
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

/// Query parameters that carry secrets (`?password=`, `sslpassword=`, `token=`, `secret=`,
/// `...key=`) with their values replaced by `***`.
fn redact_query(query: &str) -> String {
    const SECRET_WORDS: [&str; 6] = ["pass", "pwd", "secret", "token", "key", "auth"];
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _))
                if SECRET_WORDS
                    .iter()
                    .any(|word| name.to_ascii_lowercase().contains(word)) =>
            {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::{Settings, redact_url};

    #[test]
    fn relay_rounds_are_bounded() {
        let valid = |change: &dyn Fn(&mut Settings)| {
            let mut settings = Settings::defaults().expect("config/default.toml");
            change(&mut settings);
            settings
                .problems()
                .into_iter()
                .find(|p| p.contains("relay."))
        };
        assert_eq!(valid(&|_| {}), None, "the defaults");
        assert_eq!(valid(&|s| s.relay.rounds_in_flight = 16), None);
        for change in [
            &|s: &mut Settings| s.relay.rounds_in_flight = 0,
            &|s: &mut Settings| s.relay.rounds_in_flight = 17,
            &|s: &mut Settings| s.relay.batch_size = 2_001,
            &|s: &mut Settings| s.relay.events_per_entity = u32::MAX,
            &|s: &mut Settings| {
                s.relay.batch_size = 4_000;
                s.relay.events_per_entity = 1;
                s.relay.rounds_in_flight = 9;
            },
        ] as [&dyn Fn(&mut Settings); 5]
        {
            assert!(valid(change).is_some());
        }
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://kci:s3cret@db.internal:5432/kci?sslmode=require"),
            "postgres://kci:***@db.internal:5432/kci?sslmode=require"
        );
        assert_eq!(
            redact_url("sqlite://data/kci.db?mode=rwc"),
            "sqlite://data/kci.db?mode=rwc"
        );
        assert_eq!(
            redact_url("amqp://guest@localhost"),
            "amqp://guest@localhost"
        );
        assert_eq!(
            redact_url(
                "postgres://db.internal/kci?user=kci&password=s3cret&sslmode=verify-full&sslpassword=k3y"
            ),
            "postgres://db.internal/kci?user=kci&password=***&sslmode=verify-full&sslpassword=***"
        );
        assert_eq!(
            redact_url("amqps://u:p%40ss@broker/vhost?auth_mechanism=external&heartbeat=10"),
            "amqps://u:***@broker/vhost?auth_mechanism=***&heartbeat=10"
        );
    }
}
