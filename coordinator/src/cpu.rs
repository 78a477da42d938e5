//! CPU work a request brings (parsing a large body, a model file's chat template,
//! tokenizing), run off the async workers and a few at a time. On an async worker it would
//! stall every other request, since the runtime has only as many workers as cores. A plain
//! `spawn_blocking` per request would start a thread for each of a burst of clients, and
//! waiting clients must cost memory, not threads.

use std::sync::OnceLock;
use tokio::sync::Semaphore;

/// At most this many preparations run at once: one per core keeps the cores busy, and more
/// would only queue inside the OS scheduler as threads.
fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Runs `work` on a blocking thread once a permit is free; `None` if it panicked.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let _permit = permits().acquire().await.ok()?;
    tokio::task::spawn_blocking(work).await.ok()
}
