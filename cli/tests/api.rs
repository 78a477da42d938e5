//! The OpenAI-compatible API of a real pool (coordinator + node processes on loopback):
//! keys, bad input of every kind answered with OpenAI-shaped 4xx errors while the server
//! keeps serving, slow clients cut off, a client that hangs up mid-stream freeing its
//! session, streaming equal to whole answers, the Responses API equal to chat, metrics and
//! the pool JSON, and 64 streaming clients at once.

mod common;

use common::{raw_http, request, split_answer, sse_events, streamed_text};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

const KEY: &str = "sk-potluck-test-key";

fn auth() -> String {
    format!("Authorization: Bearer {KEY}")
}

/// POSTs `body` with the key; status and parsed JSON.
fn post(http: &str, path: &str, body: &str) -> (u16, Value) {
    let raw = raw_http(http, &request("POST", path, &[&auth()], body));
    let (status, body) = split_answer(&raw);
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"));
    (status, v)
}

/// Asserts an OpenAI-shaped error with `status`, returning its message.
fn error(http: &str, path: &str, body: &str, status: u16) -> String {
    let (got, v) = post(http, path, body);
    assert_eq!(got, status, "{body} -> {v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error: {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    msg.to_string()
}

fn metric(http: &str, name: &str) -> f64 {
    let raw = raw_http(http, b"GET /metrics HTTP/1.0\r\n\r\n");
    split_answer(&raw)
        .1
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn pool_json(http: &str) -> Value {
    let raw = raw_http(http, b"GET /api/pool HTTP/1.0\r\n\r\n");
    serde_json::from_str(split_answer(&raw).1).expect("pool JSON")
}

#[test]
fn bad_input_gets_clear_errors_slow_and_vanishing_clients_are_cut_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, _node, http) = common::small_pool(
        dir.path(),
        &["--api-key", KEY, "--http-header-timeout", "1"],
    );
    let chat = "/v1/chat/completions";
    let good = r#"{"messages":[{"role":"user","content":"What is the capital of Japan?"}],"temperature":0,"max_tokens":12}"#;

    // Keys.
    for headers in [vec![], vec!["Authorization: Bearer wrong-key-123"]] {
        let raw = raw_http(&http, &request("POST", chat, &headers, good));
        let (status, body) = split_answer(&raw);
        assert_eq!(status, 401, "{raw}");
        assert!(body.contains("invalid_api_key"), "{body}");
    }

    // Bad bodies and fields.
    let cases = [
        (
            r#"{"messages": [ {"role": "user", "content": "hi"} "#,
            400,
            "invalid request",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}"#,
            400,
            "invalid type",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":-5}"#,
            400,
            "invalid value",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1000000}"#,
            400,
            "max_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
            400,
            "max_tokens",
        ),
        (r#"{"messages":[]}"#, 400, "messages must not be empty"),
        (
            r#"{"prompt":"no messages here"}"#,
            400,
            "missing field `messages`",
        ),
        (
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#,
            400,
            "role 'wizard'",
        ),
        (
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            400,
            "only text",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":7}"#,
            400,
            "temperature",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"top_p":0}"#,
            400,
            "top_p",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"n":3}"#,
            400,
            "n = 1",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#,
            400,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#,
            404,
            "does not exist",
        ),
        ("[1, 2, 3]", 400, "invalid request"),
        ("", 400, "invalid request"),
        // Fields that would change what an answer is are refused by name, not ignored.
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            400,
            "tools: tool and function calling are not supported",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"tool_choice":"required"}"#,
            400,
            "tool_choice",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":2}"#,
            400,
            "logprobs: log probabilities are not returned",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
            400,
            "response_format: 'json_object' is not supported",
        ),
    ];
    for (body, status, says) in cases {
        let msg = error(&http, chat, body, status);
        assert!(msg.contains(says), "{body}: {msg}");
    }
    // What asks for nothing is served as before.
    let (status, v) = post(
        &http,
        chat,
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"tools":[],"tool_choice":"auto","function_call":"none","logprobs":false,"top_logprobs":0,"response_format":{"type":"text"}}"#,
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(
        &http,
        chat,
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"tool_choice":"none","function_call":"auto"}"#,
    );
    assert_eq!(status, 200, "{v}");
    let msg = error(
        &http,
        "/v1/completions",
        r#"{"prompt":"hi","logprobs":3}"#,
        400,
    );
    assert!(msg.contains("logprobs"), "{msg}");
    // An unknown model's 404 names the field and every model the pool serves.
    let (status, v) = post(
        &http,
        chat,
        r#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#,
    );
    assert_eq!(status, 404);
    assert_eq!(v["error"]["param"], "model", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("(chat and completions)"), "{msg}");
    // The Responses API: what it cannot carry out is refused by the field's name.
    for (body, param) in [
        (
            r#"{"input":"hi","previous_response_id":"resp_1"}"#,
            "previous_response_id",
        ),
        (
            r#"{"input":"hi","text":{"format":{"type":"json_schema"}}}"#,
            "text.format",
        ),
        (r#"{"input":"hi","tools":[{"type":"web_search"}]}"#, "tools"),
        (r#"{"input":"hi","background":true}"#, "background"),
        (
            r#"{"input":"hi","max_output_tokens":0}"#,
            "max_output_tokens",
        ),
        (r#"{"input":""}"#, "input"),
        (r#"{"input":"hi","temperature":5}"#, "temperature"),
        (
            r#"{"input":"hi","include":["message.output_text.logprobs"]}"#,
            "include",
        ),
        (
            r#"{"input":"hi","reasoning":{"effort":"high"}}"#,
            "reasoning",
        ),
        (r#"{"input":"hi","prompt":{"id":"pmpt_1"}}"#, "prompt"),
        (
            r#"{"input":[{"type":"function_call_output","call_id":"c","output":"x"}]}"#,
            "input",
        ),
        (
            r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"x"}]}]}"#,
            "input",
        ),
    ] {
        let (status, v) = post(&http, "/v1/responses", body);
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{body} -> {v}");
    }
    let (status, v) = post(&http, "/v1/responses", r#"{"input":"hi","model":"gpt-4o"}"#);
    assert_eq!(
        (status, &v["error"]["param"]),
        (404, &json!("model")),
        "{v}"
    );
    error(&http, "/v1/completions", r#"{"prompt":""}"#, 400);
    error(&http, "/v1/completions", r#"{"prompt":5}"#, 400);
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2 << 20)
    );
    let msg = error(&http, chat, &huge, 413);
    assert!(msg.contains("exceeds"), "{msg}");
    let raw = raw_http(&http, &request("GET", "/v1/nothing", &[&auth()], ""));
    assert_eq!(split_answer(&raw).0, 404, "{raw}");

    // A client that never finishes its headers is cut off after the header timeout.
    let mut slow = std::net::TcpStream::connect(&http).unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the slow client was never cut"
    );
    // One that sends its headers but dawdles over the body gets a 400 after the body timeout.
    let mut slow = std::net::TcpStream::connect(&http).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\n{}\r\nContent-Length: 100\r\n\r\n{{\"prompt\"",
        auth()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "the slow body was never cut"
    );
    assert_eq!(split_answer(&answer).0, 400, "{answer}");
    // One that trickles its body a byte at a time is cut when the body's time is up, not
    // kept alive by every byte (100 bytes at 2 a second would take 50 s).
    let trickle = std::net::TcpStream::connect(&http).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\n{}\r\nContent-Length: 100\r\n\r\n",
        auth()
    );
    let mut writer = trickle.try_clone().unwrap();
    writer.write_all(head.as_bytes()).unwrap();
    let dripping = std::thread::spawn(move || {
        for _ in 0..100 {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let mut reader = trickle;
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = reader.read_to_string(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the trickled body was never cut ({:?})",
        started.elapsed()
    );
    assert_eq!(split_answer(&answer).0, 400, "{answer}");
    drop(reader);
    let _ = dripping.join();

    // A client that hangs up mid-stream: its session ends and is freed.
    let body = r#"{"prompt":"1, 2, 3, 4, 5,","temperature":0,"max_tokens":400,"stream":true}"#;
    let mut s = std::net::TcpStream::connect(&http).unwrap();
    s.write_all(&request("POST", "/v1/completions", &[&auth()], body))
        .unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    let mut chunks = 0;
    while chunks < 4 {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("data: ") => chunks += 1,
            Some(Ok(_)) => {}
            other => panic!("the stream ended early: {other:?}"),
        }
    }
    drop(lines);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pool_json(&http);
        let cancelled = metric(&http, "potluck_failures_total{kind=\"cancelled\"}");
        if p["sessions"].as_array().is_some_and(|s| s.is_empty()) && cancelled >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session was never freed: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        metric(&http, "potluck_tokens_out_total") < 400.0,
        "the abandoned session ran to the end"
    );

    // And the server still serves, whole and streamed alike.
    let (status, v) = post(&http, chat, good);
    assert_eq!(status, 200, "{v}");
    let whole = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole, "The capital of Japan is Tokyo.");
    let streamed = good.replace(
        "\"max_tokens\":12",
        "\"max_tokens\":12,\"stream\":true,\"stream_options\":{\"include_usage\":true}",
    );
    let raw = raw_http(&http, &request("POST", chat, &[&auth()], &streamed));
    let (status, body) = split_answer(&raw);
    assert_eq!(status, 200, "{raw}");
    let (events, done) = sse_events(body);
    assert!(done, "no [DONE]: {body}");
    assert_eq!(streamed_text(&events), whole);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let last = events.last().unwrap();
    assert_eq!(last["usage"], v["usage"], "{last}");
    let finish = &events[events.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, "stop");

    // Metrics and the pool JSON saw it all.
    assert!(metric(&http, "potluck_tokens_in_total") > 0.0);
    assert!(metric(&http, "potluck_time_to_first_token_seconds_count") >= 2.0);
    assert!(metric(&http, "potluck_checks_total{kind=\"verified\"}") > 0.0);
    let p = pool_json(&http);
    assert_eq!(p["peers"].as_array().map(Vec::len), Some(1), "{p}");
    assert_eq!(p["peers"][0]["status"], "serving", "{p}");
    assert_eq!(p["plan"]["spans"][0]["end"], 30, "{p}");
}

