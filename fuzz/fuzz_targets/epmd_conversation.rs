//! Feeds arbitrary bytes, cut at arbitrary points, into `EpmdConversation` and checks that it
//! never panics, never buffers more than its cap, and reports the same events however the
//! bytes are chunked.
//!
//! The module is compiled in by path rather than by depending on the `beamredir` crate: that
//! crate's build script builds the eBPF object with a nested cargo, which would inherit the
//! sanitizer flags, and its dependency tree (aya, kube, tokio) would make every fuzz build slow.
//! `epmd.rs` is pure and depends on `thiserror` and its sibling `reader.rs` only (compiled in
//! the same way), so this sees exactly the shipped code.
#![no_main]

#[allow(dead_code)]
#[path = "../../beamredir/src/erlang/reader.rs"]
mod reader;

#[allow(dead_code)]
#[path = "../../beamredir/src/erlang/epmd.rs"]
mod epmd;

use arbitrary::Arbitrary;
use epmd::{EpmdConversation, Event, MAX_BUFFERED};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    client: Vec<u8>,
    server: Vec<u8>,
    client_cuts: Vec<u16>,
    server_cuts: Vec<u16>,
    /// A free interleaving of chunks: `true` is client→epmd.
    interleaved: Vec<(bool, Vec<u8>)>,
}

/// All client chunks, then all server chunks, then epmd's close.
fn run(client: &[&[u8]], server: &[&[u8]]) -> Vec<Event> {
    let mut conv = EpmdConversation::new();
    let mut events = Vec::new();
    for chunk in client {
        events.extend(conv.client_bytes(chunk));
        assert!(conv.buffered_len() <= 2 * MAX_BUFFERED);
    }
    for chunk in server {
        events.extend(conv.server_bytes(chunk));
        assert!(conv.buffered_len() <= 2 * MAX_BUFFERED);
    }
    events.extend(conv.server_eof());
    events
}

/// `bytes` cut at the given offsets (reduced modulo the length, any order).
fn chunks<'a>(bytes: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let len = bytes.len();
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (len + 1)).collect();
    cuts.sort_unstable();
    let mut start = 0;
    let mut out = Vec::with_capacity(cuts.len() + 1);
    for cut in cuts.into_iter().chain([len]) {
        out.push(&bytes[start..cut]);
        start = cut;
    }
    out
}

fuzz_target!(|input: Input| {
    let whole = run(&[&input.client], &[&input.server]);
    let split = run(
        &chunks(&input.client, &input.client_cuts),
        &chunks(&input.server, &input.server_cuts),
    );
    assert_eq!(whole, split, "events depend on chunking");

    let mut conv = EpmdConversation::new();
    for (from_client, bytes) in &input.interleaved {
        let _ = if *from_client {
            conv.client_bytes(bytes)
        } else {
            conv.server_bytes(bytes)
        };
        assert!(conv.buffered_len() <= 2 * MAX_BUFFERED);
    }
    let _ = conv.server_eof();
});
