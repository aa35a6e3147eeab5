//! From a pod to the right local node (`remsh`, `observer`), with no name or cookie to look up:
//! the node's exact name comes from the node (see [`super::discover`]), the name mode follows
//! from it, the cookie from `--cookie-file`, the user's environment or the pod's spec (its
//! Secret), and the local node is started hidden, with a dynamic or unique name, reading the
//! cookie from a private 0400 file — never from argv.
use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Up, discover::DistNode};
use crate::{
    erlang::{
        cookie::CookieFile,
        handshake::TLS_FLAGS_HINT,
        names::{self, LocalNode, NodeCommand},
        rpc::RpcClient,
    },
    k8s::{
        cookie::{self, Lookup},
        plugins, portforward,
        secrets::ClusterReads,
    },
    privsep::messages::SessionCommand,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShellKind {
    /// A remote shell: `iex --remsh` on Elixir nodes, else `erl -remsh`.
    Remsh,
    /// A local observer connected to the node.
    Observer,
}

/// What `remsh`/`observer` asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShellTask {
    pub kind: ShellKind,
    /// The pod to connect to (default: the first pod that is up, by name).
    pub pod: Option<String>,
    /// The node to connect to, when a pod runs several (its exact name).
    pub node: Option<String>,
    pub cookie_file: Option<PathBuf>,
    /// Flags for the local node (after `--`), e.g. TLS distribution flags.
    pub extra: Vec<String>,
}

/// How long asking the node whether it runs Elixir may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// The node of a pod to connect to: the one named by `--node`, or the only one.
pub fn choose_node<'a>(pod: &str, nodes: &'a [DistNode], wanted: Option<&str>) -> Result<&'a DistNode, String> {
    let named: Vec<&str> = nodes.iter().filter_map(|n| n.name()).collect();
    match wanted {
        Some(w) => nodes.iter().find(|n| n.name() == Some(w) || n.epmd_name.as_deref() == w.split('@').next()).ok_or_else(|| {
            format!("pod {pod} runs no node named {w} (its nodes: {}); pick one with --node", if named.is_empty() { "unknown".into() } else { named.join(", ") })
        }),
        None if nodes.len() == 1 => Ok(&nodes[0]),
        None if nodes.is_empty() => Err(format!("pod {pod} has no Erlang node beamredir could find")),
        None => Err(format!("pod {pod} runs several nodes ({}); pick one with --node NAME", named.join(", "))),
    }
}

/// Checks `--node` against the name the node gave itself: an exact name (with `@`) must match
/// exactly; a bare one (`--node worker`, as the flag's help allows) only the part before `@`.
pub fn check_wanted(wanted: &str, actual: &str) -> Result<(), String> {
    let bare = !wanted.contains('@') && actual.split('@').next() == Some(wanted);
    if bare { Ok(()) } else { names::check_expected(wanted, actual).map_err(|e| e.to_string()) }
}

/// Works out the command the session runs for a `remsh`/`observer` task. The cookie file it
/// creates is kept in `up` until the network part ends.
pub async fn session_command(up: &Up, task: &ShellTask) -> Result<SessionCommand, String> {
    let (pod_name, entry) = {
        let table = up.table.lock().unwrap();
        let name = match &task.pod {
            Some(p) => p.clone(),
            None => table.names().into_iter().find(|n| table.get(n).is_some_and(|e| e.target.is_some())).ok_or("no pod of the session is up")?,
        };
        let entry = table.get(&name).cloned().ok_or_else(|| format!("pod {name} is not part of the session"))?;
        (name, entry)
    };
    let target = entry.target.clone().ok_or_else(|| format!("pod {pod_name} cannot be reached: {}", entry.state))?;
    let node = choose_node(&pod_name, &entry.dist, task.node.as_deref())?;
    let name = match (node.name(), &task.node, &target.spec_node_name) {
        (Some(n), Some(w), _) => {
            check_wanted(w, n)?;
            n.to_string()
        }
        (Some(n), None, _) => n.to_string(),
        (None, Some(w), _) => w.clone(),
        (None, None, Some(spec)) => spec.clone(),
        (None, None, None) => {
            return Err(format!(
                "cannot tell the name of the node on pod {pod_name} port {} ({}); give it with --node NAME",
                node.port,
                node.identity.as_ref().err().cloned().unwrap_or_default()
            ));
        }
    };
    let tls_flags = task.extra.iter().any(|a| a == "-proto_dist" || a.contains("-proto_dist"));
    if node.tls && !tls_flags {
        return Err(format!("node {name} runs TLS distribution: pass its flags to the local node after --, e.g. -- {TLS_FLAGS_HINT}"));
    }
    let mode = names::mode_of(&name).map_err(|e| e.to_string())?;
    let env = |v: &str| std::env::var(v).ok();
    let reads = ClusterReads(&up.cluster);
    let lookup = Lookup { cookie_file: task.cookie_file.as_deref(), env: &env, pod: entry.object.as_deref().map(|p| (p, Some(target.container.as_str()))), kube: &reads };
    let resolved = cookie::resolve(lookup).await.map_err(|e| e.to_string())?;
    log::info!("the cookie for {name}: from {}", resolved.source);
    // Elixir on the node? Ask it (with the cookie: a wrong one fails here, in plain words).
    let elixir = if node.tls || task.kind == ShellKind::Observer {
        false
    } else {
        let stream = portforward::stream(&up.cluster, &pod_name, node.port, up.config.limits.upgrade_timeout()).await.map_err(|e| e.to_string())?;
        let mut client = RpcClient::connect(stream, &resolved.cookie, RPC_TIMEOUT).await.map_err(|e| e.to_string())?;
        let runtime = client.runtime(RPC_TIMEOUT).await.map_err(|e| e.to_string())?;
        client.close().await;
        runtime.iex
    };
    let dirs = plugins::user_path().await;
    let program = if elixir { "iex" } else { "erl" };
    let path = plugins::find_in(&dirs, program).ok_or_else(|| format!("{program} was not found in your PATH; install Erlang{} locally", if elixir { " and Elixir" } else { "" }))?;
    let erl = plugins::find_in(&dirs, "erl");
    let otp = names::local_otp_version(erl, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let parent = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_dir()).unwrap_or_else(std::env::temp_dir);
    let file = CookieFile::create(&resolved.cookie, &parent, None, home.as_deref()).map_err(|e| e.to_string())?;
    let cookie_env = file.env();
    let local = LocalNode { target: &name, mode, cookie_env: &cookie_env, inetrc: None, extra: &task.extra, otp };
    let NodeCommand { args, env, .. } = match (task.kind, elixir) {
        (ShellKind::Remsh, true) => names::iex_remsh(&local),
        (ShellKind::Remsh, false) => names::erl_remsh(&local),
        (ShellKind::Observer, _) => names::eval_node(&local, &observer_eval(&name)),
    };
    *up.cookie_file.lock().unwrap() = Some(file);
    let mut argv = vec![path.display().to_string()];
    argv.extend(args);
    Ok(SessionCommand { argv, env })
}

