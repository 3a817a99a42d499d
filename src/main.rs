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

/// mimalloc (v2) rather than glibc's malloc: a request makes some forty
/// small allocations (hyper's, axum's, the layers' and ours), and under
/// callgrind mimalloc cuts ~5.4k instructions per request (80.0k → 74.6k at
/// 16 connections, docs/benchmarks.md); v3 and jemalloc measured 75.2k and
/// 75.3k in the same run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
