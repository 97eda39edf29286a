//! The `netdisk` command: `netdisk serve` runs the server, every other subcommand is a
//! client. The clap layer and terminal interaction live here; the work is in the library.

mod cli;
mod shell;

fn main() -> std::process::ExitCode {
    cli::main()
}
