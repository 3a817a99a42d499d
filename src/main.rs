//! `dataverse-proxy` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use dataverse_proxy::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::vars().collect();
    cli::run(cli, env).await
}
