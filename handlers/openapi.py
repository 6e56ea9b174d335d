"""GET /api/v1/openapi.json: the OpenAPI 3 description of every REST call (SPEC §5).

The document is a plain dict built once at import and served as pre-encoded JSON. It is checked
against the running server by tests/test_openapi.py (schemathesis): every status code and body a
handler can produce must be described here, so a handler change that adds one must add it here too.
"""

from __future__ import annotations

import json
from typing import Any

from handlers.base import BaseHandler
from server import __version__

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


# Every REST failure is the one envelope; these are the reasons per status.
ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("Bad input: malformed JSON, a missing or invalid field (the message names it)."),
    "401": _error("Missing, malformed, badly signed or expired token."),
    "403": _error("A valid token without the right (acting for someone else, not staff, ...)."),
    "404": _error("No such resource, or one the caller may not see."),
    "409": _error(
        "Conflict with the current state (group exists, consultation open/closed, a "
        "clientMsgId reused for a different message: client_msg_id_reused)."
    ),
    "413": _error("The body is over the documented limit."),
    "429": _error("The caller's send rate limit is exhausted; retry later."),
    "503": _error("The database is unavailable; nothing was written. Retry shortly."),
}


def _responses(ok: dict[str, dict[str, Any]], *codes: str) -> dict[str, Any]:
    return {**ok, **{code: ERRORS[code] for code in codes}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _path(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


ID = _ref("Id")
SEQ = {"type": "integer", "minimum": 0, "maximum": 2**53}
OBJECT_ID = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
TIMESTAMP = {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"}
WEBHOOK_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "type", "status", "attempts", "lastError", "nextAttemptAt", "createdAt"],
    "properties": {
        "id": OBJECT_ID,
        "type": {"type": "string"},
        "status": {"enum": ["pending", "failed", "delivered"]},
        "attempts": {"type": "integer", "minimum": 0},
        "lastError": {"type": ["string", "null"]},
        "nextAttemptAt": {"oneOf": [TIMESTAMP, {"type": "null"}]},
        "createdAt": TIMESTAMP,
    },
}
WEBHOOK_EVENT_PAGE = {
    "type": "object",
    "required": ["events", "next"],
    "properties": {"events": {"type": "array", "items": WEBHOOK_EVENT}, "next": {"type": ["string", "null"]}},
}
PAGE_PARAMS = [
    _query("after", SEQ, "Exclusive lower seq bound (needs one conversation named)."),
    _query("before", SEQ, "Exclusive upper seq bound: the `limit` messages just below it, oldest first."),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size; default 50, at most 200."),
    _query("cursor", {"type": "string", "maxLength": 64}, "The `next` of a previous page."),
    _query(
        "since",
        {"type": "string", "format": "date-time"},
        "Only messages created at or after this time: ISO 8601 with any offset (Z, +08:00).",
    ),
    _query(
        "until",
        {"type": "string", "format": "date-time"},
        "Only messages created before this time (exclusive), ISO 8601 with any offset.",
    ),
]
SEND_ERRORS = ("400", "401", "403", "404", "409", "413", "429", "503")  # 409: client_msg_id_reused
READ_ERRORS = ("400", "401", "403", "404", "503")

SCHEMAS: dict[str, Any] = {
    "Id": {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        # No leading "$" (no query-operator smuggling), no control characters.
        "pattern": "^[^$\\u0000-\\u001f\\u007f][^\\u0000-\\u001f\\u007f]*$",
        "description": "A user or group id.",
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                    "message": {"type": "string", "minLength": 1},
                },
            }
        },
    },
    "ContentType": {
        "description": '1 text, 2 image, 3 voice, 4 hyperlink; "1".."4" accepted on input.',
        "oneOf": [{"type": "integer", "enum": [1, 2, 3, 4]}, {"type": "string", "enum": ["1", "2", "3", "4"]}],
    },
    "Content": {
        "type": "string",
        "minLength": 1,
        "maxLength": 8000,
        "pattern": "\\S",
        "description": "Text; for contentType 4 an http(s) URL; for 2 and 3 a URL or a file id.",
    },
    "ClientMsgId": {"type": "string", "minLength": 1, "maxLength": 128},
    "Message": {
        "type": "object",
        "required": ["id", "channel", "from", "contentType", "content", "seq", "createdAt"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "channel": {"type": "string", "enum": ["sm", "pm", "gm"]},
            "from": ID,
            "to": ID,
            "group": ID,
            "groupType": {"type": "integer", "minimum": 0},
            "at": {"type": "array", "items": ID},
            "title": {"type": "string"},
            "summary": {"type": "string"},
            "contentType": {"type": "integer", "enum": [1, 2, 3, 4]},
            "content": {"type": "string", "description": "Never empty, except on a recalled message."},
            "seq": {"type": "integer", "minimum": 1},
            "createdAt": TIMESTAMP,
            "clientMsgId": {"type": "string"},
            "event": {"type": "string"},
            "consultationId": {"type": "string"},
            "members": {"type": "array", "items": ID},
            # SPEC §14: the state of a recalled or edited message, and what a notice is about.
            "recalled": {"type": "boolean"},
            "recalledAt": TIMESTAMP,
            "recalledBy": ID,
            "editedAt": TIMESTAMP,
            "editedBy": ID,
            "editCount": {"type": "integer", "minimum": 1},
            "target": {"type": "string", "description": "On a message.recalled / message.edited notice: the message."},
            "parties": {
                "type": "array",
                "items": ID,
                "description": "On a pm notice: the conversation's two users (its `from` may be staff).",
            },
        },
    },
    "MessagePage": {
        "type": "object",
        "required": ["messages", "next"],
        "additionalProperties": False,
        "properties": {
            "messages": {"type": "array", "items": _ref("Message")},
            "next": {"type": ["string", "null"]},
        },
    },
    "Conversation": {
        "type": "object",
        "required": ["channel", "lastMessage", "unread", "receivedSeq", "readSeq"],
        "properties": {
            "channel": {"type": "string", "enum": ["sm", "pm", "gm"]},
            "peer": ID,
            "group": ID,
            "lastMessage": _ref("Message"),
            "unread": {"type": "integer", "minimum": 0},
            "receivedSeq": {"type": "integer", "minimum": 0},
            "readSeq": {"type": "integer", "minimum": 0},
            "peerReadSeq": {
                "type": "integer",
                "minimum": 0,
                "description": "pm only: how far the other party has read.",
            },
        },
    },
    "Group": {
        "type": "object",
        "required": ["id", "name", "groupType", "members", "createdAt", "createdBy"],
        "additionalProperties": False,
        "properties": {
            "id": ID,
            "name": {"type": "string"},
            "groupType": {"type": "integer", "minimum": 0},
            "members": {"type": "array", "items": ID},
            "createdAt": TIMESTAMP,
            "createdBy": ID,
        },
    },
    "Consultation": {
        "type": "object",
        "required": ["id", "doctor", "patient", "status", "startedAt", "startedBy", "endedAt", "endedBy"],
        "additionalProperties": False,
        "properties": {
            "id": OBJECT_ID,
            "doctor": ID,
            "patient": ID,
            "status": {"type": "string", "enum": ["open", "closed"]},
            "startedAt": TIMESTAMP,
            "startedBy": ID,
            "endedAt": {"oneOf": [TIMESTAMP, {"type": "null"}]},
            "endedBy": {"oneOf": [ID, {"type": "null"}]},
        },
    },
    "File": {
        "type": "object",
        "required": ["id", "url", "mimeType", "size"],
        "additionalProperties": False,
        "properties": {
            "id": OBJECT_ID,
            "url": {"type": "string", "pattern": "^/api/v1/files/[0-9a-f]{24}$"},
            "mimeType": {"type": "string", "pattern": "^(image|audio)/"},
            "size": {"type": "integer", "minimum": 1},
        },
    },
    "UserRole": {
        "type": "object",
        "required": ["user", "role", "seenAs", "declaredBy", "declaredAt"],
        "additionalProperties": False,
        "properties": {
            "user": ID,
            "role": {
                "oneOf": [{"type": "string", "enum": ["doctor", "patient"]}, {"type": "null"}],
                "description": "The declared role (null: none declared).",
            },
            "seenAs": {
                "type": "array",
                "items": {"type": "string", "enum": ["doctor", "patient", "service", "admin"]},
                "description": "Roles of the tokens this user has used.",
            },
            "declaredBy": {"oneOf": [ID, {"type": "null"}]},
            "declaredAt": {"oneOf": [TIMESTAMP, {"type": "null"}]},
        },
    },
    "Presence": {
        "type": "object",
        "required": ["user", "online", "lastSeen"],
        "additionalProperties": False,
        "properties": {"user": ID, "online": {"type": "boolean"}, "lastSeen": {"oneOf": [TIMESTAMP, {"type": "null"}]}},
    },
    "Status": {
        "type": "object",
        "required": ["version", "profile", "uptimeSeconds", "db"],
        "additionalProperties": False,
        "properties": {
            "version": {"type": "string", "pattern": "^\\d+\\.\\d+\\.\\d+"},
            "profile": {"type": "string", "enum": ["dev", "test", "prod"]},
            "uptimeSeconds": {"type": "number", "minimum": 0},
            "db": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
            "connections": {
                "type": "object",
                "required": ["sockets", "users"],
                "properties": {
                    "sockets": {"type": "integer", "minimum": 0},
                    "users": {"type": "integer", "minimum": 0},
                },
                "description": "Admin tokens only.",
            },
        },
    },
}

