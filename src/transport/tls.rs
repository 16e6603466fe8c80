//! Whom `https://` trusts, like curl: the platform's store (or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` in its place, as OpenSSL reads them), Mozilla's roots bundled in the
//! binary, and the config's `tls.ca_file`; an optional client certificate for mTLS.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Error;
use crate::tls_config::TlsConfig;

/// The trust a transport is built with: root certificates and an optional client
/// certificate, loaded once per pool from a [`TlsConfig`] ([`TlsTrust::load`]).
///
/// Cheap to clone (shared). [`TlsTrust::default`] is the platform's store plus the
/// bundled roots.
#[derive(Clone)]
pub struct TlsTrust {
    /// For ureq's own TLS layer (connections through a proxy).
    pub(crate) config: ureq::tls::TlsConfig,
    /// The same trust for keypool's TLS layer (`lean_tls`): one per pool, so one root
    /// store and one session cache shared by every key's connections.
    pub(crate) rustls: Arc<rustls::ClientConfig>,
    roots: usize,
}

impl std::fmt::Debug for TlsTrust {
    /// The client key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTrust")
            .field("roots", &self.roots)
            .field("client_cert", &self.config.client_cert().is_some())
            .finish()
    }
}

impl Default for TlsTrust {
    /// The platform's store (or `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus the bundled roots.
    fn default() -> TlsTrust {
        let roots = platform_and_bundled();
        TlsTrust {
            roots: roots.len(),
            rustls: rustls_config(&roots, None).expect("a client config without a certificate"),
            config: ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(roots))
                .build(),
        }
    }
}

type ClientCert = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The rustls client config for `roots` and an optional client certificate (ring, TLS
/// 1.2 and 1.3, rustls's default in-memory session cache).
fn rustls_config(
    roots: &[ureq::tls::Certificate<'static>],
    client: Option<ClientCert>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(
        roots
            .iter()
            .map(|c| rustls::pki_types::CertificateDer::from(c.der())),
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store);
    Ok(Arc::new(match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    }))
}

type Roots = Arc<Vec<ureq::tls::Certificate<'static>>>;

/// The platform's roots plus the bundled ones, loaded once per value of
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` (a process that changes them gets them reread).
fn platform_and_bundled() -> Roots {
    static CACHE: Mutex<Option<(EnvKey, Roots)>> = Mutex::new(None);
    type EnvKey = (Option<std::ffi::OsString>, Option<std::ffi::OsString>);
    let env: EnvKey = (
        std::env::var_os("SSL_CERT_FILE"),
        std::env::var_os("SSL_CERT_DIR"),
    );
    let mut cache = CACHE.lock();
    if let Some((k, roots)) = cache.as_ref() {
        if *k == env {
            return roots.clone();
        }
    }
    let native = rustls_native_certs::load_native_certs();
    for e in native.errors.iter().take(3) {
        log::debug!("platform certificates: {e}");
    }
    let mut v: Vec<ureq::tls::Certificate<'static>> = native
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    v.extend(
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref())),
    );
    let roots = Arc::new(v);
    *cache = Some((env, roots.clone()));
    roots
}

fn file_error(field: &str, path: &str, e: impl std::fmt::Display) -> Error {
    Error::config(field, format!("cannot use {path:?}: {e}"))
}

/// Every PEM item of the file at `path`.
fn read_pem(field: &str, path: &str) -> Result<Vec<ureq::tls::PemItem<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| file_error(field, path, e))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(field, path, e))
}

impl TlsTrust {
    /// Loads the trust `cfg` describes: the default roots plus `ca_file`'s, and the
    /// client certificate. A file that cannot be read or holds no usable PEM item is
    /// an [`Error::Config`] naming the field.
    pub fn load(cfg: &TlsConfig) -> Result<TlsTrust, Error> {
        if let Some((field, message)) = cfg.problem() {
            return Err(Error::config(field, message));
        }
        let mut trust = TlsTrust::default();
        let mut builder = trust.config.clone();
        let mut client: Option<ClientCert> = None;
        if let Some(path) = &cfg.ca_file {
            let extra: Vec<_> = read_pem("tls.ca_file", path)?
                .into_iter()
                .filter_map(|i| match i {
                    ureq::tls::PemItem::Certificate(c) => Some(c),
                    _ => None,
                })
                .collect();
            if extra.is_empty() {
                return Err(file_error(
                    "tls.ca_file",
                    path,
                    "no PEM certificate in the file",
                ));
            }
            let mut roots = extra;
            roots.extend(platform_and_bundled().iter().cloned());
            trust.roots = roots.len();
            builder = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
                .build();
        }
        if let (Some(cert), Some(key)) = (&cfg.client_cert_file, &cfg.client_key_file) {
            let chain: Vec<_> = read_pem("tls.client_cert_file", cert)?
                .into_iter()
                .filter_map(|i| match i {
                    ureq::tls::PemItem::Certificate(c) => Some(c),
                    _ => None,
                })
                .collect();
            if chain.is_empty() {
                return Err(file_error(
                    "tls.client_cert_file",
                    cert,
                    "no PEM certificate in the file",
                ));
            }
            let key_path = key;
            let key = read_pem("tls.client_key_file", key)?
                .into_iter()
                .find_map(|i| match i {
                    ureq::tls::PemItem::PrivateKey(k) => Some(k),
                    _ => None,
                })
                .ok_or_else(|| file_error("tls.client_key_file", key, "no PEM private key"))?;
            {
                use rustls::pki_types::pem::PemObject;
                let der = rustls::pki_types::PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|e| file_error("tls.client_key_file", key_path, e))?;
                client = Some((
                    chain
                        .iter()
                        .map(|c| rustls::pki_types::CertificateDer::from(c.der()).into_owned())
                        .collect(),
                    der,
                ));
            }
            let roots = builder.root_certs().clone();
            builder = ureq::tls::TlsConfig::builder()
                .root_certs(roots)
                .client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)))
                .build();
        }
        if let ureq::tls::RootCerts::Specific(roots) = builder.root_certs() {
            if cfg.ca_file.is_some() || client.is_some() {
                trust.rustls = rustls_config(roots, client)
                    .map_err(|e| Error::config("tls.client_key_file", e.to_string()))?;
            }
        }
        trust.config = builder;
        Ok(trust)
    }
}

/// A certificate or handshake failure inside `e`, if it is one: the endpoint's fault.
/// The text names the reason and, where one helps, what to configure.
pub(crate) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return describe(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            cur = io
                .get_ref()
                .map(|i| i as &(dyn std::error::Error + 'static));
            continue;
        }
        cur = err.source();
    }
    None
}

/// The message for a rustls error that is the endpoint's fault (`None`: another kind).
fn describe(r: &rustls::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    Some(match r {
        rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_) => {
            format!(
                "{r} (to trust a private CA: tls.ca_file, SSL_CERT_FILE or keypool run --ca-file)"
            )
        }
        // Under TLS 1.3 the server judges the client's certificate after the client's
        // handshake is over: its verdict arrives as an alert on the first read.
        rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied,
        ) => format!(
            "the server refused the client certificate: {r} (tls.client_cert_file, \
             tls.client_key_file)"
        ),
        rustls::Error::AlertReceived(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::InappropriateMessage { .. } => r.to_string(),
        _ => return None,
    })
}
