-- Cluster presence: each gateway instance heartbeats its row and writes its
-- room members through on join/leave; an instance whose heartbeat is older
-- than PRESENCE_TTL_MS is dead and its members leave. Ephemeral by nature
-- (UNLOGGED on PostgreSQL); every live instance re-writes its members when
-- its row is missing.
CREATE TABLE IF NOT EXISTS presence_instances (
    instance  TEXT PRIMARY KEY,
    last_seen BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS presence_members (
    instance  TEXT NOT NULL,
    room      TEXT NOT NULL,
    user_name TEXT NOT NULL,
    conns     BIGINT NOT NULL,
    PRIMARY KEY (instance, room, user_name)
);
CREATE INDEX IF NOT EXISTS presence_members_room ON presence_members (room);