PM_BODY = {
    "type": "object",
    "required": ["from", "to", "contentType", "content"],
    "properties": {
        "from": ID,
        "to": ID,
        "contentType": _ref("ContentType"),
        "content": _ref("Content"),
        "clientMsgId": _ref("ClientMsgId"),
    },
}
GM_BODY = {
    "type": "object",
    "required": ["from", "group", "contentType", "content"],
    "properties": {
        "from": ID,
        "group": ID,
        "groupType": {
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 2**31},
                {"type": "string", "pattern": "^[0-9]{1,9}$"},
            ]
        },
        "at": {"oneOf": [ID, {"type": "array", "items": ID, "maxItems": 500}]},
        "contentType": _ref("ContentType"),
        "content": _ref("Content"),
        "clientMsgId": _ref("ClientMsgId"),
    },
}
SM_BODY = {
    "type": "object",
    "required": ["to", "title", "contentType", "content"],
    "properties": {
        "to": ID,
        "title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
        "summary": {"type": "string", "maxLength": 1000},
        "contentType": _ref("ContentType"),
        "content": _ref("Content"),
        "clientMsgId": _ref("ClientMsgId"),
    },
}
SENT = {
    "201": _ok("Stored (journaled) and delivered: the message.", _ref("Message")),
    "200": _ok("A repeated clientMsgId: the original message; nothing new stored.", _ref("Message")),
}
MESSAGE_PAGE = {"200": _ok("A page of messages, oldest first.", _ref("MessagePage"))}
GROUP = {"200": _ok("The group.", _ref("Group"))}
MARKER_CONVERSATION = {
    "channel": {"type": "string", "enum": ["sm", "pm", "gm"]},
    "peer": ID,
    "group": ID,
    "seq": SEQ,
}
FILE_MEDIA = {"schema": {"type": "string", "format": "binary"}}

