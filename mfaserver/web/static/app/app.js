// The authenticator (/app/): one long poll per device enrolled in this browser,
// the sign-ins waiting, and the signed answers. Everything the server sends is
// shown as text (never as HTML).

import { answer, describe, localDate, now, poll, settings } from './api.js';
import { enrollThisBrowser, enrolledWords, showHomeScreenSteps } from './enrollment.js';
import { forgetDevice, listDevices } from './store.js';

const LONG_POLL = 30;               // seconds the server may hold a poll
const POLL_TIMEOUT_MS = 45000;
const RECHECK_MS = 2000;            // with sign-ins shown: soon drop those answered elsewhere

const $ = (id) => document.getElementById(id);
const devices = new Map();          // id -> {device, status, stopped}
const signins = new Map();          // txid -> {txn, seenBy: Set of device ids, card, busy}
const answered = new Set();         // txids answered here: a poll sent before may still list them
let vapidKey = null;

function el(tag, { role, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  if (role) node.setAttribute('role', role);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function say(node, text, kind = '') {
  node.textContent = text;
  node.className = `result ${kind}`;
}

// --- the accounts of this browser --------------------------------------------------

function renderAccounts() {
  const list = $('accounts');
  list.replaceChildren(...Array.from(devices.values(), (entry) => {
    const { device } = entry;
    const item = el('li', { className: 'account' },
      el('strong', { textContent: device.user }),
      el('span', { className: 'muted', textContent: ` · device ${device.id.slice(0, 8)}…` }),
      el('p', { className: 'muted', textContent: device.notify
        ? 'Notifications on.' : 'No notifications: keep this page open to see sign-ins.' }));
    if (entry.status) item.append(el('p', { className: 'error', textContent: entry.status }));
    if (entry.stopped) {
      const remove = el('button', { type: 'button', className: 'secondary',
        textContent: `Remove ${device.user} from this browser` });
      remove.addEventListener('click', async () => {
        await forgetDevice(device.id);
        devices.delete(device.id);
        renderAccounts();
        $('accounts-title').focus();
      });
      item.append(remove);
    }
    return item;
  }));
  $('accounts-empty').hidden = devices.size > 0;
  if (devices.size === 0) $('add').open = true;
  $('signins-section').hidden = devices.size === 0 && signins.size === 0;
}

function setStatus(entry, status) {
  if (entry.status !== status) {
    entry.status = status;
    renderAccounts();
  }
}

// --- polling -------------------------------------------------------------------------

async function pollLoop(entry) {
  let backoff = 1;
  while (!entry.stopped) {
    const started = Date.now();
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), POLL_TIMEOUT_MS);
    const showing = Array.from(signins.values()).some((s) => s.seenBy.has(entry.device.id));
    try {
      const transactions = await poll(entry.device, showing ? 0 : LONG_POLL, controller.signal);
      setStatus(entry, '');
      update(entry.device.id, transactions);
      backoff = 1;
      await sleep(transactions.length ? RECHECK_MS : Math.max(0, 1000 - (Date.now() - started)));
    } catch (error) {
      if (error.code === 'unauthorized') {
        entry.stopped = true;
        update(entry.device.id, []);
      }
      if (error.name !== 'AbortError') setStatus(entry, describe(error));
      if (!entry.stopped) await sleep(backoff * 1000 * (1 + Math.random()));
      backoff = Math.min(backoff * 2, 60);
    } finally {
      clearTimeout(timer);
    }
  }
}

function start(device) {
  if (devices.has(device.id)) return;
  const entry = { device, status: '', stopped: false };
  devices.set(device.id, entry);
  pollLoop(entry);
}

/** What one device's poll says is pending now. */
function update(deviceId, transactions) {
  const fresh = [];
  for (const txn of transactions.filter((t) => !answered.has(t.txid))) {
    let signin = signins.get(txn.txid);
    if (!signin) {
      signin = { txn, seenBy: new Set(), busy: false };
      signin.card = card(signin);
      signins.set(txn.txid, signin);
      $('signins').append(signin.card);
      fresh.push(signin);
    }
    signin.seenBy.add(deviceId);
  }
  const pending = new Set(transactions.map((t) => t.txid));
  for (const signin of signins.values()) {
    if (signin.seenBy.has(deviceId) && !pending.has(signin.txn.txid)) {
      signin.seenBy.delete(deviceId);
      if (signin.seenBy.size === 0 && !signin.busy) drop(signin);
    }
  }
  if (fresh.length) {
    $('announce').textContent = fresh.map((s) => `New sign-in: ${summary(s.txn)}.`
      + (s.txn.number ? ` Number ${s.txn.number}.` : '')).join(' ');
    if (document.activeElement === document.body) fresh[0].card.querySelector('h3').focus();
  }
  changed();
}

function changed() {
  $('signins-empty').hidden = signins.size > 0;
  document.title = signins.size ? `(${signins.size}) Sign-ins` : 'Sign-ins';
  tick();
}

function drop(signin) {
  const hadFocus = signin.card.contains(document.activeElement);
  signin.card.remove();
  signins.delete(signin.txn.txid);
  changed();
  if (hadFocus) $('signins-title').focus();
}

// --- one sign-in ---------------------------------------------------------------------

const summary = (txn) => `${txn.user} signing in to ${txn.client}`;
const whose = (txn) => `${txn.user}’s sign-in to ${txn.client}`;

