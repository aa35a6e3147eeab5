//! `beamredir-sim [MANIFEST]`: runs the simulated cluster until Ctrl-C, for trying beamredir
//! by hand. Prints the kubeconfig and the workstation namespace to use.
fn main() -> anyhow::Result<()> {
    // Block SIGINT/SIGTERM before any thread exists, so every thread inherits the mask and
    // the signal is only ever taken by the waiting thread: the cluster then shuts down cleanly.
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_wait(tx)?;
    let manifest = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(&path)?,
        None => beamredir_testbed::cluster::EXAMPLE_MANIFEST.to_string(),
    };
    let cluster = beamredir_testbed::cluster::SimCluster::start(&manifest)?;
    println!("API server:  {}", cluster.url);
    println!("kubeconfig:  {}", cluster.kubeconfig.display());
    println!("workstation: nsenter --net={} -- bash   (the API server is reachable only there)", cluster.ws.path().display());
    for p in cluster.state.store.list_pods(None).0 {
        let st = p.status.unwrap_or_default();
        println!("pod {}/{}  {}  {}", p.metadata.namespace.unwrap_or_default(), p.metadata.name.unwrap_or_default(), st.pod_ip.unwrap_or_default(), st.phase.unwrap_or_default());
    }
    println!("Ctrl-C to stop.");
    let _ = rx.recv();
    drop(cluster);
    Ok(())
}

/// Blocks SIGINT/SIGTERM and waits for one on a thread.
fn ctrlc_wait(tx: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        let _ = set.wait();
        let _ = tx.send(());
    });
    Ok(())
}
