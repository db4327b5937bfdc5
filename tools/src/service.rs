//! The kci-receiver under test, as a process of its own (so that its memory is its own, and so
//! that it can be killed): started from the real binary with settings in its environment,
//! probed, stopped with SIGTERM, killed with SIGKILL, started again on the same port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Passwords of the service under test.
pub const GATEWAY_PASSWORD: &str = "tools-gateway";
pub const ADMIN_PASSWORD: &str = "tools-admin";

/// The kci-receiver binary: `given`, else `kci-receiver` beside this program.
pub fn binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let binary = match given {
        Some(binary) => binary.to_owned(),
        None => std::env::current_exe()?
            .with_file_name(format!("kci-receiver{}", std::env::consts::EXE_SUFFIX)),
    };
    if !binary.is_file() {
        anyhow::bail!(
            "the kci-receiver binary is not at {}: build it first (cargo build --release --workspace) or pass --service-binary",
            binary.display()
        );
    }
    Ok(binary)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Host and port of an amqp:// or postgres:// URL.
pub fn host_port(url: &str, default_port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = host.replace("localhost", "127.0.0.1");
    let host = if host.contains(':') {
        host
    } else {
        format!("{host}:{default_port}")
    };
    Ok(host.parse()?)
}

/// `url` with another host:port (and database, for a postgres:// URL).
pub fn with_authority(url: &str, authority: &str, database: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (old_authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = old_authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    let tail = match database {
        Some(database) => match tail.split_once('?') {
            Some((_, query)) => format!("{database}?{query}"),
            None => database.to_owned(),
        },
        None => tail.to_owned(),
    };
    format!("{scheme}://{userinfo}{authority}/{tail}")
}

/// One line about the machine, for reports.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!("machine: {cores} cores ({cpu}), {memory} GiB memory")
}

/// A running kci-receiver; killed when dropped.
pub struct Service {
    child: Option<Child>,
    /// `serve` or `relay`.
    command: &'static str,
    binary: PathBuf,
    environment: Vec<(String, String)>,
    log: PathBuf,
    pub port: u16,
    pub base_url: String,
}

impl Service {
    /// Starts `kci-receiver serve` on a free port with the test passwords and `environment`
    /// (`KCI__...` settings) on top of the defaults; its log goes to a file named after `name`.
    pub fn start(
        binary: &Path,
        name: &str,
        environment: &[(&str, String)],
    ) -> anyhow::Result<Service> {
        Self::start_command(binary, "serve", name, environment)
    }

    /// [`Service::start`] of `kci-receiver <command>`: `serve`, or `relay` (whose `/readyz` is
    /// then on its metrics port, which `port` and `base_url` are).
    pub fn start_command(
        binary: &Path,
        command: &'static str,
        name: &str,
        environment: &[(&str, String)],
    ) -> anyhow::Result<Service> {
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("{name}.log"));
        println!("kci-receiver under test logs to {}", log.display());
        let mut service = Service {
            child: None,
            command,
            binary: binary.to_owned(),
            environment: environment
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            log,
            port,
            base_url: format!("http://127.0.0.1:{port}"),
        };
        service.spawn()?;
        Ok(service)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.binary);
        command
            .arg(self.command)
            .env("KCI_ENVIRONMENT", "tools-no-such-file")
            .env(
                if self.command == "relay" {
                    "KCI__METRICS__PORT"
                } else {
                    "KCI__SERVER__PORT"
                },
                self.port.to_string(),
            )
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", GATEWAY_PASSWORD)
            .env("KCI__OPERATIONS_AUTH__ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("KCI__LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (key, value) in &self.environment {
            command.env(key, value);
        }
        self.child = Some(command.spawn()?);
        Ok(())
    }

    /// Waits until `/readyz` says ready (and, when asked, the broker up or down).
    pub async fn wait_ready(&self, broker_up: Option<bool>) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(response) = client.get(format!("{}/readyz", self.base_url)).send().await
                && let Ok(body) = response.json::<serde_json::Value>().await
                && body["status"] == "ready"
                && broker_up.is_none_or(|up| (body["broker"]["status"] == "up") == up)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("kci-receiver did not become ready (broker up: {broker_up:?})")
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    /// Peak resident memory so far (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let Some(child) = &self.child else {
            return 0;
        };
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// `kill -9`: no shutdown, nothing flushed, connections dropped mid-transaction.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// SIGTERM, then SIGKILL after 15 s.
    pub fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}
