/*
 * Shared code of the demo pages (patient chat, doctor console): session from the URL fragment,
 * REST calls, and a message thread that renders user data as text only (never as HTML).
 * Everything live goes through the SDK (window.IMClient), and so does history (client.history());
 * plain REST covers conversation lists and consultations, which the SDK does not.
 */
(function (global) {
  "use strict";

  var IMClient = global.IMClient;

  // ---- session: token and ids from the fragment (fragments never reach server logs) ------------

  function readFragment() {
    var params = new URLSearchParams(global.location.hash.replace(/^#/, ""));
    var out = {};
    params.forEach(function (value, key) { out[key] = value; });
    return out;
  }

  /** {token, user, role, peer, server} from `#token=...&user=...&peer=...` (user defaults to the JWT sub). */
  function readSession() {
    var frag = readFragment();
    var payload = frag.token ? IMClient.decodeToken(frag.token) : null;
    return {
      token: frag.token || "",
      user: frag.user || (payload && payload.sub) || "",
      role: (payload && payload.role) || "",
      expiresAt: payload && typeof payload.exp === "number" ? new Date(payload.exp * 1000) : null,
      peer: frag.peer || "",
      server: (frag.server || global.location.origin).replace(/\/+$/, "")
    };
  }

  /** Rewrite the fragment (e.g. the open conversation) without a reload or a history entry. */
  function writeFragment(session, extra) {
    var params = new URLSearchParams();
    params.set("token", session.token);
    if (session.user) params.set("user", session.user);
    var peer = extra && extra.peer !== undefined ? extra.peer : session.peer;
    if (peer) params.set("peer", peer);
    if (session.server !== global.location.origin) params.set("server", session.server);
    global.history.replaceState(null, "", "#" + params.toString());
  }

  // ---- REST ------------------------------------------------------------------------------------

  /** fetch as the session's user; resolves with the JSON body, rejects with an IMError. */
  function api(session, path, options) {
    var opts = options || {};
    var headers = { Authorization: "Bearer " + session.token };
    var init = { method: opts.method || "GET", headers: headers, cache: "no-store" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    return global.fetch(session.server + path, init).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (response.ok) return body;
        var err = body && body.error ? body.error : { code: "http_" + response.status, message: response.statusText };
        throw IMClient.IMError(err.code, err.message, { status: response.status });
      });
    });
  }

  function query(params) {
    return Object.keys(params).filter(function (k) { return params[k] !== undefined && params[k] !== null; })
      .map(function (k) { return encodeURIComponent(k) + "=" + encodeURIComponent(params[k]); }).join("&");
  }

  // One page of the list is enough to find a conversation among a family doctor's active ones.
  var CONVERSATIONS_PAGE = 200;

  /** The user's conversation list (first page, newest activity first). */
  function loadConversationList(session) {
    return api(session, "/api/v1/conversations?" + query({ user_id: session.user, limit: CONVERSATIONS_PAGE }))
      .then(function (body) { return (body && body.conversations) || []; });
  }

  /** The list entry of the pm conversation with peer (null if none on the first page). */
  function findPmConversation(session, peer) {
    return loadConversationList(session).then(function (list) {
      return list.filter(function (c) { return c.channel === "pm" && c.peer === peer; })[0] || null;
    });
  }

  // ---- DOM helpers (text only) -------------------------------------------------------------------

  function el(tag, className, text) {
    var node = global.document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function formatTime(iso) {
    if (!iso) return "";
    var date = new Date(iso);
    if (isNaN(date.getTime())) return "";
    var now = new Date();
    var sameDay = date.toDateString() === now.toDateString();
    var time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return sameDay ? time : date.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  function initials(name) {
    var text = String(name || "?").trim();
    return Array.from(text)[0] || "?";
  }

  var HTTP_URL = /^https?:\/\//i;

  function mediaUrl(session, content) {
    if (HTTP_URL.test(content)) return content;
    return session.server + "/api/v1/files/" + encodeURIComponent(content);
  }

  /** The bubble's content: text nodes, or elements whose URLs are http(s) only. */
  function renderContent(session, message) {
    var content = String(message.content === undefined ? "" : message.content);
    var type = Number(message.contentType) || 1;
    if (type === 4 && HTTP_URL.test(content)) {
      var link = el("a", "link", content);
      link.href = content;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      return link;
    }
    if (type === 2) {
      var img = el("img", "attachment");
      img.alt = "image";
      img.src = mediaUrl(session, content);
      return img;
    }
    if (type === 3) {
      var audio = el("audio", "attachment");
      audio.controls = true;
      audio.src = mediaUrl(session, content);
      return audio;
    }
    return global.document.createTextNode(content);
  }

  function previewText(message) {
    if (!message) return "";
    var type = Number(message.contentType) || 1;
    if (type === 2) return "[image]";
    if (type === 3) return "[voice]";
    return String(message.content || "");
  }

  // ---- a message thread ----------------------------------------------------------------------------

  // SPEC §14: notices of a recall or an edit. A thread does not show them as bubbles: the message
  // they are about shows the change in place ("You recalled a message", "Edited").
  var NOTICE_EVENTS = { "message.recalled": true, "message.edited": true };
  // Edit / Recall are offered under one's last few messages while the server's default window
  // ([messages] recall_window_secs, edit_window_secs: 600) lasts; the server has the last word
  // (403 window_expired).
  var CHANGE_WINDOW_MS = 600 * 1000;
  var CHANGE_LAST = 3;
  var CHANGE_REFRESH_MS = 30 * 1000;

  function isNotice(message) {
    return !!(message && NOTICE_EVENTS[message.event]);
  }

  /**
   * The <ol> of one conversation. Messages are keyed by id (each shown once, whatever the route:
   * history, backlog, live, ack) and kept in seq order; sends not yet acknowledged stay last.
   */
  function Thread(listEl, session) {
    this.listEl = listEl;
    this.session = session;
    this.byId = new Map();
    this.messages = new Map();  // id -> the message as shown
    this.notices = new Set();   // ids of recall/edit notices seen (counted for read markers, not shown)
    this.pending = new Map();   // clientMsgId -> li
    this.actions = null;        // {onEdit(message), onRecall(message)}: see enableActions()
    this.maxSeq = 0;
    this.maxSeqFromOthers = 0;
    this.peerReadSeq = 0;
  }

  Thread.prototype.clear = function () {
    this.listEl.textContent = "";
    this.byId.clear();
    this.messages.clear();
    this.notices.clear();
    this.pending.clear();
    this.maxSeq = this.maxSeqFromOthers = this.peerReadSeq = 0;
  };

  Thread.prototype._build = function (message, mine) {
    var recalled = !!message.recalled;
    var li = el("li", "msg" + (mine ? " mine" : "") + (message.event ? " system" : "") + (recalled ? " recalled" : ""));
    var bubble = el("div", "bubble");
    var text = el("span", "text");
    if (recalled) {
      var by = message.recalledBy || message.from;
      text.textContent = by === this.session.user ? "You recalled a message" : by + " recalled a message";
    } else {
      text.appendChild(renderContent(this.session, message));
    }
    bubble.appendChild(text);
    li.appendChild(bubble);
    var meta = el("div", "meta");
    if (!mine && !message.event && message.from && !recalled) meta.appendChild(el("span", "from", message.from));
    meta.appendChild(el("time", "time", formatTime(message.createdAt)));
    if (message.editCount && !recalled) {
      var edited = el("span", "edited", "Edited");
      if (message.editedAt) edited.title = "Edited " + new Date(message.editedAt).toLocaleString();
      meta.appendChild(edited);
    }
    if (mine && !message.event && !recalled) meta.appendChild(el("span", "state", ""));
    li.appendChild(meta);
    return li;
  };

  Thread.prototype._place = function (li, seq) {
    var children = this.listEl.children;
    for (var i = 0; i < children.length; i++) {
      var other = children[i];
      if (other.classList.contains("pending") || other.classList.contains("failed") || Number(other.dataset.seq) > seq) {
        this.listEl.insertBefore(li, other);
        return;
      }
    }
    this.listEl.appendChild(li);
  };

  Thread.prototype._setState = function (li, text, read) {
    var state = li.querySelector(".state");
    if (!state) return;
    state.textContent = text;
    state.classList.toggle("read", !!read);
  };

  /** Show a stored message once (quiet: keep the scroll position); false if already shown. */
  Thread.prototype.add = function (message, quiet) {
    if (!message) return false;
    var mine = message.from === this.session.user;
    if (isNotice(message)) {
      // Not shown (the SDK's recalled / edited events change the message itself), but it is the
      // newest message of the conversation: read markers go up to it.
      if (this.notices.has(message.id)) return false;
      this.notices.add(message.id);
      this.maxSeq = Math.max(this.maxSeq, message.seq || 0);
      if (!mine) this.maxSeqFromOthers = Math.max(this.maxSeqFromOthers, message.seq || 0);
      return true;
    }
    if (this.byId.has(message.id)) return false;
    if (mine && message.clientMsgId && this.pending.has(message.clientMsgId)) {
      // Our own send, delivered (e.g. after a reconnect) before its ack: the pending bubble is it.
      var stale = this.pending.get(message.clientMsgId);
      this.pending.delete(message.clientMsgId);
      stale.remove();
    }
    var li = this._build(message, mine);
    li.dataset.id = message.id;
    li.dataset.seq = String(message.seq);
    if (message.event) li.dataset.event = message.event;
    this.byId.set(message.id, li);
    this.messages.set(message.id, message);
    this._place(li, message.seq);
    if (mine) this._setState(li, message.seq <= this.peerReadSeq ? "Read" : "Sent", message.seq <= this.peerReadSeq);
    this.maxSeq = Math.max(this.maxSeq, message.seq || 0);
    if (!mine) this.maxSeqFromOthers = Math.max(this.maxSeqFromOthers, message.seq || 0);
    this.renderActions();
    if (!quiet) this.scrollToEnd();
    return true;
  };

  /** A shown message, recalled or edited (the SDK's events, or a recall/edit's answer): redrawn in place. */
  Thread.prototype.applyChange = function (message) {
    var old = message && this.byId.get(message.id);
    if (!old) return false;
    var li = this._build(message, old.classList.contains("mine"));
    li.dataset.id = old.dataset.id;
    li.dataset.seq = old.dataset.seq;
    var state = old.querySelector(".state");
    if (state) this._setState(li, state.textContent, state.classList.contains("read"));
    old.replaceWith(li);
    this.byId.set(message.id, li);
    this.messages.set(message.id, message);
    this.renderActions();
    return true;
  };

  /**
   * Offer Edit (text only) and Recall under the user's last CHANGE_LAST messages while the window
   * lasts; actions = {onEdit(message), onRecall(message)}.
   */
  Thread.prototype.enableActions = function (actions) {
    var self = this;
    this.actions = actions;
    this.renderActions();
    global.setInterval(function () { self.renderActions(); }, CHANGE_REFRESH_MS);
  };

  Thread.prototype.renderActions = function () {
    var self = this;
    Array.prototype.forEach.call(this.listEl.querySelectorAll(".msg-actions"), function (node) { node.remove(); });
    if (!this.actions) return;
    var mine = Array.prototype.slice.call(this.listEl.querySelectorAll(".msg.mine[data-id]:not(.system):not(.recalled)"));
    mine.slice(-CHANGE_LAST).forEach(function (li) {
      var message = self.messages.get(li.dataset.id);
      if (!message || Date.now() - new Date(message.createdAt).getTime() > CHANGE_WINDOW_MS) return;
      var row = el("div", "msg-actions");
      if ((Number(message.contentType) || 1) === 1) {
        var editButton = el("button", "link-button edit", "Edit");
        editButton.type = "button";
        editButton.addEventListener("click", function () { self.actions.onEdit(self.messages.get(message.id)); });
        row.appendChild(editButton);
      }
      var recallButton = el("button", "link-button recall", "Recall");
      recallButton.type = "button";
      recallButton.addEventListener("click", function () { self.actions.onRecall(self.messages.get(message.id)); });
      row.appendChild(recallButton);
      li.appendChild(row);
    });
  };

  /** A send on its way: shown at once, confirmed by confirm() or marked by fail(). */
  Thread.prototype.addPending = function (clientMsgId, content) {
    var li = this._build({ content: content, contentType: 1, from: this.session.user }, true);
    li.classList.add("pending");
    li.dataset.clientMsgId = clientMsgId;
    this._setState(li, "Sending…");
    this.pending.set(clientMsgId, li);
    this.listEl.appendChild(li);
    this.scrollToEnd();
  };

  Thread.prototype.confirm = function (clientMsgId, message) {
    var li = this.pending.get(clientMsgId);
    this.pending.delete(clientMsgId);
    if (li) li.remove();
    this.add(message);
  };

  Thread.prototype.fail = function (clientMsgId, error) {
    var li = this.pending.get(clientMsgId);
    if (!li) return;
    this.pending.delete(clientMsgId);
    li.classList.remove("pending");
    li.classList.add("failed");
    this._setState(li, "Not sent: " + (error && (error.message || error.code) || "error"));
  };

  /** The peer has read up to seq (a live receipt, or peerReadSeq from the list): mine up to it show "Read". */
  Thread.prototype.applyReceipt = function (seq) {
    if (typeof seq !== "number" || !(seq > this.peerReadSeq)) return;
    this.peerReadSeq = seq;
    var self = this;
    this.byId.forEach(function (li) {
      if (li.classList.contains("mine") && Number(li.dataset.seq) <= self.peerReadSeq) self._setState(li, "Read", true);
    });
  };

  Thread.prototype.scrollToEnd = function () {
    this.listEl.scrollTop = this.listEl.scrollHeight;
  };

  /** Texts of the shown messages (used by tests and handy in the console). */
  Thread.prototype.texts = function () {
    return Array.prototype.map.call(this.listEl.querySelectorAll(".msg .text"), function (n) { return n.textContent; });
  };

  // ---- history, a page at a time (the SDK's history()) ----------------------------------------------

  /**
   * Fills a Thread with the newest page of a conversation, and older pages on the "earlier
   * messages" button. onPage(page, older) sees each page once it is shown.
   */
  function HistoryPager(client, thread, button, onPage) {
    var self = this;
    this.client = client;
    this.thread = thread;
    this.button = button;
    this.onPage = onPage || function () {};
    this.page = null;
    this.generation = 0;  // bumped per conversation: a late page of the previous one is dropped
    button.addEventListener("click", function () {
      self.older().catch(function (error) { self.onPage(null, true, error); });
    });
  }

  HistoryPager.PAGE_SIZE = 50;

  /** Load the newest page of {channel, peer | group, user?}; resolves with it (null if stale). */
  HistoryPager.prototype.start = function (spec) {
    var self = this;
    var generation = ++this.generation;
    this.page = null;
    this.button.hidden = true;
    var request = { channel: spec.channel, peer: spec.peer, group: spec.group, user: spec.user,
      limit: HistoryPager.PAGE_SIZE };
    return this.client.history(request).then(function (page) {
      if (generation !== self.generation) return null;
      self._show(page, false);
      return page;
    }, function (error) {
      if (generation === self.generation) throw error;
      return null;
    });
  };

  HistoryPager.prototype.stop = function () {
    this.generation += 1;
    this.page = null;
    this.button.hidden = true;
  };

  /** The page before the oldest shown; resolves with it (null at the start or if stale). */
  HistoryPager.prototype.older = function () {
    var self = this;
    var page = this.page;
    if (!page || !page.next) return Promise.resolve(null);
    var generation = this.generation;
    this.button.disabled = true;
    return page.more().then(function (older) {
      self.button.disabled = false;
      if (generation !== self.generation || !older) return null;
      self._show(older, true);
      return older;
    }, function (error) {
      self.button.disabled = false;
      throw error;
    });
  };

  HistoryPager.prototype._show = function (page, older) {
    var list = this.thread.listEl;
    var fromBottom = list.scrollHeight - list.scrollTop;
    var thread = this.thread;
    page.messages.forEach(function (m) { thread.add(m, older); });
    // Older messages go above: keep what the reader was looking at where it was.
    if (older) list.scrollTop = list.scrollHeight - fromBottom;
    this.page = page;
    this.button.hidden = !page.next;
    this.onPage(page, older, null);
  };

  // ---- connection status pill -----------------------------------------------------------------------

  function bindStatus(client, pill, onFatal) {
    function set(cls, text) {
      pill.className = "pill " + cls;
      pill.textContent = text;
      pill.dataset.state = cls;
    }
    set("offline", "connecting…");
    client.on("connected", function () { set("online", "online"); });
    client.on("disconnected", function () { set("offline", "offline"); });
    client.on("reconnecting", function (info) {
      set("offline", "reconnecting in " + Math.max(1, Math.round(info.delayMs / 1000)) + " s");
    });
    client.on("error", function (error) {
      if (error.code === "unauthenticated") {
        set("failed", "token refused");
        if (onFatal) onFatal(error);
      }
    });
  }

  function showBanner(bannerEl, text, isError) {
    bannerEl.textContent = text;
    bannerEl.classList.toggle("error", !!isError);
    bannerEl.hidden = !text;
  }

  // ---- login form ----------------------------------------------------------------------------------

  /** Show the "paste a token" card; submitting it reloads the page with a fragment. */
  function showLogin(session, options) {
    var card = global.document.getElementById("login");
    var app = global.document.getElementById("app");
    if (app) app.hidden = true;
    // Nobody is signed in: no "You: …" and no connection state in the top bar.
    Array.prototype.forEach.call(global.document.querySelectorAll(".topbar .who, #status"), function (node) {
      node.hidden = true;
    });
    card.hidden = false;
    var form = card.querySelector("form");
    form.elements.token.value = session.token || "";
    form.elements.peer.value = session.peer || "";
    if (options && options.message) showBanner(card.querySelector(".banner"), options.message, true);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var params = new URLSearchParams();
      params.set("token", form.elements.token.value.trim());
      if (form.elements.peer.value.trim()) params.set("peer", form.elements.peer.value.trim());
      global.location.hash = params.toString();
      global.location.reload();
    });
  }

  /** Whether the primary pointer is a finger (a phone or tablet). */
  function isTouch() {
    return !!(global.matchMedia && global.matchMedia("(pointer: coarse)").matches);
  }

  /**
   * With a keyboard, Enter sends and Shift+Enter is a new line. On touch screens Enter is a new
   * line, as in every phone messenger, and the Send button sends.
   */
  function bindComposer(form, textarea, onSend) {
    var touch = isTouch();
    if (!touch) textarea.placeholder += " (Enter to send, Shift+Enter for a new line)";
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var text = textarea.value.replace(/\s+$/, "");
      if (!text.trim()) return;
      textarea.value = "";
      onSend(text);
      textarea.focus();
    });
    textarea.addEventListener("keydown", function (event) {
      if (!touch && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }

  /**
   * The composer's edit mode: start(message) puts its text in the box under an "Editing message ·
   * Cancel" bar; take() returns the message being edited (and leaves edit mode), or null for a send.
   */
  function editState(form, textarea) {
    var editing = null;
    var bar = el("div", "editing-bar");
    bar.hidden = true;
    bar.appendChild(el("span", "label", "Editing message"));
    var cancel = el("button", "link-button cancel", "Cancel");
    cancel.type = "button";
    bar.appendChild(cancel);
    form.parentNode.insertBefore(bar, form);
    var submit = form.querySelector('button[type="submit"]');
    var submitLabel = submit ? submit.textContent : "";
    function stop() {
      editing = null;
      bar.hidden = true;
      if (submit) submit.textContent = submitLabel;
    }
    cancel.addEventListener("click", function () {
      stop();
      textarea.value = "";
    });
    return {
      start: function (message) {
        editing = message;
        bar.hidden = false;
        if (submit) submit.textContent = "Save";
        textarea.value = message.content;
        textarea.focus();
      },
      take: function () {
        var message = editing;
        stop();
        return message;
      },
      stop: stop
    };
  }

  /**
   * Recall and edit on a thread (SPEC §14): the thread's Edit and Recall buttons, the composer saving
   * an edit in progress, failures on the banner. onChanged(applied) runs after an edit is applied.
   */
  function bindMessageActions(client, thread, form, textarea, bannerEl, onChanged) {
    var editing = editState(form, textarea);
    function failed(what) {
      return function (error) { showBanner(bannerEl, "Could not " + what + " the message: " + error.message, true); };
    }
    thread.enableActions({
      onEdit: function (m) { editing.start(m); },
      onRecall: function (m) {
        editing.stop();
        client.recall(m).then(function (changed) { thread.applyChange(changed); }, failed("recall"));
      }
    });
    return {
      stop: editing.stop,
      /** Save text as the edit in progress; false when none is (the composer then sends it). */
      saveEdit: function (text) {
        var target = editing.take();
        if (!target) return false;
        client.edit(target, text).then(function (changed) {
          var applied = thread.applyChange(changed);
          if (onChanged) onChanged(applied);
        }, failed("edit"));
        return true;
      }
    };
  }

  /** Mark read up to the thread's newest message once the page is visible (coalesced). */
  function readMarker(client, spec, thread) {
    var sent = 0;
    var timer = null;
    function flush() {
      timer = null;
      if (global.document.visibilityState === "hidden") return;
      var seq = thread.maxSeq;
      if (seq > sent) {
        sent = seq;
        client.markRead({ channel: spec.channel, peer: spec.peer(), seq: seq });
      }
    }
    global.document.addEventListener("visibilitychange", function () { if (!timer) timer = setTimeout(flush, 100); });
    return {
      schedule: function () { if (!timer) timer = setTimeout(flush, 150); },
      reset: function () { sent = 0; }
    };
  }

  global.IMDemo = {
    readSession: readSession,
    writeFragment: writeFragment,
    api: api,
    query: query,
    loadConversationList: loadConversationList,
    findPmConversation: findPmConversation,
    HistoryPager: HistoryPager,
    isTouch: isTouch,
    el: el,
    formatTime: formatTime,
    initials: initials,
    previewText: previewText,
    Thread: Thread,
    bindStatus: bindStatus,
    showBanner: showBanner,
    showLogin: showLogin,
    bindComposer: bindComposer,
    bindMessageActions: bindMessageActions,
    isNotice: isNotice,
    readMarker: readMarker
  };
})(window);
