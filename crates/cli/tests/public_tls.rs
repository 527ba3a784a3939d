//! TLS on the public API, as a real coordinator serves it with `--tls-cert/--tls-key` (a
//! certificate from `tessera certs --public`): the CLI generates over `https://` trusting the
//! CA through `$TESSERA_CA`, the HTTP API answers over HTTPS (Python's standard library as the
//! client), and neither port answers in plain text.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_testkit::{Tessera, certs_dir, kill, smollm2_arg as model, temp_dir};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// `GET url` over HTTPS trusting `ca`; (status, body) or the error Python saw.
fn https_get(url: &str, ca: &str) -> Result<(u16, String), String> {
    let script = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
try:
    with urllib.request.urlopen(sys.argv[1], context=ctx, timeout=10) as r:
        print(r.status); print(r.read().decode())
except Exception as e:
    print("ERROR", type(e).__name__, e); sys.exit(1)
"#;
    let out = Command::new("python3")
        .args(["-c", script, url, ca])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(text);
    }
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    Ok((
        status.trim().parse().map_err(|_| text.clone())?,
        body.to_owned(),
    ))
}

/// Ensures that with `--tls-cert/--tls-key` the gRPC and HTTP APIs answer over TLS to clients
/// that trust the CA, and not in plain text.
#[test]
fn the_public_api_speaks_tls_when_asked() {
    let Some(model) = model() else { return };
    let dir = temp_dir("public-tls");
    let out = tessera()
        .command()
        .args(["certs", "--dir"])
        .arg(certs_dir())
        .args(["--public", "127.0.0.1,localhost"])
        .output()
        .expect("tessera certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Keep this test's server certificate apart from the shared test CA's directory.
    let (cert, key) = (dir.path().join("public.pem"), dir.path().join("public.key"));
    std::fs::rename(certs_dir().join("public.pem"), &cert).expect("move");
    std::fs::rename(certs_dir().join("public.key"), &key).expect("move");
    let ca = certs_dir().join("ca.pem").to_string_lossy().into_owned();
    let (cert, key) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let (mut coordinator, addrs) = tessera().spawn_with_addresses(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--cluster-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--kv-tokens",
        "2048",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--exit-on-stdin-eof",
    ]);
    let cluster = format!("http://{}", addrs.cluster.expect("cluster"));
    let mut worker = tessera().spawn_worker(&cluster, 2, "1GiB", None, &[]);
    let https = format!("https://{}", addrs.public);
    let generate = |endpoint: &str, ca: Option<&str>| {
        let mut cmd = tessera().command();
        cmd.env_remove("TESSERA_CA");
        if let Some(ca) = ca {
            cmd.env("TESSERA_CA", ca);
        }
        cmd.args([
            "generate",
            "--endpoint",
            endpoint,
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "Hello",
        ])
        .output()
        .expect("tessera generate")
    };
    let start = Instant::now();
    loop {
        let out = generate(&https, Some(&ca));
        if out.status.success() {
            assert!(!out.stdout.is_empty());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no answer over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Not trusting the CA, or speaking plain text: refused.
    let out = generate(&https, None);
    assert!(!out.status.success());
    let out = generate(&format!("http://{}", addrs.public), None);
    assert!(!out.status.success());

    let http = addrs.http.expect("http");
    let (status, body) = https_get(&format!("https://{http}/v1/models"), &ca).expect("HTTPS");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&model) || body.contains("smollm2"), "{body}");
    // A plain-text request gets no HTTP answer (the server expects a TLS handshake).
    let mut conn = std::net::TcpStream::connect(&http).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(&mut conn, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "the HTTP port answered in plain text"
    );
    kill(&mut worker);
    kill(&mut coordinator);
}
