//! The OpenAPI document tells the truth: it passes a validator, and schemathesis, generating
//! requests from it (valid and invalid, with every role's credentials and without), finds no
//! server error, no request valid by the document that is refused, no invalid one that is
//! accepted, and no answer (status, content type, headers, body) the document does not describe.
//!
//! Both tools come from the Python package registry: `scripts/test` installs them and passes
//! their paths in `KCI_TEST_SCHEMATHESIS` and `KCI_TEST_OPENAPI_VALIDATOR`.

use std::process::Command;

use base64::Engine;
use serde_json::json;

use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, EGRESS_PASSWORD, EGRESS_USER, GATEWAY_PASSWORD,
    GATEWAY_USER, READ_PASSWORD, READ_USER, enable_egress, fixture, fixture_names, spawn_app_with,
};

/// A Python tool installed by `scripts/test`; fails (never skips) when it is missing.
fn tool(variable: &str, name: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{name} is needed: run the tests with scripts/test (it installs it), or set {variable} \
             to its path (pip install schemathesis==4.32.5 openapi-spec-validator==0.9.0)"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_the_handlers_do_exactly_what_it_says() {
    let schemathesis = tool("KCI_TEST_SCHEMATHESIS", "schemathesis");
    let validator = tool("KCI_TEST_OPENAPI_VALIDATOR", "openapi-spec-validator");
    let tenant_api = kci_tools::simulator::tenant_api::SimulatedTenantApi::start("127.0.0.1:0")
        .expect("the simulated Tenant API starts");
    let (upstream, token_url) = (
        format!("{}/v1", tenant_api.base_url),
        format!("{}/token", tenant_api.base_url),
    );
    let app = spawn_app_with(Backend::Postgres, move |settings| {
        enable_egress(settings, upstream, token_url, ("cp", "secret"));
        settings.operations_auth.egress_password =
            Some(secrecy::SecretString::from(EGRESS_PASSWORD));
    })
    .await;
    // Something to find: every example KCI and an original request.
    for name in fixture_names() {
        app.post_kci(&fixture(&name), &format!("conv-{name}")).await;
    }
    app.register_conversation(&json!({
        "conversationId": "conv-ProvideServiceOrderUpdate-1",
        "operation": "POST /service-orders",
        "gatewayId": 12345
    }))
    .await;

    let document = app.get("/openapi.json").await.text().await.unwrap();
    let file = std::env::temp_dir().join(format!("kci-openapi-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, &document).unwrap();
    let validated = Command::new(&validator).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        validated.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    let url = format!("{}/openapi.json", app.address);
    let roles: [(&str, Option<(&str, &str)>); 5] = [
        ("no credentials", None),
        ("gateway", Some((GATEWAY_USER, GATEWAY_PASSWORD))),
        ("operations read", Some((READ_USER, READ_PASSWORD))),
        ("operations admin", Some((ADMIN_USER, ADMIN_PASSWORD))),
        ("operations egress", Some((EGRESS_USER, EGRESS_PASSWORD))),
    ];
    let runs = roles.map(|(role, credentials)| {
        let mut command = Command::new(&schemathesis);
        // Its cache (`.schemathesis/`) goes to a temporary folder, not the repository.
        command.current_dir(std::env::temp_dir());
        command.args([
            "--no-color",
            "run",
            url.as_str(),
            "--checks",
            "all",
            "--max-examples",
            "15",
            "--generation-deterministic",
        ]);
        if let Some((user, password)) = credentials {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            command.args(["-H", &format!("Authorization: Basic {basic}")]);
        }
        (role, tokio::task::spawn_blocking(move || command.output()))
    });
    for (role, run) in runs {
        let output = run.await.unwrap().expect("schemathesis runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "schemathesis with {role}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
