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
    /// A file of a node's certificate directory that is missing or cannot serve: which file,
    /// what is wrong with it, and what fixes it.
    #[error("{0}")]
    Unusable(String),
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

/// Parses PEM certificates (`-----BEGIN CERTIFICATE-----` blocks).
fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The files of a node's certificate directory, and what fixes each: the start-up errors of
/// [`NodeIdentity::load`] name the file, what is wrong with it, and the command to run.
struct CertFiles<'a> {
    dir: &'a Path,
    id: NodeId,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl<'a> CertFiles<'a> {
    fn new(dir: &'a Path, id: NodeId) -> Self {
        CertFiles {
            dir,
            id,
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("node-{id}.pem")),
            key: dir.join(format!("node-{id}.key")),
        }
    }

    /// What fixes `file`: the cluster's CA certificate copied again (or a new CA), or this
    /// node's certificate issued again.
    fn fix(&self, file: &Path) -> String {
        let (dir, id) = (self.dir.display(), self.id);
        if file == self.ca {
            format!(
                "copy the cluster's ca.pem here from where its CA was created; for a new cluster, create a CA with `herald certs init --dir {dir}`, then each node's certificate with `herald certs issue --dir {dir} --node-id N`"
            )
        } else {
            format!(
                "issue this node's certificate again: remove {} and {}, run `herald certs issue --dir {dir} --node-id {id}` (it needs the cluster's ca.key: run it where that is, and copy node-{id}.pem and node-{id}.key here)",
                self.cert.display(),
                self.key.display()
            )
        }
    }

    /// `file` cannot serve, for `reason`: the error, with the fix.
    fn unusable(&self, file: &Path, reason: impl std::fmt::Display) -> IdentityError {
        IdentityError::Unusable(format!("{}: {reason}; {}", file.display(), self.fix(file)))
    }

    /// Reads `file`, or says why it cannot be read and what to do.
    fn read(&self, file: &Path) -> Result<Vec<u8>, IdentityError> {
        std::fs::read(file).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound if *file == self.ca => IdentityError::Unusable(format!(
                "{} not found: create the cluster CA with `herald certs init --dir {dir}` (once) and this node's certificate with `herald certs issue --dir {dir} --node-id {id}`",
                file.display(),
                dir = self.dir.display(),
                id = self.id
            )),
            std::io::ErrorKind::NotFound => IdentityError::Unusable(format!(
                "{} not found: issue this node's certificate with `herald certs issue --dir {dir} --node-id {id}` (it needs the cluster's ca.key: run it where that is, and copy node-{id}.pem and node-{id}.key here; it does not replace a node-{id}.pem or node-{id}.key left there: remove it first)",
                file.display(),
                dir = self.dir.display(),
                id = self.id
            )),
            std::io::ErrorKind::PermissionDenied => IdentityError::Unusable(format!(
                "{}: cannot read it: permission denied{}; make it readable by the user herald runs as (`chown` it to that user, or `chmod g+r` it with that user in its group)",
                file.display(),
                owner(file)
            )),
            _ => self.unusable(file, format!("cannot read it: {error}")),
        })
    }

    /// The certificates of a PEM file, at least one, each a valid X.509 certificate.
    fn certificates(&self, file: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let pem = self.read(file)?;
        let certs = rustls_pemfile_certs(&pem)
            .map_err(|e| self.unusable(file, format!("not a PEM certificate ({e})")))?;
        if certs.is_empty() {
            return Err(self.unusable(
                file,
                "holds no certificate (no -----BEGIN CERTIFICATE----- block)",
            ));
        }
        for cert in &certs {
            if let Err(e) = x509_parser::parse_x509_certificate(cert) {
                return Err(self.unusable(file, format!("not a valid certificate ({e})")));
            }
        }
        Ok(certs)
    }
}

