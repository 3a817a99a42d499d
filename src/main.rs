//! `dataverse-proxy` binary: the allocator, then parse the command line and
//! hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use dataverse_proxy::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::vars().collect();
    cli::run(cli, env).await
}

/// jemalloc rather than glibc's malloc. A request makes some forty
/// allocations (hyper's, axum's, the layers' and ours), several of them
/// above the 1 KiB that glibc's per-thread cache serves (boxed futures,
/// buffers), and glibc's general path costs ~200 instructions each. Under
/// callgrind, jemalloc cuts ~4.7k instructions per request (80.0k → 75.3k at
/// 16 connections, docs/benchmarks.md) for +2.4 MB of peak RSS while
/// streaming 1 GiB (15.7 → 18.1 MB, under the 20 MB bound). mimalloc cut a
/// little more (74.6k) but held 26.7 MB at that peak.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
