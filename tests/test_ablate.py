"""scripts/ablate.py's bookkeeping: evaluation and training rows from metrics.jsonl, the mean and spread over seeds,
the reach step and the tables."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablate.py"
_spec = importlib.util.spec_from_file_location("ablate", SCRIPT)
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)


def write_metrics(path: Path, evals: list[tuple[int, float, float]], share: float = 0.1) -> Path:
    lines = []
    for step, txt_r1, img_r1 in evals:
        for s in (step - 64, step):  # two logged training rows per epoch, then the evaluation
            lines.append(json.dumps({"step": s, "loss/total": 3.0, "grit/false_negative_share": share * s / step,
                                     "perf/step_time_s": 0.5}))  # fmt: skip
        row = {"step": step, "eval/txt_r1": txt_r1, "eval/img_r1": img_r1, "eval/r_mean": 20.0,
               "eval/itc_txt_r1": txt_r1 + 1, "eval/itc_img_r1": img_r1 + 1, "eval/hard_itm_all": 55.0,
               "eval/hard_itm_colour": 60.0}  # fmt: skip
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def result(tmp_path, name, seed, evals, share=0.1):
    metrics = ablate.read_metrics(write_metrics(tmp_path / f"{name}{seed}.jsonl", evals, share))
    return {"variant": name, "seed": seed, "seconds": 120.0, **metrics}


def test_rows_spread_reach_and_tables(tmp_path):
    base = [result(tmp_path, "a", s, [(128, 2.0 + s, 4.0), (256, 4.0 + s, 6.0)]) for s in (0, 1, 2)]
    grit = [result(tmp_path, "b", s, [(128, 5.0 + s, 7.0), (256, 8.0, 9.0)], share=0.3) for s in (0, 1, 2)]
    row = base[0]["evaluations"][1]
    assert row["step"] == 256 and row["r1_mean"] == 5.0 and row["itc_r1_mean"] == 6.0 and row["hard_itm_size"] is None
    assert base[0]["training"][0]["false_negative_share"] == pytest.approx((0.05 + 0.1) / 2)
    summary_a, summary_b = ablate.summarise(base), ablate.summarise(grit)
    assert summary_a["steps"] == [128, 256]
    assert summary_a["r1_mean"][1] == pytest.approx([5.5, 0.5])  # final mean R@1 of seeds: 5.0, 5.5, 6.0
    assert summary_a["minutes"] == pytest.approx([2.0, 0.0])
    target = summary_a["r1_mean"][-1][0]
    assert ablate.reach(summary_a, base, target) == {"mean_curve": 256, "interpolated": 256, "per_seed": [None, 256, 256]}
    # seed means of (b): 6.5 at step 128 already >= 5.5, nothing evaluated before it to interpolate from
    assert ablate.reach(summary_b, grit, target) == {"mean_curve": 128, "interpolated": 128, "per_seed": [128, 128, 128]}
    # (a)'s curve (3.5 at 128, 5.5 at 256) crosses 4.5 half-way: 192
    assert ablate.reach(summary_a, base, 4.5)["interpolated"] == 192
    paired = {"a": ablate.paired_differences(base, base), "b": ablate.paired_differences(grit, base)}
    assert paired["b"]["r1_mean"] == pytest.approx([3.0, 0.5])  # 8.5 - 5.0, 8.5 - 5.5, 8.5 - 6.0
    assert paired["a"]["r1_mean"] == [0.0, 0.0]
    summaries = {"a": summary_a, "b": summary_b}
    text = ablate.tables(summaries, {n: ablate.reach(summaries[n], r, target) for n, r in (("a", base), ("b", grit))},
                         target, 512, paired)  # fmt: skip
    lines = text.splitlines()
    assert "Target: (a)'s final mean R@1, 5.5 (2/3 of the 512 steps is 341)" in lines[0]
    assert lines[4] == "| (a) random batches | 3.5 ± 0.5 / 5.5 ± 0.5 | +0.0 ± 0.0 | 6.5 ± 0.5 | 256, 256 (never, 256, 256) |"
    assert lines[5] == "| (b) GRIT grouping | 6.5 ± 0.5 / 8.5 ± 0.0 | +3.0 ± 0.5 | 9.5 ± 0.0 | 128, 128 (128, 128, 128) |"
    # hard negatives and false negatives after the first epoch (which trains on random batches everywhere): the
    # shares logged at steps 192 and 256 of (b) are 0.225 and 0.3
    assert lines[-1] == ("| (b) GRIT grouping | 55.0 ± 0.0 / 55.0 ± 0.0 | +0.0 ± 0.0 | 60.0 ± 0.0 | - | - | - | 26.2% | "
                         "- | - / - | 0.500 ± 0.000 |")  # fmt: skip


def test_e_mines_with_the_same_seeds_export_of_a(tmp_path):
    args = ablate.overrides("e", 2, tmp_path)
    assert f"objectives.mining_filter={tmp_path / 'a' / 'seed2' / 'export_fp16'}" in args
    assert "train.seed=2" in args and "objectives.itc_smoothing=0.5" in args
    assert "train.export_fp16=true" in ablate.overrides("a", 2, tmp_path)
    assert "objectives.caption_positives=false" in ablate.overrides("d", 0, tmp_path)
    assert not any("caption_positives" in o for o in ablate.overrides("d2", 0, tmp_path))
