"""The skip / resume / redo bookkeeping of `sae-kit run`, on units whose work is writing files."""
from __future__ import annotations

import json
from pathlib import Path

from sae_kit.pipeline.stages import STAMP, STARTED, Unit, key_changes, plan, run_unit


def make_unit(root: Path, key: dict, log: list[str], text: str = "result", crash_after_first: bool = False) -> Unit:
    folder = root / "eval" / "x"

    def work() -> None:
        log.append("work")
        (folder / "part1.txt").write_text(text)
        if crash_after_first:
            raise KeyboardInterrupt  # stands in for a kill between two outputs
        (folder / "part2.txt").write_text(text + "!")

    return Unit("eval", "x", folder, key, work, outputs=lambda: sorted(folder.glob("part*.txt")))


def run(unit: Unit, root: Path) -> tuple[str, str]:
    seen: list[tuple[str, str]] = []
    run_unit(unit, root, lambda u, action, why: seen.append((action, why)))
    return seen[0]


def test_skip_when_key_and_outputs_match(tmp_path):
    log: list[str] = []
    key = {"config": {"n": 1}, "inputs": {"sae": "abc"}}
    assert run(make_unit(tmp_path, key, log), tmp_path) == ("run", "not run yet")
    stamp = json.loads((tmp_path / "eval/x" / STAMP).read_text())
    assert set(stamp["outputs"]) == {"eval/x/part1.txt", "eval/x/part2.txt"}
    assert not (tmp_path / "eval/x" / STARTED).exists()
    assert run(make_unit(tmp_path, key, log), tmp_path)[0] == "skip"
    assert log == ["work"]


def test_a_config_or_input_change_redoes_from_an_empty_folder_and_says_why(tmp_path):
    log: list[str] = []
    run(make_unit(tmp_path, {"config": {"n": 1}, "inputs": {"sae": "abc"}}, log), tmp_path)
    (tmp_path / "eval/x/stray.txt").write_text("left by an older version")
    action, why = run(make_unit(tmp_path, {"config": {"n": 2}, "inputs": {"sae": "abc"}}, log), tmp_path)
    assert action == "run" and why == "changed: n: 1 → 2"
    assert not (tmp_path / "eval/x/stray.txt").exists()
    action, why = run(make_unit(tmp_path, {"config": {"n": 2}, "inputs": {"sae": "def"}}, log), tmp_path)
    assert why == "changed: input sae changed"
    assert log == ["work"] * 3


def test_damaged_outputs_are_redone(tmp_path):
    log: list[str] = []
    key = {"config": {}, "inputs": {}}
    run(make_unit(tmp_path, key, log), tmp_path)
    (tmp_path / "eval/x/part2.txt").write_text("edited!")  # same size, other bytes
    assert run(make_unit(tmp_path, key, log), tmp_path) == ("run", "outputs damaged (eval/x/part2.txt changed)")
    (tmp_path / "eval/x/part1.txt").unlink()
    assert run(make_unit(tmp_path, key, log), tmp_path) == ("run", "outputs damaged (eval/x/part1.txt is missing)")


def test_an_interrupted_unit_resumes_keeping_its_work_but_not_temporaries(tmp_path):
    log: list[str] = []
    key = {"config": {"n": 1}, "inputs": {}}
    try:
        run(make_unit(tmp_path, key, log, crash_after_first=True), tmp_path)
    except KeyboardInterrupt:
        pass
    folder = tmp_path / "eval/x"
    assert (folder / STARTED).exists() and not (folder / STAMP).exists()
    (folder / ".part2.txt.tmp-abc.tmp").write_text("half")  # what a killed atomic write leaves
    kept = folder / "part1.txt"
    unit = make_unit(tmp_path, key, log)
    assert plan(unit, tmp_path)[:2] == ("resume", "an earlier run stopped part-way")
    seen: list[str] = []
    original = unit.work
    unit.work = lambda: (seen.append(kept.read_text()), original())
    run(unit, tmp_path)
    assert seen == ["result"]  # the resumed work found the earlier output in place
    assert not list(folder.glob(".*tmp*")) and (folder / STAMP).exists() and not (folder / STARTED).exists()


def test_an_interrupted_unit_whose_config_changed_starts_over(tmp_path):
    log: list[str] = []
    try:
        run(make_unit(tmp_path, {"config": {"n": 1}}, log, crash_after_first=True), tmp_path)
    except KeyboardInterrupt:
        pass
    action, why = run(make_unit(tmp_path, {"config": {"n": 2}}, log, text="new"), tmp_path)
    assert action == "run" and why.startswith("changed since an interrupted run: n: 1 → 2")
    assert (tmp_path / "eval/x/part1.txt").read_text() == "new"


def test_key_changes_lists_a_few_and_counts_the_rest():
    old = {"config": {f"f{i}": i for i in range(6)}}
    new = {"config": {f"f{i}": i + 1 for i in range(6)}}
    assert key_changes(old, new) == "f0: 0 → 1; f1: 1 → 2; f2: 2 → 3; f3: 3 → 4; and 2 more"


def test_key_changes_puts_inputs_first_and_counts_a_new_section_once():
    """A section added whole is one change, and a changed input leads: before, the fields of a new `suite` section
    (or a dozen edited fields sorting before `inputs.`) filled the four places and hid the real edit."""
    old = {"config": {"a": 1, "tokens": 100}, "inputs": {"sae": "x"}}
    new = {"config": {"a": 1, "tokens": 200, "suite": {f"f{i}": i for i in range(8)}}, "inputs": {"sae": "y"}}
    why = key_changes(old, new)
    assert why.startswith("input sae changed; suite: (unset) → {'f0': 0,") and why.endswith("…; tokens: 100 → 200")
    assert "more" not in why
    long = key_changes({"config": {"x": "a" * 200}}, {"config": {"x": "b"}})
    assert len(long) < 100 and long.endswith("→ 'b'")
