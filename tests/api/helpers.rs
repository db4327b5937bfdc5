//! Starting the real application, each test with its own database, and talking to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use entity::{state_transition, tracked_entity};
use kci_receiver::config::{GatewayAuthMethod, Settings};
use kci_receiver::startup::Application;
use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;
use serde_json::Value;
use uuid::Uuid;

pub const GATEWAY_USER: &str = "fibrecafe";
pub const GATEWAY_PASSWORD: &str = "gateway-test-password";
pub const ADMIN_USER: &str = "ops-admin";
pub const ADMIN_PASSWORD: &str = "admin-test-password";
pub const READ_USER: &str = "ops-read";
pub const READ_PASSWORD: &str = "read-test-password";
/// The egress role's user (its password is only set by tests that use the proxy).
pub const EGRESS_USER: &str = "ops-egress";
pub const EGRESS_PASSWORD: &str = "egress-test-password";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

pub fn amqp_url() -> String {
    std::env::var("KCI_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn postgres_admin_url() -> String {
    std::env::var("KCI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database made for one test, removed when the test ends (also when it panics).
pub struct TestDatabase {
    pub backend: Backend,
    /// What the application connects to.
    pub url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> TestDatabase {
        let name = format!("kci_test_{}", Uuid::new_v4().simple());
        match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                TestDatabase {
                    backend,
                    url: format!("sqlite://{}?mode=rwc", path.display()),
                    name,
                }
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let admin = Database::connect(&admin_url).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is required for these tests and is not reachable at {admin_url}: {e}. \
                         Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) \
                         or set KCI_TEST_POSTGRES_URL."
                    )
                });
                admin
                    .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .expect("create the test database");
                admin.close().await.ok();
                let url = replace_database(&admin_url, &name);
                TestDatabase { backend, url, name }
            }
        }
    }

    /// Address of the PostgreSQL server (for routing it through a [`TcpProxy`]).
    pub fn postgres_addr(&self) -> SocketAddr {
        let url = postgres_admin_url();
        let (_, _, host, _) = url_parts(&url);
        let host = host.replace("localhost", "127.0.0.1");
        let host = if host.contains(':') {
            host
        } else {
            format!("{host}:5432")
        };
        host.parse()
            .expect("KCI_TEST_POSTGRES_URL must name an IP address")
    }

    /// The same database, reached through another port on 127.0.0.1 (a proxy).
    pub fn url_via_port(&self, port: u16) -> String {
        build_url(
            &postgres_admin_url(),
            Some(&format!("127.0.0.1:{port}")),
            &self.name,
        )
    }
}

/// Splits `scheme://[userinfo@]host:port/database?query` into its parts.
fn url_parts(url: &str) -> (&str, Option<&str>, &str, Option<&str>) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, authority),
    };
    let query = tail.split_once('?').map(|(_, query)| query);
    (scheme, userinfo, host, query)
}

fn build_url(url: &str, host: Option<&str>, database: &str) -> String {
    let (scheme, userinfo, original_host, query) = url_parts(url);
    let mut built = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        built.push_str(userinfo);
        built.push('@');
    }
    built.push_str(host.unwrap_or(original_host));
    built.push('/');
    built.push_str(database);
    if let Some(query) = query {
        built.push('?');
        built.push_str(query);
    }
    built
}

fn replace_database(url: &str, name: &str) -> String {
    build_url(url, None, name)
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self.backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.db", self.name));
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(file));
                }
            }
            Backend::Postgres => {
                let name = self.name.clone();
                // Drop runs inside the test's runtime: use a thread with a runtime of its own.
                let dropped = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let admin = Database::connect(&postgres_admin_url()).await?;
                        admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await?;
                        admin.close().await?;
                        Ok::<_, anyhow::Error>(())
                    })
                })
                .join();
                if !matches!(dropped, Ok(Ok(()))) {
                    eprintln!("warning: could not drop test database {}", self.name);
                }
            }
        }
    }
}

/// Settings for a test app: the committed defaults, port 0, the test credentials.
pub fn test_settings(database_url: &str) -> Settings {
    let mut settings = Settings::defaults().expect("config/default.toml");
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.database.url = SecretString::from(database_url.to_owned());
    settings.database.max_connections = 10;
    settings.database.acquire_timeout_ms = 5000;
    settings.database.connect_timeout_ms = 1500;
    settings.gateway_auth.method = GatewayAuthMethod::Basic;
    settings.gateway_auth.basic_username = GATEWAY_USER.to_owned();
    settings.gateway_auth.basic_password = Some(SecretString::from(GATEWAY_PASSWORD));
    settings.operations_auth.admin_password = Some(SecretString::from(ADMIN_PASSWORD));
    settings.operations_auth.read_password = Some(SecretString::from(READ_PASSWORD));
    // Only the relay tests publish, each to exchanges of its own (see `relay.rs`).
    settings.relay.enabled = false;
    // Gauges read by the background task show up quickly, and so do aggregated audit records.
    settings.metrics.refresh_interval_ms = 200;
    settings.server.auth_failure_audit_seconds = 1;
    // Every test comes from 127.0.0.1, and some fail authentication on purpose by the hundred
    // (schemathesis without credentials): only `access.rs` tests the lockout.
    settings.server.auth_failures_per_minute = 1_000_000;
    settings.amqp.url = SecretString::from(amqp_url());
    settings.validate().expect("test settings are valid");
    settings
}

