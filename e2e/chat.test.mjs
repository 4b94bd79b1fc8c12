// Drives the real client in Debian's headless Chromium (never a downloaded
// browser) against a real relay started by run.sh (RELAY_URL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const URL = process.env.RELAY_URL || 'http://127.0.0.1:8080';
const ARTIFACTS = process.env.ARTIFACTS || 'artifacts';
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
after(() => browser.close());

const problems = [];
async function player(name, room, viewport = { width: 1000, height: 640 }) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => problems.push(`${name}: ${e}`));
  // Console errors count as failures; the browser's own /favicon.ico probe does not.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.location().url?.endsWith('/favicon.ico')) problems.push(`${name}: console ${m.text()}`);
  });
  page.on('dialog', (d) => { problems.push(`${name}: dialog ${d.message()}`); d.dismiss(); });
  await page.goto(URL);
  await page.fill('[data-testid=name]', name);
  await page.click('[data-testid=connect]');
  await page.fill('[data-testid=room]', room);
  await page.click('[data-testid=join]');
  await page.waitForSelector(`[data-testid="tab-${room}"]`);
  return page;
}
// Each room has its own list in #messages; only the current room's is visible.
const LINES = '#messages ul:not([hidden]) li:not(.presence)';
const texts = (page) => page.$$eval(LINES, (ls) => ls.map((l) => l.textContent));
const count = (page, n, extra = '') => page.waitForFunction(
  ([sel, k]) => document.querySelectorAll(sel).length >= k, [LINES + extra, n]);
async function say(page, text) {
  await page.fill('[data-testid=composer-text]', text);
  await page.press('[data-testid=composer-text]', 'Enter');
}

test('two players chat, history survives a reload, text stays text', async () => {
  const room = `chat.e2e${Date.now()}`;
  const a = await player('alice', room);
  const b = await player('bob', room);
  await a.waitForFunction(() => document.querySelector('#members')?.textContent.includes('bob'));
  await say(a, 'hello from alice');
  await say(b, '<img src=x onerror=alert(1)>');
  const want = ['alicehello from alice', 'bob<img src=x onerror=alert(1)>'];
  for (const p of [a, b]) {
    await count(p, 2, ':not(.pending)');
    await p.waitForTimeout(300);
    assert.deepEqual(await texts(p), want, 'each message once, in order, acked');
    assert.equal(await p.$$eval('#messages img', (x) => x.length), 0, 'no <img> element was created');
  }
  // Own-message latency is measured.
  await a.waitForFunction(() => /ms/.test(document.querySelector('[data-testid=latency]').textContent));
  assert.ok(await a.$$eval('#spark polyline', (x) => x.length), 'latency sparkline drawn');
  // Reload: name and room come back, with the history and no duplicates.
  await b.reload();
  await count(b, 2);
  await b.waitForTimeout(500);
  assert.deepEqual(await texts(b), want, 'history after reload, no duplicates');
  assert.equal(await b.textContent('[data-testid=me]'), 'bob', 'same name after reload');
  assert.equal(await b.getAttribute(`[data-testid="tab-${room}"]`, 'aria-selected'), 'true', 'same room after reload');
  assert.equal(await b.textContent('[data-testid=backend]'), 'memory');
  mkdirSync(ARTIFACTS, { recursive: true });
  await a.waitForFunction(() => document.querySelector('#serverstats')?.textContent.includes('connections'));
  await a.screenshot({ path: `${ARTIFACTS}/chat.png` });
  // Phone width: one column, no sideways scrolling, the side panel behind #toggle-side.
  const c = await player('carol', room, { width: 390, height: 800 });
  await count(c, 2);
  assert.deepEqual(await texts(c), want, 'history on join at phone width');
  assert.ok(await c.evaluate(() => document.documentElement.scrollWidth <= 390), 'no horizontal scroll');
  assert.equal(await c.isVisible('#side'), false, 'side panel starts closed on a phone');
  await c.click('[data-testid=toggle-side]');
  assert.equal(await c.isVisible('#side'), true, 'toggle opens the side panel');
  await c.click('[data-testid=toggle-side]');
  await c.screenshot({ path: `${ARTIFACTS}/chat-phone.png` });
  assert.deepEqual(problems, [], 'no page errors, no dialogs');
});
