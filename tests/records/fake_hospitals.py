"""In-process hospitals behind a Flower :class:`Grid`, for coordinator tests that need whole rounds.

Each hospital really trains the global model it receives (plain SGD on its share of the bundled
PneumoniaMNIST) and really evaluates it on its validation share (score histograms from
:func:`fedrad.common.evaluation.evaluate`); what it reports follows the wire contract. A test can
make a round "noisy" (the update is drowned in Gaussian noise and the reply reports a large noise
multiplier, as after a resume with little budget left) or make the coordinator "crash" when a round
starts (the exception ends ``run_study`` as a killed process would: no further record is written).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedrad.common import protocol
from fedrad.common.datasets import ImageSplit, load_npz, npz_source_path
from fedrad.common.evaluation import evaluate
from fedrad.common.models import build_model
from fedrad.common.packing import as_unpacked

CPU = torch.device("cpu")


class CoordinatorKilled(RuntimeError):
    """Stands in for ``kill -9`` of the coordinator at the start of a round."""


def hospital_splits(n: int, *, train: int = 160, val: int = 80) -> list[tuple[ImageSplit, ImageSplit]]:
    splits = load_npz(npz_source_path(None))
    return [(splits["train"].subset(np.arange(i * train, (i + 1) * train)),
             splits["val"].subset(np.arange(i * val, (i + 1) * val))) for i in range(n)]


class FakeHospitals(Grid):
    def __init__(self, study: Any, *, sites: list[tuple[ImageSplit, ImageSplit]], noisy_rounds: dict[int, float] | None = None,
                 crash_at: int | None = None, node_ids: list[int] | None = None, steps: int = 6,
                 simulation: bool = True) -> None:
        self.study = study
        self.sites = sites
        self.noisy = dict(noisy_rounds or {})
        self.crash_at = crash_at
        self.node_ids = list(node_ids or [101 + i for i in range(len(sites))])
        self.steps = steps
        #: False: replies carry no partition id (deployment); names come from the coordinator.
        self.simulation = simulation
        self._run: Any = None
        self._pending: dict[str, Message] = {}

    # -- Grid plumbing ------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each hospital answers at once; the replies wait for :meth:`pull_messages`."""
        ids = []
        for m in messages:
            reply = self._answer(m)
            ids.append(reply.metadata.reply_to_message_id)
            self._pending[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    # -- the hospitals --------------------------------------------------------------------------
    def _model(self, content: RecordDict) -> torch.nn.Module:
        s = self.study
        model = build_model(s.model.name, in_channels=s.data.channels, num_classes=2, image_size=s.data.image_size,
                            options=s.model.options)
        model.load_state_dict(_unpacked(content["arrays"], model).to_torch_state_dict())
        return model

    def _reply(self, msg: Message, records: dict[str, Any]) -> Message:
        node = msg.metadata.dst_node_id
        if hasattr(protocol, "RECEIPT_KEY"):  # the contract's receipt, when this protocol has one
            records[protocol.RECEIPT_KEY] = ConfigRecord({"audit-head": "ab" * 32, "audit-count": 1 + int(time.time())})
        md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=node, dst_node_id=0,
                      reply_to_message_id=msg.metadata.message_id or uuid.uuid4().hex, group_id=msg.metadata.group_id,
                      created_at=time.time(), ttl=DEFAULT_TTL, message_type=msg.metadata.message_type)
        return Message(content=RecordDict(records), metadata=md)

    def _answer(self, msg: Message) -> Message:
        cfg = msg.content["config"]
        n = int(cfg["server-round"]) + int(cfg.get("round-offset", 0))
        node = msg.metadata.dst_node_id
        pid = self.node_ids.index(node)
        train, val = self.sites[pid]
        model = self._model(msg.content)
        s = self.study
        if msg.metadata.message_type == MessageType.TRAIN:
            if self.crash_at is not None and n == self.crash_at:
                raise CoordinatorKilled(f"coordinator killed during round {n}")
            first: dict[str, Any] = {}
            if cfg.get(getattr(protocol, "EVALUATE_FIRST_KEY", "evaluate-first")) is True:
                # the model it received is round n - 1's: evaluated before training, as a real node does
                first = {f"val-{k}": v for k, v in self._evaluation(model, val, n - 1, pid).items()
                         if k != "partition-id"}
            sigma = self.noisy.get(n, 1.0)
            gen = torch.Generator().manual_seed(1000 * n + pid)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            model.train()
            for _ in range(self.steps):
                idx = torch.randint(0, len(train), (32,), generator=gen).numpy()
                x = torch.from_numpy(np.asarray(train.images[idx], dtype=np.float32))
                y = torch.from_numpy(np.asarray(train.labels[idx], dtype=np.int64))
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if n in self.noisy:  # drowned in noise, as a round trained with a huge noise multiplier
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.3 * sigma)
            metrics: dict[str, Any] = {"num-examples": len(train), "steps": self.steps, "sample_rate": 0.2,
                                       "noise_multiplier": sigma, "max_grad_norm": 1.0, "delta": 1e-5,
                                       "epsilon": 0.5 * n, "epsilon_budget": 8.0, "partition-id": pid}
            if "round" in protocol.TRAIN_METRICS:
                metrics["round"] = n
            if not self.simulation:
                del metrics["partition-id"]
            metrics.update(first)
            arrays = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})
            if getattr(s.federation, "update_encoding", "float32") == "float16-delta":  # what a real node sends
                received = _unpacked(msg.content["arrays"], model).to_torch_state_dict()
                arrays = ArrayRecord({k: Array((v.detach() - received[k]).numpy().astype(np.float16))
                                      for k, v in model.state_dict().items()})
            return self._reply(msg, {"arrays": arrays, "metrics": MetricRecord(metrics)})
        metrics = self._evaluation(model, val, n, pid)
        if not self.simulation:
            del metrics["partition-id"]
        return self._reply(msg, {"metrics": MetricRecord(metrics)})

    def _evaluation(self, model: torch.nn.Module, val: ImageSplit, n: int, pid: int) -> dict[str, Any]:
        hist = evaluate(model, val, device=CPU).histograms
        metrics: dict[str, Any] = {"num-examples": int(hist[0].sum()), "histograms": [int(v) for v in hist.reshape(-1)],
                                   "epsilon": 0.1 * n, "epsilon_budget": 2.0, "partition-id": pid}
        if "round" in protocol.EVAL_METRICS:
            metrics["round"] = max(1, n)
        return metrics


def _unpacked(record: ArrayRecord, model: torch.nn.Module) -> ArrayRecord:
    """The global model's arrays as a real node reads them (the coordinator may pack them into one)."""
    return as_unpacked(record, shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
                       dtype="float32", what="the global model")