NULLABLE_TIME = {"oneOf": [TIMESTAMP, {"type": "null"}]}
NULLABLE_ID = {"oneOf": [ID, {"type": "null"}]}
ACCOUNT = {
    "type": "object",
    "required": [
        "user",
        "suspended",
        "reason",
        "suspendedAt",
        "suspendedBy",
        "tokensValidFrom",
        "revokedAt",
        "revokedBy",
    ],
    "properties": {
        "user": ID,
        "suspended": {"type": "boolean"},
        "reason": {"oneOf": [{"type": "string"}, {"type": "null"}]},
        "suspendedAt": NULLABLE_TIME,
        "suspendedBy": NULLABLE_ID,
        "tokensValidFrom": {
            **NULLABLE_TIME,
            "description": "Tokens with an iat at or after this second work; older ones, and any "
            "without iat, are refused.",
        },
        "revokedAt": NULLABLE_TIME,
        "revokedBy": NULLABLE_ID,
    },
}

# SPEC §15: legal holds and the purge.
HOLD: dict[str, Any] = {
    "type": "object",
    "required": ["id", "reason", "createdAt", "createdBy"],
    "properties": {
        "id": OBJECT_ID,
        "user": ID,
        "peer": ID,
        "group": ID,
        "reason": {"type": "string"},
        "createdAt": TIMESTAMP,
        "createdBy": {"type": "string"},
        "releasedAt": {**TIMESTAMP, "description": "Only on the answer of DELETE: when the hold ended."},
        "releasedBy": {"type": "string"},
    },
}
HOLD_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["reason"],
    "description": "A user (all its conversations and groups), a user + peer (one pm conversation), "
    "or a group; naming none is a 400 naming user, an unknown user or group a 404.",
    "properties": {
        "user": ID,
        "peer": ID,
        "group": ID,
        "reason": {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": "\\S"},
    },
}
PURGE_KINDS = ("sm", "pm", "gm", "audit", "webhook", "files")
PURGE_COUNTS: dict[str, Any] = {
    "type": "object",
    "required": list(PURGE_KINDS),
    "properties": {kind: {"type": "integer", "minimum": 0} for kind in PURGE_KINDS},
}

