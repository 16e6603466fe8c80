//! TLS for the mock: a certificate it generates (a fresh CA and a leaf for `localhost`,
//! `127.0.0.1` and `::1`) or one given as PEM files, optionally requiring a client
//! certificate (mTLS).

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A generated certificate authority: its certificate and key, to sign leaves with.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The TLS identity a [`MockServer`](crate::MockServer) serves with
/// ([`MockServer::start_tls`](crate::MockServer::start_tls)): its certificate chain and
/// key, and the CA certificate a client must trust ([`MockTls::ca_pem`]).
///
/// Cheap to clone. [`MockTls::generate`] makes a new CA each time, so a client that
/// trusts one generated identity does not trust another.
#[derive(Clone)]
pub struct MockTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    ca_pem: String,
    authority: Option<Arc<Authority>>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
}

impl std::fmt::Debug for MockTls {
    /// The private key is left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockTls")
            .field("chain_len", &self.chain.len())
            .field("requires_client_cert", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

fn authority(name: &str) -> io::Result<Authority> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid("CA", e))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(|e| invalid("CA key", e))?;
    let cert = params.self_signed(&key).map_err(|e| invalid("CA", e))?;
    Ok(Authority { cert, key })
}

impl Authority {
    /// A leaf certificate for `names` (DNS names or IP addresses) and its key, as PEM.
    fn leaf(&self, names: &[&str], client: bool) -> io::Result<(String, String)> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(|e| invalid("leaf", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "keypool-mock");
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().map_err(|e| invalid("leaf key", e))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| invalid("leaf", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl MockTls {
    /// A new certificate authority (`keypool-mock test CA <random>`) and a server certificate
    /// it signed for `localhost`, `127.0.0.1` and `::1`.
    pub fn generate() -> io::Result<MockTls> {
        // A name of its own, so another generated CA is an unknown issuer, not a bad
        // signature.
        let ca = authority(&format!("keypool-mock test CA {:016x}", fastrand::u64(..)))?;
        let (cert_pem, key_pem) = ca.leaf(&["localhost", "127.0.0.1", "::1"], false)?;
        let mut tls = MockTls::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
        tls.ca_pem = ca.cert.pem();
        tls.authority = Some(Arc::new(ca));
        Ok(tls)
    }

    /// An identity from PEM text: `cert_chain` (the server certificate first, then any
    /// intermediates) and its private key (PKCS#8, PKCS#1 or SEC1). [`MockTls::ca_pem`]
    /// is then the chain's last certificate.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> io::Result<MockTls> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate", e))?;
        let Some(last) = chain.last() else {
            return Err(invalid("certificate", "no certificate in the PEM text"));
        };
        let ca_pem = pem_of(last);
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid("private key", e))?;
        let tls = MockTls {
            chain,
            key: Arc::new(key),
            ca_pem,
            authority: None,
            client_ca: None,
        };
        tls.server_config()?;
        Ok(tls)
    }

    /// [`MockTls::from_pem`] from two files.
    pub fn from_pem_files(
        cert_chain: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> io::Result<MockTls> {
        MockTls::from_pem(&std::fs::read(cert_chain)?, &std::fs::read(key)?)
    }

    /// The PEM certificate a client must trust to reach this server: the generated CA,
    /// or the last certificate of a given chain.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes [`MockTls::ca_pem`] to `path`.
    pub fn write_ca(&self, path: impl AsRef<std::path::Path>) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    /// Requires every client to present a certificate signed by one of the PEM
    /// certificates in `ca_pem` (mutual TLS); a client without one fails the handshake.
    pub fn require_client_cert(mut self, ca_pem: &str) -> io::Result<MockTls> {
        let roots = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("client CA", e))?;
        if roots.is_empty() {
            return Err(invalid("client CA", "no certificate in the PEM text"));
        }
        self.client_ca = Some(roots);
        self.server_config()?;
        Ok(self)
    }

    /// A client certificate and its private key (PEM), signed by this identity's
    /// generated CA, for mutual-TLS tests (pass [`MockTls::ca_pem`] to
    /// [`MockTls::require_client_cert`]). `None` for an identity read from PEM.
    pub fn client_cert(&self) -> Option<io::Result<(String, String)>> {
        self.authority
            .as_ref()
            .map(|a| a.leaf(&["keypool-client"], true))
    }

    /// The rustls server configuration.
    pub(crate) fn server_config(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", e))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let mut store = rustls::RootCertStore::empty();
                for c in roots {
                    store.add(c.clone()).map_err(|e| invalid("client CA", e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(store),
                    provider,
                )
                .build()
                .map_err(|e| invalid("client CA", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| invalid("certificate", e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// One certificate as PEM text.
fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
