"""The training step's hot path makes no host synchronisation of its own.

On CPU nothing ever waits, so the test records the aten ops that make the host wait for the device when
they run on CUDA (a data-dependent output size or a value read back) and asserts none is dispatched during a
forward + backward, the trainer's micro-step and the GRIT bank add. The plain PyTorch kernels
(GRITVLP_KERNELS=reference) run here; the Triton kernels are checked on a GPU by scripts/bench_step.py under
torch.cuda.set_sync_debug_mode.
"""

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.pretraining import PretrainingObjective
from gritvlp.sampling.bank import FeatureBank
from gritvlp.train.step import NonFiniteGuard, bank_features, forward_backward

aten = torch.ops.aten

# Ops whose output size or result the host must read from the device.
ALWAYS_SYNC = {
    aten._local_scalar_dense,  # .item(), .tolist(), bool(), int(), float() of a tensor
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,  # nonzero_static (fixed size) does not wait
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,
}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # with a boolean index
REPEAT_INTERLEAVE = aten.repeat_interleave  # .Tensor / .self_Tensor without output_size


# Python-level reads of tensor values: on CPU .tolist() and .numpy() read memory without dispatching an op.
HOST_READS = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"}


class HostReadRecorder(TorchFunctionMode):
    def __init__(self, syncs: list[str]):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.syncs.append(f"Tensor.{name}: reads a value on the host")
        return func(*args, **(kwargs or {}))


class HostSyncRecorder(TorchDispatchMode):
    """Records every dispatched op that would synchronise on CUDA."""

    def __init__(self, syncs: list[str]):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = self._reason(func, args, kwargs)
        if reason:
            self.syncs.append(f"{func}: {reason}")
        return func(*args, **kwargs)

    @staticmethod
    def _reason(func, args, kwargs) -> str | None:
        packet = func.overloadpacket
        if packet in ALWAYS_SYNC:
            return "reads a value or a data-dependent size"
        if packet in BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                return "boolean-mask index"
        if packet is REPEAT_INTERLEAVE and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if packet in (aten._to_copy, aten.copy_):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(t.device.type != "cpu" for t in tensors) and _targets_cpu(func, args, kwargs):
                return "copy from the device to the host"
        return None


@contextmanager
def recording_host_syncs():
    """Yields the list that every would-be host synchronisation inside the block is appended to."""
    syncs: list[str] = []
    with HostReadRecorder(syncs), HostSyncRecorder(syncs):
        yield syncs


def _targets_cpu(func, args, kwargs) -> bool:
    if func.overloadpacket is aten.copy_:
        return args[0].device.type == "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu"


def test_the_recorder_catches_syncing_patterns():
    x = torch.tensor([0.5, -1.0, 2.0, 0.0])
    repeats = torch.tensor([1, 2, 0, 1])
    patterns = {
        "item": lambda: x.sum().item(),
        "if on a tensor": lambda: bool(x.any()),
        "tolist": lambda: x.tolist(),
        "nonzero": lambda: x.nonzero(),
        "boolean indexing": lambda: x[x > 0],
        "boolean index assignment": lambda: x.clone().__setitem__(x > 0, 1.0),
        "masked_select": lambda: x.masked_select(x > 0),
        "unique": lambda: torch.unique(repeats),
        "equal": lambda: torch.equal(x, x),
        "repeat_interleave": lambda: torch.repeat_interleave(x, repeats),
    }
    for name, pattern in patterns.items():
        with recording_host_syncs() as syncs:
            pattern()
        assert syncs, name
    sync_free = {
        "index_select": lambda: x.index_select(0, repeats),
        "integer indexing": lambda: x[repeats],
        "nonzero_static": lambda: x.nonzero_static(size=4),
        "repeat_interleave with output_size": lambda: torch.repeat_interleave(x, repeats, output_size=4),
        "where": lambda: torch.where(x > 0, x, 0.0),
    }
    for name, pattern in sync_free.items():
        with recording_host_syncs() as syncs:
            pattern()
        assert not syncs, (name, syncs)


class ObjectiveAsEngine:
    """The two calls of a DeepSpeed engine that the trainer's micro-step makes."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, batch):
        return self.objective(batch)

    def backward(self, loss):
        loss.backward()


def training_batch(objective, b=8, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (b, length), generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    batch = {
        "image": torch.randn(b, 3, 64, 64, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "group_id": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]),  # a duplicate image: same-group negatives excluded
        "index": torch.arange(b),
    }
    return objective.prepare_batch(batch, torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "objectives",
    [
        dict(consistency_weight=0.2, itm_negatives="hardest", mask_prob=0.5),  # GRIT-VLP
        dict(consistency_weight=0.0, itm_negatives="sample", mask_prob=0.15),  # ALBEF
    ],
    ids=["grit", "plain"],
)
def test_training_micro_step_makes_no_host_sync(objectives, monkeypatch):
    monkeypatch.setenv("GRITVLP_KERNELS", "reference")
    cfg = load_config("demo")
    torch.manual_seed(0)
    objective = PretrainingObjective(GritVLP(cfg.model), dataclasses.replace(cfg.objectives, **objectives)).train()
    batch = training_batch(objective)
    guard, bank = NonFiniteGuard(torch.device("cpu")), FeatureBank(64)

    with recording_host_syncs() as syncs:
        out, finite = forward_backward(ObjectiveAsEngine(objective), batch, True, guard)
        bank.add(*bank_features(out, finite), batch["index"])
    assert not syncs, "\n".join(syncs)
    assert torch.isfinite(out["loss"]) and objective.model.mlm_head.bias.grad.abs().sum() > 0  # the step ran


def test_the_slow_path_without_prepared_inputs_is_recorded(monkeypatch):
    """Sanity of the test above: the objective's own MLM preparation (for direct use) does read from the host."""
    monkeypatch.setenv("GRITVLP_KERNELS", "reference")
    cfg = load_config("demo")
    objective = PretrainingObjective(GritVLP(cfg.model), cfg.objectives).eval()
    batch = {k: v for k, v in training_batch(objective).items() if not k.startswith("mlm_")}
    with torch.no_grad(), recording_host_syncs() as syncs:
        objective(batch)
    assert any("nonzero" in s for s in syncs)
