"""Examples for the concept suites: held-out code-concept tasks and hub-dataset tasks on the tiny GPT-2."""
from __future__ import annotations

import keyword
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import planted_sae

from evals import concepts as C
from evals.tasks import (
    ConceptTaskConfig,
    HubTaskConfig,
    LabelledTokens,
    capture_rows,
    concept_tasks,
    hub_tasks,
    label_heldout_tokens,
    pooled,
    pooled_latents,
    sample_concept_rows,
)

HOOK = "blocks.1.hook_resid_post"
SMALL = ConceptTaskConfig(n_tokens=32_768, n_train=200, n_test=100, context_size=64, min_per_class=5,
                          concepts=("string", "comment", "keyword", "indent_2"))


@pytest.fixture(scope="module")
def labelled(tiny_model) -> LabelledTokens:
    return label_heldout_tokens(tiny_model, SMALL)


def test_labels_follow_the_tokens_the_model_reads(labelled, tiny_model):
    assert labelled.contexts.shape[1] == SMALL.context_size
    assert labelled.contexts.numel() >= SMALL.n_tokens
    assert labelled.n_files >= 2 and 0 < labelled.test_split.mean() < 1  # both sides of the file split
    bos = labelled.token_ids == tiny_model.bos_token_id
    assert (labelled.concepts[bos] == -2).all()  # BOS carries no label
    labelled_rows = labelled.concepts[:, 0] >= -1
    assert labelled_rows.mean() > 0.9
    # a keyword-labelled token is a piece of a keyword (the tiny tokenizer splits `False` into F|al|se)
    kw = np.nonzero(labelled.concepts[:, C.CONCEPT_NAMES.index("keyword")] == 1)[0][:50]
    words = {tiny_model.tokenizer.decode([int(labelled.token_ids[r])]).strip() for r in kw}
    assert words and all(any(w in k for k in keyword.kwlist) for w in words)


def test_capture_rows_equals_a_direct_capture(labelled, tiny_model):
    rows = np.array([5, 70, 64 * 3 + 1, 64 * 3 + 63, 1])
    got = capture_rows(tiny_model, HOOK, labelled.contexts, rows, batch_size=2)
    direct = tiny_model.capture(labelled.contexts[:4], [HOOK])[HOOK].reshape(-1, 32)
    torch.testing.assert_close(got, direct[torch.as_tensor(rows)])


def test_concept_tasks_are_balanced_and_split_by_file(labelled, tiny_model):
    ts = concept_tasks(tiny_model, HOOK, SMALL, tokens=labelled, extra_rows={"some": np.array([3, 9])})
    assert [t.name for t in ts.tasks] == list(SMALL.concepts) and ts.hook_point == HOOK
    for t, m in zip(ts.tasks, ts.manifest()):
        assert t.train.acts.shape[1:] == (1, 32) and t.train.mask.all()
        assert int(t.train.labels.sum()) * 2 == len(t.train.labels) == m["n_train_pos"] + m["n_train_neg"]
        assert int(t.test.labels.sum()) * 2 == len(t.test.labels) <= SMALL.n_test
        assert m["pool_train_pos"] >= m["n_train_pos"] and 0 < m["positive_rate"] < 1 and m["description"]
    assert ts.extras["extra_acts"]["some"].shape == (2, 32)
    torch.testing.assert_close(ts.extras["extra_acts"]["some"],
                               capture_rows(tiny_model, HOOK, labelled.contexts, np.array([3, 9])))


def test_one_class_concept_is_a_clear_error(labelled):
    none = labelled._replace(concepts=np.where(labelled.concepts == 1, 0, labelled.concepts).astype(np.int8))
    with pytest.raises(ValueError, match=r"task .string. has 0 positive .*\(a task with one class"):
        sample_concept_rows(none, SMALL)


def test_pooled_latents_average_encoded_positions():
    dirs = torch.eye(4)
    sae = planted_sae(dirs, k=3)
    acts = torch.tensor([[[1.0, 0, 0, 0], [0, 2.0, 0, 0], [9.0, 9, 9, 9]]])  # the last position is masked out
    from evals.tasks import ExampleSet

    ex = ExampleSet(acts, torch.tensor([[True, True, False]]), torch.tensor([1]))
    torch.testing.assert_close(pooled(ex), torch.tensor([[0.5, 1.0, 0, 0]]))
    torch.testing.assert_close(pooled_latents(sae, ex), torch.tensor([[0.5, 1.0, 0, 0]]))


def test_hub_tasks_from_a_local_parquet_laid_out_like_the_hub(bias_in_bios_folder: Path, tiny_model):
    cfg = HubTaskConfig(str(bias_in_bios_folder), "profession", "hard_text", n_train=40, n_test=20, context_size=32,
                        min_per_class=5)
    ts = hub_tasks(tiny_model, HOOK, cfg)
    assert [t.name for t in ts.tasks] == ["profession=13", "profession=2", "profession=21"]  # by count, then name
    t = ts.tasks[0]
    assert len(t.train.labels) == 40 and int(t.train.labels.sum()) == 20
    assert t.train.acts.shape[1] <= 32 and t.train.acts.shape[2] == 32
    assert not t.train.mask[:, 0].any()  # BOS is not averaged in
    assert t.manifest["level"] == "text" and t.manifest["pool_train_pos"] == 80
    picked = hub_tasks(tiny_model, HOOK, HubTaskConfig(**{**cfg.__dict__, "classes": ("21",)}))
    assert [t.name for t in picked.tasks] == ["profession=21"]


def test_hub_bad_input(bias_in_bios_folder: Path, tiny_model):
    base = dict(dataset=str(bias_in_bios_folder), text_column="hard_text", n_train=40, n_test=20, min_per_class=5)
    with pytest.raises(ValueError, match=r"no column\(s\) \['job'\].*hard_text"):
        hub_tasks(tiny_model, HOOK, HubTaskConfig(label_column="job", **base))
    with pytest.raises(ValueError, match=r"classes \['99'\] are not in both"):
        hub_tasks(tiny_model, HOOK, HubTaskConfig(label_column="profession", classes=("99",), **base))
    import pandas as pd

    one = bias_in_bios_folder.parent / "one_class"
    (one / "data").mkdir(parents=True)
    for split in ("train", "test"):
        df = pd.read_parquet(bias_in_bios_folder / "data" / f"{split}-00000-of-00001.parquet")
        df.assign(profession=21).to_parquet(one / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"one class"):
        hub_tasks(tiny_model, HOOK, HubTaskConfig(**{**base, "dataset": str(one)}, label_column="profession"))
