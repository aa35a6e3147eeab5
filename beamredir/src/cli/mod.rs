//! The `beamredir` command line: flags (clap, kubectl's spelling where there is one) and the
//! glue from them to the library. Errors are reported by main, in one line each.
//!
//! * [`host`]: serving a running session (signals, control socket, the command, the network
//!   part's requests) — shared by `map` and `up`;
//! * [`up`]: the root part of `up`: claim the name, start the network part, start the session;
//! * [`shell`]: `remsh`, `observer`, `rpc`: from a pod name to the right node;
//! * [`admin`]: `exec`, `shell`, `status`, `down`, `doctor`;
//! * [`completions`]: `completions`, `man`, and the `kubectl beamredir` plugin name.
mod admin;
pub mod completions;
mod host;
mod shell;
mod up;

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use beamredir::{
    k8s::KubeArgs,
    mapping::{self, Mapping},
    session::{DEFAULT_STATE_DIR, StateDir, active::ScopeRequest},
    up::{Limits, NetConfig, PodSource, connect::ShellTask},
};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "beamredir",
    version,
    about = "Reach Erlang/Elixir pods in Kubernetes from a local BEAM node: eBPF connect() redirection to port-forwards, per shell",
    long_about = None,
    after_help = "Examples:\n  sudo beamredir up --pod app-0\n  sudo beamredir status\n  sudo beamredir doctor"
)]
pub struct Cli {
    /// More logging: -v logs each redirected connect() from the eBPF program, -vv traces.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Where session records and control sockets live.
    #[arg(long, global = true, env = "BEAMREDIR_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Port-forward pods' Erlang ports through the API server and redirect the pod IPs to them.
    #[command(after_help = "Examples:\n  \
        sudo beamredir up --pod app-0 -- iex --name debug@127.0.0.1 --hidden --remsh app@10.244.0.5\n  \
        sudo beamredir up -n prod --context staging --statefulset app --session shop\n  \
        sudo beamredir up --kubeconfig ~/.kube/kind.yaml --pod app-0 --dist-port 9000\n\n\
        The network part (kubeconfig, credential plugins, API server, pods) runs as you, not as root.")]
    Up(UpArgs),
    /// A remote shell on a pod's node: its exact name from the node, the cookie from the pod's Secret, iex or erl as the node runs.
    #[command(after_help = "Examples:\n  \
        sudo beamredir remsh app-0\n  \
        sudo beamredir remsh --statefulset app --ordinal 2 -n shop\n  \
        sudo beamredir remsh app-0 --cookie-file ~/.config/app.cookie -- -proto_dist inet_tls -ssl_dist_optfile tls.conf")]
    Remsh(shell::ShellArgs),
    /// Evaluate an Erlang (or --elixir) expression on a pod's node and print the result; exit 0 on success.
    #[command(after_help = "Examples:\n  \
        beamredir rpc app-0 'erlang:memory(total).'\n  \
        beamredir rpc --statefulset app --ordinal 1 --elixir 'Application.started_applications()'\n\n\
        Exit codes: 0 the value was printed, 1 the expression raised, 2 it does not parse, 3 it could not reach the node.\n\
        rpc needs no root: it talks to the node over a port-forward, as you.")]
    Rpc(shell::RpcArgs),
    /// A local observer (Debian: erlang-observer) connected to a pod's node.
    #[command(after_help = "Example:\n  sudo beamredir observer app-0")]
    Observer(shell::ShellArgs),
    /// Redirect pod IP:port to local forwards you already run (e.g. kubectl port-forward).
    #[command(after_help = "Examples:\n  \
        kubectl port-forward pod/app-0 14369:4369 15555:5555 &\n  \
        sudo beamredir map 10.244.0.5:4369=14369 10.244.0.5:5555=15555 -- \\\n      \
        erl -name debug@127.0.0.1 -hidden -remsh app@10.244.0.5\n\n  \
        # or keep the session in the foreground and join it from other shells:\n  \
        sudo beamredir map --session work 10.244.0.5:4369=14369 10.244.0.5:5555=15555\n  \
        sudo beamredir shell --session work")]
    Map(MapArgs),
    /// Run a command inside a running session (as the user who invoked sudo).
    #[command(
        after_help = "Example:\n  sudo beamredir exec --session work -- iex --name debug@127.0.0.1 --hidden --remsh app@10.244.0.5"
    )]
    Exec(ExecArgs),
    /// Start your shell inside a running session (as the user who invoked sudo).
    #[command(after_help = "Example:\n  sudo beamredir shell --session work")]
    Shell(SessionArg),
    /// List sessions, their redirects and how many connects each redirected.
    #[command(
        after_help = "Examples:\n  sudo beamredir status\n  sudo beamredir status -o json | jq '.[].redirects'\n  sudo beamredir status -o wide --watch"
    )]
    Status(StatusArgs),
    /// End a session (or all of yours) and clean up what crashed sessions left.
    #[command(
        after_help = "Examples:\n  sudo beamredir down --session work\n  sudo beamredir down --all"
    )]
    Down(DownArgs),
    /// Check this host can run beamredir, and say what to fix if not.
    #[command(after_help = "Example:\n  sudo beamredir doctor")]
    Doctor,
    /// Print a shell completion script (bash, zsh or fish).
    Completions(completions::CompletionsArgs),
    /// Print the man page, or write one per subcommand into a directory.
    Man(completions::ManArgs),
    /// (internal) The unprivileged network part of a session, started by the root part.
    #[command(name = "__network-part", hide = true)]
    NetworkPart,
    /// (internal) Cleans up after a session process that died without doing so.
    #[command(name = "__reaper", hide = true)]
    Reaper { session: String, pid: u32 },
}

