//! API keys from the command line: a coordinator started with `--api-key` (and a key file)
//! refuses `tessera status` and `tessera generate` without a key, naming the problem, and
//! serves them with `--api-key` or `$TESSERA_API_KEY`; its HTTP health stays open.

use std::time::{Duration, Instant};

use tessera_testkit::{Tessera, kill, smollm2_arg as model, temp_dir, url_list};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Ensures that client commands need the key a coordinator was started with (from the flag
/// or the key file), take it from `--api-key` or `$TESSERA_API_KEY`, and say clearly when it
/// is missing or wrong.
#[test]
fn client_commands_send_the_api_key() {
    let Some(model) = model() else { return };
    let dir = temp_dir("api-keys");
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "# operators\nfile-key-2\n\n").expect("write the key file");
    let t = tessera();
    let mut args = tessera_testkit::lone_coordinator_args(&model);
    let key_file_arg = key_file.to_string_lossy().into_owned();
    args.extend(
        [
            "--api-key",
            "flag-key-1",
            "--api-key-file",
            &key_file_arg,
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    args.push("--exit-on-stdin-eof".into());
    let (mut coordinator, addrs) = t.spawn_with_addresses(&args);
    let endpoint = format!("http://{}", addrs.public);
    let cluster = addrs.cluster.clone().expect("cluster address");
    let http = addrs.http.clone().expect("http address");
    let mut worker = t.spawn_worker(&url_list([cluster.as_str()]), 1, "1GiB", Some("w0"), &[]);

    // Open: HTTP health, and readiness once the worker has loaded.
    assert_eq!(
        tessera_testkit::http::get(&http, "/health", &[]).status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while tessera_testkit::http::get(&http, "/ready", &[]).status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }

    let run = |extra: &[&str], env_key: Option<&str>| {
        let mut cmd = t.command();
        cmd.args(extra).env_remove("TESSERA_API_KEY");
        if let Some(k) = env_key {
            cmd.env("TESSERA_API_KEY", k);
        }
        cmd.output().expect("run tessera")
    };
    let refused = run(&["status", "--endpoint", &endpoint], None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("API key"), "{err}");
    let wrong = run(
        &["status", "--endpoint", &endpoint, "--api-key", "nope"],
        None,
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not valid"),
        "{:?}",
        wrong
    );
    for (extra, env_key) in [
        (
            vec!["status", "--endpoint", &endpoint, "--api-key", "flag-key-1"],
            None,
        ),
        (vec!["status", "--endpoint", &endpoint], Some("file-key-2")),
        (
            vec![
                "generate",
                "--endpoint",
                &endpoint,
                "--max-tokens",
                "3",
                "--temperature",
                "0",
                "Hi",
            ],
            Some("flag-key-1"),
        ),
    ] {
        let out = run(&extra, env_key);
        assert!(
            out.status.success(),
            "{extra:?} with {env_key:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    kill(&mut worker);
    kill(&mut coordinator);
}
