use clap::Parser;
use kci_receiver::cli::{Cli, run};

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(Cli::parse()));
    // Whatever still runs (a task stuck on a hung connection) does not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// glibc gives every allocating thread its own malloc arena (up to 8 per core), and actix
/// workers, tokio, the database connections' threads and the AMQP I/O all allocate: resident
/// memory grows with arenas, not with work (measured by `kci-tools bench`: peak 171 MB on
/// SQLite, 95 MB with two arenas). Two are plenty. It must happen before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
