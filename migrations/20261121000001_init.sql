-- Schema contract: ../design/ingest.md §10. Other programs read these names; keep them.
-- Record URIs use the "C" collation: byte order, so `uri >= 'at://did/' AND uri < 'at://did0'`
-- is a primary-key range scan over one account's records (account deletion needs no extra
-- index), and the writer's Rust-side sort order equals the index order.

CREATE TABLE actors (
    did             text PRIMARY KEY,
    handle          text,
    status          text NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'deactivated', 'takendown', 'suspended', 'deleted')),
    -- Last fully applied commit rev (a TID): commits with rev <= this are already applied.
    rev             text COLLATE "C",
    -- Identity resolution (filled by the resolver; NULL until resolved).
    handle_valid    boolean,
    pds_endpoint    text,
    signing_key     text,
    resolved_at     timestamptz,
    resolve_failures integer NOT NULL DEFAULT 0,
    next_resolve_at timestamptz,
    -- Set when the firehose could not give us a complete picture (tooBig, missing blocks).
    needs_resync    boolean NOT NULL DEFAULT false,
    indexed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX actors_handle_idx ON actors (handle);
CREATE INDEX actors_next_resolve_idx ON actors (next_resolve_at) WHERE next_resolve_at IS NOT NULL;

CREATE TABLE posts (
    uri              text COLLATE "C" PRIMARY KEY,
    cid              text NOT NULL,
    did              text NOT NULL,
    text             text NOT NULL,
    reply_root_uri   text,
    reply_root_cid   text,
    reply_parent_uri text,
    reply_parent_cid text,
    quote_uri        text,
    quote_cid        text,
    embed            jsonb,
    langs            text[],
    facets           jsonb,
    commit_seq       bigint,
    commit_time      timestamptz,
    created_at       timestamptz,
    indexed_at       timestamptz NOT NULL DEFAULT now()
);
-- Top-level posts by arrival, for "what's new" style feeds.
CREATE INDEX posts_commit_idx ON posts (commit_seq, commit_time) WHERE reply_parent_uri IS NULL;

CREATE TABLE likes (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    subject_uri text NOT NULL,
    subject_cid text NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX likes_subject_idx ON likes (subject_uri);

CREATE TABLE reposts (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    subject_uri text NOT NULL,
    subject_cid text NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reposts_subject_idx ON reposts (subject_uri);

CREATE TABLE follows (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    subject_did text NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX follows_subject_idx ON follows (subject_did);

CREATE TABLE blocks (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    subject_did text NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blocks_subject_idx ON blocks (subject_did);

CREATE TABLE lists (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    name        text NOT NULL,
    purpose     text NOT NULL,
    description text,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE list_items (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    list_uri    text NOT NULL,
    subject_did text NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX list_items_list_idx ON list_items (list_uri);

CREATE TABLE feed_generators (
    uri          text COLLATE "C" PRIMARY KEY,
    cid          text NOT NULL,
    did          text NOT NULL,
    feed_did     text NOT NULL,
    display_name text NOT NULL,
    description  text,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE starter_packs (
    uri         text COLLATE "C" PRIMARY KEY,
    cid         text NOT NULL,
    did         text NOT NULL,
    name        text NOT NULL,
    list_uri    text NOT NULL,
    description text,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE threadgates (
    uri        text COLLATE "C" PRIMARY KEY,
    cid        text NOT NULL,
    did        text NOT NULL,
    post_uri   text NOT NULL,
    allow      jsonb,
    created_at timestamptz,
    indexed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE postgates (
    uri        text COLLATE "C" PRIMARY KEY,
    cid        text NOT NULL,
    did        text NOT NULL,
    post_uri   text NOT NULL,
    rules      jsonb,
    created_at timestamptz,
    indexed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE profiles (
    did          text PRIMARY KEY,
    uri          text COLLATE "C" NOT NULL UNIQUE,
    cid          text NOT NULL,
    display_name text,
    description  text,
    avatar_cid   text,
    banner_cid   text,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now()
);

-- Records of every collection without a table of its own, as their JSON form.
CREATE TABLE records (
    uri        text COLLATE "C" PRIMARY KEY,
    cid        text NOT NULL,
    did        text NOT NULL,
    collection text NOT NULL,
    rkey       text NOT NULL,
    value      jsonb NOT NULL,
    created_at timestamptz,
    indexed_at timestamptz NOT NULL DEFAULT now()
);

-- Derived tables.
CREATE TABLE feed_items (
    uri            text COLLATE "C" PRIMARY KEY,   -- the post or repost record
    post_uri       text NOT NULL,
    originator_did text NOT NULL,
    type           text NOT NULL CHECK (type IN ('post', 'repost')),
    sort_at        timestamptz NOT NULL
);
CREATE INDEX feed_items_originator_idx ON feed_items (originator_did, sort_at DESC);

CREATE TABLE notifications (
    record_uri    text COLLATE "C" NOT NULL,   -- the like/repost/follow/post that notifies
    reason        text NOT NULL CHECK (reason IN ('like', 'repost', 'follow', 'reply', 'mention', 'quote')),
    recipient_did text NOT NULL,
    author_did    text NOT NULL,
    record_cid    text NOT NULL,
    subject_uri   text,
    created_at    timestamptz NOT NULL,
    indexed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (record_uri, reason, recipient_did)
);
CREATE INDEX notifications_recipient_idx ON notifications (recipient_did, created_at DESC);

CREATE TABLE post_aggregates (
    uri          text COLLATE "C" PRIMARY KEY,
    like_count   bigint NOT NULL DEFAULT 0,
    repost_count bigint NOT NULL DEFAULT 0,
    reply_count  bigint NOT NULL DEFAULT 0,
    quote_count  bigint NOT NULL DEFAULT 0
);

CREATE TABLE profile_aggregates (
    did             text PRIMARY KEY,
    followers_count bigint NOT NULL DEFAULT 0,
    follows_count   bigint NOT NULL DEFAULT 0,
    posts_count     bigint NOT NULL DEFAULT 0
);

-- Progress: the last applied seq, written in the same transaction as the rows it covers.
CREATE TABLE firehose_cursor (
    service    text PRIMARY KEY,
    seq        bigint NOT NULL,
    fence      bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id         text PRIMARY KEY,
    did        text NOT NULL,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX sessions_expires_idx ON sessions (expires_at);

CREATE TABLE oauth_states (
    state      text PRIMARY KEY,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX oauth_states_expires_idx ON oauth_states (expires_at);
