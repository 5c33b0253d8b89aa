//! Node identity: a cluster CA, node certificates that name their node id, and the rustls
//! configurations that make every node-to-node connection mutually authenticated.
//!
//! Files in a certificate directory (`herald certs init` / `herald certs issue`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the cluster CA certificate (every node needs it) |
//! | `ca.key` | the CA's private key (only where certificates are issued; keep it off the nodes if you can) |
//! | `node-<id>.pem`, `node-<id>.key` | node `<id>`'s certificate and key |
//!
//! A node certificate names its node as the DNS name `node-<id>.herald.cluster`: a dialing node
//! checks the name of the node it meant to reach (rustls does, as for any server name), and an
//! accepting node reads the id from the client's certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A node's id in the cluster.
pub type NodeId = u64;

/// The ALPN protocol of herald's node-to-node QUIC.
pub const ALPN: &[u8] = b"herald/1";

/// What can go wrong with certificates.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written. (The OS error is in the message, not chained as a
    /// source: printed with its chain, it appeared twice.)
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// Refusing to overwrite an existing CA or certificate.
    #[error("{0} already exists; remove it first if you really want a new one")]
    Exists(PathBuf),
    /// A certificate or key could not be made or parsed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// TLS configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(String),
    /// Issuing a certificate where the CA's private key is not (kept offline, as advised).
    #[error(
        "{0} not found: issuing a node certificate needs the cluster CA's private key (made by `herald certs init`); if it is kept offline, issue the certificate where it is, or bring it back for the issue"
    )]
    NoCaKey(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |error| IdentityError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn cert_error(error: impl std::fmt::Display) -> IdentityError {
    IdentityError::Certificate(error.to_string())
}

/// The DNS name a node's certificate carries.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.herald.cluster")
}

/// The node id a certificate (DER) names, if it names exactly one.
pub fn node_id_of(certificate: &[u8]) -> Option<NodeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    let mut ids = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => dns
                .strip_prefix("node-")?
                .strip_suffix(".herald.cluster")?
                .parse::<NodeId>()
                .ok(),
            _ => None,
        });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Creates the cluster CA in `dir` (`ca.pem`, `ca.key`); refuses to overwrite one.
pub fn init_ca(dir: &Path) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(IdentityError::Exists(path.clone()));
        }
    }
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "herald cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&key).map_err(cert_error)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(())
}

/// Issues node `id`'s certificate and key in `dir`, signed by the CA there.
pub fn issue_node(dir: &Path, id: NodeId) -> Result<(PathBuf, PathBuf), IdentityError> {
    let (ca_cert_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NoCaKey(ca_key_path.clone())
        } else {
            io(&ca_key_path)(error)
        }
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_error)?;
    let (cert_path, key_path) = (
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}.key")),
    );
    if cert_path.exists() {
        return Err(IdentityError::Exists(cert_path));
    }
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::new(vec![node_name(id)]).map_err(cert_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("herald node {id}"));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(contents).map_err(io(path))
}

/// A node's credentials: the CA to trust, its own chain and key.
#[derive(Debug)]
pub struct NodeIdentity {
    /// This node's id (as its certificate names it).
    pub id: NodeId,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            id: self.id,
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    let certs =
        rustls_pemfile_certs(&pem).map_err(|e| cert_error(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(cert_error(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// Parses PEM certificates (`-----BEGIN CERTIFICATE-----` blocks).
fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

impl NodeIdentity {
    /// Loads node `id`'s credentials from a certificate directory, checking that the
    /// certificate names that node.
    pub fn load(dir: &Path, id: NodeId) -> Result<NodeIdentity, IdentityError> {
        use rustls::pki_types::pem::PemObject;
        // A missing file: say how to make it.
        let hint = |error: IdentityError| match error {
            IdentityError::Io { path, error } if error.kind() == std::io::ErrorKind::NotFound => {
                cert_error(format!(
                    "{} not found: create the cluster CA with `herald certs init --dir {}` (once) and this node's certificate with `herald certs issue --dir {} --node-id {id}`",
                    path.display(),
                    dir.display(),
                    dir.display()
                ))
            }
            other => other,
        };
        let ca = read_pem_certs(&dir.join("ca.pem")).map_err(hint)?;
        let chain = read_pem_certs(&dir.join(format!("node-{id}.pem"))).map_err(hint)?;
        let key_path = dir.join(format!("node-{id}.key"));
        let key_pem = std::fs::read(&key_path)
            .map_err(io(&key_path))
            .map_err(hint)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| cert_error(format!("{}: {e}", key_path.display())))?;
        match node_id_of(&chain[0]) {
            Some(named) if named == id => Ok(NodeIdentity { id, ca, chain, key }),
            Some(other) => Err(cert_error(format!(
                "node-{id}.pem names node {other}, not node {id}"
            ))),
            None => Err(cert_error(format!(
                "node-{id}.pem names no herald node (not issued by `herald certs issue`?)"
            ))),
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> Result<rustls::RootCertStore, IdentityError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        }
        Ok(roots)
    }

    /// The server side: present this node's certificate, require one from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let tls = |e: rustls::Error| IdentityError::Tls(e.to_string());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), Self::provider())
                .build()
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The client side: trust only the cluster CA, present this node's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let tls = |e: rustls::Error| IdentityError::Tls(e.to_string());
        let mut config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The server name to dial node `id` by (what its certificate must name).
    pub fn server_name(id: NodeId) -> ServerName<'static> {
        ServerName::try_from(node_name(id)).expect("valid DNS name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates() {
        let dir = std::env::temp_dir().join(format!("herald-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(
            matches!(init_ca(&dir), Err(IdentityError::Exists(_))),
            "never overwrites a CA"
        );
        issue_node(&dir, 7).unwrap();
        assert!(matches!(issue_node(&dir, 7), Err(IdentityError::Exists(_))));
        let identity = NodeIdentity::load(&dir, 7).unwrap();
        assert_eq!(node_id_of(&identity.chain[0]), Some(7));
        assert!(
            NodeIdentity::load(&dir, 8).is_err(),
            "no certificate for node 8"
        );
        identity.server_config().unwrap();
        identity.client_config().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
