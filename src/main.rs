//! The `fleet-events` binary: parses the command line and hands over to [`cli`].

mod cli;

/// mimalloc instead of glibc's malloc: the hot path allocates and frees small objects across
/// threads (decoded events, answers, group-commit batches), where glibc spent about a tenth of
/// the server's CPU in its free lists (benches/RESULTS.md, issue 14).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
