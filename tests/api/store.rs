//! How kci-receiver's connections to the embedded store are set up: durability first (WAL,
//! `synchronous=FULL`: a commit is on disk before the 204), and the page cache each connection
//! holds (`database.sqlite_cache_kib`); and PostgreSQL connections with Nagle's algorithm off.

use sea_orm::{ConnectionTrait, Statement};

use crate::helpers::{Backend, TestDatabase, test_settings};

async fn pragma(db: &sea_orm::DatabaseConnection, name: &str) -> String {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("PRAGMA {name}"),
        ))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("PRAGMA {name} answers"));
    row.try_get::<i64>("", name)
        .map(|n| n.to_string())
        .or_else(|_| row.try_get::<String>("", name))
        .unwrap()
}

#[tokio::test]
async fn every_sqlite_connection_is_durable_and_holds_the_configured_page_cache() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let mut settings = test_settings(&database.url);
    settings.database.sqlite_cache_kib = 300;
    settings.database.max_connections = 3;
    let db = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    // Several at once: the pool may open more than one connection, each set up alike.
    let answers = futures_util::future::join_all((0..3).map(|_| async {
        let connection = &db;
        (
            pragma(connection, "cache_size").await,
            pragma(connection, "synchronous").await,
            pragma(connection, "journal_mode").await,
        )
    }))
    .await;
    for (cache_size, synchronous, journal_mode) in answers {
        assert_eq!(cache_size, "-300", "300 KiB, given as a negative size");
        assert_eq!(synchronous, "2", "FULL");
        assert_eq!(journal_mode, "wal");
    }
}

/// `TCP_NODELAY` of this process's TCP socket whose local port is `local_port` and whose peer
/// port is `peer_port` (`None` when there is none).
#[cfg(target_os = "linux")]
fn nodelay_of(local_port: u16, peer_port: u16) -> Option<bool> {
    fn port_of(address: &libc::sockaddr_storage) -> Option<u16> {
        // SAFETY: the family says which of the two layouts the storage holds.
        unsafe {
            match i32::from(address.ss_family) {
                libc::AF_INET => Some(u16::from_be(
                    (*(address as *const _ as *const libc::sockaddr_in)).sin_port,
                )),
                libc::AF_INET6 => Some(u16::from_be(
                    (*(address as *const _ as *const libc::sockaddr_in6)).sin6_port,
                )),
                _ => None,
            }
        }
    }
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: plain socket queries into buffers of the sizes given; a descriptor that is not
        // a socket (or was closed meanwhile) answers with an error.
        unsafe {
            let mut local: libc::sockaddr_storage = std::mem::zeroed();
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let size = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let (mut local_size, mut peer_size) = (size, size);
            if libc::getsockname(fd, &mut local as *mut _ as *mut _, &mut local_size) != 0
                || libc::getpeername(fd, &mut peer as *mut _ as *mut _, &mut peer_size) != 0
                || port_of(&local) != Some(local_port)
                || port_of(&peer) != Some(peer_port)
            {
                continue;
            }
            let mut nodelay: libc::c_int = 0;
            let mut nodelay_size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &mut nodelay as *mut _ as *mut _,
                &mut nodelay_size,
            ) == 0
            {
                return Some(nodelay != 0);
            }
        }
    }
    None
}

/// sqlx 0.9.0 left Nagle's algorithm on (vendor/README.md): a statement written in more than one
/// piece (TLS records) waited 40 ms for PostgreSQL's delayed ACK, and intake's batches spent
/// most of their time in those waits. Every pooled connection must have `TCP_NODELAY`.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn every_postgres_connection_has_nagle_off() {
    use sea_orm::TransactionTrait;

    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    settings.database.max_connections = 3;
    let db = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    let server_port = database.postgres_addr().port();
    // Three transactions open at once hold three different connections.
    let transactions = futures_util::future::join_all((0..3).map(|_| db.begin()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    let mut ports = std::collections::BTreeSet::new();
    for txn in &transactions {
        let row = txn
            .query_one_raw(Statement::from_string(
                txn.get_database_backend(),
                "SELECT inet_client_port() AS port",
            ))
            .await
            .unwrap()
            .expect("a TCP connection has a client port");
        let port = u16::try_from(row.try_get::<i32>("", "port").unwrap()).unwrap();
        ports.insert(port);
        assert_eq!(
            nodelay_of(port, server_port),
            Some(true),
            "the connection from local port {port} has TCP_NODELAY"
        );
    }
    assert_eq!(ports.len(), 3, "three connections were checked");
}
