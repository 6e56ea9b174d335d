import pytest


@pytest.mark.gen_test
async def test_ws_roundtrip(api):
    jack = await api.ws("Jack")
    sent = await api.send_pm("Rose", "Jack", "hi 你好 🌹")
    frame = await jack.recv_type("message")
    assert frame["message"] == sent
    ack = await jack.send_and_ack({"type": "pm", "to": "Rose", "contentType": 1, "content": "yo", "clientMsgId": "a1"})
    assert ack["type"] == "ack", ack
    assert ack["message"]["seq"] == 2
    await jack.send({"type": "ping"})
    assert (await jack.recv_type("pong")) == {"type": "pong"}
