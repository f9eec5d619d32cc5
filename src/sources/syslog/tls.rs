//! Syslog over TLS (RFC 5425 transport): rustls, with the server's certificate and key from
//! PEM files and, when `tls_client_ca` is given, client certificates required and checked
//! against those CAs (mutual TLS).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::stream::Handshake;
use crate::sources::server::WatchedIo;

/// The TLS side of a `tls://` source.
#[derive(Clone)]
pub struct Tls(TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Reads the certificate chain, the key and the client CAs; every error names the file.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Tls> {
        let chain = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("cannot read a private key from tls_key {}", key.display()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in certificates(ca)? {
                    roots.add(certificate).with_context(|| {
                        format!("tls_client_ca {}: not a CA certificate", ca.display())
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .with_context(|| format!("tls_client_ca {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .context("tls_cert and tls_key do not make a usable certificate")?;
        Ok(Tls(TlsAcceptor::from(Arc::new(config))))
    }
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", path.display());
    }
    Ok(chain)
}

impl Handshake for Tls {
    type Stream = TlsStream<WatchedIo<TcpStream>>;

    async fn handshake(&self, tcp: WatchedIo<TcpStream>) -> std::io::Result<Self::Stream> {
        self.0.accept(tcp).await
    }
}
