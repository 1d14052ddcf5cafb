-- Backfill (design §13): how far the enumeration of a relay's repos (com.atproto.sync.listRepos)
-- got, so a killed backfill resumes at the next page, and the repos it listed, so it knows
-- when every one of them is done or failed. The repos themselves go through resync_queue.
CREATE TABLE backfill_runs (
    relay       text COLLATE "C" PRIMARY KEY,
    -- listRepos cursor of the next page; NULL: from the first page.
    cursor      text,
    -- The last page was read.
    listed_all  boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE TABLE backfill_repos (
    relay  text COLLATE "C" NOT NULL REFERENCES backfill_runs (relay) ON DELETE CASCADE,
    did    text COLLATE "C" NOT NULL,
    -- The rev listRepos gave.
    rev    text,
    -- listRepos' status of an inactive account (deactivated, takendown, …); NULL when active.
    status text,
    PRIMARY KEY (relay, did)
);
