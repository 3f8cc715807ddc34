//! The plain-HTTP upstream path: connections reused, streamed chunks delivered whole, a dropped
//! response closes its connection, and a connection the upstream closed while idle is not used.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sidegate::upstream::{UpstreamBody, UpstreamClient, upstream_client};
use tokio::io::AsyncWriteExt;

mod common;
use common::{Counting, read_head};

type Chunks = StreamBody<tokio_stream_shim::Receiver>;

/// A tiny channel-backed stream, so the test needs no extra crate.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;

    pub struct Receiver(pub tokio::sync::mpsc::Receiver<Bytes>);

    impl futures_util::Stream for Receiver {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }
}

struct Upstream {
    url: String,
    accepted: Arc<AtomicUsize>,
    /// Senders of streaming responses, one per `/stream` request.
    streams: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::mpsc::Sender<Bytes>>,
}

/// An HTTP/1 upstream: `/json` answers a small body; `/stream` answers a chunked body fed by
/// the test.
async fn upstream() -> Upstream {
    let listener = Counting::bind().await;
    let (url, accepted) = (listener.url(), listener.accepted());
    let (streams_tx, streams) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(stream) = listener.accept().await {
            let streams_tx = streams_tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let streams_tx = streams_tx.clone();
                    async move {
                        let body: http_body_util::Either<Full<Bytes>, Chunks> =
                            if req.uri().path() == "/stream" {
                                let (tx, rx) = tokio::sync::mpsc::channel(64);
                                let _ = streams_tx.send(tx);
                                http_body_util::Either::Right(StreamBody::new(
                                    tokio_stream_shim::Receiver(rx),
                                ))
                            } else {
                                let host = req
                                    .headers()
                                    .get("host")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                http_body_util::Either::Left(Full::new(Bytes::from(format!(
                                    "{} {}",
                                    req.uri(),
                                    host
                                ))))
                            };
                        Ok::<_, std::convert::Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        url,
        accepted,
        streams,
    }
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Starts a streamed response and checks that its first event comes through on its own
/// (nothing waits for more); returns the body and the upstream's sender of further events.
async fn open_stream(
    client: &UpstreamClient,
    up: &mut Upstream,
) -> (UpstreamBody, tokio::sync::mpsc::Sender<Bytes>) {
    let url = format!("{}/stream", up.url);
    let (resp, tx) = tokio::join!(client.request(get(&url)), async {
        up.streams.recv().await.expect("stream")
    });
    let mut body = resp.expect("response").into_body();
    tx.send(Bytes::from_static(b"data: first\n\n"))
        .await
        .expect("send");
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event streamed")
        .expect("frame")
        .expect("ok");
    assert_eq!(first.into_data().expect("data"), "data: first\n\n");
    (body, tx)
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection_with_origin_form_and_host() {
    let up = upstream().await;
    let client = upstream_client(Vec::new()).expect("client");
    for _ in 0..5 {
        let resp = client
            .request(get(&format!("{}/json?x=1", up.url)))
            .await
            .expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let host = up.url.trim_start_matches("http://");
        assert_eq!(body, format!("/json?x=1 {host}").as_bytes());
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn streamed_chunks_arrive_whole_and_in_order() {
    let mut up = upstream().await;
    let client = upstream_client(Vec::new()).expect("client");
    let (mut body, tx) = open_stream(&client, &mut up).await;
    let mut expected = Vec::new();
    for i in 0..50 {
        let chunk = format!("data: {i}\n\n");
        expected.extend_from_slice(chunk.as_bytes());
        tx.send(Bytes::from(chunk)).await.expect("send");
    }
    drop(tx);
    let mut got = Vec::new();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            got.extend_from_slice(&data);
            frames += 1;
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    assert!(frames >= 1);
    // The connection went back to the pool.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn a_dropped_response_closes_its_upstream_connection() {
    let mut up = upstream().await;
    let client = upstream_client(Vec::new()).expect("client");
    let (body, tx) = open_stream(&client, &mut up).await;
    drop(body);
    // The upstream's body sender notices the closed connection.
    tokio::time::timeout(Duration::from_secs(5), tx.closed())
        .await
        .expect("upstream saw the cancel");
    assert_eq!(client.idle_connections(), 0);
}

#[tokio::test]
async fn a_connection_closed_by_the_upstream_while_idle_is_not_used() {
    // One response per connection, then the upstream closes it (no `Connection: close`).
    let listener = Counting::bind().await;
    let (url, accepted) = (format!("{}/json", listener.url()), listener.accepted());
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            if !read_head(&mut s, &mut [0u8; 4096]).await {
                continue;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            drop(s);
        }
    });
    let client = upstream_client(Vec::new()).expect("client");
    for _ in 0..3 {
        let resp = client.request(get(&url)).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// A raw upstream answering each request on a connection with the next of `answers` (bytes
/// written as is), closing the connection after an answer marked `close`; counts connections.
async fn scripted(answers: Vec<(&'static [u8], bool)>) -> (String, Arc<AtomicUsize>) {
    let listener = Counting::bind().await;
    let (url, accepted) = (listener.url(), listener.accepted());
    let answers = Arc::new(tokio::sync::Mutex::new(answers.into_iter()));
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    if !read_head(&mut s, &mut buf).await {
                        return;
                    }
                    let Some((answer, close)) = answers.lock().await.next() else {
                        return;
                    };
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

async fn body_of(
    client: &sidegate::upstream::UpstreamClient,
    url: &str,
) -> Result<(u16, Vec<u8>), String> {
    let resp = client.request(get(url)).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes().to_vec()))
}

#[tokio::test]
async fn framings_and_reuse_follow_the_response() {
    let (url, accepted) = scripted(vec![
        // Chunked with an extension and trailers: decoded, connection reused.
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n",
            false,
        ),
        // 204 with no body: reused.
        (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        // Connection: close: not reused.
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            true,
        ),
        // Close-delimited body, read to the end.
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
        // Interim 100 skipped.
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx",
            false,
        ),
    ])
    .await;
    let client = upstream_client(Vec::new()).expect("client");
    assert_eq!(body_of(&client, &url).await, Ok((200, b"abcde".to_vec())));
    assert_eq!(body_of(&client, &url).await, Ok((204, Vec::new())));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(body_of(&client, &url).await, Ok((200, b"ok".to_vec())));
    // The close answer ended the first connection; the close-delimited one the second.
    assert_eq!(
        body_of(&client, &url).await,
        Ok((200, b"until the end".to_vec()))
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(body_of(&client, &url).await, Ok((201, b"x".to_vec())));
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_not_reused() {
    let (url, _) = scripted(vec![
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            true,
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-le", true),
        (b"not http at all\r\n\r\n", true),
    ])
    .await;
    let client = upstream_client(Vec::new()).expect("client");
    for _ in 0..2 {
        let err = body_of(&client, &url).await.expect_err("cut short");
        assert!(err.contains("closed before message completed"), "{err}");
    }
    let err = body_of(&client, &url).await.expect_err("cut in the head");
    assert!(err.contains("client error (SendRequest)"), "{err}");
    assert!(body_of(&client, &url).await.is_err());
    assert_eq!(client.idle_connections(), 0);
}

/// A POST of `body` to `url`.
fn post(url: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

#[tokio::test]
async fn a_large_body_is_sent_whole_and_the_connection_reused() {
    // Counts the body bytes of each request (content-length framing) and answers with the count.
    let listener = Counting::bind().await;
    let (url, accepted) = (listener.url(), listener.accepted());
    tokio::spawn(async move {
        while let Some(s) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(s),
                        service_fn(|req: Request<Incoming>| async move {
                            let n = req.into_body().collect().await?.to_bytes().len();
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(
                                n.to_string(),
                            ))))
                        }),
                    )
                    .await;
            });
        }
    });
    let client = upstream_client(Vec::new()).expect("client");
    // Far more than the socket buffers take at once: written while the upstream reads.
    for size in [8 << 20, 3 << 20] {
        let resp = client
            .request(post(&url, vec![b'x'; size]))
            .await
            .expect("sent");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, size.to_string().as_bytes());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_is_the_response() {
    // Reads the head only, answers 413 at once and then stops reading (the connection stays
    // open, so the client's writes block once the socket buffers are full).
    let listener = Counting::bind().await;
    let url = listener.url();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            if !read_head(&mut s, &mut [0u8; 8192]).await {
                continue;
            }
            let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
            if s.write_all(answer).await.is_ok() {
                let _ = held_tx.send(s);
            }
        }
    });
    let client = upstream_client(Vec::new()).expect("client");
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(post(&url, vec![b'x'; 32 << 20])),
    )
    .await
    .expect("no hang on a blocked write")
    .expect("the early answer");
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"too large");
    // The rest of the request was never sent: that connection must not carry another one.
    assert_eq!(client.idle_connections(), 0);
    assert!(held_rx.recv().await.is_some());
}
