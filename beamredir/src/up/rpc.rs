//! `beamredir rpc POD EXPR`: evaluates an expression on a pod's node and prints the result. It
//! needs no session and no local Erlang: the distribution connection runs from this process
//! over a port-forward stream (see [`crate::erlang::rpc`]), as the invoking user. The exit code
//! says how it went, so scripts and CI can use it.
use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    Limits, PodSource,
    connect::{check_wanted, choose_node},
    discover::discover,
};
use crate::{
    erlang::rpc::{Language, RpcClient},
    k8s::{
        Cluster, K8sError, KubeArgs,
        cookie::{self, Lookup},
        lookup,
        pod::PodTarget,
        portforward,
        secrets::ClusterReads,
    },
};

/// Exit codes: 0 the expression's value was printed, 1 it raised, 2 it did not parse, 3
/// beamredir could not get the expression to the node (the message says why).
pub const EXIT_UNREACHABLE: i32 = 3;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RpcTask {
    pub kube: KubeArgs,
    pub source: PodSource,
    /// The pod (default: the first Running pod of the source, by name).
    pub pod: Option<String>,
    pub node: Option<String>,
    pub cookie_file: Option<PathBuf>,
    pub dist_port: Option<u16>,
    pub elixir: bool,
    pub expression: String,
    pub timeout: Duration,
}

/// Runs the task, printing the result to stdout and errors to stderr; returns the exit code.
pub async fn run(task: RpcTask) -> i32 {
    match evaluate(&task).await {
        Ok(code) => code,
        Err(message) => {
            // The message may quote the node or the cluster: no terminal escapes through it.
            eprintln!("beamredir: error: {}", crate::privsep::messages::printable(&message, 16 * 1024));
            EXIT_UNREACHABLE
        }
    }
}

async fn evaluate(task: &RpcTask) -> Result<i32, String> {
    let cluster = Cluster::connect(&task.kube).await.map_err(|e| e.to_string())?;
    let pods = match &task.source {
        PodSource::Names(names) => {
            let mut pods = Vec::new();
            for n in names {
                pods.push(lookup::get(&cluster, n).await.map_err(|e| cluster.explain(e).to_string())?);
            }
            pods
        }
        source => {
            let selector = match source {
                PodSource::StatefulSet(n) => lookup::statefulset_selector(&cluster, n).await.map_err(|e| cluster.explain(e).to_string())?,
                PodSource::Service(n) => lookup::service_selector(&cluster, n).await.map_err(|e| cluster.explain(e).to_string())?,
                PodSource::Selector(s) => s.clone(),
                PodSource::Names(_) => unreachable!(),
            };
            lookup::list(&cluster, &selector).await.map_err(|e| cluster.explain(e).to_string())?
        }
    };
    let mut pods: Vec<_> = pods.into_iter().filter(|p| task.pod.as_deref().is_none_or(|w| p.metadata.name.as_deref() == Some(w))).collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let (pod, target) = pods
        .iter()
        .find_map(|p| PodTarget::from_pod(p, task.dist_port).ok().map(|t| (p, t)))
        .ok_or_else(|| match &task.pod {
            Some(name) => K8sError::NotFound { what: format!("running pod {name}"), namespace: cluster.namespace.clone() }.to_string(),
            None => format!("no Running pod with an IP in namespace {:?}", cluster.namespace),
        })?;
    let found = discover(&cluster, &target, &Limits::default(), true).await.map_err(|e| e.to_string())?;
    let node = choose_node(&target.name, &found.nodes, task.node.as_deref())?;
    if node.tls {
        return Err(format!("the node on pod {} runs TLS distribution, which `rpc` cannot speak; use `beamredir remsh` with its TLS flags", target.name));
    }
    if let (Some(wanted), Some(actual)) = (&task.node, node.name()) {
        check_wanted(wanted, actual)?;
    }
    let env = |v: &str| std::env::var(v).ok();
    let reads = ClusterReads(&cluster);
    let lookup = Lookup { cookie_file: task.cookie_file.as_deref(), env: &env, pod: Some((pod, Some(target.container.as_str()))), kube: &reads };
    let resolved = cookie::resolve(lookup).await.map_err(|e| e.to_string())?;
    let stream = portforward::stream(&cluster, &target.name, node.port, Limits::default().upgrade_timeout()).await.map_err(|e| e.to_string())?;
    let mut client = RpcClient::connect(stream, &resolved.cookie, task.timeout).await.map_err(|e| e.to_string())?;
    let language = if task.elixir { Language::Elixir } else { Language::Erlang };
    let evaluation = client.eval(language, &task.expression, task.timeout).await.map_err(|e| e.to_string())?;
    client.close().await;
    evaluation.print(&mut std::io::stdout(), &mut std::io::stderr()).map_err(|e| e.to_string())?;
    Ok(evaluation.exit_code())
}
