"""The lm-eval backend against lm-eval's own Hugging Face backend, and the eval and generate commands.

The same local tasks (lm-eval YAML over JSONL written here: multiple choice, a rolling loglikelihood over texts longer
than the context so that several windows are scored, and greedy generation with stop sequences) run through
`lm_eval --model hf` and `--model moejax` on the same random checkpoint (both architectures, float32): every
loglikelihood within 1e-4, is_greedy identical, rolling loglikelihoods within 1e-4, generations identical, task
scores identical.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra (it brings lm-eval and its Hugging Face backend)
pytest.importorskip("lm_eval")

import lm_eval
import torch
import transformers
from lm_eval.tasks import TaskManager

import moejax
from moejax.cli import main
from moejax.commands.evaluate import EvalSettings, evaluate, score_rows
from moejax.commands.generate import GenerateSettings, generate
from moejax.errors import DataError, SettingsError
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # the quick loop covers their parts (steering, packing)
# transformers' PyTorch Mamba-2 path floors dt at time_step_min (moejax.config.NemotronHConfig.dt_floor).
OVERRIDES = {"qwen3_moe": {}, "nemotron_h": {"dt_floor": "time_step_min"}}
CONTEXT = 64  # max_length of both backends: the rolling texts need several windows
QUESTIONS = [("The opposite of hot is", ["cold", "tall", "green"], 0), ("Bees make", ["glass", "honey", "milk"], 1),
             ("A week has", ["five days", "ten days", "seven days"], 2), ("ההפך של חם הוא", ["קר", "גבוה"], 0),
             ("一週間は", ["七日", "五日", "十日"], 0), ("Two plus two is", [" four", " five", " 4"], 0)]
TEXTS = ["The river rises in spring and floods the low fields where the farmers grow rice and beans every year.",
         "לחם צריך קמח, מים וזמן; האופה קם לפני הזריחה ומדליק את התנור הגדול שבפינת המאפייה.",
         "月曜日から金曜日まで、私は朝早く起きて、駅まで歩いて、電車で会社に行きます。", "Short."]
PROMPTS = ["Monday, Tuesday,", "one, two, three,", "ראשון, שני,", "一、二、三、",
           "Q: What is the capital of France?\nA:"]


def write_tasks(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
            "roll": [{"text": t} for t in TEXTS], "gen": [{"prompt": p, "answer": "x"} for p in PROMPTS]}
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                              encoding="utf-8")
    common = "dataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files: {folder}/{name}.jsonl\n"
    specs = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
              "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "roll": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
               'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 20\n  do_sample: false\n'
               "metric_list:\n  - metric: exact_match\n",
    }
    for name, spec in specs.items():
        (folder / f"local_{name}.yaml").write_text(f"task: local_{name}\n" + common.format(folder=folder, name=name)
                                                   + spec, encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["qwen3_moe", "nemotron_h"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    _, path = make_checkpoint(request.param, root / "model", seed=5, byte_tokenizer=True)
    return request.param, path, write_tasks(root / "tasks")


def run_backend(name, model_args, tasks):
    return lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=["local_mc", "local_roll", "local_gen"],
                                   task_manager=TaskManager(include_path=str(tasks)), log_samples=True, batch_size=4)


def test_scores_equal_the_hugging_face_backend(checkpoint):
    arch, path, tasks = checkpoint
    hf = run_backend("hf", f"pretrained={path},dtype=float32,device=cpu,max_length={CONTEXT}", tasks)
    ours = run_backend("moejax", {"pretrained": str(path), "max_length": CONTEXT, **OVERRIDES[arch]}, tasks)
    compared = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}
    kinds = {"local_mc": "loglikelihood", "local_roll": "loglikelihood_rolling", "local_gen": "generate_until"}
    for task, kind in kinds.items():
        for a, b in zip(hf["samples"][task], ours["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for (ra,), (rb,) in zip(a["resps"], b["resps"], strict=True):
                compared[kind] += 1
                if kind == "loglikelihood":
                    assert abs(ra[0] - rb[0]) <= 1e-4, f"{task} doc {a['doc_id']}: {ra[0]} vs {rb[0]}"
                    assert ra[1] == rb[1], f"{task} doc {a['doc_id']}: is_greedy {ra[1]} vs {rb[1]}"
                elif kind == "loglikelihood_rolling":
                    assert abs(ra - rb) <= 1e-4, f"{task} doc {a['doc_id']}: {ra} vs {rb}"
                else:
                    assert ra == rb, f"{task} doc {a['doc_id']}: {ra!r} vs {rb!r}"
        for key, value in hf["results"][task].items():
            if not isinstance(value, float):
                continue
            if "perplexity" in key or "bits_per_byte" in key:
                # exp / division of summed loglikelihoods that agree to 1e-4: equal to that relative order.
                assert value == pytest.approx(ours["results"][task][key], rel=1e-4), (task, key)
            else:  # counts of right answers: identical
                assert value == ours["results"][task][key], (task, key)
    assert compared == {"loglikelihood": sum(len(c) for _, c, _ in QUESTIONS), "loglikelihood_rolling": len(TEXTS),
                        "generate_until": len(PROMPTS)}


def test_steered_scores_equal_the_hooked_hugging_face_backend(checkpoint, tmp_path):
    """`--steering` through the lm-eval backend (a spec file in model_args, as `lm_eval --model_args
    pretrained=DIR,steering=FILE` gives it) against lm-eval's Hugging Face backend over the transformers model with
    the same intervention hooked into its routers (moejax.parity.fixtures.steered)."""
    from lm_eval.models.huggingface import HFLM

    from moejax.models.steering import Steering
    from moejax.parity.fixtures import steered

    arch, path, tasks = checkpoint
    steering = Steering(mode="soft", lam=1.5, layers={0: ((1, 4), (2,)), 1: ((6,), ())})
    spec = tmp_path / "steer.json"
    spec.write_text(json.dumps(steering.to_dict()))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = HFLM(pretrained=reference, tokenizer=str(path), max_length=CONTEXT, batch_size=4)
    manager = TaskManager(include_path=str(tasks))
    with steered(reference, steering.arrays(ours_config(path))):
        want = lm_eval.simple_evaluate(model=hf, tasks=["local_mc", "local_gen"], task_manager=manager,
                                       log_samples=True)
    got = lm_eval.simple_evaluate(model="moejax", model_args={"pretrained": str(path), "max_length": CONTEXT,
                                                              "steering": str(spec), **OVERRIDES[arch]},
                                  tasks=["local_mc", "local_gen"], task_manager=manager, log_samples=True,
                                  batch_size=4)
    plain = run_backend("moejax", {"pretrained": str(path), "max_length": CONTEXT, **OVERRIDES[arch]}, tasks)
    moved = 0
    for a, b, c in zip(want["samples"]["local_mc"], got["samples"]["local_mc"], plain["samples"]["local_mc"],
                       strict=True):
        for (ra,), (rb,), (rc,) in zip(a["resps"], b["resps"], c["resps"], strict=True):
            assert abs(ra[0] - rb[0]) <= 1e-4 and ra[1] == rb[1], f"doc {a['doc_id']}: {ra} vs {rb}"
            moved = max(moved, abs(rb[0] - rc[0]))
    assert moved > 1e-3, "steering moved no loglikelihood: the comparison proves nothing"
    for a, b in zip(want["samples"]["local_gen"], got["samples"]["local_gen"], strict=True):
        assert a["resps"] == b["resps"], f"doc {a['doc_id']}"


def ours_config(path):
    from moejax.loading import load_config

    return load_config(path)


def test_eval_command_writes_lm_eval_results_and_scores(checkpoint, tmp_path):
    arch, path, tasks = checkpoint
    args = ["eval", "--model", str(path), "--tasks", "local_mc,local_gen", "--include-path", str(tasks),
            "--out", str(tmp_path / "out"), "--batch-size", "4"]
    if OVERRIDES[arch]:
        args += ["--model-args", ",".join(f"{k}={v}" for k, v in OVERRIDES[arch].items())]
    assert main(args) == 0
    out = tmp_path / "out"
    results = [json.loads(p.read_text()) for p in out.glob("*/results_*.json")]
    assert len(results) == 1 and set(results[0]["results"]) == {"local_mc", "local_gen"}
    assert len(list(out.glob("*/samples_local_mc_*.jsonl"))) == 1
    csv_rows = (out / "scores.csv").read_text().splitlines()
    assert csv_rows[0] == "task,language,family,metric,filter,value,stderr,samples,chance"
    assert {row.split(",")[0] for row in csv_rows[1:]} == {"local_mc", "local_gen"}
    assert (out / "scores.png").stat().st_size > 0


def test_eval_with_no_arguments_runs_the_bundled_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--limit", "3"]) == 0
    rows = (tmp_path / "moejax-eval" / "scores.csv").read_text().splitlines()[1:]
    tasks = {row.split(",")[0]: row.split(",")[1] for row in rows}
    assert tasks == {f"moejax_{kind}_{lang}": lang for kind in ("choice", "complete") for lang in ("en", "he", "ja")}


def test_language_column():
    results = {"results": {"belebele_heb_Hebr": {"acc,none": 0.5}, "moejax_choice_ja": {"acc,none": 0.25},
                           "mgsm_direct_he": {"exact_match,flexible": 0.1, "exact_match_stderr,flexible": 0.01}},
               "configs": {"moejax_choice_ja": {"metadata": {"language": "ja"}}}}
    rows = {(r["task"], r["metric"]): r for r in score_rows(results)}
    assert rows[("moejax_choice_ja", "acc")]["language"] == "ja"
    assert rows[("mgsm_direct_he", "exact_match")]["language"] == "he"
    assert rows[("mgsm_direct_he", "exact_match")]["stderr"] == 0.01
    assert rows[("belebele_heb_Hebr", "acc")]["language"] == ""


def test_lm_eval_finds_moejax_through_its_entry_point():
    """A fresh interpreter: lm-eval's registry knows `moejax` without moejax being imported first (the entry point
    and the .pth hook the installation adds)."""
    code = ("import sys; from lm_eval.api.registry import get_model; cls = get_model('moejax'); "
            "print(cls.__module__ + ':' + cls.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "moejax.evaluation.harness:MoejaxLM"


def test_generate_command(checkpoint, tmp_path, capsys):
    arch, path, _ = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffMonday, Tuesday,\r\n\r\nשלום\r\n".encode())  # a BOM and CRLF line ends
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["written_by"] == "moejax generate"
    assert [g["prompt"] for g in record["generations"]] == ["Monday, Tuesday,", "שלום"]
    assert all(g["continuation"] in printed for g in record["generations"])
    # The same greedy continuation as model.generate on the same tokens.
    again = generate(GenerateSettings(model=path, prompt="Monday, Tuesday,", max_new_tokens=6))
    assert again[0]["continuation"] == record["generations"][0]["continuation"]
    sampled = [generate(GenerateSettings(model=path, prompt="abc", max_new_tokens=8, sample=True, temperature=1.5,
                                         seed=s))[0]["continuation"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_streams_the_same_text(checkpoint, tmp_path, capsys):
    """--stream prints each continuation as its tokens come (the on_token callback gets every new token, in order),
    the same text as the batched path, then the time to the first token and the decode rate; --no-stream prints
    whole continuations."""
    arch, path, _ = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Monday, Tuesday,\nשלום\n", encoding="utf-8")
    batched = generate(GenerateSettings(model=path, prompts=prompts, max_new_tokens=7, no_stream=True))
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "7",
                 "--stream"]) == 0
    printed = capsys.readouterr().out
    for i, result in enumerate(batched, 1):
        block = printed.split(f"[{i}] {result['prompt']}\n", 1)[1]
        assert block.startswith(result["continuation"]), (block, result)
        stats = block[len(result["continuation"]):].splitlines()[1]
        assert re.fullmatch(r"\(\d+ tokens; first after [\d.]+ s; the first decode step [\d.]+ s; then [\d.]+ "
                            r"tokens/s; compiling is included on a shape not run before\)", stats), stats
    assert main(["generate", "--model", str(path), "--prompt", "abc", "--stream", "--no-stream"]) == 2
    seen = []
    model = moejax.from_pretrained(path)
    ids = np.array([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=5, on_token=lambda token_b: seen.append(token_b.copy()))
    np.testing.assert_array_equal(np.stack(seen, axis=1), out.sequences[:, 4:])


@pytest.mark.parametrize("case", ["no_tokenizer", "chat_without_template", "prompt_too_long", "no_prompt",
                                  "zero_new_tokens", "sampling_flags_without_sample"])
def test_generate_bad_input(case, tmp_path, capsys):
    reference_dir = tmp_path / "model"
    make_checkpoint("qwen3_moe", reference_dir, vocab_size=259, max_position_embeddings=32)
    if case != "no_tokenizer":
        save_byte_tokenizer(reference_dir, chat_template=case != "chat_without_template")
    capsys.readouterr()
    args = {"no_tokenizer": ["--prompt", "hi"], "chat_without_template": ["--prompt", "hi", "--chat"],
            "prompt_too_long": ["--prompt", "x" * 40], "no_prompt": [],
            "zero_new_tokens": ["--prompt", "hi", "--max-new-tokens", "0"],
            "sampling_flags_without_sample": ["--prompt", "hi", "--top-p", "0.5"]}[case]
    want = {"no_tokenizer": "no tokenizer", "chat_without_template": "has no chat template",
            "prompt_too_long": "exceeds the model's 32 positions", "no_prompt": "exactly one of --prompt",
            "zero_new_tokens": "--max-new-tokens must be >= 1", "sampling_flags_without_sample": "add --sample"}[case]
    assert main(["generate", "--model", str(reference_dir), "--max-new-tokens", "4", *args]) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", ["unknown_task", "network_task", "no_tokenizer", "bad_model_args", "missing_include",
                                  "chat_without_template"])
def test_eval_bad_input(case, tmp_path, capsys):
    model = tmp_path / "model"
    make_checkpoint("qwen3_moe", model, vocab_size=259)
    if case != "no_tokenizer":
        save_byte_tokenizer(model, chat_template=case != "chat_without_template")
    tasks = write_tasks(tmp_path / "tasks")
    (tasks / "hub.yaml").write_text("task: needs_the_hub\ndataset_path: someone/some_dataset_that_is_not_here\n"
                                    'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
                                    'doc_to_choice: "{{c}}"\ndoc_to_target: 0\n', encoding="utf-8")
    capsys.readouterr()
    args = {"unknown_task": ["--tasks", "local_mcq"], "network_task": ["--tasks", "needs_the_hub"],
            "no_tokenizer": ["--tasks", "local_mc"], "bad_model_args": ["--tasks", "local_mc", "--model-args", "x"],
            "missing_include": ["--tasks", "local_mc", "--include-path", str(tmp_path / "nowhere")],
            "chat_without_template": ["--tasks", "local_mc", "--chat"]}[case]
    want = {"unknown_task": "unknown task 'local_mcq'; did you mean local_mc", "network_task": "runs offline",
            "no_tokenizer": "no tokenizer", "bad_model_args": "expected KEY=VALUE",
            "missing_include": "no such folder", "chat_without_template": "has no chat template"}[case]
    out = tmp_path / "out"
    include = [] if case == "missing_include" else ["--include-path", str(tasks)]
    assert main(["eval", "--model", str(model), "--out", str(out), *include, *args]) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "nothing half-written"
    if case == "network_task":  # offline in this process too, where the hub's library was imported before
        import huggingface_hub.constants

        assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_eval_settings_checks(tmp_path):
    with pytest.raises(SettingsError, match="--batch-size must be >= 1"):
        EvalSettings(batch_size=0)
    with pytest.raises(SettingsError, match="--limit must be >= 1"):
        EvalSettings(limit=0)
    with pytest.raises(SettingsError, match="--model-args: expected KEY=VALUE"):
        EvalSettings(model_args="dt_floor")
    with pytest.raises(DataError, match="no such folder"):
        evaluate(EvalSettings(include_path=(tmp_path / "nowhere",), out=tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
