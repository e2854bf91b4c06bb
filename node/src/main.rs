//! The `fieldsync` binary: parses the command line, sets up logging, runs the command (the
//! node itself is the `fieldsync_node` library).
//! Output is JSON on stdout; messages and progress on stderr.
//! Exit codes: 0 ok · 1 runtime error · 2 invalid input or usage · 3 not found.

use std::process::ExitCode;

use clap::Parser;
use fieldsync_node::cli;

// Automerge allocates many small buffers; mimalloc is markedly faster at that than glibc's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
