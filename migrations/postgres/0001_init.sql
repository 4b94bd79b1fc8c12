CREATE TABLE IF NOT EXISTS messages (
    id         TEXT PRIMARY KEY,
    room       TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    text       TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    stored_at  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_room_id ON messages (room, id);

CREATE TABLE IF NOT EXISTS analytics_seen (
    id      TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS room_totals (
    room      TEXT PRIMARY KEY,
    messages  BIGINT NOT NULL,
    last_ts   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS user_totals (
    room      TEXT NOT NULL,
    user_name TEXT NOT NULL,
    messages  BIGINT NOT NULL,
    last_ts   BIGINT NOT NULL,
    PRIMARY KEY (room, user_name)
);
CREATE TABLE IF NOT EXISTS activity (
    room      TEXT NOT NULL,
    user_name TEXT NOT NULL,
    sec       BIGINT NOT NULL,
    messages  BIGINT NOT NULL,
    PRIMARY KEY (room, user_name, sec)
);
CREATE TABLE IF NOT EXISTS flood_flags (
    room       TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    flagged_at BIGINT NOT NULL,
    rate       BIGINT NOT NULL,
    PRIMARY KEY (room, user_name)
);