/// Turns on the egress proxy at `/fibre-cafe/v1`, towards `upstream` with OAuth2 client
/// credentials from `token_url`.
pub fn enable_egress(
    settings: &mut Settings,
    upstream: String,
    token_url: String,
    (client_id, client_secret): (&str, &str),
) {
    let egress = &mut settings.egress;
    egress.enabled = true;
    egress.path_prefix = "/fibre-cafe/v1".to_owned();
    egress.upstream_base_url = upstream;
    egress.token_url = token_url;
    egress.client_id = client_id.to_owned();
    egress.client_secret = Some(SecretString::from(client_secret.to_owned()));
}

/// The application running in this test, with its own database.
pub struct TestApp {
    pub address: String,
    /// `https://127.0.0.1:<port>` with `tls.enabled`.
    pub tls_address: Option<String>,
    /// `http://127.0.0.1:<port>` with `metrics.port`.
    pub metrics_address: Option<String>,
    /// A connection of the test's own, for looking at what the app stored.
    pub db: kci_receiver::store::Database,
    pub client: reqwest::Client,
    /// Held so that the database is dropped when the test ends, not before.
    _database: TestDatabase,
}

pub use kci_tools::tcp_proxy::TcpProxy;

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Starts the app after `adjust` has changed its settings.
pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let database = TestDatabase::create(backend).await;
    let mut settings = test_settings(&database.url);
    adjust(&mut settings);
    spawn_on(database, settings).await
}

pub async fn spawn_on(database: TestDatabase, settings: Settings) -> TestApp {
    init_test_logging();
    let application = Application::build(settings)
        .await
        .expect("the application starts");
    let address = format!("http://127.0.0.1:{}", application.port());
    let tls_address = application
        .tls_port()
        .map(|port| format!("https://127.0.0.1:{port}"));
    let metrics_address = application
        .metrics_port()
        .map(|port| format!("http://127.0.0.1:{port}"));
    tokio::spawn(application.run_until_stopped());
    let db = Database::connect(database.url.as_str())
        .await
        .expect("connect to the test database");
    TestApp {
        address,
        tls_address,
        metrics_address,
        db: db.into(),
        client: reqwest::Client::new(),
        _database: database,
    }
}

/// Another instance on an existing test database (which the first app keeps owning): its
/// address.
pub async fn spawn_second(settings: Settings) -> String {
    let application = Application::build(settings)
        .await
        .expect("the second instance starts");
    let address = format!("http://127.0.0.1:{}", application.port());
    tokio::spawn(application.run_until_stopped());
    address
}

/// Logs of the app under test when `TEST_LOG` is set.
fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
    }
}

/// One of the example KCIs in `tests/fixtures/kcis` (copied from the Fibre Cafe docs examples).
pub fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixtures are JSON")
}

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("KCI_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kcis"))
}

/// All fixture names, sorted.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("the fixtures folder")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// A KCI body about one entity, varied by the arguments.
pub fn kci(entity_type: &str, gateway_id: u64, sequence: i64, status: &str, reason: &str) -> Value {
    serde_json::json!({
        "id": Uuid::new_v4().to_string(),
        "supplier": "FIBRECO",
        "sequenceNumber": sequence,
        "issuedOn": "2024-04-10T10:15:22.044Z",
        "receivedOn": "2024-04-10T10:15:23.101Z",
        "deliveredOn": "2024-04-10T10:15:24.310Z",
        "updateType": "INFORMATIONAL",
        "entityType": entity_type,
        "entity": {"id": gateway_id, "status": status, "supplier": "FIBRECO"},
        "information": {"type": reason}
    })
}

impl TestApp {
    /// POSTs a KCI with the gateway's credentials and fresh correlation headers.
    pub async fn post_kci(&self, body: &Value, conversation_id: &str) -> reqwest::Response {
        self.post_kci_as(body, conversation_id, &Uuid::new_v4().to_string())
            .await
    }

