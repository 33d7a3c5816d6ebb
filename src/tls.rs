//! TLS material read from PEM files: the proxy listener's certificate and key, and the private
//! CAs some upstreams are signed by.
//!
//! The listener's acceptor sits behind a swappable holder ([`ListenerTls`]): every new
//! connection takes the acceptor current at its accept, so [`reload_tls`] (called by the config
//! reload) installs a re-read certificate for the next handshakes while open connections keep
//! the session they negotiated — nothing is dropped. A certificate that does not load leaves
//! the previous one serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use pingora::tls::pkey::PKey;
use pingora::tls::ssl::{select_next_proto, AlpnError, SslAcceptor, SslMethod};
use pingora::tls::x509::X509;

/// ALPN protocols offered to clients, most preferred first (wire format).
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate could be read ({detail})")]
    BadCertificate { path: String, detail: String },
    #[error("{path}: not a PEM private key ({detail})")]
    BadKey { path: String, detail: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// Where the proxy listener's certificate chain and private key are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certificates(path: &Path) -> Result<Vec<X509>, TlsError> {
    let pem = read(path)?;
    let bad = |detail: String| TlsError::BadCertificate {
        path: path.display().to_string(),
        detail,
    };
    let certs = X509::stack_from_pem(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("the file holds no certificate".into()));
    }
    Ok(certs)
}

/// Builds a server acceptor from the files: Mozilla's intermediate profile, the certificate
/// chain (leaf first), the key (checked against the leaf), ALPN preferring h2 over http/1.1.
pub fn build_acceptor(files: &TlsFiles) -> Result<SslAcceptor, TlsError> {
    let chain = load_certificates(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = PKey::private_key_from_pem(&key_pem).map_err(|e| TlsError::BadKey {
        path: files.key.display().to_string(),
        detail: e.to_string(),
    })?;
    let setup = |e: pingora::tls::error::ErrorStack| TlsError::Setup(e.to_string());
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(setup)?;
    let mismatch = || TlsError::KeyMismatch {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
    };
    let mut certs = chain.into_iter();
    if let Some(leaf) = certs.next() {
        // Checked first: OpenSSL's own refusal of a foreign key would not say which it is.
        let leaf_key = leaf.public_key().map_err(setup)?;
        if !leaf_key.public_eq(&key) {
            return Err(mismatch());
        }
        builder.set_certificate(&leaf).map_err(setup)?;
    }
    for extra in certs {
        builder.add_extra_chain_cert(extra).map_err(setup)?;
    }
    builder.set_private_key(&key).map_err(setup)?;
    builder.check_private_key().map_err(|_| mismatch())?;
    builder.set_alpn_select_callback(|_, offered| {
        select_next_proto(ALPN_H2_H1, offered).ok_or(AlpnError::NOACK)
    });
    Ok(builder.build())
}

/// The proxy listener's TLS acceptor, swappable by [`ListenerTls::reload`].
pub struct ListenerTls {
    files: TlsFiles,
    acceptor: ArcSwap<SslAcceptor>,
}

impl ListenerTls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(ListenerTls {
            acceptor: ArcSwap::from_pointee(build_acceptor(files)?),
            files: files.clone(),
        })
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> Arc<SslAcceptor> {
        self.acceptor.load_full()
    }

    /// Re-reads the certificate and key files; on an error the current ones keep serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build_acceptor(&self.files)?;
        self.acceptor.store(Arc::new(fresh));
        Ok(())
    }
}

/// The serving process's listener TLS, installed by `serve` (at most once).
static LISTENER_TLS: OnceLock<Arc<ListenerTls>> = OnceLock::new();

/// Makes `tls` the holder [`reload_tls`] re-reads.
pub fn install(tls: Arc<ListenerTls>) {
    let _ = LISTENER_TLS.set(tls);
}

/// Re-reads the proxy listener's certificate and key (the paths `[server] tls` named at start)
/// for the next TLS handshakes; open connections are not touched. `Ok(false)` when the
/// listener does not use TLS. For the config reload (SIGHUP, `POST /v1/config/reload`): an
/// error is reported like an invalid config, and the previous certificate keeps serving.
pub fn reload_tls() -> Result<bool, TlsError> {
    match LISTENER_TLS.get() {
        Some(tls) => tls.reload().map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn self_signed(dir: &Path, name: &str, cn: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&files.key)
            .arg("-out")
            .arg(&files.cert)
            .output()
            .expect("openssl runs")
            .status
            .success();
        assert!(ok, "openssl req failed");
        files
    }

    fn leaf_cn(files: &TlsFiles) -> String {
        let cert = &load_certificates(&files.cert).expect("a certificate")[0];
        let cn = cert
            .subject_name()
            .entries()
            .next()
            .expect("a subject entry")
            .data()
            .to_string()
            .expect("utf8");
        cn
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_the_old_one_on_errors() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let first = self_signed(dir.path(), "first", "first.test");
        let tls = ListenerTls::load(&first).expect("loads");
        let served = |tls: &ListenerTls| {
            let ctx = tls.acceptor();
            let ssl = pingora::tls::ssl::Ssl::new(ctx.context()).expect("an Ssl");
            ssl.certificate()
                .expect("a certificate")
                .subject_name()
                .entries()
                .next()
                .expect("an entry")
                .data()
                .to_string()
                .expect("utf8")
        };
        assert_eq!(served(&tls), "first.test");

        // The files are replaced in place (a renewed certificate): reload serves the new one.
        let second = self_signed(dir.path(), "second", "second.test");
        std::fs::copy(&second.cert, &first.cert).expect("copy");
        std::fs::copy(&second.key, &first.key).expect("copy");
        assert_eq!(leaf_cn(&first), "second.test");
        tls.reload().expect("reloads");
        assert_eq!(served(&tls), "second.test");

        // A broken file is refused and the current certificate keeps serving.
        std::fs::write(&first.cert, "not a certificate").expect("write");
        assert!(matches!(tls.reload(), Err(TlsError::BadCertificate { .. })));
        assert_eq!(served(&tls), "second.test");

        // A key of another certificate is named as such.
        let third = self_signed(dir.path(), "third", "third.test");
        let mixed = TlsFiles {
            cert: third.cert.clone(),
            key: second.key.clone(),
        };
        assert!(matches!(
            build_acceptor(&mixed),
            Err(TlsError::KeyMismatch { .. })
        ));
    }
}
