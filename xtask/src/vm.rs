//! `cargo xtask test --vm`: the kernel-facing privileged tests, run again inside a throwaway
//! QEMU guest that boots Debian bookworm's 6.1 kernel, so the suite proves more than "works on
//! the host's kernel". `cargo xtask vm-shell` boots the same guest with a shell, for debugging.
//!
//! * The kernel comes from Debian's `linux-image-6.1.*-amd64` package, which
//!   `scripts/setup.sh --vm` downloads and unpacks into `target/vm/kernel/` once.
//! * The guest's initramfs (rebuilt each run, a few MB) holds a static busybox, the modules
//!   needed for 9p and overlayfs (with their dependencies, read from each module's
//!   `.modinfo`), `xtask/vm/init.sh` as PID 1, and a plan: the shell commands to run.
//! * The host's files reach the guest over 9p, read-only on both sides (QEMU's `readonly=on`
//!   and a `ro` mount): `/usr`, `/etc`, the workspace (sources and the test binaries cargo
//!   built on the host) and the target dir if it lives elsewhere. Each share gets a tmpfs
//!   overlay in the guest, and `/run`, `/tmp`, `/var`, `/root`, `/dev`, `/proc`, `/sys`,
//!   cgroup2 and bpffs are the guest's own: the tests write freely and nothing reaches the host.
//!   The guest's root is a tmpfs; `/bin`, `/lib`, … are the host's merged-/usr symlinks.
//! * The result comes back on the serial console: init prints `BEAMREDIR-VM-EXIT=<code>` after
//!   the plan and powers off. No marker (a crash, a hang past the timeout) is a failure.
//! * KVM is used when `/dev/kvm` can boot the guest (a probe boot of a few seconds); else TCG,
//!   which is what these machines have (nested KVM does not start here).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// The tests run in the guest: (integration test target in `tests/`, hide vmlinux BTF, test
/// names). They cover what depends on the kernel: loading and verifying the programs, attaching
/// them through bpf_links, connect4/6 and getpeername4/6, the per-CPU counters, aya-log's ring
/// buffer, the kernel dropping the links on SIGKILL, `ip netns exec`'s private cgroup2 mount, a
/// real Erlang ping/rpc through the redirect, and every `doctor` probe. Where the second field
/// is true the step runs with `/sys/kernel/btf` covered by an empty tmpfs (in a private mount
/// namespace), which proves beamredir does not need the kernel's BTF.
pub const GUEST_TESTS: &[(&str, bool, &[&str])] = &[
    (
        "session",
        true,
        &[
            "session_redirects_its_own_processes_counts_them_and_nobody_else",
            "sigkill_detaches_the_programs_and_the_reaper_removes_the_rest",
            "verbose_logs_each_rewrite_from_the_kernel_and_quiet_logs_none",
        ],
    ),
    (
        "erlang",
        false,
        &["local_node_pings_and_rpcs_the_pod_node_while_local_epmd_keeps_working", "works_under_ip_netns_exec_where_no_cgroup2_is_mounted"],
    ),
    ("ipv6", false, &["dual_stack_pods_are_reached_over_both_families_and_getpeername_reports_the_pod"]),
    ("real", false, &["a_session_process_in_another_netns_is_not_redirected"]),
    ("doctor", true, &["doctor_passes_and_names_every_feature"]),
];

/// Modules the guest needs from the kernel package (their dependencies come along): virtio,
/// 9p and overlayfs for the file systems; the sock_diag handlers (a normal system loads them on
/// demand through modprobe, which the guest has no module tree for) for doctor's
/// INET_DIAG_CGROUP_ID probe and `ss`; veth and bridge for the simulated cluster's pod network.
const MODULES: [&str; 9] =
    ["virtio_pci", "9pnet_virtio", "9p", "overlay", "tcp_diag", "udp_diag", "unix_diag", "veth", "bridge"];

/// Whole-run limit: boot, tests and power-off. Under TCG the subset takes a few minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_MARKER: &str = "BEAMREDIR-VM-EXIT=";
const BOOTED_MARKER: &str = "BEAMREDIR-VM-BOOTED";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(crate::workspace_root().join("target"))
}

/// Where setup.sh --vm unpacks the kernel and this module writes the initramfs.
pub fn vm_dir() -> PathBuf {
    std::env::var_os("BEAMREDIR_VM_DIR").map(PathBuf::from).unwrap_or(target_dir().join("vm"))
}

/// The unpacked kernel package: vmlinuz, its modules directory and the package name.
struct Kernel {
    vmlinuz: PathBuf,
    modules: PathBuf,
    package: String,
}