    pub async fn post_kci_as(
        &self,
        body: &Value,
        conversation_id: &str,
        request_id: &str,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}/kcis", self.address))
            .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
            .header("X-Request-ID", request_id)
            .header("X-Conversation-ID", conversation_id)
            .json(body)
            .send()
            .await
            .expect("POST /kcis")
    }

    /// The URL the app's database is reached at.
    pub fn database_url(&self) -> &str {
        &self._database.url
    }

    /// GET a path of the app, without credentials.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("GET")
    }

    pub async fn register_conversation(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/conversations", self.address))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .json(body)
            .send()
            .await
            .expect("POST /api/v1/conversations")
    }

    /// Rows of a query on the app's database, as JSON objects.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        use sea_orm::{FromQueryResult, JsonValue, Statement};
        let statement = Statement::from_string(self.db.get_database_backend(), sql.to_owned());
        JsonValue::find_by_statement(statement)
            .all(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// [`TestApp::rows`], once there are `expected` of them (within 5 s): for what the app
    /// writes in the background, such as the audit records of rejected requests.
    pub async fn rows_eventually(&self, sql: &str, expected: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rows = self.rows(sql).await;
            if rows.len() >= expected || tokio::time::Instant::now() >= deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`TestApp::count`], once it reaches `expected` (within 5 s).
    pub async fn count_eventually(&self, sql_from_where: &str, expected: i64) -> i64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let count = self.count(sql_from_where).await;
            if count >= expected || tokio::time::Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET a path of the app with the operations read credentials, as JSON.
    pub async fn ops_json(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.address))
            .basic_auth(READ_USER, Some(READ_PASSWORD))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// GET `path` as JSON until `ready` holds of it (within 5 s); returns the last answer.
    pub async fn get_json_until(&self, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let value: Value = self.get(path).await.json().await.unwrap_or(Value::Null);
            if ready(&value) || tokio::time::Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, sql_from_where: &str) -> i64 {
        use sea_orm::Statement;
        let sql = format!("SELECT COUNT(*) AS n {sql_from_where}");
        let statement = Statement::from_string(self.db.get_database_backend(), sql.clone());
        let row = self
            .db
            .query_one_raw(statement)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.expect("a row")
            .try_get::<i64>("", "n")
            .expect("a count")
    }

    /// A UUID as an SQL literal: PostgreSQL stores `uuid`, SQLite a 16-byte blob.
    pub fn uuid_sql(&self, id: &str) -> String {
        let id = Uuid::parse_str(id).expect("a UUID");
        match self.db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => format!("X'{}'", id.simple()),
            _ => format!("'{id}'"),
        }
    }

    /// The tracked entity row for (entity type, gateway id).
    pub async fn entity(&self, entity_type: &str, gateway_id: &str) -> tracked_entity::Model {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        let mut found = tracked_entity::Entity::find()
            .filter(tracked_entity::Column::EntityType.eq(entity_type))
            .filter(tracked_entity::Column::GatewayId.eq(gateway_id))
            .all(&self.db)
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "one entity {entity_type} {gateway_id}");
        found.remove(0)
    }

    /// Its history, oldest first.
    pub async fn history(&self, entity_id: i64) -> Vec<state_transition::Model> {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        state_transition::Entity::find()
            .filter(state_transition::Column::TrackedEntityId.eq(entity_id))
            .order_by_asc(state_transition::Column::Id)
            .all(&self.db)
            .await
            .unwrap()
    }
}

/// Retries `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process that is killed (and reaped) when the test ends, also when it panics.
pub struct ChildProcess(std::process::Child);

impl ChildProcess {
    pub fn spawn(command: &mut std::process::Command) -> ChildProcess {
        ChildProcess(command.spawn().expect("start the child process"))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill -TERM");
    }

    /// Waits for the process to exit, at most `timeout`; none if it is still running.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `TCP_NODELAY` of this process's TCP socket whose local port is `local_port` and whose peer
/// port is `peer_port` (`None` when there is none).
#[cfg(target_os = "linux")]
pub fn nodelay_of(local_port: u16, peer_port: u16) -> Option<bool> {
    fn port_of(address: &libc::sockaddr_storage) -> Option<u16> {
        // SAFETY: the family says which of the two layouts the storage holds.
        unsafe {
            match i32::from(address.ss_family) {
                libc::AF_INET => Some(u16::from_be(
                    (*(address as *const _ as *const libc::sockaddr_in)).sin_port,
                )),
                libc::AF_INET6 => Some(u16::from_be(
                    (*(address as *const _ as *const libc::sockaddr_in6)).sin6_port,
                )),
                _ => None,
            }
        }
    }
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: plain socket queries into buffers of the sizes given; a descriptor that is not
        // a socket (or was closed meanwhile) answers with an error.
        unsafe {
            let mut local: libc::sockaddr_storage = std::mem::zeroed();
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let size = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let (mut local_size, mut peer_size) = (size, size);
            if libc::getsockname(fd, &mut local as *mut _ as *mut _, &mut local_size) != 0
                || libc::getpeername(fd, &mut peer as *mut _ as *mut _, &mut peer_size) != 0
                || port_of(&local) != Some(local_port)
                || port_of(&peer) != Some(peer_port)
            {
                continue;
            }
            let mut nodelay: libc::c_int = 0;
            let mut nodelay_size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &mut nodelay as *mut _ as *mut _,
                &mut nodelay_size,
            ) == 0
            {
                return Some(nodelay != 0);
            }
        }
    }
    None
}
