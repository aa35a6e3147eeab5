//! The EPMD protocol as seen by beamredir's epmd forward (being written).