RECEIPTS_OPERATION: dict[str, Any] = {
    "summary": "When each recipient received and read a message (the sender, service, admin)",
    "parameters": [_path("id", ID, "The message id.")],
    "responses": _responses(
        {
            "200": _ok(
                "One receipt per recipient; null where not yet.",
                {
                    "type": "object",
                    "required": ["message", "receipts"],
                    "properties": {
                        "message": {"type": "string"},
                        "receipts": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["user", "receivedAt", "readAt"],
                                "properties": {
                                    "user": {"type": "string"},
                                    "receivedAt": {"type": ["string", "null"]},
                                    "readAt": {"type": ["string", "null"]},
                                },
                            },
                        },
                    },
                },
            )
        },
        *READ_ERRORS,
    ),
}

# SPEC §14: edit, recall and the versions of one message.
CHANGE_ERRORS = ("400", "401", "403", "404", "409", "413", "429", "503")
CHANGE_DESCRIPTION = (
    "The sender within [messages] recall_window_secs / edit_window_secs (later: 403 window_expired); "
    "service/admin at any time, naming `operator`. 403 forbidden: someone else's message; 409 "
    "not_editable: an event message (consultation, group or recall/edit notice); 409 message_recalled: "
    "an edit of a recalled message; 409 client_msg_id_reused: an edit's clientMsgId already used for "
    "other content. A notice (event message.recalled / message.edited, `target` = the message) follows "
    "in the conversation with its own seq."
)
OPERATOR = {**ID, "description": "Required with service/admin tokens: who makes the change."}
EDIT_OPERATION: dict[str, Any] = {
    "summary": "Edit a message: new content (and contentType); every version is kept",
    "description": CHANGE_DESCRIPTION,
    "parameters": [_path("id", ID, "The message id.")],
    "requestBody": _json_body(
        {
            "type": "object",
            "required": ["content"],
            "properties": {
                "content": _ref("Content"),
                "contentType": _ref("ContentType"),
                "clientMsgId": {**_ref("ClientMsgId"), "description": "Makes a retried edit change nothing more."},
                "operator": OPERATOR,
            },
        }
    ),
    "responses": _responses({"200": _ok("The message as it now is.", _ref("Message"))}, *CHANGE_ERRORS),
}
RECALL_OPERATION: dict[str, Any] = {
    "summary": "Recall a message: content emptied, marked recalled; the original is kept",
    "description": CHANGE_DESCRIPTION + " Repeating a recall changes nothing and answers the message.",
    "parameters": [_path("id", ID, "The message id.")],
    "requestBody": _json_body(
        {
            "type": "object",
            "properties": {"reason": {"type": "string", "maxLength": 1000}, "operator": OPERATOR},
        },
        required=False,
    ),
    "responses": _responses({"200": _ok("The recalled message.", _ref("Message"))}, *CHANGE_ERRORS),
}
HISTORY_OPERATION: dict[str, Any] = {
    "summary": "Every version of a message, oldest first (admin only; audited as message.history.read)",
    "parameters": [_path("id", ID, "The message id.")],
    "responses": _responses(
        {
            "200": _ok(
                "The message as it now is and what it was.",
                {
                    "type": "object",
                    "required": ["message", "versions"],
                    "additionalProperties": False,
                    "properties": {
                        "message": _ref("Message"),
                        "versions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["action", "content", "contentType", "at", "by"],
                                "properties": {
                                    "action": {"type": "string", "enum": ["created", "edited", "recalled"]},
                                    "content": {"type": "string"},
                                    "contentType": {"type": "integer", "enum": [1, 2, 3, 4]},
                                    "at": TIMESTAMP,
                                    "by": ID,
                                    "reason": {"type": "string", "description": "A recall's reason, if given."},
                                },
                            },
                        },
                    },
                },
            )
        },
        "400",
        "401",
        "403",
        "404",
        "503",
    ),
}

