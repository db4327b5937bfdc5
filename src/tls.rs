//! The HTTPS listener (`[tls]`): the server's certificate and the CAs client certificates must
//! chain to, both read from PEM files and read again, without a restart, on SIGHUP and when the
//! files change. rustls with the ring provider; TLS 1.2 and 1.3.
//!
//! A client certificate is asked for whenever `tls.client_ca_file` is set, and verified during
//! the handshake (chain, validity dates, usage): an unknown CA or an expired certificate fails
//! the handshake. A client without a certificate still connects, so that `POST /kcis` can answer
//! 401 in the gateway's format (under `gateway_auth.method = "mtls"`) and the attempt is audited.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_util::sync::CancellationToken;

use crate::auth::mtls::ClientIdentity;
use crate::config::TlsSettings;

/// What a TLS connection tells the handlers: the client's verified certificate, if it sent one.
#[derive(Debug, Clone)]
pub struct TlsConnection {
    pub client: Option<ClientIdentity>,
}

/// Puts a [`TlsConnection`] into the connection data of requests that came over TLS (an
/// `HttpServer::on_connect` callback).
pub fn on_connect(connection: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    use actix_tls::accept::rustls_0_23::TlsStream;
    if let Some(tls) = connection.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>() {
        let (_, session) = tls.get_ref();
        let client = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| ClientIdentity::from_der(leaf));
        data.insert(TlsConnection { client });
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's configuration, and the handle that reloads its files.
pub struct Tls {
    pub config: ServerConfig,
    pub reloader: Reloader,
}

/// Reads the files again into the running listener.
#[derive(Clone)]
pub struct Reloader {
    settings: TlsSettings,
    certificate: Arc<RwLock<Arc<CertifiedKey>>>,
    verifier: Arc<RwLock<Arc<dyn ClientCertVerifier>>>,
}

impl Tls {
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Tls> {
        let (certificate, verifier) = read_files(settings)?;
        let reloader = Reloader {
            settings: settings.clone(),
            certificate: Arc::new(RwLock::new(certificate)),
            verifier: Arc::new(RwLock::new(verifier)),
        };
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(SwappableVerifier(reloader.verifier.clone())))
            .with_cert_resolver(Arc::new(SwappableCertificate(reloader.certificate.clone())));
        Ok(Tls { config, reloader })
    }
}

impl Reloader {
    /// Reads the files again; on failure the listener keeps what it had.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (certificate, verifier) = read_files(&self.settings)?;
        if let Ok(mut current) = self.certificate.write() {
            *current = certificate;
        }
        if let Ok(mut current) = self.verifier.write() {
            *current = verifier;
        }
        tracing::info!("TLS certificate and client CAs reloaded");
        Ok(())
    }

    /// Reloads on SIGHUP and, every `reload_check_seconds`, when a file changed; until
    /// `shutdown`.
    pub fn watch(self, shutdown: CancellationToken) {
        let files = [
            self.settings.certificate_file.clone(),
            self.settings.private_key_file.clone(),
            self.settings.client_ca_file.clone(),
        ];
        let modified = move || -> Vec<Option<SystemTime>> {
            files
                .iter()
                .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                .collect()
        };
        let check = Duration::from_secs(self.settings.reload_check_seconds);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut last = modified();
            loop {
                let changed = async {
                    if check.is_zero() {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(check).await;
                };
                #[cfg(unix)]
                let hung_up = async {
                    match hangup.as_mut() {
                        Some(signal) => {
                            signal.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hung_up = std::future::pending::<()>();
                let forced = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = hung_up => true,
                    _ = changed => false,
                };
                let now = modified();
                if forced || now != last {
                    last = now;
                    if let Err(error) = self.reload() {
                        tracing::error!(error = %error, "could not reload the TLS files; keeping the current ones");
                    }
                }
            }
        });
    }
}

/// The certificate chain with its key, and the client verifier.
fn read_files(
    settings: &TlsSettings,
) -> anyhow::Result<(Arc<CertifiedKey>, Arc<dyn ClientCertVerifier>)> {
    let read = |path: &str, what: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("tls.{what} {path:?}: {e}"))
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(&settings.certificate_file, "certificate_file")?)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("tls.certificate_file: {e}"))?;
    if chain.is_empty() {
        anyhow::bail!("tls.certificate_file holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&settings.private_key_file, "private_key_file")?)
        .map_err(|e| anyhow::anyhow!("tls.private_key_file: {e}"))?;
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("tls.private_key_file: {e}"))?;
    let certified = Arc::new(CertifiedKey::new(chain, signing_key));
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("tls.private_key_file does not match the certificate: {e}"))?;
    let verifier: Arc<dyn ClientCertVerifier> = if settings.client_ca_file.is_empty() {
        WebPkiClientVerifier::no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for certificate in
            CertificateDer::pem_slice_iter(&read(&settings.client_ca_file, "client_ca_file")?)
        {
            roots
                .add(certificate.map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?)
                .map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?;
        }
        if roots.is_empty() {
            anyhow::bail!("tls.client_ca_file holds no certificate");
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?
    };
    Ok((certified, verifier))
}

#[derive(Debug)]
struct SwappableCertificate(Arc<RwLock<Arc<CertifiedKey>>>);

impl ResolvesServerCert for SwappableCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|current| current.clone())
    }
}

/// The client verifier of the moment (replaced on reload), delegated to.
struct SwappableVerifier(Arc<RwLock<Arc<dyn ClientCertVerifier>>>);

impl std::fmt::Debug for SwappableVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwappableVerifier")
    }
}

impl SwappableVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        match self.0.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ClientCertVerifier for SwappableVerifier {
    fn offer_client_auth(&self) -> bool {
        self.current().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints are only a courtesy to clients choosing a certificate; none is sent (the
        // verifier behind may change on reload, and hints cannot borrow from it).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}
