//! The control socket of a running session (`STATE_DIR/NAME.sock`): one request line in, one
//! JSON line out. `status` and `down` talk to sessions through it.
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
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

/// Binds the socket (replacing a stale file of a dead session) and serves requests until the
/// returned task is aborted. The handler returns the JSON answer.
pub fn serve(
    path: &Path,
    handler: Arc<dyn Fn(Request) -> String + Send + Sync>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Only root may ask a session for its status or to go down.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = AsyncBufReader::new(read);
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match Request::parse(&line) {
                    Some(req) => handler(req),
                    None => serde_json::json!({"error": format!("unknown request {:?}", line.trim())}).to_string(),
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
