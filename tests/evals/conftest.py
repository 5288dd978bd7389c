"""Fixtures of the eval-suite tests: a local dataset laid out like a hub repository."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def bias_in_bios_folder(tmp_path: Path) -> Path:
    """A local folder laid out like the hub's LabHC/bias_in_bios: data/{train,test}-00000-of-00001.parquet with
    hard_text, profession (int) and gender (int) columns; professions 21 (professor) and 13 (nurse) speak about
    different things, gender about others."""
    import pandas as pd

    words = {21: "lecture research university students thesis", 13: "patients hospital care ward medicine",
             2: "court law client case firm"}
    gender_words = {0: "he his him", 1: "she her hers"}
    root = tmp_path / "bias_in_bios"
    (root / "data").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 240), ("test", 120)):
        rows = []
        for i in range(n):
            prof = (21, 13, 2)[i % 3]
            gender = int(torch.randint(0, 2, (1,), generator=gen))
            text = f"{gender_words[gender]} works with {words[prof]} every day ({i})"
            rows.append({"hard_text": text, "profession": prof, "gender": gender})
        pd.DataFrame(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root
