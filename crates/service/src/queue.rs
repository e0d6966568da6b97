//! The shared build queue: several instances on one database build each delta once.
//!
//! Every delta the service is asked for has one row in the `jobs` table (a pair in its
//! target's repository, with where its images are). An instance builds a delta only while it
//! holds the row's **lease**: it takes the lease with one conditional `UPDATE` (the row is
//! pending, or its lease has expired, or it is already the holder), renews it while it builds
//! (a heartbeat every third of the lease), and records the outcome, which ends the lease.
//! Instances that find the lease held by another wait for the outcome in the row, looking
//! again a few times per lease period. An instance that dies (killed, its host lost) stops
//! renewing; once its leases expire, the next claim of any other instance takes them over
//! (instances with no request waiting on the pair find it with [`Queue::expired`]), and the
//! build is done again from the start.
//!
//! A claim is atomic without an explicit lock: the conditional `UPDATE` locks the row, and
//! on PostgreSQL (read committed) a concurrent claim waits for it and re-checks its condition
//! against the committed row, which then names a live holder; SQLite has one writer at a
//! time. Lease times are the database's clock, so instances whose clocks disagree still agree
//! on expiry.
//!
//! The registry stays the store of record: a build first looks the delta up there, so a
//! lease taken over after the dead instance pushed costs a lookup, not a second build.

use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::build::{Built, Job, PairId};
use crate::db::Database;
use fleetdelta_engine::delta_store::DeltaKey;
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::{Error, Result};
use fleetdelta_engine::registry::RegistryRef;

/// What taking a job's lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The lease is this instance's: build it. `failures`: the pair's failed attempts so far.
    Mine {
        /// Failed attempts before this one (any instance's).
        failures: u32,
    },
    /// Another instance holds the lease, for up to `wait` more.
    Held {
        /// The holder.
        owner: String,
        /// Until its lease expires, unless renewed.
        wait: Duration,
    },
    /// Built (or found) by some instance.
    Done(Built),
    /// Failed; no instance tries again for `wait`.
    Failed {
        /// Why.
        reason: String,
        /// How: `unprocessable`, `upstream` or `internal`.
        kind: String,
        /// Failed attempts in a row.
        failures: u32,
        /// Until the next attempt may start.
        wait: Duration,
    },
}

/// A job row as the database holds it (for reports and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The pair.
    pub id: PairId,
    /// `pending`, `leased`, `done` or `failed`.
    pub state: String,
    /// The lease holder, while leased.
    pub owner: Option<String>,
    /// Times an instance took its lease.
    pub leases: u64,
    /// Builds that finished and pushed the delta.
    pub builds: u64,
}

/// One instance's handle on the queue.
#[derive(Clone, Debug)]
pub struct Queue {
    db: Database,
    owner: String,
    lease: Duration,
}

const COLUMNS: &str = "repository, source_config, target_manifest";

impl Queue {
    /// The queue in `db`, for the instance named `owner` (unique among instances: see
    /// [`instance_name`]), holding leases for `lease` between renewals.
    pub fn new(db: Database, owner: String, lease: Duration) -> Self {
        Queue { db, owner, lease }
    }

