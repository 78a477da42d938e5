//! Chat templates rendered apart from the coordinator. A template comes from the model file,
//! and fuel bounds its instructions but not its memory: a few string doublings in a loop ask
//! for terabytes, and an allocation that fails aborts the process that makes it. So renders
//! run in worker processes (`potluck` started with [`WORKER_ARG`]) that cap their own address
//! space: a template that runs out of memory kills its worker, its request gets a clear
//! error, and the coordinator goes on serving. Workers are kept and reused; one that dies is
//! replaced on the next render.

use potluck_engine::chat::{ChatMessage, RenderJob};
use potluck_engine::error::EngineError;
use potluck_engine::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The argument that makes `potluck` a render worker.
pub const WORKER_ARG: &str = "__render-chat-templates";
/// Address space a worker allows itself.
pub const WORKER_MEMORY: u64 = 2 << 30;
/// Idle workers kept for the next renders.
const KEPT: usize = 4;
/// Longest answer line read back (the output cap bounds a render far below this).
const MAX_ANSWER: u64 = 256 << 20;

/// A worker's answer to one job.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Text(String),
    Error(String),
}

struct Worker {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(exe: &PathBuf) -> std::io::Result<Self> {
        let mut child = Command::new(exe)
            .arg(WORKER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(std::io::Error::other("a worker without pipes"));
        };
        Ok(Self {
            child,
            input,
            output: BufReader::new(output),
        })
    }

    /// Whether the worker is still running (one killed while idle is not).
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `job`; an error means the worker was gone before it read it.
    fn send(&mut self, job: &RenderJob) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(job).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.input.write_all(&line)?;
        self.input.flush()
    }

    /// Reads the answer to the job sent; an error means the worker died rendering it.
    fn answer(&mut self) -> std::io::Result<Answer> {
        let mut answer = Vec::new();
        (&mut self.output)
            .take(MAX_ANSWER)
            .read_until(b'\n', &mut answer)?;
        if answer.last() != Some(&b'\n') {
            return Err(std::io::Error::other("the worker stopped mid-answer"));
        }
        serde_json::from_slice(&answer).map_err(std::io::Error::other)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Workers {
    exe: PathBuf,
    idle: Mutex<Vec<Worker>>,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

/// Renders chat templates in worker processes started from `exe` (the `potluck` binary)
/// from now on; without it they render in this process.
pub fn use_workers(exe: PathBuf) {
    let _ = WORKERS.set(Workers {
        exe,
        idle: Mutex::new(Vec::new()),
    });
}

/// Renders `job` in a worker when workers are in use, else here.
pub fn render(job: &RenderJob) -> Result<String, EngineError> {
    let Some(workers) = WORKERS.get() else {
        return job.render();
    };
    let spawn = || {
        Worker::spawn(&workers.exe)
            .map_err(|e| EngineError::Template(format!("could not start a template renderer: {e}")))
    };
    let kept = workers.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let mut worker = match kept.and_then(|mut w| w.alive().then_some(w)) {
        Some(w) => w,
        None => spawn()?,
    };
    if worker.send(job).is_err() {
        // A kept worker that died idle (killed from outside) never saw the job: a fresh
        // one runs it.
        worker = spawn()?;
        worker.send(job).map_err(|e| {
            EngineError::Template(format!(
                "the template renderer stopped before it read the job: {e}"
            ))
        })?;
    }
    match worker.answer() {
        Ok(answer) => {
            let mut idle = workers.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < KEPT {
                idle.push(worker);
            }
            match answer {
                Answer::Text(t) => Ok(t),
                Answer::Error(e) => Err(EngineError::Template(e)),
            }
        }
        Err(e) => {
            tracing::warn!("a chat template's render killed its worker: {e}");
            Err(EngineError::Template(format!(
                "the chat template used more than {} MiB of memory, or its render crashed",
                WORKER_MEMORY >> 20
            )))
        }
    }
}

/// Token ids of `messages` in `tok`'s chat template, rendered by [`render`]: what a chat
/// request prefills.
pub fn chat_prompt_ids(
    tok: &TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, EngineError> {
    tok.encode(&render(&RenderJob::chat(tok, messages))?)
}

/// A worker's loop: one job per line of `input`, one answer per line of `output`, until
/// `input` ends. The caller caps the process's memory first.
pub fn serve(input: impl BufRead, mut output: impl Write) -> std::io::Result<()> {
    for line in input.lines() {
        let answer = match serde_json::from_str::<RenderJob>(&line?) {
            Ok(job) => match job.render() {
                Ok(text) => Answer::Text(text),
                Err(e) => Answer::Error(e.to_string()),
            },
            Err(e) => Answer::Error(format!("not a render job: {e}")),
        };
        let mut bytes = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        output.write_all(&bytes)?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_answers_each_job_on_its_line() {
        let job = |template: &str| RenderJob {
            template: Some(template.into()),
            messages: vec![ChatMessage::new("user", "hi\nthere")],
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            add_generation_prompt: true,
        };
        let mut input = Vec::new();
        for j in [
            job("{{ bos_token }}{{ messages[0]['content'] }}"),
            job("{% for %}"),
        ] {
            input.extend(serde_json::to_vec(&j).unwrap());
            input.push(b'\n');
        }
        input.extend(b"nonsense\n");
        let mut out = Vec::new();
        serve(&input[..], &mut out).unwrap();
        let answers: Vec<Answer> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert!(matches!(&answers[0], Answer::Text(t) if t == "<s>hi\nthere"));
        assert!(matches!(&answers[1], Answer::Error(_)));
        assert!(matches!(&answers[2], Answer::Error(e) if e.contains("not a render job")));
        assert_eq!(answers.len(), 3);
    }
}
