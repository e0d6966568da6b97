//! The service's durable state: the releases registered, in registration order, so that a
//! restart forgets none. SQLite (one file, embedded) through sqlx's async driver; the
//! registry stays the store of record for deltas.
//!
//! The schema is versioned by the migrations in `crates/service/migrations/`, applied in
//! order, each once, inside a transaction ([`MIGRATIONS`]); a database written by a newer
//! build (a version this one does not know) is refused rather than misread.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use fleetdelta_engine::error::{Error, Result};

/// The schema's migrations, by version: applied in order, each once.
pub const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/0001_releases.sql"))];

/// An open database.
#[derive(Clone, Debug)]
pub struct Database {
    pool: SqlitePool,
    /// The URL it was opened with, for messages.
    url: String,
}

impl Database {
    /// Opens (creating it when missing) the database at `url` (`sqlite:PATH`, or
    /// `sqlite::memory:`) and brings its schema up to date. A file that is not a database, or
    /// one written by a newer build, is refused with its URL.
    pub async fn open(url: &str) -> Result<Self> {
        let failed = |e: sqlx::Error| Error::io(format!("opening the database {url}"), std::io::Error::other(e));
        let options = SqliteConnectOptions::from_str(url).map_err(failed)?.create_if_missing(true).journal_mode(SqliteJournalMode::Wal);
        // One connection: writes are rare (a registration), and SQLite serializes them anyway.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.map_err(failed)?;
        let db = Database { pool, url: url.to_string() };
        db.migrate().await?;
        Ok(db)
    }

    fn error(&self, what: &str, e: sqlx::Error) -> Error {
        Error::io(format!("database {}: {what}", self.url), std::io::Error::other(e))
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error("starting the migration", e))?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
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
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| self.error(&format!("applying migration {version}"), e))?;
            sqlx::query("INSERT INTO schema_migrations (version) VALUES (?)")
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

    /// Records a newly registered release (after those registered before it). Another
    /// instance sharing the database may have recorded it first: the same text is no
    /// change; another text under the same id returns `false` (a conflict).
    pub async fn add_release(&self, id: &str, text: &str) -> Result<bool> {
        sqlx::query("INSERT INTO releases (id, text) VALUES (?, ?) ON CONFLICT(id) DO NOTHING")
            .bind(id)
            .bind(text)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(&format!("recording release {id}"), e))?;
        let stored: String = sqlx::query("SELECT text FROM releases WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.error(&format!("reading release {id}"), e))?;
        Ok(stored == text)
    }

    /// Closes the connections (the file is consistent before and after).
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
}
