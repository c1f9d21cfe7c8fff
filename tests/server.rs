//! `hici serve` end to end over loopback HTTP: a real server process per test, plain HTTP/1.0
//! requests (no client library), and the `openai` Python client against SmolLM2.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `hici serve` child process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `hici <model args> serve --port 0 <args>` and waits for its address.
    fn start(model: &[&str], args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hici"))
            .args(model)
            .args(["serve", "--port", "0"])
            .args(args)
            .env("HICI_LOG", "warn,hici_server=info")
            .env_remove("HICI_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning hici serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let Some(a) = rest.split('/').next() {
                        let _ = tx.send(a.to_string());
                    }
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no listening line; stderr:\n{}", stderr.lock().unwrap()));
        Server {
            child,
            addr: addr.parse().unwrap(),
            stderr,
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Polls `/health` until 200.
    fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            if let Ok(r) = try_request(self.addr, "GET", "/health", None, &[]) {
                if r.status == 200 {
                    return;
                }
                assert_eq!(r.status, 503, "{}", r.body);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server never became ready; stderr:\n{}", self.log());
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>, headers: &[&str]) -> Reply {
        try_request(
            self.addr,
            method,
            path,
            body.map(|b| b.to_string()),
            headers,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}; stderr:\n{}", self.log()))
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, Some(body), &[])
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(mut self) -> (i32, String) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (st.code().unwrap_or(-1), self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e.clone()
    }
}

/// One HTTP/1.0 request (the server closes the connection after the response, so the body is
/// everything until EOF; no chunked decoding needed).
fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
    headers: &[&str],
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn chat_body(model: &str, prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// Text and finish reason of a streamed chat or completion; checks the chunk sequence.
fn streamed(r: &Reply, chat: bool) -> (String, String, Value) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.head.contains("text/event-stream"), "{}", r.head);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    if chat {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
    }
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for c in &chunks {
        if c["usage"].is_object() {
            assert!(c["choices"].as_array().unwrap().is_empty());
            usage = c["usage"].clone();
            continue;
        }
        let ch = &c["choices"][0];
        let piece = if chat {
            ch["delta"]["content"].as_str()
        } else {
            ch["text"].as_str()
        };
        text.push_str(piece.unwrap_or(""));
        if let Some(f) = ch["finish_reason"].as_str() {
            assert!(finish.is_empty(), "two finish reasons");
            finish = f.to_string();
        }
    }
    assert!(!finish.is_empty(), "no finish_reason chunk: {ev:?}");
    (text, finish, usage)
}

const EMBEDDED: &str = "hici-embedded-tiny";

