use clap::Parser;
use kci_receiver::cli::{Cli, run};

/// jemalloc instead of glibc's allocator, for the whole process: Rust's allocations and the C
/// code's (SQLite's) alike (unprefixed `malloc`). Most of what kci-receiver allocates is made on
/// one thread and freed on another (a row read on a database connection's thread, freed on a
/// tokio worker; a message encoded on a worker, freed on the AMQP I/O thread), and glibc then
/// takes the owning arena's lock on every free and consolidates its free lists on every large
/// allocation: in a profile of the backlog drain, a quarter of kci-receiver's CPU was in glibc's
/// `malloc`/`free`. Measured with `scripts/bench/alternate` (docs/benchmarks.md, "Fourteenth
/// round"): at saturation 14-19% more KCIs/s on SQLite and 4-12% on PostgreSQL, 15-21% less CPU
/// per KCI.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`MALLOC_CONF` in the environment adds to them):
/// - `narenas:2`: two arenas, not four per core (resident memory grows with arenas, not work);
/// - `background_thread:true`, `dirty_decay_ms:500`, `muzzy_decay_ms:0`: pages freed by a burst
///   (a backlog drain's rounds) go back to the system within half a second, from a thread of
///   jemalloc's own, not on the next allocation;
/// - `tcache_max:4096`: per-thread caches for the small sizes only.
///
/// With jemalloc's defaults the peak RSS of a 20,000-KCI backlog drain on SQLite was 115.5 MB
/// (100 MB is the target); with these, 88.4-89.5 MB (glibc's: 84-88 MB).
#[cfg(target_os = "linux")]
#[unsafe(export_name = "malloc_conf")]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some(unsafe {
    &*c"narenas:2,background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0,tcache_max:4096"
        .as_ptr()
});

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(Cli::parse()));
    // Whatever still runs (a task stuck on a hung connection) does not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