/// ` (the file is owned by uid U, mode 0MMM, and herald runs as uid V)`, as far as known.
fn owner(file: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(file) else {
        return String::new();
    };
    // /proc/self belongs to the process's effective user.
    let runs_as = std::fs::metadata("/proc/self")
        .map(|m| format!(", and herald runs as uid {}", m.uid()))
        .unwrap_or_default();
    format!(
        " (the file is owned by uid {}, mode {:04o}{runs_as})",
        meta.uid(),
        meta.mode() & 0o7777
    )
}

/// Checks that `chain` was issued by the CA of `roots`, for the uses a node puts it to (a
/// server that peers dial by its node name, a client that dials them), as the peers will
/// check it at each connection. Without this, a node with another CA's certificate started,
/// and every connection to or from it then failed.
fn verify_issued_by(
    files: &CertFiles<'_>,
    roots: &rustls::RootCertStore,
    chain: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
) -> Result<(), IdentityError> {
    use rustls::client::danger::ServerCertVerifier;
    let roots = Arc::new(roots.clone());
    let now = rustls::pki_types::UnixTime::now();
    let (end_entity, intermediates) = (&chain[0], &chain[1..]);
    let tls = |e: rustls::client::VerifierBuilderError| IdentityError::Tls(e.to_string());
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(tls)?;
    let client = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(tls)?;
    let name = NodeIdentity::server_name(files.id);
    let refused = match server
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .and_then(|_| client.verify_client_cert(end_entity, intermediates, now))
    {
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    use rustls::CertificateError;
    let reason = match refused {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => {
            return Err(IdentityError::Unusable(format!(
                "{}: it was not issued by the CA in {}: one of the two comes from another CA. If ca.pem is the cluster's (the one the other nodes have), {}; if ca.pem is not, {}",
                files.cert.display(),
                files.ca.display(),
                files.fix(&files.cert),
                files.fix(&files.ca)
            )));
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "it has expired".to_string()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet) => {
            "it is not valid yet (is this machine's clock right?)".to_string()
        }
        other => format!("{} does not accept it ({other})", files.ca.display()),
    };
    Err(files.unusable(&files.cert, reason))
}

impl NodeIdentity {
    /// Loads node `id`'s credentials from a certificate directory, checking what its peers
    /// will: that the certificate names that node, goes with the key, and was issued by the CA
    /// in `ca.pem`. An error names the file at fault, what is wrong with it, and the command
    /// that fixes it.
    pub fn load(dir: &Path, id: NodeId) -> Result<NodeIdentity, IdentityError> {
        use rustls::pki_types::pem::PemObject;
        let files = CertFiles::new(dir, id);
        let ca = files.certificates(&files.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca {
            roots.add(cert.clone()).map_err(|e| {
                files.unusable(&files.ca, format!("not a usable CA certificate ({e})"))
            })?;
        }
        let chain = files.certificates(&files.cert)?;
        match node_id_of(&chain[0]) {
            Some(named) if named == id => {}
            Some(other) => {
                return Err(files.unusable(
                    &files.cert,
                    format!(
                        "it names node {other}, not node {id} (node {other}'s certificate, copied or renamed?)"
                    ),
                ));
            }
            None => {
                return Err(files.unusable(
                    &files.cert,
                    "it names no herald node (it was not issued by `herald certs issue`)",
                ));
            }
        }
        let key_pem = files.read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            let reason = match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "holds no private key (no -----BEGIN PRIVATE KEY----- block)".to_string()
                }
                other => format!("not a PEM private key ({other})"),
            };
            files.unusable(&files.key, reason)
        })?;
        let provider = Self::provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(_) => files.unusable(
                    &files.key,
                    format!(
                        "it is not the key of {} (the two files come from different issues)",
                        files.cert.display()
                    ),
                ),
                other => files.unusable(&files.key, format!("not a usable private key ({other})")),
            },
        )?;
        verify_issued_by(&files, &roots, &chain, &provider)?;
        Ok(NodeIdentity { id, ca, chain, key })
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
