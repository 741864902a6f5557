"""Zero-shot tasks through lm-evaluation-harness (rcpu_lite/tasks.py, `rcpu-lite eval --tasks`).

Task files are written here, a few documents per task in the hub datasets' field layout, and run on tiny random
models, stock and per-layer-width; nothing is downloaded. Our task configs are checked against the harness's own
YAML files, and arc_easy's accuracy against a loglikelihood argmax computed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from remote_output import write_output  # noqa: E402
from typer.testing import CliRunner

import rcpu_lite
from rcpu_lite.cli import app
from rcpu_lite.evaluate.tasks import CONFIG_DIR, TASKS, format_table, run_tasks
from rcpu_lite.methods.allocation import LayerWidths as W
from rcpu_lite.output import remote

runner = CliRunner()
ALL = list(TASKS)
ARC = [  # question, choices, answer
    ("What is the capital of the country?", ["the city", "a river", "the war", "music"], "A"),
    ("Which season follows summer?", ["winter", "autumn", "spring", "the game"], "B"),
    ("What did the army build?", ["a song", "the album", "a fort", "his family"], "C"),
    ("Who wrote the first album?", ["the river", "a road", "the king", "the band"], "D"),
]
DOCS = {
    "arc_easy": [
        {"id": f"e{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
        for i, (q, c, a) in enumerate(ARC)
    ],
    "arc_challenge": [
        {"id": f"c{i}", "question": q, "choices": {"text": c[:3], "label": list("123")}, "answerKey": "123"[i % 3]}
        for i, (q, c, _) in enumerate(ARC)
    ],
    "openbookqa": [
        {"id": f"o{i}", "question_stem": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
        for i, (q, c, a) in enumerate(ARC)
    ],
    "piqa": [
        {"goal": "How do you open a door?", "sol1": "Turn the handle.", "sol2": "Sing to it.", "label": 0},
        {"goal": "To boil water", "sol1": "put it in the snow", "sol2": "heat it in a pot", "label": 1},
        {"goal": "Make a song louder", "sol1": "turn up the volume", "sol2": "close the book", "label": 0},
    ],
    "boolq": [
        {
            "question": "is the city near the river",
            "passage": "The city was built on the river in 1900.",
            "idx": 0,
            "label": 1,
        },
        {
            "question": "did the band play in the war",
            "passage": "The band was formed after the war.",
            "idx": 1,
            "label": 0,
        },
        {
            "question": "was the album a success",
            "passage": "The album sold well in the first year.",
            "idx": 2,
            "label": 1,
        },
    ],
    "winogrande": [
        {
            "sentence": "The king gave the army a fort because _ was strong.",
            "option1": "the king",
            "option2": "the army",
            "answer": "2",
        },
        {
            "sentence": "The band played the song but _ was too long.",
            "option1": "the band",
            "option2": "the song",
            "answer": "2",
        },
        {
            "sentence": "John met his father and _ was happy to see his son.",
            "option1": "John",
            "option2": "his father",
            "answer": "2",
        },
    ],
    "hellaswag": [
        {"doc_id": i, "ind": i, "query": q, "choices": c, "gold": g}
        for i, (q, c, g) in enumerate(
            [
                (
                    "Music: A man plays the guitar.",
                    ["He sings a song.", "The river is cold.", "A war begins.", "The city sleeps."],
                    0,
                ),
                (
                    "Sports: The team runs onto the field.",
                    ["The album is red.", "They play the game.", "A king dies.", "The road ends."],
                    1,
                ),
                (
                    "History: The army marched north.",
                    ["A song plays.", "The book closes.", "They reached the city.", "He wrote music."],
                    2,
                ),
            ]
        )
    ],
}
SPLIT_FILES = {"hellaswag": "validation_subset3.processed.jsonl"}  # a subset's name, as in the real data


def write_task_dir(root: Path, tasks=ALL) -> Path:
    for task in tasks:
        folder = root / task
        folder.mkdir(parents=True)
        name = SPLIT_FILES.get(task, f"{TASKS[task][0]}.jsonl")
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in DOCS[task]), encoding="utf-8")
    return root


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task_dir(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama_gqa")


@pytest.fixture(scope="module")
def all_tasks(model, task_dir):
    return run_tasks(model, ALL, task_dir=task_dir, device="cpu", batch_size=4)


# --------------------------------------------------------------------------------------------- the results


def test_every_task_runs_from_local_files(all_tasks):
    assert [s.task for s in all_tasks.scores] == ALL  # the standard names, in the order given
    for s in all_tasks.scores:
        assert s.n == len(DOCS[s.task])
        assert 0 <= s.acc <= 1
        # acc_norm exactly where the harness reports it
        assert (s.acc_norm is None) == (s.task in {"boolq", "winogrande"}), s.task
    mean = all_tasks.mean()
    assert mean["acc"] == pytest.approx(sum(s.acc for s in all_tasks.scores) / len(ALL))
    assert mean["acc_norm"] == pytest.approx(
        sum(s.acc if s.acc_norm is None else s.acc_norm for s in all_tasks.scores) / len(ALL)
    )
    table = format_table(all_tasks)
    assert "rcpu_" not in table and all(t in table for t in ALL) and "mean" in table


def arc_by_hand(model_dir: Path, docs: list[dict]) -> tuple[float, float]:
    """arc_easy's acc and acc_norm as the harness defines them: per choice the summed log-probability of
    " " + choice after "Question: ...\\nAnswer:" (tokens split off the encoded whole), argmax against the answer;
    acc_norm divides by the choice's length in characters (without the space)."""
    tokenizer = rcpu_lite.models.load_tokenizer(model_dir)
    lm = rcpu_lite.load_pruned(model_dir, dtype=torch.float32).eval()
    hits = hits_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]["text"]:
            whole = tokenizer.encode(context + " " + choice)
            n_context = len(tokenizer.encode(context))
            with torch.no_grad():
                logprobs = torch.log_softmax(lm(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole))))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        lengths = [len(c) for c in doc["choices"]["text"]]  # the choice itself, not the space before it
        hits += max(range(len(scores)), key=scores.__getitem__) == gold
        hits_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == gold
    return hits / len(docs), hits_norm / len(docs)


