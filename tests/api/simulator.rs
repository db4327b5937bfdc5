//! The gateway simulator against the real app: realistic lifecycles are accepted, matched, and
//! never illegal; the same seed replays the same run.

use std::collections::HashSet;

use kci_tools::simulator::{Options, run};

use crate::helpers::{ADMIN_PASSWORD, ADMIN_USER, Backend, GATEWAY_PASSWORD, spawn_app};

fn options(base_url: &str) -> Options {
    Options {
        base_url: base_url.to_owned(),
        gateway_password: GATEWAY_PASSWORD.to_owned(),
        admin: Some((ADMIN_USER.to_owned(), ADMIN_PASSWORD.to_owned())),
        orders: 21,
        ethernet_orders: 4,
        unsolicited_ceases: 4,
        tests: 8,
        problems: 8,
        concurrency: 4,
        seed: 5,
        redelivery_chance: 0.1,
        out_of_order_chance: 0.1,
        gap_chance: 0.1,
        late_registration_chance: 0.3,
        ..Options::default()
    }
}

#[tokio::test]
async fn simulated_lifecycles_are_accepted_matched_and_never_illegal() {
    let app = spawn_app(Backend::Postgres).await;
    let report = run(options(&app.address)).await.unwrap();
    assert_eq!(report.lifecycles, 45);
    assert!(
        report.other_statuses.is_empty() && report.transport_errors == 0,
        "{}",
        report.summary()
    );
    assert_eq!(
        report.registrations, 41,
        "every lifecycle but the unsolicited ceases"
    );
    assert_eq!(app.count("FROM tracked_entity").await, 45);
    assert_eq!(
        app.count("FROM tracked_entity WHERE correlation = 'UNMATCHED'")
            .await,
        0,
        "late registrations matched them"
    );
    assert_eq!(
        app.count("FROM tracked_entity WHERE correlation = 'UNSOLICITED'")
            .await,
        4
    );
    assert_eq!(
        app.count("FROM tracked_entity WHERE flag_illegal = true")
            .await,
        0
    );
    assert!(
        app.count("FROM kci WHERE redelivery_count > 0").await > 0,
        "redeliveries were mixed in"
    );
    assert!(
        app.count("FROM state_transition WHERE flag_gap = true")
            .await
            > 0,
        "gaps were mixed in"
    );
    let distinct: HashSet<&str> = report.accepted.iter().map(|a| a.kci_id.as_str()).collect();
    assert_eq!(app.count("FROM kci").await, distinct.len() as i64);
    assert_eq!(app.count("FROM outbox_event").await, distinct.len() as i64);
}

#[tokio::test]
async fn the_same_seed_replays_the_same_kcis() {
    let first = spawn_app(Backend::Sqlite).await;
    let second = spawn_app(Backend::Sqlite).await;
    let ids = |report: kci_tools::simulator::Report| -> HashSet<String> {
        report.accepted.into_iter().map(|a| a.kci_id).collect()
    };
    let one = ids(run(options(&first.address)).await.unwrap());
    let two = ids(run(options(&second.address)).await.unwrap());
    assert!(!one.is_empty());
    assert_eq!(one, two);
    let mut other = options(&first.address);
    other.seed = 6;
    other.first_gateway_id = 2_000_000;
    assert!(ids(run(other).await.unwrap()).is_disjoint(&one));
}

