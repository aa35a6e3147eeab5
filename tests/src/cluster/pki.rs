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
        Self::generate_for(&[])
    }

    /// As [`Pki::generate`], with more names (IP addresses or DNS names) in the server
    /// certificate, for an API server that listens elsewhere than 127.0.0.1.
    pub fn generate_for(extra_names: &[String]) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "beamredir-sim-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let server_key = KeyPair::generate()?;
        let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string(), "kubernetes.default.svc".to_string()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
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
    write_kubeconfig_with(path, url, ca_pem, None, &[("sim", "sim-admin", token), ("sim-badtoken", "sim-intruder", "not-the-token")])
}

/// Writes a kubeconfig with one context per (context, user, token), the first current; with
/// `proxy_url`, the cluster entry carries `proxy-url` (kubectl, client-go and the Python
/// client then connect through that HTTP CONNECT proxy).
pub fn write_kubeconfig_with(path: &Path, url: &str, ca_pem: &str, proxy_url: Option<&str>, contexts: &[(&str, &str, &str)]) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let proxy = proxy_url.map(|p| format!("\n    proxy-url: {p}")).unwrap_or_default();
    let mut text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: {}\nclusters:\n- name: sim\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}{proxy}\ncontexts:\n",
        contexts.first().map(|c| c.0).unwrap_or("sim")
    );
    for (ctx, user, _) in contexts {
        text.push_str(&format!("- name: {ctx}\n  context:\n    cluster: sim\n    user: {user}\n    namespace: default\n"));
    }
    text.push_str("users:\n");
    for (_, user, token) in contexts {
        text.push_str(&format!("- name: {user}\n  user:\n    token: {token}\n"));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