    /// This instance's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a lease lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// Adds the job unless its pair is queued already (by any instance).
    pub async fn enqueue(&self, job: &Job) -> Result<()> {
        let id = job.id();
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "INSERT INTO jobs ({COLUMNS}, source_image, target_image, state, updated_at) VALUES ($1, $2, $3, $4, $5, 'pending', {now}) \
             ON CONFLICT ({COLUMNS}) DO NOTHING"
        );
        sqlx::query(&sql)
            .bind(&id.repository)
            .bind(id.key.source_config.to_string())
            .bind(id.key.target_manifest.to_string())
            .bind(job.source.as_ref().map(|s| s.to_string()))
            .bind(job.target.with_digest(job.key.target_manifest).to_string())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.error(&format!("queueing the delta {}", describe(&id)), e))?;
        Ok(())
    }

    /// Takes the pair's lease if nobody holds it (or its holder's expired, or it is ours
    /// already, or its failure's wait is over); else says where it stands.
    pub async fn claim(&self, id: &PairId) -> Result<Claim> {
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'leased', owner = $4, lease_until = {now} + $5, updated_at = {now}, \
                 leases = leases + CASE WHEN state = 'leased' AND owner = $4 THEN 0 ELSE 1 END \
             WHERE repository = $1 AND source_config = $2 AND target_manifest = $3 AND ( \
                 state = 'pending' \
                 OR (state = 'leased' AND (owner = $4 OR lease_until < {now})) \
                 OR (state = 'failed' AND retry_at <= {now})) \
             RETURNING failures"
        );
        let what = || format!("leasing the delta {}", describe(id));
        let taken = self
            .bind_id(sqlx::query(&sql), id)
            .bind(&self.owner)
            .bind(self.lease_ms())
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| self.db.error(&what(), e))?;
        if let Some(row) = taken {
            let failures: i64 = row.try_get(0).map_err(|e| self.db.error(&what(), e))?;
            return Ok(Claim::Mine { failures: clamp_u32(failures) });
        }
        let sql = format!(
            "SELECT state, owner, lease_until - {now}, delta, delta_manifest, download, reason, failure_kind, failures, retry_at - {now} \
             FROM jobs WHERE repository = $1 AND source_config = $2 AND target_manifest = $3"
        );
        let row = self
            .bind_id(sqlx::query(&sql), id)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| self.db.error(&what(), e))?
            .ok_or_else(|| Error::NotFound(format!("the delta {} in the build queue", describe(id))))?;
        self.claim_of(id, &row).map_err(|e| self.db.error(&what(), e))
    }

    fn claim_of(&self, id: &PairId, row: &AnyRow) -> std::result::Result<Claim, sqlx::Error> {
        let state: String = row.try_get(0)?;
        let millis = |ms: i64| Duration::from_millis(ms.max(0) as u64);
        Ok(match state.as_str() {
            "done" => {
                let (delta, manifest, download): (Option<String>, Option<String>, Option<i64>) = (row.try_get(3)?, row.try_get(4)?, row.try_get(5)?);
                let corrupt = |what: &str| sqlx::Error::Protocol(format!("the done job {} has {what}", describe(id)));
                let reference = delta.and_then(|d| RegistryRef::parse(d.trim_start_matches("docker://")).ok()).ok_or_else(|| corrupt("no valid delta"))?;
                let manifest = manifest.and_then(|m| m.parse::<Digest>().ok()).ok_or_else(|| corrupt("no valid manifest digest"))?;
                Claim::Done(Built { reference, manifest, download: download.unwrap_or(0).max(0) as u64 })
            }
            "failed" => Claim::Failed {
                reason: row.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
                kind: row.try_get::<Option<String>, _>(7)?.unwrap_or_default(),
                failures: clamp_u32(row.try_get(8)?),
                wait: millis(row.try_get(9)?),
            },
            // Leased by another instance (pending rows are always taken above).
            _ => Claim::Held { owner: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(), wait: millis(row.try_get(2)?) },
        })
    }

    /// Extends this instance's lease on the pair; `false` when it is no longer ours (it
    /// expired and another instance took it over).
    pub async fn renew(&self, id: &PairId) -> Result<bool> {
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "UPDATE jobs SET lease_until = {now} + $5, updated_at = {now} \
             WHERE repository = $1 AND source_config = $2 AND target_manifest = $3 AND state = 'leased' AND owner = $4"
        );
        let done = self
            .bind_id(sqlx::query(&sql), id)
            .bind(&self.owner)
            .bind(self.lease_ms())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.error(&format!("renewing the lease on the delta {}", describe(id)), e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the delta as ready (`built`: this instance built and pushed it, rather than
    /// finding it), ending the lease; the owner column then names who recorded it. Recorded
    /// whoever holds the lease now: the delta is in the registry either way.
    pub async fn done(&self, id: &PairId, delta: &Built, built: bool) -> Result<()> {
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'done', owner = $8, lease_until = 0, delta = $4, delta_manifest = $5, download = $6, \
                 builds = builds + $7, reason = NULL, failure_kind = NULL, failures = 0, updated_at = {now} \
             WHERE repository = $1 AND source_config = $2 AND target_manifest = $3"
        );
        self.bind_id(sqlx::query(&sql), id)
            .bind(format!("docker://{}", delta.reference))
            .bind(delta.manifest.to_string())
            .bind(i64::try_from(delta.download).unwrap_or(i64::MAX))
            .bind(i64::from(built))
            .bind(&self.owner)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.error(&format!("recording the delta {}", describe(id)), e))?;
        Ok(())
    }

    /// Makes a pair recorded as `delta` pending again (the delta is gone from the registry):
    /// the next claim builds it.
    pub async fn forget(&self, id: &PairId, delta: &Built) -> Result<()> {
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'pending', owner = NULL, delta = NULL, delta_manifest = NULL, updated_at = {now} \
             WHERE repository = $1 AND source_config = $2 AND target_manifest = $3 AND state = 'done' AND delta_manifest = $4"
        );
        self.bind_id(sqlx::query(&sql), id)
            .bind(delta.manifest.to_string())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.error(&format!("forgetting the delta {}", describe(id)), e))?;
        Ok(())
    }

    /// Gives back this instance's leases (it is stopping with builds unfinished), so that
    /// another instance starts them at once rather than after they expire. Returns how many.
    pub async fn release_all(&self) -> Result<u64> {
        let now = self.db.dialect().now_ms();
        let sql = format!("UPDATE jobs SET state = 'pending', owner = NULL, lease_until = 0, updated_at = {now} WHERE state = 'leased' AND owner = $1");
        let done = sqlx::query(&sql).bind(&self.owner).execute(self.db.pool()).await.map_err(|e| self.db.error("giving back leases", e))?;
        Ok(done.rows_affected())
    }

    /// Records this instance's attempt as failed, ending its lease: no instance tries again
    /// for `retry_in`. Nothing changes if the lease is no longer ours.
    pub async fn failed(&self, id: &PairId, reason: &str, kind: &str, failures: u32, retry_in: Duration) -> Result<()> {
        let now = self.db.dialect().now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'failed', owner = NULL, lease_until = 0, reason = $5, failure_kind = $6, failures = $7, \
                 retry_at = {now} + $8, updated_at = {now} \
             WHERE repository = $1 AND source_config = $2 AND target_manifest = $3 AND state = 'leased' AND owner = $4"
        );
        self.bind_id(sqlx::query(&sql), id)
            .bind(&self.owner)
            .bind(reason)
            .bind(kind)
            .bind(i64::from(failures))
            .bind(i64::try_from(retry_in.as_millis()).unwrap_or(i64::MAX / 4))
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.error(&format!("recording the failure of the delta {}", describe(id)), e))?;
        Ok(())
    }

    /// Jobs whose holders stopped renewing their leases (at most `limit`, the longest
    /// expired first): any instance may take them over with [`Queue::claim`].
    pub async fn expired(&self, limit: u32) -> Result<Vec<Job>> {
        let now = self.db.dialect().now_ms();
        let sql =
            format!("SELECT {COLUMNS}, source_image, target_image FROM jobs WHERE state = 'leased' AND lease_until < {now} ORDER BY lease_until LIMIT $1");
        let rows = sqlx::query(&sql).bind(i64::from(limit)).fetch_all(self.db.pool()).await.map_err(|e| self.db.error("looking for expired leases", e))?;
        rows.iter().map(|row| job_of(row).map_err(|e| self.db.error("reading a job whose lease expired", e))).collect()
    }

    /// Every job, for reports and tests.
    pub async fn jobs(&self) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS}, state, owner, leases, builds FROM jobs ORDER BY {COLUMNS}"))
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.error("listing the build queue", e))?;
        let record = |row: &AnyRow| -> std::result::Result<JobRecord, sqlx::Error> {
            Ok(JobRecord {
                id: id_of(row)?,
                state: row.try_get(3)?,
                owner: row.try_get(4)?,
                leases: row.try_get::<i64, _>(5)?.max(0) as u64,
                builds: row.try_get::<i64, _>(6)?.max(0) as u64,
            })
        };
        rows.iter().map(|r| record(r).map_err(|e| self.db.error("reading the build queue", e))).collect()
    }

    fn bind_id<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        id: &PairId,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        query.bind(id.repository.clone()).bind(id.key.source_config.to_string()).bind(id.key.target_manifest.to_string())
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn describe(id: &PairId) -> String {
    format!("{} -> {}@{}", id.key.source_config, id.repository, id.key.target_manifest)
}

