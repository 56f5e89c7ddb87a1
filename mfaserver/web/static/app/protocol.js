// The push device protocol (docs/device-api.rst) in the browser: keys, signed
// messages and signatures, as mfaserver/factors/push_protocol.py makes them.
// WebCrypto only; the private key is made non-extractable and never leaves it.

const utf8 = new TextEncoder();

export const KINDS = {
  ed25519: { generate: { name: 'Ed25519' }, sign: { name: 'Ed25519' } },
  p256: {
    generate: { name: 'ECDSA', namedCurve: 'P-256' },
    sign: { name: 'ECDSA', hash: 'SHA-256' },
  },
};

/** Unpadded base64url text of the bytes. */
export function b64urlEncode(bytes) {
  let text = '';
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** The bytes of unpadded base64url text; throws for anything else. */
export function b64urlDecode(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new Error('not unpadded base64url text');
  }
  const padded = text.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((text.length + 3) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

/** The SHA-256 of the enrollment token's text, as 64 lowercase hex digits. */
export async function tokenDigest(token) {
  const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', utf8.encode(token)));
  return Array.from(hash, (b) => b.toString(16).padStart(2, '0')).join('');
}

const ID = /^[A-Za-z0-9_-]{1,128}$/;

function checked(name, value, pattern = ID) {
  if (typeof value !== 'string' || !pattern.test(value)) throw new Error(`${name} is malformed`);
  return value;
}

function time(timestamp) {
  if (!Number.isSafeInteger(timestamp) || timestamp < 0) {
    throw new Error('timestamp must be a non-negative integer');
  }
  return String(timestamp);
}

// Messages: fields checked (none may hold a newline), joined by "\n".

export function enrollMessage(digest, publicKey, timestamp) {
  return ['mfaserver-enroll-v1', checked('token digest', digest, /^[0-9a-f]{64}$/),
    checked('public key', publicKey, /^(ed25519|p256):[A-Za-z0-9_-]+$/), time(timestamp)]
    .join('\n');
}

export function pollMessage(deviceId, timestamp, nonce) {
  return ['mfaserver-poll-v1', checked('device id', deviceId), time(timestamp),
    checked('nonce', nonce, /^[A-Za-z0-9_-]{16,128}$/)].join('\n');
}

export function answerMessage(deviceId, txid, decision, timestamp) {
  if (!['approve', 'deny', 'fraud'].includes(decision)) throw new Error('unknown decision');
  return ['mfaserver-answer-v1', checked('device id', deviceId), checked('txid', txid),
    decision, time(timestamp)].join('\n');
}

/** A fresh request nonce: 16 random bytes, base64url. */
export function newNonce() {
  return b64urlEncode(crypto.getRandomValues(new Uint8Array(16)));
}

/** A new key pair: {kind, privateKey (a non-extractable CryptoKey), publicKey (its text)}.
 * Ed25519 where the browser has it, else ECDSA P-256; `kind` forces one. */
export async function createKey(kind) {
  const kinds = kind ? [kind] : ['ed25519', 'p256'];
  for (const k of kinds) {
    let pair;
    try {
      pair = await crypto.subtle.generateKey(KINDS[k].generate, false, ['sign', 'verify']);
    } catch (error) {
      if (k === kinds[kinds.length - 1]) throw error;
      continue;     // no Ed25519 in this browser
    }
    const raw = new Uint8Array(await crypto.subtle.exportKey('raw', pair.publicKey));
    return { kind: k, privateKey: pair.privateKey, publicKey: `${k}:${b64urlEncode(raw)}` };
  }
  throw new Error('no key type');
}

/** The base64url signature of the message text with a key of `kind`. */
export async function sign(kind, privateKey, message) {
  const raw = new Uint8Array(await crypto.subtle.sign(KINDS[kind].sign, privateKey,
    utf8.encode(message)));
  return b64urlEncode(kind === 'p256' ? derSignature(raw) : raw);
}

/** WebCrypto's ECDSA signature (r || s, 32 bytes each) as the minimal DER the
 * protocol takes: SEQUENCE { INTEGER r, INTEGER s }. */
export function derSignature(raw) {
  const integer = (bytes) => {
    let start = 0;
    while (start < bytes.length - 1 && bytes[start] === 0) start += 1;
    const value = Array.from(bytes.subarray(start));
    if (value[0] & 0x80) value.unshift(0);    // keep it positive
    return [0x02, value.length, ...value];
  };
  const r = integer(raw.subarray(0, 32));
  const s = integer(raw.subarray(32, 64));
  return Uint8Array.from([0x30, r.length + s.length, ...r, ...s]);
}