#[test]
fn serve_embedded_api_errors_concurrency_and_sigterm() {
    let srv = Server::start(
        &[],
        &["--api-key", "sekret", "--max-body", "4096", "--ctx", "200"],
    );
    srv.wait_ready();
    let auth = "Authorization: Bearer sekret";
    let post = |path: &str, body: &Value| srv.request("POST", path, Some(body), &[auth]);

    // health and metrics need no key; /v1 does
    let h = srv.request("GET", "/health", None, &[]).json();
    assert_eq!(
        (h["status"].as_str(), h["context"].as_u64()),
        (Some("ok"), Some(200))
    );
    srv.request("GET", "/v1/models", None, &[]).error(401);
    srv.request("GET", "/v1/models", None, &["Authorization: Bearer wrong"])
        .error(401);
    let models = srv.request("GET", "/v1/models", None, &[auth]).json();
    assert_eq!(models["data"][0]["id"], EMBEDDED);
    assert_eq!(
        srv.request("GET", "/v1/models/nope", None, &[auth])
            .error(404)["code"],
        "model_not_found"
    );

    // plain and streamed chat agree
    let plain = post(
        "/v1/chat/completions",
        &chat_body(EMBEDDED, "Hello there", 12, false),
    );
    assert_eq!(plain.status, 200, "{}", plain.body);
    let p = plain.json();
    assert_eq!(p["object"], "chat.completion");
    assert_eq!(p["choices"][0]["message"]["role"], "assistant");
    let text = p["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &p["usage"];
    assert_eq!(usage["completion_tokens"], 12, "{p}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 12)
    );
    assert_eq!(p["choices"][0]["finish_reason"], "length");
    let s = post(
        "/v1/chat/completions",
        &chat_body(EMBEDDED, "Hello there", 12, true),
    );
    let (stext, finish, susage) = streamed(&s, true);
    assert_eq!((stext.as_str(), finish.as_str()), (text.as_str(), "length"));
    assert_eq!(&susage, usage);

    // completions: text and token-id prompts, plain and streamed
    let cbody = |stream: bool, prompt: Value| {
        json!({"model": EMBEDDED, "prompt": prompt, "max_tokens": 10, "temperature": 0,
               "stream": stream})
    };
    let c = post("/v1/completions", &cbody(false, json!("Once upon a time"))).json();
    assert_eq!(c["object"], "text_completion");
    let ctext = c["choices"][0]["text"].as_str().unwrap().to_string();
    let (cs, _, _) = streamed(
        &post("/v1/completions", &cbody(true, json!("Once upon a time"))),
        false,
    );
    assert_eq!(cs, ctext);
    let ids = post("/v1/completions", &cbody(false, json!([1, 5, 9, 20])));
    assert_eq!(ids.json()["usage"]["prompt_tokens"], 4, "{}", ids.body);

    // a stop sequence cuts the answer before it, plain and streamed
    if let Some(cut) = text.char_indices().nth(4).map(|(i, _)| i) {
        let stop: String = text[cut..].chars().take(2).collect();
        let want = &text[..text.find(&stop).unwrap()];
        let mut b = chat_body(EMBEDDED, "Hello there", 12, false);
        b["stop"] = json!([stop]);
        let r = post("/v1/chat/completions", &b).json();
        assert_eq!(r["choices"][0]["message"]["content"], want, "stop {stop:?}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        b["stream"] = json!(true);
        assert_eq!(streamed(&post("/v1/chat/completions", &b), true).0, want);
    }

    // errors, each with its status and OpenAI's JSON
    let bad = srv.request("POST", "/v1/chat/completions", None, &[auth]);
    bad.error(400);
    let raw = try_request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        Some("{not json".into()),
        &[auth],
    )
    .unwrap();
    assert!(raw.error(400)["message"]
        .as_str()
        .unwrap()
        .contains("invalid"));
    let e = post("/v1/chat/completions", &chat_body("gpt-4", "x", 4, false)).error(404);
    assert_eq!(e["code"], "model_not_found");
    let mut b = chat_body(EMBEDDED, "x", 4, false);
    b["n"] = json!(2);
    assert_eq!(post("/v1/chat/completions", &b).error(400)["param"], "n");
    let mut b = chat_body(EMBEDDED, "x", 4, false);
    b["temperature"] = json!(3.5);
    assert_eq!(
        post("/v1/chat/completions", &b).error(400)["param"],
        "temperature"
    );
    let over = post(
        "/v1/chat/completions",
        &chat_body(EMBEDDED, "x", 190, false),
    )
    .error(400);
    let msg = over["message"].as_str().unwrap();
    assert!(
        msg.contains("max_tokens is 190") && msg.contains("context of 200"),
        "{msg}"
    );
    assert!(msg.contains("prompt has "), "{msg}");
    let huge = json!({"model": EMBEDDED, "prompt": "x".repeat(5000)});
    assert!(post("/v1/completions", &huge).error(413)["message"]
        .as_str()
        .unwrap()
        .contains("4096"));
    srv.request("GET", "/v1/nothing", None, &[auth]).error(404);
    let too_long = json!({"model": EMBEDDED, "prompt": vec![3; 250], "max_tokens": 1});
    post("/v1/completions", &too_long).error(400);
    let bad_id = json!({"model": EMBEDDED, "prompt": [1, 99999], "max_tokens": 1});
    assert!(post("/v1/completions", &bad_id).error(400)["message"]
        .as_str()
        .unwrap()
        .contains("99999"));

    // 16 concurrent greedy requests, each equal to its answer alone
    let prompts: Vec<String> = (0..16).map(|i| format!("Question number {i}?")).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|q| {
            post("/v1/chat/completions", &chat_body(EMBEDDED, q, 8, false)).json()["choices"][0]
                ["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let addr = srv.addr;
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let body = chat_body(EMBEDDED, q, 8, i % 2 == 0).to_string();
            std::thread::spawn(move || {
                let r =
                    try_request(addr, "POST", "/v1/chat/completions", Some(body), &[auth]).unwrap();
                if i % 2 == 0 {
                    streamed(&r, true).0
                } else {
                    r.json()["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string()
                }
            })
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(together, alone);

    // metrics
    let m = srv.request("GET", "/metrics", None, &[]).body;
    for needle in [
        "hici_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "hici_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}",
        "hici_requests_total{endpoint=\"/v1/models\",status=\"401\"}",
        "hici_generated_tokens_total",
        "hici_prompt_tokens_total",
        "hici_queue_depth",
        "hici_time_to_first_token_seconds_bucket",
        "hici_inter_token_latency_seconds_bucket",
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }

    // SIGTERM while a stream runs: it finishes, then the server exits 0
    let body = chat_body(EMBEDDED, "A long answer please", 150, true).to_string();
    let inflight = std::thread::spawn(move || {
        try_request(addr, "POST", "/v1/chat/completions", Some(body), &[auth]).unwrap()
    });
    std::thread::sleep(Duration::from_millis(150));
    let (code, log) = srv.terminate();
    let r = inflight.join().unwrap();
    assert!(!streamed(&r, true).1.is_empty());
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn serve_refuses_bad_options_and_models() {
    let out = common::hici(&["serve", "--max-queue", "0"]);
    common::assert_clean_error(&out, "--max-queue");
    let out = common::hici(&["serve", "--max-batch", "0"]);
    common::assert_clean_error(&out, "--max-batch");
    let out = common::hici(&["--model", "/nonexistent.gguf", "serve", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent.gguf") && !err.contains("panicked"),
        "{err}"
    );
    let out = common::hici(&["serve", "--port", "0", "--ctx", "100000"]);
    common::assert_clean_error(&out, "context");
}

fn smollm2() -> Option<String> {
    common::real_model("smollm2").map(|p| p.to_str().unwrap().to_string())
}

/// A Python interpreter with the `openai` package (`HICI_PYTHON`, else `python3`).
fn python_with_openai() -> Option<String> {
    let py = std::env::var("HICI_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("CI").is_err(),
        "CI: the `openai` Python package is missing (.ci/run installs it)"
    );
    eprintln!("SKIPPED: no Python with the `openai` package");
    None
}

/// SmolLM2 through the official `openai` client: Paris, streamed == plain, completions, models,
/// error cases, 16 concurrent streams; then a client that disconnects mid-stream cancels its
/// generation, and a full queue answers 429.
#[test]
fn serve_smollm2_with_the_openai_client() {
    let Some(model) = smollm2() else { return };
    let Some(py) = python_with_openai() else {
        return;
    };
    let srv = Server::start(&["--model", &model], &["--api-key", "k1", "--ctx", "2048"]);
    // loading SmolLM2 takes over a second: the first probe sees 503 "loading"
    let first = srv.request("GET", "/health", None, &[]);
    assert!(first.status == 503 || first.status == 200, "{first:?}");
    srv.wait_ready();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(["--base-url", &format!("http://{}/v1", srv.addr)])
        .args(["--api-key", "k1", "--model", "SmolLM2-135M-Instruct.Q4_1"])
        .args(["--expect", "Paris", "--context", "2048"])
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}\nserver:\n{}", srv.log());
    eprintln!("{so}");

    // a streaming client that goes away after the first chunks
    let auth = "Authorization: Bearer k1";
    let model_id = "SmolLM2-135M-Instruct.Q4_1";
    let body = chat_body(model_id, "Write a long story about a dragon.", 1500, true).to_string();
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\n{auth}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < 600 {
        got += s.read(&mut buf).unwrap();
    }
    drop(s);
    // the next request waits only for the cancelled one to stop, not for its 1500 tokens
    let t0 = Instant::now();
    let r = srv.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(
            model_id,
            "What is the capital of France?",
            8,
            false,
        )),
        &[auth],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let waited = t0.elapsed().as_secs_f64();
    let log = srv.log();
    assert!(
        log.contains("stop Interrupted"),
        "the stream was not cancelled:\n{log}"
    );
    eprintln!("disconnect: next request answered {waited:.2} s after the client left");

    // a full queue: one running (batches of one), one waiting, the third is refused with
    // Retry-After. The running one is a long stream, seen running (its first chunks read)
    // before the others are sent, so the check does not depend on decoding speed.
    drop(srv);
    let srv = Server::start(
        &["--model", &model],
        &["--max-queue", "1", "--max-batch", "1"],
    );
    srv.wait_ready();
    let addr = srv.addr;
    let mut running = TcpStream::connect(addr).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    running.write_all(req.as_bytes()).unwrap();
    let mut got = 0;
    while got < 600 {
        got += running.read(&mut buf).unwrap();
    }
    let short = chat_body(model_id, "Tell me about the sea.", 4, false).to_string();
    let waiting = std::thread::spawn(move || {
        try_request(addr, "POST", "/v1/chat/completions", Some(short), &[]).unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = srv.post("/v1/chat/completions", &chat_body(model_id, "Hi", 4, false));
    assert_eq!(r.error(429)["code"], "queue_full");
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        r.head
    );
    // the running stream's client leaves: its generation stops and the waiting one is served
    drop(running);
    assert_eq!(waiting.join().unwrap().status, 200);
    let (code, log) = srv.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A request whose prompt + max_tokens can never fit the KV-cache budget is a 400 naming the
/// sizes; one that fits is served.
#[test]
fn serve_kv_budget_refuses_what_never_fits() {
    // the embedded model's cache takes 1 KiB per entry (2 layers x K/V x 4 heads x 16 x 4
    // bytes): 0.05 MiB holds 51 entries, i.e. a short generation only
    let srv = Server::start(&[], &["--kv-budget-mib", "0.05"]);
    srv.wait_ready();
    let health = srv.request("GET", "/health", None, &[]).json();
    let budget = health["kv_budget_bytes"].as_u64().unwrap();
    assert_eq!(budget, (0.05f64 * 1048576.0) as u64);
    let big = srv.post(
        "/v1/chat/completions",
        &chat_body(EMBEDDED, "hi", 230, false),
    );
    let msg = big.error(400)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("KV cache") && msg.contains("MiB"), "{msg}");
    let small = srv.post("/v1/chat/completions", &chat_body(EMBEDDED, "hi", 4, false));
    assert_eq!(small.status, 200, "{}", small.body);
    assert_eq!(
        srv.request("GET", "/health", None, &[]).json()["kv_reserved_bytes"],
        0
    );
}
