//! The binary's subcommands and configuration layering, run as a CP operator would run them.

use std::process::Command;

use crate::helpers::{Backend, TestDatabase};

/// The binary, run from the repository with no environment file and no RUST_LOG.
pub fn kci_receiver() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kci-receiver"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env("KCI_ENVIRONMENT", "test-no-such-file");
    command
}

#[test]
fn check_config_applies_environment_overrides_and_redacts_secrets() {
    let output = kci_receiver()
        .args(["check-config"])
        .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "very-secret-password")
        .env("KCI__SERVER__PORT", "9191")
        .env(
            "KCI__DATABASE__URL",
            "postgres://kci:db-secret@db.internal/kci",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("port: 9191"), "{stdout}");
    assert!(
        !stdout.contains("very-secret-password") && !stdout.contains("db-secret"),
        "{stdout}"
    );
}

/// The binary allocates with jemalloc, its options as src/main.rs sets them: jemalloc's own
/// report at exit (`stats_print`) lists them, and with `abort_conf` an option it cannot read
/// (a typo would otherwise be a warning and a default) aborts the process.
#[cfg(target_os = "linux")]
#[test]
fn the_binary_allocates_with_jemalloc_and_its_options() {
    let output = kci_receiver()
        .arg("--version")
        .env("MALLOC_CONF", "abort_conf:true,stats_print:true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("Begin jemalloc statistics"), "{stderr}");
    for option in [
        "opt.narenas: 2",
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 500",
        "opt.muzzy_decay_ms: 0",
        "opt.tcache_max: 4096",
    ] {
        assert!(stderr.contains(option), "{option} in:\n{stderr}");
    }
}

#[test]
fn a_missing_gateway_password_stops_start_up_with_a_clear_message() {
    let output = kci_receiver().args(["check-config"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KCI__GATEWAY_AUTH__BASIC_PASSWORD"),
        "{stderr}"
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_and_serve_refuses_an_unmigrated_database_when_told_not_to_migrate()
 {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let refused = kci_receiver()
        .args(["serve"])
        .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "x")
        .env("KCI__DATABASE__URL", &database.url)
        .env("KCI__DATABASE__MIGRATE_ON_START", "false")
        .env("KCI__SERVER__PORT", "0")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("kci-receiver migrate"));

    let migrated = kci_receiver()
        .args(["migrate"])
        .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "x")
        .env("KCI__DATABASE__URL", &database.url)
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let db = sea_orm::Database::connect(database.url.as_str())
        .await
        .unwrap();
    assert_eq!(
        kci_receiver::store::pending_migrations(&db).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn the_outbox_subcommands_show_the_backlog_list_dead_events_and_requeue_them() {
    use crate::helpers::{kci, spawn_app};
    let app = spawn_app(Backend::Sqlite).await;
    for gateway_id in [1, 2] {
        let body = kci("PROVIDE_ORDER", gateway_id, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(app.post_kci(&body, "conv-cli").await.status().as_u16(), 204);
    }
    let run = |args: &[&str]| {
        let output = kci_receiver()
            .args(args)
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "x")
            .env("KCI__DATABASE__URL", app.database_url())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (ok, stdout, stderr) = run(&["outbox", "backlog"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"pending\":2"), "{stdout}");

    sea_orm::ConnectionTrait::execute_unprepared(
        &app.db,
        "UPDATE outbox_event SET status = 'DEAD', attempts = 10",
    )
    .await
    .unwrap();
    let (ok, stdout, _) = run(&["outbox", "dead"]);
    assert!(ok);
    assert_eq!(
        stdout.lines().count(),
        2,
        "one JSON line per dead event: {stdout}"
    );
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let event_id = first["eventId"].as_str().unwrap().to_owned();

    let (ok, stdout, _) = run(&["outbox", "retry", &event_id]);
    assert!(ok);
    assert!(stdout.contains("\"requeued\":1"), "{stdout}");
    let (ok, stdout, _) = run(&["outbox", "retry", "--all"]);
    assert!(ok);
    assert!(stdout.contains("\"requeued\":1"), "{stdout}");
    assert_eq!(
        app.count("FROM outbox_event WHERE status = 'PENDING' AND attempts = 0")
            .await,
        2
    );

    let (ok, _, stderr) = run(&[
        "outbox",
        "replay",
        "--conversation-id",
        "c",
        "--from",
        "2024-01-01T00:00:00Z",
        "--to",
        "2025-01-01T00:00:00Z",
    ]);
    assert!(!ok, "one selection at a time");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn the_asyncapi_document_names_every_routing_key_word_and_header_the_relay_publishes() {
    let document =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/asyncapi.yaml"))
            .unwrap();
    for entity_type in kci_receiver::kci::EntityType::ALL {
        assert!(
            document.contains(&entity_type.as_str().to_lowercase()),
            "{}",
            entity_type.as_str()
        );
    }
    let body = serde_json::json!({
        "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21", "supplier": "FIBRECO", "sequenceNumber": 1,
        "deliveredOn": "2024-04-10T10:15:24.310Z", "updateType": "INFORMATIONAL", "entityType": "SERVICE_TEST",
        "entity": {"id": 1, "status": "SENT_TO_SUPPLIER"}, "information": {"type": "UPDATE"}
    });
    let kci = kci_receiver::kci::parse_kci(&body).unwrap();
    let raw_body = body.to_string();
    let message =
        kci_receiver::outbox::envelope::build(&kci_receiver::outbox::envelope::EnvelopeFacts {
            event_id: uuid::Uuid::from_u128(0x0193_6f4a_2b3c_7d8e_9f00_1122_3344_5566),
            kci: &kci,
            raw_body: &raw_body,
            request_id: "5f0c9d1e-8a7b-4c3d-9e2f-1a2b3c4d5e6f",
            conversation_id: "conv-service-test-1",
            previous_status: None,
            new_status: "SENT_TO_SUPPLIER",
            applied: true,
            correlation: entity::tracked_entity::Correlation::Unmatched,
            original_request: None,
            previous_sequence_number: None,
            stale: false,
            gap: false,
            duplicate: false,
            illegal: false,
            source: entity::state_transition::KciSource::Reconciliation,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-5c1f0e2d3a4b6c7d-01",
            accepted_at: chrono::DateTime::parse_from_rfc3339("2024-04-10T10:20:01.250Z")
                .unwrap()
                .to_utc(),
        });
    // The document's example is this very message (regenerate it from the assertion's text
    // when the envelope changes).
    let example = format!(
        "          headers: {}\n          payload: {}\n",
        serde_json::to_string(&message.headers).unwrap(),
        message.payload
    );
    assert!(
        document.contains(&example),
        "docs/asyncapi.yaml's kciEvent example must be a real envelope:\n{example}"
    );
    for header in message.headers.as_object().unwrap().keys() {
        assert!(
            document.contains(&format!("{header}:")),
            "header {header} is documented"
        );
    }
    let payload: serde_json::Value = serde_json::from_str(&message.payload).unwrap();
    for (section, fields) in payload.as_object().unwrap() {
        assert!(
            document.contains(&format!("{section}:")),
            "{section} is documented"
        );
        if let Some(fields) = fields.as_object().filter(|_| section != "kci") {
            for field in fields.keys() {
                assert!(
                    document.contains(&format!("{field}:")),
                    "{section}.{field} is documented"
                );
            }
        }
    }
}

/// Issue 13: an installed binary (or a container with another working directory) starts: the
/// defaults are compiled in. The copy under `config/` is the same text.
#[tokio::test]
async fn the_binary_runs_from_any_directory_on_its_compiled_in_defaults() {
    assert_eq!(
        kci_receiver::config::DEFAULTS_TOML,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .unwrap(),
        "config/default.toml is the compiled-in defaults' readable copy"
    );
    let elsewhere = std::env::temp_dir().join(format!("kci-anywhere-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let checked = kci_receiver()
        .current_dir(&elsewhere)
        .env_remove("KCI_CONFIG_DIR")
        .args(["check-config"])
        .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "x")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(stdout.contains("port: 8080"), "{stdout}");

    let port = kci_tools::service::free_port().unwrap();
    let mut serving = crate::helpers::ChildProcess::spawn(
        kci_receiver()
            .current_dir(&elsewhere)
            .env_remove("KCI_CONFIG_DIR")
            .args(["serve"])
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "x")
            .env("KCI__SERVER__PORT", port.to_string())
            .env("KCI__RELAY__ENABLED", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let ready = crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    serving.terminate();
    let _ = serving.wait_for_exit(std::time::Duration::from_secs(20));
    assert!(ready, "serve started outside the repository");
    assert!(
        elsewhere.join("data/kci-receiver.db").exists(),
        "the SQLite file is made where it runs"
    );
    let _ = std::fs::remove_dir_all(&elsewhere);
}

/// A migration job needs the database URL and nothing else (no gateway password).
#[tokio::test]
async fn migrate_and_the_outbox_commands_need_only_the_database_url() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let migrated = kci_receiver()
        .args(["migrate"])
        .env("KCI__DATABASE__URL", &database.url)
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let backlog = kci_receiver()
        .args(["outbox", "backlog"])
        .env("KCI__DATABASE__URL", &database.url)
        .output()
        .unwrap();
    assert!(
        backlog.status.success(),
        "{}",
        String::from_utf8_lossy(&backlog.stderr)
    );
    // Serving still needs everything it uses.
    let serve = kci_receiver()
        .args(["check-config"])
        .env("KCI__DATABASE__URL", &database.url)
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("gateway_auth"));
}

/// Issue 13: several `migrate` (or instances) starting at once on an empty PostgreSQL database
/// all succeed: migrations run under an advisory lock. Before it, two of three trials failed.
#[tokio::test]
async fn migrations_started_together_on_an_empty_database_all_succeed() {
    for trial in 0..3 {
        let database = TestDatabase::create(Backend::Postgres).await;
        let children: Vec<_> = (0..4)
            .map(|_| {
                kci_receiver()
                    .args(["migrate"])
                    .env("KCI__DATABASE__URL", &database.url)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "trial {trial}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let db = sea_orm::Database::connect(database.url.as_str())
            .await
            .unwrap();
        assert_eq!(
            kci_receiver::store::pending_migrations(&db).await.unwrap(),
            0
        );
    }
}

/// Issue 13: the separate relay process can be probed and scraped, and `healthcheck` probes it.
#[tokio::test]
async fn the_relay_process_serves_healthz_readyz_and_metrics_and_healthcheck_probes_it() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let port = kci_tools::service::free_port().unwrap();
    let mut relay = crate::helpers::ChildProcess::spawn(
        kci_receiver()
            .args(["relay"])
            .env("KCI__DATABASE__URL", &database.url)
            .env("KCI__AMQP__URL", crate::helpers::amqp_url())
            .env("KCI__METRICS__PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let base = format!("http://127.0.0.1:{port}");
    let ready = crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        let Ok(response) = reqwest::get(format!("{base}/readyz")).await else {
            return false;
        };
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        body["status"] == "ready"
            && body["relay"]["status"] == "running"
            && body["broker"]["status"] == "up"
    })
    .await;
    assert!(
        ready,
        "the relay process says it is ready, running, connected"
    );
    let alive = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(alive.status().as_u16(), 200);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "kci_receiver_outbox_published_total",
        "kci_receiver_outbox_pending_events",
        "kci_receiver_relay_restarts_total",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
    let probed = kci_receiver()
        .args(["healthcheck", "--url", &format!("{base}/readyz")])
        .output()
        .unwrap();
    assert!(probed.status.success());
    relay.terminate();
    assert!(
        relay
            .wait_for_exit(std::time::Duration::from_secs(20))
            .is_some()
    );
    let nobody = kci_receiver()
        .args([
            "healthcheck",
            "--url",
            &format!("{base}/readyz"),
            "--timeout-ms",
            "500",
        ])
        .output()
        .unwrap();
    assert!(
        !nobody.status.success(),
        "nothing listens any more: unhealthy"
    );
}
