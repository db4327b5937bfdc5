//! The binary's subcommands and configuration layering, run as a CP operator would run them.

use std::process::Command;

use crate::helpers::{Backend, TestDatabase};

fn kci_receiver() -> Command {
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
