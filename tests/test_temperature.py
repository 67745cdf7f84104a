"""The stored contrastive temperature stays within [temp_min, temp_max] (as ALBEF clamps it in place), under every
ZeRO stage and precision, and exports write the value the model uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gritvlp import albef
from gritvlp.config import load_config
from gritvlp.export import export_fp16
from gritvlp.model.gritvlp import WEIGHTS_NAME, GritVLP

REPO = Path(__file__).resolve().parents[1]
LOW, HIGH = load_config("demo").model.temp_min, load_config("demo").model.temp_max


@pytest.fixture(scope="module")
def zero_runs() -> list[dict]:
    """tests/temperature_worker.py on 2 CPU processes: 6 optimizer steps at lr 1e-3 pushing the temperature down
    (direction 1) or up (-1), from 0.002 inside the bound."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "temperature_worker.py")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return [json.loads(line[len("RESULT ") :]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optimizer_steps_keep_the_stored_temperature_in_bounds_at_every_zero_stage(zero_runs):
    clamped = [r for r in zero_runs if r["clamp"]]
    assert {(r["stage"], r["precision"], r["direction"]) for r in clamped} == {
        (stage, precision, direction) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16") for direction in (1, -1)
    }  # fmt: skip
    for r in clamped:
        bound = LOW if r["direction"] > 0 else HIGH
        # the fp32 master copy (what checkpoints, resumes and exports read) sits at the bound the loss pushes to
        assert r["master"] == pytest.approx(bound, abs=1e-9), r
        # and so does the module's copy, to its precision (bf16's nearest value to 0.001 is 0.00099945)
        dtype = torch.bfloat16 if r["precision"] == "bf16" else torch.float32
        assert r["module"] == torch.tensor(bound).to(dtype).item(), r


@pytest.mark.slow
def test_without_the_clamp_adam_carries_the_temperature_out_of_bounds(zero_runs):
    """What the clamp prevents: momentum moves the parameter on after its gradient stops at the bound."""
    drifted = [r for r in zero_runs if not r["clamp"]]
    assert len(drifted) == 4
    for r in drifted:
        assert r["master"] < 0 if r["direction"] > 0 else r["master"] > HIGH, r  # below 0: a negative temperature


def out_of_range_model(raw: float) -> GritVLP:
    torch.manual_seed(0)
    model = GritVLP(load_config("demo").model)
    with torch.no_grad():
        model.temp.fill_(raw)
    return model


def stage0_checkpoint(model: GritVLP, folder: Path) -> Path:
    """A ZeRO stage-0 checkpoint as the trainer writes it: the objective's state dict and gritvlp's client state."""
    tag = folder / "global_step1"
    tag.mkdir(parents=True)
    states = {
        "module": {f"model.{k}": v for k, v in model.state_dict().items()},
        "model_config": model.config_dict(),
        "ds_config": {"zero_optimization": {"stage": 0}},
    }
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("global_step1")
    return folder


@pytest.mark.parametrize("raw, used", [(-0.0045, LOW), (1.8e-5, LOW), (0.9, HIGH)])
def test_exports_write_the_temperature_the_model_uses(tmp_path, raw, used):
    model = out_of_range_model(raw)
    assert model.temperature().item() == pytest.approx(used)
    export = export_fp16(stage0_checkpoint(model, tmp_path / "checkpoints"), tmp_path / "export")
    assert load_file(str(export / WEIGHTS_NAME))["temp"].item() == torch.tensor([used]).half().item()
    folder = albef.write_export_folder(model, tmp_path / "folder")
    assert load_file(str(folder / WEIGHTS_NAME))["temp"].item() == torch.tensor([used]).half().item()
    for layout in albef.LAYOUTS:
        exported = albef.gritvlp_to_albef(model, layout, queue_size=8)
        assert exported["temp"].dim() == 0 and exported["temp"].item() == pytest.approx(used), layout
    state = albef.load_albef_file(albef.save_albef_checkpoint(model, tmp_path / "albef.pth", queue_size=8))
    assert state["temp"].item() == pytest.approx(used)
    assert model.temp.item() == pytest.approx(raw)  # exporting leaves the model as it was


def test_clamp_reaches_the_flat_master_copy_of_deepspeeds_fp16_optimizer():
    """Without ZeRO, fp16 and bf16 keep the fp32 masters of a parameter group in one flat tensor (FP16_Optimizer):
    only the temperature's slice is clamped, and the module's copy with it."""
    from types import SimpleNamespace

    from torch._utils import _flatten_dense_tensors

    from gritvlp.train.step import clamp_stored

    before, temp, after = (torch.nn.Parameter(torch.tensor(v, dtype=torch.bfloat16)) for v in ([3.0, -2.0], [0.7], [-1.0]))  # fmt: skip
    flat = _flatten_dense_tensors([before, temp, after]).float()
    flat[2] = -0.0045  # the master drifted below the bound; the module's copy is the last one copied from it
    clamp_stored(temp, LOW, HIGH, SimpleNamespace(fp16_groups=[[before, temp, after]], fp32_groups_flat=[flat]))
    assert flat.tolist() == pytest.approx([3.0, -2.0, LOW, -1.0])
    assert temp.item() == 0.5 and before.tolist() == [3.0, -2.0] and after.tolist() == [-1.0]
