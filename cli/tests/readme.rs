//! The README's curl examples, run as written against a real pool (only the address is
//! changed), so they stay true.

mod common;

use std::process::Command;

/// The commands of the first `sh` block after `heading`, continuation lines joined.
fn examples(readme: &str, heading: &str) -> Vec<String> {
    let section = readme
        .split(heading)
        .nth(1)
        .expect("the README's API section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an sh block");
    block
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn the_readme_curl_examples_work_against_a_running_pool() {
    if !Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        common::missing("curl", "apt-get install curl (.ci/run does)");
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let commands = examples(&readme, "## The API and the dashboard");
    assert!(commands.len() >= 5, "{commands:?}");
    assert!(
        commands.iter().all(|c| c.starts_with("curl ")),
        "{commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_coord, _node, http) = common::small_pool(dir.path(), &[]);
    for cmd in &commands {
        let cmd = cmd.replace("127.0.0.1:8080", &http);
        let out = Command::new("sh").args(["-c", &cmd]).output().expect("sh");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.is_empty(), "{cmd}: {text}");
        let expect = if cmd.contains("\"stream\":true") {
            "data: [DONE]"
        } else if cmd.contains("capital of Japan") {
            "Tokyo"
        } else if cmd.contains("/v1/completions") {
            "Paris"
        } else if cmd.contains("/v1/models") {
            "smollm2-135m-instruct"
        } else if cmd.contains("/api/pool") {
            "\"status\":\"serving\""
        } else if cmd.contains("/metrics") {
            "potluck_tokens_out_total"
        } else {
            panic!("no check for {cmd}")
        };
        assert!(
            text.contains(expect),
            "{cmd}: expected {expect:?} in {text}"
        );
    }
}