impl Kernel {
    fn find() -> Result<Self> {
        let root = vm_dir().join("kernel");
        ensure!(root.join("ready").exists(), "no guest kernel in {}: run `scripts/setup.sh --vm`", root.display());
        let only = |dir: PathBuf, prefix: &str| -> Result<PathBuf> {
            let mut found: Vec<PathBuf> = fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
                .collect();
            found.sort();
            found.pop().with_context(|| format!("no {prefix}* in {}", dir.display()))
        };
        Ok(Kernel {
            vmlinuz: only(root.join("boot"), "vmlinuz-")?,
            modules: only(root.join("lib/modules"), "")?,
            package: fs::read_to_string(root.join("package")).unwrap_or_default().trim().to_string(),
        })
    }

    /// Paths of the wanted modules and everything they depend on, dependencies first.
    fn module_closure(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
        let mut index = BTreeMap::new();
        let mut stack = vec![self.modules.join("kernel")];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                    index.insert(stem.replace('-', "_"), p);
                }
            }
        }
        fn visit(name: &str, index: &BTreeMap<String, PathBuf>, done: &mut Vec<(String, PathBuf)>, seen: &mut BTreeSet<String>) -> Result<()> {
            if !seen.insert(name.to_string()) {
                return Ok(());
            }
            let path = index.get(name).with_context(|| format!("module {name} not in the kernel package"))?;
            for dep in module_depends(&fs::read(path)?) {
                visit(&dep, index, done, seen)?;
            }
            done.push((name.to_string(), path.clone()));
            Ok(())
        }
        let (mut done, mut seen) = (Vec::new(), BTreeSet::new());
        for m in wanted {
            visit(m, &index, &mut done, &mut seen)?;
        }
        Ok(done)
    }
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else { return Vec::new() };
    let rest = &ko[at + key.len()..];
    let value = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
    String::from_utf8_lossy(value).split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect()
}

/// A cpio archive in the "newc" format the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio(Vec<u8>);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let ino = self.0.len() as u32; // unique enough: only hard links care
        let mut header = String::from("070701");
        for field in [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0] {
            write!(header, "{field:08x}").unwrap();
        }
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.0
    }
}

/// What the guest sees of the host: 9p shares (host dir, mounted at the same path) and the
/// host's top-level symlinks (merged /usr: bin -> usr/bin, …).
struct Shares {
    dirs: Vec<PathBuf>,
    links: Vec<(String, PathBuf)>,
}

impl Shares {
    fn for_host(extra: &[PathBuf]) -> Result<Self> {
        let mut dirs: Vec<PathBuf> = vec!["/usr".into(), "/etc".into()];
        let mut links = Vec::new();
        for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            let p = Path::new("/").join(name);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => links.push((name.to_string(), fs::read_link(&p)?)),
                Ok(m) if m.is_dir() => dirs.push(p),
                _ => {}
            }
        }
        for p in extra {
            dirs.push(fs::canonicalize(p).with_context(|| format!("sharing {}", p.display()))?);
        }
        dirs.sort();
        dirs.dedup();
        // A directory inside another share is already there.
        let mut kept: Vec<PathBuf> = Vec::new();
        for d in dirs {
            if !kept.iter().any(|k| d.starts_with(k)) {
                ensure!(!d.to_string_lossy().contains([',', ' ', '\n']), "cannot share {} with QEMU (comma or space)", d.display());
                kept.push(d);
            }
        }
        Ok(Shares { dirs: kept, links })
    }

    fn qemu_args(&self, cmd: &mut Command) {
        for (i, d) in self.dirs.iter().enumerate() {
            cmd.arg("-fsdev")
                .arg(format!("local,id=fs{i},path={},security_model=none,readonly=on,multidevs=remap", d.display()))
                .arg("-device")
                .arg(format!("virtio-9p-pci,fsdev=fs{i},mount_tag=host{i}"));
        }
    }
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Accel {
    Kvm,
    Tcg,
}

/// One guest boot: kernel, initramfs (with the plan), shares.
struct Guest {
    kernel: Kernel,
    initramfs: PathBuf,
    shares: Shares,
}

