//! End-to-end tests: the server runs in-process on port 0 and is driven by a hyper client.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sidegate_mock_provider::{Options, serve};
use tokio::net::{TcpListener, TcpStream};

async fn start(opts: Options) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, opts));
    addr
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// Body frames as received.
    frames: Vec<Bytes>,
}

impl Reply {
    fn body(&self) -> Vec<u8> {
        self.frames.concat()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body()).unwrap()
    }
}

fn build(method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mock");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(build(method, path, headers, body))
        .await
        .unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    Reply {
        status: parts.status,
        headers: parts.headers,
        frames,
    }
}

/// What the OpenAI and Anthropic routes want besides the body: a key in each API's header and
/// Anthropic's version.
const KEYS: &[(&str, &str)] = &[
    ("authorization", "Bearer sk-test"),
    ("x-api-key", "sk-ant-test"),
    ("anthropic-version", "2023-06-01"),
];

/// `KEYS` and `more`.
fn with_keys<'a>(more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    KEYS.iter().chain(more).copied().collect()
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    send(addr, Method::POST, path, KEYS, &body.to_string()).await
}

/// `data:` payloads of an SSE body, with their `event:` names.
fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    assert!(text.ends_with("\n\n"), "stream must end with a blank line");
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = Some(name.to_owned());
                } else if let Some(payload) = line.strip_prefix("data: ") {
                    data = Some(payload.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data.unwrap())
        })
        .collect()
}

#[tokio::test]
async fn chat_completion_json() {
    let addr = start(Options::default()).await;
    let reply = post(
        addr,
        "/openai/deployments/x/chat/completions",
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "hello world"}]}
            ]
        }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert!(reply.headers.contains_key("x-request-id"));
    assert_eq!(reply.headers["x-mock-name"], "mock");
    let v = reply.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(v["model"], "gpt-4o-mini");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "mock reply to: hello world");
    assert_eq!(choice["message"]["refusal"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 11);
    assert!(v["system_fingerprint"].is_string());
}

#[tokio::test]
async fn chat_audio_in_and_out_is_counted_apart() {
    let addr = start(Options::default()).await;
    let reply = post(
        addr,
        "/v1/chat/completions",
        json!({
            "model": "gpt-4o-audio-preview",
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "wav"},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is said"},
                {"type": "input_audio", "input_audio": {"data": "A".repeat(250), "format": "wav"}}
            ]}]
        }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(
        message["audio"]["transcript"],
        "mock reply to: what is said"
    );
    let usage = &v["usage"];
    // 3 words and 3 audio tokens (250 bytes) in; 6 words and their 60 audio tokens out.
    assert_eq!(usage["prompt_tokens"], 6);
    assert_eq!(usage["prompt_tokens_details"]["audio_tokens"], 3);
    assert_eq!(usage["completion_tokens"], 66);
    assert_eq!(usage["completion_tokens_details"]["audio_tokens"], 60);
    assert_eq!(usage["total_tokens"], 72);
}

