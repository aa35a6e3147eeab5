#![no_std]
// This file exists so that `beamredir` can list this crate as a build-dependency: cargo then
// rebuilds beamredir (and so the embedded eBPF object) whenever this crate changes.
