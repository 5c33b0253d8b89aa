//! The cluster transport with real QUIC endpoints on loopback: nodes of one CA talk; a peer
//! without a certificate, with one from another CA, naming another node, or not a member is
//! refused.

use herald_cluster::identity::{init_ca, issue_node};
use herald_cluster::{NodeIdentity, Transport, TransportOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A directory of certificates, removed (with them) when the test ends, passed or failed.
struct CertDir(PathBuf);

impl std::ops::Deref for CertDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cert_dir(tag: &str, nodes: &[u64]) -> CertDir {
    let dir =
        std::env::temp_dir().join(format!("herald-cluster-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init_ca(&dir).unwrap();
    for &id in nodes {
        issue_node(&dir, id).unwrap();
    }
    CertDir(dir)
}

fn endpoint(dir: &std::path::Path, id: u64, members: &'static [u64]) -> Transport {
    let identity = NodeIdentity::load(dir, id).unwrap();
    Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        identity,
        &TransportOptions::default(),
        Arc::new(move |peer| members.contains(&peer)),
    )
    .unwrap()
}

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn members_of_one_cluster_connect_and_exchange_streams() {
    let dir = cert_dir("ok", &[1, 2]);
    let a = endpoint(&dir, 1, &[1, 2]);
    let b = endpoint(&dir, 2, &[1, 2]);
    let a_addr = a.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let peer = a.accept().await.unwrap().unwrap();
        assert_eq!(
            peer.peer, 2,
            "the acceptor learns the dialer's id from its certificate"
        );
        let (mut send, mut recv) = peer.connection.accept_bi().await.unwrap();
        let request = recv.read_to_end(1024).await.unwrap();
        send.write_all(&[b"echo: ".as_slice(), &request].concat())
            .await
            .unwrap();
        send.finish().unwrap();
        peer.connection.closed().await;
    });
    let peer = tokio::time::timeout(PATIENCE, b.connect(a_addr, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peer.peer, 1);
    let (mut send, mut recv) = peer.connection.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"echo: hello");
    peer.connection.close(0u32.into(), b"done");
    tokio::time::timeout(PATIENCE, server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ours = cert_dir("ours", &[1]);
    let theirs = cert_dir("theirs", &[2]);
    let a = endpoint(&ours, 1, &[1, 2]);
    let intruder = endpoint(&theirs, 2, &[1, 2]);
    let a_addr = a.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        a.accept()
            .await
            .unwrap()
            .map(|p| p.peer)
            .unwrap_err()
            .to_string()
    });
    let dialed = tokio::time::timeout(PATIENCE, intruder.connect(a_addr, 1))
        .await
        .unwrap();
    // Both sides say whose certificate is not trusted, and what to do, not TLS's words alone.
    let dialed = dialed.map(|p| p.peer).unwrap_err().to_string();
    assert!(
        dialed.contains("invalid peer certificate")
            && dialed.contains("this node does not trust the certificate of the node it dialed")
            && dialed.contains("give every node a certificate from the one cluster CA"),
        "{dialed}"
    );
    let refusal = tokio::time::timeout(PATIENCE, accepting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        refusal.contains("handshake failed")
            && refusal.contains("the dialer does not trust this node's certificate")
            && refusal.contains("issued by another CA than its own ca.pem"),
        "{refusal}"
    );
}

#[tokio::test]
async fn dialing_a_node_that_is_not_the_one_named_fails() {
    let dir = cert_dir("wrong-name", &[1, 2, 3]);
    let a = endpoint(&dir, 1, &[1, 2, 3]);
    let b = endpoint(&dir, 2, &[1, 2, 3]);
    let a_addr = a.local_addr().unwrap();
    tokio::spawn(async move { while a.accept().await.is_some() {} });
    let error = tokio::time::timeout(PATIENCE, b.connect(a_addr, 3))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("node 3") && error.contains("failed"),
        "{error}"
    );
}

#[tokio::test]
async fn a_node_that_is_not_a_member_is_refused() {
    let dir = cert_dir("member", &[1, 9]);
    let a = endpoint(&dir, 1, &[1, 2]);
    let outsider = endpoint(&dir, 9, &[1, 9]);
    let a_addr = a.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        a.accept()
            .await
            .unwrap()
            .map(|p| p.peer)
            .unwrap_err()
            .to_string()
    });
    let peer = tokio::time::timeout(PATIENCE, outsider.connect(a_addr, 1))
        .await
        .unwrap()
        .unwrap();
    let refusal = tokio::time::timeout(PATIENCE, accepting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        refusal,
        format!(
            "refused a connection from {}: node 9 is not a member of this cluster",
            outsider.local_addr().unwrap()
        )
    );
    let closed = tokio::time::timeout(PATIENCE, peer.connection.closed())
        .await
        .unwrap();
    assert!(closed.to_string().contains("not a member"), "{closed}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_on_first_use() {
    use quinn::crypto::rustls::QuicClientConfig;
    let dir = cert_dir("anonymous", &[1]);
    let a = endpoint(&dir, 1, &[1]);
    let a_addr = a.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        a.accept()
            .await
            .unwrap()
            .map(|p| p.peer)
            .unwrap_err()
            .to_string()
    });

    // A client that trusts the CA but has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![herald_cluster::identity::ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    // The refusal shows on first use of the connection, not necessarily at connect.
    let outcome = async {
        let connection = endpoint
            .connect(a_addr, "node-1.herald.cluster")
            .unwrap()
            .await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(b"hi").await?;
        send.finish()?;
        recv.read_to_end(16).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    assert!(
        tokio::time::timeout(PATIENCE, outcome)
            .await
            .unwrap()
            .is_err()
    );
    let refusal = tokio::time::timeout(PATIENCE, accepting)
        .await
        .unwrap()
        .unwrap();
    assert!(refusal.contains("handshake failed"), "{refusal}");
}
