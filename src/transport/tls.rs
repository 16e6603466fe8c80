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
    pub(crate) config: ureq::tls::TlsConfig,
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
            config: ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(roots))
                .build(),
        }
    }
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
            let key = read_pem("tls.client_key_file", key)?
                .into_iter()
                .find_map(|i| match i {
                    ureq::tls::PemItem::PrivateKey(k) => Some(k),
                    _ => None,
                })
                .ok_or_else(|| file_error("tls.client_key_file", key, "no PEM private key"))?;
            let roots = builder.root_certs().clone();
            builder = ureq::tls::TlsConfig::builder()
                .root_certs(roots)
                .client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)))
                .build();
        }
        trust.config = builder;
        Ok(trust)
    }
}

/// A certificate or handshake failure inside `e`, if it is one: the endpoint's fault.
pub(crate) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return match r {
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::AlertReceived(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::PeerIncompatible(_)
                | rustls::Error::PeerMisbehaved(_)
                | rustls::Error::InvalidCertRevocationList(_)
                | rustls::Error::InappropriateHandshakeMessage { .. }
                | rustls::Error::InappropriateMessage { .. } => Some(r.to_string()),
                _ => None,
            };
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
