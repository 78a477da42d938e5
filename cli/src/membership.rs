//! `potluck pool create|invite|revoke|join|key`: a private pool's key and its membership
//! certificates. The pool key lives in the pool's folder (`identity.key`, mode 0600) beside
//! `pool.json`, which counts serials and lists revocations; a member stores the certificates
//! it was given in its own data folder.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use potluck_net::gate::PoolMembership;
use potluck_protocol::hex::{from_hex, to_hex};
use potluck_protocol::membership::{
    Certificate, Membership, PoolRecord, Revocation, Role, MAX_POOL_NAME, POOL_RECORD_FILE,
};
use potluck_protocol::signed::PublicKey;
use std::path::{Path, PathBuf};

/// Folder, inside a member's data folder, holding its certificates.
pub const CERT_DIR: &str = "membership";

/// Pool administration commands.
#[derive(Subcommand)]
pub enum MembershipCommand {
    /// Make a private pool: its key and its id (the key's public half).
    Create {
        /// The pool's name.
        name: String,
        /// Where the pool key is kept (default: $XDG_DATA_HOME/potluck/pools/NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Sign a membership certificate for a member's key.
    Invite {
        /// The pool's name.
        #[arg(long)]
        pool: String,
        /// The member's key, hex (`potluck pool key` prints a node's).
        #[arg(long)]
        member_key: String,
        /// member, trusted (may see text: first and last stages where the pool keeps those
        /// to trusted members) or admin.
        #[arg(long, default_value = "member")]
        role: String,
        /// How long it holds, e.g. 30d, 12h, 90m or seconds; default: until revoked.
        #[arg(long)]
        expires: Option<String>,
        /// Who runs the member's machine (a person, a lab): all of one operator's machines
        /// count as one voice in batch quorums and checks; without it, the machine's
        /// network does.
        #[arg(long)]
        operator: Option<String>,
        /// The pool's folder (default: $XDG_DATA_HOME/potluck/pools/NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Withdraw a certificate by its serial.
    Revoke {
        /// The pool's name.
        #[arg(long)]
        pool: String,
        /// The certificate's serial (`invite` prints it).
        #[arg(long)]
        serial: u64,
        /// The pool's folder.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Store a certificate this machine was given, after checking it names this machine's key.
    Join {
        /// The certificate (its text, or a file holding it).
        cert: String,
        /// This machine's data folder (default: the node's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print this machine's member key (its identity's public half, hex).
    Key {
        /// The data folder (default: the node's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn now() -> u64 {
    potluck_net::swarm::unix_now()
}

fn pool_dir(name: &str, dir: Option<&Path>) -> Result<PathBuf> {
    match dir {
        Some(d) => Ok(d.to_path_buf()),
        None => Ok(crate::data_dir::default_data_dir("pools")?.join(name)),
    }
}

/// `dir`, or the node's default data folder.
fn member_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    dir.map_or_else(|| crate::data_dir::default_data_dir("node"), Ok)
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join(POOL_RECORD_FILE)
}

/// Reads a pool's record.
pub fn load_record(dir: &Path) -> Result<PoolRecord> {
    let path = record_path(dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (was the pool created here?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

fn save_record(dir: &Path, r: &PoolRecord) -> Result<()> {
    let tmp = dir.join("pool.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(r)?)?;
    std::fs::rename(&tmp, record_path(dir))?;
    Ok(())
}

/// Parses `30d`, `12h`, `90m`, `45s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("'{s}' is not a duration like 30d, 12h, 90m or 45s"))?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("'{s}': the unit must be s, m, h or d"),
    };
    n.checked_mul(unit)
        .filter(|&secs| secs > 0)
        .ok_or_else(|| anyhow!("'{s}' must be a positive duration"))
}

fn parse_key(hex: &str) -> Result<PublicKey> {
    let bytes: [u8; 32] = from_hex(hex.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("a key is 64 hex digits"))?;
    let key = PublicKey(bytes);
    potluck_net::swarm::peer_id_of(&key).ok_or_else(|| anyhow!("{hex} is not an ed25519 key"))?;
    Ok(key)
}

/// Which pool `--pool NAME` names for a daemon keeping its identity in `data_dir`, and the
/// pool folder to watch for revocations if this machine holds the pool key:
/// - a private pool whose folder is here (`pool_dir`, or with `default_folder` the default
///   one for NAME): the daemon signs itself a certificate with the pool key (serial 0,
///   admin), and watches the folder for revocations;
/// - a private pool this machine joined (`potluck pool join`), by name or id: its certificate;
/// - a pool id (64 hex digits) with no certificate here: the daemon runs, and is refused;
/// - anything else names a public pool.
pub fn resolve(
    pool: &str,
    pool_dir_flag: Option<&Path>,
    default_folder: bool,
    data_dir: &Path,
) -> Result<(PoolMembership, Option<PathBuf>)> {
    let me = potluck_net::identity::load_or_create(data_dir)?.public();
    let owned = match pool_dir_flag {
        Some(d) => {
            if !record_path(d).exists() {
                bail!(
                    "{} holds no pool (potluck pool create makes one)",
                    d.display()
                );
            }
            Some(d.to_path_buf())
        }
        None if !default_folder => None,
        None => valid_name(pool)
            .ok()
            .and_then(|()| pool_dir(pool, None).ok())
            .filter(|d| record_path(d).exists()),
    };
    if let Some(dir) = owned {
        let record = load_record(&dir)?;
        let key = potluck_net::identity::load_or_create(&dir)?;
        if to_hex(&key.public().0) != record.id {
            bail!("{}: the pool key does not match pool.json", dir.display());
        }
        let certificate = Certificate::issue(
            &key,
            Membership {
                pool: key.public(),
                pool_name: record.name.clone(),
                member: me,
                role: Role::Admin,
                issued_at: now(),
                expires_at: None,
                serial: 0,
                operator: None,
            },
        )?;
        let membership = PoolMembership::Private {
            pool: key.public(),
            name: record.name,
            certificate: Some(Box::new(certificate)),
        };
        return Ok((membership, Some(dir)));
    }
    let held = held_certificates(data_dir)?;
    let mut matching = held
        .into_iter()
        .filter(|c| c.body.pool_name == pool || to_hex(&c.body.pool.0) == pool);
    if let Some(cert) = matching.next() {
        if matching.next().is_some() {
            bail!("certificates of several pools named {pool} are held here; pass the pool's id");
        }
        if cert.body.member != me {
            bail!("the certificate for pool {pool} names another key than this data folder's");
        }
        let membership = PoolMembership::Private {
            pool: cert.body.pool,
            name: cert.body.pool_name.clone(),
            certificate: Some(Box::new(cert)),
        };
        return Ok((membership, None));
    }
    if let Ok(id) = parse_key(pool) {
        tracing::warn!(
            "no certificate for pool {pool} in {}; its peers will refuse this one (potluck pool join)",
            data_dir.join(CERT_DIR).display()
        );
        let membership = PoolMembership::Private {
            pool: id,
            name: pool.chars().take(8).collect(),
            certificate: None,
        };
        return Ok((membership, None));
    }
    valid_name(pool)?;
    Ok((PoolMembership::Public { name: pool.into() }, None))
}

/// Checks a pool name: 1 to 64 letters, digits, `.`, `_` or `-` (it becomes part of topic
/// and protocol names).
fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POOL_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!("a pool name has 1 to {MAX_POOL_NAME} letters, digits, '.', '_' or '-'");
    }
    Ok(())
}

/// The certificates stored in `data_dir` by `potluck pool join` (unreadable ones are skipped
/// with a warning).
fn held_certificates(data_dir: &Path) -> Result<Vec<Certificate>> {
    let folder = data_dir.join(CERT_DIR);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "cert") {
            continue;
        }
        match read_bounded(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| Certificate::from_text(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => out.push(c),
            Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
        }
    }
    Ok(out)
}

/// A certificate file's text, read no further than any certificate could reach (a longer
/// file is then refused by [`Certificate::from_text`]).
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(8 << 10)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Runs a pool administration command.
pub fn run(cmd: MembershipCommand) -> Result<()> {
    match cmd {
        MembershipCommand::Create { name, dir } => {
            valid_name(&name)?;
            let dir = pool_dir(&name, dir.as_deref())?;
            if record_path(&dir).exists() {
                bail!("{} already holds a pool", dir.display());
            }
            let key = potluck_net::identity::load_or_create(&dir)?;
            let record = PoolRecord {
                name: name.clone(),
                id: to_hex(&key.public().0),
                next_serial: 1,
                revocations: Vec::new(),
            };
            save_record(&dir, &record)?;
            eprintln!(
                "pool {name} created in {}; keep its identity.key secret",
                dir.display()
            );
            println!("{}", record.id);
            Ok(())
        }
        MembershipCommand::Invite {
            pool,
            member_key,
            role,
            expires,
            operator,
            dir,
        } => {
            let dir = pool_dir(&pool, dir.as_deref())?;
            let mut record = load_record(&dir)?;
            let key = potluck_net::identity::load_or_create(&dir)?;
            let role = match role.as_str() {
                "member" => Role::Member,
                "admin" => Role::Admin,
                "trusted" => Role::Trusted,
                other => bail!("--role must be member, trusted or admin, not {other}"),
            };
            let issued_at = now();
            let expires_at = expires
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .map(|d| issued_at.saturating_add(d));
            let serial = record.next_serial;
            let cert = Certificate::issue(
                &key,
                Membership {
                    pool: key.public(),
                    pool_name: record.name.clone(),
                    member: parse_key(&member_key)?,
                    role,
                    issued_at,
                    expires_at,
                    serial,
                    operator,
                },
            )?;
            record.next_serial += 1;
            save_record(&dir, &record)?;
            eprintln!("certificate {serial} for {member_key} ({})", role.as_str());
            println!("{}", cert.to_text()?);
            Ok(())
        }
        MembershipCommand::Revoke { pool, serial, dir } => {
            let dir = pool_dir(&pool, dir.as_deref())?;
            let mut record = load_record(&dir)?;
            if serial == 0 || serial >= record.next_serial {
                bail!("pool {pool} never issued certificate {serial}");
            }
            if record.revocations.iter().any(|r| r.serial == serial) {
                bail!("certificate {serial} is already revoked");
            }
            let key = potluck_net::identity::load_or_create(&dir)?;
            record
                .revocations
                .push(Revocation::issue(&key, serial, now())?);
            save_record(&dir, &record)?;
            println!("certificate {serial} of pool {pool} revoked");
            Ok(())
        }
        MembershipCommand::Join { cert, data_dir } => {
            let text = match read_bounded(Path::new(&cert)) {
                Ok(t) => t,
                Err(_) => cert,
            };
            let cert = Certificate::from_text(&text)?;
            let dir = member_dir(data_dir)?;
            let me = potluck_net::identity::load_or_create(&dir)?.public();
            let role = cert.admits(&cert.body.pool, &me, now(), &[])?;
            let folder = dir.join(CERT_DIR);
            std::fs::create_dir_all(&folder)?;
            let path = folder.join(format!("{}.cert", to_hex(&cert.body.pool.0)));
            std::fs::write(&path, cert.to_text()? + "\n")?;
            println!(
                "joined pool {} ({}) as {}; certificate in {}",
                cert.body.pool_name,
                to_hex(&cert.body.pool.0),
                role.as_str(),
                path.display()
            );
            Ok(())
        }
        MembershipCommand::Key { data_dir } => {
            let dir = member_dir(data_dir)?;
            let key = potluck_net::identity::load_or_create(&dir)?;
            println!("{}", to_hex(&key.public().0));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("45").unwrap(), 45);
        assert_eq!(parse_duration("90m").unwrap(), 5400);
        assert_eq!(parse_duration("30d").unwrap(), 2_592_000);
        for bad in ["", "d", "0", "5w", "-3h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
