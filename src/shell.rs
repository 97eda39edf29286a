//! `netdisk shell`: the interactive prompt. One command per line, parsed like the command
//! line (shell quoting), on one connection logged in with the saved session; a connection
//! the server closed (restart, idle timeout) is replaced with the same session.
//!
//! The line editor (rustyline) runs on its own thread: reading a line blocks, and tab
//! completion asks the server for remote names from there, through the runtime, only while
//! no command uses the connection and within a short timeout.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{CommandFactory, Parser};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::history::FileHistory;
use rustyline::{CompletionType, Config, Editor};

use netdisk::client::Client;
use netdisk::config::{self, SavedLogin};
use netdisk::protocol::EntryType;
use netdisk::{scram, ErrorCode};

use crate::cli::{self, Command, Ctx, Remote};

/// One line of the shell, parsed like the command line.
#[derive(Parser)]
#[command(
    name = "netdisk",
    no_binary_name = true,
    disable_version_flag = true,
    disable_help_subcommand = true
)]
struct ShellLine {
    #[command(subcommand)]
    command: Command,
}

/// CLI commands that make no sense inside the shell.
const NOT_IN_SHELL: [&str; 3] = ["serve", "admin", "shell"];

/// The shell's own commands, with their help line.
const SHELL_COMMANDS: [(&str, &str); 5] = [
    (
        "lcd",
        "[DIR]  change the local folder used for relative local paths (default: home)",
    ),
    ("lpwd", "print the local folder"),
    (
        "help",
        "[COMMAND]  this list, or what COMMAND does and its flags",
    ),
    ("quit", "leave the shell (also exit, or Ctrl-D)"),
    ("exit", "leave the shell"),
];

const SESSION_EXPIRED: &str = "session expired: login again";

/// Longest wait for a remote listing while completing a name.
const COMPLETION_TIMEOUT: Duration = Duration::from_millis(1500);

/// The connection, shared with tab completion (which only takes it when it is free).
type Slot = Arc<tokio::sync::Mutex<Option<Client>>>;

