-- The shared build queue: one row per delta (a pair in its target's repository), leased by
-- one instance at a time. Times are milliseconds since the Unix epoch by the database's
-- clock, so that instances whose clocks disagree still agree on when a lease expires.
-- The same text for SQLite and PostgreSQL.
CREATE TABLE jobs (
    repository TEXT NOT NULL,
    source_config TEXT NOT NULL,
    target_manifest TEXT NOT NULL,
    -- Where the images are: the source as the request named it (NULL: found by its config
    -- among the releases' images), the target pinned by digest.
    source_image TEXT,
    target_image TEXT NOT NULL,
    -- pending (nobody holds it), leased (owner builds it until lease_until), done, failed.
    state TEXT NOT NULL,
    owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    -- Times an instance leased it, and builds that finished and pushed (not counting
    -- deltas found already in the registry).
    leases BIGINT NOT NULL DEFAULT 0,
    builds BIGINT NOT NULL DEFAULT 0,
    -- When done: the delta (docker://...@sha256:...), its manifest digest and download size.
    delta TEXT,
    delta_manifest TEXT,
    download BIGINT,
    -- When failed: why, how (unprocessable, upstream, internal), how many times in a row,
    -- and before when no instance tries again.
    reason TEXT,
    failure_kind TEXT,
    failures BIGINT NOT NULL DEFAULT 0,
    retry_at BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (repository, source_config, target_manifest)
);
CREATE INDEX jobs_by_lease ON jobs (state, lease_until);