/// The benchmark is a tool, not a test of speed: this only checks that it still runs end to end
/// (tiny phases, PostgreSQL only) against the real binary and that its loss check finds nothing
/// missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_benchmark_runs_end_to_end_and_loses_nothing() {
    use clap::Parser;
    let args = kci_tools::cli::Cli::parse_from([
        "kci-tools",
        "bench",
        "--postgres-only",
        "--seconds",
        "2",
        "--backlog",
        "200",
        "--concurrency",
        "8",
        // Two instances on the database: the load goes through both, one relay publishes.
        "--instances",
        "2",
        "--postgres-url",
        &std::env::var("KCI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        "--amqp-url",
        &crate::helpers::amqp_url(),
        "--service-binary",
        env!("CARGO_BIN_EXE_kci-receiver"),
    ]);
    let kci_tools::cli::Command::Bench(args) = args.command else {
        unreachable!("parsed as bench")
    };
    let figures = kci_tools::bench::run(args)
        .await
        .expect("the benchmark runs");
    assert_eq!(figures.len(), 1);
    let postgres = &figures[0];
    assert!(postgres.accepted > 0);
    assert_eq!(postgres.missing, 0, "acknowledged KCIs missing on RabbitMQ");
    assert_eq!(postgres.order_violations, 0);
    // The tail's floor ran after the load phases, on warm connections, and committed.
    assert!(
        postgres.floor_transactions > 0,
        "the tail's floor measured nothing"
    );
}

/// `kci-tools bench-reads` on a small history: every read endpoint answered 200 under
/// concurrent readers without pause and at a fixed rate while intake ran, and the single-entity queries' plans use indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_benchmark_runs_end_to_end_on_a_bulk_loaded_history() {
    use clap::Parser;
    let args = kci_tools::cli::Cli::parse_from([
        "kci-tools",
        "bench-reads",
        "--kcis",
        "5000",
        "--readers",
        "4",
        "--seconds",
        "2",
        "--intake-rate",
        "20",
        "--postgres-url",
        &std::env::var("KCI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        "--service-binary",
        env!("CARGO_BIN_EXE_kci-receiver"),
    ]);
    let kci_tools::cli::Command::BenchReads(args) = args.command else {
        unreachable!("parsed as bench-reads")
    };
    let report = kci_tools::bench::reads::run(args)
        .await
        .expect("the read benchmark runs");
    // Both phases: readers without pause, then reads at a fixed rate.
    for endpoints in [&report.endpoints, &report.paced_endpoints] {
        assert_eq!(endpoints.len(), 16, "{report:?}");
        for (endpoint, calls, not_ok) in endpoints {
            assert!(*calls > 0, "{endpoint} was read");
            assert_eq!(*not_ok, 0, "{endpoint}: every answer 200");
        }
    }
    assert!(
        report.plans_without_index.is_empty(),
        "{:?}",
        report.plans_without_index
    );
}

/// The simulator as a CP's systems and the gateway together: each creating call goes through
/// kci-receiver's egress proxy to the simulated Tenant API, which answers with the gateway id;
/// the proxy records the original request, and the KCIs that follow are matched to it.
#[tokio::test]
async fn creating_calls_through_the_egress_proxy_register_the_original_requests() {
    use kci_tools::simulator::tenant_api::SimulatedTenantApi;

    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let (upstream, token_url) = (
        format!("{}/v1", gateway.base_url),
        format!("{}/token", gateway.base_url),
    );
    let app = crate::helpers::spawn_app_with(Backend::Postgres, move |settings| {
        crate::helpers::enable_egress(
            settings,
            upstream,
            token_url,
            ("simulated-cp", "simulated-secret"),
        );
        settings.validate().unwrap();
    })
    .await;
    let report = run(Options {
        egress_prefix: Some("/fibre-cafe/v1".to_owned()),
        ..options(&app.address)
    })
    .await
    .unwrap();
    assert!(
        report.other_statuses.is_empty() && report.transport_errors == 0,
        "{}",
        report.summary()
    );
    assert_eq!(report.registrations, 41, "{}", report.summary());
    assert_eq!(
        gateway.created(),
        41,
        "every creating call reached the gateway"
    );
    assert_eq!(gateway.tokens_issued(), 1, "the proxy cached its token");
    assert_eq!(
        app.count("FROM conversation WHERE source = 'EGRESS'").await,
        41,
        "the proxy recorded every original request"
    );
    assert_eq!(
        app.count("FROM tracked_entity WHERE correlation = 'MATCHED'")
            .await,
        41
    );
    assert_eq!(
        app.count("FROM tracked_entity WHERE correlation = 'UNMATCHED'")
            .await,
        0
    );
}

