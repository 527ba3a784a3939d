//! Embeddings from a real cluster: three coordinators and three workers serving
//! all-MiniLM-L6-v2 as a 3-stage pipeline, asked through a follower over gRPC (`Embed`) and
//! HTTP (`/v1/embeddings`, also with the official `openai` client): the single-process
//! encoder's vectors bit for bit, sentence-transformers' within its bound, requests batched
//! together, bad input refused by name, and a worker's `kill -9` under load costing nothing
//! but time.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_format::{ModelConfig, SafetensorsWeights};
use tessera_kernels::ThreadPool;
use tessera_model::encoder::{Bert, EncoderInput, EncoderOutput};
use tessera_model::llama::LoadSpec;
use tessera_proto::v1 as pb;
use tessera_testkit::{RaftCluster, Tessera, cosine, http, minilm_dir, minilm_golden, python};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

fn text_inputs<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<pb::EmbedInput> {
    texts
        .into_iter()
        .map(|t| pb::EmbedInput {
            input: Some(pb::embed_input::Input::Text(t.to_owned())),
        })
        .collect()
}

/// The single-process encoder's embedding of each id list.
fn reference(dir: &std::path::Path, inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let cfg = ModelConfig::from_hf_json(&dir.join("config.json")).expect("config");
    let store = SafetensorsWeights::open_dir(dir).expect("weights");
    let mut bert = Bert::load(&store, &cfg, &LoadSpec::full(&cfg)).expect("load");
    let pool = ThreadPool::new(1).expect("pool");
    inputs
        .iter()
        .map(
            |ids| match bert.encode(EncoderInput::Tokens(ids), &[ids.len()], &pool) {
                Ok(EncoderOutput::Embeddings(e)) => e,
                other => panic!("encode: {other:?}"),
            },
        )
        .collect()
}