#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// Session name (also the name of its cgroup, /beamredir/NAME) [default: "default"; for remsh/observer one of their own].
    #[arg(long, short = 's')]
    pub session: Option<String>,
    /// Redirect every process on the machine (attach at the root cgroup).
    #[arg(long, conflicts_with = "cgroup")]
    pub global: bool,
    /// Attach to this existing cgroup instead of creating one.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// How many redirects (pod address:port entries) the session's maps hold.
    #[arg(long, value_name = "N", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_redirects: u32,
}

impl ScopeArgs {
    /// The session's name: the one given, else `default`.
    pub fn name(&self, default: impl FnOnce() -> String) -> String {
        self.session.clone().unwrap_or_else(default)
    }

    pub fn request(&self) -> ScopeRequest {
        match (&self.cgroup, self.global) {
            (Some(path), _) => ScopeRequest::Existing(path.clone()),
            (None, true) => ScopeRequest::Global,
            (None, false) => ScopeRequest::NewCgroup,
        }
    }
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// POD_IP:PORT=LOCAL_PORT (or =LOCAL_IP:LOCAL_PORT; [IPv6]:PORT for IPv6 pods): connect() to POD_IP:PORT goes to the local forward.
    #[arg(required = true, value_name = "POD_IP:PORT=LOCAL_PORT")]
    pub mappings: Vec<Mapping>,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Command to run in the session; beamredir ends the session when it exits and exits with its code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["pods", "statefulset", "selector", "service"])))]
pub struct UpArgs {
    /// Pod to reach (repeatable; pod/NAME works too).
    #[arg(long = "pod", short = 'p', value_name = "NAME")]
    pub pods: Vec<String>,
    /// Every pod of this StatefulSet, followed as it scales and restarts.
    #[arg(long, value_name = "NAME")]
    pub statefulset: Option<String>,
    /// Every pod matching this label selector (kubectl's -l).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Every pod behind this Service (e.g. the headless Service of a StatefulSet).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Command to run in the session; beamredir ends the session when it exits and exits with its code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The cluster and how its pods' nodes are reached: `up`, and (with their own help for the
/// first two) `remsh`, `observer`, `rpc`.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The pods' Erlang distribution port (default: a container port named `erlang`/`dist`, ERL_DIST_PORT, -erl_epmd_port, else what the pod's epmd says).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub dist_port: Option<u16>,
    /// The cluster's DNS domain, for names like app-0.app.default.svc.cluster.local.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    #[command(flatten)]
    pub kube: KubeArgs,
}

impl ClusterArgs {
    /// What the network part of a session is to do.
    pub fn net_config(
        &self,
        source: PodSource,
        limits: Limits,
        shell: Option<ShellTask>,
    ) -> NetConfig {
        NetConfig {
            kube: self.kube.clone(),
            source,
            dist_port: self.dist_port,
            cluster_domain: self.cluster_domain.clone(),
            limits,
            shell,
        }
    }
}