/// Run the shell until quit or the end of input. `user`: log in with a password (`--user`)
/// instead of the saved login.
pub(crate) async fn run(remote: &Remote, user: Option<&str>) -> anyhow::Result<()> {
    let mut session = Session {
        remote,
        slot: Slot::default(),
        user: None,
        token: None,
        lost: false,
    };
    session.start(user).await?;
    let names = Arc::new(RemoteNames {
        slot: session.slot.clone(),
        runtime: tokio::runtime::Handle::current(),
        cache: Default::default(),
    });
    let mut lines = LineReader::start(names.clone())?;
    loop {
        let prompt = match &session.user {
            Some(user) => format!("netdisk {user}> "),
            None => "netdisk> ".to_string(),
        };
        let line = tokio::select! {
            line = lines.read(prompt) => line,
            // Only a signal from outside gets here: the editor reads Ctrl-C as a key.
            _ = interrupted() => return Ok(()),
        };
        let line = match line {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue, // Ctrl-C at the prompt: a new line
            Err(ReadlineError::Eof) => {
                if !std::io::stdin().is_terminal() {
                    eprintln!(); // after the prompt; on a terminal the editor did it
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let words = match shell_words::split(&line) {
            Ok(words) => words,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let result = match words.first().map(String::as_str) {
            None => Ok(()),
            Some("quit" | "exit") => return Ok(()),
            Some("help") => help(words.get(1), &mut session).await,
            Some("lcd") => lcd(words.get(1), remote),
            Some("lpwd") => std::env::current_dir()
                .map(|dir| println!("{}", dir.display()))
                .context("cannot read the local folder"),
            Some(_) => session.command(&words).await,
        };
        // A command may have changed what is there.
        names.forget();
        if let Err(e) = result {
            eprintln!("error: {}", cli::explain(&e).0);
        }
    }
}

/// The shell's connection and login.
struct Session<'a> {
    remote: &'a Remote,
    slot: Slot,
    user: Option<String>,
    /// This session's token, to log in again on a new connection.
    token: Option<String>,
    /// The connection broke (rather than being dropped on purpose): the next one says so.
    lost: bool,
}

impl Session<'_> {
    /// Connect and log in: with a password for `--user`, else with the saved login if any.
    async fn start(&mut self, user: Option<&str>) -> anyhow::Result<()> {
        let server = &self.remote.server;
        let mut client = self.remote.connect().await?;
        match user {
            Some(user) => {
                let password = cli::password(user)?;
                self.token = Some(client.login(user, &password).await?);
                self.user = Some(user.to_string());
            }
            None => {
                if let Some(saved) = config::load_login(server)? {
                    match client.login_with_token(&saved.token).await {
                        Ok(user) => {
                            self.user = Some(user);
                            self.token = Some(saved.token);
                        }
                        Err(e) if is_auth_failure(&e) => eprintln!("{SESSION_EXPIRED}"),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        *self.slot.lock().await = Some(client);
        match &self.user {
            Some(user) => eprintln!("connected to {server} as {user}; type help for the commands"),
            None => eprintln!("connected to {server}, not logged in; type help for the commands"),
        }
        Ok(())
    }

    /// Parse and run one command line; one lost connection is survived by commands that
    /// can run again (see [`retry_safe`]).
    async fn command(&mut self, words: &[String]) -> anyhow::Result<()> {
        let parse = || ShellLine::try_parse_from(words).map(|line| line.command);
        let command = match parse() {
            Ok(command) => command,
            Err(e) if e.kind() == clap::error::ErrorKind::InvalidSubcommand => {
                bail!("unknown command {}; type help", words[0])
            }
            Err(e) => {
                // --help, or a usage error: clap's text says it all.
                let _ = e.print();
                return Ok(());
            }
        };
        match command {
            Command::Serve(_) | Command::Admin(_) | Command::Shell => {
                bail!("{} is not available in the shell", words[0])
            }
            Command::KnownServers(action) => cli::known_servers(action, self.remote.ui),
            command => {
                let retry = retry_safe(&command);
                let slot = self.slot.clone();
                let mut slot = slot.lock().await;
                match self.attempt(&mut slot, command).await {
                    Err(e) if retry && connection_lost(&e) => {
                        // Commands are consumed by running them: parse the line again.
                        self.attempt(&mut slot, parse()?).await
                    }
                    // It may have been done before the connection broke: say so, not
                    // the transport's words.
                    Err(e) if connection_lost(&e) => Err(anyhow!(
                        "the connection to {} broke during {}: check whether it was done (the next command reconnects)",
                        self.remote.server,
                        words[0]
                    )),
                    other => other,
                }
            }
        }
    }

    /// Run one command on a live connection (made first if needed). Ctrl-C cancels both and
    /// drops the connection, which may be mid-frame; the next command makes a new one.
    async fn attempt(&mut self, slot: &mut Option<Client>, command: Command) -> anyhow::Result<()> {
        let needs_session = !matches!(command, Command::Register { .. } | Command::Login { .. });
        let run = async {
            self.connect(slot, needs_session).await?;
            let client = slot.as_mut().expect("connected above");
            self.exec(client, command).await
        };
        let outcome = tokio::select! {
            result = run => Some(result),
            _ = interrupted() => None,
        };
        match outcome {
            None => {
                *slot = None;
                eprintln!("\ncancelled (run it again to continue a transfer where it stopped)");
                Ok(())
            }
            Some(Err(e)) if connection_lost(&e) => {
                *slot = None;
                self.lost = true;
                Err(e)
            }
            Some(result) => result,
        }
    }

    /// Make sure `slot` holds a live connection; a new one logs in with the session's token.
    /// A token the server no longer knows ends the session here (an error if the command
    /// needs it).
    async fn connect(
        &mut self,
        slot: &mut Option<Client>,
        needs_session: bool,
    ) -> anyhow::Result<()> {
        if let Some(client) = slot {
            if client.peer_closed().await {
                *slot = None;
                self.lost = true;
            }
        }
        if slot.is_some() {
            return Ok(());
        }
        let mut client = self.remote.connect().await?;
        let mut expired = false;
        if let Some(token) = &self.token {
            match client.login_with_token(token).await {
                Ok(_) => {}
                Err(e) if is_auth_failure(&e) => expired = true,
                Err(e) => return Err(e.into()),
            }
        }
        if std::mem::take(&mut self.lost) {
            let server = &self.remote.server;
            let as_user = match self.user.as_deref().filter(|_| !expired) {
                Some(user) => format!(" as {user}"),
                None => String::new(),
            };
            self.remote.ui.say(&format!(
                "connection lost; reconnected to {server}{as_user}"
            ));
        }
        *slot = Some(client);
        if expired {
            self.user = None;
            self.token = None;
            if needs_session {
                bail!(SESSION_EXPIRED);
            }
            eprintln!("{SESSION_EXPIRED}");
        }
        Ok(())
    }

    /// One command on `client`: the ones that change the shell's login here, the others as
    /// on the command line.
    async fn exec(&mut self, client: &mut Client, command: Command) -> anyhow::Result<()> {
        let server = self.remote.server.clone();
        let ui = self.remote.ui;
        let ctx = Ctx {
            server: server.clone(),
            ui,
        };
        match command {
            Command::Register { user } => {
                netdisk::names::check_user_name(&user)?;
                let password = cli::new_password(&user)?;
                client
                    .register(&user, &password, scram::DEFAULT_ITERATIONS)
                    .await?;
                ui.say(&format!("registered {user}; now: login {user}"));
                Ok(())
            }
            Command::Login { user } => {
                let password = cli::password(&user)?;
                let token = client.login(&user, &password).await?;
                // Saved like `netdisk login`, so later commands and shells use it.
                config::save_login(
                    &server,
                    SavedLogin {
                        user: user.clone(),
                        token: token.clone(),
                    },
                )?;
                ui.say(&format!("logged in as {user}"));
                self.user = Some(user);
                self.token = Some(token);
                Ok(())
            }
            Command::Logout => {
                let (Some(user), Some(token)) = (self.user.take(), self.token.take()) else {
                    bail!("not logged in");
                };
                if config::load_login(&server)?.is_some_and(|saved| saved.token == token) {
                    config::forget_login(&server)?;
                }
                // The token is forgotten here either way; ending it on the server is best effort.
                if let Err(e) = client.logout().await {
                    ui.say(&format!(
                        "note: could not end the session on the server: {e}"
                    ));
                }
                ui.say(&format!("logged out {user}"));
                Ok(())
            }
            command @ Command::Passwd { .. } => {
                cli::exec(command, client, &ctx).await?;
                // Other sessions ended; passwd saved this one's new token for this user.
                if let Some(saved) = config::load_login(&server)?
                    .filter(|saved| Some(&saved.user) == self.user.as_ref())
                {
                    self.token = Some(saved.token);
                }
                Ok(())
            }
            command => cli::exec(command, client, &ctx).await,
        }
    }
}

/// Commands that may run again after a lost connection without doing anything twice:
/// reads, folder creation, and transfers (they resume where they stopped).
fn retry_safe(command: &Command) -> bool {
    matches!(
        command,
        Command::Ls { .. }
            | Command::Get { .. }
            | Command::Put { .. }
            | Command::Mput { .. }
            | Command::Mget { .. }
            | Command::Mkdir { .. }
            | Command::Whoami
            | Command::Usage { .. }
            | Command::Versions { .. }
    )
}

fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<netdisk::Error>())
        .any(cli::is_connection_lost)
}

fn is_auth_failure(e: &netdisk::Error) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::AuthFailed | ErrorCode::NotLoggedIn)
    )
}

/// Resolves at Ctrl-C (SIGINT); never if it cannot be listened for.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `lcd [DIR]`: change the process's folder, so every relative local path follows it.
/// No DIR (or `~` in front of it) is the home folder, as in a shell.
fn lcd(dir: Option<&String>, remote: &Remote) -> anyhow::Result<()> {
    let home = || {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("no HOME to go to: give a folder")
    };
    let dir = match dir.map(String::as_str) {
        None | Some("~") => home()?,
        Some(dir) => match dir.strip_prefix("~/") {
            Some(rest) => home()?.join(rest),
            None => PathBuf::from(dir),
        },
    };
    std::env::set_current_dir(&dir)
        .with_context(|| format!("cannot change to {}", dir.display()))?;
    let now = std::env::current_dir().context("cannot read the local folder")?;
    remote
        .ui
        .say(&format!("local folder now {}", now.display()));
    Ok(())
}

/// The commands the shell knows: the CLI's (but serve, admin, shell) and its own.
fn command_list() -> Vec<(String, String)> {
    let cli = ShellLine::command();
    let shared = cli
        .get_subcommands()
        .filter(|c| !NOT_IN_SHELL.contains(&c.get_name()))
        .map(|c| {
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            (c.get_name().to_string(), about)
        });
    let own = SHELL_COMMANDS
        .iter()
        .map(|(name, about)| (name.to_string(), about.to_string()));
    shared.chain(own).collect()
}

/// `help`: the commands; `help COMMAND`: what it does and its flags (`COMMAND --help`).
async fn help(command: Option<&String>, session: &mut Session<'_>) -> anyhow::Result<()> {
    if let Some(name) = command {
        return match SHELL_COMMANDS.iter().find(|(own, _)| own == name) {
            Some((own, about)) => {
                println!("{own} {about}");
                Ok(())
            }
            None => session.command(&[name.clone(), "--help".into()]).await,
        };
    }
    println!("commands (the same flags as on the command line; quote names with spaces, as in get \"my notes.txt\"):");
    for (name, about) in command_list() {
        println!("  {name:<14} {about}");
    }
    println!("Tab completes commands and names; Ctrl-C cancels a running transfer; Ctrl-D leaves.");
    Ok(())
}

/// The line editor on its own thread: it blocks reading, and completion blocks on the
/// server there, never on the runtime's workers.
struct LineReader {
    prompts: std::sync::mpsc::Sender<String>,
    lines: tokio::sync::mpsc::UnboundedReceiver<rustyline::Result<String>>,
    on_terminal: bool,
}

impl LineReader {
    fn start(names: Arc<RemoteNames>) -> anyhow::Result<LineReader> {
        let config = Config::builder()
            .completion_type(CompletionType::List)
            .auto_add_history(true)
            .history_ignore_space(true)
            .max_history_size(1000)?
            .build();
        let mut editor: Editor<ShellHelper, FileHistory> = Editor::with_config(config)?;
        editor.set_helper(Some(ShellHelper { names }));
        let history = history_file();
        if let Some(path) = &history {
            let _ = editor.load_history(path); // none yet, or unreadable: start empty
        }
        let (prompts, prompt_rx) = std::sync::mpsc::channel::<String>();
        let (line_tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for prompt in prompt_rx {
                let line = editor.readline(&prompt);
                if let (Ok(_), Some(path)) = (&line, &history) {
                    // Created 0600 by rustyline; a failure only loses history.
                    let _ = editor.append_history(path);
                }
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineReader {
            prompts,
            lines,
            on_terminal: std::io::stdin().is_terminal(),
        })
    }

    async fn read(&mut self, prompt: String) -> rustyline::Result<String> {
        if !self.on_terminal {
            // The editor shows no prompt when reading a pipe; scripts see it on stderr.
            eprint!("{prompt}");
        }
        if self.prompts.send(prompt).is_err() {
            return Err(ReadlineError::Eof);
        }
        self.lines.recv().await.unwrap_or(Err(ReadlineError::Eof))
    }
}

/// `CONFIG/netdisk/shell_history` (the folder made 0700 like the saved logins'), if there
/// is a config folder.
fn history_file() -> Option<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = config::config_dir().ok()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ok()?;
    Some(dir.join("shell_history"))
}

/// Remote folder listings for completion, kept until the next command runs.
struct RemoteNames {
    slot: Slot,
    runtime: tokio::runtime::Handle,
    cache: std::sync::Mutex<HashMap<String, Vec<String>>>,
}

impl RemoteNames {
    /// The names in remote `folder` (folders end in '/'): cached, or listed within
    /// [`COMPLETION_TIMEOUT`]; none when the connection is busy, slow or not logged in.
    fn list(&self, folder: &str) -> Vec<String> {
        if let Some(names) = self.cache.lock().unwrap().get(folder) {
            return names.clone();
        }
        let Ok(mut slot) = self.slot.try_lock() else {
            return Vec::new();
        };
        let Some(client) = slot.as_mut() else {
            return Vec::new();
        };
        // The timer is made inside the runtime, so inside the async block.
        let listed = self.runtime.block_on(async {
            tokio::time::timeout(COMPLETION_TIMEOUT, client.list_dir(folder)).await
        });
        let names: Vec<String> = match listed {
            Ok(Ok(entries)) => entries
                .into_iter()
                .map(|e| match e.kind {
                    EntryType::Dir => format!("{}/", e.name),
                    EntryType::File => e.name,
                })
                .collect(),
            // Refused (no such folder, not logged in): nothing to offer.
            Ok(Err(e)) if e.code().is_some() => Vec::new(),
            // Too slow or broken: the reply may still come, so this connection is out of
            // step; the next command makes a new one.
            _ => {
                *slot = None;
                return Vec::new();
            }
        };
        self.cache
            .lock()
            .unwrap()
            .insert(folder.to_string(), names.clone());
        names
    }

    fn forget(&self) {
        self.cache.lock().unwrap().clear();
    }
}

/// The names in a local folder (folders end in '/').
fn local_names(folder: &str) -> Vec<String> {
    let dir = if folder.is_empty() { "." } else { folder };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some(if entry.path().is_dir() {
                format!("{name}/")
            } else {
                name
            })
        })
        .collect()
}

