// The peer: a Socket.IO 4 chat server on the Redis adapter, doing what the
// relay's gateway does for the peer run (loadtest/peers.py) and nothing more:
// rooms are Socket.IO rooms, a `send` event is broadcast to the room through
// @socket.io/redis-adapter (so every instance on the same Redis delivers it to
// its own members) and answered with an ack callback. No database, no
// persistence, no room positions: the relay does all three, and the driver
// reports its CPU with and without its worker process for that reason.
//
//   node server.mjs --port 9400 --redis redis://127.0.0.1:6379 --key sio-run1 --instance a
//
// Socket.IO's defaults are kept (pingInterval 25 s, no per-message deflate);
// the transport is WebSocket only, like the relay's clients.
import { createServer } from "node:http";
import { parseArgs } from "node:util";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const { values: opt } = parseArgs({
  options: {
    port: { type: "string", default: "0" },
    redis: { type: "string", default: "redis://127.0.0.1:6379" },
    // The adapter's channel prefix: unique per run, so runs (and other users
    // of a shared Redis) do not hear each other.
    key: { type: "string", default: "socket.io" },
    instance: { type: "string", default: "sio" },
  },
});

const pub = createClient({ url: opt.redis });
const sub = pub.duplicate();
for (const c of [pub, sub]) c.on("error", (e) => console.error(`redis: ${e.message}`));
await Promise.all([pub.connect(), sub.connect()]);

// noDelay: the same TCP_NODELAY as the relay (Node's default too, set here so
// it does not depend on the Node version).
const http = createServer({ noDelay: true });
const io = new Server(http, { transports: ["websocket"], serveClient: false });
io.adapter(createAdapter(pub, sub, { key: opt.key }));

let next = 0;
io.on("connection", (socket) => {
  const user = String(socket.handshake.query.user ?? "");
  socket.on("join", (room, ack) => {
    socket.join(String(room));
    if (typeof ack === "function") ack({ room, members: [], recovered: true });
  });
  socket.on("send", (m, ack) => {
    const room = m && String(m.room);
    if (!socket.rooms.has(room)) {
      if (typeof ack === "function") ack({ error: "not_joined", cid: m?.cid });
      return;
    }
    next += 1;
    const id = `${opt.instance}-${next}`;
    // The relay's message frame, field for field (seq: this instance's count).
    io.to(room).emit("message", { room, id, user, text: String(m.text), ts: Date.now(), kind: "chat", seq: next });
    if (typeof ack === "function") ack({ cid: m.cid, id });
  });
});

http.listen(Number(opt.port), "127.0.0.1", () => {
  console.error(`socket.io listening on ${http.address().port}`);
});

const stop = async () => {
  io.close();
  await Promise.allSettled([pub.quit(), sub.quit()]);
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