impl Guest {
    fn prepare(plan: &str, extra_shares: &[PathBuf]) -> Result<Self> {
        let kernel = Kernel::find()?;
        let shares = Shares::for_host(extra_shares)?;
        let mut cpio = Cpio::default();
        for d in ["bin", "vm", "vm/modules"] {
            cpio.dir(d);
        }
        let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (Debian's busybox-static: run scripts/setup.sh --vm)")?;
        cpio.file("bin/busybox", 0o755, &busybox);
        let init = crate::workspace_root().join("xtask/vm/init.sh");
        cpio.file("init", 0o755, &fs::read(&init).with_context(|| format!("reading {}", init.display()))?);
        let mut order = String::new();
        for (name, path) in kernel.module_closure(&MODULES)? {
            cpio.file(&format!("vm/modules/{name}.ko"), 0o644, &fs::read(&path)?);
            writeln!(order, "{name}").unwrap();
        }
        cpio.file("vm/modules.order", 0o644, order.as_bytes());
        let mut list = String::new();
        for (i, d) in shares.dirs.iter().enumerate() {
            writeln!(list, "host{i} {}", d.display()).unwrap();
        }
        cpio.file("vm/shares", 0o644, list.as_bytes());
        let mut links = String::new();
        for (name, target) in &shares.links {
            writeln!(links, "{name} {}", target.display()).unwrap();
        }
        cpio.file("vm/links", 0o644, links.as_bytes());
        cpio.file("vm/plan", 0o644, plan.as_bytes());
        fs::create_dir_all(vm_dir())?;
        let initramfs = vm_dir().join("initramfs.cpio");
        fs::write(&initramfs, cpio.finish())?;
        Ok(Guest { kernel, initramfs, shares })
    }

    fn qemu(&self, accel: Accel, cmdline_extra: &str) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        let mem = std::env::var("BEAMREDIR_VM_MEM").unwrap_or_else(|_| "2048".into());
        let (accel_name, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        cmd.args(["-accel", accel_name, "-cpu", cpu, "-smp", "2", "-m", &mem])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {cmdline_extra}"));
        self.shares.qemu_args(&mut cmd);
        cmd
    }

    /// Boots the guest, echoes its console with a prefix, and returns the plan's exit code.
    fn run(&self, accel: Accel, cmdline_extra: &str, timeout: Duration, marker: &str, echo: bool) -> Result<Option<String>> {
        let mut child = self
            .qemu(accel, cmdline_extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64 (Debian's qemu-system-x86: run scripts/setup.sh --vm)")?;
        let (tx, rx) = mpsc::channel::<String>();
        let readers: Vec<_> = [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
            .into_iter()
            .map(|stream| {
                let tx = tx.clone();
                thread::spawn(move || {
                    for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                        let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut found = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if echo {
                        println!("vm| {line}");
                    }
                    if let Some(at) = line.find(marker) {
                        found = Some(line[at + marker.len()..].trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    println!("vm: no result after {timeout:?}: stopping the guest");
                    let _ = child.kill();
                    break;
                }
            }
        }
        // QEMU exits on its own after the guest's power-off; bound the wait anyway.
        let stop_by = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > stop_by {
                let _ = child.kill();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.wait();
        for r in readers {
            let _ = r.join();
        }
        Ok(found)
    }
}

/// KVM if `/dev/kvm` can boot the guest, else TCG. `BEAMREDIR_VM_ACCEL=kvm|tcg` forces one.
fn choose_accel(guest: &Guest) -> Result<Accel> {
    match std::env::var("BEAMREDIR_VM_ACCEL").as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        Ok("") | Err(_) => {}
        Ok(other) => bail!("BEAMREDIR_VM_ACCEL={other}: expected kvm or tcg"),
    }
    if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        println!("vm: /dev/kvm is not usable: TCG");
        return Ok(Accel::Tcg);
    }
    let started = Instant::now();
    let booted = guest.run(Accel::Kvm, "beamredir.probe", PROBE_TIMEOUT, BOOTED_MARKER, false)?.is_some();
    println!(
        "vm: KVM probe boot {} after {:.1} s: {}",
        if booted { "succeeded" } else { "failed" },
        started.elapsed().as_secs_f64(),
        if booted { "KVM" } else { "TCG" }
    );
    Ok(if booted { Accel::Kvm } else { Accel::Tcg })
}

/// The test binaries cargo built for `GUEST_TESTS`' targets, by target name.
fn build_test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    let mut cmd = crate::cargo();
    cmd.args(["test", "--no-run", "--message-format=json-render-diagnostics", "--package", "beamredir-testbed"]);
    for (target, _, _) in GUEST_TESTS {
        cmd.args(["--test", target]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("cargo test --no-run")?;
    ensure!(out.status.success(), "building the guest's test binaries failed");
    let mut exes = BTreeMap::new();
    for line in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// Shell-quotes one word for the plan.
fn sh(word: impl AsRef<str>) -> String {
    format!("'{}'", word.as_ref().replace('\'', r"'\''"))
}

/// The start of every plan: where it runs, what it prints first.
fn plan_header(beamredir_bin: &Path) -> String {
    let root = crate::workspace_root();
    format!(
        "set -u\n\
         echo \"beamredir-vm: guest kernel $(uname -r) ($(uname -v)), $(nproc) CPUs\"\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 RUST_BACKTRACE=1\n\
         export BEAMREDIR_BIN={}\n\
         cd {}\n",
        sh(beamredir_bin.to_string_lossy()),
        sh(root.to_string_lossy())
    )
}

/// `cargo xtask test --vm`.
pub fn test(beamredir_bin: &Path) -> Result<()> {
    let started = Instant::now();
    let exes = build_test_binaries()?;
    let mut plan = plan_header(beamredir_bin);
    plan.push_str(
        "rc=0\n\
         step() { echo \"beamredir-vm: \\$ $*\"; t0=$(date +%s); \"$@\"; r=$?; \
         echo \"beamredir-vm: exit $r after $(( $(date +%s) - t0 )) s\"; [ $r = 0 ] || rc=1; }\n\
         nobtf() { unshare --mount --propagation private sh -c \
         'mount -t tmpfs -o ro,size=4k nobtf /sys/kernel/btf && echo \"beamredir-vm: /sys/kernel/btf hidden for this step\" && exec \"$@\"' sh \"$@\"; }\n\
         step \"$BEAMREDIR_BIN\" doctor\n",
    );
    let mut count = 0;
    for (target, hide_btf, tests) in GUEST_TESTS {
        let exe = exes.get(*target).with_context(|| format!("cargo built no test binary for {target}"))?;
        // A renamed test must fail here, not silently run nothing in the guest.
        let listed = Command::new(exe).args(["--list", "--format", "terse"]).output()?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        for t in *tests {
            ensure!(listed.lines().any(|l| l == format!("{t}: test")), "test {target}::{t} does not exist (update xtask/src/vm.rs)");
        }
        count += tests.len();
        let _ = write!(plan, "step {}{} --exact --color=never --test-threads=2", if *hide_btf { "nobtf " } else { "" }, sh(exe.to_string_lossy()));
        for t in *tests {
            let _ = write!(plan, " {}", sh(t));
        }
        plan.push('\n');
    }
    plan.push_str("exit $rc\n");

    let guest = Guest::prepare(&plan, &[crate::workspace_root(), target_dir(), beamredir_bin.parent().unwrap().to_path_buf()])?;
    let accel = choose_accel(&guest)?;
    let timeout = std::env::var("BEAMREDIR_VM_TIMEOUT").ok().and_then(|s| s.parse().ok()).map(Duration::from_secs).unwrap_or(DEFAULT_TIMEOUT);
    println!(
        "vm: booting {} ({}) under {accel:?} with {count} tests and `beamredir doctor`; shares (read-only): {}",
        guest.kernel.package,
        guest.kernel.vmlinuz.display(),
        guest.shares.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" ")
    );
    let booted = Instant::now();
    let result = guest.run(accel, "", timeout, EXIT_MARKER, true)?;
    let (boot, total) = (booted.elapsed().as_secs_f64(), started.elapsed().as_secs_f64());
    match result.as_deref() {
        Some("0") => {
            println!("vm: passed under {accel:?} on {}: guest {boot:.0} s, {total:.0} s with the build", guest.kernel.package);
            Ok(())
        }
        Some(code) => bail!("the VM tests failed (exit {code}) under {accel:?} on {} after {boot:.0} s", guest.kernel.package),
        None => bail!("the VM gave no result (crash or timeout) under {accel:?} after {boot:.0} s"),
    }
}

/// `cargo xtask vm-shell`: the test guest with an interactive shell on the console (the host's
/// bash, chrooted like the tests). Leave with `exit`, which powers the guest off.
pub fn shell(beamredir_bin: &Path) -> Result<()> {
    let mut plan = plan_header(beamredir_bin);
    plan.push_str("echo 'beamredir-vm: shell; `exit` powers off'\nexec setsid -c bash -i\n");
    let guest = Guest::prepare(&plan, &[crate::workspace_root(), target_dir()])?;
    let accel = choose_accel(&guest)?;
    let status = guest.qemu(accel, "beamredir.shell").status().context("starting qemu-system-x86_64")?;
    ensure!(status.success(), "qemu: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends() {
        let ko = b"\x7fELF...\0license=GPL\0depends=9pnet,fscache,netfs\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["9pnet", "fscache", "netfs"]);
        assert!(module_depends(b"\0depends=\0intree=Y\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = c.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[110..115], b"init\0");
        assert!(bytes.len().is_multiple_of(4));
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh("a b"), "'a b'");
        assert_eq!(sh("it's"), r"'it'\''s'");
    }
}