/// Bounds on what a session holds (see docs/reliability.md).
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Concurrent forwarded connections, all forwards together; past it, a connection waits (--connection-wait) for a slot, then is closed.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// How long a connection past --max-connections waits for a slot before it is closed (0: closed at once).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = beamredir::flags::parse_wait)]
    pub connection_wait: Duration,
    /// Ports forwarded per pod (its epmd and the distribution ports it lists).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_ports_per_pod: u32,
    /// How long a port-forward upgrade through the API server may take.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = beamredir::flags::parse_duration)]
    pub upgrade_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct SessionArg {
    /// Session to join (default: your only running one).
    #[arg(long, short = 's')]
    pub session: Option<String>,
    /// Act on a session another user started (only root itself, not a sudo user, may).
    #[arg(long)]
    pub any_user: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub session: SessionArg,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The default table.
    Table,
    /// Wider table: forward counters and pod details.
    Wide,
    /// JSON: an array of sessions (schema: docs/status-schema.md).
    Json,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format (kubectl's -o).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as -o json.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// Print again every 2 s until interrupted (-o json: one document per line).
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Session to end (default: your only running one).
    #[arg(long, short = 's', conflicts_with = "all")]
    pub session: Option<String>,
    /// End every one of your sessions (root with --any-user: everyone's).
    #[arg(long)]
    pub all: bool,
    /// Act on sessions other users started (only root itself, not a sudo user, may).
    #[arg(long)]
    pub any_user: bool,
}

pub fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("beamredir", level)
        .filter_module("beamredir_ebpf", level)
        // kube logs the failures beamredir reports itself (one line each): only with -v.
        .filter_module(
            "kube_client",
            if cli.verbose > 0 {
                level
            } else {
                log::LevelFilter::Off
            },
        )
        .filter_module(
            "kube_runtime",
            if cli.verbose > 0 {
                level
            } else {
                log::LevelFilter::Off
            },
        )
        // Log lines carry what the cluster and the pods said (kubelet errors, epmd and node
        // names): no terminal escapes reach the user's terminal through them.
        .format(|buf, record| writeln!(buf, "{}", log_line(record.level(), record.args())))
        .init();
}

/// One log record as printed: `beamredir: LEVEL: TEXT`, without control characters or
/// bidirectional overrides, at most 16 KiB; a line after the first is indented, so nothing
/// quoted from the cluster can pass for a line of beamredir's own.
fn log_line(level: log::Level, args: &std::fmt::Arguments) -> String {
    let text = beamredir::privsep::messages::printable(&args.to_string(), 16 * 1024);
    format!("beamredir: {}: {}", level.as_str().to_lowercase(), text.replace('\n', "\n  "))
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`beamredir {what}` needs root (eBPF programs and cgroup writes need CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it with sudo"
        );
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Marks every descriptor from `first` up close-on-exec: whatever beamredir inherited from
/// the process that started it (sudo closes them; a root shell, a test harness or a service
/// manager may not) must not pass on to the network part, which runs as the invoking user, or
/// to the commands run in the session.
fn no_inherited_fds(first: u32) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: one by one.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first as i32)
        .collect();
    for fd in fds {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    // The internal commands get their channel (or pipe) on fd 3 and mark it themselves.
    match cli.command {
        Command::NetworkPart | Command::Reaper { .. } => no_inherited_fds(4),
        _ => no_inherited_fds(3),
    }
    let state = StateDir::new(&cli.state_dir);
    let quiet = cli.quiet;
    match cli.command {
        Command::Map(args) => {
            mapping::check_unique(&args.mappings)?;
            require_root("map")?;
            host::map(state, args, cli.verbose, quiet)
        }
        Command::Up(args) => {
            require_root("up")?;
            up::up(state, args, cli.verbose, quiet)
        }
        Command::NetworkPart => up::network_part(),
        Command::Remsh(args) => {
            require_root("remsh")?;
            shell::shell(state, beamredir::up::connect::ShellKind::Remsh, args, cli.verbose, quiet)
        }
        Command::Observer(args) => {
            require_root("observer")?;
            shell::shell(state, beamredir::up::connect::ShellKind::Observer, args, cli.verbose, quiet)
        }
        Command::Rpc(args) => shell::rpc(args),
        Command::Reaper { session, pid } => Ok(beamredir::session::reaper::run(&state, &session, pid)),
        Command::Exec(args) => {
            require_root("exec")?;
            state.verify()?;
            admin::exec_in_session(&state, &args.session, args.command)
        }
        Command::Shell(args) => {
            require_root("shell")?;
            state.verify()?;
            admin::shell(&state, &args)
        }
        Command::Status(args) => {
            // Root acts on nothing it reads here, but prints it: the same rules as for acting.
            state.verify()?;
            admin::status(
                &state,
                if args.json { Output::Json } else { args.output },
                args.watch,
            )
        }
        Command::Down(args) => {
            require_root("down")?;
            state.verify()?;
            admin::down(&state, args.session.as_deref(), args.all, args.any_user)
        }
        Command::Doctor => {
            // It may mount a private cgroup2 hierarchy inside the state directory.
            state.verify()?;
            admin::doctor(&state)
        }
        Command::Completions(args) => completions::completions(&args),
        Command::Man(args) => completions::man(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_carry_no_terminal_escapes() {
        let node = "app\u{1b}]0;owned\u{7}@10.0.0.1\u{202e}";
        let line = log_line(log::Level::Warn, &format_args!("node {node} did not answer"));
        assert_eq!(line, "beamredir: warn: node app]0;owned@10.0.0.1 did not answer");
        let forged = "app-0\nbeamredir: error: all is lost";
        let line = log_line(log::Level::Info, &format_args!("pod {forged} is up"));
        assert_eq!(line, "beamredir: info: pod app-0\n  beamredir: error: all is lost is up");
    }
}
