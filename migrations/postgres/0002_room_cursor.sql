-- Per-room cursor: every chat message gets the next sequence number of its
-- room from `room_seq` before it is published, so a client's position is
-- ordered per room across instances. `epoch` changes if the counter is ever
-- recreated (a wiped DB), which makes old positions unrecoverable instead of
-- silently wrong.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS seq BIGINT;
CREATE INDEX IF NOT EXISTS messages_room_seq ON messages (room, seq);

CREATE TABLE IF NOT EXISTS room_seq (
    room  TEXT PRIMARY KEY,
    seq   BIGINT NOT NULL,
    epoch TEXT NOT NULL
);
-- Positions handed out whose publish failed: nothing will ever carry them.
CREATE TABLE IF NOT EXISTS room_seq_void (
    room      TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    voided_at BIGINT NOT NULL,
    PRIMARY KEY (room, seq)
);
-- `send` retries: (room, user, cid) → the message id it was published as.
-- UNLOGGED: a cache of recent sends, written on every `send` with a `cid`;
-- no WAL flush per send. A PostgreSQL crash empties it (a retry across the
-- crash may then publish twice) — the README says so.
CREATE UNLOGGED TABLE IF NOT EXISTS send_dedupe (
    room       TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    cid        TEXT NOT NULL,
    id         TEXT NOT NULL,
    seq        BIGINT,
    state      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (room, user_name, cid)
);
CREATE INDEX IF NOT EXISTS send_dedupe_created ON send_dedupe (created_at);
CREATE INDEX IF NOT EXISTS analytics_seen_at ON analytics_seen (seen_at);
