//! `remsh`, `observer` and `rpc`: from a pod name to the right node, with no node name or
//! cookie to look up. `remsh`/`observer` are an `up` session whose command the network part
//! works out (see [`beamredir::up::connect`]); `rpc` needs no session at all and runs as the
//! invoking user from start to end (see [`beamredir::up::rpc`]).
use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use beamredir::{
    privsep::spawn::drop_privileges,
    session::{StateDir, runas::Identity},
    up::{
        PodSource,
        connect::{ShellKind, ShellTask},
        rpc::{RpcTask, run},
    },
};
use clap::Args;

use super::{
    ClusterArgs, LimitArgs, ScopeArgs,
    up::{SessionRequest, limits, pod_source, run_session},
};

/// Which pod, and which node on it.
#[derive(Args, Debug, Clone)]
#[command(mut_args(shell_help))]
pub struct TargetArgs {
    /// Every pod of this StatefulSet is followed; the shell goes to --ordinal (default 0).
    #[arg(long, value_name = "NAME")]
    pub statefulset: Option<String>,
    /// The StatefulSet pod to connect to (NAME-ORDINAL).
    #[arg(long, value_name = "N", requires = "statefulset")]
    pub ordinal: Option<u32>,
    /// Pods matching this label selector; the first that is up (by name) is used.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Pods behind this Service; the first that is up (by name) is used.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// The node, when a pod runs several (its exact name, or the part before @).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// A file holding the cookie (first line). Default: ERLANG_COOKIE or RELEASE_COOKIE, else the pod's spec and its Secret.
    #[arg(long, value_name = "PATH")]
    pub cookie_file: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The help of two [`ClusterArgs`] as remsh/observer/rpc word it (`mut_args` keeps the
/// flags' order, which `mut_arg` would change in the completion scripts).
fn shell_help(arg: clap::Arg) -> clap::Arg {
    match arg.get_id().as_str() {
        "dist_port" => {
            arg.help("The pods' Erlang distribution port, if neither the spec nor epmd tells it")
        }
        "cluster_domain" => arg.help("The cluster's DNS domain, for the local node's host names (rpc needs none)"),
        _ => arg,
    }
}

impl TargetArgs {
    /// The pods to follow and the pod to connect to.
    fn resolve(&self, pod: Option<&str>) -> Result<(PodSource, Option<String>)> {
        let sources = [self.statefulset.is_some(), self.selector.is_some(), self.service.is_some(), pod.is_some()].iter().filter(|b| **b).count();
        if sources != 1 {
            bail!("name the pod (POD, or pod/NAME), or give exactly one of --statefulset, -l/--selector, --service");
        }
        let source = pod_source(&pod.map(String::from).into_iter().collect::<Vec<_>>(), &self.statefulset, &self.selector, &self.service);
        let chosen = match (&source, self.ordinal) {
            (PodSource::Names(names), _) => names.first().cloned(),
            (PodSource::StatefulSet(sts), n) => Some(format!("{sts}-{}", n.unwrap_or(0))),
            _ => None,
        };
        Ok((source, chosen))
    }
}

#[derive(Args, Debug)]
pub struct ShellArgs {
    /// The pod (pod/NAME works too); or use --statefulset, -l or --service.
    #[arg(value_name = "POD")]
    pub pod: Option<String>,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Flags for the local node, e.g. TLS distribution: -- -proto_dist inet_tls -ssl_dist_optfile FILE.
    #[arg(last = true, value_name = "NODE_FLAGS")]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RpcArgs {
    /// [POD] EXPR: the pod (unless --statefulset/-l/--service chooses it) and the expression.
    #[arg(value_name = "POD] [EXPR", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// The expression is Elixir (default: Erlang, e.g. 'erlang:memory(total).').
    #[arg(long)]
    pub elixir: bool,
    /// How long the evaluation may take.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = beamredir::flags::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `remsh` and `observer`: an `up` session with the command worked out for the user.
pub fn shell(state: StateDir, kind: ShellKind, args: ShellArgs, verbose: u8, quiet: bool) -> Result<i32> {
    let (source, chosen) = args.target.resolve(args.pod.as_deref())?;
    let task = ShellTask { kind, pod: chosen, node: args.target.node.clone(), cookie_file: args.target.cookie_file.clone(), extra: args.extra.clone() };
    let limits = limits(&args.limits, &args.scope);
    let config = args.target.cluster.net_config(source, limits, Some(task));
    let what = match kind {
        ShellKind::Remsh => "remsh",
        ShellKind::Observer => "observer",
    };
    // A session of its own (two shells at once must not collide on "default").
    let session = args.scope.name(|| format!("{what}-{}", std::process::id()));
    run_session(state, SessionRequest { config, scope: args.scope, session, command: Vec::new() }, verbose, quiet)
}

/// `rpc`: no session, no root needed; under sudo it becomes the invoking user first.
pub fn rpc(args: RpcArgs) -> Result<i32> {
    let (pod, expression) = match args.args.as_slice() {
        [expr] => (None, expr.clone()),
        [pod, expr] => (Some(pod.as_str()), expr.clone()),
        _ => bail!("give the pod and the expression: beamredir rpc POD 'EXPR'"),
    };
    let (source, chosen) = args.target.resolve(pod)?;
    if nix::unistd::geteuid().is_root() {
        drop_privileges(Identity::invoking_user()?.as_ref())?;
    }
    let task = RpcTask {
        kube: args.target.cluster.kube.clone(),
        source,
        pod: chosen,
        node: args.target.node.clone(),
        cookie_file: args.target.cookie_file.clone(),
        dist_port: args.target.cluster.dist_port,
        elixir: args.elixir,
        expression,
        timeout: args.timeout,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = runtime.block_on(run(task));
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(code)
}
