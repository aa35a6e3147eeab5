//! Following the pods with kube-rs's `watcher`: it lists, watches from the list's
//! resourceVersion, asks for bookmarks, and relists (with backoff) when the API server says the
//! history it needs has expired (410 Gone) or the connection drops. Each event goes to its
//! pod's reconciler; a relist that no longer contains a known pod means the pod went while the
//! watch was down.
use std::{collections::BTreeSet, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

use super::{PodSource, Up, reconciler::Observation};

/// Starts the watches: one per named pod (a field selector on its name), or one for the label
/// selector. They run until the returned tasks are aborted.
pub fn follow(up: &Arc<Up>, selector: Option<&str>) -> Vec<tokio::task::JoinHandle<()>> {
    let api: Api<Pod> = Api::namespaced(up.cluster.client.clone(), &up.cluster.namespace);
    // Which known pods a relist covers: the named one, or every pod (empty = all).
    let watches: Vec<(watcher::Config, Vec<String>)> = match (&up.config.source, selector) {
        (PodSource::Names(names), _) => names
            .iter()
            .map(|n| {
                (
                    watcher::Config::default().fields(&format!("metadata.name={n}")),
                    vec![n.clone()],
                )
            })
            .collect(),
        (_, Some(selector)) => vec![(watcher::Config::default().labels(selector), Vec::new())],
        (_, None) => Vec::new(),
    };
    watches
        .into_iter()
        .map(|(config, covered)| {
            let (up, api) = (up.clone(), api.clone());
            tokio::spawn(async move {
                let mut events = watcher(api, config).default_backoff().boxed();
                let mut relisted: Option<BTreeSet<String>> = None;
                let mut errors = 0u64;
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Init) => relisted = Some(BTreeSet::new()),
                        Ok(watcher::Event::InitApply(p)) => {
                            if let (Some(seen), Some(name)) =
                                (relisted.as_mut(), p.metadata.name.clone())
                            {
                                seen.insert(name);
                            }
                            dispatch(&up, p);
                        }
                        Ok(watcher::Event::InitDone) => {
                            let seen = relisted.take().unwrap_or_default();
                            let known = up.table.lock().unwrap().names();
                            for name in known.into_iter().filter(|n| {
                                (covered.is_empty() || covered.contains(n)) && !seen.contains(n)
                            }) {
                                up.reconcilers.observe(&up, &name, Observation::Gone);
                            }
                            errors = 0;
                        }
                        Ok(watcher::Event::Apply(p)) => dispatch(&up, p),
                        Ok(watcher::Event::Delete(p)) => {
                            if let Some(name) = p.metadata.name.clone() {
                                up.reconcilers.observe(&up, &name, Observation::Gone);
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            // The API server (or the way to it) broke: streams prepared before
                            // may be dead.
                            up.prepared.api_broke();
                            // The backoff spaces retries; the log says it once per outage.
                            if errors == 1 {
                                log::warn!(
                                    "watching pods in {}: {e} (retrying with backoff)",
                                    up.cluster.namespace
                                );
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

fn dispatch(up: &Arc<Up>, pod: Pod) {
    if let Some(name) = pod.metadata.name.clone() {
        up.reconcilers
            .observe(up, &name, Observation::Present(Box::new(pod)));
    }
}
