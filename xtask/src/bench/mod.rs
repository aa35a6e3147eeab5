//! `cargo xtask bench` (being written).
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Tiny sizes and few repetitions: checks the benchmark runs (CI), measures nothing useful.
    #[arg(long)]
    pub smoke: bool,
}

pub fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
