"""The FLOP count behind perf/tflops and perf/mfu, and the device peaks they are measured against."""

import os

import pytest
import torch

from gritvlp.train.flops import counting_flops, peak_tflops
from gritvlp.train.step import NonFiniteGuard, forward_backward


class LinearEngine:
    """The two calls of a DeepSpeed engine that forward_backward makes, on one bias-free nn.Linear."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear

    def __call__(self, batch):
        return {"loss": self.linear(batch["x"]).square().mean()}

    def backward(self, loss):
        loss.backward()


def test_a_linear_training_step_counts_six_flops_per_parameter_and_token():
    """Forward 2 T P, backward 4 T P (the gradients of the input and of the weight): 6 x params x tokens."""
    tokens, d_in, d_out = 24, 48, 40
    linear = torch.nn.Linear(d_in, d_out, bias=False)
    batch = {"x": torch.randn(tokens, d_in, requires_grad=True)}  # as the output of an earlier layer
    with counting_flops() as counter:
        forward_backward(LinearEngine(linear), batch, True, NonFiniteGuard(torch.device("cpu")))
    assert counter.get_total_flops() == 6 * linear.weight.numel() * tokens
    assert linear.weight.grad is not None  # the step really ran its backward


def test_counting_runs_the_reference_kernels_and_restores_the_choice(monkeypatch):
    monkeypatch.setenv("GRITVLP_KERNELS", "triton")
    with counting_flops() as counter:
        assert os.environ["GRITVLP_KERNELS"] == "reference"  # the fused kernels are opaque to the counter
        torch.randn(8, 16) @ torch.randn(16, 4)
    assert counter.get_total_flops() == 2 * 8 * 16 * 4
    assert os.environ["GRITVLP_KERNELS"] == "triton"


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5),
     ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
     ("NVIDIA L40", None), ("Tesla V100-SXM2-32GB", None)],
)  # fmt: skip
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda")) == peak


def test_peak_override_and_none_on_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 100.0) == 100.0
