"""Consultations: /api/v1/consultations (SPEC §6)."""

from __future__ import annotations

from handlers.base import BaseHandler


class ConsultationsHandler(BaseHandler):
    async def post(self) -> None:
        """Start: {doctor, patient, operator?}; posts consultation.started into their conversation."""
        principal = self.authenticate()
        consultation = await self.services.consultations.start(principal, self.json_body())
        self.write_json(consultation, 201)

    async def get(self) -> None:
        """A user's consultations, newest first; ?status=open|closed filters."""
        principal = self.authenticate()
        found = await self.services.consultations.list_for_user(principal, self.query())
        self.write_json({"consultations": found})


class ConsultationEndHandler(BaseHandler):
    async def post(self, consultation_id: str) -> None:
        """End: {operator?}; 409 when already closed."""
        principal = self.authenticate()
        consultation = await self.services.consultations.end(principal, consultation_id, self.json_body(optional=True))
        self.write_json(consultation)
