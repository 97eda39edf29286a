//! `netdisk admin`: the server operator's commands, run on the server's machine against
//! its data root. They edit `users.xlsx` under its lock file, so they work whether or
//! not a server is running; a running server notices the change on its next lookup.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::names::check_user_name;
use crate::scram::{Verifier, DEFAULT_ITERATIONS};
use crate::users::{revocation_time, UserRecord, UserTable, UserTableError};

/// The folders that hold a user's data, each as ROOT/AREA/USER.
pub const USER_AREAS: [&str; 4] = ["files", "partial", "meta", "versions"];

/// Manage users on this machine's server (edits ROOT/users.xlsx; a running server
/// notices within a second)
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Data folder of the server
    #[arg(long, env = "NETDISK_ROOT", default_value = "./netdisk-data")]
    root: PathBuf,
    /// The servers' bucket, s3://BUCKET[/PREFIX], as given to `serve --storage`: edit the
    /// users.xlsx there (endpoint, region and keys from the AWS_* variables)
    #[cfg(feature = "s3")]
    #[arg(long, env = "NETDISK_STORAGE", value_name = "URL")]
    storage: Option<String>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(clap::Subcommand)]
enum AdminCommand {
    /// List users: name, registered, last login, disabled
    Users {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Refuse the user's logins and end their sessions
    Disable {
        /// User name, as in `netdisk admin users`
        user: String,
    },
    /// Allow the user to log in again (ended sessions stay ended)
    Enable {
        /// User name, as in `netdisk admin users`
        user: String,
    },
    /// Remove the user; their files are moved to ROOT/deleted/USER-TIMESTAMP/
    Delete {
        /// User name, as in `netdisk admin users`
        user: String,
    },
    /// Give the user a random one-time password (printed once) and end their sessions
    ResetPassword {
        /// User name, as in `netdisk admin users`
        user: String,
    },
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let root = &args.root;
    #[cfg(feature = "s3")]
    if let Some(url) = &args.storage {
        let table = open_bucket_table(url)?;
        return run_on(table, args.command, None);
    }
    let table_path = root.join("users.xlsx");
    // Opening would create an empty table: a mistyped --root must not look like "no users".
    if !table_path.is_file() {
        bail!(
            "no user table at {}: is --root (or NETDISK_ROOT) the server's data folder?",
            table_path.display()
        );
    }
    run_on(UserTable::open(&table_path)?, args.command, Some(root))
}

/// The users.xlsx several servers share in a bucket; refused if there is none (a mistyped
/// URL must not look like "no users").
#[cfg(feature = "s3")]
fn open_bucket_table(url: &str) -> anyhow::Result<UserTable> {
    use crate::shared_state::{BucketTable, StateBucket};
    use crate::users::TableStore;
    let config = crate::objstore::ObjectStoreConfig::from_url(url)?;
    let store = BucketTable::new(StateBucket::open(&config)?);
    if store.version()?.is_none() {
        bail!(
            "no user table at {}: is --storage the servers' bucket and prefix?",
            store.location().display()
        );
    }
    Ok(UserTable::open_store(Box::new(store))?)
}

/// `root`: the data folder whose files `delete` moves aside (`None`: the files are in the
/// bucket, where a new account of the same name has them moved aside when it registers).
fn run_on(table: UserTable, command: AdminCommand, root: Option<&Path>) -> anyhow::Result<()> {
    let known = |e: UserTableError, user: &str| match e {
        UserTableError::NoSuchUser => anyhow::anyhow!("no such user: {user}"),
        other => anyhow::Error::new(other),
    };
    match command {
        AdminCommand::Users { json } => {
            let users = table.list();
            if json {
                let rows: Vec<_> = users.iter().map(user_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_users(&users);
            }
        }
        AdminCommand::Disable { user } => {
            // Disabled first: from that moment nothing of theirs is accepted.
            table
                .set_disabled(&user, true)
                .map_err(|e| known(e, &user))?;
            table
                .revoke_sessions(&user, revocation_time())
                .map_err(|e| known(e, &user))?;
            println!("disabled {user}; their sessions are ended");
        }
        AdminCommand::Enable { user } => {
            table
                .set_disabled(&user, false)
                .map_err(|e| known(e, &user))?;
            println!("enabled {user}; they can log in with their password");
        }
        AdminCommand::Delete { user } => {
            // The row goes first, so logins stop before the files move.
            table.remove(&user).map_err(|e| known(e, &user))?;
            let Some(root) = root else {
                println!("deleted {user}; their files stay in the bucket until the name is registered again (then they are moved aside)");
                return Ok(());
            };
            match move_user_data_aside(root, &user)
                .with_context(|| format!("removed {user} from the table, but"))?
            {
                Some(place) => println!("deleted {user}; their files are in {}", place.display()),
                None => println!("deleted {user}; they had no files"),
            }
        }
        AdminCommand::ResetPassword { user } => {
            if table.get(&user).is_none() {
                bail!("no such user: {user}");
            }
            let password = one_time_password()?;
            let verifier = Verifier::new(&password, DEFAULT_ITERATIONS);
            table
                .set_verifier(&user, verifier, Some(revocation_time()))
                .map_err(|e| known(e, &user))?;
            eprintln!(
                "one-time password for {user} (shown only now; their sessions are ended). \
                 They should log in with it and change it with `netdisk passwd`:"
            );
            println!("{password}");
        }
    }
    Ok(())
}

fn user_json(user: &UserRecord) -> serde_json::Value {
    serde_json::json!({
        "name": user.name,
        "registered_at": user.registered_at,
        "last_login": user.last_login,
        "disabled": user.disabled,
        "sessions_after": user.sessions_after,
    })
}

fn print_users(users: &[UserRecord]) {
    let width = users.iter().map(|u| u.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<width$}  {:<20}  {:<20}  disabled",
        "name", "registered", "last login"
    );
    for user in users {
        println!(
            "{:<width$}  {:<20}  {:<20}  {}",
            user.name,
            user.registered_at,
            user.last_login.as_deref().unwrap_or("-"),
            if user.disabled { "yes" } else { "" }
        );
    }
}

/// 120 random bits as 20 URL-safe characters: easy to copy, nothing to escape.
fn one_time_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 15];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Move ROOT/{files,partial,meta,versions}/USER to ROOT/deleted/USER-TIMESTAMP/AREA, so
/// nothing of a removed account is reachable under its name again. Returns the new
/// folder, or `None` if the user had no data. Each move is one rename (same file system).
pub fn move_user_data_aside(root: &Path, user: &str) -> std::io::Result<Option<PathBuf>> {
    // The name becomes a path component: never let it climb out of ROOT.
    check_user_name(user)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let present: Vec<&str> = USER_AREAS
        .into_iter()
        .filter(|area| root.join(area).join(user).symlink_metadata().is_ok())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let deleted = root.join("deleted");
    std::fs::create_dir_all(&deleted)?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .map_err(std::io::Error::other)?;
    // Two deletions of one name within a second get distinct folders.
    let mut target = deleted.join(format!("{user}-{stamp}"));
    let mut n = 1;
    while let Err(e) = std::fs::create_dir(&target) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        n += 1;
        target = deleted.join(format!("{user}-{stamp}-{n}"));
    }
    for area in present {
        std::fs::rename(root.join(area).join(user), target.join(area))?;
        crate::durable::sync_dir(&root.join(area))?;
    }
    crate::durable::sync_dir(&target)?;
    crate::durable::sync_dir(&deleted)?;
    Ok(Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_moves_aside_into_distinct_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(move_user_data_aside(root, "amy").unwrap(), None);
        for round in 0..2 {
            std::fs::create_dir_all(root.join("files/amy")).unwrap();
            std::fs::write(root.join("files/amy/a.txt"), format!("{round}")).unwrap();
            std::fs::create_dir_all(root.join("meta/amy")).unwrap();
            let place = move_user_data_aside(root, "amy").unwrap().unwrap();
            assert!(place.starts_with(root.join("deleted")));
            assert_eq!(
                std::fs::read_to_string(place.join("files/a.txt")).unwrap(),
                round.to_string()
            );
            assert!(place.join("meta").is_dir());
            assert!(!place.join("partial").exists());
            assert!(!root.join("files/amy").exists());
        }
        assert_eq!(std::fs::read_dir(root.join("deleted")).unwrap().count(), 2);
        assert!(move_user_data_aside(root, "../x").is_err());
    }
}
