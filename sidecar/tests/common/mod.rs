//! What the integration tests share: a loopback listener that counts the connections it
//! accepts, and reading a request head off a raw socket.

// Each test crate includes this module and uses what it needs of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};

/// A listener on 127.0.0.1 that counts the connections it accepts.
pub struct Counting {
    listener: TcpListener,
    accepted: Arc<AtomicUsize>,
}

impl Counting {
    pub async fn bind() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            accepted: Arc::default(),
        }
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("addr").port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The count of accepted connections, to read once the listener has moved into a task.
    pub fn accepted(&self) -> Arc<AtomicUsize> {
        self.accepted.clone()
    }

    /// The next connection, counted; `None` once accepting fails.
    pub async fn accept(&self) -> Option<TcpStream> {
        let (stream, _) = self.listener.accept().await.ok()?;
        self.accepted.fetch_add(1, Ordering::SeqCst);
        Some(stream)
    }
}

/// Reads into `buf` up to the end of a request head (`\r\n\r\n`); false when the stream ends,
/// fails or fills `buf` first.
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> bool {
    let mut read = 0;
    while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[read..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => read += n,
        }
    }
    true
}
