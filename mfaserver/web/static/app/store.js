// The devices enrolled in this browser, kept in IndexedDB. A CryptoKey can be
// stored as it is (structured clone), non-extractable as it was made.
// A device: {id, user, kind, privateKey, publicKey, notify ("webpush" or null), enrolled}.

const NAME = 'mfaserver-authenticator';
const DEVICES = 'devices';

function open() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(DEVICES, { keyPath: 'id' });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function run(mode, operation) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(DEVICES, mode);
    const request = operation(transaction.objectStore(DEVICES));
    transaction.oncomplete = () => { db.close(); resolve(request.result); };
    transaction.onerror = transaction.onabort = () => { db.close(); reject(transaction.error); };
  });
}

/** Every device, oldest first. */
export async function listDevices() {
  const devices = await run('readonly', (store) => store.getAll());
  return devices.sort((a, b) => a.enrolled - b.enrolled);
}

export const saveDevice = (device) => run('readwrite', (store) => store.put(device));

export const forgetDevice = (id) => run('readwrite', (store) => store.delete(id));