function card(signin) {
  const { txn } = signin;
  const id = `signin-${txn.txid}`;
  const row = (term, value) => [el('dt', { textContent: term }), el('dd', { textContent: value })];
  const time = localDate(txn.created).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit',
    second: '2-digit' });
  const left = el('dd', { className: 'left' });
  const details = el('dl', {},
    ...row('From', txn.calling_station_id || 'not reported'),
    ...row('Through', txn.nas_ip ? `${txn.client} (${txn.nas_ip})` : txn.client),
    ...row('At', time),
    el('dt', { textContent: 'Time left' }), left);
  const number = txn.number && el('p', { className: 'number' },
    el('span', { textContent: 'Type this number at the sign-in prompt' }),
    el('strong', { textContent: txn.number }));

  const button = (text, className, decision) => {
    const b = el('button', { type: 'button', className, textContent: text });
    b.addEventListener('click', () => decide(signin, decision));
    return b;
  };
  const actions = el('div', { className: 'actions' }, button('Approve', '', 'approve'),
    button('Deny', 'secondary', 'deny'));
  const report = el('button', { type: 'button', className: 'danger', textContent: 'Report fraud' });
  actions.append(report);

  const warning = el('p', { tabIndex: -1, id: `${id}-fraud`, textContent: 'Report fraud only if '
    + 'you did not start this sign-in. The account is blocked at once: nobody can sign in as '
    + `${txn.user} until an administrator unblocks it. Then change your password.` });
  const cancel = el('button', { type: 'button', className: 'secondary', textContent: 'Cancel' });
  const confirm = el('div', { className: 'confirm', role: 'group', hidden: true },
    warning, el('div', { className: 'actions' },
      button('Yes, report fraud', 'danger', 'fraud'), cancel));
  confirm.setAttribute('aria-labelledby', `${id}-fraud`);
  report.addEventListener('click', () => {
    confirm.hidden = false;
    actions.hidden = true;
    warning.focus();
  });
  cancel.addEventListener('click', () => {
    confirm.hidden = true;
    actions.hidden = false;
    report.focus();
  });

  const item = el('li', { className: 'signin', id },
    el('h3', { tabIndex: -1, id: `${id}-title`, textContent: summary(txn) }), details, number,
    actions, confirm, el('p', { className: 'sending', role: 'status' }));
  item.setAttribute('aria-labelledby', `${id}-title`);
  signin.left = left;
  return item;
}

/** Count down every sign-in's time left; an expired one can no longer be answered. */
function tick() {
  for (const signin of signins.values()) {
    const left = signin.txn.expires - now();
    signin.left.textContent = left > 0 ? `${left} s` : 'Expired';
    if (left <= 0) signin.card.querySelectorAll('button').forEach((b) => { b.disabled = true; });
  }
}

const DONE = {
  approve: (txn) => `Approved: ${whose(txn)}.`
    + (txn.number ? ` Type ${txn.number} at the sign-in prompt if you have not yet.` : ''),
  deny: (txn) => `Denied: ${whose(txn)} is refused.`,
  fraud: (txn) => `Reported as fraud: ${whose(txn)} is refused, and ${txn.user} is blocked `
    + 'until an administrator unblocks the account. Change your password now.',
};

async function decide(signin, decision) {
  const { txn, card: item } = signin;
  const deviceId = Array.from(signin.seenBy).find((id) => devices.has(id)
    && !devices.get(id).stopped);
  if (!deviceId) return;
  signin.busy = true;
  item.querySelectorAll('button').forEach((b) => { b.disabled = true; });
  say(item.querySelector('.sending'), 'Sending…');
  try {
    const recorded = await answer(devices.get(deviceId).device, txn.txid, decision);
    say($('result'), DONE[recorded](txn), recorded === 'approve' ? 'ok' : 'error');
  } catch (error) {
    if (error.code === 'network' || error.code === 'stale_timestamp' || error.status >= 500) {
      // Nothing was recorded: the sign-in may still be answered.
      signin.busy = false;
      say(item.querySelector('.sending'), describe(error), 'error');
      item.querySelectorAll('button').forEach((b) => { b.disabled = false; });
      tick();
      return;
    }
    say($('result'), `Not answered: ${whose(txn)}. ${describe(error)}`, 'error');
  }
  answered.add(txn.txid);
  signin.busy = false;
  const hadFocus = item.contains(document.activeElement);
  drop(signin);
  if (hadFocus) $('result').focus();
}

// --- adding an account from a pasted link --------------------------------------------

function tokenFromLink(text) {
  try {
    const url = new URL(text, window.location.origin);
    const match = /^\/v1\/enroll\/([A-Za-z0-9_-]{1,128})$/.exec(url.pathname);
    return url.origin === window.location.origin && match ? match[1] : null;
  } catch (error) {
    return null;
  }
}

$('add-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('add-link');
  const status = $('add-status');
  const submit = event.target.querySelector('button');
  const token = tokenFromLink(input.value.trim());
  input.setAttribute('aria-invalid', String(!token));
  if (!token) {
    say(status, 'This is not an enrollment link of this server: it looks like '
      + `${window.location.origin}/v1/enroll/…`, 'error');
    input.focus();
    return;
  }
  submit.disabled = true;
  try {
    const enrolled = await enrollThisBrowser(token, (text) => say(status, text), vapidKey);
    say(status, enrolledWords(enrolled), 'ok');
    input.value = '';
    (await listDevices()).forEach(start);
    renderAccounts();
  } catch (error) {
    say(status, describe(error, 'link'), 'error');
  } finally {
    submit.disabled = false;
  }
});

// --- start ---------------------------------------------------------------------------

async function main() {
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('/app/sw.js', { scope: '/app/' }).catch(() => {});
  }
  setInterval(tick, 1000);
  $('result').tabIndex = -1;
  (await listDevices()).forEach(start);
  renderAccounts();
  changed();
  $('add').open = devices.size === 0;
  try {
    vapidKey = (await settings()).vapid_public_key;
    showHomeScreenSteps(vapidKey);
  } catch (error) {
    // The polls say that the server cannot be reached.
  }
}

main().catch((error) => say($('result'), describe(error), 'error'));
