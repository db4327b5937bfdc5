//! The dashboard, end to end in a real headless Chromium: an operator's walk through every view
//! and action (driven by Playwright), and gap repair's marks in a timeline. The screenshots are
//! saved for people, under `target/tmp/dashboard/`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, GATEWAY_PASSWORD, GATEWAY_USER, READ_PASSWORD, READ_USER,
    kci, spawn_app,
};

/// Debian's Chromium (scripts/test installs it when missing); `KCI_TEST_CHROMIUM` overrides.
fn chromium() -> PathBuf {
    let path = PathBuf::from(
        std::env::var("KCI_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()),
    );
    assert!(
        path.exists(),
        "Chromium is required for the dashboard test and is not at {} (apt-get install chromium, or set KCI_TEST_CHROMIUM)",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=...`).
async fn headless(url: String, mode: String) -> String {
    let binary = chromium();
    tokio::task::spawn_blocking(move || {
        let profile =
            std::env::temp_dir().join(format!("kci-chromium-{}", uuid::Uuid::new_v4().simple()));
        // The flags keep Chromium off the network it does not have here.
        let output = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(mode)
            .arg(url)
            .output()
            .expect("run chromium");
        let _ = std::fs::remove_dir_all(profile);
        assert!(
            output.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// Issue 16, end to end in Chromium driven by Playwright (`scripts/js/dashboard-walkthrough.mjs`):
/// the overview's funnels, charts and attention counts, its live refresh, a number leading to
/// its filtered list, the filter controls and a shared link, an entity's timeline with its raw
/// KCI, outbox event, deliveries and support text, an admin registering the original request
/// and retrying a dead event, a read-only user seeing no actions, a phone's width in dark mode.
/// Screenshots of each view land in `target/tmp/dashboard/`.
#[tokio::test]
async fn an_operator_walks_through_the_dashboard_in_a_real_browser() {
    let app = spawn_app(Backend::Sqlite).await;
    assert_eq!(
        app.register_conversation(&json!({
            "conversationId": "conv-matched-424243", "operation": "POST /service-orders", "gatewayId": 424_243
        }))
        .await
        .status()
        .as_u16(),
        201
    );
    let posts = [
        (
            "PROVIDE_ORDER",
            424_242,
            1,
            "SENT_TO_SUPPLIER",
            "UPDATE",
            "conv-done-424242",
        ),
        (
            "PROVIDE_ORDER",
            424_242,
            2,
            "IN_PROGRESS",
            "COMMITTED",
            "conv-done-424242",
        ),
        (
            "PROVIDE_ORDER",
            424_242,
            3,
            "COMPLETED",
            "COMPLETED",
            "conv-done-424242",
        ),
        (
            "PROVIDE_ORDER",
            424_243,
            1,
            "SENT_TO_SUPPLIER",
            "UPDATE",
            "conv-matched-424243",
        ),
        (
            "PROVIDE_ORDER",
            424_243,
            2,
            "IN_PROGRESS",
            "COMMITTED",
            "conv-matched-424243",
        ),
        (
            "PROVIDE_ORDER",
            777_001,
            1,
            "SENT_TO_SUPPLIER",
            "UPDATE",
            "conv-unmatched-777001",
        ),
        (
            "PROVIDE_ORDER",
            777_001,
            2,
            "IN_PROGRESS",
            "COMMITTED",
            "conv-unmatched-777001",
        ),
        (
            "SERVICE_TEST",
            9_001,
            1,
            "IN_PROGRESS",
            "UPDATE",
            "conv-test-9001",
        ),
        (
            "CEASE_ORDER",
            9_002,
            1,
            "ACKNOWLEDGED",
            "ACKNOWLEDGED",
            "conv-cease-9002",
        ),
    ];
    for (entity_type, id, sequence, status, reason, conversation) in posts {
        let body = kci(entity_type, id, sequence, status, reason);
        assert_eq!(
            app.post_kci(&body, conversation).await.status().as_u16(),
            204
        );
    }
    // One event the broker "kept refusing" (the tests' relay is off: every event is pending).
    sea_orm::ConnectionTrait::execute_unprepared(
        &app.db,
        "UPDATE outbox_event SET status = 'DEAD', last_error = 'refused in the test' \
         WHERE id = (SELECT MIN(id) FROM outbox_event)",
    )
    .await
    .unwrap();

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out_dir).unwrap();
    let plan = json!({
        "base": app.address,
        "outDir": out_dir,
        "chromium": chromium(),
        "admin": [ADMIN_USER, ADMIN_PASSWORD],
        "read": [READ_USER, READ_PASSWORD],
        "gateway": [GATEWAY_USER, GATEWAY_PASSWORD],
        "funnelCount": "PROVIDE_ORDER:IN_PROGRESS",
        "unmatched": {"entityType": "PROVIDE_ORDER", "gatewayId": "777001"},
        "liveKci": kci("SERVICE_TEST", 9_003, 1, "SENT_TO_SUPPLIER", "UPDATE"),
    });
    let plan_file =
        std::env::temp_dir().join(format!("kci-walkthrough-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/js/dashboard-walkthrough.mjs"
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(&plan_file).output()
    })
    .await
    .unwrap()
    .expect("Node.js runs the walkthrough (scripts/test installs Playwright; Node.js and npm are needed)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the walkthrough did not get through:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the walkthrough's observations");
    println!("dashboard screenshots: {}", out_dir.display());

    // The overview: a funnel per lifecycle whose numbers are the counts; KCIs per minute by
    // update type; the attention counts; charts that say what they show; every link a link.
    let overview = &seen["overview"];
    assert_eq!(
        overview["funnelCounts"]["PROVIDE_ORDER:IN_PROGRESS"], "2",
        "{overview:#}"
    );
    assert_eq!(overview["funnelCounts"]["PROVIDE_ORDER:COMPLETED"], "1");
    assert_eq!(overview["funnelCounts"]["CEASE_ORDER:ACKNOWLEDGED"], "1");
    assert_eq!(overview["kcis"]["INFORMATIONAL"], "9");
    assert_eq!(
        overview["attention"]["unmatched"], "4",
        "777001, 424242, the test and the cease"
    );
    assert_eq!(overview["attention"]["dead events"], "1");
    let charts = overview["charts"].as_array().unwrap();
    assert!(
        charts
            .iter()
            .any(|c| c.as_str().unwrap().contains("KCIs per minute")),
        "{charts:?}"
    );
    assert_eq!(
        overview["linksWithoutHref"], 0,
        "every link is reachable by keyboard"
    );
    let live_regions = overview["liveRegions"].as_array().unwrap();
    assert!(live_regions.contains(&json!("view")) && live_regions.contains(&json!("health")));
    let keyboard = seen["keyboard"].as_array().unwrap();
    assert_eq!(keyboard[0]["text"], "Skip to content");
    assert!(
        keyboard
            .iter()
            .all(|f| f["tag"] == "A" && f["outline"] != "none"),
        "focus is visible: {keyboard:?}"
    );
    // Live: the new KCI showed up without a reload.
    assert_eq!(seen["livePostStatus"], 204);
    assert_eq!(seen["live"]["informational"], 10);
    assert_eq!(seen["live"]["notReloaded"], true);

    // The number led to its list, filtered in the address.
    let list = &seen["list"];
    let hash = list["hash"].as_str().unwrap();
    assert!(
        hash.starts_with("#/list/service-orders?")
            && hash.contains("entityType=PROVIDE_ORDER")
            && hash.contains("status=IN_PROGRESS"),
        "{hash}"
    );
    let mut rows: Vec<&str> = list["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    rows.sort();
    assert_eq!(rows, ["PROVIDE_ORDER 424243", "PROVIDE_ORDER 777001"]);
    assert!(
        list["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s == "IN_PROGRESS")
    );
    let filtered = &seen["filtered"];
    assert!(
        filtered["hash"]
            .as_str()
            .unwrap()
            .contains("correlation=unmatched")
    );
    let unmatched_orders = json!([
        "PROVIDE_ORDER 777001",
        "PROVIDE_ORDER 424242",
        "CEASE_ORDER 9002"
    ]);
    let as_set = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(as_set(&filtered["rows"]), as_set(&unmatched_orders));
    assert_eq!(
        filtered["sharedRows"], filtered["rows"],
        "a shared link shows the same view"
    );
    assert_eq!(filtered["sharedSelect"], "unmatched");

    let paging = &seen["paging"];
    assert_eq!(
        paging["firstPage"].as_array().unwrap().len(),
        2,
        "{paging:#}"
    );
    assert_eq!(paging["secondPage"].as_array().unwrap().len(), 2);
    assert!(as_set(&paging["firstPage"]).is_disjoint(&as_set(&paging["secondPage"])));
    assert!(
        paging["hash"].as_str().unwrap().contains("limit=2"),
        "the page size is kept"
    );

    // The entity view.
    let entity = &seen["entity"];
    assert!(
        entity["title"]
            .as_str()
            .unwrap()
            .starts_with("PROVIDE_ORDER 777001"),
        "{entity:#}"
    );
    assert_eq!(
        entity["timeline"],
        json!(["SENT_TO_SUPPLIER", "IN_PROGRESS"])
    );
    let detail = entity["kciDetail"].as_str().unwrap();
    assert!(detail.contains("Outbox event: PENDING"), "{detail}");
    assert!(
        detail.contains("\"sequenceNumber\": 1"),
        "the raw KCI: {detail}"
    );
    let support = entity["supportText"].as_str().unwrap();
    assert!(support.contains("X-Request-ID"), "{support}");
    assert_eq!(
        entity["clipboard"], entity["supportText"],
        "the copy button copied it"
    );
    assert_eq!(
        entity["actions"],
        json!(["replay", "reconcile", "register"])
    );
    assert_eq!(entity["originalRequestBefore"], "Not registered.");

    // The admin's actions took effect, through the API.
    let register = &seen["register"];
    assert!(
        register["originalRequest"]
            .as_str()
            .unwrap()
            .contains("POST /service-orders"),
        "{register:#}"
    );
    assert_eq!(
        register["registerFormLeft"], 0,
        "matched now: nothing left to register"
    );
    assert_eq!(
        app.entity("PROVIDE_ORDER", "777001").await.correlation,
        entity::tracked_entity::Correlation::Matched
    );
    assert_eq!(
        (
            seen["dead"]["before"].as_u64(),
            seen["dead"]["after"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert_eq!(
        app.count("FROM outbox_event WHERE status = 'DEAD'").await,
        0
    );
    assert_eq!(seen["consoleErrors"], json!([]), "no script error");

    // Read-only: no action is offered.
    assert_eq!(seen["readOnly"]["role"], "read");
    assert_eq!(seen["readOnly"]["entityActions"], 0);
    assert_eq!(seen["readOnly"]["deadButtons"], 0);

    // A phone's width: nothing wider than the screen; dark mode by preference.
    assert!(
        seen["phone"]["scrollWidth"].as_u64().unwrap() <= 390,
        "{:#}",
        seen["phone"]
    );
    assert_ne!(
        seen["phone"]["background"], "rgb(246, 247, 249)",
        "dark background"
    );
    for view in [
        "overview",
        "list",
        "entity",
        "dead-events",
        "overview-phone-dark",
    ] {
        let file = out_dir.join(format!("{view}.png"));
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "a screenshot of {view} at {}",
            file.display()
        );
    }
}

/// A KCI recovered by gap repair stands out in the timeline, and the entity's reconciliations
/// are listed under it.
#[tokio::test]
async fn the_dashboard_shows_recovered_kcis_and_reconciliations_distinctly() {
    let gateway =
        kci_tools::simulator::tenant_api::SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let app = crate::helpers::spawn_app_with(Backend::Sqlite, |settings| {
        crate::helpers::enable_egress(
            settings,
            format!("{}/v1", gateway.base_url),
            format!("{}/token", gateway.base_url),
            ("c", "s"),
        );
        settings.reconcile.enabled = false;
    })
    .await;
    let story: Vec<_> = [
        (1, "SENT_TO_SUPPLIER", "UPDATE"),
        (2, "IN_PROGRESS", "UPDATE"),
        (3, "COMPLETED", "COMPLETED"),
    ]
    .into_iter()
    .map(|(sequence, status, reason)| kci("SERVICE_TEST", 535_353, sequence, status, reason))
    .collect();
    for body in &story {
        gateway.record.record(body);
    }
    for body in [&story[0], &story[2]] {
        assert_eq!(app.post_kci(body, "conv-dash").await.status().as_u16(), 204);
    }
    let reconciled = app
        .client
        .post(format!(
            "{}/api/v1/service-tests/535353/reconcile",
            app.address
        ))
        .basic_auth(
            crate::helpers::ADMIN_USER,
            Some(crate::helpers::ADMIN_PASSWORD),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reconciled.status().as_u16(), 200);
    let page = app.address.replacen(
        "http://",
        &format!("http://{READ_USER}:{READ_PASSWORD}@"),
        1,
    );
    let dom = headless(
        format!("{page}/dashboard#q=535353"),
        "--dump-dom".to_owned(),
    )
    .await;
    let timeline = dom
        .split_once(r#"id="timeline">"#)
        .and_then(|(_, rest)| rest.split_once("</ol>"))
        .map(|(timeline, _)| timeline)
        .expect("a rendered timeline");
    assert_eq!(
        timeline.matches(r#"data-source="RECONCILIATION""#).count(),
        1,
        "one recovered entry:\n{timeline}"
    );
    assert_eq!(timeline.matches(r#"class="flag recovered""#).count(), 1);
    let reconciliations = dom
        .split_once(r#"id="reconciliations">"#)
        .map(|(_, rest)| rest)
        .expect("the reconciliations table");
    assert!(reconciliations.contains("RECOVERED"), "{reconciliations}");
}