#[tokio::test]
async fn transcriptions_report_text_and_audio_tokens_or_duration() {
    let addr = start(Options::default()).await;
    let form = |model: &str, format: &str| {
        let file = "R".repeat(1000);
        format!(
            "--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n{file}\r\n\
             --b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
             --b0\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nNames: Sidegate, Cloudflare.\r\n\
             --b0\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\n{format}\r\n--b0--\r\n"
        )
    };
    let headers = with_keys(&[("content-type", "multipart/form-data; boundary=b0")]);
    let send_form = |model: &'static str, format: &'static str| {
        let headers = headers.clone();
        async move {
            send(
                addr,
                Method::POST,
                "/v1/audio/transcriptions",
                &headers,
                &form(model, format),
            )
            .await
        }
    };
    let v = send_form("gpt-4o-transcribe", "json").await.json();
    assert_eq!(v["text"], "mock transcript of 1000 bytes");
    assert_eq!(
        v["usage"],
        json!({"type": "tokens", "input_tokens": 13, "input_token_details":
               {"text_tokens": 3, "audio_tokens": 10}, "output_tokens": 5, "total_tokens": 18})
    );
    let v = send_form("whisper-1", "json").await.json();
    assert_eq!(v["usage"], json!({"type": "duration", "seconds": 1}));
    let text = send_form("gpt-4o-mini-transcribe", "text").await;
    assert_eq!(text.text(), "mock transcript of 1000 bytes\n");
    // No key: 401, as the other OpenAI routes.
    let r = send(addr, Method::POST, "/v1/audio/transcriptions", &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn long_user_text_is_truncated() {
    let addr = start(Options::default()).await;
    let long = "x".repeat(500);
    let reply = post(
        addr,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    let content = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(content, format!("mock reply to: {}", "x".repeat(200)));
}

#[tokio::test]
async fn chat_completion_stream() {
    let addr = start(Options::default()).await;
    let reply = post(
        addr,
        "/v1/chat/completions",
        json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "tell me a story"}]
        }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&reply.text());
    assert!(events.len() > 4);
    // One frame per event.
    assert_eq!(reply.frames.len(), events.len());
    assert_eq!(events.last().unwrap().1, "[DONE]");

    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(name, data)| {
            assert!(name.is_none());
            serde_json::from_str(data).unwrap()
        })
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let (finish, content_chunks) = rest.split_last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 4);
    let text: String = content_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "mock reply to: tell me a story");
}

#[tokio::test]
async fn chat_stream_without_usage_has_no_usage_field() {
    let addr = start(Options::default()).await;
    let reply = post(
        addr,
        "/chat/completions",
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let events = sse_events(&reply.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    for (_, data) in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("usage").is_none());
    }
}

