//! Members of a pool with real processes: API keys map to members from the operator's
//! members file; a member over its daily quota or its rate gets a 429 with Retry-After while
//! the others are served, keys are checked, and the dashboard shows who used what.

mod common;

use common::{raw_http, request, small_pool, split_answer};
use serde_json::{json, Value};

/// `method path` with `key` as bearer token: status, headers and body.
fn call(
    http: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String, Value) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    let raw = raw_http(http, &request(method, path, &headers, body));
    let (status, rest) = split_answer(&raw);
    let head = raw
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let json = serde_json::from_str(rest).unwrap_or(Value::Null);
    (status, head, json)
}

fn chat(http: &str, key: &str) -> (u16, String, Value) {
    let body = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0});
    call(
        http,
        "POST",
        "/v1/chat/completions",
        Some(key),
        &body.to_string(),
    )
}

#[test]
fn members_over_quota_or_rate_get_429_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let members = dir.path().join("members.json");
    let list = json!({"members": [
        {"name": "light", "api_key": "light-key-1", "tokens_per_day": 10},
        {"name": "heavy", "api_key": "heavy-key-1", "weight": 2},
        {"name": "hasty", "api_key": "hasty-key-1", "requests_per_minute": 2},
        {"name": "owner", "api_key": "owner-key-1"},
        {"name": "snoop", "api_key": "snoop-key-1"},
        {"name": "boss", "api_key": "boss-key-1", "admin": true},
    ]});
    std::fs::write(&members, list.to_string()).unwrap();
    let (_coord, _node, http) = small_pool(
        dir.path(),
        &[
            "--members",
            members.to_str().unwrap(),
            "--embedding-model",
            "none",
        ],
    );

    // Keys are required and checked.
    assert_eq!(call(&http, "GET", "/v1/models", None, "").0, 401);
    assert_eq!(
        call(&http, "GET", "/v1/models", Some("nobody-key"), "").0,
        401
    );

    // The light member's first request is served; it used its day's tokens.
    let (status, _, answer) = chat(&http, "light-key-1");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["usage"]["total_tokens"].as_u64().unwrap() > 10,
        "{answer}"
    );
    let (status, head, answer) = chat(&http, "light-key-1");
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
    assert!(head.contains("retry-after: "), "{head}");
    // Others are served meanwhile.
    let (status, _, answer) = chat(&http, "heavy-key-1");
    assert_eq!(status, 200, "{answer}");

    // The hasty member gets two requests a minute.
    for _ in 0..2 {
        assert_eq!(
            call(&http, "GET", "/v1/models", Some("hasty-key-1"), "").0,
            200
        );
    }
    let (status, head, answer) = call(&http, "GET", "/v1/models", Some("hasty-key-1"), "");
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "rate_limit_exceeded", "{answer}");
    assert!(head.contains("retry-after: "), "{head}");
    assert_eq!(
        call(&http, "GET", "/v1/models", Some("heavy-key-1"), "").0,
        200
    );

    // Others' names and usage are for admins: without a key the dashboard shows totals,
    // a member sees its own row, an admin sees everyone's.
    let (_, _, open) = call(&http, "GET", "/api/pool", None, "");
    assert_eq!(open["members"].as_array().map(Vec::len), Some(0), "{open}");
    assert!(!open.to_string().contains("heavy"), "{open}");
    assert!(
        open["member_totals"]["requests"].as_u64() >= Some(5),
        "{open}"
    );
    let (_, _, own) = call(&http, "GET", "/api/pool", Some("light-key-1"), "");
    let names: Vec<&str> = own["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["light"], "{own}");
    let (_, _, pool) = call(&http, "GET", "/api/pool", Some("boss-key-1"), "");
    let row = |name: &str| {
        pool["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {pool}"))
    };
    let light = row("light");
    assert_eq!(
        (light["requests"].as_u64(), light["limited"].as_u64()),
        (Some(1), Some(1)),
        "{light}"
    );
    assert!(light["tokens_today"].as_u64().unwrap() > 10, "{light}");
    let heavy = row("heavy");
    assert_eq!(heavy["requests"].as_u64(), Some(2), "{heavy}");
    assert_eq!(heavy["weight"].as_f64(), Some(2.0), "{heavy}");
    assert_eq!(row("hasty")["limited"].as_u64(), Some(1));

    // A member's files and batches are its own: another member's key finds none of them.
    let input = dir.path().join("mine.jsonl");
    let line = json!({"custom_id": "secret", "body": {"messages": [{"role": "user", "content": "my private prompt"}], "max_tokens": 2}});
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let url = format!("http://{http}");
    let batch = common::potluck_ok(&[
        "batch",
        "submit",
        input.to_str().unwrap(),
        "--kind",
        "chat",
        "--coordinator",
        &url,
        "--api-key",
        "owner-key-1",
    ]);
    let (status, _, b) = call(
        &http,
        "GET",
        &format!("/v1/batches/{batch}"),
        Some("owner-key-1"),
        "",
    );
    assert_eq!(status, 200, "{b}");
    let file = b["input_file_id"].as_str().unwrap().to_string();
    let output = format!("file-out-{batch}");
    for (method, path) in [
        ("GET", format!("/v1/batches/{batch}")),
        ("POST", format!("/v1/batches/{batch}/cancel")),
        ("GET", format!("/v1/files/{file}")),
        ("GET", format!("/v1/files/{file}/content")),
        ("GET", format!("/v1/files/{output}/content")),
    ] {
        let (status, _, v) = call(&http, method, &path, Some("snoop-key-1"), "");
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    let create = json!({"input_file_id": file, "endpoint": "/v1/chat/completions"}).to_string();
    let (status, _, v) = call(&http, "POST", "/v1/batches", Some("snoop-key-1"), &create);
    assert_eq!(status, 404, "{v}");
    let (_, _, listed) = call(&http, "GET", "/v1/batches", Some("snoop-key-1"), "");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "{listed}");
    let (_, _, listed) = call(&http, "GET", "/v1/batches", Some("owner-key-1"), "");
    assert_eq!(listed["data"][0]["id"], batch.as_str(), "{listed}");
    let (status, _, content) = call(
        &http,
        "GET",
        &format!("/v1/files/{file}"),
        Some("owner-key-1"),
        "",
    );
    assert_eq!(status, 200, "{content}");
    // The keyless dashboard names no batch or file.
    let raw = raw_http(&http, &request("GET", "/api/pool", &[], ""));
    assert!(!raw.contains(&batch) && !raw.contains(&file), "{raw}");
}