/// Ensures that a 3-worker cluster serving MiniLM answers Embed, through a follower, with the
/// single-process encoder's exact vectors for the 64 golden sentences (so within the
/// sentence-transformers bound too), from one request or many concurrent ones; that
/// `/v1/embeddings` gives the same (float and base64) and the `openai` client reads them;
/// that generation and bad inputs are refused naming the field; and that requests in flight
/// when a worker is killed are answered, correctly, by the next plan.
#[test]
fn minilm_cluster_embeds_like_one_process() {
    let Some(dir) = minilm_dir() else { return };
    let model = dir.to_string_lossy().into_owned();
    let golden = minilm_golden();
    let want = reference(
        &dir,
        &golden.iter().map(|c| c.ids.clone()).collect::<Vec<_>>(),
    );
    let mut c = RaftCluster::start(&tessera(), &model, "embed", 3);
    let (status, leader) = c.wait_ready(0, Duration::from_secs(180));
    let mut layers: Vec<(u32, u32)> = status
        .workers
        .iter()
        .filter_map(|w| w.shard.as_ref().map(|s| (s.layer_start, s.layer_end)))
        .collect();
    layers.sort_unstable();
    assert_eq!(layers.len(), 3, "one stage per worker: {status:#?}");
    assert_eq!(
        (layers[0].0, layers[2].1),
        (0, 6),
        "the stages cover the 6 layers: {layers:?}"
    );
    let follower = (leader + 1) % 3;

    // One request of all 64 sentences, through a follower.
    let embed = |i: usize, inputs: Vec<pb::EmbedInput>| {
        let mut client = c.client(i);
        c.rt.block_on(client.embed(pb::EmbedRequest {
            model: String::new(),
            inputs,
        }))
        .map(tonic::Response::into_inner)
    };
    let resp = embed(
        follower,
        text_inputs(golden.iter().map(|c| c.text.as_str())),
    )
    .expect("embed");
    assert_eq!(resp.embeddings.len(), 64);
    let tokens: usize = golden.iter().map(|c| c.ids.len()).sum();
    assert_eq!(resp.prompt_tokens as usize, tokens);
    let mut min_cos = f64::INFINITY;
    for (i, e) in resp.embeddings.iter().enumerate() {
        assert_eq!(e.index as usize, i);
        assert!(
            e.values == want[i],
            "input {i}: the pipeline must give the engine's bits"
        );
        min_cos = min_cos.min(cosine(&e.values, &golden[i].embedding));
    }
    assert!(
        min_cos >= 0.9999,
        "cosine to sentence-transformers {min_cos}"
    );
    eprintln!("3-worker cluster vs sentence-transformers: min cosine {min_cos:.9}");

    // Many small requests at once: batched together, each answered with its own vectors.
    let answers: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|k| {
                let (c, golden) = (&c, &golden);
                s.spawn(move || {
                    let mine: Vec<usize> = (k..64).step_by(8).collect();
                    let mut client = c.client(leader);
                    let r = c.rt.block_on(client.embed(pb::EmbedRequest {
                        model: String::new(),
                        inputs: text_inputs(mine.iter().map(|&i| golden[i].text.as_str())),
                    }));
                    (mine, r.expect("concurrent embed").into_inner())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (mine, r) in answers {
        for (e, &i) in r.embeddings.iter().zip(&mine) {
            assert!(e.values == want[i], "concurrent input {i}");
        }
    }

    // HTTP, through the follower: floats and base64 are the gRPC API's vectors.
    let http_addr = &c.http_addrs[follower];
    let body = serde_json::json!({"input": [golden[0].text, golden[5].text]});
    let r = http::post_json(http_addr, "/v1/embeddings", &[], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["object"], "list");
    let first: Vec<f32> = j["data"][1]["embedding"]
        .as_array()
        .expect("floats")
        .iter()
        .map(|v| v.as_f64().expect("float") as f32)
        .collect();
    assert!(first == want[5], "HTTP floats are the vectors");
    let body = serde_json::json!({"input": golden[7].ids, "encoding_format": "base64"});
    let j = http::post_json(http_addr, "/v1/embeddings", &[], &body).json();
    let b64 = j["data"][0]["embedding"].as_str().expect("base64");
    let bytes = base64_decode(b64);
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(v == want[7], "base64 is the little-endian f32 vector");
    assert_eq!(j["usage"]["prompt_tokens"], golden[7].ids.len());

    // Refusals, by name.
    let e = embed(follower, Vec::new()).expect_err("no inputs");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("inputs"), "{}", e.message());
    let bad_ids = vec![pb::EmbedInput {
        input: Some(pb::embed_input::Input::Ids(pb::TokenIds {
            ids: vec![101, 99_999],
        })),
    }];
    let e = embed(leader, bad_ids).expect_err("id outside the vocabulary");
    assert!(e.message().starts_with("inputs[0].ids"), "{}", e.message());
    let e = c
        .generate(leader, tessera_testkit::greedy("Hello", 4))
        .expect_err("an encoder does not generate");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("model"), "{}", e.message());
    let r = http::post_json(
        http_addr,
        "/v1/embeddings",
        &[],
        &serde_json::json!({"input": "x", "dimensions": 64}),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, "dimensions".into())
    );

    // The official client.
    if let Some(python) = python() {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python/openai_embeddings.py");
        let out = Command::new(&python)
            .arg(&script)
            .arg(format!("http://{http_addr}/v1"))
            .arg(&model)
            .arg(&golden[3].text)
            .output()
            .expect("run the openai client");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<f32> = serde_json::from_slice::<Vec<f64>>(&out.stdout)
            .expect("the script prints the vector")
            .into_iter()
            .map(|x| x as f32)
            .collect();
        assert!(got == want[3], "the openai client reads the vector");
    }

    // A worker killed under load (and started again, so a 3-stage plan forms): every
    // request in flight or sent meanwhile is answered, with the right vectors.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (mut client, golden, want, stop) = (
            c.client(leader),
            golden.clone(),
            want.clone(),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let rt = tessera_testkit::runtime();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let i = n % 64;
                let r = rt.block_on(client.embed(pb::EmbedRequest {
                    model: String::new(),
                    inputs: text_inputs([golden[i].text.as_str()]),
                }));
                let r = r.expect("an embed request across the kill").into_inner();
                assert!(
                    r.embeddings[0].values == want[i],
                    "input {i} across the kill"
                );
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.kill_worker(1);
    std::thread::sleep(Duration::from_secs(2));
    c.restart_worker(1);
    c.wait_ready(leader, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let answered = load
        .join()
        .expect("every request across the kill answered correctly");
    assert!(answered > 0);
    eprintln!("{answered} embed requests answered across a worker's kill");
}

/// Standard base64 decoding (the test's own, to check the server's encoder independently).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().fold(0u32, |n, &d| (n << 6) | u32::from(d)) << (6 * (4 - c.len()));
            let bytes = n.to_be_bytes();
            bytes[1..c.len()].to_vec()
        })
        .collect()
}