/// What a word completes to.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Remote,
    Local,
    Nothing,
}

/// What the word after `before` (the words typed so far, the command first) names.
fn source(before: &[String], word: &str) -> Source {
    if word.starts_with('-') {
        return Source::Nothing;
    }
    match before.last().map(String::as_str) {
        Some("--to") => return Source::Remote,
        Some("-C" | "--dir") => return Source::Local,
        Some("--sort" | "--version") => return Source::Nothing,
        _ => {}
    }
    let position = before[1..].iter().filter(|w| !w.starts_with('-')).count();
    match (before[0].as_str(), position) {
        ("lcd" | "mput", _) | ("put", 0) | ("get", 1) => Source::Local,
        (
            "register" | "login" | "logout" | "whoami" | "usage" | "passwd" | "lpwd" | "help"
            | "quit" | "exit" | "known-servers",
            _,
        ) => Source::Nothing,
        _ => Source::Remote,
    }
}

/// The words of a line typed so far, each with the byte offset where it starts; the last
/// is the word at the end (empty after a space), and may have an unclosed quote.
fn partial_words(line: &str) -> Vec<(usize, String)> {
    let mut words = Vec::new();
    let mut word: Option<(usize, String)> = None;
    let mut quote: Option<char> = None;
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, '\'' | '"') => {
                word.get_or_insert((i, String::new()));
                quote = Some(c);
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => word.get_or_insert((i, String::new())).1.push(c),
            (_, '\\') => {
                let w = word.get_or_insert((i, String::new()));
                if let Some((_, next)) = chars.next() {
                    w.1.push(next);
                }
            }
            (_, c) => word.get_or_insert((i, String::new())).1.push(c),
        }
    }
    words.push(word.unwrap_or((line.len(), String::new())));
    words
}

