"""The grouped-vs-random picture marks each batch's false negatives."""

import numpy as np
import torch

from gritvlp.train.pictures import batch_marks, grouped_vs_random


def test_marks_name_the_duplicates_and_mined_partners():
    marks = batch_marks(caption_ids=[4, 5, 4, 6, 4], group_ids=[0, 1, 2, 1, 3], converted=[(3, 1), (0, 4)])
    assert marks[0] == "same caption #2 #4; mined #4"
    assert marks[1] == "same image #3; mined #3"
    assert marks[3] == "same image #1; mined #1"
    assert batch_marks([1, 2], [None, None]) == ["", ""]


class Samples:
    """A dataset of flat-coloured images with ids, one unreadable sample."""

    caption_ids = torch.tensor([0, 1, 0, 2, 0, 3])
    group_ids = torch.arange(6)

    def __getitem__(self, i):
        if i == 5:
            return None
        return {"image": torch.full((3, 8, 8), float(i) / 5), "caption": f"caption {int(self.caption_ids[i])}"}


def test_picture_is_drawn_with_its_marks():
    plain = grouped_vs_random(Samples(), [0, 2, 4, 1], [3, 5, 1, 0])
    marked = grouped_vs_random(Samples(), [0, 2, 4, 1], [3, 5, 1, 0], converted=[(0, 3)])
    assert plain.dtype == np.uint8 and plain.ndim == 3 and plain.shape == marked.shape
    red = (plain[..., 0] > 150) & (plain[..., 1] < 80)
    assert red.any()  # the same-caption marks of the grouped batch
    assert not np.array_equal(plain, marked)  # the mined pair is marked too
