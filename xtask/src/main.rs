//! Build, test and demo orchestration: `cargo xtask <setup|build|test|demo|bench|soak|vm-shell|dist>`.
//!
//! Every task that needs tools first runs `scripts/setup.sh`, which installs what is missing
//! (nightly rust-src, bpf-linker, Debian packages) and does nothing when all is there.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

mod bench;
mod dist;
mod soak;
mod vm;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "beamredir's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup {
        /// Also what `test --vm` needs: QEMU, busybox-static and Debian's 6.1 kernel.
        #[arg(long)]
        vm: bool,
    },
    /// Build beamredir (and its embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests and the privileged end-to-end tests (root).
    Test {
        /// Instead: the kernel-facing tests inside a QEMU guest running Debian bookworm's
        /// 6.1 kernel (KVM if it works, else TCG).
        #[arg(long, conflicts_with = "args")]
        vm: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The README's first command: a local Erlang node reaches a "pod" node through beamredir.
    Demo,
    /// Benchmarks (side by side in one run): report under target/bench/.
    Bench(bench::BenchArgs),
    /// Steady connect-and-rpc load through one session for N minutes; memory and descriptor
    /// slopes under target/soak/.
    Soak(soak::SoakArgs),
    /// Debugging aid: the `test --vm` guest with a shell on the console.
    VmShell,
    /// Release package: static binary (eBPF embedded), kubectl-beamredir link, completions,
    /// man pages, README-dist.txt, SHA256SUMS and a tarball, in target/dist/.
    Dist(dist::DistArgs),
}

/// How long `cargo xtask test` fuzzes the EPMD parser.
const FUZZ_SECONDS: &str = "30";
/// How long `cargo xtask test` soaks (the full run is `cargo xtask soak --minutes 10`).
const SOAK_MINUTES: &str = "1";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")))
}

fn setup_vm() -> Result<()> {
    run(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")).arg("--vm"))
}

fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "beamredir"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(workspace_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }).join("beamredir"))
}

/// The load client the faults tests and the soak use (tests/src/bin/load.rs), built.
fn build_load_client() -> Result<PathBuf> {
    run(cargo().args(["build", "--package", "beamredir-testbed", "--bin", "beamredir-load"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(workspace_root().join("target"));
    Ok(target.join("debug/beamredir-load"))
}

fn require_root(task: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {task}` needs root (network namespaces, eBPF, cgroups, apt-get): run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask {task}`");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { vm: false } => setup(),
        Task::Setup { vm: true } => setup_vm(),
        Task::Build { release } => {
            setup()?;
            build(release).map(|_| ())
        }
        Task::Test { vm: true, .. } => {
            require_root("test --vm")?;
            setup_vm()?;
            let bin = build(false)?;
            vm::test(&bin)
        }
        Task::Test { vm: false, args } => {
            require_root("test")?;
            setup()?;
            let bin = build(false)?;
            run(cargo().args(["test", "--workspace", "--exclude", "beamredir-ebpf"]).args(&args).env("BEAMREDIR_BIN", &bin))?;
            if args.is_empty() {
                // The EPMD parser's fuzz target, for a bounded time (a crash fails the run).
                run(Command::new("bash").arg(workspace_root().join("scripts/fuzz-epmd.sh")).arg(FUZZ_SECONDS))?;
                // The benchmarks at tiny sizes, so they cannot rot (they measure nothing here).
                run(cargo().args(["xtask", "bench", "--smoke"]).env("BEAMREDIR_BIN", &bin))?;
                // The release packaging, on the debug build already there (seconds; the static
                // release build itself takes minutes and is `cargo xtask dist`).
                let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(workspace_root().join("target"));
                dist::package_debug(&bin, &target.join("dist-check"))?;
                // A short soak: a minute of steady load through one session, nothing may fail.
                run(cargo().args(["xtask", "soak", "--minutes", SOAK_MINUTES]).env("BEAMREDIR_BIN", &bin))?;
            }
            Ok(())
        }
        Task::Demo => {
            require_root("demo")?;
            setup()?;
            let bin = build(false)?;
            // SAFETY: single-threaded at this point.
            unsafe { std::env::set_var("BEAMREDIR_BIN", &bin) };
            beamredir_testbed::demo::run()
        }
        Task::Soak(args) => {
            require_root("soak")?;
            setup()?;
            let bin = build(false)?;
            let load = build_load_client()?;
            soak::run(args, &bin, &load)
        }
        Task::VmShell => {
            require_root("vm-shell")?;
            setup_vm()?;
            let bin = build(false)?;
            vm::shell(&bin)
        }
        Task::Dist(args) => {
            setup()?;
            dist::dist(&args).map(|_| ())
        }
        Task::Bench(args) => {
            require_root("bench")?;
            setup()?;
            if !args.smoke && cfg!(debug_assertions) {
                // The simulated API server runs inside xtask: unoptimised, it would be the
                // bottleneck of the tunnel benchmark. So a full run re-executes xtask from a
                // release build (smoke runs, on CI, stay on the debug build).
                run(cargo().args(["build", "--release", "--package", "xtask"]))?;
                let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(workspace_root().join("target"));
                use std::os::unix::process::CommandExt;
                let err = Command::new(target.join("release/xtask")).args(std::env::args_os().skip(1)).exec();
                bail!("re-executing the release build of xtask: {err}");
            }
            // Smoke runs (CI) use the debug build: a release build takes minutes.
            // BEAMREDIR_BENCH_BIN benchmarks another build instead (e.g. an earlier commit's, for
            // before/after figures from the same bench).
            let bin = match std::env::var_os("BEAMREDIR_BENCH_BIN") {
                Some(other) => PathBuf::from(other),
                None => build(!args.smoke)?,
            };
            // SAFETY: single-threaded at this point.
            unsafe { std::env::set_var("BEAMREDIR_BIN", &bin) };
            bench::run(args)
        }
    }
}
