//! The service's durable state: the releases registered, in registration order, so that a
//! restart forgets none, and the shared build queue ([`crate::queue`]). SQLite (one file,
//! embedded: the default) or PostgreSQL (several instances on one database), through sqlx's
//! async `Any` driver, so that every query is written once; the registry stays the store of
//! record for deltas.
//!
//! The schema is versioned by the migrations in `crates/service/migrations/`, applied in
//! order, each once, inside a transaction ([`MIGRATIONS`]); on PostgreSQL instances starting
//! together take turns (an advisory lock). A database written by a newer build (a version
//! this one does not know) is refused rather than misread.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use fleetdelta_engine::error::{Error, Result};

/// The schema's migrations, by version: (version, SQLite text, PostgreSQL text), applied in
/// order, each once.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_releases.sql"), include_str!("../migrations/postgres/0001_releases.sql")),
    (2, include_str!("../migrations/0002_jobs.sql"), include_str!("../migrations/0002_jobs.sql")),
];

/// How long a request waits for a connection before the database counts as unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections to a PostgreSQL database, per instance.
const POSTGRES_CONNECTIONS: u32 = 8;

/// Which database speaks: the few places their SQL differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite: one file, one writer at a time.
    Sqlite,
    /// PostgreSQL: several instances.
    Postgres,
}

