//! The two reads cookie resolution may need ([`super::cookie::KubeReads`]): one key of a
//! Secret or a ConfigMap. Only the named key's value leaves this module, and only to become a
//! cookie; nothing is logged.
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

use super::Cluster;
use super::cookie::{KubeReadError, KubeReads};

/// Reads through the session's cluster client (so with the user's own credentials).
pub struct ClusterReads<'a>(pub &'a Cluster);

fn read_error(e: kube::Error) -> KubeReadError {
    match e {
        kube::Error::Api(s) if s.code == 403 => KubeReadError::Forbidden(s.message),
        kube::Error::Api(s) if s.code == 404 => KubeReadError::ObjectNotFound,
        other => KubeReadError::Other(super::error::chain(&other)),
    }
}

/// The largest value accepted as a cookie source (cookies are short).
const MAX_VALUE: usize = 4096;

impl KubeReads for ClusterReads<'_> {
    async fn get_secret_key(&self, ns: &str, name: &str, key: &str) -> Result<String, KubeReadError> {
        let api: Api<Secret> = Api::namespaced(self.0.client.clone(), ns);
        let secret = api.get_opt(name).await.map_err(read_error)?.ok_or(KubeReadError::ObjectNotFound)?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.as_bytes().to_vec()))
            .ok_or(KubeReadError::KeyNotFound)?;
        if bytes.len() > MAX_VALUE {
            return Err(KubeReadError::Other(format!("key {key} of Secret {name} is larger than {MAX_VALUE} bytes")));
        }
        String::from_utf8(bytes).map_err(|_| KubeReadError::Other(format!("key {key} of Secret {name} is not text")))
    }

    async fn get_configmap_key(&self, ns: &str, name: &str, key: &str) -> Result<String, KubeReadError> {
        let api: Api<ConfigMap> = Api::namespaced(self.0.client.clone(), ns);
        let cm = api.get_opt(name).await.map_err(read_error)?.ok_or(KubeReadError::ObjectNotFound)?;
        let value = cm.data.as_ref().and_then(|d| d.get(key)).cloned().ok_or(KubeReadError::KeyNotFound)?;
        if value.len() > MAX_VALUE {
            return Err(KubeReadError::Other(format!("key {key} of ConfigMap {name} is larger than {MAX_VALUE} bytes")));
        }
        Ok(value)
    }
}
