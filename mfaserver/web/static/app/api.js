// Talking to the server: the signed requests of the device API, the server's
// clock, and what each refusal means, in words.

import {
  answerMessage, enrollMessage, newNonce, pollMessage, sign, tokenDigest,
} from './protocol.js';

// Seconds to add to this device's clock to get the server's, learned from the
// Date header of its answers: signed requests must be within a minute of it.
let offset = 0;

/** The server's time now, in whole seconds. */
export function now() {
  return Math.floor(Date.now() / 1000 + offset);
}

/** A time of the server's (epoch seconds) as a Date of this device's clock. */
export function localDate(serverSeconds) {
  return new Date((serverSeconds - offset) * 1000);
}

function learnClock(response) {
  const date = Date.parse(response.headers.get('Date') || '');
  if (Number.isNaN(date)) return;
  const measured = (date - Date.now()) / 1000;
  // The header has whole seconds: only a real difference moves the offset.
  if (Math.abs(measured - offset) > 3) offset = Math.round(measured);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Send the request `build(timestamp)` describes; its JSON answer, or an ApiError.
 * A stale timestamp is signed again once, at the server's time. */
async function send(build, signal) {
  for (let attempt = 0; ; attempt += 1) {
    const { url, init } = await build(now());
    let response;
    try {
      response = await fetch(url, { ...init, cache: 'no-store', signal });
    } catch (error) {
      if (signal && signal.aborted) throw error;
      throw new ApiError(0, 'network', String(error));
    }
    learnClock(response);
    const body = await response.json().catch(() => null);
    if (response.ok) return body;
    const code = (body && body.error) || 'failed';
    if (code === 'stale_timestamp' && attempt === 0) continue;
    throw new ApiError(response.status, code, (body && body.message) || response.statusText);
  }
}

function post(url, body) {
  return { url, init: { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body) } };
}

/** The server's settings for the app: {vapid_public_key}. */
export async function settings() {
  return send(async () => ({ url: '/app/settings.json', init: {} }));
}

/** Enroll `key` ({kind, privateKey, publicKey}) with the token; {device_id, user}. */
export async function enroll(token, key, notify) {
  const digest = await tokenDigest(token);
  return send(async (timestamp) => {
    const message = enrollMessage(digest, key.publicKey, timestamp);
    const body = { public_key: key.publicKey, timestamp,
      signature: await sign(key.kind, key.privateKey, message) };
    if (notify) body.notify = notify;
    return post(`/v1/enroll/${encodeURIComponent(token)}`, body);
  });
}

/** The transactions pending for the device, after a long poll of up to `wait` seconds. */
export async function poll(device, wait, signal) {
  const body = await send(async (timestamp) => {
    const nonce = newNonce();
    const signature = await sign(device.kind, device.privateKey,
      pollMessage(device.id, timestamp, nonce));
    return { url: `/v1/devices/${device.id}/transactions?wait=${wait}`, init: { headers: {
      'X-MFA-Timestamp': String(timestamp), 'X-MFA-Nonce': nonce, 'X-MFA-Signature': signature,
    } } };
  }, signal);
  return body.transactions;
}

/** Answer a transaction ("approve", "deny" or "fraud"); the decision recorded. */
export async function answer(device, txid, decision) {
  const body = await send(async (timestamp) => post(`/v1/transactions/${txid}`, {
    device_id: device.id, decision, timestamp,
    signature: await sign(device.kind, device.privateKey,
      answerMessage(device.id, txid, decision, timestamp)),
  }));
  return body.decision;
}

const WORDS = {
  network: 'The server cannot be reached. Check the connection; this page keeps trying.',
  stale_timestamp: 'This phone’s clock is more than a minute off. Set the date and time '
    + 'to automatic, then try again.',
  unauthorized: 'The server no longer knows this browser for this account: an '
    + 'administrator may have removed it.',
};
const SIGN_IN_WORDS = {
  not_found: 'The server does not know this sign-in (any more).',
  already_answered: 'This sign-in was answered already, here or on another device.',
  expired: 'This sign-in has expired or was closed (a wrong number, or the service gave '
    + 'up). If it was yours, sign in again.',
};
const LINK_WORDS = {
  not_found: 'The server does not know this enrollment link. Check that you have the whole '
    + 'link, or ask your administrator for a new one.',
  expired: 'This enrollment link has expired or was used already. Ask your administrator '
    + 'for a new one.',
};

/** What went wrong, for a person; `about` is "sign-in" or "link". */
export function describe(error, about = 'sign-in') {
  const words = { ...WORDS, ...(about === 'link' ? LINK_WORDS : SIGN_IN_WORDS) };
  if (error instanceof ApiError) {
    if (words[error.code]) return words[error.code];
    if (error.status === 429 || error.status >= 500) {
      return 'The server is busy or has a problem. Try again in a minute.';
    }
    return `The server refused this: ${error.message}`;
  }
  if (error && error.name === 'AbortError') return 'The server took too long to answer.';
  return `Something went wrong in this browser: ${error}`;
}
