-- Sync 1.1 repo state (design §12). Per repo: the last applied commit (rev already in
-- `actors.rev`, plus its MST root and CID), and a sync state with the reason and time of its
-- last change. `needs_resync` keeps its meaning: true exactly when the state is not
-- 'synchronized'.
ALTER TABLE actors
    ADD COLUMN repo_data       text,
    ADD COLUMN repo_commit     text,
    ADD COLUMN sync_state      text NOT NULL DEFAULT 'synchronized'
        CHECK (sync_state IN ('synchronized', 'desynchronized', 'resyncing')),
    ADD COLUMN sync_reason     text,
    ADD COLUMN sync_changed_at timestamptz;

UPDATE actors SET sync_state = 'desynchronized', sync_reason = 'damaged_commit',
    sync_changed_at = now()
WHERE needs_resync;

-- Repos waiting for a resync (a row per repo), with per-repo backoff. The resync workers
-- claim due rows with FOR UPDATE SKIP LOCKED; a successful resync deletes the row.
CREATE TABLE resync_queue (
    did             text COLLATE "C" PRIMARY KEY,
    reason          text NOT NULL,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);
CREATE INDEX resync_queue_due_idx ON resync_queue (next_attempt_at);

INSERT INTO resync_queue (did, reason) SELECT did, 'damaged_commit' FROM actors WHERE needs_resync
ON CONFLICT (did) DO NOTHING;
