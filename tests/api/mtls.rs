//! Mutual TLS for the gateway (design.md, "Authentication, configurable"): certificates made in
//! the test (rcgen), a real TLS listener (rustls), a real client (reqwest with rustls). A valid
//! client certificate posts KCIs; an unknown CA or an expired certificate fails the handshake; a
//! certificate with another name is 403; no certificate is 401. Certificates and client CAs are
//! reloaded without a restart. Behind a TLS-terminating proxy, the identity it passes on is
//! trusted from that proxy's address only.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::errors::assert_gateway_error;
use crate::helpers::{Backend, TestApp, eventually, fixture, spawn_app_with};

pub(crate) const GATEWAY_NAME: &str = "fibre-cafe-gateway";

pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate: (certificate PEM, key PEM).
    pub(crate) fn issue(
        &self,
        common_name: &str,
        sans: &[&str],
        client: bool,
        expired: bool,
    ) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}

/// Files of the listener: server certificate and key, client CA bundle.
pub(crate) struct Files {
    dir: PathBuf,
}

impl Files {
    pub(crate) fn new() -> Files {
        let dir = std::env::temp_dir().join(format!("kci-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    pub(crate) fn write(&self, server_ca: &Ca, client_ca: &Ca) {
        let (certificate, key) =
            server_ca.issue("localhost", &["localhost", "127.0.0.1"], false, false);
        // Written to a temporary name and renamed, as certificate managers do.
        for (name, content) in [
            ("server.pem", certificate),
            ("server.key", key),
            ("clients-ca.pem", client_ca.pem()),
        ] {
            let temporary = self.dir.join(format!("{name}.new"));
            std::fs::write(&temporary, content).unwrap();
            std::fs::rename(&temporary, self.dir.join(name)).unwrap();
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn client(server_ca: &Ca, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((certificate, key)) = identity {
        builder = builder.identity(
            reqwest::Identity::from_pem(format!("{certificate}{key}").as_bytes()).unwrap(),
        );
    }
    builder.build().unwrap()
}

async fn post(
    app: &TestApp,
    client: &reqwest::Client,
    id: u64,
) -> reqwest::Result<reqwest::Response> {
    let mut body = fixture("ProvideServiceOrderUpdate-1");
    body["id"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
    body["entity"]["id"] = serde_json::json!(id);
    client
        .post(format!("{}/kcis", app.tls_address.as_ref().unwrap()))
        .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
        .header("X-Conversation-ID", "conv-mtls")
        .json(&body)
        .send()
        .await
}

pub(crate) async fn spawn_mtls(files: &Files, trusted_proxies: Vec<String>) -> TestApp {
    let settings =
        |settings: &mut kci_receiver::config::Settings| use_mtls(settings, files, trusted_proxies);
    spawn_app_with(Backend::Sqlite, settings).await
}

/// The gateway authenticates with its client certificate on the HTTPS listener.
pub(crate) fn use_mtls(
    settings: &mut kci_receiver::config::Settings,
    files: &Files,
    trusted_proxies: Vec<String>,
) {
    settings.tls.enabled = true;
    settings.tls.port = 0;
    settings.tls.certificate_file = files.path("server.pem");
    settings.tls.private_key_file = files.path("server.key");
    settings.tls.client_ca_file = files.path("clients-ca.pem");
    settings.tls.reload_check_seconds = 1;
    settings.gateway_auth.method = kci_receiver::config::GatewayAuthMethod::Mtls;
    settings.gateway_auth.mtls.allowed_names = vec![GATEWAY_NAME.to_owned()];
    settings.gateway_auth.mtls.trusted_proxies = trusted_proxies;
    settings.validate().unwrap();
}

#[tokio::test]
async fn only_a_valid_client_certificate_with_the_allowed_name_may_post_kcis() {
    let (server_ca, client_ca, stranger_ca) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("unknown CA"),
    );
    let files = Files::new();
    files.write(&server_ca, &client_ca);
    let app = spawn_mtls(&files, Vec::new()).await;

    let valid = client_ca.issue(GATEWAY_NAME, &[], true, false);
    let response = post(&app, &client(&server_ca, Some(&valid)), 1)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    let principal = app
        .rows_eventually(
            "SELECT principal FROM audit_log WHERE response_status = 204",
            1,
        )
        .await;
    let principal = principal[0]["principal"].as_str().unwrap().to_owned();
    assert!(
        principal.contains(&format!("CN={GATEWAY_NAME}")) && principal.contains("serial"),
        "{principal}"
    );

    // The wrong name, from the right CA: known, not allowed.
    let other = client_ca.issue("someone-else", &[], true, false);
    let response = post(&app, &client(&server_ca, Some(&other)), 2)
        .await
        .unwrap();
    assert_gateway_error(response, 403, "NOT_AUTHORISED").await;
    // A subject alternative name counts as a name.
    let by_san = client_ca.issue("other-cn", &[GATEWAY_NAME], true, false);
    assert_eq!(
        post(&app, &client(&server_ca, Some(&by_san)), 3)
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    // No certificate: 401 in the gateway's format, with a challenge.
    let response = post(&app, &client(&server_ca, None), 4).await.unwrap();
    assert!(response.headers().contains_key("www-authenticate"));
    assert_gateway_error(response, 401, "NOT_AUTHORISED").await;
    // An unknown CA and an expired certificate fail the handshake: no HTTP answer at all.
    let unknown = stranger_ca.issue(GATEWAY_NAME, &[], true, false);
    assert!(
        post(&app, &client(&server_ca, Some(&unknown)), 5)
            .await
            .is_err()
    );
    let expired = client_ca.issue(GATEWAY_NAME, &[], true, true);
    assert!(
        post(&app, &client(&server_ca, Some(&expired)), 6)
            .await
            .is_err()
    );
    // Basic credentials mean nothing under mutual TLS.
    let basic = client(&server_ca, None)
        .post(format!("{}/kcis", app.tls_address.as_ref().unwrap()))
        .basic_auth(
            crate::helpers::GATEWAY_USER,
            Some(crate::helpers::GATEWAY_PASSWORD),
        )
        .header("X-Request-ID", "r")
        .header("X-Conversation-ID", "c")
        .json(&fixture("ProvideServiceOrderUpdate-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 401);
    assert_eq!(app.count("FROM kci").await, 2);
}

#[tokio::test]
async fn certificates_and_client_cas_are_reloaded_without_a_restart() {
    let (server_ca, client_ca) = (Ca::new("server CA 1"), Ca::new("client CA 1"));
    let files = Files::new();
    files.write(&server_ca, &client_ca);
    let app = spawn_mtls(&files, Vec::new()).await;
    let old_client = client_ca.issue(GATEWAY_NAME, &[], true, false);
    assert_eq!(
        post(&app, &client(&server_ca, Some(&old_client)), 1)
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );

    // Both rotated: a new server certificate from a new CA, and a new client CA.
    let (new_server_ca, new_client_ca) = (Ca::new("server CA 2"), Ca::new("client CA 2"));
    files.write(&new_server_ca, &new_client_ca);
    let new_client = new_client_ca.issue(GATEWAY_NAME, &[], true, false);
    let reloaded = eventually(Duration::from_secs(10), || async {
        post(&app, &client(&new_server_ca, Some(&new_client)), 2)
            .await
            .is_ok_and(|r| r.status().as_u16() == 204)
    })
    .await;
    assert!(
        reloaded,
        "the new server certificate and client CA are used"
    );
    assert!(
        post(&app, &client(&new_server_ca, Some(&old_client)), 3)
            .await
            .is_err(),
        "a client of the old CA is refused"
    );
    assert!(
        post(&app, &client(&server_ca, Some(&new_client)), 4)
            .await
            .is_err(),
        "the old server certificate is gone"
    );
}

#[tokio::test]
async fn behind_a_tls_terminating_proxy_the_identity_header_is_trusted_from_the_proxy_only() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = Files::new();
    files.write(&server_ca, &client_ca);
    let send = |app: &TestApp, identity: &str| {
        let mut body = fixture("ServiceTestUpdate-3");
        body["id"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
        app.client
            .post(format!("{}/kcis", app.address))
            .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
            .header("X-Conversation-ID", "conv-proxy")
            .header("X-Client-Cert", identity.to_owned())
            .json(&body)
            .send()
    };
    let trusting = spawn_mtls(&files, vec!["127.0.0.0/8".to_owned()]).await;
    let envoy = format!("Hash=1;Subject=\"CN={GATEWAY_NAME},O=Fibre Cafe\";DNS=gw.example");
    assert_eq!(
        send(&trusting, &envoy).await.unwrap().status().as_u16(),
        204
    );
    assert_eq!(
        send(&trusting, &format!("CN={GATEWAY_NAME}"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        send(&trusting, "CN=intruder")
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );

    let not_trusting = spawn_mtls(&files, vec!["10.0.0.0/8".to_owned()]).await;
    let response = send(&not_trusting, &format!("CN={GATEWAY_NAME}"))
        .await
        .unwrap();
    assert_gateway_error(response, 401, "NOT_AUTHORISED").await;
}
