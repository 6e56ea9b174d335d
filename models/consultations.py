"""Consultations: an episode of care between one doctor and one patient (SPEC §6).

Starting and ending one posts a system event into the doctor-patient pm conversation; its `from`
records the operator (the doctor, the patient, or staff named explicitly by a service token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from models import validation as v
from models.audit import AuditRecorder
from models.clock import iso, utcnow
from models.conversations import ConversationRef
from models.database import Database
from models.directory import UserDirectory
from models.errors import (
    ConsultationClosed,
    ConsultationOpen,
    Forbidden,
    InvalidField,
    NotADoctor,
    NotFound,
    PatientIsDoctor,
)
from models.messages import Draft, MessageService, recipients_of
from models.outbox import EventSink, NullSink
from models.principal import Principal, require_own_user
from models.throttling import ActionLimiter

EVENT_STARTED = "consultation.started"
EVENT_ENDED = "consultation.ended"
STATUSES = ("open", "closed")


def open_key(doctor: str, patient: str) -> str:
    """What an open consultation holds in `openKey`; the unique index lets one per pair hold it.

    A closed one holds its own id instead of losing the field: the embedded nx-27017 ignores
    partial filters, so the index must stay unique over every document that has the field.
    """
    return f"{len(doctor)}:{doctor}|{patient}"


def consultation_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "doctor": doc["doctor"],
        "patient": doc["patient"],
        "status": doc["status"],
        "startedAt": iso(doc["startedAt"]),
        "startedBy": doc["startedBy"],
        "endedAt": iso(doc["endedAt"]) if doc.get("endedAt") else None,
        "endedBy": doc.get("endedBy"),
    }


class ConsultationService:
    def __init__(
        self,
        db: Database,
        messages: MessageService,
        directory: UserDirectory,
        limiter: ActionLimiter,
        events: EventSink | None = None,  # consultation.started / .ended (SPEC §11)
        *,
        audit: AuditRecorder | None = None,  # consultation.started / .ended (SPEC §13; REST only: via "rest")
    ):
        self._audit = audit
        self._events = events or NullSink()
        self._consultations = db.consultations
        self._messages = messages
        self._directory = directory
        self._limiter = limiter

    def _operator(self, principal: Principal, data: Mapping[str, Any], parties: tuple[str, str]) -> str:
        """Staff name the operator explicitly; anyone else is the operator and must be a party."""
        if principal.is_staff:
            return v.require_id(data, "operator")
        if data.get("operator") is not None and data["operator"] != principal.user_id:
            raise Forbidden("operator: only service or admin tokens may name another operator")
        if principal.user_id not in parties:
            raise Forbidden("only the consultation's doctor or patient (or staff) may do this")
        return principal.user_id

    async def start(self, principal: Principal, data: Mapping[str, Any]) -> dict[str, Any]:
        doctor = v.require_id(data, "doctor")
        patient = v.require_id(data, "patient")
        if doctor == patient:
            raise InvalidField("patient", "must differ from the doctor")
        operator = self._operator(principal, data, (doctor, patient))
        if principal.role == "doctor" and principal.user_id != doctor:
            raise Forbidden("doctor: a doctor starts consultations as itself")
        if principal.role == "patient" and principal.user_id != patient:
            raise Forbidden("patient: a patient starts consultations as itself")
        await self._check_roles(principal, doctor, patient)
        self._limiter.check(principal.user_id)  # the consultation.started event is a message
        # Consultations stored before openKey existed do not hold it: this finds those.
        if await self._consultations.find_one({"doctor": doctor, "patient": patient, "status": "open"}):
            raise self._already_open()
        doc = {
            "_id": str(ObjectId()),
            "doctor": doctor,
            "patient": patient,
            "status": "open",
            "openKey": open_key(doctor, patient),
            "startedAt": utcnow(),
            "startedBy": operator,
            "endedAt": None,
            "endedBy": None,
        }
        try:
            await self._consultations.insert_one(doc)
        except DuplicateKeyError:  # a parallel start won the pair (the unique open_key index)
            raise self._already_open() from None
        await self._announce(doc, operator, EVENT_STARTED, f"Consultation started by {operator}")
        await self._record(principal, EVENT_STARTED, doc)
        await self._events.emit(EVENT_STARTED, {"consultation": consultation_to_wire(doc)})
        return consultation_to_wire(doc)

    async def end(self, principal: Principal, consultation_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        existing = await self._get(consultation_id)
        operator = self._operator(principal, data, (existing["doctor"], existing["patient"]))
        if existing["status"] != "open":
            raise ConsultationClosed("consultation is already closed")
        self._limiter.check(principal.user_id)  # the consultation.ended event is a message
        ended = await self._consultations.find_one_and_update(
            {"_id": consultation_id, "status": "open"},
            # Frees the pair's open_key for the next consultation.
            {"$set": {"status": "closed", "endedAt": utcnow(), "endedBy": operator, "openKey": consultation_id}},
            return_document=ReturnDocument.AFTER,
        )
        if ended is None:
            raise ConsultationClosed("consultation is already closed")
        await self._announce(ended, operator, EVENT_ENDED, f"Consultation ended by {operator}")
        await self._record(principal, EVENT_ENDED, ended)
        await self._events.emit(EVENT_ENDED, {"consultation": consultation_to_wire(ended)})
        return consultation_to_wire(ended)

    async def list_for_user(self, principal: Principal, query: Mapping[str, str]) -> list[dict[str, Any]]:
        user = require_own_user(principal, query)
        filter_: dict[str, Any] = {"$or": [{"doctor": user}, {"patient": user}]}
        status = query.get("status")
        if status is not None:
            if status not in STATUSES:
                raise InvalidField("status", "must be open or closed")
            filter_["status"] = status
        found = self._consultations.find(filter_).sort("startedAt", DESCENDING).limit(500)
        return [consultation_to_wire(doc) async for doc in found]

    async def _check_roles(self, principal: Principal, doctor: str, patient: str) -> None:
        """The doctor must be known as a doctor and the patient must not be (SPEC §6)."""
        self._directory.note_principal(principal)  # a doctor starting as itself proves it (handlers note it too)
        doctors = await self._directory.find_doctors([doctor, patient])
        if doctor not in doctors:
            raise NotADoctor(
                f"doctor: {doctor!r} is not known as a doctor (it has used no doctor token "
                "and no service or admin has declared it one)"
            )
        if patient in doctors:
            raise PatientIsDoctor(f"patient: {patient!r} is known as a doctor")

    @staticmethod
    def _already_open() -> ConsultationOpen:
        return ConsultationOpen("a consultation between this doctor and patient is already open")

    async def _get(self, consultation_id: str) -> dict[str, Any]:
        doc = None
        if v.OBJECT_ID_RE.match(consultation_id):  # anything else cannot exist
            doc = await self._consultations.find_one({"_id": consultation_id})
        if doc is None:
            raise NotFound(f"consultation {consultation_id!r} does not exist")
        return doc

    async def _record(self, principal: Principal, action: str, consultation: Mapping[str, Any]) -> None:
        if self._audit is not None:
            target = {
                "consultationId": consultation["_id"],
                "channel": "pm",
                "user": consultation["patient"],
                "peer": consultation["doctor"],
            }
            await self._audit.record(principal.user_id, principal.role, action, "rest", target)

    async def _announce(self, consultation: Mapping[str, Any], operator: str, event: str, content: str) -> None:
        """The event message in the doctor-patient conversation, sent by the system for the operator."""
        doctor, patient = consultation["doctor"], consultation["patient"]
        to = patient if operator == doctor else doctor
        fields = {
            "channel": "pm",
            "from": operator,
            "to": to,
            "contentType": 1,
            "content": content,
            "event": event,
            "consultationId": consultation["_id"],
            # The conversation's two parties: with a staff operator, from/to alone do not name it.
            "doctor": doctor,
            "patient": patient,
            # Makes a retried announcement idempotent: one event message per consultation and event.
            # Its own stored field with its own unique index, never a clientMsgId: a client that
            # sent this string as a clientMsgId first would otherwise suppress the event (SPEC §4).
            "eventKey": f"{event}:{consultation['_id']}",
        }
        ref = ConversationRef.pm(doctor, patient)
        pair = recipients_of(ref, fields)
        draft = Draft(ref, fields, pair, pair)
        await self._messages.send(draft)
