//! The rustls server certificate verifier of [`tls`](super::tls): one per `sslmode` level,
//! with libpq's common-name fallback for a certificate without a subjectAltName.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What the verifier checks of the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verify {
    /// Nothing (`prefer`, `require`): encryption against a passive listener only.
    Nothing,
    /// That it chains to a root (`verify-ca`, `require` with a root certificate).
    Chain,
    /// That it chains to a root and names the host (`verify-full`).
    ChainAndName,
}

/// The server certificate verifier of one [`Verify`] level. The handshake's signatures are
/// checked at every level.
pub(super) struct Verifier {
    /// What is checked.
    pub(super) verify: Verify,
    /// The roots a checked certificate must chain to.
    pub(super) roots: Arc<RootCertStore>,
    /// The signature algorithms, of the connection's crypto provider.
    pub(super) provider: Arc<CryptoProvider>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("verify", &self.verify)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.verify == Verify::ChainAndName {
            match verify_server_name(&cert, server_name) {
                Ok(()) => {}
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) if common_name_matches(end_entity, server_name) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// libpq's fallback for a certificate without a subjectAltName: whether its subject's common
/// name is the host name (`*.` matching one leftmost label; case-insensitive). IP addresses
/// compare as text.
fn common_name_matches(cert: &CertificateDer<'_>, server_name: &ServerName<'_>) -> bool {
    use x509_cert::der::asn1::ObjectIdentifier;
    use x509_cert::der::Decode;
    const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

    let host = match server_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => return false,
    };
    let Ok(cert) = x509_cert::Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    let tbs = &cert.tbs_certificate;
    let has_san = tbs
        .extensions
        .iter()
        .flatten()
        .any(|e| e.extn_id == SUBJECT_ALT_NAME);
    if has_san {
        return false;
    }
    let names: Vec<String> = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid == COMMON_NAME)
        .filter_map(|atv| {
            std::str::from_utf8(atv.value.value())
                .ok()
                .map(str::to_owned)
        })
        .collect();
    // Only an unambiguous name counts.
    match names.as_slice() {
        [name] => name_matches(name, &host),
        _ => false,
    }
}

/// Whether certificate name `pattern` (maybe `*.domain`) names `host`.
fn name_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (
        pattern.trim_end_matches('.').to_ascii_lowercase(),
        host.trim_end_matches('.').to_ascii_lowercase(),
    );
    if pattern.contains('\0') {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_match_like_libpq() {
        assert!(name_matches("db.example.com", "DB.example.com"));
        assert!(name_matches("*.example.com", "db.example.com"));
        assert!(!name_matches("*.example.com", "a.db.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("db.example.com", "db.example.org"));
        assert!(name_matches("127.0.0.1", "127.0.0.1"));
    }
}
