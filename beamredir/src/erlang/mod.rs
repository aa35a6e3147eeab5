//! The Erlang side of "from a pod name to the right node": who the node is, how the local node
//! must be started, which cookie, and evaluating expressions on the node.
//!
//! * [`epmd`]: the EPMD protocol as the epmd forward sees it (pure, fuzzed);
//! * [`handshake`]: the distribution handshake messages (pure) and a silent probe that reads a
//!   node's exact name, flags and creation without the cookie;
//! * [`names`]: long vs short names, the local OTP version, argv for `erl`/`iex` remote shells
//!   and `-eval` hidden nodes;
//! * [`cookie`]: the cookie (never shown) and the private home that hands it to `erl` without
//!   putting it in argv (where it comes from is [`crate::k8s::cookie`]);
//! * [`dist`], [`etf`], [`rpc`]: an authenticated distribution connection over any stream, the
//!   external term format (bounded), and evaluating an Erlang or Elixir expression through the
//!   node's `rex` server.
//!
//! Every byte a node sends is treated as hostile: sizes, counts, depth and time are bounded,
//! and malformed input is an error, never a panic.
pub mod cookie;
pub mod dist;
pub mod epmd;
pub mod etf;
pub mod handshake;
pub mod names;
mod reader;
pub mod rpc;
