//! CPU cost of `/compat` translation per request, in process (no network): request
//! translation, complete-response translation, and a whole ~20-event stream, per format.
//!
//! `cargo bench -p sidegate --bench compat` prints the median of 15 batches in µs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use sidegate::compat::bedrock::{self, AwsCredentials};
use sidegate::compat::openai::{self, ChatRequest};
use sidegate::compat::{ResponseCtx, StreamTranslator, anthropic, eventstream, gemini};

const PROMPT: &str = "Summarize the main ideas of distributed systems: consensus, replication and partition tolerance.";

fn request_body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": model, "max_tokens": 256, "temperature": 0.2,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]}))
    .unwrap()
}

fn ctx() -> ResponseCtx {
    ResponseCtx {
        id: "chatcmpl-bench".into(),
        model: "m".into(),
        created: 1,
        include_usage: true,
        json_tool: false,
        base64: false,
    }
}

fn words() -> Vec<String> {
    (0..20).map(|i| format!("word{i} ")).collect()
}

fn anthropic_stream() -> Vec<u8> {
    let mut s = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    for w in words() {
        s.push_str(&format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{w}\"}}}}\n\n"));
    }
    s.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":20}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

fn gemini_stream() -> Vec<u8> {
    let mut s = String::new();
    let w = words();
    for (i, word) in w.iter().enumerate() {
        let finish = if i + 1 == w.len() {
            ",\"finishReason\":\"STOP\""
        } else {
            ""
        };
        s.push_str(&format!("data: {{\"candidates\":[{{\"content\":{{\"role\":\"model\",\"parts\":[{{\"text\":\"{word}\"}}]}}{finish},\"index\":0}}],\"usageMetadata\":{{\"promptTokenCount\":20,\"candidatesTokenCount\":{i},\"totalTokenCount\":{}}},\"modelVersion\":\"gemini-2.5-flash\"}}\r\n\r\n", 20 + i));
    }
    s.into_bytes()
}

fn bedrock_stream() -> Vec<u8> {
    let ev = |kind: &str, payload: String| {
        eventstream::encode(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.as_bytes(),
        )
    };
    let mut out = ev("messageStart", r#"{"role":"assistant"}"#.into());
    for w in words() {
        out.extend(ev(
            "contentBlockDelta",
            format!(r#"{{"contentBlockIndex":0,"delta":{{"text":"{w}"}}}}"#),
        ));
    }
    out.extend(ev("contentBlockStop", r#"{"contentBlockIndex":0}"#.into()));
    out.extend(ev("messageStop", r#"{"stopReason":"end_turn"}"#.into()));
    out.extend(ev("metadata", r#"{"usage":{"inputTokens":20,"outputTokens":20,"totalTokens":40},"metrics":{"latencyMs":1}}"#.into()));
    out
}

/// Median over 15 batches of the time per call, in µs.
fn measure(name: &str, mut f: impl FnMut()) {
    for _ in 0..200 {
        f();
    }
    let per_batch = 500;
    let mut samples: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed() / per_batch
        })
        .collect();
    samples.sort();
    println!("{name:44} {:8.2} µs", samples[7].as_secs_f64() * 1e6);
}

fn run_stream(t: &mut dyn StreamTranslator, bytes: &[u8]) -> usize {
    let mut out = BytesMut::new();
    // As the network delivers: one event per chunk, roughly.
    for chunk in bytes.chunks(160) {
        t.push(chunk, &mut out);
    }
    t.finish(&mut out);
    out.len()
}

fn main() {
    let openai_req = request_body("openai/gpt-4o-mini");
    measure("openai: rewrite model", || {
        black_box(openai::rewrite_model(black_box(&openai_req), "gpt-4o-mini").unwrap());
    });

    let anth_req = request_body("anthropic/claude-sonnet-4-5");
    measure("anthropic: request", || {
        let r = ChatRequest::parse(black_box(&anth_req)).unwrap();
        black_box(anthropic::request(r, "claude-sonnet-4-5").unwrap());
    });
    let anth_resp = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"word0 word1 word2 word3 word4 word5 word6 word7 word8 word9 word10 word11 word12 word13 word14 word15 word16 word17 word18 word19"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":20,"output_tokens":20}}"#;
    measure("anthropic: response", || {
        black_box(anthropic::response(black_box(anth_resp), &ctx()).unwrap());
    });
    let s = anthropic_stream();
    measure("anthropic: 20-delta stream", || {
        black_box(run_stream(&mut anthropic::Stream::new(&ctx()), &s));
    });

    let gem_req = request_body("google-ai-studio/gemini-2.5-flash");
    measure("gemini: request", || {
        let r = ChatRequest::parse(black_box(&gem_req)).unwrap();
        black_box(gemini::request(r, "gemini-2.5-flash", "google-ai-studio").unwrap());
    });
    let gem_resp = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"word0 word1 word2 word3 word4 word5 word6 word7 word8 word9 word10 word11 word12 word13 word14 word15 word16 word17 word18 word19"}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":20,"candidatesTokenCount":20,"totalTokenCount":40},"modelVersion":"gemini-2.5-flash","responseId":"r1"}"#;
    measure("gemini: response", || {
        black_box(gemini::response(black_box(gem_resp), &ctx()).unwrap());
    });
    let s = gemini_stream();
    measure("gemini: 20-chunk stream", || {
        black_box(run_stream(&mut gemini::Stream::new(&ctx()), &s));
    });

    let bed_req = request_body("aws-bedrock/us-east-1/anthropic.claude-3-haiku-20240307-v1:0");
    measure("bedrock: request", || {
        let r = ChatRequest::parse(black_box(&bed_req)).unwrap();
        black_box(bedrock::request(r).unwrap());
    });
    let key = r#"{"accessKeyId":"AKIDBENCH","secretAccessKey":"bench-secret-bench-secret","region":"us-east-1"}"#;
    measure("bedrock: parse key + SigV4 sign", || {
        let creds = AwsCredentials::parse(black_box(key)).unwrap();
        let mut req = http::Request::builder()
            .method("POST")
            .uri("https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse")
            .header("host", "bedrock-runtime.us-east-1.amazonaws.com")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        creds
            .sign(&mut req, &bed_req, "us-east-1", SystemTime::now())
            .unwrap();
        black_box(req);
    });
    let bed_resp = br#"{"output":{"message":{"role":"assistant","content":[{"text":"word0 word1 word2 word3 word4 word5 word6 word7 word8 word9 word10 word11 word12 word13 word14 word15 word16 word17 word18 word19"}]}},"stopReason":"end_turn","usage":{"inputTokens":20,"outputTokens":20,"totalTokens":40},"metrics":{"latencyMs":1}}"#;
    measure("bedrock: response", || {
        black_box(bedrock::response(black_box(bed_resp), &ctx()).unwrap());
    });
    let s = bedrock_stream();
    measure("bedrock: 20-delta event stream", || {
        black_box(run_stream(&mut bedrock::Stream::new(&ctx()), &s));
    });
}
