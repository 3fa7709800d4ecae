//! TLS for Portless's HTTP servers (a daemon's TCP listener, `[daemon] tls_cert` and
//! `tls_key`; a control plane's, `[control] tls_cert` and `tls_key`): the certificate chain
//! and key of PEM files, served with rustls's safe defaults (TLS 1.2 and 1.3, forward-secret
//! suites only), and the accept loop that hands each connection to a router once its
//! handshake is done.
//!
//! A handshake gets [`HANDSHAKE_TIMEOUT`] and runs in a task of its own, so a client that
//! never finishes one holds up nobody else. A plaintext client is refused by the handshake
//! itself: it gets no HTTP answer at all.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::ConnectInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Longest a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS configuration from the PEM files `cert` (the chain, the server's
/// first) and `key`; errors name the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "tls_key {}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) could be read",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "tls_cert {} and tls_key {} do not make a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("tls_cert {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls_cert {}: not a PEM certificate chain", path.display()))?;
    if certs.is_empty() {
        bail!("tls_cert {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// Serves `router` over TLS on `listener` until `stop` turns true; then stops accepting,
/// lets the requests in progress finish, and returns. Each request carries
/// `ConnectInfo(peer(address))`, the router's notion of the peer.
pub async fn serve<P: Clone + Send + Sync + 'static>(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
    peer: fn(SocketAddr) -> P,
) {
    let acceptor = TlsAcceptor::from(config);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors, say: wait a moment rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Finished connections are reaped as new ones come.
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            tcp,
            peer(addr),
            acceptor.clone(),
            router.clone(),
            stop.clone(),
        ));
    }
    while connections.join_next().await.is_some() {}
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One connection: the handshake, then HTTP/1.1 until the client or the daemon is done.
async fn connection<P: Clone + Send + Sync + 'static>(
    tcp: tokio::net::TcpStream,
    peer: P,
    acceptor: TlsAcceptor,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    // Small writes (answers, events) leave at once, not after the peer's delayed
    // acknowledgement.
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        // No handshake (plaintext, another protocol, too slow): nothing to answer.
        return;
    };
    let service = hyper_util::service::TowerToHyperService::new(
        router.layer(axum::Extension(ConnectInfo(peer))),
    );
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_wrong_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("portless-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let err = format!(
            "{:#}",
            server_config(&dir.join("missing.pem"), &dir.join("key.pem"))
                .expect_err("missing cert")
        );
        assert!(err.contains("missing.pem"), "{err}");
        std::fs::write(dir.join("cert.pem"), "not a certificate\n").expect("write");
        let err = format!(
            "{:#}",
            server_config(&dir.join("cert.pem"), &dir.join("key.pem")).expect_err("no cert")
        );
        assert!(err.contains("no certificate in it"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
