//! The database every module of every process shares: SQLite (one file, the default) or
//! PostgreSQL, and the migrations that shape it.
//!
//! [`Db`] is an enum over the two pools rather than sqlx's `Any` driver: each module writes its
//! statements for each backend, so PostgreSQL gets array binds (`UNNEST`) for bulk inserts and
//! `timestamptz`, while SQLite gets multi-row `INSERT`s and integer timestamps
//! (microseconds since the Unix epoch, UTC), which index and sort as numbers.
//!
//! Durability: SQLite runs in WAL mode with `synchronous = FULL`, so a commit is on disk when it
//! returns, as PostgreSQL's default `synchronous_commit = on` guarantees. The ingest acknowledges
//! a batch to its agent only after that commit, and the agent then deletes the records: a
//! weaker setting could lose acknowledged records in a power cut.
//!
//! Migrations live in `cloud/migrations/{sqlite,postgres}/`, one file per module and change
//! (`NNNN_<module>_<what>.sql`). They form one sequence shared by every module, because the
//! modules share one database and later tables refer to earlier ones; every process applies
//! them all at start whatever services it runs, so processes of any mix find the same schema.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::Duration;

/// How long a SQLite writer waits for another writer (another worker or another process on the
/// same file) before failing with "database is locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the database could not be opened, migrated or queried.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL must start with sqlite: or postgres:// (got {0:?})")]
    Scheme(String),
    #[error("database URL is not valid: {0}")]
    Url(sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the shared database.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Db {
    /// Opens a pool. SQLite URLs: `sqlite://path?mode=rwc` (creates the file); PostgreSQL:
    /// `postgres://user@host/db` (`?options[search_path]=schema` selects a schema).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        Db::connect_bounded(url, max_connections, None).await
    }

    /// [`Db::connect`], every PostgreSQL statement bounded by `statement_timeout` (a lock wait
    /// included): a statement stuck behind another transaction's lock fails after it instead
    /// of holding its connection, and its caller's work, for as long as the lock is held. So
    /// one site's stuck group cannot stop the ingest acknowledging the others (the ingest
    /// sends no ack for a failed group; its agent re-sends). Migrations run without it
    /// ([`Db::migrate`]). SQLite's lock waits are bounded by its busy timeout already.
    pub async fn connect_bounded(
        url: &str,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> Result<Db, DbError> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(DbError::Url)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .connect_with(opts)
                .await
                .map_err(DbError::Connect)?;
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut opts = sqlx::postgres::PgConnectOptions::from_str(url).map_err(DbError::Url)?;
            if let Some(t) = statement_timeout.filter(|t| !t.is_zero()) {
                opts = opts.options([("statement_timeout", format!("{}ms", t.as_millis()))]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(1))
                .connect_with(opts)
                .await
                .map_err(DbError::Connect)?;
            Ok(Db::Postgres(pool))
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            Err(DbError::Scheme(format!("{scheme}:")))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies every pending migration. Safe to run from several processes at once on
    /// PostgreSQL (sqlx takes an advisory lock); on SQLite start one process first or run
    /// `caudal-cloud migrate`.
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(p) => sqlx::migrate!("migrations/sqlite").run(p).await?,
            Db::Postgres(p) => {
                // A migration may rewrite a large table: no statement timeout for it.
                let mut conn = p.acquire().await.map_err(DbError::Connect)?;
                sqlx::query("SET statement_timeout = 0")
                    .execute(&mut *conn)
                    .await
                    .map_err(DbError::Connect)?;
                let ran = sqlx::migrate!("migrations/postgres").run(&mut *conn).await;
                // The connection goes back to the pool with the pool's own bound.
                let _ = sqlx::query("RESET statement_timeout")
                    .execute(&mut *conn)
                    .await;
                ran?
            }
        }
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
            Db::Postgres(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
        }
        Ok(())
    }

    /// Closes every connection (waits for those in use).
    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// A time as SQLite stores it: microseconds since the Unix epoch, UTC.
pub fn sqlite_time(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A time read back from SQLite; `None` when out of chrono's range.
pub fn from_sqlite_time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// Reads a SQLite time column (microseconds since the epoch) as a UTC time.
pub fn sqlite_row_time(
    row: &sqlx::sqlite::SqliteRow,
    column: &str,
) -> Result<DateTime<Utc>, sqlx::Error> {
    use sqlx::Row;
    let micros: i64 = row.try_get(column)?;
    from_sqlite_time(micros).ok_or_else(|| {
        sqlx::Error::Decode(format!("column {column}: time {micros} is out of range").into())
    })
}

/// Reads a PostgreSQL `timestamptz` column.
pub fn pg_row_time(
    row: &sqlx::postgres::PgRow,
    column: &str,
) -> Result<DateTime<Utc>, sqlx::Error> {
    use sqlx::Row;
    row.try_get(column)
}

/// A time as PostgreSQL stores it (itself), the counterpart of [`sqlite_time`].
pub fn pg_time(t: DateTime<Utc>) -> DateTime<Utc> {
    t
}

/// Runs one body against whichever pool a [`Db`] holds, for statements whose text is the same on
/// both backends (`$1`-style parameters, which SQLite also accepts). In the body, `$pool` is the
/// pool, `$to_db` converts a `DateTime<Utc>` to the backend's time column value and `$from_row`
/// reads a time column from a row (`$from_row(&row, "created_at")?`); the body is compiled once
/// per backend.
macro_rules! each_db {
    ($db:expr, |$pool:ident, $to_db:ident, $from_row:ident| $body:expr) => {
        match $db {
            $crate::core::db::Db::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $to_db = $crate::core::db::sqlite_time;
                #[allow(unused_variables)]
                let $from_row = $crate::core::db::sqlite_row_time;
                $body
            }
            $crate::core::db::Db::Postgres($pool) => {
                #[allow(unused_variables)]
                let $to_db = $crate::core::db::pg_time;
                #[allow(unused_variables)]
                let $from_row = $crate::core::db::pg_row_time;
                $body
            }
        }
    };
}
pub(crate) use each_db;
