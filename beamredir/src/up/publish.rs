//! Keeps the root part's view (kernel redirects, hosts file) in step with the pod table: after
//! every change, the desired redirects and host names are computed afresh and sent if they
//! differ from what was last sent. One publication at a time, so they apply in order.
use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use super::{Root, table::PodTable};
use crate::{
    forward::registry::ForwardRegistry, privsep::messages::RedirectSpec,
    session::dns_files::HostEntry,
};

pub struct Publisher {
    root: Root,
    table: Arc<Mutex<PodTable>>,
    registry: Arc<ForwardRegistry<super::NetConfig>>,
    cluster_domain: String,
    /// What root holds now; None until the session has started.
    sent: tokio::sync::Mutex<Option<(Vec<RedirectSpec>, Vec<HostEntry>)>>,
}

impl Publisher {
    pub fn new(
        root: Root,
        table: Arc<Mutex<PodTable>>,
        registry: Arc<ForwardRegistry<super::NetConfig>>,
        cluster_domain: String,
    ) -> Self {
        Publisher {
            root,
            table,
            registry,
            cluster_domain,
            sent: tokio::sync::Mutex::new(None),
        }
    }

    /// What root should hold now.
    pub fn desired(&self) -> (Vec<RedirectSpec>, Vec<HostEntry>) {
        let table = self.table.lock().unwrap();
        let now = Instant::now();
        let redirects = table.redirects(
            |pod, port, family| self.registry.listener(pod, port, family),
            now,
        );
        (redirects, table.hosts(&self.cluster_domain, now))
    }

    /// The session started with `initial`: from now on, changes are published.
    pub async fn started(&self, initial: (Vec<RedirectSpec>, Vec<HostEntry>)) {
        *self.sent.lock().await = Some(initial);
    }

    /// Sends what changed (nothing before the session started: the start carries it all).
    pub async fn publish(&self) {
        let mut sent = self.sent.lock().await;
        let Some((redirects, hosts)) = sent.as_mut() else {
            return;
        };
        let (want_redirects, want_hosts) = self.desired();
        if want_redirects != *redirects {
            match self.root.set_redirects(want_redirects.clone()).await {
                Ok(()) => *redirects = want_redirects,
                Err(e) => log::warn!("updating redirects: {e}"),
            }
        }
        if want_hosts != *hosts {
            match self.root.set_hosts(want_hosts.clone()).await {
                Ok(()) => *hosts = want_hosts,
                Err(e) => log::warn!("updating the session's hosts file: {e}"),
            }
        }
    }
}
