//! The README's first command must keep working: run its demo.
#[test]
fn readme_demo_reaches_the_pod_node() -> anyhow::Result<()> {
    beamredir_testbed::demo::run()
}
