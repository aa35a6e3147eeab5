//! The Erlang side: protocols spoken with pods' nodes and their epmd, and how the local node
//! is started to match them.
//!
//! * [`epmd`]: the EPMD protocol as the epmd forward sees it (pure, fuzzed).
pub mod epmd;