def test_arc_easy_is_the_loglikelihood_argmax(all_tasks, model):
    acc, acc_norm = arc_by_hand(model, DOCS["arc_easy"])
    arc = next(s for s in all_tasks.scores if s.task == "arc_easy")
    assert (arc.acc, arc.acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_limit_takes_the_first_documents(model, task_dir):
    results = run_tasks(model, ["arc_easy", "piqa"], task_dir=task_dir, limit=2, device="cpu")
    assert [s.n for s in results.scores] == [2, 2]
    acc, acc_norm = arc_by_hand(model, DOCS["arc_easy"][:2])
    assert (results.scores[0].acc, results.scores[0].acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_a_per_layer_width_output(tiny_checkpoint, tmp_path, task_dir):
    out = tmp_path / "pruned"
    write_output(tiny_checkpoint("llama_gqa"), out, [W(6, 2, 70), W(2, 1, 40)], {"o_proj"})
    assert remote.is_remote(json.loads((out / "config.json").read_text()))
    results = run_tasks(out, "arc_easy,winogrande", task_dir=task_dir, device="cpu")
    assert [s.n for s in results.scores] == [4, 3]
    acc, acc_norm = arc_by_hand(out, DOCS["arc_easy"])
    assert (results.scores[0].acc, results.scores[0].acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))


# --------------------------------------------------------------------------------------------- the command line


def test_cli_prints_a_table(model, task_dir):
    result = invoke("eval", model, "--tasks", "boolq,arc_easy", "--task-dir", task_dir, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    assert rows["boolq"][0] == "3" and rows["boolq"][2] == "-"  # n, acc, no acc_norm
    assert rows["arc_easy"][0] == "4" and len(rows["arc_easy"]) == 3
    assert "mean" in rows


def test_cli_json_with_limit_and_perplexity(model, task_dir, calib_file):
    result = invoke(
        "eval",
        model,
        "--tasks",
        "hellaswag,winogrande",
        "--task-dir",
        task_dir,
        "--limit",
        "2",
        "--ppl",
        calib_file,
        "--max-windows",
        "2",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ppl"] > 1 and out["limit"] == 2  # both in one object
    assert set(out["tasks"]) == {"hellaswag", "winogrande"}
    for task in out["tasks"].values():
        assert task["n"] == 2 and {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} <= set(task)
    assert out["tasks"]["winogrande"]["acc_norm"] is None
    assert out["mean"]["acc"] == pytest.approx(
        (out["tasks"]["hellaswag"]["acc"] + out["tasks"]["winogrande"]["acc"]) / 2
    )


def test_ppl_alone_keeps_its_json(model, calib_file):
    result = invoke("eval", model, "--ppl", calib_file, "--max-windows", "1", "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert "tasks" not in json.loads(result.stdout) and "ppl" in json.loads(result.stdout)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "arc_easy,sciq"], "unknown task sciq"),
        (["--tasks", "arc_easy"], "--task-dir"),  # the hub is off in tests
        ([], "give --ppl FILE, --tasks TASKS or both"),
        (["--ppl", "x", "--limit", "3"], "go with --tasks"),
        (
            ["--tasks", "piqa", "--limit", "0", "--task-dir", "DIR", "--ppl", "/no/such/text"],
            "--limit must be at least 1",
        ),
    ],
)
def test_bad_arguments_are_one_line(model, task_dir, args, words):
    one_line_error(invoke("eval", model, *[str(task_dir) if a == "DIR" else a for a in args]), words)


def test_offline_without_task_dir_names_the_hub(model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = invoke("eval", model, "--tasks", "piqa")
    one_line_error(result, "hub")
    assert "--task-dir" in result.stderr


def test_a_missing_task_file_is_named(model, tmp_path):
    write_task_dir(tmp_path, ["arc_easy"])
    one_line_error(
        invoke("eval", model, "--tasks", "arc_easy,openbookqa", "--task-dir", tmp_path),
        str(tmp_path / "openbookqa" / "test.jsonl"),
    )


def test_hub_fields_for_hellaswag_are_refused(model, tmp_path):
    (tmp_path / "hellaswag").mkdir()
    raw = {"ctx_a": "A man", "ctx_b": "plays", "endings": ["a", "b", "c", "d"], "label": "0", "activity_label": "x"}
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(json.dumps(raw) + "\n")
    one_line_error(invoke("eval", model, "--tasks", "hellaswag", "--task-dir", tmp_path), "process_docs")


def test_without_the_harness_the_extra_is_named(model, task_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    one_line_error(invoke("eval", model, "--tasks", "piqa", "--task-dir", task_dir), "pip install 'rcpu-lite[eval]'")


# --------------------------------------------------------------------------------------------- our configs


class FunctionTagLoader(yaml.SafeLoader):
    """Reads !function tags as their names (the harness's own loader is private API)."""


FunctionTagLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def harness_config(relative: str) -> dict:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / relative
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=FunctionTagLoader)  # noqa: S506
    if "include" in config:
        config = {**harness_config(str(Path(relative).parent / config.pop("include"))), **config}
    return config


HARNESS_FILES = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
# what differs on purpose: hellaswag's file already holds process_docs's output (gold is int(label))
EXPECTED_CHANGES = {"hellaswag": {"doc_to_target": "{{gold}}"}}


@pytest.mark.parametrize("task", ALL)
def test_configs_mirror_the_harness(task):
    ours = yaml.load((CONFIG_DIR / f"{task}.yaml").read_text(encoding="utf-8"), Loader=FunctionTagLoader)  # noqa: S506
    theirs = {**harness_config(HARNESS_FILES[task]), **EXPECTED_CHANGES.get(task, {})}
    assert ours["task"] == "rcpu_" + task
    for key in (
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "target_delimiter",
        "fewshot_delimiter",
    ):
        mine, wanted = ours.get(key), theirs.get(key)
        if isinstance(wanted, str) and wanted.startswith("!function "):  # the same function, re-exported
            wanted = "!function winogrande." + wanted.rsplit(".", 1)[1]
        assert mine == wanted, (task, key)
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]
    split = theirs.get("test_split") or theirs["validation_split"]  # the split the harness evaluates
    assert split == TASKS[task][0] and ours["dataset_kwargs"]["data_files"] == {split: "@TASK_FILE@"}
    assert "process_docs" not in ours and ("process_docs" in theirs) == (task == "hellaswag")


def test_winogrande_functions_are_the_harness_s():
    import importlib.util

    from lm_eval.tasks.winogrande import preprocess_winogrande as theirs

    spec = importlib.util.spec_from_file_location("rcpu_winogrande", CONFIG_DIR / "winogrande.py")
    ours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ours)
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(ours, name) is getattr(theirs, name)