/// Completions of `word` (a path typed so far) among the names of its folder.
fn names_in(word: &str, list: impl FnOnce(&str) -> Vec<String>) -> Vec<Pair> {
    let (folder, prefix) = word.rsplit_once('/').unwrap_or(("", word));
    list(folder)
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .map(|name| {
            let path = match word.contains('/') {
                true => format!("{folder}/{name}"),
                false => name.clone(),
            };
            Pair {
                display: name,
                replacement: shell_words::quote(&path).into_owned(),
            }
        })
        .collect()
}

/// Tab completion for the line editor: commands, then remote or local names.
struct ShellHelper {
    names: Arc<RemoteNames>,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let mut words = partial_words(&line[..pos]);
        let (start, word) = words.pop().expect("the word at the cursor");
        let before: Vec<String> = words.into_iter().map(|(_, w)| w).collect();
        let candidates = if before.is_empty() {
            command_list()
                .into_iter()
                .filter(|(name, _)| name.starts_with(&word))
                .map(|(name, _)| Pair {
                    replacement: format!("{name} "),
                    display: name,
                })
                .collect()
        } else {
            match source(&before, &word) {
                Source::Remote => names_in(&word, |folder| self.names.list(folder)),
                Source::Local => names_in(&word, local_names),
                Source::Nothing => Vec::new(),
            }
        };
        Ok((start, candidates))
    }
}

