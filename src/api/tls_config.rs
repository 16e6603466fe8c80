//! The `tls` section of the configuration: [`TlsConfig`] (the trust it names is loaded
//! by `transport::TlsTrust`).

use serde::Deserialize;

/// TLS settings for `https://` base URLs: extra trusted CAs and a client certificate.
///
/// Whatever this says, keypool trusts the platform's certificate store (on Linux the
/// system bundle, or the certificates in `SSL_CERT_FILE` and the directories in
/// `SSL_CERT_DIR` when either is set, as curl, OpenSSL, Go and Python read them) plus
/// Mozilla's root certificates bundled in the library.
///
/// JSON: `"tls": {"ca_file": "/etc/ssl/private-ca.pem", "client_cert_file": "…",
/// "client_key_file": "…"}`.
///
/// `#[non_exhaustive]`: start from [`TlsConfig::default`] and use the setters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// A PEM file of CA certificates to trust besides the platform's and the bundled
    /// ones (a private CA, a TLS-inspecting proxy's). Defaults to none.
    pub ca_file: Option<String>,
    /// A PEM file holding the client certificate (and any intermediates) to present to
    /// servers that ask for one (mutual TLS). Needs `client_key_file`. Defaults to none.
    pub client_cert_file: Option<String>,
    /// The PEM file holding the private key of `client_cert_file` (PKCS#8, PKCS#1 or
    /// SEC1). Defaults to none.
    pub client_key_file: Option<String>,
}

impl TlsConfig {
    /// Trusts the CA certificates in this PEM file too.
    pub fn ca_file(mut self, path: impl Into<String>) -> TlsConfig {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this client certificate chain and key (PEM files) to servers that ask
    /// for one.
    pub fn client_cert(mut self, cert: impl Into<String>, key: impl Into<String>) -> TlsConfig {
        self.client_cert_file = Some(cert.into());
        self.client_key_file = Some(key.into());
        self
    }

    /// The first rule broken, as (field, message); nothing is read from disk here.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => Some((
                "tls.client_key_file",
                "is required with tls.client_cert_file".to_owned(),
            )),
            (None, Some(_)) => Some((
                "tls.client_cert_file",
                "is required with tls.client_key_file".to_owned(),
            )),
            _ => None,
        }
    }
}
