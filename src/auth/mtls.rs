//! Mutual TLS (design.md, "Authentication, configurable"): who the gateway is, from the client
//! certificate it presented on our TLS listener (verified by rustls against
//! `tls.client_ca_file`, see `crate::tls`), or from the identity a trusted TLS-terminating proxy
//! passes on in `gateway_auth.mtls.identity_header`.

use std::net::IpAddr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::MtlsSettings;
use crate::error::ApiError;

/// A verified client certificate, as far as authorisation and the audit log need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject, e.g. `CN=fibre-cafe-gateway, O=Fibre Cafe`.
    pub subject: String,
    /// Names it can be allowed by: subject CN, DNS and URI subject alternative names, e-mails.
    pub names: Vec<String>,
    /// Its serial number (hex), when known; none for an identity passed by a proxy.
    pub serial: Option<String>,
}

impl ClientIdentity {
    /// Reads a DER certificate (already verified by rustls during the handshake).
    pub fn from_der(der: &[u8]) -> Option<ClientIdentity> {
        let (_, certificate) = X509Certificate::from_der(der).ok()?;
        let subject = certificate.subject().to_string();
        let mut names: Vec<String> = certificate
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        if let Ok(Some(alternative)) = certificate.subject_alternative_name() {
            for name in &alternative.value.general_names {
                match name {
                    GeneralName::DNSName(name)
                    | GeneralName::URI(name)
                    | GeneralName::RFC822Name(name) => names.push((*name).to_owned()),
                    _ => {}
                }
            }
        }
        Some(ClientIdentity {
            subject,
            names,
            serial: Some(certificate.raw_serial_as_string()),
        })
    }

    /// Reads what a proxy passed on: an Envoy-style `X-Forwarded-Client-Cert` value
    /// (`Hash=...;Subject="CN=gw,O=x";URI=...;DNS=...`) or a plain subject (`CN=gw,O=x`).
    pub fn from_proxy_header(value: &str) -> Option<ClientIdentity> {
        let value = value.trim();
        if value.is_empty() {
            return None;
        }
        let mut subject = None;
        let mut names = Vec::new();
        if value.contains("Subject=") || value.contains("DNS=") || value.contains("URI=") {
            // Only the first element (the client's certificate; proxies append theirs).
            let first = split_outside_quotes(value, ',').next().unwrap_or(value);
            for part in split_outside_quotes(first, ';') {
                let Some((key, raw)) = part.split_once('=') else {
                    continue;
                };
                let raw = raw.trim().trim_matches('"');
                match key.trim() {
                    "Subject" => subject = Some(raw.to_owned()),
                    "DNS" | "URI" => names.push(raw.to_owned()),
                    _ => {}
                }
            }
        } else {
            subject = Some(value.to_owned());
        }
        let subject = subject.unwrap_or_default();
        names.extend(common_names(&subject));
        if subject.is_empty() && names.is_empty() {
            return None;
        }
        Some(ClientIdentity {
            subject,
            names,
            serial: None,
        })
    }

    /// For the audit log.
    pub fn describe(&self) -> String {
        match &self.serial {
            Some(serial) => format!("certificate {} (serial {serial})", self.subject),
            None => format!("certificate {} (verified by a proxy)", self.subject),
        }
    }
}

/// The CN values of a subject written as `CN=a,O=b`.
fn common_names(subject: &str) -> Vec<String> {
    split_outside_quotes(subject, ',')
        .filter_map(|rdn| {
            let (key, value) = rdn.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("CN")
                .then(|| value.trim().to_owned())
        })
        .collect()
}

fn split_outside_quotes(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (index, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..index]);
                start = index + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter()
}