impl rustyline::hint::Hinter for ShellHelper {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for ShellHelper {}
impl rustyline::validate::Validator for ShellHelper {}
impl rustyline::Helper for ShellHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        partial_words(line).into_iter().map(|(_, w)| w).collect()
    }

    #[test]
    fn partial_words_follow_shell_quoting() {
        assert_eq!(words("get 'my no"), ["get", "my no"]);
        assert_eq!(words("get \"a b\"/c"), ["get", "a b/c"]);
        assert_eq!(words("put a\\ b "), ["put", "a b", ""]);
        assert_eq!(partial_words("get 'x")[1].0, 4);
        assert_eq!(words(""), [""]);
    }

    #[test]
    fn completion_sources_by_command_and_position() {
        let before = |line: &str| line.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(source(&before("get"), "a"), Source::Remote);
        assert_eq!(source(&before("get a.txt"), "b"), Source::Local);
        assert_eq!(source(&before("put"), "x"), Source::Local);
        assert_eq!(source(&before("put -r x"), "y"), Source::Remote);
        assert_eq!(source(&before("mput --to"), "d"), Source::Remote);
        assert_eq!(source(&before("ls"), "-"), Source::Nothing);
        assert_eq!(source(&before("login"), "c"), Source::Nothing);
    }

    #[test]
    fn names_complete_inside_their_folder_and_are_quoted() {
        let list = |folder: &str| {
            assert_eq!(folder, "a b");
            vec![
                "notes.txt".to_string(),
                "my notes.txt".into(),
                "docs/".into(),
            ]
        };
        let found = names_in("a b/my", list);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].replacement, "'a b/my notes.txt'");
        assert_eq!(found[0].display, "my notes.txt");
    }

    #[test]
    fn shell_lines_parse_like_the_command_line() {
        ShellLine::command().debug_assert();
        let line = ShellLine::try_parse_from(["ls", "--json"]).unwrap();
        assert!(matches!(line.command, Command::Ls { json: true, .. }));
    }
}
