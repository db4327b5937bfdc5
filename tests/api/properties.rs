//! Property: whatever valid variation of the documented KCIs the gateway sends, it gets 204 and
//! is recorded exactly once; whatever bytes it sends, it gets an answer in the gateway's format.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    BACKENDS, Backend, GATEWAY_PASSWORD, GATEWAY_USER, fixture, fixture_names, spawn_app,
};

/// A fixture with a fresh id, another entity and sequence number, undocumented values and extra
/// fields: all things the schema allows.
fn varied_fixture() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(fixture_names()),
        any::<u128>(),
        1..1_000_000u64,
        1..10_000i64,
        "[A-Z][A-Z_]{0,24}",
        prop::collection::btree_map("[a-z][a-zA-Z]{0,10}", any::<i32>(), 0..4),
    )
        .prop_map(|(name, id, gateway_id, sequence, new_value, extras)| {
            let mut body = fixture(&name);
            body["id"] = json!(Uuid::from_u128(id).to_string());
            body["entity"]["id"] = json!(gateway_id);
            body["sequenceNumber"] = json!(sequence);
            for companion in ["information", "action"] {
                if body.get(companion).is_some() {
                    body[companion]["type"] = json!(new_value);
                }
            }
            for (key, value) in extras {
                body[format!("x{key}")] = json!(value);
            }
            body
        })
}

#[test]
fn every_valid_variation_of_the_documented_kcis_is_accepted_once() {
    for backend in BACKENDS {
        every_valid_variation_is_accepted_once_on(backend);
    }
}

fn every_valid_variation_is_accepted_once_on(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(spawn_app(backend));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    // The runner wants an `Fn`: the ids are collected through a RefCell.
    let posted = std::cell::RefCell::new(std::collections::HashSet::new());
    runner
        .run(&varied_fixture(), |body| {
            let response = runtime.block_on(app.post_kci(&body, "conv-property"));
            let status = response.status().as_u16();
            let text = runtime.block_on(response.text()).unwrap();
            prop_assert_eq!(status, 204, "{:?}: {} -> {}", backend, body, text);
            posted
                .borrow_mut()
                .insert(body["id"].as_str().unwrap().to_owned());
            Ok(())
        })
        .unwrap();
    let stored = runtime.block_on(app.count("FROM kci"));
    assert_eq!(stored as usize, posted.borrow().len());
}

#[test]
fn arbitrary_bytes_get_an_answer_in_the_gateway_format_never_a_crash() {
    for backend in BACKENDS {
        arbitrary_bytes_on(backend);
    }
}

fn arbitrary_bytes_on(backend: Backend) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(spawn_app(backend));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let bodies = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "\\PC{0,200}".prop_map(String::into_bytes),
        Just(b"{\"id\": \"00000000-0000-0000-0000-000000000000\", \"entity\": []}".to_vec()),
    ];
    runner
        .run(&bodies, |body| {
            let response = runtime
                .block_on(
                    app.client
                        .post(format!("{}/kcis", app.address))
                        .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
                        .header("X-Request-ID", "req-fuzz")
                        .header("X-Conversation-ID", "conv-fuzz")
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send(),
                )
                .unwrap();
            let status = response.status().as_u16();
            prop_assert!(
                status == 400 || status == 422,
                "{:?}: status {}",
                backend,
                status
            );
            let error: Value = runtime.block_on(response.json()).unwrap();
            prop_assert!(
                error["uuid"].is_string()
                    && error["code"].is_string()
                    && error["messages"].is_array()
            );
            Ok(())
        })
        .unwrap();
}
