"""scripts/ablate.py's bookkeeping: evaluation rows from metrics.jsonl, the reach step and the table."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablate.py"
_spec = importlib.util.spec_from_file_location("ablate", SCRIPT)
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)


def write_metrics(path: Path, evals: list[tuple[int, float, float]]) -> Path:
    lines = [json.dumps({"step": 5, "train/loss": 3.0})]  # training rows are skipped
    for step, txt_r1, img_r1 in evals:
        row = {"step": step, "eval/txt_r1": txt_r1, "eval/img_r1": img_r1, "eval/r_mean": 20.0,
               "eval/itc_txt_r1": txt_r1 + 1, "eval/itc_img_r1": img_r1 + 1, "eval/hard_itm_all": 55.0}  # fmt: skip
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_reach_step_and_table(tmp_path):
    base = ablate.evaluations(write_metrics(tmp_path / "a.jsonl", [(128, 2.0, 4.0), (256, 4.0, 6.0)]))
    grit = ablate.evaluations(write_metrics(tmp_path / "d.jsonl", [(128, 3.0, 5.0), (256, 8.0, 9.0)]))
    assert [r["step"] for r in base] == [128, 256]
    assert base[-1]["r1_mean"] == 5.0 and base[-1]["itc_r1_mean"] == 6.0 and base[-1]["hard_itc_all"] is None
    assert ablate.first_step_reaching(grit, 5.0) == 256  # 4.0 at step 128 is short of 5.0
    assert ablate.first_step_reaching(base, 5.0) == 256
    assert ablate.first_step_reaching(grit, 9.0) is None
    results = {"a_random_batches": {"evaluations": base, "seconds": 60.0},
               "d_grit_vlp": {"evaluations": grit, "seconds": 90.0}}  # fmt: skip
    table = ablate.table(results).splitlines()
    assert "(5.0)" in table[0]
    assert table[2] == "| a_random_batches | 3.0 / 5.0 | 55.0 / 55.0 | 6.0 | 256 | 1.0 |"
    assert table[3] == "| d_grit_vlp | 4.0 / 8.5 | 55.0 / 55.0 | 9.5 | 256 | 1.5 |"
