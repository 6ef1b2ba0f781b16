"""The deployment Grid wrapper files SuperLink-made error replies under the hospital they concern."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID

from fedrad.server.deploy_grid import FastPollGrid


def _meta(*, src: int, dst: int, mid: str, reply_to: str = "") -> Metadata:
    return Metadata(run_id=1, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)


class _SuperLink:
    """Answers node 5 itself; for node 7 (whose heartbeat lapsed) the SuperLink answers an error."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"req-{m.metadata.dst_node_id}"
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if self.pulls < 2:
            return []
        out = []
        for mid in ids:
            if mid == "req-5":
                out.append(Message(content=RecordDict(), metadata=_meta(src=5, dst=0, mid="r5", reply_to=mid)))
            else:
                out.append(Message(error=Error(code=3, reason="Node Unavailable"),
                                   metadata=_meta(src=SUPERLINK_NODE_ID, dst=SUPERLINK_NODE_ID, mid="r7",
                                                  reply_to=mid)))
        return out


def test_superlink_made_errors_are_filed_under_their_hospital() -> None:
    link = _SuperLink()
    grid = FastPollGrid(link, interval=0.01)  # type: ignore[arg-type]
    requests = [Message(content=RecordDict(), metadata=_meta(src=0, dst=n, mid="")) for n in (5, 7)]
    replies = list(grid.send_and_receive(requests, timeout=5.0))
    by_src = {m.metadata.src_node_id: m for m in replies}
    assert set(by_src) == {5, 7} and link.pulls == 2
    assert by_src[7].has_error() and by_src[7].error.reason == "Node Unavailable"
    assert by_src[7].metadata.reply_to_message_id == "req-7"
    assert not by_src[5].has_error()
