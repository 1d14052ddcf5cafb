-- Events set aside (design §6): a batch that failed with a data error (SQLSTATE class 22, 23
-- or 54) was split until the event that caused it was alone; that event is kept here, the
-- rest of the batch was written and the cursor moved on. `dead-letters list` shows them,
-- `dead-letters retry` applies them again after a fix and removes those that succeed.
-- `did` and `uri` are not indexed: they may be as long as whatever PostgreSQL refused.
CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    -- firehose_cursor.service of the run that set the event aside (`replay`, a relay host).
    service    text NOT NULL,
    seq        bigint NOT NULL,
    did        text,
    -- The first op's record URI and collection (the event's other ops are in `record`).
    uri        text,
    collection text,
    sqlstate   text NOT NULL,
    error      text NOT NULL,
    -- The event as sanitized JSON (U+0000 removed): what `dead-letters retry` re-applies.
    record     jsonb,
    -- 1 when set aside, +1 per failed retry.
    attempts   integer NOT NULL DEFAULT 1,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (service, seq)
);