#[test]
fn sixty_four_streaming_clients_at_once_all_complete_with_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, _node, http) = common::small_pool(dir.path(), &[]);
    let body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "temperature": 0, "max_tokens": 8, "stream": true})
    .to_string();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (http, body) = (http.clone(), body.clone());
            std::thread::spawn(move || {
                let raw = raw_http(&http, &request("POST", "/v1/chat/completions", &[], &body));
                let (status, body) = split_answer(&raw);
                assert_eq!(status, 200, "{raw}");
                let (events, done) = sse_events(body);
                assert!(done, "a stream ended without [DONE]: {body}");
                assert!(
                    events.iter().all(|e| e.get("error").is_none()),
                    "a stream failed: {body}"
                );
                streamed_text(&events)
            })
        })
        .collect();
    let texts: Vec<String> = clients
        .into_iter()
        .map(|c| c.join().expect("a client failed"))
        .collect();
    assert!(!texts[0].is_empty());
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:?}");
    assert_eq!(metric(&http, "potluck_sessions "), 0.0);
}

#[test]
fn connections_and_each_keys_requests_in_flight_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, _, http) = common::coordinator(
        dir.path(),
        &[
            "--api-key",
            KEY,
            "--api-key",
            "sk-another-key",
            "--http-header-timeout",
            "5",
            "--http-max-connections",
            "3",
            "--max-requests-per-key",
            "1",
            "--embedding-model",
            "none",
        ],
    );
    let models = |key: &str| {
        let raw = raw_http(
            &http,
            &request(
                "GET",
                "/v1/models",
                &[&format!("Authorization: Bearer {key}")],
                "",
            ),
        );
        let (status, body) = split_answer(&raw);
        (status, body.to_string())
    };
    assert_eq!(models(KEY).0, 200);

    // Six idle connections at a cap of three: those past the cap are closed at once,
    // unanswered (one more may be, while the request above still holds its slot), and the
    // rest stay open until the header timeout.
    let idle: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(&http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut b = [0u8; 1];
            matches!((&**s).read(&mut b), Ok(0))
        })
        .count();
    assert!(
        (3..6).contains(&closed),
        "{closed} of 6 closed at a cap of 3"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(models(KEY).0, 200, "slots come back when connections end");

    // A request whose body dawdles holds its key's one slot: the key's next request gets
    // 429 while it lasts, another key's is served, and the slot comes back after it.
    let mut slow = std::net::TcpStream::connect(&http).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\n{}\r\nContent-Length: 100\r\n\r\n{{",
        auth()
    );
    slow.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = models(KEY);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_concurrent_requests"), "{body}");
    assert_eq!(models("sk-another-key").0, 200);
    slow.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert_eq!(split_answer(&answer).0, 400, "{answer}");
    assert_eq!(models(KEY).0, 200);
}

#[test]
fn the_responses_api_answers_as_chat_does_whole_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, _node, http) = common::small_pool(dir.path(), &[]);
    let chat = common::post_json(
        &http,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "What is the capital of Japan?"}],
                "temperature": 0, "max_tokens": 12}),
    )
    .1;
    let want = chat["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let ask = json!({"instructions": "Answer briefly.", "temperature": 0,
                     "max_output_tokens": 12,
                     "input": [{"type": "message", "role": "user",
                                "content": [{"type": "input_text",
                                             "text": "What is the capital of Japan?"}]}]});
    let (status, v) = common::post_json(&http, "/v1/responses", &ask);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "response", "{v}");
    assert!(
        v["id"].as_str().unwrap_or_default().starts_with("resp_"),
        "{v}"
    );
    let message = &v["output"][0];
    assert_eq!(
        (&message["type"], &message["role"]),
        (&json!("message"), &json!("assistant"))
    );
    assert_eq!(message["content"][0]["type"], "output_text", "{v}");
    assert_eq!(message["content"][0]["text"], want.as_str(), "{v}");
    let finished = chat["choices"][0]["finish_reason"] == "stop";
    let status_word = if finished { "completed" } else { "incomplete" };
    assert_eq!(v["status"], status_word, "{v}");
    assert_eq!(
        v["usage"]["output_tokens"], chat["usage"]["completion_tokens"],
        "{v}"
    );
    assert_eq!(
        v["usage"]["input_tokens"], chat["usage"]["prompt_tokens"],
        "{v}"
    );

    // Streamed: typed events in order, numbered, whose deltas make the same text.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let raw = raw_http(
        &http,
        &request("POST", "/v1/responses", &[], &streamed.to_string()),
    );
    let (status, body) = split_answer(&raw);
    assert_eq!(status, 200, "{raw}");
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    let (events, done) = sse_events(body);
    assert!(!done, "the Responses API sends no [DONE]");
    assert_eq!(names.len(), events.len(), "{body}");
    for (i, (name, e)) in names.iter().zip(&events).enumerate() {
        assert_eq!(e["type"], *name, "{e}");
        assert_eq!(e["sequence_number"], i, "{e}");
    }
    let last = if finished {
        "response.completed"
    } else {
        "response.incomplete"
    };
    assert_eq!(
        names.first().copied(),
        Some("response.created"),
        "{names:?}"
    );
    assert_eq!(names.last().copied(), Some(last), "{names:?}");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(text, want);
    let end = events.last().unwrap();
    assert_eq!(
        end["response"]["output"][0]["content"][0]["text"],
        want.as_str(),
        "{end}"
    );
}
