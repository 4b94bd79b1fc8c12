// A DungeonTalk-style front end — the real @stomp/stompjs client from npm,
// configured as a Spring STOMP client would be — chats with a browser user of
// the native client (the relay's own page in Debian's headless Chromium) and
// a native /ws client from Node. run.sh starts the relays for each bus:
// RELAY_A serves the browser and the native client, RELAY_B the STOMP client
// (two instances on one bus for every backend but memory), BUS names it.
// With AUTH_SECRET set, the auth-on checks run instead.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

Object.assign(globalThis, { WebSocket });

const A = process.env.RELAY_A || 'http://127.0.0.1:8080';
const B = process.env.RELAY_B || A;
const BUS = process.env.BUS || 'memory';
const AUTH_SECRET = process.env.AUTH_SECRET;
const wsUrl = (http, path) => http.replace(/^http/, 'ws') + path;
const id = `${BUS.replace(/[^a-z]/g, '')}${Date.now()}`;

/** Resolves when `pred()` holds, polling; fails with `what` after `ms`. */
async function until(pred, what, ms = 15000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await pred()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A stompjs client as DungeonTalk's front end builds it; resolves on CONNECTED. */
function stomp(connectHeaders, extra = {}) {
  const log = { pongs: 0, errors: [], closes: [] };
  const client = new Client({
    brokerURL: wsUrl(B, '/stomp'),
    connectHeaders,
    heartbeatIncoming: 1000,
    heartbeatOutgoing: 1000,
    reconnectDelay: 0,
    debug: (m) => { if (m === '<<< PONG') log.pongs += 1; },
    ...extra,
  });
  client.onStompError = (f) => log.errors.push(f);
  client.onWebSocketClose = (e) => log.closes.push(e.code);
  const connected = new Promise((resolve) => {
    client.onConnect = (frame) => resolve(frame);
  });
  client.activate();
  return { client, log, connected };
}

/** A native /ws client in Node (the `ws` package): joins `room`, collects frames. */
async function native(url, room) {
  const frames = [];
  const ws = new WebSocket(url);
  ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
  await new Promise((r, j) => { ws.on('open', r); ws.on('error', j); });
  ws.send(JSON.stringify({ type: 'join', room }));
  await until(() => frames.some((f) => f.type === 'joined'), `${room} joined`);
  return { ws, frames, say: (text) => ws.send(JSON.stringify({ type: 'send', room, text })) };
}

function received(list) {
  return (pred) => list.map((m) => JSON.parse(m.body)).find(pred);
}

if (!AUTH_SECRET) {
  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--headless', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  after(() => browser.close());

  test(`${BUS}: @stomp/stompjs chats with a browser user of the native client`, async () => {
    const room = `chat.${id}`;
    // The browser user, on instance A.
    const page = await (await browser.newContext()).newPage();
    const problems = [];
    page.on('pageerror', (e) => problems.push(String(e)));
    await page.goto(A);
    await page.fill('[data-testid=name]', 'bella');
    await page.click('[data-testid=connect]');
    await page.fill('[data-testid=room]', room);
    await page.click('[data-testid=join]');
    await page.waitForSelector(`[data-testid="tab-${room}"]`);
    // The tab appears when the join is sent; the member list once `joined`
    // came back, i.e. once the relay recorded bella's presence. Waiting for
    // the tab alone let the STOMP user below look before that (seen once in
    // CI on BUS=redis: "STOMP sees the browser user: dora").
    await page.waitForFunction(() => document.querySelector('#members')?.textContent.includes('bella'));

    // The STOMP user, on instance B: DungeonTalk's calls, verbatim.
    const { client, log, connected } = stomp({ login: 'dora' });
    const frame = await connected;
    assert.equal(frame.headers.version, '1.2');
    assert.equal(frame.headers['user-name'], 'dora');
    const chat = [];
    const ai = [];
    client.subscribe(`/sub/chat/room/${id}`, (m) => chat.push(m));
    client.subscribe(`/sub/aichat/room/${id}`, (m) => ai.push(m), { ack: 'client-individual' });

    // Members: each side sees the other.
    await until(() => received(chat)((b) => b.event === 'members'), 'members message');
    const members = received(chat)((b) => b.event === 'members').members;
    assert.ok(members.includes('bella'), `STOMP sees the browser user: ${members}`);
    await page.waitForFunction(() => document.querySelector('#members')?.textContent.includes('dora'));

    // STOMP → browser, with a receipt once the bus accepted it.
    const receipt = new Promise((r) => client.watchForReceipt('r1', r));
    client.publish({
      destination: '/pub/chat/message',
      body: JSON.stringify({ roomId: id, content: 'hi from stompjs' }),
      headers: { receipt: 'r1' },
    });
    const r = await receipt;
    assert.ok(r.headers['message-id'], 'the receipt names the message id');
    await page.waitForFunction(() => [...document.querySelectorAll('#messages li')]
      .some((l) => l.textContent.includes('dora') && l.textContent.includes('hi from stompjs')));
    await until(() => received(chat)((b) => b.content === 'hi from stompjs'), 'own message back');
    const own = received(chat)((b) => b.content === 'hi from stompjs');
    assert.equal(own.id, r.headers['message-id']);
    assert.deepEqual([own.sender, own.roomId, own.type], ['dora', id, 'chat']);
    assert.ok(own.timestamp, 'timestamp');

    // Browser → STOMP.
    await page.fill('[data-testid=composer-text]', 'hello dora');
    await page.press('[data-testid=composer-text]', 'Enter');
    await until(() => received(chat)((b) => b.content === 'hello dora'), 'the browser message over STOMP');
    const m = chat.find((x) => JSON.parse(x.body).content === 'hello dora');
    assert.equal(JSON.parse(m.body).sender, 'bella');
    assert.equal(m.headers.destination, `/sub/chat/room/${id}`);
    assert.equal(m.headers['content-type'], 'application/json');

    // AI-game room: /pub/aichat/send reaches STOMP and a native client on A.
    const n = await native(wsUrl(A, '/ws?user=nate'), `ai.${id}`);
    client.publish({ destination: '/pub/aichat/send', body: JSON.stringify({ roomId: id, content: 'the dragon wakes' }) });
    await until(() => received(ai)((b) => b.content === 'the dragon wakes'), 'ai message over STOMP');
    const aiMsg = ai.find((x) => JSON.parse(x.body).content === 'the dragon wakes');
    assert.ok(aiMsg.headers.ack, 'client-individual carries an ack header');
    aiMsg.ack();
    await until(() => n.frames.some((f) => f.type === 'message' && f.text === 'the dragon wakes' && f.user === 'dora'),
      'ai message at the native client');
    n.say('native says hi');
    await until(() => received(ai)((b) => b.content === 'native says hi' && b.sender === 'nate'), 'native → STOMP');
    n.ws.close();

    // Heart-beats both ways (STOMP_HEARTBEAT_MS=1000 in run.sh): the server
    // beats while the room is quiet, and the connection stays up.
    const before = log.pongs;
    await new Promise((res) => setTimeout(res, 2600));
    assert.ok(log.pongs - before >= 1, `server heart-beats received: ${log.pongs - before}`);
    assert.ok(client.connected, 'still connected after quiet heart-beat periods');
    assert.deepEqual(log.errors, []);

    // A bad destination: an ERROR frame with a clear message, then close.
    const bad = stomp({ login: 'eve' });
    await bad.connected;
    bad.client.subscribe('/topic/nope', () => {});
    await until(() => bad.log.errors.length > 0, 'ERROR frame');
    assert.match(bad.log.errors[0].headers.message, /unknown destination/);
    await until(() => bad.log.closes.length > 0, 'close after ERROR');
    await bad.client.deactivate();

    await client.deactivate();
    assert.deepEqual(problems, [], 'no page errors');
  });
} else {
  const b64 = (s) => Buffer.from(s).toString('base64url');
  const jwt = (claims) => {
    const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
    const body = b64(JSON.stringify(claims));
    const sig = createHmac('sha256', AUTH_SECRET).update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${sig}`;
  };
  const token = jwt({ sub: 'frodo', exp: Math.floor(Date.now() / 1000) + 600 });

  test(`${BUS}, auth on: the token names the STOMP user; no token is an ERROR`, async () => {
    const none = stomp({ login: 'frodo' });
    await until(() => none.log.errors.length > 0, 'ERROR without a token');
    assert.equal(none.log.errors[0].headers.code, 'unauthorized');
    await none.client.deactivate();

    const viaPasscode = stomp({ login: 'someone-else', passcode: token });
    assert.equal((await viaPasscode.connected).headers['user-name'], 'frodo');
    const got = [];
    viaPasscode.client.subscribe(`/sub/chat/room/${id}`, (m) => got.push(m));
    const viaBearer = stomp({ Authorization: `Bearer ${token}` });
    assert.equal((await viaBearer.connected).headers['user-name'], 'frodo');
    const n = await native(wsUrl(A, `/ws?token=${token}`), `chat.${id}`);
    viaBearer.client.publish({ destination: '/pub/chat/message', body: JSON.stringify({ roomId: id, content: 'one ring' }) });
    await until(() => received(got)((b) => b.content === 'one ring' && b.sender === 'frodo'), 'authenticated message');
    await until(() => n.frames.some((f) => f.type === 'message' && f.text === 'one ring'), 'at the native client');
    n.ws.close();
    await viaPasscode.client.deactivate();
    await viaBearer.client.deactivate();
  });
}
