//! The `mock-provider` binary: announces its address on stdout and stops on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts the binary with `args` and reads the address it announces.
fn start(args: &[&str]) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(addr.starts_with("127.0.0.1:"));
    (child, stdout, addr)
}

#[test]
fn prints_listening_line_serves_and_stops_on_sigterm() {
    // The key comes in a header named with --auth-header, as a custom provider's would.
    let (mut child, mut stdout, addr) = start(&[
        "--name",
        "bin-test",
        "--no-record",
        "--auth-header",
        "x-custom-key",
    ]);

    let body = r#"{"model":"m","messages":[{"role":"user","content":"ping"}]}"#;
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-custom-key: k\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("x-mock-name: bin-test\r\n"));
    assert!(response.contains(r#""content":"mock reply to: ping""#));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "mock-provider ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing else is printed.
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
}

/// A TLS client connection to the mock that trusts `ca_pem` and offers `alpn`.
fn tls_connect(
    addr: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

#[test]
fn serves_https_offering_h2_and_http1_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("pki");
    let (mut child, _stdout, addr) =
        start(&["--no-record", "--tls-dir", tls_dir.to_str().unwrap()]);
    let ca = std::fs::read_to_string(tls_dir.join("ca.pem")).unwrap();

    // Like the providers, h2 is preferred when the client offers it.
    let h2 = tls_connect(&addr, &ca, &[b"h2", b"http/1.1"]);
    assert_eq!(h2.conn.alpn_protocol(), Some(&b"h2"[..]));

    let mut conn = tls_connect(&addr, &ca, &[b"http/1.1"]);
    assert_eq!(conn.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"over tls"}]}"#;
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    // The mock closes without close_notify after `connection: close`: take what arrived.
    let _ = conn.read_to_end(&mut response);
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains(r#""content":"mock reply to: over tls""#),
        "{response}"
    );

    // A plain-HTTP request on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Started again with the same directory, it keeps its identity: the CA is still trusted.
    let (mut child, _stdout, addr) = start(&["--tls-dir", tls_dir.to_str().unwrap()]);
    let again = tls_connect(&addr, &ca, &[b"http/1.1"]);
    assert_eq!(again.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn refuses_a_tls_dir_whose_certificate_is_not_pem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), "").unwrap();
    std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
        .args(["--tls-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no PEM certificate"), "{stderr}");
    assert!(out.stdout.is_empty());
}
