/*!
 * im.client.js: the JavaScript SDK of the family-doctor IM server (SPEC §7 and §8).
 *
 * One plain file, no dependencies (jQuery or not, it does not care). Exposes a global `IMClient`
 * in browsers, `module.exports` under CommonJS, `define()` under AMD, and `im.client.mjs` wraps it
 * for `import`. See sdk/README.md for the API and an example.
 *
 * Guarantees, in short:
 *   - sends resolve with the stored message (the server's `ack`) and reject with its `error`;
 *   - a send interrupted by a dropped connection is re-sent after reconnecting with the SAME
 *     clientMsgId, and the server is idempotent per sender + clientMsgId, so it is stored once;
 *   - incoming messages are de-duplicated by `id` (delivery is at least once across reconnects);
 *   - `received` markers are sent automatically, never past a message this client has not seen;
 *   - an app-level ping every ~20 s; no answer in time means the connection is dead;
 *   - reconnects with exponential back-off and jitter (one function for every wait), asks the
 *     optional `getToken` hook for a fresh token before every attempt, and stops (error
 *     `unauthenticated`) when the server refuses the token;
 *   - `history()` pages a conversation's stored messages over REST, newest page first;
 *     `receipts(message)` says when each recipient received and read one of them;
 *   - `recall(message)` / `edit(message, content)` change a stored message (SPEC §14); the
 *     `recalled` / `edited` events carry the changed message when its notice arrives.
 *
 * The connection has one state, `client.state`: "idle" (never started), "connecting" (a handshake
 * or a back-off wait), "open", "closed" (close() or a refused token); every change emits
 * `statechange`.
 */