/// The local node's program for `observer`: connect, open observer on the node, stay until its
/// window closes. OTP 26+ has `observer:start(Node)`; on OTP 25 observer only starts on the
/// local node, and its Nodes menu lists visible connections only (a hidden node's are not), so
/// its state (wx_object: `[Parent, #state{}, Module, Timeout]`; in the record `frame` is the
/// 2nd element, `status_bar` the 5th, the active tab the 9th, `node` the 10th) is pointed at the
/// remote node as that menu would (`observer_wx:change_node_view/2`): the active tab, the window
/// title and the status bar, so the window does not name the local node.
fn observer_eval(node: &str) -> String {
    let atom = format!("'{}'", node.replace('\\', "\\\\").replace('\'', "\\'"));
    format!(
        "N = {atom}, \
         Fail = fun(Code, Format, Args) -> io:format(standard_error, \"beamredir: \" ++ Format ++ \"~n\", Args), halt(Code) end, \
         case net_kernel:connect_node(N) of true -> ok; _ -> Fail(3, \"cannot connect to ~p\", [N]) end, \
         case code:ensure_loaded(observer) of \
           {{module, observer}} -> ok; \
           _ -> Fail(4, \"observer is not installed with this Erlang (Debian: apt install erlang-observer)\", []) \
         end, \
         Remote = erlang:function_exported(observer, start, 1), \
         Started = case Remote of true -> observer:start(N); false -> observer:start() end, \
         case Started of ok -> ok; Error -> Fail(5, \"observer did not start (can this user open a window on DISPLAY?): ~0P\", [Error, 9]) end, \
         case Remote of \
           true -> ok; \
           false -> sys:replace_state(observer, fun([P, S, M, O]) -> T = element(9, S), T ! not_active, T ! {{active, N}}, \
                      Title = \"Observer - \" ++ atom_to_list(N), wxFrame:setTitle(element(2, S), Title), \
                      wxStatusBar:setStatusText(element(5, S), Title), [P, setelement(10, S, N), M, O] end) \
         end, \
         io:format(\"observer connected to ~p~n\", [N]), \
         R = erlang:monitor(process, whereis(observer)), \
         receive {{'DOWN', R, _, _, _}} -> halt(0) end."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erlang::handshake::NodeIdentity;

    fn node(port: u16, epmd: &str, name: &str) -> DistNode {
        let identity = Ok(NodeIdentity { name: name.into(), flags: 0, creation: Some(1), protocol_version: 6 });
        DistNode { port, epmd_name: Some(epmd.into()), identity, tls: false }
    }

    #[test]
    fn node_by_exact_or_bare_name() {
        let nodes = [node(1, "app", "app@10.0.0.1"), node(2, "worker", "worker@10.0.0.1")];
        let e = choose_node("duo-0", &nodes, None).unwrap_err();
        assert_eq!(e, "pod duo-0 runs several nodes (app@10.0.0.1, worker@10.0.0.1); pick one with --node NAME");
        for wanted in ["worker", "worker@10.0.0.1"] {
            let n = choose_node("duo-0", &nodes, Some(wanted)).unwrap();
            assert_eq!(n.port, 2);
            assert_eq!(check_wanted(wanted, n.name().unwrap()), Ok(()), "{wanted}");
        }
        // The right node by its epmd name, but not the host it calls itself.
        let n = choose_node("duo-0", &nodes, Some("worker@10.9.9.9")).unwrap();
        assert!(check_wanted("worker@10.9.9.9", n.name().unwrap()).unwrap_err().contains("calls itself worker@10.0.0.1, not worker@10.9.9.9"));
        let e = choose_node("duo-0", &nodes, Some("nope")).unwrap_err();
        assert_eq!(e, "pod duo-0 runs no node named nope (its nodes: app@10.0.0.1, worker@10.0.0.1); pick one with --node");
        assert_eq!(choose_node("one-0", &nodes[..1], None).unwrap().port, 1);
    }
}