PATHS: dict[str, Any] = {
    "/api/v1/chats/pm": {
        "post": {
            "summary": "Send a person-to-person message",
            "operationId": "sendPm",
            "requestBody": _json_body(PM_BODY),
            "responses": _responses(SENT, *SEND_ERRORS),
        },
        "get": {
            "summary": "A user's person-to-person messages",
            "operationId": "listPm",
            "parameters": [
                _query("user_id", ID, "Whose messages.", required=True),
                _query("peer", ID, "Only the conversation with this user."),
                *PAGE_PARAMS,
            ],
            "responses": _responses(MESSAGE_PAGE, *READ_ERRORS),
        },
    },
    "/api/v1/chats/gm": {
        "post": {
            "summary": "Send a group message (members only)",
            "operationId": "sendGm",
            "requestBody": _json_body(GM_BODY),
            "responses": _responses(SENT, *SEND_ERRORS),
        },
        "get": {
            "summary": "A group's messages (members and staff)",
            "operationId": "listGm",
            "parameters": [_query("group", ID, "The group.", required=True), *PAGE_PARAMS],
            "responses": _responses(MESSAGE_PAGE, *READ_ERRORS),
        },
    },
    "/api/v1/chats/sm": {
        "post": {
            "summary": "Send a system message (service/admin only)",
            "operationId": "sendSm",
            "requestBody": _json_body(SM_BODY),
            "responses": _responses(SENT, *SEND_ERRORS),
        },
        "get": {
            "summary": "A user's system messages",
            "operationId": "listSm",
            "parameters": [_query("user_id", ID, "The recipient.", required=True), *PAGE_PARAMS],
            "responses": _responses(MESSAGE_PAGE, *READ_ERRORS),
        },
    },
    "/api/v1/conversations": {
        "get": {
            "summary": "A user's conversations with unread counts, newest first",
            "operationId": "listConversations",
            "parameters": [
                _query("user_id", ID, "Whose conversations.", required=True),
                _query(
                    "limit", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size; default 50, at most 200."
                ),
                _query("cursor", {"type": "string", "maxLength": 800}, "The `next` of a previous page."),
            ],
            "responses": _responses(
                {
                    "200": _ok(
                        "The conversations.",
                        {
                            "type": "object",
                            "required": ["conversations", "next"],
                            "additionalProperties": False,
                            "properties": {
                                "conversations": {"type": "array", "items": _ref("Conversation")},
                                "next": {
                                    "type": ["string", "null"],
                                    "description": "The cursor of the next page, or null.",
                                },
                            },
                        },
                    )
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    "/api/v1/conversations/read": {
        "post": {
            "summary": "Move a user's read marker (the other party gets a receipt)",
            "operationId": "markRead",
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["user_id", "channel", "seq"],
                    "properties": {"user_id": ID, **MARKER_CONVERSATION},
                }
            ),
            "responses": _responses(
                {
                    "200": _ok(
                        "The markers after the move.",
                        {
                            "type": "object",
                            "required": ["channel", "receivedSeq", "readSeq"],
                            "additionalProperties": False,
                            "properties": {
                                "channel": {"type": "string", "enum": ["sm", "pm", "gm"]},
                                "receivedSeq": {"type": "integer", "minimum": 0},
                                "readSeq": {"type": "integer", "minimum": 0},
                            },
                        },
                    )
                },
                "400",
                "401",
                "403",
                "404",
                "413",
                "503",
            ),
        },
    },
    "/api/v1/groups": {
        "post": {
            "summary": "Create a group (doctors, service, admin)",
            "operationId": "createGroup",
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["name", "groupType", "members"],
                    "properties": {
                        "id": ID,
                        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
                        "groupType": {
                            "oneOf": [
                                {"type": "integer", "minimum": 0, "maximum": 2**31},
                                {"type": "string", "pattern": "^[0-9]{1,9}$"},
                            ]
                        },
                        "members": {"type": "array", "items": ID, "minItems": 1, "maxItems": 5000},
                    },
                }
            ),
            "responses": _responses(
                {"201": _ok("The new group.", _ref("Group"))}, "400", "401", "403", "409", "413", "429", "503"
            ),
        },
    },
    "/api/v1/groups/{id}": {
        "get": {
            "summary": "Read a group (members, creator, staff)",
            "operationId": "getGroup",
            "parameters": [_path("id", ID, "The group.")],
            "responses": _responses(GROUP, "400", "401", "403", "404", "503"),
        },
    },
    "/api/v1/groups/{id}/members": {
        "post": {
            "summary": "Add members; they get a group.members_added notice",
            "operationId": "addMembers",
            "description": "409 group_full: the group would pass [limits] max_group_members.",
            "parameters": [_path("id", ID, "The group.")],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["members"],
                    "properties": {"members": {"type": "array", "items": ID, "minItems": 1, "maxItems": 5000}},
                }
            ),
            "responses": _responses(GROUP, "400", "401", "403", "404", "409", "413", "429", "503"),
        },
    },
    "/api/v1/groups/{id}/members/{user}": {
        "delete": {
            "summary": "Remove a member (or leave)",
            "operationId": "removeMember",
            "parameters": [_path("id", ID, "The group."), _path("user", ID, "The member.")],
            "responses": _responses(GROUP, "400", "401", "403", "404", "429", "503"),
        },
    },
    "/api/v1/users/{id}/groups": {
        "get": {
            "summary": "The groups a user belongs to",
            "operationId": "listUserGroups",
            "parameters": [_path("id", ID, "The user.")],
            "responses": _responses(
                {
                    "200": _ok(
                        "The groups.",
                        {
                            "type": "object",
                            "required": ["groups"],
                            "additionalProperties": False,
                            "properties": {"groups": {"type": "array", "items": _ref("Group")}},
                        },
                    )
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    "/api/v1/users/{id}/presence": {
        "get": {
            "summary": "Online state and last seen",
            "operationId": "getPresence",
            "parameters": [_path("id", ID, "The user.")],
            "responses": _responses({"200": _ok("Presence.", _ref("Presence"))}, "400", "401", "403", "503"),
        },
    },
    "/api/v1/users/{id}/role": {
        "put": {
            "summary": "Declare a user's role (service/admin): who may be a consultation's doctor",
            "operationId": "declareUserRole",
            "description": "A user is known as a doctor once it has used a doctor token; a declaration "
            "wins over what tokens showed.",
            "parameters": [_path("id", ID, "The user.")],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"type": "string", "enum": ["doctor", "patient"]}},
                }
            ),
            "responses": _responses(
                {"200": _ok("The user's roles.", _ref("UserRole"))}, "400", "401", "403", "413", "503"
            ),
        },
    },
    "/api/v1/consultations": {
        "post": {
            "summary": "Start a consultation (posts consultation.started)",
            "description": "409 consultation_open (one is open for the pair), not_a_doctor (`doctor` "
            "is not known as a doctor), patient_is_doctor (`patient` is known as one).",
            "operationId": "startConsultation",
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["doctor", "patient"],
                    "properties": {
                        "doctor": ID,
                        "patient": ID,
                        "operator": {**ID, "description": "Required with service/admin tokens."},
                    },
                }
            ),
            "responses": _responses(
                {"201": _ok("The consultation.", _ref("Consultation"))}, "400", "401", "403", "409", "413", "429", "503"
            ),
        },
        "get": {
            "summary": "A user's consultations, newest first",
            "operationId": "listConsultations",
            "parameters": [
                _query("user_id", ID, "The doctor or patient.", required=True),
                _query("status", {"type": "string", "enum": ["open", "closed"]}, "Filter."),
            ],
            "responses": _responses(
                {
                    "200": _ok(
                        "The consultations.",
                        {
                            "type": "object",
                            "required": ["consultations"],
                            "additionalProperties": False,
                            "properties": {"consultations": {"type": "array", "items": _ref("Consultation")}},
                        },
                    )
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    "/api/v1/consultations/{id}/end": {
        "post": {
            "summary": "End a consultation (posts consultation.ended)",
            "operationId": "endConsultation",
            "parameters": [_path("id", OBJECT_ID, "The consultation.")],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {"operator": {**ID, "description": "Required with service/admin tokens."}},
                },
                required=False,
            ),
            "responses": _responses(
                {"200": _ok("The closed consultation.", _ref("Consultation"))},
                "400",
                "401",
                "403",
                "404",
                "409",
                "413",
                "429",
                "503",
            ),
        },
    },
    "/api/v1/files": {
        "post": {
            "summary": "Upload an image or voice note (stored in GridFS)",
            "operationId": "uploadFile",
            "parameters": [_query("owner", ID, "service/admin only: upload on this user's behalf.")],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            },
            "responses": _responses(
                {
                    "201": {
                        "description": "Stored; `Location` names the download URL.",
                        "content": {JSON: {"schema": _ref("File")}},
                    }
                },
                "400",
                "401",
                "403",
                "413",
                "503",
            ),
        },
    },
    "/api/v1/files/{id}": {
        "get": {
            "summary": "Download a file the caller may read (Range and If-None-Match supported)",
            "operationId": "downloadFile",
            "parameters": [_path("id", OBJECT_ID, "The file.")],
            "responses": _responses(
                {
                    "200": {"description": "The bytes.", "content": {"image/*": FILE_MEDIA, "audio/*": FILE_MEDIA}},
                    "206": {
                        "description": "The requested range.",
                        "content": {"image/*": FILE_MEDIA, "audio/*": FILE_MEDIA},
                    },
                    "304": {"description": "Not modified (If-None-Match)."},
                    "416": _error("The Range selects nothing of the file."),
                },
                "400",
                "401",
                "404",
                "503",
            ),
        },
    },
    "/api/v1/audit": {
        "get": {
            "summary": "The audit trail, newest first (admin only; the query is itself audited)",
            "operationId": "listAudit",
            "parameters": [
                _query("actor", ID, "Who acted."),
                _query("user", ID, "Entries whose target concerns this user (its user or peer)."),
                _query("channel", {"type": "string", "enum": ["sm", "pm", "gm"]}, "The target's channel."),
                _query("peer", ID, "The target's peer."),
                _query("group", ID, "The target's group."),
                _query("action", {"type": "string"}, "One action of SPEC §13 (messages.read, access.denied, ...)."),
                _query("since", {"type": "string", "format": "date-time"}, "ISO 8601, inclusive."),
                _query("until", {"type": "string", "format": "date-time"}, "ISO 8601, exclusive."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size; default 50."),
                _query("cursor", {"type": "string", "maxLength": 100}, "The `next` of a previous page."),
            ],
            "responses": _responses(
                {
                    "200": _ok(
                        "A page of entries.",
                        {
                            "type": "object",
                            "required": ["entries", "next"],
                            "properties": {
                                "entries": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["id", "at", "actor", "role", "action", "via", "target", "outcome"],
                                        "properties": {
                                            "id": {"type": "string"},
                                            "at": TIMESTAMP,
                                            "actor": {"type": "string"},
                                            "role": {"type": "string"},
                                            "action": {"type": "string"},
                                            "via": {"type": "string", "enum": ["rest", "ws", "system"]},
                                            "target": {"type": "object"},
                                            "outcome": {"type": "string", "enum": ["ok", "denied"]},
                                        },
                                    },
                                },
                                "next": {"type": ["string", "null"]},
                            },
                        },
                    )
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    **{
        f"/api/v1/chats/{channel}/{{id}}/receipts": {
            "get": {**RECEIPTS_OPERATION, "operationId": f"get{channel.upper()}Receipts"}
        }
        for channel in ("sm", "pm", "gm")
    },
    **{
        path.format(channel=channel): {method: {**operation, "operationId": f"{name}{channel.upper()}"}}
        for path, method, operation, name in (
            ("/api/v1/chats/{channel}/{{id}}", "patch", EDIT_OPERATION, "edit"),
            ("/api/v1/chats/{channel}/{{id}}/recall", "post", RECALL_OPERATION, "recall"),
            ("/api/v1/chats/{channel}/{{id}}/history", "get", HISTORY_OPERATION, "getHistory"),
        )
        for channel in ("sm", "pm", "gm")
    },
    "/api/v1/status": {
        "get": {
            "summary": "Running status (public; admin tokens add connection counts)",
            "operationId": "getStatus",
            "security": [{}, {"bearerAuth": []}],
            "responses": _responses({"200": _ok("Status.", _ref("Status"))}, "400", "401"),
        },
    },
    "/api/v1/webhooks/events": {
        "get": {
            "summary": "Webhook events of the outbox, newest first (admin only; SPEC §11)",
            "operationId": "listWebhookEvents",
            "parameters": [
                _query("status", {"enum": ["pending", "failed", "delivered"]}, "Only events in this state."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size; default 50."),
                _query("cursor", OBJECT_ID, "The `next` of the previous page."),
            ],
            "responses": _responses(
                {"200": _ok("A page of events.", WEBHOOK_EVENT_PAGE)}, "400", "401", "403", "404", "503"
            ),
        },
    },
    "/api/v1/webhooks/events/{id}/retry": {
        "post": {
            "summary": "Queue a failed event again, attempts from 1 (admin only)",
            "operationId": "retryWebhookEvent",
            "parameters": [_path("id", OBJECT_ID, "The event id (X-IM-Event-Id).")],
            "responses": _responses(
                {"200": _ok("The event, pending again.", WEBHOOK_EVENT)}, "400", "401", "403", "404", "409", "503"
            ),
        },
    },
    **{
        f"/api/v1/users/{{id}}/{action}": {
            "post": {
                "summary": summary,
                "operationId": operation,
                "description": "Admin only (SPEC §17). Stored (journaled) before the answer; every server "
                "process applies it within 2 s (sockets closed with 4003 on suspend, 4001 on revoke).",
                "parameters": [_path("id", ID, "The user.")],
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 1000}},
                        **({"required": ["reason"]} if action == "suspend" else {}),
                    },
                    required=action == "suspend",
                ),
                "responses": _responses(
                    {"200": _ok("The account as it now is.", ACCOUNT)}, "400", "401", "403", "413", "503"
                ),
            },
        }
        for action, summary, operation in (
            ("suspend", "Suspend a user: its tokens are refused (401 account_suspended)", "suspendUser"),
            ("reactivate", "Undo a suspension", "reactivateUser"),
            (
                "revoke-tokens",
                "Refuse every token of the user issued until now (401 token_revoked); answers once "
                "the current second is over, so tokens minted after the answer work",
                "revokeUserTokens",
            ),
        )
    },
    "/api/v1/retention/run": {
        "post": {
            "summary": "Run a retention purge now (admin only; SPEC §15)",
            "operationId": "runRetention",
            "description": "Deletes messages older than their channel's [retention] limit (except held "
            "conversations and each conversation's newest message), files older than a day that no kept "
            "message carries, audit entries and delivered webhook events past theirs; audited as "
            "retention.purged. One purge at a time across every process (a lease in the database): 409 "
            "purge_running while another runs.",
            "responses": _responses(
                {
                    "200": _ok(
                        "What was deleted, per kind.",
                        {"type": "object", "required": ["purged"], "properties": {"purged": PURGE_COUNTS}},
                    )
                },
                "400",
                "401",
                "403",
                "409",
                "413",
                "503",
            ),
        },
    },
    "/api/v1/holds": {
        "post": {
            "summary": "Place a legal hold (admin only): held messages and their files are never purged",
            "operationId": "createHold",
            "requestBody": _json_body(HOLD_BODY),
            "responses": _responses(
                {"201": _ok("The hold; audited as hold.created.", HOLD)},
                "400",
                "401",
                "403",
                "404",
                "413",
                "503",
            ),
        },
        "get": {
            "summary": "The active legal holds (admin only)",
            "operationId": "listHolds",
            "responses": _responses(
                {
                    "200": _ok(
                        "Active holds, oldest first.",
                        {
                            "type": "object",
                            "required": ["holds"],
                            "properties": {"holds": {"type": "array", "items": HOLD}},
                        },
                    )
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    "/api/v1/holds/{id}": {
        "delete": {
            "summary": "Release a legal hold (admin only); the next purge may take what is past its limit",
            "operationId": "releaseHold",
            "parameters": [_path("id", ID, "The hold id.")],
            "responses": _responses(
                {"200": _ok("The released hold; audited as hold.released.", HOLD)},
                "400",
                "401",
                "403",
                "404",
                "503",
            ),
        },
    },
    "/api/v1/users/{id}/export": {
        "get": {
            "summary": "A user's record as NDJSON (the user itself, service, admin; SPEC §16)",
            "operationId": "exportUser",
            "description": "Streamed, one JSON object per line, each with a `type`: `user`, then "
            "`conversation` lines (as in the conversation list), `message` lines ({type, message}: the "
            "user's sm and pm conversations and its groups while a member, oldest first per "
            "conversation), `consultation` lines, `file` lines ({type, id, url, mimeType, size}), and "
            "last `end` ({type, counts}). A stream that stops without `end` (or with an `error` line: "
            "{type, code, message}) is incomplete. Audited as export.created.",
            "parameters": [_path("id", ID, "The user.")],
            "responses": _responses(
                {
                    "200": {
                        "description": "The record, one JSON object per line.",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    }
                },
                "400",
                "401",
                "403",
                "503",
            ),
        },
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "getOpenApi",
            "security": [],
            "responses": _responses({"200": _ok("OpenAPI 3.1", {"type": "object"})}, "400"),
        },
    },
}


OPENAPI_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Family-doctor IM server",
        "version": __version__,
        "description": 'REST API of the IM server. Every error is {"error": {"code", "message"}}. '
        "The WebSocket protocol (/ws?token=<jwt>) is described in the README.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        "schemas": SCHEMAS,
    },
}
_ENCODED = json.dumps(OPENAPI_DOCUMENT, ensure_ascii=False, separators=(",", ":"))


class OpenApiHandler(BaseHandler):
    def get(self) -> None:
        """The OpenAPI document (public, like the API's shape itself)."""
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(_ENCODED)
