//! OpenTelemetry: with the standard `OTEL_EXPORTER_OTLP_ENDPOINT` set, `kci-receiver serve`
//! exports each request's span over OTLP/HTTP; the span of a `POST /kcis` is the child of the
//! gateway's `traceparent`, and the AMQP message's `traceparent` names that exported span as the
//! consumer's parent: one trace from the gateway through kci-receiver into the back-office. The
//! collector is the test's own (an HTTP server that decodes what it receives).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::broker::TestBroker;
use crate::helpers::{
    Backend, ChildProcess, GATEWAY_PASSWORD, GATEWAY_USER, TestDatabase, eventually, kci,
};

const GATEWAY_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GATEWAY_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP collector: every span it receives.
async fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let shared = web::Data::new(spans.clone());
    let server = HttpServer::new(move || {
        App::new().app_data(shared.clone()).route(
            "/v1/traces",
            web::post().to(
                |body: web::Bytes, spans: web::Data<Arc<Mutex<Vec<Span>>>>| async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut spans = spans.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans);
                        }
                    }
                    HttpResponse::Ok()
                        .content_type("application/x-protobuf")
                        .finish()
                },
            ),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let address = format!("http://{}", server.addrs()[0]);
    tokio::spawn(server.run());
    (address, spans)
}

#[tokio::test]
async fn the_gateways_trace_goes_through_the_exported_intake_span_into_the_message() {
    let (collector_url, spans) = collector().await;
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let database = TestDatabase::create(Backend::Sqlite).await;
    let port = kci_tools::service::free_port().unwrap();
    let _service = ChildProcess::spawn(
        crate::cli::kci_receiver()
            .arg("serve")
            .env("KCI__DATABASE__URL", &database.url)
            .env("KCI__SERVER__PORT", port.to_string())
            .env("KCI__GATEWAY_AUTH__BASIC_USERNAME", GATEWAY_USER)
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", GATEWAY_PASSWORD)
            .env("KCI__AMQP__URL", crate::helpers::amqp_url())
            .env("KCI__AMQP__EXCHANGE", &broker.amqp.exchange)
            .env(
                "KCI__AMQP__ALTERNATE_EXCHANGE",
                &broker.amqp.alternate_exchange,
            )
            .env("KCI__AMQP__UNROUTED_QUEUE", &broker.amqp.unrouted_queue)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_SERVICE_NAME", "kci-receiver-under-test")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            reqwest::get(format!("{base}/readyz"))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await,
        "the service started"
    );
    let answer = reqwest::Client::new()
        .post(format!("{base}/kcis"))
        .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
        .header("X-Request-ID", "r-traced")
        .header("X-Conversation-ID", "c-traced")
        .header(
            "traceparent",
            format!("00-{GATEWAY_TRACE}-{GATEWAY_SPAN}-01"),
        )
        .json(&kci("SERVICE_TEST", 31, 1, "SENT_TO_SUPPLIER", "UPDATE"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 204);

    let messages = capture.wait_for(1, Duration::from_secs(20)).await;
    let published = messages[0].headers["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = published.split('-').collect();
    assert_eq!(parts[1], GATEWAY_TRACE, "{published}");

    assert!(
        eventually(Duration::from_secs(15), || async {
            spans
                .lock()
                .unwrap()
                .iter()
                .any(|s| hex(&s.trace_id) == GATEWAY_TRACE)
        })
        .await,
        "the intake span was exported"
    );
    let spans = spans.lock().unwrap();
    let intake = spans
        .iter()
        .find(|s| hex(&s.trace_id) == GATEWAY_TRACE && hex(&s.span_id) == parts[2])
        .unwrap_or_else(|| {
            panic!(
                "the span the message names ({published}) was exported: {:?}",
                spans
                    .iter()
                    .map(|s| (hex(&s.trace_id), hex(&s.span_id), s.name.clone()))
                    .collect::<Vec<_>>()
            )
        });
    assert_eq!(
        hex(&intake.parent_span_id),
        GATEWAY_SPAN,
        "the gateway's span is its parent"
    );
    assert!(intake.name.contains("/kcis"), "{}", intake.name);
}
