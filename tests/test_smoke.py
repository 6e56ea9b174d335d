import pytest


@pytest.mark.gen_test
async def test_status_is_public(api):
    response = await api.get("/api/v1/status")
    assert response.code == 200
    assert response.json["db"] == {"ok": True}