#[tokio::test]
async fn anthropic_message_and_stream() {
    let addr = start(Options::default()).await;
    let request = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    });
    let reply = post(addr, "/v1/messages", request.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.contains_key("request-id"));
    let v = reply.json();
    assert!(v["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], "mock reply to: hi there");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(v["usage"]["input_tokens"], 4);
    assert_eq!(v["usage"]["output_tokens"], 5);

    let mut streaming = request;
    streaming["stream"] = json!(true);
    let reply = post(addr, "/anthropic/v1/messages", streaming).await;
    let events = sse_events(&reply.text());
    let names: Vec<&str> = events
        .iter()
        .map(|(name, _)| name.as_deref().unwrap())
        .collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert!(deltas >= 2);
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|(name, data)| {
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["type"].as_str(), name.as_deref());
            v
        })
        .collect();
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], 4);
    assert_eq!(data[0]["message"]["content"], json!([]));
    let text: String = data
        .iter()
        .filter_map(|v| v["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "mock reply to: hi there");
    let message_delta = &data[data.len() - 2];
    assert_eq!(message_delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(message_delta["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn error_statuses_in_each_format() {
    let addr = start(Options::default()).await;

    let reply = post(
        addr,
        "/v1/chat/completions",
        json!({"model": "mock-status-429", "messages": []}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.headers["retry-after"], "1");
    let v = reply.json();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"].is_string());
    assert_eq!(v["error"]["param"], Value::Null);

    let reply = post(
        addr,
        "/v1/chat/completions",
        json!({"model": "mock-status-500", "stream": true}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json()["error"]["type"], "server_error");

    let anthropic_error = |model: &str| json!({"model": model, "max_tokens": 8, "messages": []});
    let reply = post(addr, "/v1/messages", anthropic_error("mock-status-529")).await;
    assert_eq!(reply.status.as_u16(), 529);
    let v = reply.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");

    let reply = post(addr, "/v1/messages", anthropic_error("mock-status-429")).await;
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.json()["error"]["type"], "rate_limit_error");

    let reply = send(addr, Method::POST, "/v1/messages", KEYS, "{not json").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    let reply = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        KEYS,
        "\u{0}\u{1}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    let reply = send(addr, Method::POST, "/v1/embeddings", KEYS, "[]").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    let reply = send(addr, Method::GET, "/v1/nothing", &[], "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.json()["error"]["message"].is_string());
}

#[tokio::test]
async fn embeddings_and_models() {
    let addr = start(Options::default()).await;
    let reply = post(
        addr,
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": ["alpha", "beta gamma"]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    let again = post(
        addr,
        "/v1/embeddings",
        json!({"model": "e", "input": "alpha"}),
    )
    .await
    .json();
    assert_eq!(again["data"][0]["embedding"], v["data"][0]["embedding"]);

    let models = send(
        addr,
        Method::GET,
        "/v1/models",
        &[("authorization", "Bearer k")],
        "",
    )
    .await
    .json();
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().unwrap().len() >= 2);
}

#[tokio::test]
async fn recording_and_stats() {
    let addr = start(Options::default()).await;
    send(
        addr,
        Method::POST,
        "/v1/chat/completions?api-version=2024-10-21",
        &[("authorization", "Bearer sk-test"), ("x-multi", "a")],
        r#"{"model":"m","messages":[]}"#,
    )
    .await;
    post(
        addr,
        "/v1/messages",
        json!({"model": "c", "max_tokens": 8, "messages": []}),
    )
    .await;

    let records = send(addr, Method::GET, "/__mock/requests", &[], "")
        .await
        .json();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2);
    let first = &records[0];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v1/chat/completions");
    assert_eq!(first["query"], "api-version=2024-10-21");
    assert_eq!(first["headers"]["authorization"], "Bearer sk-test");
    assert_eq!(first["body"], r#"{"model":"m","messages":[]}"#);
    assert_eq!(records[1]["path"], "/v1/messages");
    assert_eq!(records[1]["query"], Value::Null);

    let stats = send(addr, Method::GET, "/__mock/stats", &[], "")
        .await
        .json();
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["streams_cancelled"], 0);

    let cleared = send(addr, Method::DELETE, "/__mock/requests", &[], "").await;
    assert_eq!(cleared.status, StatusCode::OK);
    let records = send(addr, Method::GET, "/__mock/requests", &[], "")
        .await
        .json();
    assert_eq!(records, json!([]));
}

#[tokio::test]
async fn repeated_headers_are_joined() {
    let addr = start(Options::default()).await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::post("/v1/chat/completions")
        .header("host", "mock")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let records = send(addr, Method::GET, "/__mock/requests", &[], "")
        .await
        .json();
    assert_eq!(records[0]["headers"]["x-multi"], "a, b");
}

#[tokio::test]
async fn no_record_keeps_nothing() {
    let addr = start(Options {
        record: false,
        ..Options::default()
    })
    .await;
    post(addr, "/v1/chat/completions", json!({"model": "m"})).await;
    let records = send(addr, Method::GET, "/__mock/requests", &[], "")
        .await
        .json();
    assert_eq!(records, json!([]));
    let stats = send(addr, Method::GET, "/__mock/stats", &[], "")
        .await
        .json();
    assert_eq!(stats["requests"], 1);
}

#[tokio::test]
async fn head_delay_header() {
    let addr = start(Options::default()).await;
    let started = std::time::Instant::now();
    let reply = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &with_keys(&[("x-mock-delay-ms", "150")]),
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn client_disconnect_cancels_stream() {
    let addr = start(Options::default()).await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = build(
        Method::POST,
        "/v1/messages",
        &with_keys(&[("x-mock-chunk-delay-ms", "50")]),
        r#"{"model":"c","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"a b c d e f"}]}"#,
    );
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"event: message_start\n"));
    // Go away mid-stream.
    drop(body);
    drop(sender);
    conn.abort();

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = send(addr, Method::GET, "/__mock/stats", &[], "")
            .await
            .json();
        if stats["streams_cancelled"] == 1 {
            assert_eq!(stats["streams_completed"], 0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stream not cancelled: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn chunk_delay_spaces_events() {
    let addr = start(Options::default()).await;
    let started = std::time::Instant::now();
    let reply = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &with_keys(&[("x-mock-chunk-delay-ms", "10")]),
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    let events = sse_events(&reply.text());
    assert!(started.elapsed() >= Duration::from_millis(10 * events.len() as u64));
    let stats = send(addr, Method::GET, "/__mock/stats", &[], "")
        .await
        .json();
    assert_eq!(stats["streams_completed"], 1);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let addr = start(Options::default()).await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://mock/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"over h2"}]}"#,
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock reply to: over h2"
    );
}

#[tokio::test]
async fn requests_without_their_key_are_401_in_each_apis_shape() {
    let addr = start(Options::default()).await;
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
    let anthropic = r#"{"model":"c","max_tokens":8,"messages":[{"role":"user","content":"x"}]}"#;
    let version = ("anthropic-version", "2023-06-01");

    // OpenAI: a bearer token; another API's header is no key.
    for headers in [
        &[][..],
        &[("x-api-key", "k")],
        &[("authorization", "Bearer ")],
    ] {
        let reply = send(addr, Method::POST, "/v1/chat/completions", headers, chat).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        let v = reply.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], Value::Null);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer")
        );
        assert!(reply.headers.contains_key("x-request-id"));
    }
    let reply = send(
        addr,
        Method::POST,
        "/openai/v1/embeddings",
        &[],
        r#"{"input":"x"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(addr, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // Azure: api-key (or a bearer token) on deployment paths, else Azure's shape.
    let azure = "/openai/deployments/d/chat/completions";
    let reply = send(addr, Method::POST, azure, &[], chat).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"]["code"], "401");
    let reply = send(addr, Method::POST, azure, &[("api-key", "az")], chat).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Azure's v1 API (`/openai/v1/...`, Groq's path too) takes its api-key as well.
    let v1 = "/openai/v1/chat/completions";
    let reply = send(addr, Method::POST, v1, &[("api-key", "az")], chat).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(addr, Method::POST, v1, &[("x-api-key", "k")], chat).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // Anthropic: x-api-key, checked before the version header; a bearer token is no key.
    for headers in [
        &[version][..],
        &[version, ("authorization", "Bearer k")],
        &[],
    ] {
        let reply = send(addr, Method::POST, "/v1/messages", headers, anthropic).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        let v = reply.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["message"], "x-api-key header is required");
        assert!(reply.headers.contains_key("request-id"));
    }
    let reply = send(
        addr,
        Method::POST,
        "/v1/messages/count_tokens",
        &[version],
        anthropic,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(addr, Method::GET, "/v1/models", &[version], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // Keys are only looked for, never checked; the moderation endpoint takes none.
    let reply = send(
        addr,
        Method::POST,
        "/v1/messages",
        &[version, ("x-api-key", "anything")],
        anthropic,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(
        addr,
        Method::POST,
        "/v1/moderations",
        &[],
        r#"{"input":"x"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn auth_headers_name_more_headers_taken_as_keys() {
    let addr = start(Options {
        auth_headers: vec![http::HeaderName::from_static("x-custom-key")],
        ..Options::default()
    })
    .await;
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
    let reply = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[("x-custom-key", "k")],
        chat,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[("x-other-key", "k")],
        chat,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn anthropic_messages_without_a_required_field_are_400() {
    let addr = start(Options::default()).await;
    let cases = [
        (
            json!({"max_tokens": 8, "messages": []}),
            "model: Field required",
        ),
        (
            json!({"model": "c", "max_tokens": 8}),
            "messages: Field required",
        ),
        (
            json!({"model": "c", "messages": []}),
            "max_tokens: Field required",
        ),
    ];
    for (body, message) in cases {
        let reply = post(addr, "/v1/messages", body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{message}");
        let v = reply.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], message);
    }
    // count_tokens takes no max_tokens.
    let reply = post(
        addr,
        "/v1/messages/count_tokens",
        json!({"model": "c", "messages": []}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = post(addr, "/v1/messages/count_tokens", json!({"model": "c"})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}
