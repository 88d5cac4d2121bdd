//! rustls configuration. One crypto provider (ring) is passed explicitly to
//! every builder, so nothing depends on a process-wide default provider.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::SslMode;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS for clients connecting to the proxy.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    // Postgres 17 clients using direct TLS negotiation require this ALPN.
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(cfg))
}

pub fn load_roots(ca: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read CA file {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("invalid PEM in {}", ca.display()))?)?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", ca.display());
    }
    Ok(roots)
}

/// TLS for the proxy's connections to a server, following libpq's sslmode.
pub fn client_config(
    mode: SslMode,
    ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
        (SslMode::VerifyFull, Some(ca)) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                .build()?
        }
        (SslMode::VerifyCa, Some(ca)) => Arc::new(ChainOnly(
            WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                .build()?,
        )),
        (SslMode::VerifyFull | SslMode::VerifyCa, None) => {
            bail!("sslmode verify-ca/verify-full needs sslrootcert")
        }
        _ => Arc::new(NoVerification(provider())),
    };
    let mut cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether `host` is a DNS name or IP address a certificate can be
/// checked against (what sslmode verify-full needs).
pub fn valid_server_name(host: &str) -> bool {
    ServerName::try_from(host).is_ok()
}

/// The server name to present (SNI) and, under verify-full, to check.
/// A host that is neither a DNS name nor an IP address is an error under
/// verify-full (the config refuses it at load; this is the last line). In
/// the other modes nothing checks the name, and the peer's address stands
/// in for it, which sends no SNI at all.
pub fn server_name(
    host: &str,
    mode: SslMode,
    peer: std::net::IpAddr,
) -> anyhow::Result<ServerName<'static>> {
    match ServerName::try_from(host.to_string()) {
        Ok(name) => Ok(name),
        Err(_) if mode == SslMode::VerifyFull => bail!(
            "host {host:?} is not a valid DNS name or IP address: sslmode verify-full cannot check the certificate against it"
        ),
        Err(_) => Ok(ServerName::IpAddress(peer.into())),
    }
}

/// sslmode=verify-ca: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// sslmode=prefer/require: encrypt, but accept any certificate (as libpq
/// does without a root certificate). Handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

    #[test]
    fn names_and_addresses_are_presented_as_they_are() {
        for host in ["db.example.com", "localhost", "127.0.0.1", "::1"] {
            assert!(valid_server_name(host), "{host}");
            for mode in [SslMode::Require, SslMode::VerifyFull] {
                let n = server_name(host, mode, PEER).unwrap();
                assert_eq!(n.to_str(), host);
            }
        }
    }

    #[test]
    fn an_invalid_host_never_becomes_localhost() {
        for host in ["not a host", "db..example", "bad/name", ""] {
            assert!(!valid_server_name(host), "{host:?}");
            let e = server_name(host, SslMode::VerifyFull, PEER).unwrap_err();
            assert!(e.to_string().contains("verify-full"), "{e}");
            // Without name checks, the peer's address stands in (no SNI).
            for mode in [SslMode::Prefer, SslMode::Require, SslMode::VerifyCa] {
                let n = server_name(host, mode, PEER).unwrap();
                assert_eq!(n, ServerName::IpAddress(PEER.into()), "{host:?} {mode:?}");
            }
        }
    }
}