fn id_of(row: &AnyRow) -> std::result::Result<PairId, sqlx::Error> {
    let digest = |i: usize| -> std::result::Result<Digest, sqlx::Error> {
        let text: String = row.try_get(i)?;
        text.parse().map_err(|_| sqlx::Error::Protocol(format!("the build queue holds an invalid digest {text:?}")))
    };
    Ok(PairId { repository: row.try_get(0)?, key: DeltaKey { source_config: digest(1)?, target_manifest: digest(2)? } })
}

fn job_of(row: &AnyRow) -> std::result::Result<Job, sqlx::Error> {
    let id = id_of(row)?;
    let image = |text: &str| RegistryRef::parse(text).map_err(|e| sqlx::Error::Protocol(format!("the build queue holds an invalid image: {e}")));
    let source: Option<String> = row.try_get(3)?;
    let target: String = row.try_get(4)?;
    Ok(Job { key: id.key, source: source.as_deref().map(image).transpose()?, target: image(&target)? })
}

/// A name for this instance, unique among those sharing a database: the host, the process
/// and the time it started (`HOST/PID/STARTED`), so that a restarted instance does not
/// mistake its predecessor's leases for its own.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{host}/{}/{started:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u8) -> Job {
        let target_manifest = Digest::of(&[n]);
        Job {
            key: DeltaKey { source_config: Digest::of(b"source"), target_manifest },
            source: None,
            target: RegistryRef::parse(&format!("127.0.0.1:5000/fleet/app@{target_manifest}")).unwrap(),
        }
    }

    async fn queues(lease: Duration) -> (tempfile::TempDir, Queue, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&format!("sqlite:{}", dir.path().join("q.db").display())).await.unwrap();
        (dir, Queue::new(db.clone(), "a".into(), lease), Queue::new(db, "b".into(), lease))
    }

    #[tokio::test]
    async fn one_instance_holds_a_lease_until_it_finishes_or_stops_renewing() {
        let (_dir, a, b) = queues(Duration::from_millis(300)).await;
        let j = job(1);
        let id = j.id();
        a.enqueue(&j).await.unwrap();
        b.enqueue(&j).await.unwrap();
        assert_eq!(a.claim(&id).await.unwrap(), Claim::Mine { failures: 0 });
        assert_eq!(a.claim(&id).await.unwrap(), Claim::Mine { failures: 0 }, "the holder may claim again");
        assert!(matches!(b.claim(&id).await.unwrap(), Claim::Held { ref owner, .. } if owner == "a"));
        assert_eq!(b.expired(10).await.unwrap(), vec![], "a live lease is not expired");
        assert!(a.renew(&id).await.unwrap());

        // a stops renewing: after the lease, b takes the job over, and a has lost it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(b.expired(10).await.unwrap(), vec![j.clone()]);
        assert_eq!(b.claim(&id).await.unwrap(), Claim::Mine { failures: 0 });
        assert!(!a.renew(&id).await.unwrap());
        assert!(matches!(a.claim(&id).await.unwrap(), Claim::Held { ref owner, .. } if owner == "b"));
        let built = Built { reference: j.target.by_digest(Digest::of(b"delta")), manifest: Digest::of(b"delta"), download: 42 };
        b.done(&id, &built, true).await.unwrap();
        assert_eq!(a.claim(&id).await.unwrap(), Claim::Done(built));
        let records = a.jobs().await.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].state.as_str(), records[0].leases, records[0].builds), ("done", 2, 1));
    }

    #[tokio::test]
    async fn a_failure_is_shared_until_its_wait_is_over() {
        let (_dir, a, b) = queues(Duration::from_secs(30)).await;
        let j = job(2);
        let id = j.id();
        a.enqueue(&j).await.unwrap();
        assert_eq!(a.claim(&id).await.unwrap(), Claim::Mine { failures: 0 });
        b.failed(&id, "not mine", "internal", 1, Duration::ZERO).await.unwrap();
        assert!(matches!(b.claim(&id).await.unwrap(), Claim::Held { .. }), "only the holder records a failure");
        a.failed(&id, "image missing", "unprocessable", 1, Duration::from_millis(200)).await.unwrap();
        match b.claim(&id).await.unwrap() {
            Claim::Failed { reason, kind, failures, wait } => {
                assert_eq!((reason.as_str(), kind.as_str(), failures), ("image missing", "unprocessable", 1));
                assert!(wait <= Duration::from_millis(200));
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(b.claim(&id).await.unwrap(), Claim::Mine { failures: 1 }, "after the wait the next attempt may start anywhere");
    }
}
