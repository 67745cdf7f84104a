"""Checkpoint saves that fail or are cut short never become 'latest', and rotation never deletes the newest complete
checkpoint (one process, a stand-in for DeepSpeed's engine that writes real files)."""

import errno
import json

import pytest

from gritvlp.train import checkpoint
from gritvlp.train.trainer import trim_metrics


class Engine:
    """Writes a model-states file into the tag folder, as DeepSpeed's save_checkpoint does; `fail` raises there."""

    def __init__(self):
        self.fail = None

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False  # 'latest' is gritvlp's to move
        path = checkpoint.Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
        if self.fail is not None:
            raise OSError(self.fail, "No space left on device")


def tags(out):
    return sorted(p.name for p in checkpoint.checkpoint_dir(out).glob("global_step*"))


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, caplog):
    engine = Engine()
    assert checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep=2) == checkpoint.checkpoint_dir(tmp_path) / "global_step2"
    engine.fail = errno.ENOSPC
    assert checkpoint.save(engine, tmp_path, 4, {"step": 4}, keep=2) is None
    assert "global_step4 could not be written on rank 0 (" in caplog.text and "previous checkpoint global_step2" in caplog.text
    assert tags(tmp_path) == ["global_step2"]  # the partial folder is gone, the previous one untouched
    assert checkpoint.resolve_resume("latest", tmp_path) == (checkpoint.checkpoint_dir(tmp_path), "global_step2")
    engine.fail = None
    checkpoint.save(engine, tmp_path, 6, {"step": 6}, keep=2)
    assert tags(tmp_path) == ["global_step2", "global_step6"]


def test_latest_naming_an_incomplete_tag_falls_back_to_the_newest_complete(tmp_path, caplog):
    engine = Engine()
    for step in (2, 4):
        checkpoint.save(engine, tmp_path, step, {}, keep=0)
    folder = checkpoint.checkpoint_dir(tmp_path)
    (folder / "global_step4" / checkpoint.COMPLETE).unlink()  # as if the marker had never been written
    assert checkpoint.latest_tag(folder) == "global_step2" and "incomplete" in caplog.text
    # a tag of an earlier release (no marker) that 'latest' names is trusted when nothing is marked
    for tag in ("global_step2",):
        (folder / tag / checkpoint.COMPLETE).unlink()
    assert checkpoint.latest_tag(folder) == "global_step4"


def test_rotation_keeps_the_newest_complete_and_clears_killed_saves(tmp_path):
    engine = Engine()
    folder = checkpoint.checkpoint_dir(tmp_path)
    checkpoint.save(engine, tmp_path, 2, {}, keep=1)
    (folder / "global_step3").mkdir()  # a save killed before it completed
    (folder / "global_step9").mkdir()  # an incomplete tag from a later point of an abandoned timeline
    checkpoint.save(engine, tmp_path, 4, {}, keep=1)
    assert tags(tmp_path) == ["global_step4", "global_step9"]  # 9 is not older than the current tag: left alone
    assert checkpoint.latest_tag(folder) == "global_step4"


def test_resume_trims_rows_logged_after_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss/total": 1.0} for s in (1, 2, 3, 4, 5)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "loss/to')  # torn by a kill
    trim_metrics(metrics, 3)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    from gritvlp.config import load_config
    from gritvlp.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only prepare_output: no engine needed
    trainer.cfg, trainer.output_dir, trainer.device = load_config("demo"), tmp_path, "cpu"
    with pytest.raises(ValueError, match="exclude each other"):
        trainer.prepare_output("latest", True)
    checkpoint.save(Engine(), tmp_path, 2, {}, keep=1)
    with pytest.raises(FileExistsError, match="--resume latest to continue it, or --overwrite"):
        trainer.prepare_output(None, False)
    trainer.prepare_output(None, True)
    assert not checkpoint.has_checkpoints(tmp_path) and (tmp_path / "config.yaml").is_file()
