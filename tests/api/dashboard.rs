//! The dashboard, end to end in a real headless Chromium: load the page, search an order posted
//! by the test, see its timeline with the right states. The screenshot is saved for people.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::{Backend, READ_PASSWORD, READ_USER, kci, spawn_app};

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

#[tokio::test]
async fn the_dashboard_finds_an_order_and_shows_its_timeline_in_a_real_browser() {
    let app = spawn_app(Backend::Sqlite).await;
    let lifecycle = [
        (1, "SENT_TO_SUPPLIER", "UPDATE"),
        (2, "ACKNOWLEDGED", "ACKNOWLEDGED"),
        (3, "IN_PROGRESS", "COMMITTED"),
        (4, "COMPLETED", "COMPLETED"),
    ];
    for (sequence, status, reason) in lifecycle {
        let body = kci("PROVIDE_ORDER", 424_242, sequence, status, reason);
        assert_eq!(
            app.post_kci(&body, "conv-dashboard")
                .await
                .status()
                .as_u16(),
            204
        );
    }
    let page = app.address.replacen(
        "http://",
        &format!("http://{READ_USER}:{READ_PASSWORD}@"),
        1,
    );
    let url = format!("{page}/dashboard#q=424242");

    let dom = headless(url.clone(), "--dump-dom".to_owned()).await;
    assert!(
        dom.contains(r#"id="entity-title">PROVIDE_ORDER 424242"#),
        "the search found the order:\n{dom}"
    );
    // The rendered timeline only (the page's script also contains the attribute's template).
    let timeline = dom
        .split_once(r#"id="timeline">"#)
        .and_then(|(_, rest)| rest.split_once("</ol>"))
        .map(|(timeline, _)| timeline)
        .expect("a rendered timeline");
    let statuses: Vec<&str> = timeline
        .match_indices(r#"data-status=""#)
        .map(|(at, marker)| {
            let rest = &timeline[at + marker.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "SENT_TO_SUPPLIER",
            "ACKNOWLEDGED",
            "IN_PROGRESS",
            "COMPLETED"
        ],
        "the timeline, in order"
    );
    assert!(
        dom.contains("Needs attention") && dom.contains("UNMATCHED"),
        "the attention view loaded"
    );
    assert!(
        dom.contains("database <b class=\"ok\">up</b>"),
        "the health line loaded"
    );

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    headless(url, format!("--screenshot={}", screenshot.display())).await;
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot was saved at {}",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());
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