/// An address or a network (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Option<Network> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address.trim().parse().ok()?, prefix.trim().parse().ok()?),
            None => {
                let address: IpAddr = text.trim().parse().ok()?;
                let prefix = if address.is_ipv4() { 32 } else { 128 };
                (address, prefix)
            }
        };
        let bits = if IpAddr::is_ipv4(&address) { 32 } else { 128 };
        (prefix <= bits).then_some(Network { address, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let mask = |bits: u32, width: u32| {
            if bits == 0 {
                0u128
            } else {
                (!0u128 << (width - bits)) & if width == 32 { 0xffff_ffff } else { !0u128 }
            }
        };
        match (self.address, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = mask(u32::from(self.prefix), 32);
                u128::from(u32::from(network)) & mask == u128::from(u32::from(address)) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = mask(u32::from(self.prefix), 128);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

/// Decides who the gateway is under `method = "mtls"`.
pub struct MtlsAuthenticator {
    allowed_names: Vec<String>,
    identity_header: String,
    trusted_proxies: Vec<Network>,
}

impl MtlsAuthenticator {
    pub fn new(settings: &MtlsSettings) -> MtlsAuthenticator {
        MtlsAuthenticator {
            allowed_names: settings.allowed_names.clone(),
            identity_header: settings.identity_header.to_ascii_lowercase(),
            trusted_proxies: settings
                .trusted_proxies
                .iter()
                .filter_map(|p| Network::parse(p))
                .collect(),
        }
    }

    /// The identity of a request: the certificate of its TLS connection, or, from a trusted
    /// proxy only, the identity header. 401 without one; 403 when its names are not allowed.
    pub fn authenticate(
        &self,
        certificate: Option<&ClientIdentity>,
        peer: Option<IpAddr>,
        headers: &actix_web::http::header::HeaderMap,
    ) -> Result<String, ApiError> {
        let from_proxy;
        let identity = match certificate {
            Some(identity) => identity,
            None => {
                let trusted =
                    peer.is_some_and(|ip| self.trusted_proxies.iter().any(|n| n.contains(ip)));
                from_proxy = trusted
                    .then(|| headers.get(self.identity_header.as_str()))
                    .flatten()
                    .and_then(|v| v.to_str().ok())
                    .and_then(ClientIdentity::from_proxy_header);
                from_proxy.as_ref().ok_or_else(|| {
                    ApiError::Unauthenticated("A client certificate is required".to_owned())
                })?
            }
        };
        if !self.allowed_names.is_empty()
            && !identity
                .names
                .iter()
                .any(|name| self.allowed_names.contains(name))
        {
            return Err(ApiError::Forbidden(
                "This client certificate is not permitted to post KCIs".to_owned(),
            ));
        }
        Ok(identity.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses_only() {
        let network = Network::parse("10.1.0.0/16").unwrap();
        assert!(network.contains("10.1.200.3".parse().unwrap()));
        assert!(!network.contains("10.2.0.1".parse().unwrap()));
        assert!(
            Network::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert!(
            Network::parse("127.0.0.1")
                .unwrap()
                .contains("::ffff:127.0.0.1".parse().unwrap()),
            "IPv4-mapped IPv6"
        );
        assert!(
            Network::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Network::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        for bad in ["", "10.0.0.0/33", "nope", "10.0.0.0/x"] {
            assert!(Network::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn proxies_pass_identities_as_subjects_or_envoy_headers() {
        let plain =
            ClientIdentity::from_proxy_header("CN=fibre-cafe-gateway,O=Fibre Cafe").unwrap();
        assert_eq!(plain.names, ["fibre-cafe-gateway"]);
        let envoy = ClientIdentity::from_proxy_header(
            "Hash=abc;Subject=\"CN=gw.example,O=Fibre, Cafe\";URI=spiffe://fc/gw;DNS=gw.example",
        )
        .unwrap();
        assert_eq!(envoy.subject, "CN=gw.example,O=Fibre, Cafe");
        assert!(envoy.names.contains(&"spiffe://fc/gw".to_owned()));
        assert!(envoy.names.contains(&"gw.example".to_owned()));
        assert!(ClientIdentity::from_proxy_header("  ").is_none());
    }
}