(function (root, factory) {
  "use strict";
  var IMClient = factory(root);
  if (typeof module === "object" && module && module.exports) {
    module.exports = IMClient;
    module.exports.IMClient = IMClient;
    module.exports.default = IMClient;
  } else {
    if (typeof define === "function" && define.amd) {
      define([], function () { return IMClient; });
    }
    // Also global in browsers (with AMD too), and when evaluated as an ES module by im.client.mjs.
    if (root) root.IMClient = IMClient;
  }
})(typeof globalThis !== "undefined" ? globalThis
  : typeof self !== "undefined" ? self
  : typeof window !== "undefined" ? window : this, function (root) {
  "use strict";

  var VERSION = "1.0.0";

  // WebSocket readyState values (not every implementation exposes the constants on instances).
  var WS_CONNECTING = 0;
  var WS_OPEN = 1;

  // SPEC §7: the server closes the connection (1009) on frames over 64 KiB; refuse those up front,
  // otherwise a re-sent oversized message would kill every new connection.
  var MAX_FRAME_BYTES = 64 * 1024;

  // Server error codes worth retrying with the same clientMsgId (idempotent on the server).
  var RETRYABLE_CODES = { database_unavailable: true, rate_limited: true };

  // SPEC §14: the notices that announce a change of an earlier message (its id in `target`).
  var EVENT_RECALLED = "message.recalled";
  var EVENT_EDITED = "message.edited";

  // The highest seq a page of history can ask below (the server's bound; JavaScript's safe integer).
  var NEWEST_SEQ = 9007199254740991;
  var MAX_HISTORY_LIMIT = 200;

  var DEFAULTS = {
    url: null,                    // http(s) origin of the server; default: the page's origin
    token: null,                  // the JWT (optional when getToken is given)
    getToken: null,               // async () => a fresh JWT, called before every connection attempt
    WebSocket: null,              // a WebSocket implementation (default: the global one)
    heartbeatIntervalMs: 20000,   // app-level {"type":"ping"} every this long
    pongTimeoutMs: 10000,         // no frame at all this long after a ping: the connection is dead
    connectTimeoutMs: 10000,      // a handshake still pending after this long is abandoned
    reconnectMinDelayMs: 500,     // back-off: first delay ...
    reconnectMaxDelayMs: 30000,   // ... doubling up to this, with jitter
    autoReceive: true,            // send `received` markers automatically after `message` events
    receivedDelayMs: 50,          // coalesce `received` frames over this window
    maxSendRetries: 5,            // retries of a send answered by a retryable error
    dedupeWindow: 10000,          // how many message ids are remembered for de-duplication
    messageCacheSize: 2000,       // how many recent messages are kept to build `recalled` / `edited`
    checkTokenPath: "/api/v1/status"  // REST path used to tell a refused token from a down server
  };

  // ---- small helpers ------------------------------------------------------------------------

  function IMError(code, message, extra) {
    var error = new Error(message || code);
    Object.setPrototypeOf(error, IMError.prototype);
    error.name = "IMError";
    error.code = code;
    if (extra) {
      for (var key in extra) {
        if (Object.prototype.hasOwnProperty.call(extra, key)) error[key] = extra[key];
      }
    }
    return error;
  }
  IMError.prototype = Object.create(Error.prototype, {
    constructor: { value: IMError, writable: true, configurable: true }
  });

  function randomId() {
    var c = root && root.crypto;
    if (c && typeof c.randomUUID === "function") {
      try { return c.randomUUID(); } catch (e) { /* insecure context: fall through */ }
    }
    var bytes = new Array(16);
    if (c && typeof c.getRandomValues === "function") {
      var buf = new Uint8Array(16);
      c.getRandomValues(buf);
      for (var i = 0; i < 16; i++) bytes[i] = buf[i];
    } else {
      for (var j = 0; j < 16; j++) bytes[j] = Math.floor(Math.random() * 256);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;  // RFC 4122 version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = bytes.map(function (b) { return (b + 0x100).toString(16).slice(1); }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" +
      hex.slice(16, 20) + "-" + hex.slice(20);
  }

  function base64UrlDecode(text) {
    var b64 = String(text).replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    var binary;
    if (typeof root.atob === "function") binary = root.atob(b64);
    else if (typeof Buffer !== "undefined") binary = Buffer.from(b64, "base64").toString("binary");
    else throw new Error("no base64 decoder");
    // The payload is UTF-8 JSON: turn the binary string into text.
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    if (typeof TextDecoder !== "undefined") return new TextDecoder("utf-8").decode(bytes);
    return decodeURIComponent(escape(binary));
  }

  /** The payload of a JWT (not verified: that is the server's job), or null if it is not one. */
  function decodeToken(token) {
    if (typeof token !== "string") return null;
    var parts = token.split(".");
    if (parts.length !== 3) return null;
    try {
      var payload = JSON.parse(base64UrlDecode(parts[1]));
      return payload && typeof payload === "object" ? payload : null;
    } catch (e) {
      return null;
    }
  }

  /**
   * The one back-off: attempt 0, 1, 2 ... waits about minMs, 2·minMs, 4·minMs ... up to maxMs, with
   * "equal jitter" (between half and all of that), so a crowd of clients spreads out.
   */
  function backoffDelay(attempt, minMs, maxMs) {
    var ceiling = Math.min(maxMs, minMs * Math.pow(2, Math.max(0, attempt)));
    return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
  }

  function utf8Length(text) {
    if (typeof TextEncoder !== "undefined") return new TextEncoder().encode(text).length;
    return unescape(encodeURIComponent(text)).length;
  }

  function defaultOrigin() {
    return root && root.location && root.location.origin && root.location.origin !== "null"
      ? root.location.origin : null;
  }

  /** The conversation a message belongs to, from this user's point of view (null: unknown). */
  function conversationOf(message, me) {
    if (message.channel === "pm") {
      // Consultation events and recall/edit notices name both parties: their operator (`from`)
      // may be staff.
      if (typeof message.doctor === "string" && typeof message.patient === "string") {
        return { channel: "pm", peer: message.doctor === me ? message.patient : message.doctor };
      }
      if (Array.isArray(message.parties) && message.parties.length === 2) {
        return { channel: "pm", peer: message.parties[0] === me ? message.parties[1] : message.parties[0] };
      }
      var peer = message.from !== me ? message.from : message.to;
      return typeof peer === "string" ? { channel: "pm", peer: peer } : null;
    }
    if (message.channel === "gm") {
      return typeof message.group === "string" ? { channel: "gm", group: message.group } : null;
    }
    if (message.channel === "sm") return { channel: "sm" };
    return null;
  }

  /** A copy of a message with some fields changed. */
  function withFields(message, fields) {
    var out = {};
    var key;
    for (key in message) {
      if (Object.prototype.hasOwnProperty.call(message, key)) out[key] = message[key];
    }
    for (key in fields) {
      if (Object.prototype.hasOwnProperty.call(fields, key)) out[key] = fields[key];
    }
    return out;
  }

  /**
   * The message a recall/edit notice is about, as it now is: built from the message as this client
   * last saw it (`known`, or null) and the notice, which carries the operator (`from`), the time
   * (`createdAt`) and, for an edit, the new content. Without `known`, only what the notice says.
   */
  function changedByNotice(notice, known) {
    var base = known || { id: notice.target, channel: notice.channel };
    if (!known) {
      if (notice.group !== undefined) base.group = notice.group;
      if (notice.parties !== undefined) base.parties = notice.parties;
      if (notice.channel === "sm") base.to = notice.to;
    }
    if (notice.event === EVENT_RECALLED) {
      if (base.recalled) return base;
      return withFields(base, { content: "", recalled: true, recalledAt: notice.createdAt, recalledBy: notice.from });
    }
    // Already showing this edit (the ack, or a later history page, came first).
    if (known && known.editCount && known.content === notice.content && known.contentType === notice.contentType) {
      return known;
    }
    return withFields(base, {
      content: notice.content,
      contentType: notice.contentType,
      editedAt: notice.createdAt,
      editedBy: notice.from,
      editCount: (base.editCount || 0) + 1
    });
  }

  /** {channel, id} of a stored message (or of the arguments channel, id), or a TypeError. */
  function storedMessageRef(name, messageOrChannel, id) {
    var channel = messageOrChannel;
    if (messageOrChannel && typeof messageOrChannel === "object") {
      channel = messageOrChannel.channel;
      id = messageOrChannel.id;
    }
    if (channel !== "sm" && channel !== "pm" && channel !== "gm") {
      throw new TypeError(name + ": channel must be sm, pm or gm");
    }
    if (typeof id !== "string" || !id) throw new TypeError(name + ": a stored message's id is needed");
    return { channel: channel, id: id };
  }

  function conversationKey(conv) {
    if (conv.channel === "pm") return "pm\u0000" + conv.peer;
    if (conv.channel === "gm") return "gm\u0000" + conv.group;
    return "sm";
  }

  /** A {channel, peer|group, seq} marker from the caller's object, validated. */
  function markerFrame(type, spec) {
    if (!spec || typeof spec !== "object") throw new TypeError(type + ": expected {channel, peer|group, seq}");
    var seq = Number(spec.seq);
    if (!(seq >= 0) || Math.floor(seq) !== seq) throw new TypeError(type + ": seq must be an integer >= 0");
    var frame = { type: type, channel: spec.channel, seq: seq };
    if (spec.channel === "pm") {
      if (typeof spec.peer !== "string" || !spec.peer) throw new TypeError(type + ": pm needs a peer");
      frame.peer = spec.peer;
    } else if (spec.channel === "gm") {
      if (typeof spec.group !== "string" || !spec.group) throw new TypeError(type + ": gm needs a group");
      frame.group = spec.group;
    } else if (spec.channel !== "sm") {
      throw new TypeError(type + ": channel must be sm, pm or gm");
    }
    return frame;
  }

  function checkSeqBound(name, value) {
    var n = Number(value);
    if (!(n >= 0) || Math.floor(n) !== n || n > NEWEST_SEQ) {
      throw new TypeError("history: " + name + " must be an integer seq >= 0");
    }
    return n;
  }

  function isoTime(name, value) {
    if (typeof value !== "string" && !(value instanceof Date)) {
      throw new TypeError("history: " + name + " must be a Date or an ISO 8601 string");
    }
    var date = value instanceof Date ? value : new Date(value);
    if (isNaN(date.getTime())) throw new TypeError("history: " + name + " is not a valid time");
    // A string is passed as given (it may carry its own offset); a Date as UTC.
    return typeof value === "string" ? value : date.toISOString();
  }

  /**
   * {channel, params} for GET /api/v1/chats/{channel} from history()'s spec, validated.
   * Without `after` (or a cursor) it asks below `before`, newest seq by default: the newest page.
   */
  function historyQuery(spec, me) {
    if (!spec || typeof spec !== "object") throw new TypeError("history: expected {channel, peer|group, ...}");
    var params = {};
    var channel = spec.channel;
    if (channel === "pm" || channel === "sm") {
      var user = spec.user !== undefined ? spec.user : me;
      if (typeof user !== "string" || !user) throw new TypeError("history: user is unknown (pass `user`)");
      params.user_id = user;
      if (channel === "pm") {
        if (typeof spec.peer !== "string" || !spec.peer) throw new TypeError("history: pm needs a peer");
        params.peer = spec.peer;
      }
    } else if (channel === "gm") {
      if (typeof spec.group !== "string" || !spec.group) throw new TypeError("history: gm needs a group");
      params.group = spec.group;
    } else {
      throw new TypeError("history: channel must be sm, pm or gm");
    }
    if (spec.limit !== undefined && spec.limit !== null) {
      var limit = Number(spec.limit);
      if (!(limit >= 1) || Math.floor(limit) !== limit || limit > MAX_HISTORY_LIMIT) {
        throw new TypeError("history: limit must be an integer from 1 to " + MAX_HISTORY_LIMIT);
      }
      params.limit = limit;
    }
    if (spec.since !== undefined && spec.since !== null) params.since = isoTime("since", spec.since);
    if (spec.until !== undefined && spec.until !== null) params.until = isoTime("until", spec.until);
    if (spec.cursor !== undefined && spec.cursor !== null) {
      if (typeof spec.cursor !== "string" || !spec.cursor) throw new TypeError("history: cursor must be a page's `next`");
      params.cursor = spec.cursor;
      return { channel: channel, params: params };
    }
    if (spec.after !== undefined && spec.after !== null) params.after = checkSeqBound("after", spec.after);
    if (spec.before !== undefined && spec.before !== null) params.before = checkSeqBound("before", spec.before);
    else if (params.after === undefined) params.before = NEWEST_SEQ;
    return { channel: channel, params: params };
  }

  function queryString(params) {
    return Object.keys(params).map(function (k) {
      return encodeURIComponent(k) + "=" + encodeURIComponent(params[k]);
    }).join("&");
  }

  // ---- the client ---------------------------------------------------------------------------

  /**
   * new IMClient({url, token, getToken, ...options})
   *   url       http(s) origin of the server (default: the page's own origin)
   *   token     JWT; the user id is its `sub`
   *   getToken  optional async function returning a fresh JWT, called before every connection
   *             attempt (and once after a REST 401), so an expiring token can be refreshed
   */
  function IMClient(options) {
    if (!(this instanceof IMClient)) return new IMClient(options);
    var opts = {};
    var key;
    for (key in DEFAULTS) opts[key] = DEFAULTS[key];
    for (key in options || {}) {
      if (Object.prototype.hasOwnProperty.call(options, key) && options[key] !== undefined) opts[key] = options[key];
    }
    this.options = opts;
    this.url = String(opts.url || defaultOrigin() || "").replace(/\/+$/, "");
    if (!this.url) throw new TypeError("IMClient: url (the server's http(s) origin) is required here");
    this._WebSocket = opts.WebSocket || (root && root.WebSocket);
    if (!this._WebSocket) throw new TypeError("IMClient: no WebSocket implementation; pass options.WebSocket");
    if (opts.getToken !== null && typeof opts.getToken !== "function") {
      throw new TypeError("IMClient: getToken must be a function returning (a Promise of) a token");
    }
    this.token = null;
    this.userId = null;
    this.role = null;
    if (opts.token !== null || !opts.getToken) this.setToken(opts.token);

    this._listeners = {};
    this._state = "idle";          // the one connection state: idle | connecting | open | closed
    this._conn = null;             // the current attempt: {ws, opened}; null while waiting or stopped
    this._attempt = 0;             // consecutive attempts that did not end in a useful connection
    this._opens = 0;               // connections that opened (the first one is not a "reconnect")
    this._tokenRefusals = 0;       // consecutive refusals of a token from getToken
    this._connectWaiters = [];
    this._pending = new Map();     // clientMsgId -> {frame, promise, resolve, reject, retries, retryTimer}
    this._seen = new Set();        // message ids already emitted
    this._seenOrder = [];
    this._recent = new Map();      // message id -> the message as last seen (recall/edit events)
    this._marks = new Map();       // conversation key -> {conv, contig, acked: Set<seq>}
    this._receivedQueue = new Map();
    this._readQueue = new Map();   // read markers set while offline, sent on open
    this._timers = {};
    this._onOnline = this._onOnline.bind(this);
  }

  IMClient.VERSION = VERSION;
  IMClient.IMError = IMError;
  IMClient.decodeToken = decodeToken;
  IMClient.newId = randomId;
  IMClient.backoffDelay = backoffDelay;

  var proto = IMClient.prototype;

  Object.defineProperty(proto, "state", { get: function () { return this._state; } });
  Object.defineProperty(proto, "connected", { get: function () { return this._state === "open"; } });

  /** Replace the token (e.g. a refreshed one); used from the next connection attempt on. */
  proto.setToken = function (token) {
    if (typeof token !== "string" || !token) throw new TypeError("IMClient: token must be a non-empty string");
    this.token = token;
    var payload = decodeToken(token);
    this.userId = payload && typeof payload.sub === "string" ? payload.sub : null;
    this.role = payload && typeof payload.role === "string" ? payload.role : null;
  };

  // ---- events ---------------------------------------------------------------------------------

  /** Listen: message, recalled, edited, receipt, connected, disconnected, reconnecting, statechange, error. Returns this. */
  proto.on = function (event, fn) {
    if (typeof fn !== "function") throw new TypeError("IMClient.on: listener must be a function");
    (this._listeners[event] = this._listeners[event] || []).push(fn);
    return this;
  };

  /** Stop listening (fn omitted: every listener of that event). Returns this. */
  proto.off = function (event, fn) {
    var list = this._listeners[event];
    if (!list) return this;
    if (!fn) { delete this._listeners[event]; return this; }
    var at = list.indexOf(fn);
    if (at >= 0) list.splice(at, 1);
    return this;
  };

  proto._emit = function (event, payload) {
    var list = (this._listeners[event] || []).slice();
    for (var i = 0; i < list.length; i++) {
      try {
        list[i].call(this, payload);
      } catch (err) {
        // A broken listener must not break delivery (nor the received markers after it).
        if (root.console) root.console.error("IMClient: a '" + event + "' listener threw", err);
      }
    }
  };

  proto._setState = function (state) {
    var previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._emit("statechange", { state: state, previous: previous });
  };

  /** connect() was called and neither close() nor a refused token has stopped the client since. */
  proto._isActive = function () {
    return this._state === "connecting" || this._state === "open";
  };

  // ---- connection -----------------------------------------------------------------------------

  /** Open the connection; resolves when it is open, rejects (code unauthenticated) if refused. */
  proto.connect = function () {
    var self = this;
    if (this._state === "open") return Promise.resolve(this);
    var promise = new Promise(function (resolve, reject) {
      self._connectWaiters.push({ resolve: resolve, reject: reject });
    });
    if (!this._isActive()) {
      this._attempt = 0;
      this._tokenRefusals = 0;
      if (root.addEventListener) root.addEventListener("online", this._onOnline);
    }
    // Waiting out a back-off (no attempt under way): try now.
    if (!this._conn) this._open();
    return promise;
  };

  /** Drop the current connection (if any) and connect again now. */
  proto.reconnect = function () {
    if (!this._isActive()) return this.connect();
    this._abandon(4001, "reconnect requested");
    return this.connect();
  };

  /** Close for good: no reconnecting; pending sends reject with code "closed". */
  proto.close = function () {
    var wasOpen = this._state === "open";
    if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
    this._flushReceived();  // while still open: what this client has is not delivered again
    this._clearTimers();
    var conn = this._conn;
    this._conn = null;
    if (conn && conn.ws) {
      detachSocket(conn.ws);
      try { conn.ws.close(1000, "client closed"); } catch (e) { /* already closing */ }
    }
    this._setState("closed");
    var error = IMError("closed", "the client was closed");
    this._rejectConnectWaiters(error);
    this._rejectPending(error);
    if (wasOpen) this._emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false });
  };

  /** Start one connection attempt: a fresh token first (getToken), then the WebSocket. */
  proto._open = function () {
    var self = this;
    this._clearTimer("reconnect");
    var conn = { ws: null, opened: false };
    this._conn = conn;
    this._setState("connecting");
    // Covers getToken as well as the handshake: neither may leave the client hanging.
    this._setTimer("connect", this.options.connectTimeoutMs, function () {
      if (self._conn === conn && (!conn.ws || conn.ws.readyState === WS_CONNECTING)) {
        self._abandon(4002, "connect timeout");
      }
    });
    this._freshToken().then(function () {
      if (self._conn === conn) self._dial(conn);
    }, function (err) {
      if (self._conn !== conn) return;  // closed or replaced meanwhile
      self._conn = null;
      if (err && err.code === "unauthenticated") {
        self._unauthenticated();
        return;
      }
      self._emit("error", IMError("token_unavailable", "getToken failed: " + (err && err.message || err)));
      self._scheduleReconnect();
    });
  };

  /** Resolves once this.token is the one to use (asks getToken when given). */
  proto._freshToken = function () {
    var self = this;
    var getToken = this.options.getToken;
    if (!getToken) return Promise.resolve(this.token);
    return Promise.resolve().then(function () { return getToken(); }).then(function (token) {
      if (typeof token !== "string" || !token) {
        throw IMError("unauthenticated", "getToken gave no token");
      }
      self.setToken(token);
      return token;
    });
  };

  proto._dial = function (conn) {
    var self = this;
    var wsUrl = this.url.replace(/^http/i, "ws") + "/ws?token=" + encodeURIComponent(this.token);
    var ws;
    try {
      ws = new this._WebSocket(wsUrl);
    } catch (err) {
      this._emit("error", IMError("connect_failed", "cannot open a WebSocket: " + (err && err.message)));
      this._socketGone(conn, 1006, "constructor failed");
      return;
    }
    conn.ws = ws;
    ws.onopen = function () { if (self._conn === conn) self._onOpen(conn); };
    ws.onmessage = function (event) { if (self._conn === conn) self._onFrame(event.data); };
    ws.onerror = function () { /* always followed by onclose, which does the work */ };
    ws.onclose = function (event) {
      if (self._conn === conn) self._socketGone(conn, event.code, event.reason);
    };
  };

  proto._onOpen = function (conn) {
    var self = this;
    this._clearTimer("connect");
    conn.opened = true;
    this._tokenRefusals = 0;
    var reconnected = this._opens > 0;
    this._opens += 1;
    this._setState("open");
    // _attempt is reset only once the connection has proved useful (a first frame or a ping
    // answered), so a server that accepts and drops at once still meets the back-off.
    this._startHeartbeat();
    this._transmit({ type: "ping" });  // its pong proves the connection useful (resets back-off)
    this._readQueue.forEach(function (frame) { self._transmit(frame); });
    this._readQueue.clear();
    this._flushReceived();
    // Re-send what never got an answer, oldest first, with the same clientMsgId.
    this._pending.forEach(function (entry) {
      if (!entry.retryTimer) self._transmit(entry.frame);
    });
    this._emit("connected", { reconnected: reconnected, userId: this.userId });
    var waiters = this._connectWaiters;
    this._connectWaiters = [];
    waiters.forEach(function (w) { w.resolve(self); });
  };

  function detachSocket(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  /** Forget the current attempt now (its socket may be half dead: a close could take long). */
  proto._abandon = function (code, reason) {
    var conn = this._conn;
    if (!conn) return;
    if (conn.ws) {
      detachSocket(conn.ws);
      try { conn.ws.close(code, reason); } catch (e) { /* ignore */ }
    }
    this._socketGone(conn, code, reason);
  };

  proto._socketGone = function (conn, code, reason) {
    var self = this;
    if (this._conn === conn) this._conn = null;
    this._clearTimer("connect");
    this._stopHeartbeat();
    if (!this._isActive()) return;
    this._setState("connecting");
    if (conn.opened) {
      this._emit("disconnected", { code: code, reason: reason || "", willReconnect: true });
      this._scheduleReconnect();
      return;
    }
    if (!conn.ws) {
      // getToken did not answer in time: nothing was refused, try again later.
      this._emit("error", IMError("token_unavailable", "getToken gave no answer within connectTimeoutMs"));
      this._scheduleReconnect();
      return;
    }
    // Closed before it opened: a down server, a refused token (browsers hide the 401 and report
    // 1006), or a connection cap (429). Only a REST call can tell them apart.
    this._checkToken().then(function (verdict) {
      if (!self._isActive() || self._conn || self._timers.reconnect) return;  // moved on meanwhile
      if (verdict !== "rejected") {
        self._scheduleReconnect();
      } else if (self.options.getToken && self._tokenRefusals < 1) {
        // The token may just have expired: one more attempt, with a fresh one from getToken.
        self._tokenRefusals += 1;
        self._scheduleReconnect();
      } else {
        self._unauthenticated();
      }
    });
  };

  proto._scheduleReconnect = function () {
    var self = this;
    if (!this._isActive()) return;
    var o = this.options;
    var delay = backoffDelay(this._attempt, o.reconnectMinDelayMs, o.reconnectMaxDelayMs);
    this._attempt += 1;
    this._setState("connecting");
    this._emit("reconnecting", { attempt: this._attempt, delayMs: delay });
    this._setTimer("reconnect", delay, function () { self._open(); });
  };

  proto._onOnline = function () {
    // The network is back: do not sit out the rest of a long back-off.
    if (this._state === "connecting" && !this._conn) this._open();
  };

  /** "rejected" (401), "ok" (token accepted or server answered otherwise), or "unknown". */
  proto._checkToken = function () {
    var payload = decodeToken(this.token);
    var localVerdict = !payload ? "rejected"
      : typeof payload.exp === "number" && payload.exp * 1000 < Date.now() ? "rejected" : "unknown";
    var fetchFn = root && root.fetch;
    if (typeof fetchFn !== "function") return Promise.resolve(localVerdict);
    return fetchFn.call(root, this.url + this.options.checkTokenPath, {
      headers: { Authorization: "Bearer " + this.token },
      cache: "no-store",
      credentials: "omit"
    }).then(function (response) {
      return response.status === 401 ? "rejected" : "ok";
    }, function () {
      // Server unreachable (or a cross-origin page without CORS): trust what the token itself says.
      return localVerdict;
    });
  };

  proto._unauthenticated = function () {
    var error = IMError("unauthenticated", "the server refused the token (expired, malformed or badly signed)");
    this._conn = null;
    this._clearTimers();
    if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
    this._setState("closed");
    this._emit("error", error);
    this._rejectConnectWaiters(error);
    this._rejectPending(error);
  };

  proto._rejectConnectWaiters = function (error) {
    var waiters = this._connectWaiters;
    this._connectWaiters = [];
    waiters.forEach(function (w) { w.reject(error); });
  };

  proto._rejectPending = function (error) {
    var pending = this._pending;
    this._pending = new Map();
    pending.forEach(function (entry) {
      if (entry.retryTimer) clearTimeout(entry.retryTimer);
      entry.reject(error);
    });
  };

  // ---- heartbeat ------------------------------------------------------------------------------

  proto._startHeartbeat = function () {
    var self = this;
    this._stopHeartbeat();
    this._timers.heartbeat = setInterval(function () {
      if (self._state !== "open") return;
      self._transmit({ type: "ping" });
      if (!self._timers.pong) {
        self._setTimer("pong", self.options.pongTimeoutMs, function () {
          self._emit("error", IMError("heartbeat_timeout", "no answer from the server; reconnecting"));
          self._abandon(4000, "heartbeat timeout");
        });
      }
    }, this.options.heartbeatIntervalMs);
  };

  proto._stopHeartbeat = function () {
    if (this._timers.heartbeat) clearInterval(this._timers.heartbeat);
    delete this._timers.heartbeat;
    this._clearTimer("pong");
  };

  // ---- timers ---------------------------------------------------------------------------------

  proto._setTimer = function (name, ms, fn) {
    this._clearTimer(name);
    var self = this;
    this._timers[name] = setTimeout(function () { delete self._timers[name]; fn(); }, ms);
  };

  proto._clearTimer = function (name) {
    if (this._timers[name]) {
      clearTimeout(this._timers[name]);
      delete this._timers[name];
    }
  };

  proto._clearTimers = function () {
    this._stopHeartbeat();
    for (var name in this._timers) this._clearTimer(name);
    this._pending.forEach(function (entry) {
      if (entry.retryTimer) { clearTimeout(entry.retryTimer); entry.retryTimer = null; }
    });
  };

  // ---- frames in ------------------------------------------------------------------------------

  proto._transmit = function (frame) {
    var ws = this._conn && this._conn.ws;
    if (!ws || this._state !== "open" || ws.readyState !== WS_OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (e) {
      return false;  // the socket is going; onclose follows and pending sends are re-sent
    }
  };

  proto._onFrame = function (data) {
    // Any frame proves the connection alive: no need to wait for the pong itself.
    this._clearTimer("pong");
    this._attempt = 0;
    var frame;
    try {
      frame = JSON.parse(data);
    } catch (e) {
      this._emit("error", IMError("bad_frame", "the server sent a frame that is not JSON"));
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "message": this._onMessage(frame.message); break;
      case "ack": this._onAck(frame); break;
      case "error": this._onError(frame); break;
      case "receipt": this._emit("receipt", frame); break;
      case "pong": break;
      default: break;  // newer server, older SDK: ignore what we do not know
    }
  };

  proto._onMessage = function (message) {
    if (!message || typeof message.id !== "string") return;
    var duplicate = this._seen.has(message.id);
    if (!duplicate) {
      this._remember(message.id);
      this._keep(message);
      this._emit("message", message);
      this._applyNotice(message);
    }
    // Even for a duplicate: the server resent it because our marker is behind.
    if (this.options.autoReceive) this._noteSeq(message, false);
  };

  /**
   * A recall/edit notice (SPEC §14): emit `recalled` / `edited` with the changed message. An edit
   * notice emptied by a later recall (`recalled: true`) says nothing: the recall notice follows.
   */
  proto._applyNotice = function (notice) {
    if ((notice.event !== EVENT_RECALLED && notice.event !== EVENT_EDITED) || typeof notice.target !== "string") return;
    if (notice.event === EVENT_EDITED && notice.recalled) return;
    var changed = changedByNotice(notice, this._recent.get(notice.target) || null);
    this._keep(changed);
    this._emit(notice.event === EVENT_RECALLED ? "recalled" : "edited", changed);
  };

  /** Remember a message as it now is (bounded), for the changes that may follow. */
  proto._keep = function (message) {
    if (!message || typeof message.id !== "string") return;
    this._recent.delete(message.id);
    this._recent.set(message.id, message);
    var limit = this.options.messageCacheSize;
    while (this._recent.size > limit) this._recent.delete(this._recent.keys().next().value);
  };

  proto._onAck = function (frame) {
    var entry = this._pending.get(frame.clientMsgId);
    var message = frame.message;
    if (entry && entry.change) {
      // The ack of a recall or edit carries an earlier message, changed: not a new seq.
      this._pending.delete(frame.clientMsgId);
      if (entry.retryTimer) clearTimeout(entry.retryTimer);
      this._keep(message);
      entry.resolve(message);
      return;
    }
    if (message && typeof message.id === "string") this._remember(message.id);
    if (message && typeof message.id === "string") this._keep(message);
    if (message && this.options.autoReceive) this._noteSeq(message, true);
    if (!entry) return;
    this._pending.delete(frame.clientMsgId);
    if (entry.retryTimer) clearTimeout(entry.retryTimer);
    entry.resolve(message);
  };

  proto._onError = function (frame) {
    var self = this;
    var error = IMError(frame.code || "error", frame.message || frame.code || "error",
      frame.clientMsgId ? { clientMsgId: frame.clientMsgId } : null);
    var entry = frame.clientMsgId ? this._pending.get(frame.clientMsgId) : null;
    if (!entry) {
      this._emit("error", error);
      return;
    }
    if (RETRYABLE_CODES[frame.code] && entry.retries < this.options.maxSendRetries) {
      entry.retries += 1;
      var delay = backoffDelay(entry.retries - 1, this.options.reconnectMinDelayMs, this.options.reconnectMaxDelayMs);
      entry.retryTimer = setTimeout(function () {
        entry.retryTimer = null;
        if (self._pending.get(frame.clientMsgId) === entry) self._transmit(entry.frame);
      }, delay);
      return;
    }
    this._pending.delete(frame.clientMsgId);
    entry.reject(error);
  };

  proto._remember = function (id) {
    if (this._seen.has(id)) return;
    this._seen.add(id);
    this._seenOrder.push(id);
    var limit = this.options.dedupeWindow;
    if (this._seenOrder.length > limit * 1.25) {
      var drop = this._seenOrder.splice(0, this._seenOrder.length - limit);
      for (var i = 0; i < drop.length; i++) this._seen.delete(drop[i]);
    }
  };

  // ---- received markers -----------------------------------------------------------------------

  /*
   * The `received` marker tells the server "I have everything up to seq": too high loses messages
   * on the next reconnect. Messages arrive in seq order per conversation, except that this
   * connection's own sends come back as acks, which can overtake a message stored just before.
   * So acked seqs advance the marker only when they are contiguous with what has been seen.
   */
  proto._noteSeq = function (message, isAck) {
    var seq = message.seq;
    if (typeof seq !== "number") return;
    var conv = conversationOf(message, this.userId);
    if (!conv) return;
    var key = conversationKey(conv);
    var mark = this._marks.get(key);
    if (!mark) {
      mark = { conv: conv, contig: 0, acked: new Set() };
      this._marks.set(key, mark);
    }
    var before = mark.contig;
    if (isAck && seq > mark.contig + 1) {
      mark.acked.add(seq);
    } else if (seq > mark.contig) {
      mark.contig = seq;
    }
    while (mark.acked.has(mark.contig + 1)) {
      mark.acked.delete(mark.contig + 1);
      mark.contig += 1;
    }
    mark.acked.forEach(function (s) { if (s <= mark.contig) mark.acked.delete(s); });
    if (mark.contig > before || !isAck) this._queueReceived(key, mark);
  };

  proto._queueReceived = function (key, mark) {
    var self = this;
    var frame = { type: "received", channel: mark.conv.channel, seq: mark.contig };
    if (mark.conv.peer) frame.peer = mark.conv.peer;
    if (mark.conv.group) frame.group = mark.conv.group;
    this._receivedQueue.set(key, frame);
    if (!this._timers.received) {
      this._setTimer("received", this.options.receivedDelayMs, function () { self._flushReceived(); });
    }
  };

  proto._flushReceived = function () {
    var self = this;
    this._clearTimer("received");
    if (this._state !== "open") return;  // kept; sent on the next open
    this._receivedQueue.forEach(function (frame, key) {
      if (self._transmit(frame)) self._receivedQueue.delete(key);
    });
  };

  /** Tell the server this client has everything up to seq (only needed with autoReceive: false). */
  proto.markReceived = function (spec) {
    var frame = markerFrame("received", spec);
    if (!this._transmit(frame)) {
      this._receivedQueue.set(conversationKey(frame), frame);
    }
  };

  /** The user has read up to seq: {channel: "pm", peer, seq} | {channel: "gm", group, seq} | {channel: "sm", seq}. */
  proto.markRead = function (spec) {
    var frame = markerFrame("read", spec);
    if (!this._transmit(frame)) {
      var key = conversationKey(frame);
      var queued = this._readQueue.get(key);
      if (!queued || queued.seq < frame.seq) this._readQueue.set(key, frame);
    }
  };

  // ---- sending --------------------------------------------------------------------------------

  /** Send a person-to-person message; resolves with the stored message. */
  proto.sendP2P = function (to, content, options) {
    if (typeof to !== "string" || !to) return Promise.reject(new TypeError("sendP2P: `to` must be a user id"));
    var opts = options || {};
    return this._send({ type: "pm", to: to, contentType: opts.contentType || 1, content: content,
      clientMsgId: opts.clientMsgId || randomId() });
  };

  /** Send a group message (options: contentType, groupType, at, clientMsgId); resolves with it. */
  proto.sendGroup = function (group, content, options) {
    if (typeof group !== "string" || !group) return Promise.reject(new TypeError("sendGroup: `group` must be a group id"));
    var opts = options || {};
    var frame = { type: "gm", group: group, contentType: opts.contentType || 1, content: content,
      clientMsgId: opts.clientMsgId || randomId() };
    if (opts.groupType !== undefined && opts.groupType !== null) frame.groupType = opts.groupType;
    if (opts.at !== undefined && opts.at !== null) frame.at = opts.at;
    return this._send(frame);
  };

  proto._send = function (frame) {
    if (typeof frame.content !== "string" || !frame.content) {
      return Promise.reject(IMError("invalid_field", "content: must be a non-empty string"));
    }
    var existing = this._pending.get(frame.clientMsgId);
    if (existing) return existing.promise;  // the same send, still in flight
    var text = JSON.stringify(frame);
    if (utf8Length(text) > MAX_FRAME_BYTES) {
      return Promise.reject(IMError("too_large", "content: the message is larger than a 64 KiB frame allows",
        { clientMsgId: frame.clientMsgId }));
    }
    var entry = { frame: frame, retries: 0, retryTimer: null };
    entry.promise = new Promise(function (resolve, reject) {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this._pending.set(frame.clientMsgId, entry);
    this._transmit(frame);  // if not open now, it goes out on the next open
    return entry.promise;
  };

  // ---- recall and edit (SPEC §14) ------------------------------------------------------------

  /**
   * Recall a stored message (one's own within the server's window; service/admin any time, with
   * options.operator): recall(message) or recall(channel, id). Resolves with the message as it now
   * is (recalled, content ""), rejects with the server's error (`window_expired`, `forbidden`,
   * `not_editable`, `not_found`). Re-sent after a reconnect like a send; a repeat changes nothing.
   */
  proto.recall = function (messageOrChannel, idOrOptions, maybeOptions) {
    var ref;
    var byMessage = messageOrChannel && typeof messageOrChannel === "object";
    var options = (byMessage ? idOrOptions : maybeOptions) || {};
    try {
      ref = storedMessageRef("recall", messageOrChannel, byMessage ? undefined : idOrOptions);
    } catch (err) {
      return Promise.reject(err);
    }
    var frame = { type: "recall", channel: ref.channel, id: ref.id, clientMsgId: options.clientMsgId || randomId() };
    if (options.operator) frame.operator = options.operator;
    return this._change(frame);
  };

  /**
   * Edit a stored message's content (options: contentType, clientMsgId, operator for staff).
   * Resolves with the edited message (`editedAt`, `editCount`); rejects as recall() does, and with
   * `message_recalled` for a recalled message. Repeating it with the same clientMsgId changes nothing.
   */
  proto.edit = function (message, content, options) {
    var ref;
    try {
      ref = storedMessageRef("edit", message);
    } catch (err) {
      return Promise.reject(err);
    }
    if (typeof content !== "string" || !content.trim()) {
      return Promise.reject(IMError("invalid_field", "content: must be a non-empty string"));
    }
    var opts = options || {};
    var frame = { type: "edit", channel: ref.channel, id: ref.id, content: content,
      clientMsgId: opts.clientMsgId || randomId() };
    if (opts.contentType !== undefined && opts.contentType !== null) frame.contentType = opts.contentType;
    if (opts.operator) frame.operator = opts.operator;
    return this._change(frame);
  };

  proto._change = function (frame) {
    var existing = this._pending.get(frame.clientMsgId);
    if (existing) return existing.promise;
    if (utf8Length(JSON.stringify(frame)) > MAX_FRAME_BYTES) {
      return Promise.reject(IMError("too_large", "content: the edit is larger than a 64 KiB frame allows",
        { clientMsgId: frame.clientMsgId }));
    }
    var entry = { frame: frame, retries: 0, retryTimer: null, change: true };
    entry.promise = new Promise(function (resolve, reject) {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this._pending.set(frame.clientMsgId, entry);
    this._transmit(frame);  // if not open now, it goes out on the next open
    return entry.promise;
  };

  /** Sends still waiting for their ack (e.g. for a "sending…" indicator). */
  proto.pendingCount = function () {
    return this._pending.size;
  };

  // ---- history (REST) -------------------------------------------------------------------------

  /**
   * A page of a conversation's stored messages, oldest first within the page:
   *   history({channel: "pm", peer, before?, after?, limit?, since?, until?, user?})
   *   history({channel: "gm", group, ...}) | history({channel: "sm", ...})
   * Resolves with {messages, next, more()}: `next` is the server's cursor (null at the end) and
   * more() resolves with the next page in the same direction (older, unless `after` was given),
   * or null when there is none. Rejects with an IMError carrying the server's code and `status`.
   */
  proto.history = function (spec) {
    var request;
    try {
      request = historyQuery(spec, this.userId);
    } catch (err) {
      return Promise.reject(err);
    }
    return this._historyPage(request.channel, request.params);
  };

  proto._historyPage = function (channel, params) {
    var self = this;
    var path = "/api/v1/chats/" + channel + "?" + queryString(params);
    return this._restGet(path, true).then(function (body) {
      var next = body && typeof body.next === "string" ? body.next : null;
      var page = { messages: body && Array.isArray(body.messages) ? body.messages : [], next: next };
      page.messages.forEach(function (m) { self._keep(m); });  // what later changes start from
      page.more = function () {
        if (!next) return Promise.resolve(null);
        // The cursor carries the seq bound and the direction; the other filters go along.
        var following = {};
        for (var key in params) {
          if (key !== "before" && key !== "after" && key !== "cursor") following[key] = params[key];
        }
        following.cursor = next;
        return self._historyPage(channel, following);
      };
      return page;
    });
  };

  // ---- receipts (REST) ------------------------------------------------------------------------

  /**
   * When each recipient received and read one stored message (SPEC §13; the message's sender,
   * service or admin): receipts(message) with a stored message ({channel, id}), or
   * receipts(channel, id). Resolves with {message, receipts: [{user, receivedAt, readAt}]}
   * (ISO 8601 times, null while not yet); rejects with an IMError (403 for someone else's message).
   */
  proto.receipts = function (messageOrChannel, id) {
    var ref;
    try {
      ref = storedMessageRef("receipts", messageOrChannel, id);
    } catch (err) {
      return Promise.reject(err);
    }
    var path = "/api/v1/chats/" + ref.channel + "/" + encodeURIComponent(ref.id) + "/receipts";
    return this._restGet(path, true).then(function (body) {
      return { message: body && body.message, receipts: body && Array.isArray(body.receipts) ? body.receipts : [] };
    });
  };

  /** GET path as this client's user: the JSON body, or an IMError; a 401 asks getToken once. */
  proto._restGet = function (path, mayRefresh) {
    var self = this;
    var fetchFn = root && root.fetch;
    if (typeof fetchFn !== "function") {
      return Promise.reject(IMError("unsupported", "REST (history, receipts) needs fetch (a browser, or Node 18+)"));
    }
    var ready = this.token ? Promise.resolve(this.token) : this._freshToken();
    return ready.then(function () {
      return fetchFn.call(root, self.url + path, {
        headers: { Authorization: "Bearer " + self.token, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit"
      });
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (response.ok) return body;
        if (response.status === 401 && mayRefresh && self.options.getToken) {
          return self._freshToken().then(function () { return self._restGet(path, false); });
        }
        var err = body && body.error ? body.error : { code: "http_" + response.status, message: response.statusText };
        throw IMError(err.code, err.message, { status: response.status });
      });
    }, function (err) {
      // fetch rejects with a TypeError when the server cannot be reached; anything else (an
      // IMError from getToken, say) goes through as it is.
      if (err instanceof TypeError) throw IMError("network_error", "the server could not be reached: " + err.message);
      throw err;
    });
  };

  return IMClient;
});