impl Dialect {
    /// The database clock, in milliseconds since the Unix epoch, as an SQL expression.
    pub fn now_ms(self) -> &'static str {
        match self {
            // julianday works on every SQLite version; unixepoch('subsec') needs 3.42.
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

/// An open database.
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    dialect: Dialect,
    /// The URL it was opened with, its password hidden, for messages.
    url: String,
}

/// `url` with its password, if any, replaced by `***`, for messages and logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

impl Database {
    /// Opens the database at `url` and brings its schema up to date:
    /// - `sqlite:PATH` (created when missing) or `sqlite::memory:`;
    /// - `postgres://USER[:PASSWORD]@HOST[:PORT]/NAME` (also `postgresql://`, and
    ///   `?host=/socket/dir`), for several instances sharing one database.
    ///
    /// A database that cannot be reached, a file that is not a database, or one written by a
    /// newer build, is refused with its URL (the password hidden).
    pub async fn open(url: &str) -> Result<Self> {
        let shown = redacted(url);
        let failed = |e: sqlx::Error| Error::io(format!("opening the database {shown}"), std::io::Error::other(e));
        let (dialect, connect_url) = if url.starts_with("sqlite:") {
            // Created when missing, unless the URL says otherwise.
            let url = if url.contains("mode=") || url.contains(":memory:") {
                url.to_string()
            } else {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            };
            (Dialect::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(Error::unsupported(format!("the database {shown}"), "give sqlite:PATH or postgres://USER@HOST/NAME"));
        };
        sqlx::any::install_default_drivers();
        let options: AnyConnectOptions = connect_url.parse().map_err(failed)?;
        let pool = match dialect {
            // One connection: SQLite serializes writes anyway.
            Dialect::Sqlite => AnyPoolOptions::new().max_connections(1),
            Dialect::Postgres => AnyPoolOptions::new().max_connections(POSTGRES_CONNECTIONS),
        }
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(failed)?;
        if dialect == Dialect::Sqlite {
            // The write-ahead log lets the file be read while it is written; the mode is kept
            // in the file. (sqlx waits up to 5 s for a lock another process holds.)
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await.map_err(failed)?;
        }
        let db = Database { pool, dialect, url: shown };
        db.migrate().await?;
        Ok(db)
    }

    /// The connection pool (for [`crate::queue`]).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// An error of `what` on this database, naming it.
    pub(crate) fn error(&self, what: &str, e: sqlx::Error) -> Error {
        Error::io(format!("database {}: {what}", self.url), std::io::Error::other(e))
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error("starting the migration", e))?;
        if self.dialect == Dialect::Postgres {
            // Instances starting together migrate one after the other: the others then find
            // the schema up to date. The lock ends with the transaction.
            sqlx::query("SELECT pg_advisory_xact_lock(7315350212)")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error("waiting for another instance's migration", e))?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("reading the schema version", e))?;
        let applied: Option<i64> = sqlx::query("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.error("reading the schema version", e))?;
        let applied = applied.unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if applied > known {
            return Err(Error::unsupported(
                format!("database {}", self.url),
                format!("its schema is version {applied}, newer than this build's {known}: written by a newer fleetdelta"),
            ));
        }
        for (version, sqlite, postgres) in MIGRATIONS.iter().filter(|(v, _, _)| *v > applied) {
            let sql = if self.dialect == Dialect::Sqlite { sqlite } else { postgres };
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| self.error(&format!("applying migration {version}"), e))?;
            sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(&format!("recording migration {version}"), e))?;
        }
        tx.commit().await.map_err(|e| self.error("committing the migration", e))
    }

    /// The releases registered, in registration order: (id, release file text).
    pub async fn releases(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, text FROM releases ORDER BY seq").fetch_all(&self.pool).await.map_err(|e| self.error("reading the releases", e))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(|e| self.error("reading a release", e))?, r.try_get(1).map_err(|e| self.error("reading a release", e))?)))
            .collect()
    }

    /// How many releases are registered.
    pub async fn release_count(&self) -> Result<usize> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM releases")
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.error("counting the releases", e))?;
        Ok(n.max(0) as usize)
    }

    /// Records a newly registered release (after those registered before it). Another
    /// instance sharing the database may have recorded it first: the same text is no
    /// change; another text under the same id returns `false` (a conflict).
    pub async fn add_release(&self, id: &str, text: &str) -> Result<bool> {
        sqlx::query("INSERT INTO releases (id, text) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(id)
            .bind(text)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(&format!("recording release {id}"), e))?;
        let stored: String = sqlx::query("SELECT text FROM releases WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.error(&format!("reading release {id}"), e))?;
        Ok(stored == text)
    }

    /// Closes the connections (the database is consistent before and after).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn releases_survive_reopening_in_order_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("state.db").display());
        let db = Database::open(&url).await.unwrap();
        assert!(db.add_release("v1", "id: v1").await.unwrap());
        assert!(db.add_release("v2", "id: v2").await.unwrap());
        assert!(db.add_release("v1", "id: v1").await.unwrap(), "the same release again is no change");
        assert!(!db.add_release("v1", "id: v1\ncommit: x").await.unwrap(), "another release under the same id conflicts");
        db.close().await;
        let again = Database::open(&url).await.unwrap();
        assert_eq!(again.releases().await.unwrap(), [("v1".to_string(), "id: v1".to_string()), ("v2".to_string(), "id: v2".to_string())]);
        again.close().await;

        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let err = Database::open(&format!("sqlite:{}", junk.display())).await.unwrap_err().to_string();
        assert!(err.contains("junk.db"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_refused_naming_it_without_its_password() {
        // Port 1 on loopback: nothing listens there.
        let err = Database::open("postgres://fleet:s3cret@127.0.0.1:1/fleetdelta").await.unwrap_err().to_string();
        assert!(err.contains("postgres://fleet:***@127.0.0.1:1/fleetdelta"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = Database::open("mysql://db/x").await.unwrap_err().to_string();
        assert!(err.contains("mysql://db/x") && err.contains("sqlite:PATH"), "{err}");
    }

    #[test]
    fn passwords_are_hidden_and_other_urls_kept() {
        assert_eq!(redacted("postgres://u:p@h:5432/d?sslmode=disable"), "postgres://u:***@h:5432/d?sslmode=disable");
        assert_eq!(redacted("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redacted("sqlite:/var/lib/x.db"), "sqlite:/var/lib/x.db");
    }
}