/// The drills are a tool, not a timed test: this runs each one briefly against the real binary
/// (2 kills, 3-second outages and freeze, PostgreSQL; the kill drill on SQLite too) and checks
/// that nothing acknowledged went missing and order held. The full drills are
/// `kci-tools drill` (docs/reliability.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drills_run_end_to_end_and_lose_nothing() {
    use clap::Parser;
    let args = kci_tools::cli::Cli::parse_from([
        "kci-tools",
        "drill",
        // Not broker-blocked: it blocks the whole broker, and other tests publish meanwhile.
        "--only",
        "kill,broker-outage,database-outage,database-freeze",
        "--kills",
        "2",
        "--kill-every-seconds",
        "1.5",
        "--broker-outage-seconds",
        "3",
        "--database-outage-seconds",
        "3",
        "--freeze-seconds",
        "3",
        "--rate",
        "60",
        "--sqlite",
        "--postgres-url",
        &std::env::var("KCI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        "--amqp-url",
        &crate::helpers::amqp_url(),
        "--service-binary",
        env!("CARGO_BIN_EXE_kci-receiver"),
    ]);
    let kci_tools::cli::Command::Drill(args) = args.command else {
        unreachable!("parsed as drill")
    };
    let findings = kci_tools::drill::run(args).await.expect("the drills run");
    assert_eq!(
        findings.len(),
        5,
        "four drills on PostgreSQL, one on SQLite"
    );
    for finding in &findings {
        assert!(finding.delivery.acknowledged > 0, "{:?}", finding.drill);
        assert!(finding.held(), "{:?} on {}", finding.drill, finding.store);
    }
    let freeze = findings
        .iter()
        .find(|f| f.drill == kci_tools::drill::Drill::DatabaseFreeze)
        .unwrap();
    assert!(
        freeze.slowest_during_fault < std::time::Duration::from_secs(7),
        "answered within the deadline while frozen: {:?}",
        freeze.slowest_during_fault
    );
    assert!(
        freeze
            .during_fault
            .keys()
            .all(|status| status == "503" || status == "204"),
        "{:?}",
        freeze.during_fault
    );
}

/// Issue 13: two `serve` and one `relay` on one PostgreSQL database and one RabbitMQ, started at
/// once on an empty database, KCIs for the same entities through both instances, each process
/// killed (-9) and restarted in turn: everything acknowledged is stored and published, in order
/// per entity, and no KCI is in the history twice. (`kci-tools drill --only multi-instance` is
/// the full version.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_on_one_database_lose_nothing_when_each_is_killed() {
    use clap::Parser;
    let args = kci_tools::cli::Cli::parse_from([
        "kci-tools",
        "drill",
        "--only",
        "multi-instance",
        "--kills",
        "3",
        "--kill-every-seconds",
        "1.5",
        "--rate",
        "80",
        "--postgres-url",
        &std::env::var("KCI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        "--amqp-url",
        &crate::helpers::amqp_url(),
        "--service-binary",
        env!("CARGO_BIN_EXE_kci-receiver"),
    ]);
    let kci_tools::cli::Command::Drill(args) = args.command else {
        unreachable!("parsed as drill")
    };
    let findings = kci_tools::drill::run(args).await.expect("the drill runs");
    assert_eq!(findings.len(), 1);
    let finding = &findings[0];
    assert!(
        finding.delivery.acknowledged > 50,
        "{}",
        finding.delivery.acknowledged
    );
    assert_eq!(finding.duplicate_history, 0);
    assert!(finding.held(), "{}", finding.recovery);
}

