//! The simulated cluster's PKI and kubeconfig: a CA of its own and a server certificate it
//! signs (rustls rejects a CA used as the server's own certificate), valid for 127.0.0.1 and
//! localhost; a random bearer token; a kubeconfig that carries the CA and the token.
use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Pki {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn generate() -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "beamredir-sim-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string(), "kubernetes.default.svc".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &issuer)?;

        let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let chain = vec![server_cert.der().clone(), ca_cert.der().clone()];
        let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).context("server TLS config")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Pki { ca_pem: ca_cert.pem(), server_config: Arc::new(config) })
    }
}

/// A random token (hex), from the kernel's RNG.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a kubeconfig for the simulated cluster: context `sim` (namespace `default`), plus a
/// context `sim-badtoken` with a wrong token (for 401 tests).
pub fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, token: &str) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let text = format!(
        "apiVersion: v1
kind: Config
current-context: sim
clusters:
- name: sim
  cluster:
    server: {url}
    certificate-authority-data: {ca}
contexts:
- name: sim
  context:
    cluster: sim
    user: sim-admin
    namespace: default
- name: sim-badtoken
  context:
    cluster: sim
    user: sim-intruder
users:
- name: sim-admin
  user:
    token: {token}
- name: sim-intruder
  user:
    token: not-the-token
"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
