/*
 * The doctor console: conversations with unread counts, one thread at a time, replies, and
 * consultation start/end. Live traffic through the SDK; lists, history and consultations by REST.
 * Under each of the last few messages the doctor sent: when the patient received and read it
 * (the SDK's receipts(), SPEC §13), fetched when they are shown and again on a live receipt.
 */
(function () {
  "use strict";
  var D = window.IMDemo;
  var session = D.readSession();
  var $ = function (id) { return document.getElementById(id); };

  if (!session.token) {
    D.showLogin(session);
    return;
  }
  $("me").textContent = session.user;
  $("app").hidden = false;

  var me = session.user;
  var client = new window.IMClient({ url: session.server, token: session.token });
  var thread = new D.Thread($("thread"), session);
  var active = null;                      // the patient whose thread is open
  var conversations = new Map();          // peer -> {peer, lastMessage, unread, peerReadSeq, li}
  var consultations = { byPatient: new Map(), byId: new Map(), supported: true };
  var reads = D.readMarker(client, { channel: "pm", peer: function () { return active; } }, thread);
  var pager = new D.HistoryPager(client, thread, $("older"), function (page, older, error) {
    if (error) D.showBanner($("banner"), "Could not load earlier messages: " + error.message, true);
    else {
      reads.schedule();
      receipts.schedule();
    }
  });
  window.imDemo = { client: client, thread: thread, session: session, conversations: conversations, pager: pager };

  D.bindStatus(client, $("status"), function () {
    D.showBanner($("banner"), "Your session has expired or the token is invalid. Please sign in again.", true);
  });

  // ---- conversation list ------------------------------------------------------------------------

  function upsertConversation(peer, lastMessage, unread) {
    var conv = conversations.get(peer);
    if (!conv) {
      conv = { peer: peer, lastMessage: null, unread: 0, peerReadSeq: 0, li: buildConversationItem(peer) };
      conversations.set(peer, conv);
    }
    if (lastMessage && (!conv.lastMessage || lastMessage.seq >= conv.lastMessage.seq)) conv.lastMessage = lastMessage;
    if (unread !== undefined) conv.unread = unread;
    renderConversation(conv);
    return conv;
  }

  function buildConversationItem(peer) {
    var li = D.el("li", "conversation");
    li.dataset.peer = peer;
    li.appendChild(D.el("span", "avatar", D.initials(peer)));
    li.appendChild(D.el("span", "name", peer));
    li.appendChild(D.el("span", "time", ""));
    li.appendChild(D.el("span", "preview", ""));
    li.appendChild(D.el("span", "badge zero", "0"));
    li.addEventListener("click", function () { openConversation(peer); });
    return li;
  }

  function renderConversation(conv) {
    var li = conv.li;
    li.querySelector(".time").textContent = conv.lastMessage ? D.formatTime(conv.lastMessage.createdAt) : "";
    li.querySelector(".preview").textContent = D.previewText(conv.lastMessage);
    var badge = li.querySelector(".badge");
    badge.textContent = String(conv.unread);
    badge.classList.toggle("zero", !conv.unread);
    li.classList.toggle("active", conv.peer === active);
    sortConversations();
  }

  function sortConversations() {
    var list = $("conversations");
    var sorted = Array.from(conversations.values()).sort(function (a, b) {
      var ta = a.lastMessage ? a.lastMessage.createdAt : "9999";  // new, empty chats on top
      var tb = b.lastMessage ? b.lastMessage.createdAt : "9999";
      return ta < tb ? 1 : ta > tb ? -1 : 0;
    });
    sorted.forEach(function (conv) { list.appendChild(conv.li); });
    $("no-conversations").hidden = conversations.size > 0;
  }

  function loadConversations() {
    return D.loadConversationList(session).then(function (list) {
      list.forEach(function (c) {
        if (c.channel !== "pm") return;
        upsertConversation(c.peer, c.lastMessage, c.peer === active ? 0 : c.unread);
        notePeerRead(c.peer, c.peerReadSeq);
      });
    });
  }

  /** How far a patient has read (peerReadSeq from the list, or a live receipt). */
  function notePeerRead(peer, seq) {
    var conv = conversations.get(peer);
    if (typeof seq !== "number") return;
    if (conv && seq > conv.peerReadSeq) conv.peerReadSeq = seq;
    if (peer === active) thread.applyReceipt(seq);
  }

  // ---- the open thread --------------------------------------------------------------------------

  function openConversation(peer) {
    if (!peer) return;
    active = peer;
    var conv = upsertConversation(peer, null, 0);
    conversations.forEach(function (c) { c.li.classList.toggle("active", c === conv); });
    $("app").classList.add("thread-open");
    $("peer-name").textContent = peer;
    $("peer-avatar").textContent = D.initials(peer);
    $("input").disabled = $("send").disabled = false;
    D.writeFragment(session, { peer: peer });
    if (editing) editing.stop();
    thread.clear();
    thread.applyReceipt(conv.peerReadSeq);
    reads.reset();
    D.showBanner($("banner"), "");
    renderConsultation();
    pager.start({ channel: "pm", peer: peer, user: me }).catch(function (error) {
      D.showBanner($("banner"), "Could not load the history: " + error.message, true);
    });
    if (!D.isTouch()) $("input").focus();
  }

  /** Back to the list (phones show one or the other): no thread is open, so nothing is read. */
  function closeConversation() {
    active = null;
    if (editing) editing.stop();
    pager.stop();
    thread.clear();
    reads.reset();
    $("app").classList.remove("thread-open");
    $("peer-name").textContent = "Select a patient";
    $("peer-avatar").textContent = "";
    $("input").disabled = $("send").disabled = true;
    conversations.forEach(function (c) { c.li.classList.remove("active"); });
    D.writeFragment(session, { peer: "" });
    D.showBanner($("banner"), "");
    renderConsultation();
  }

  $("back").addEventListener("click", closeConversation);

  // ---- received / read times of my last messages (REST; SPEC §13) -----------------------------

  /**
   * A line under each of the last RECEIPT_LAST messages the doctor sent in the open thread
   * ("Received 10:02 · Read 10:05"; older messages keep theirs once complete). Cheap on purpose:
   * one debounced refresh at a time, only those few messages, and a message whose receipt is
   * complete (received and read) is never asked again.
   */
  var RECEIPT_LAST = 3;
  var receipts = {
    done: new Map(),    // message id -> its complete receipt {user, receivedAt, readAt}
    timer: null,
    schedule: function () {
      if (receipts.timer) return;
      receipts.timer = setTimeout(function () {
        receipts.timer = null;
        receipts.refresh();
      }, 300);
    },
    refresh: function () {
      var peer = active;
      if (!peer) return;
      var mine = Array.prototype.slice.call($("thread").querySelectorAll(".msg.mine[data-id]:not(.system):not(.recalled)"));
      var last = mine.slice(-RECEIPT_LAST);
      // An older message keeps its line only when it is complete (final); a partial one would go stale.
      mine.slice(0, -RECEIPT_LAST).forEach(function (li) {
        var line = li.querySelector(".receipt-times");
        if (line && !receipts.done.has(li.dataset.id)) line.remove();
      });
      last.forEach(function (li) {
        var id = li.dataset.id;
        var known = receipts.done.get(id);
        if (known) {
          showReceipt(li, known);
          return;
        }
        client.receipts({ channel: "pm", id: id }).then(function (body) {
          var r = body.receipts.filter(function (x) { return x.user === peer; })[0];
          if (!r) return;
          if (r.receivedAt && r.readAt) receipts.done.set(id, r);
          var shown = active === peer ? thread.byId.get(id) : null;
          if (shown) showReceipt(shown, r);
        }, function () { /* no line: e.g. an older server without receipts; asked again next time */ });
      });
    }
  };

  function showReceipt(li, r) {
    var line = li.querySelector(".receipt-times");
    if (!line) {
      line = D.el("div", "receipt-times");
      li.insertBefore(line, li.querySelector(".msg-actions"));  // above Edit / Recall, if shown
    }
    var parts = [r.receivedAt ? "Received " + D.formatTime(r.receivedAt) : "Not received yet"];
    if (r.readAt) parts.push("Read " + D.formatTime(r.readAt));
    line.textContent = parts.join(" · ");
    line.classList.toggle("read", !!r.readAt);
    if (r.receivedAt) line.title = "Received " + new Date(r.receivedAt).toLocaleString() +
      (r.readAt ? "\nRead " + new Date(r.readAt).toLocaleString() : "");
  }

  // ---- consultations (REST; SPEC §6) ------------------------------------------------------------

  function remember(consultation) {
    consultations.byId.set(consultation.id, consultation);
    var current = consultations.byPatient.get(consultation.patient);
    if (consultation.status === "open" || (current && current.id === consultation.id)) {
      consultations.byPatient.set(consultation.patient, consultation);
    }
  }

  function loadConsultations() {
    return D.api(session, "/api/v1/consultations?" + D.query({ user_id: me })).then(function (body) {
      consultations.supported = true;
      // Newest first: remember oldest first so the newest one per patient wins.
      (body.consultations || []).slice().reverse().forEach(remember);
      renderConsultation();
    }, function (error) {
      if (error.status === 404) consultations.supported = false;
      renderConsultation();
    });
  }

  function renderConsultation() {
    var c = active ? consultations.byPatient.get(active) : null;
    var open = !!c && c.status === "open";
    var state = $("consultation-state");
    state.textContent = !active ? "no patient selected" : open ? "consultation open" : "no open consultation";
    state.className = "pill " + (open ? "online" : "plain");
    $("start-consultation").disabled = !active || open || !consultations.supported;
    $("end-consultation").disabled = !open || !consultations.supported;
    if (!consultations.supported) $("start-consultation").title = "This server does not offer consultations yet";
  }

  function consultationAction(request) {
    $("start-consultation").disabled = $("end-consultation").disabled = true;
    request.then(function (consultation) {
      remember(consultation);
      renderConsultation();
    }, function (error) {
      D.showBanner($("banner"), error.message || error.code, true);
      loadConsultations();  // e.g. 409: someone else started or ended it; show the truth
    });
  }

  $("start-consultation").addEventListener("click", function () {
    consultationAction(D.api(session, "/api/v1/consultations", { method: "POST", body: { doctor: me, patient: active } }));
  });
  $("end-consultation").addEventListener("click", function () {
    var c = consultations.byPatient.get(active);
    if (!c) return;
    consultationAction(D.api(session, "/api/v1/consultations/" + encodeURIComponent(c.id) + "/end", { method: "POST", body: {} }));
  });

  /** The patient of a pm message (consultation events and recall/edit notices name both parties:
   * their sender may be staff). */
  function peerOf(m) {
    if (typeof m.patient === "string") return Promise.resolve(m.patient);
    if (Array.isArray(m.parties)) return Promise.resolve(m.parties[0] === me ? m.parties[1] : m.parties[0]);
    return Promise.resolve(m.from === me ? m.to : m.from);
  }

  // ---- live traffic -----------------------------------------------------------------------------

  client.on("message", function (m) {
    if (m.channel !== "pm") return;
    peerOf(m).then(function (peer) {
      if (m.event === "consultation.started" || m.event === "consultation.ended") {
        remember({ id: m.consultationId, doctor: me, patient: peer,
          status: m.event === "consultation.started" ? "open" : "closed" });
        renderConsultation();
      }
      var visible = peer === active && document.visibilityState !== "hidden";
      var conv = conversations.get(peer);
      // The backlog on connect repeats messages the list's `unread` already counts.
      var counted = !!(conv && conv.lastMessage && m.seq <= conv.lastMessage.seq);
      var unread = (conv ? conv.unread : 0) + (m.from !== me && !visible && !m.event && !counted ? 1 : 0);
      upsertConversation(peer, m, unread);
      if (peer === active && thread.add(m)) reads.schedule();
      // The patient is writing, so its app has received what came before: refresh the times.
      if (peer === active && m.from === peer) receipts.schedule();
    });
  });
  // Recall and edit (SPEC §14): the message changes in place; the list's preview is the notice.
  client.on("recalled", function (m) { thread.applyChange(m); });
  client.on("edited", function (m) {
    if (thread.applyChange(m)) receipts.schedule();
  });
  var editing = D.bindMessageActions(client, thread, $("composer"), $("input"), $("banner"), function (applied) {
    if (applied) receipts.schedule();
  });

  client.on("receipt", function (r) {
    if (r.channel === "pm") notePeerRead(r.user, r.seq);
    if (r.channel === "pm" && r.user === active) receipts.schedule();
  });
  client.on("connected", function (info) {
    D.showBanner($("banner"), "");
    if (info.reconnected) {
      loadConversations();  // unread counts may have moved while away
      receipts.schedule();  // and so may the patient's received / read times
    }
  });

  D.bindComposer($("composer"), $("input"), function (text) {
    if (!active) return;
    if (editing.saveEdit(text)) return;
    var to = active;
    var clientMsgId = window.IMClient.newId();
    thread.addPending(clientMsgId, text);
    client.sendP2P(to, text, { clientMsgId: clientMsgId }).then(function (message) {
      upsertConversation(to, message);
      if (active === to) {
        thread.confirm(clientMsgId, message);
        receipts.schedule();
      }
    }, function (error) {
      if (active === to) thread.fail(clientMsgId, error);
    });
  });

  $("new-chat").addEventListener("submit", function (event) {
    event.preventDefault();
    var peer = $("new-chat-peer").value.trim();
    $("new-chat-peer").value = "";
    if (peer) openConversation(peer);
  });

  // ---- start --------------------------------------------------------------------------------------

  renderConsultation();
  Promise.all([loadConversations(), loadConsultations()]).catch(function (error) {
    if (error.code !== "unauthenticated") D.showBanner($("banner"), "Could not load conversations: " + error.message, true);
  }).then(function () {
    if (session.peer) openConversation(session.peer);
  });
  client.connect().catch(function () { /* shown by the status pill and the banner */ });
})();
