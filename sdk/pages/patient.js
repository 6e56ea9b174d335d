/* The patient chat: one conversation with the family doctor, live through the SDK. */
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

  var client = new window.IMClient({ url: session.server, token: session.token });
  var thread = new D.Thread($("thread"), session);
  var reads = D.readMarker(client, { channel: "pm", peer: function () { return session.peer; } }, thread);
  var pager = new D.HistoryPager(client, thread, $("older"), function (page, older, error) {
    if (error) {
      D.showBanner($("banner"), "Could not load earlier messages: " + error.message, true);
      return;
    }
    // The newest page tells the consultation's state; older pages must not overwrite it.
    if (!older) page.messages.forEach(function (m) { if (m.event) showConsultation(m); });
    reads.schedule();
  });
  window.imDemo = { client: client, thread: thread, session: session, pager: pager };

  D.bindStatus(client, $("status"), function () {
    D.showBanner($("banner"), "Your session has expired or the token is invalid. Please sign in again.", true);
    $("send").disabled = true;
  });

  function inThisConversation(m) {
    if (m.channel !== "pm") return false;
    var me = session.user;
    var peer = session.peer;
    if ((m.from === me && m.to === peer) || (m.from === peer && m.to === me)) return true;
    // Consultation events and recall/edit notices name both parties (their operator, `from`, may be staff).
    if (Array.isArray(m.parties)) return m.parties.indexOf(me) >= 0 && m.parties.indexOf(peer) >= 0;
    return m.patient === me && m.doctor === peer;
  }

  function showConsultation(m) {
    if (m.event === "consultation.started") $("consultation-state").textContent = "Consultation in progress";
    if (m.event === "consultation.ended") $("consultation-state").textContent = "Consultation ended";
  }

  client.on("message", function (m) {
    if (!inThisConversation(m)) return;
    if (thread.add(m)) {
      if (m.event) showConsultation(m);
      reads.schedule();
    }
  });
  // Recall and edit (SPEC §14): the message changes in place, on both sides.
  client.on("recalled", function (m) { thread.applyChange(m); });
  client.on("edited", function (m) { thread.applyChange(m); });
  var editing = D.bindMessageActions(client, thread, $("composer"), $("input"), $("banner"));

  client.on("receipt", function (r) {
    if (r.channel === "pm" && r.user === session.peer) thread.applyReceipt(r.seq);
  });
  client.on("connected", function () { D.showBanner($("banner"), ""); });

  D.bindComposer($("composer"), $("input"), function (text) {
    if (editing.saveEdit(text)) return;
    var clientMsgId = window.IMClient.newId();
    thread.addPending(clientMsgId, text);
    client.sendP2P(session.peer, text, { clientMsgId: clientMsgId }).then(function (message) {
      thread.confirm(clientMsgId, message);
    }, function (error) {
      thread.fail(clientMsgId, error);
    });
  });

  function start() {
    $("app").hidden = false;
    $("peer-name").textContent = session.peer;
    $("peer-avatar").textContent = D.initials(session.peer);
    document.title = "Chat with " + session.peer;
    pager.start({ channel: "pm", peer: session.peer, user: session.user }).catch(function (error) {
      if (error.code !== "unauthenticated") D.showBanner($("banner"), "Could not load the history: " + error.message, true);
    });
    // How far the doctor has read, so "Read" survives a reload (live receipts move it on).
    D.findPmConversation(session, session.peer).then(function (conv) {
      if (conv) thread.applyReceipt(conv.peerReadSeq);
    }, function () { /* the thread still works; states stay "Sent" until a receipt */ });
    client.connect().catch(function () { /* shown by the status pill and the banner */ });
    // On a phone, focusing would pop the keyboard up over the thread before the patient asks.
    if (!D.isTouch()) $("input").focus();
  }

  if (session.peer) {
    start();
  } else {
    // No doctor named: continue the most recent conversation, if there is one.
    D.loadConversationList(session).then(function (list) {
      var last = list.filter(function (c) { return c.channel === "pm"; })[0];
      if (!last) throw new Error("no conversation yet");
      session.peer = last.peer;
      D.writeFragment(session);
      start();
    }).catch(function () {
      D.showLogin(session, { message: "Whom would you like to talk to? Enter your doctor's id." });
    });
  }
})();
