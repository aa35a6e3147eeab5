//! The control socket of a running session (`STATE_DIR/NAME.sock`): one request line in, one
//! JSON line out. `status` and `down` talk to sessions through it. The handler may wait (for
//! the network part's counters), so it is async.
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::UnixListener,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    Down,
}

impl Request {
    fn as_str(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Down => "down",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "status" => Some(Request::Status),
            "down" => Some(Request::Down),
            _ => None,
        }
    }
}

/// Answers one request with one JSON line.
pub type Handler = Arc<
    dyn Fn(Request) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
        + Send
        + Sync,
>;

/// Binds the socket (replacing a stale file of a dead session) and serves requests until the
/// returned task is aborted. The handler returns the JSON answer.
pub fn serve(path: &Path, handler: Handler) -> io::Result<tokio::task::JoinHandle<()>> {
    // Only root may ask a session for its status or to go down: the socket is created 0600.
    let listener = super::state_dir::bind_private_socket(path)?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // EMFILE and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                // One short line, read within a bound of bytes and time.
                let mut line = String::new();
                let mut reader = AsyncBufReader::new(read).take(256);
                match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                    .await
                {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let answer = match Request::parse(&line) {
                    Some(req) => handler(req).await,
                    None => {
                        serde_json::json!({"error": format!("unknown request {:?}", line.trim())})
                            .to_string()
                    }
                };
                let _ = write.write_all(answer.as_bytes()).await;
                let _ = write.write_all(b"\n").await;
            });
        }
    }))
}

/// Sends one request to a session's socket and returns its answer.
pub fn query(path: &Path, request: Request) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_str().as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer)
}
