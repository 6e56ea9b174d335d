"""GET /api/v1/status: public running status; connection counts for admins only."""

from __future__ import annotations

import re

import pytest

from server import __version__


@pytest.mark.gen_test
async def test_status_is_public_and_counts_connections_for_admins(api):
    public = await api.get("/api/v1/status")
    assert public.code == 200
    body = public.json
    assert set(body) == {"version", "profile", "uptimeSeconds", "db"}
    assert body["version"] == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", body["version"])
    assert body["profile"] == "test" and body["db"] == {"ok": True} and body["uptimeSeconds"] >= 0

    await api.ws("Jack")
    await api.ws("Jack")
    await api.ws("Rose", "doctor")
    admin = (await api.get("/api/v1/status", as_=("ops", "admin"))).json
    assert admin["connections"] == {"sockets": 3, "users": 2}
    doctor = (await api.get("/api/v1/status", as_=("Rose", "doctor"))).json
    assert "connections" not in doctor