/// Issue 14's proving ground (gap repair is not built yet): a simulated gateway that loses a
/// share of its deliveries on purpose, and a simulated Tenant API whose GET endpoints still hold
/// every KCI it produced, in sequence order, as `updates[]`. kci-receiver sees the holes as gaps.
#[tokio::test]
async fn a_gateway_that_drops_deliveries_still_returns_them_in_its_updates() {
    use kci_tools::simulator::tenant_api::SimulatedTenantApi;
    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let app = spawn_app(Backend::Sqlite).await;
    let report = run(Options {
        base_url: app.address.clone(),
        gateway_password: GATEWAY_PASSWORD.to_owned(),
        orders: 20,
        ethernet_orders: 3,
        unsolicited_ceases: 3,
        tests: 8,
        problems: 8,
        concurrency: 4,
        seed: 14,
        redelivery_chance: 0.0,
        out_of_order_chance: 0.0,
        gap_chance: 0.0,
        drop_rate: 0.25,
        gateway_record: Some(gateway.record.clone()),
        ..Options::default()
    })
    .await
    .unwrap();
    assert!(report.dropped.len() >= 10, "{}", report.summary());
    assert!(report.summary().contains("dropped on purpose"));
    let client = reqwest::Client::new();
    for dropped in &report.dropped {
        assert_eq!(
            app.count(&format!(
                "FROM kci WHERE kci_id = {}",
                app.uuid_sql(&dropped.kci_id)
            ))
            .await,
            0,
            "a dropped KCI never reached kci-receiver"
        );
        let path = match dropped.entity_type.as_str() {
            "PROVIDE_ETHERNET_ORDER" => "ethernet/service-orders",
            "SERVICE_TEST" => "service-tests",
            "SERVICE_PROBLEM" => "service-problems",
            _ => "service-orders",
        };
        let entity: serde_json::Value = client
            .get(format!(
                "{}/v1/{path}/{}",
                gateway.base_url, dropped.gateway_id
            ))
            .bearer_auth("simulated-1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(entity["id"], dropped.gateway_id, "{entity}");
        let updates = entity["updates"].as_array().expect("updates[]");
        assert!(
            updates
                .iter()
                .any(|update| update["id"] == dropped.kci_id.as_str()),
            "the Tenant API still has it"
        );
        let sequence: Vec<i64> = updates
            .iter()
            .map(|update| update["sequenceNumber"].as_i64().unwrap())
            .collect();
        assert!(sequence.windows(2).all(|w| w[0] < w[1]), "{sequence:?}");
    }
    assert!(
        app.count("FROM tracked_entity WHERE flag_gap").await > 0,
        "kci-receiver flagged the holes it saw as gaps"
    );
    let unknown = client
        .get(format!("{}/v1/service-orders/1", gateway.base_url))
        .bearer_auth("simulated-1")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    let without_token = client
        .get(format!(
            "{}/v1/service-orders/{}",
            gateway.base_url, report.dropped[0].gateway_id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(without_token.status().as_u16(), 401);
}

/// `scripts/bench/index-cost` (one second per configuration, on the test build): every
/// configuration's schema is made and written to, and each prints its figures.
#[test]
fn the_index_cost_script_prints_figures_for_every_configuration() {
    let output = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/bench/index-cost"
    ))
    .arg("1")
    .env("KCI_RECEIVER_BIN", env!("CARGO_BIN_EXE_kci-receiver"))
    .env(
        "KCI_BENCH_POSTGRES_URL",
        std::env::var("KCI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
    )
    .output()
    .expect("the script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runs: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("| 1 |") || line.starts_with("| 2 |"))
        .collect();
    assert_eq!(runs.len(), 2, "{stdout}");
    for run in runs {
        assert_eq!(run.matches(" tx/s, ").count(), 4, "{stdout}");
        assert_eq!(run.matches(" ms CPU/tx |").count(), 4, "{stdout}");
    }
}
